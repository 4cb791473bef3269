"""benchmarks/bench.py: the --quick smoke run end to end, and its pieces (benchmarks/benchlib) that need no model."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench.py"
KEYS = ("engine", "model", "dtype", "ttft_s", "prefill_tok_s", "decode_tok_s", "peak_rss_mb")
sys.path.insert(0, str(BENCH.parent))  # benchlib, as bench.py finds it when run as a script

from benchlib.cases import Case, Result, Workload  # noqa: E402
from benchlib.hogs import SPIN, cpu_hogs  # noqa: E402
from benchlib.llama_cpp_engine import gguf_type, parse_llama_bench  # noqa: E402
from benchlib.report import agreement, annotate, columns  # noqa: E402
from benchlib.runner import conditions, merge, worker_environ  # noqa: E402
from benchlib.transformers_engine import to_hf_state_dict  # noqa: E402
from benchlib.weights import random_state_dict  # noqa: E402
from tests.ci import import_or_skip_outside_ci  # noqa: E402


def test_quick_run_writes_well_formed_json(tmp_path):
    """--quick --busy 1: every case quiet and then beside a CPU hog, which is gone when the run is."""
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--busy", "1", "--json", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and rows
    for row in rows:
        for key in KEYS:
            assert key in row, f"{key} missing from {row}"
        for key in ("ttft_s", "prefill_tok_s", "decode_tok_s", "peak_rss_mb"):
            assert isinstance(row[key], float) and row[key] > 0, f"{key} = {row[key]!r} in {row['engine']} row"
        assert row["model"] == "tiny" and row["new_tokens"] == 8 and len(row["tokens"]) == 8
    assert rows[0]["engine"] == "torchchat" and rows[0]["dtype"] == "fp32"
    assert [r["busy"] for r in rows[:2]] == [0, 1] and "kept" not in rows[0] and rows[1]["kept"] > 0
    if importlib.util.find_spec("transformers") is not None:
        hf, hf_busy = (r for r in rows if r["engine"] == "transformers")
        assert 0 <= hf["agree_vs_fp32"] <= 1 and rows[0]["decode_vs_hf"] > 0
        assert hf_busy["busy"] == 1 and rows[1]["decode_vs_hf"] == rows[1]["decode_tok_s"] / hf_busy["decode_tok_s"]
    assert "decode/s" in proc.stdout and "kept" in proc.stdout  # the table
    assert not _processes_running(SPIN)


def test_hf_names_and_rotary_layout_round_trip():
    """bench's conversion to Hugging Face names is the inverse of the checkpoint loader's."""
    from torchchat.checkpoints.huggingface import unpermute
    from torchchat.model import ModelArgs

    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=32, hidden_dim=96)
    state = random_state_dict(args, torch.float32)
    hf = to_hf_state_dict(state, args)
    assert set(hf) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} | {
        f"model.layers.0.{m}.weight" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                "mlp.down_proj", "input_layernorm", "post_attention_layernorm")}
    attention = "model.layers.0.self_attn"
    assert torch.equal(unpermute(hf[f"{attention}.q_proj.weight"], 4), state["layers.0.attention.wq.weight"])
    assert torch.equal(unpermute(hf[f"{attention}.k_proj.weight"], 2), state["layers.0.attention.wk.weight"])
    assert not torch.equal(hf["model.layers.0.self_attn.q_proj.weight"], state["layers.0.attention.wq.weight"])
    # Meta's w1 is the gate (under SiLU), w3 the up projection, w2 the down one; a swap changes the outputs
    # only in third order for small activations (test_transformers_peer_gives_torchchats_logits sees it).
    for meta, hf_name in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
        assert hf[f"model.layers.0.mlp.{hf_name}.weight"] is state[f"layers.0.feed_forward.{meta}.weight"]


def test_transformers_peer_gives_torchchats_logits():
    """The transformers engine's LlamaForCausalLM, loaded as bench.py loads it (the quick model's random weights),
    computes torchchat's Transformer's logits at every position of a 64-token prompt: within 1e-5 of the largest
    (measured 2.6e-7, float32). Its rope theta x4 is off by 5.1e-3, its gate and up projections swapped by 5.4e-2."""
    import_or_skip_outside_ci("transformers", "the transformers peer needs transformers (requirements-dev.txt)")
    from benchlib.transformers_engine import load_transformers
    from benchlib.weights import QUICK_MODEL, load_weights, prompt_ids

    args, ours = load_weights(QUICK_MODEL, torch.float32)
    _, hf = load_transformers(QUICK_MODEL, torch.float32)
    prompt = torch.tensor([prompt_ids(QUICK_MODEL, 64, args.vocab_size)])  # (1, 64)
    ours.setup_caches(1, 64, dtype=torch.float32)
    with torch.no_grad():
        want = ours(prompt, torch.arange(64))  # (1, 64, V)
        got = hf(prompt).logits  # (1, 64, V)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


def test_random_weights_are_the_same_in_every_dtype():
    from torchchat.model import ModelArgs

    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=16, hidden_dim=64, tie_embeddings=True)
    fp32, bf16 = random_state_dict(args, torch.float32), random_state_dict(args, torch.bfloat16)
    assert all(torch.equal(fp32[k].bfloat16(), bf16[k]) for k in fp32)
    assert fp32["output.weight"] is fp32["tok_embeddings.weight"]


def test_llama_bench_json_is_parsed():
    """Prefill from an empty context; decode at the prompt's depth, as the other engines decode (and from an empty
    context, for the note)."""
    stdout = "build: ...\n" + json.dumps([
        {"model_filename": "m.gguf", "n_prompt": 512, "n_gen": 0, "n_depth": 0, "avg_ts": 210.5},
        {"model_filename": "m.gguf", "n_prompt": 0, "n_gen": 128, "n_depth": 0, "avg_ts": 41.25},
        {"model_filename": "m.gguf", "n_prompt": 512, "n_gen": 0, "n_depth": 512, "avg_ts": 150.0},
        {"model_filename": "m.gguf", "n_prompt": 0, "n_gen": 128, "n_depth": 512, "avg_ts": 30.5},
    ])
    assert parse_llama_bench(stdout, 512) == (210.5, 30.5, 41.25)
    without_depth = "\n" + json.dumps([{"n_prompt": 512, "n_gen": 0, "avg_ts": 210.5},
                                       {"n_prompt": 0, "n_gen": 128, "avg_ts": 41.25}])
    with pytest.raises(ValueError, match="no generation at a depth of 512"):
        parse_llama_bench(without_depth, 512)


@pytest.mark.parametrize("a, b, expected", [([1, 2, 3, 4], [1, 2, 3, 4], (1.0, 4)),
                                            ([1, 2, 3, 4], [1, 2, 9, 4], (0.75, 2)),
                                            ([1, 2], [], (0.0, 0))])
def test_agreement(a, b, expected):
    assert agreement(a, b) == expected


@pytest.mark.parametrize("name, expected", [("SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1"), ("smollm2-F32.gguf", "F32"),
                                            ("m-q8_0.gguf", "Q8_0"), ("model.gguf", "gguf")])
def test_gguf_type_from_the_file_name(name, expected):
    assert gguf_type(name) == expected


def test_each_setting_is_compared_with_llama_cpp_on_the_matching_file_type():
    def result(engine, dtype, setting, decode):
        return Result(engine, "smollm2-135m", dtype, setting, decode_tok_s=decode)

    rows = annotate([result("torchchat", "fp32", "fp32 compile", 30.0),
                     result("torchchat", "fp32", "fp32 int4 compile", 50.0), result("torchchat", "bf16", "bf16", 20.0),
                     result("llama.cpp", "F32", "F32", 25.0), result("llama.cpp", "Q4_1", "Q4_1", 40.0)])
    assert [r.get("decode_vs_llama_cpp") for r in rows] == [1.2, 1.25, None, None, None]


def test_interleaved_rounds_merge_into_medians_with_or_without_per_run_figures():
    """--interleave: each round is one subprocess; llama-bench reports a mean per round, not its runs."""
    ours = [Result("torchchat", "m", "fp32", "fp32", decode_tok_s=d, runs=[[0.1, 100.0, d]])
            for d in (30.0, 10.0, 20.0)]
    peer = [Result("llama.cpp", "m", "F32", "F32", ttft_s=0.2, prefill_tok_s=p, decode_tok_s=d, peak_rss_mb=m)
            for p, d, m in ((300.0, 40.0, 500.0), (100.0, 35.0, 600.0), (200.0, 45.0, 550.0))]
    assert merge(ours).decode_tok_s == 20.0 and len(merge(ours).runs) == 3
    merged = merge(peer)
    assert (merged.prefill_tok_s, merged.decode_tok_s, merged.peak_rss_mb) == (200.0, 40.0, 600.0)
    assert len(merged.runs) == 3


def _processes_running(command_line: str) -> list[int]:
    """Pids whose command line contains ``command_line``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and command_line in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:  # gone meanwhile
            pass
    return pids


def test_cpu_hogs_spin_while_the_block_runs_and_are_killed_after_it_even_on_error():
    with pytest.raises(RuntimeError, match="the measurement failed"):
        with cpu_hogs(2) as procs:
            assert len(procs) == 2 and all(p.poll() is None for p in procs)
            pids = [p.pid for p in procs]
            assert set(pids) <= set(_processes_running(SPIN))
            raise RuntimeError("the measurement failed")
    assert all(p.returncode is not None for p in procs)
    assert not set(pids) & set(_processes_running(SPIN))


def test_busy_rows_are_compared_with_their_quiet_row_and_with_peers_beside_the_same_hogs():
    def result(engine, dtype, setting, decode, busy):
        return Result(engine, "smollm2-135m", dtype, setting, decode_tok_s=decode, busy=busy)

    rows = annotate([result("torchchat", "fp32", "fp32", 40.0, 0), result("torchchat", "fp32", "fp32", 30.0, 1),
                     result("llama.cpp", "F32", "F32", 20.0, 0), result("llama.cpp", "F32", "F32", 5.0, 1),
                     result("transformers", "fp32", "fp32", 10.0, 0), result("transformers", "fp32", "fp32", 2.0, 1)])
    assert [r.get("kept") for r in rows] == [None, 0.75, None, 0.25, None, 0.2]
    assert [r.get("decode_vs_llama_cpp") for r in rows[:2]] == [2.0, 6.0]
    assert [r.get("decode_vs_hf") for r in rows[:2]] == [4.0, 15.0]
    assert [w.busy for w in conditions(Workload(), 3)] == [0, 3] and [w.busy for w in conditions(Workload(), 0)] == [0]


def test_torchchat_workers_get_the_openmp_wait_a_user_run_gets_and_the_users_choice_wins(monkeypatch):
    """The worker imports torch (which loads libgomp and reads GOMP_SPINCOUNT once) before torchchat, so the
    parent sets what ``import torchchat`` sets for a user's `torchchat.py` run; other engines keep OpenMP's own."""
    from torchchat import OPENMP_DEFAULTS

    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    ours, hf = Case("torchchat", "m", "fp32"), Case("transformers", "m", "fp32")
    assert worker_environ(ours, Workload())["GOMP_SPINCOUNT"] == OPENMP_DEFAULTS["GOMP_SPINCOUNT"]
    assert "GOMP_SPINCOUNT" not in worker_environ(hf, Workload())
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")
    assert "GOMP_SPINCOUNT" not in worker_environ(ours, Workload())


def test_speculation_rows_are_compared_with_plain_decoding_on_the_same_prompt():
    def result(setting, decode, tokens):
        return Result("torchchat", "smollm2-135m", "fp32", setting, decode_tok_s=decode, tokens=tokens)

    rows = annotate([result("fp32", 40.0, [1, 2, 3]), result("fp32 +draft int4", 70.0, [1, 2, 3]),
                     result("fp32 summary", 42.0, [4, 5, 6]), result("fp32 +draft lookup summary", 21.0, [4, 5, 7])])
    assert [r.get("decode_vs_plain") for r in rows] == [None, 1.75, None, 0.5]
    assert [r.get("agree_vs_fp32") for r in rows] == [None, 1.0, None, 2 / 3]  # each against its own prompt's
    assert [c[0] for c in columns(rows)].count("spec x") == 1 and "spec x" not in [c[0] for c in columns(rows[:1])]
    assert Case("torchchat", "m", "fp32", draft="int4", prompt="summary").setting == "fp32 +draft int4 summary"
