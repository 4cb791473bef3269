"""Distributed `generate` and `chat` as users start them: torchrun, the self-launcher, two rendezvous "nodes".

Real processes on the tiny random model (greedy), each job with a timeout; the output of every
parallel layout must equal the plain one-process run, byte for byte.
"""

import json
import re
import subprocess
import sys

import pytest

from tests.distributed_procs import (ROOT, Job, job_env, rank_envs, run, run_together, torchchat, torchrun,
                                    two_nodes)

GENERATE = ["--prompt", "Once upon a time", "--max-new-tokens", "24", "--temperature", "0"]
CHAT = ["--max-new-tokens", "12", "--temperature", "0"]
CHAT_INPUT = "Hello there\nWhat is your name?\nTell me a story\n"  # three turns, then EOF


@pytest.fixture(scope="module")
def flags(tiny_model):
    return tiny_model.cli_flags()


@pytest.fixture(scope="module")
def marker(tiny_model):
    return str(tiny_model.checkpoint)


@pytest.fixture(scope="module")
def local_generate(flags, marker, tmp_path_factory):
    done = run(torchchat("generate", *flags, *GENERATE), tmp_path_factory.mktemp("local"), marker)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout) > len("Once upon a time\n")
    return done.stdout


@pytest.fixture(scope="module")
def local_chat(flags, marker, tmp_path_factory):
    done = run(torchchat("chat", *flags, *CHAT), tmp_path_factory.mktemp("local"), marker, stdin=CHAT_INPUT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("Assistant: ") == 3
    return done.stdout


def assert_ranks_ran(done, world: int):
    for rank in range(world):
        assert f"[rank{rank}] pid=" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("layout", [["--tp", "2"], ["--pp", "2"]], ids=["tp2", "pp2"])
def test_torchrun_generate_equals_local(layout, flags, marker, local_generate, tmp_path):
    done = run(torchrun(2, "generate", *flags, *GENERATE, *layout), tmp_path, marker)
    assert done.returncode == 0, done.stderr
    assert done.stdout == local_generate
    assert_ranks_ran(done, 2)
    assert "[rank0] time to first token" in done.stderr  # metrics on stderr, from rank 0, with its prefix


def test_self_launched_tp2_pp2_generate_equals_local(flags, marker, local_generate, tmp_path):
    """4 processes started by torchchat itself; the prompt comes on the launcher's stdin (rank 0 reads it)."""
    no_prompt = [a for a in GENERATE if a not in ("--prompt", "Once upon a time")]
    done = run(torchchat("generate", *flags, *no_prompt, "--tp", "2", "--pp", "2"), tmp_path, marker,
               stdin="Once upon a time", timeout=180)
    assert done.returncode == 0, done.stderr
    assert done.stdout == local_generate
    assert_ranks_ran(done, 4)


# `eval` of 8 windows of 32 tokens (the byte tokenizer: a byte is a token), 2 windows a forward
EVAL_TEXT = "The quick brown fox jumps over the lazy dog. " * 6
EVAL = ["--max-seq-length", "32", "--batch", "2"]
# Measured on this text: TP 2 x PP 2's perplexity parts from one process's by 4.0e-6 (relative; the TP layers'
# float32 sums in another order: see test_distributed_parity.py's figures).
EVAL_TP_PERPLEXITY = 8e-6


def _perplexity_line(done) -> tuple[float, int]:
    assert done.returncode == 0, done.stderr
    match = re.fullmatch(r"perplexity: (\d+\.\d{4}) over (\d+) tokens\n", done.stdout)
    assert match, done.stdout
    return float(match.group(1)), int(match.group(2))


def test_self_launched_tp2_pp2_eval_equals_local(flags, marker, tmp_path):
    """`eval --tp 2 --pp 2` as a user starts it (4 processes, rank 0 reads the text, the others follow) prints one
    process's perplexity line, to float tolerance."""
    text = tmp_path / "text.txt"
    text.write_text(EVAL_TEXT)
    args = ["eval", *flags, "--text-file", str(text), *EVAL]
    local = _perplexity_line(run(torchchat(*args), tmp_path, marker))
    done = run(torchchat(*args, "--tp", "2", "--pp", "2"), tmp_path, marker, timeout=180)
    parallel = _perplexity_line(done)
    assert_ranks_ran(done, 4)
    assert parallel[1] == local[1] == 8 * 15
    assert abs(parallel[0] / local[0] - 1) < EVAL_TP_PERPLEXITY, f"{parallel[0]} vs {local[0]}"


@pytest.mark.parametrize("layout", [["--pp", "2"], ["--tp", "2"]], ids=["pp2", "tp2"])
def test_torchrun_chat_equals_local(layout, flags, marker, local_chat, tmp_path):
    done = run(torchrun(2, "chat", *flags, *CHAT, *layout), tmp_path, marker, stdin=CHAT_INPUT)
    assert done.returncode == 0, done.stderr  # torchrun exits 0 only if every rank did
    assert done.stdout == local_chat
    assert_ranks_ran(done, 2)


def test_two_node_rendezvous_tp2_equals_local(flags, marker, local_generate, tmp_path):
    nodes = run_together(two_nodes("generate", *flags, *GENERATE, "--tp", "2"), tmp_path, marker, timeout=180)
    for node in nodes:
        assert node.returncode == 0, node.stderr
    # Ranks are given by the rendezvous: whichever launcher holds rank 0 prints the text, the other nothing.
    assert sorted(n.stdout for n in nodes) == ["", local_generate]
    both = "".join(n.stderr for n in nodes)
    assert "[rank0] pid=" in both and "[rank1] pid=" in both
    assert both.count("local rank 0 of 1, world 2") == 2  # LOCAL_RANK 0 on both nodes, RANK 0 and 1


# ----- user errors: one line, every process exits non-zero, fast -----

def assert_one_error(done, *fragments, max_seconds: float = 60):
    assert done.returncode != 0, done.stderr
    errors = done.error_lines()
    assert len(errors) == 1, done.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert done.seconds < max_seconds
    assert "[rank1] pid=" not in done.stderr  # failed before loading anything


def assert_every_rank_fails_once(ranks, *fragments):
    """Each rank started by hand (no launcher to stop the others): every one must exit 2 by itself."""
    assert [r.returncode for r in ranks] == [2] * len(ranks), [r.stderr for r in ranks]
    errors = [line for r in ranks for line in r.error_lines()]
    assert len(errors) == 1 and errors[0].startswith("[rank0] error: "), [r.stderr for r in ranks]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert max(r.seconds for r in ranks) < 60


def test_world_size_must_equal_tp_times_pp_on_every_rank(flags, marker, tmp_path):
    cmd = torchchat("generate", *flags, *GENERATE, "--tp", "2", "--pp", "2")
    ranks = run_together([cmd, cmd], tmp_path, marker, envs=rank_envs(2))
    assert_every_rank_fails_once(ranks, "--tp 2 x --pp 2 = 4", "world size is 2")
    assert not any("pid=" in r.stderr for r in ranks)  # before joining any process group


def test_prompt_too_long_found_on_rank_0_fails_every_rank(flags, marker, tmp_path):
    """Only rank 0 reads the prompt: the others learn of its error in the startup agreement."""
    cmd = torchchat("generate", *flags, "--prompt", "x" * 40, "--max-seq-length", "32", "--max-new-tokens", "8",
                    "--tp", "2")
    ranks = run_together([cmd, cmd], tmp_path, marker, envs=rank_envs(2))
    assert_every_rank_fails_once(ranks, "prompt (", "exceeds the context (32)")


def test_torchrun_tp_must_divide_heads(flags, marker, tmp_path):
    done = run(torchrun(3, "generate", *flags, *GENERATE, "--tp", "3"), tmp_path, marker)
    assert_one_error(done, "--tp 3 must divide", "(8)", "(4)")


@pytest.mark.parametrize("command, options, env, fragments", [
    ("generate", [*GENERATE, "--pp", "5"], {}, ["--pp 5", "4 layers"]),
    ("generate", [*GENERATE, "--tp", "2", "--compile"], {},
     ["--compile and --quantize are for one process", "--tp/--pp"]),
    ("chat", [*CHAT, "--pp", "2", "--quantize", "int8"], {}, ["--compile and --quantize are for one process"]),
    ("generate", [*GENERATE, "--tp", "2"], {"TORCHCHAT_DIST_TIMEOUT_S": "soon"},
     ["TORCHCHAT_DIST_TIMEOUT_S ('soon') must be a number of seconds"]),
], ids=["pp5", "compile", "quantize", "timeout"])
def test_self_launcher_checks_before_starting_ranks(command, options, env, fragments, flags, marker, tmp_path):
    done = Job(torchchat(command, *flags, *options), tmp_path, marker, env=env).finish(60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == done.error_lines(), done.stderr  # nothing else: no rank started
    assert_one_error(done, *fragments, max_seconds=30)


def test_every_rank_refuses_compile_and_quantize(flags, marker, tmp_path):
    """Ranks started by hand, as torchrun starts them: each refuses on its own, before joining the others."""
    cmd = torchchat("generate", *flags, *GENERATE, "--tp", "2", "--compile", "--quantize", "int8")
    ranks = run_together([cmd, cmd], tmp_path, marker, envs=rank_envs(2))
    assert_every_rank_fails_once(ranks, "--compile and --quantize are for one process")
    assert not any("pid=" in r.stderr for r in ranks)


def test_smollm2_tp2_names_its_heads(smollm2_gguf, marker, tmp_path):
    done = run(torchchat("generate", "--gguf-path", str(smollm2_gguf), *GENERATE, "--tp", "2"), tmp_path, marker)
    assert done.returncode == 2
    assert_one_error(done, "--tp 2", "(9)", "(3)", "--tp 3", max_seconds=30)


# ----- the benchmark's smoke mode -----

def test_benchmark_quick_json():
    """The smoke mode CI runs, on the rows of 1 and 2 processes (TP x PP parity is tested above)."""
    rows = ["local", "tp2", "tp2 explicit all-reduce", "pp2 x 2 sequences", "pp2 x 4 requests at once",
            "pp2 x 4 requests one at a time"]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "distributed_bench.py"), "--quick", "--json",
                           "--only", *rows], capture_output=True, text=True, timeout=300, cwd=ROOT, env=job_env())
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [row["name"] for row in report["rows"]] == rows
    for row in report["rows"]:
        assert row["decode_tok_s"] > 0 and len(row["runs_tok_s"]) == 1 and row["hogs"] == 0 and "kept" not in row
        assert row["processes"] == row["tp"] * row["pp"] and row["vs_local"] > 0
    assert [row["batch"] for row in report["rows"][3:]] == [2, 4, 4]
    assert report["tp_over_explicit_step"] > 0 and report["pp_together_over_one_by_one"] > 0


def test_benchmark_busy_rows():
    """--busy 1: every row quiet, then again beside a CPU hog, with its speed over the quiet row's."""
    rows = ["local", "tp2"]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "distributed_bench.py"), "--quick", "--json",
                           "--busy", "1", "--only", *rows], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=job_env())
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["busy"] == 1
    names_and_hogs = [(row["name"], row["hogs"]) for row in report["rows"]]
    assert names_and_hogs == [("local", 0), ("tp2", 0), ("local", 1), ("tp2", 1)]
    quiet = {row["name"]: row["decode_tok_s"] for row in report["rows"][:2]}
    for row in report["rows"][2:]:
        assert row["kept"] == pytest.approx(row["decode_tok_s"] / quiet[row["name"]], abs=0.01)
