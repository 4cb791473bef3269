"""The command line end to end, in subprocesses, as a user runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.generators import local_generator, tiny_source
from torchchat.cli import build_parser
from torchchat.generate.base import GenerationArgs

ROOT = Path(__file__).resolve().parent.parent


def torchchat(*args, stdin: str | None = None, timeout: int = 180,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the CLI; its output decoded as written (text=True would turn a generated "\r" into "\n")."""
    proc = subprocess.run([sys.executable, str(ROOT / "torchchat.py"), *args],
                          input=None if stdin is None else stdin.encode(), capture_output=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "2",
                                         **(env or {})})
    proc.stdout, proc.stderr = (stream.decode("utf-8", "surrogateescape") for stream in (proc.stdout, proc.stderr))
    return proc


def one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in proc.stderr


def test_generate_greedy_matches_in_process(tiny_model):
    proc = torchchat("generate", *tiny_model.cli_flags(), "--prompt", "Once upon a time", "--max-new-tokens", "10",
                     "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    expected = local_generator(tiny_source(tiny_model)).run_generate(
        "Once upon a time", GenerationArgs(max_new_tokens=10, temperature=0))[0].text
    assert proc.stdout == "Once upon a time" + expected + "\n"
    assert "time to first token" in proc.stderr and "loaded" in proc.stderr


def test_generate_reads_standard_input(tiny_model):
    args = ["generate", *tiny_model.cli_flags(), "--max-new-tokens", "5", "--temperature", "0"]
    piped = torchchat(*args, stdin="Once upon a time")
    flagged = torchchat(*args, "--prompt", "Once upon a time")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == flagged.stdout


def test_default_model_completes_in_english(smollm2_gguf):
    proc = torchchat("generate", "--prompt", "The capital of France is", "--max-new-tokens", "8", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_default_model_chat_answers_and_keeps_context(smollm2_gguf):
    proc = torchchat("chat", "--temperature", "0", "--max-new-tokens", "40",
                     stdin="What is the capital of France?\nWhat language do people speak in that city?\n")
    assert proc.returncode == 0, proc.stderr
    replies = proc.stdout.split("Assistant: ")[1:]
    assert len(replies) == 2
    assert "Paris" in replies[0]
    assert "French" in replies[1]


def test_chat_ends_cleanly_on_bye_and_eof(tiny_model):
    proc = torchchat("chat", *tiny_model.cli_flags(), "--max-new-tokens", "4", "--temperature", "0",
                     stdin="hello\n/bye\nnot read\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("Assistant: ") == 1


def test_list_shows_known_models_and_the_default_available(smollm2_gguf):
    proc = torchchat("list")
    assert proc.returncode == 0
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    assert {"smollm2-135m", "llama3.1-8b", "llama2-7b", "llama3.2-1b", "stories15m"} <= set(rows)
    assert str(smollm2_gguf) in rows["smollm2-135m"]
    assert "not available" in rows["llama3.1-405b"]


def test_every_flag_is_explained_in_help():
    for command in ("generate", "chat"):
        proc = torchchat(command, "--help")
        assert proc.returncode == 0
        sub = build_parser()._subparsers._group_actions[0].choices[command]
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{command} {action.option_strings} has no help"
                assert action.option_strings[-1] in proc.stdout


# ----- bad input: one line on stderr, exit code 2, before any weights load -----

def test_unknown_model_suggests_close_names():
    one_line_error(torchchat("generate", "llama3.1-8bb", "--prompt", "x"), "unknown model 'llama3.1-8bb'",
                   "did you mean", "llama3.1-8b")


def test_known_model_without_files_says_where_to_put_them(tmp_path):
    one_line_error(torchchat("generate", "llama2-7b", "--prompt", "x", "--model-directory", str(tmp_path)),
                   "not available", "--checkpoint-dir")


def test_missing_checkpoint(tmp_path, tiny_model):
    one_line_error(torchchat("generate", "--checkpoint-path", str(tmp_path / "nope.pth"), "--tokenizer-path",
                             str(tiny_model.tokenizer), "--prompt", "x"), "not found", "nope.pth")


def test_truncated_checkpoint(tmp_path, tiny_model):
    broken = tmp_path / "model.pth"
    broken.write_bytes(tiny_model.checkpoint.read_bytes()[:5000])
    (tmp_path / "params.json").write_text((tiny_model.checkpoint.parent / "params.json").read_text())
    one_line_error(torchchat("generate", "--checkpoint-path", str(broken), "--tokenizer-path",
                             str(tiny_model.tokenizer), "--prompt", "x"), str(broken))


def test_truncated_gguf(tmp_path, smollm2_gguf):
    broken = tmp_path / "model.gguf"
    with open(smollm2_gguf, "rb") as f:
        broken.write_bytes(f.read(3_000_000))
    one_line_error(torchchat("generate", "--gguf-path", str(broken), "--prompt", "x"), str(broken))


def test_tokenizer_that_does_not_fit_the_model(tmp_path, tiny_model):
    import base64
    big = tmp_path / "big.model"  # 1000 ranks + 256 specials > the model's 512 embeddings
    ranks = [bytes([b]) for b in range(256)] + [bytes([a, b]) for a in range(32, 127) for b in range(32, 40)]
    big.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks[:1000])))
    one_line_error(torchchat("generate", "--checkpoint-path", str(tiny_model.checkpoint), "--tokenizer-path",
                             str(big), "--prompt", "x"), "1256 tokens", "512")


def test_prompt_longer_than_the_context(tiny_model):
    one_line_error(torchchat("generate", *tiny_model.cli_flags(), "--prompt", "word " * 100,
                             "--max-new-tokens", "100"), "exceeds the context (512)")


@pytest.mark.parametrize("flags, fragment", [
    (["--temperature", "-1"], "--temperature (-1.0) must be >= 0"),
    (["--top-p", "1.5"], "--top-p (1.5) must be in (0, 1]"),
    (["--top-p", "0"], "--top-p (0.0) must be in (0, 1]"),
    (["--max-new-tokens", "0"], "--max-new-tokens (0) must be at least 1"),
])
def test_impossible_flag_values(tiny_model, flags, fragment):
    one_line_error(torchchat("generate", *tiny_model.cli_flags(), "--prompt", "x", *flags), fragment)
