"""Inside a worker: one warm-up generation, then the timed ones, and their medians."""

from __future__ import annotations

import resource
import statistics
import time

from benchlib.cases import Case, Result, Workload
from benchlib.weights import weight_bytes

WARMUP_TOKENS = 4


def new_result(case: Case, w: Workload, module, load_s: float) -> Result:
    """The case's Result before any timing: its load time and its weights' size and decode ceiling."""
    wb = weight_bytes(module)
    return Result(case.engine, case.model, case.dtype, case.setting, load_s=load_s, threads=w.threads,
                  prompt_tokens=w.prompt_tokens, new_tokens=w.new_tokens, weight_mb=wb / 2**20,
                  ceiling_tok_s=w.bandwidth_gbs * 1e9 / wb)


def measure(result: Result, w: Workload, generate) -> Result:
    """Warm up, then time ``w.runs`` generations; medians into ``result``."""
    t0 = time.perf_counter()
    generate(WARMUP_TOKENS)
    result.warmup_s = time.perf_counter() - t0
    for i in range(w.runs):
        tokens, ttft, decode_s = generate(w.new_tokens)
        if i == 0:
            result.tokens = tokens
        steps = len(tokens) - 1
        result.runs.append([ttft, w.prompt_tokens / ttft, steps / decode_s if steps else 0.0])
    result.ttft_s, result.prefill_tok_s, result.decode_tok_s = (
        statistics.median(r[k] for r in result.runs) for k in range(3))
    result.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result
