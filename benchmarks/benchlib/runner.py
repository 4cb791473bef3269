"""One subprocess per case: the parent's loops (run_case, run_all, run_interleaved, merge) and the
worker's entry (worker_main), which talk through one ``RESULT {json}`` line on the worker's stdout."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from benchlib.cases import Case, Result, Workload
from benchlib.hogs import cpu_hogs
from benchlib.llama_cpp_engine import run_llama_cpp
from benchlib.torchchat_engine import run_torchchat
from benchlib.transformers_engine import run_transformers

# The worker is the entry point run again (``bench.py --worker SPEC``), so that it sets up sys.path as
# the parent did.
ENTRY_POINT = Path(__file__).resolve().parent.parent / "bench.py"


# ---------------------------------------------------------------------------------------------
# Workers: one engine, one setting, in this (fresh) process


WORKERS = {"torchchat": run_torchchat, "transformers": run_transformers, "llama.cpp": run_llama_cpp}


def worker_main(spec: str) -> int:
    import torch

    job = json.loads(spec)
    case, w = Case(**job["case"]), Workload(**job["workload"])
    torch.set_num_threads(w.threads)
    result = WORKERS[case.engine](case, w)
    print("RESULT " + json.dumps(asdict(result)), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# The parent: one subprocess per case


def worker_environ(case: Case, w: Workload) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(w.threads), MKL_NUM_THREADS=str(w.threads),
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    if case.engine == "torchchat":
        # The worker loads torch (and libgomp, which reads its wait once) before it imports torchchat, whose
        # import would set OpenMP's wait as it does for `torchchat.py`: set it here, as a user's run has it.
        from torchchat import set_openmp_defaults

        set_openmp_defaults(env)
    return env


def run_case(case: Case, w: Workload, timeout: float) -> Result | None:
    """``case`` in a fresh subprocess, with ``w.busy`` CPU hogs running for all of it."""
    spec = json.dumps({"case": asdict(case), "workload": asdict(w)})
    try:
        with cpu_hogs(w.busy):
            proc = subprocess.run([sys.executable, str(ENTRY_POINT), "--worker", spec], capture_output=True,
                                  text=True, env=worker_environ(case, w), timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  {case.engine} {case.model} {case.setting}{_busy(w.busy)}: timed out after {timeout:.0f} s",
              file=sys.stderr)
        return None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n    ".join(proc.stderr.strip().splitlines()[-8:])
        print(f"  {case.engine} {case.model} {case.setting}{_busy(w.busy)}: failed (exit {proc.returncode})\n"
              f"    {tail}", file=sys.stderr)
        return None
    result = Result(**json.loads(lines[-1][len("RESULT "):]))
    result.busy = w.busy
    return result


def conditions(w: Workload, busy: int) -> list[Workload]:
    """The workloads each case runs under: quiet, then (``busy`` > 0) beside ``busy`` CPU hogs."""
    return [w] + ([Workload(**{**asdict(w), "busy": busy})] if busy else [])


def run_all(cases: list[Case], w: Workload, timeout: float, busy: int = 0) -> list[Result]:
    """Each case in one subprocess per condition (quiet, then busy right after it, so that a drift in the
    machine's speed falls on both alike): warm-up, then all its runs."""
    results = []
    for case in cases:
        for cond in conditions(w, busy):
            t0 = time.perf_counter()
            r = run_case(case, cond, timeout)
            if r is not None:
                results.append(r)
                _progress(r, time.perf_counter() - t0)
    return results


def run_interleaved(cases: list[Case], w: Workload, timeout: float, busy: int = 0) -> list[Result]:
    """--interleave: ``w.runs`` rounds, each running every case once in a fresh subprocess (per condition),
    so that a change in the machine's load (a shared machine) falls on every engine alike. The cost is a
    load and a warm-up per round; compiled cases find Inductor's on-disk cache warm after the first."""
    one = Workload(**{**asdict(w), "runs": 1})
    rounds: dict[tuple[Case, int], list[Result]] = {(case, c.busy): [] for case in cases for c in conditions(w, busy)}
    for i in range(w.runs):
        print(f"# round {i + 1}/{w.runs}; load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
        for case in cases:
            for cond in conditions(one, busy):
                t0 = time.perf_counter()
                r = run_case(case, cond, timeout)
                if r is not None:
                    rounds[case, cond.busy].append(r)
                    _progress(r, time.perf_counter() - t0)
    return [merge(rs) for rs in rounds.values() if len(rs) == w.runs]


def merge(rounds: list[Result]) -> Result:
    """One Result from single-run subprocesses: medians of the runs, the largest peak RSS, the first
    round's warm-up (a cold compile) and greedy tokens."""
    # llama-bench reports its own mean, not each run: then the round's figures are its run
    runs = [run for x in rounds for run in (x.runs or [[x.ttft_s, x.prefill_tok_s, x.decode_tok_s]])]
    r = Result(**{**asdict(rounds[0]), "runs": runs})
    r.ttft_s, r.prefill_tok_s, r.decode_tok_s = (statistics.median(run[k] for run in r.runs) for k in range(3))
    r.peak_rss_mb = max(x.peak_rss_mb for x in rounds)
    r.load_s = statistics.median(x.load_s for x in rounds)
    r.note = (r.note + f" warm-up in later rounds {min(x.warmup_s for x in rounds[1:]):.1f} s").strip() \
        if len(rounds) > 1 else r.note
    return r


def _busy(hogs: int) -> str:
    return f" beside {hogs} CPU hog{'s' * (hogs > 1)}" if hogs else ""


def _progress(r: Result, seconds: float):
    print(f"  {r.engine} {r.model} {r.setting}{_busy(r.busy)}: decode {r.decode_tok_s:.2f} tok/s, "
          f"prefill {r.prefill_tok_s:.1f} tok/s ({seconds:.0f} s)", file=sys.stderr)
