"""benchmarks/server_bench.py: its --quick run end to end against a real server on the tiny model, and the
pieces of its report that need no server."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "server_bench.py"
sys.path.insert(0, str(BENCH.parent))  # benchlib, as server_bench.py finds it when run as a script

from benchlib.server_procs import gguf_of_type, llama_server_command, processes_of  # noqa: E402
from benchlib.server_report import percentile, targets  # noqa: E402

QUICK_CLIENTS, QUICK_TOKENS, QUICK_TURNS = 3, 8, 3  # what --quick sets


@pytest.fixture(scope="module")
def quick_run(tiny_model, tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("server-bench") / "out.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--json", str(out), "--log-dir", str(out.parent),
                           "--", *tiny_model.cli_flags()], cwd=out.parent, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def check_level(level: dict, clients: int):
    """A level's figures are those of its answers: tokens summed, wall time from first send to last answer."""
    answers = level["answers"]
    assert level["clients"] == clients and len(answers) == level["requests"] == clients
    assert level["completion_tokens"] == sum(a["completion_tokens"] for a in answers)
    assert level["wall_s"] == pytest.approx(max(a["end_s"] for a in answers) - min(a["start_s"] for a in answers))
    assert level["aggregate_tok_s"] == pytest.approx(level["completion_tokens"] / level["wall_s"])
    latencies = [a["latency_s"] for a in answers]
    assert 0 < level["latency_p50_s"] <= level["latency_p95_s"] <= level["latency_max_s"] == max(latencies)
    for a in answers:
        assert a["text"] and 0 < a["completion_tokens"] <= QUICK_TOKENS, a
        assert a["latency_s"] == pytest.approx(a["end_s"] - a["start_s"]) and a["latency_s"] > 0


def test_quick_run_measures_every_workload_consistently(quick_run):
    report, stdout = quick_run
    assert len(report["load_before"]) == len(report["load_after"]) == len(report["runs"][0]["load_after"]) == 3
    run, = report["runs"]
    assert run["server"] == "torchchat" and run["weights"] == "fp32"
    one, many = run["levels"]
    check_level(one, 1)
    check_level(many, QUICK_CLIENTS)
    # Every client asked its own question and got its own answer.
    assert len({a["question"] for a in many["answers"]}) == QUICK_CLIENTS
    assert len({a["text"] for a in many["answers"]}) == QUICK_CLIENTS
    assert run["n_client_tok_s"] == many["aggregate_tok_s"] and run["one_client_tok_s"] == one["aggregate_tok_s"]
    assert run["n_over_1"] == pytest.approx(many["aggregate_tok_s"] / one["aggregate_tok_s"])

    sequential = run["one_at_a_time"]
    check_level(sequential, QUICK_CLIENTS)
    assert [a["question"] for a in sequential["answers"]] == [a["question"] for a in many["answers"]]
    for before, after in zip(sequential["answers"], sequential["answers"][1:]):
        assert after["start_s"] >= before["end_s"]  # one at a time: each sent after the previous answer
    assert run["concurrent_over_one_at_a_time"] == pytest.approx(many["aggregate_tok_s"] /
                                                                 sequential["aggregate_tok_s"])

    probe = run["probe"]
    assert probe["long_requests"] == QUICK_CLIENTS - 1 == len(probe["long"])
    assert 0 < probe["short_ttft_s"] <= probe["short"]["latency_s"] and probe["short"]["text"]
    assert {a["question"] for a in probe["long"]}.isdisjoint(a["question"] for a in many["answers"])

    turns = run["conversation"]["turns"]
    assert len(turns) == QUICK_TURNS
    for i, (turn, following) in enumerate(zip(turns, turns[1:])):
        assert turn["messages"] == 2 * i + 1  # every earlier question and reply, then this question
        assert following["prompt_tokens"] > turn["prompt_tokens"] + turn["completion_tokens"], (turn, following)
    assert run["conversation"]["total_prompt_tokens"] == sum(t["prompt_tokens"] for t in turns)
    assert run["conversation"]["total_ttft_s"] == pytest.approx(sum(t["ttft_s"] for t in turns))
    assert "aggregate tok/s" in stdout and "prompt / cached / TTFT s" in stdout  # the tables


@pytest.mark.parametrize("values", [[3.0], [5.0, 1.0], [0.4, 9.0, 2.5, 7.0, 1.0, 3.0, 8.0, 2.0],
                                    [float(x) for x in np.random.default_rng(0).exponential(size=37)]])
def test_percentiles_are_numpys_linear_ones(values):
    assert percentile(values, 50) == pytest.approx(statistics.median(values))
    for q in (50, 95, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_llama_server_gets_one_slot_a_client_each_of_the_context_asked():
    command = llama_server_command("/bin/llama-server", "m.gguf", slots=8, threads=2, ctx_per_slot=2048, port=9)
    flags = dict(zip(command[1::2], command[2::2]))
    assert flags == {"-m": "m.gguf", "--host": "127.0.0.1", "--port": "9", "-np": "8", "-t": "2", "-c": "16384"}


def test_the_q4_1_file_is_compared_as_it_is(tmp_path):
    source = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf_of_type(str(tmp_path / "no-llama-server"), source, "Q4_1") == source
    with pytest.raises(SystemExit, match="llama-quantize"):
        gguf_of_type(str(tmp_path / "no-llama-server"), source, "F32.test-only")


@pytest.mark.parametrize("flags, expected", [([], 1), (["--pp", "2"], 2), (["--tp", "2", "--pp", "2"], 4),
                                             (["--quantize", "int4", "--tp", "3"], 3)])
def test_a_distributed_server_shares_the_threads_among_its_processes(flags, expected):
    assert processes_of(flags) == expected


def test_targets_compare_each_setting_with_llama_cpp_on_the_matching_file():
    def summary(server, weights, one, many, p50=10.0, worst=12.0):
        return {"server": server, "weights": weights, "clients": 8, "one_client_tok_s": one, "n_client_tok_s": many,
                "n_over_1": many / one, "latency_p50_s": p50, "latency_max_s": worst}

    rows = [summary("torchchat", "fp32", 30.0, 150.0), summary("llama.cpp", "Q4_1", 100.0, 160.0),
            summary("torchchat", "int4", 100.0, 150.0, worst=20.0), summary("llama.cpp", "F32", 10.0, 60.0)]
    found = {t.what: t for t in targets(rows)}
    assert found["torchchat fp32: aggregate / llama.cpp F32's"].measured == 2.5
    assert found["torchchat int4: aggregate / llama.cpp Q4_1's"].measured == 150.0 / 160
    assert found["torchchat fp32: 8 clients / 1 client"].met and not found["torchchat int4: 8 clients / 1 client"].met
    assert found["torchchat fp32: max latency / median"].met and not found["torchchat int4: max latency / median"].met
    assert not any(what.startswith("llama.cpp") for what in found)
