"""The llama.cpp engine: its own llama-bench binary on the GGUF, its figures parsed from JSON."""

from __future__ import annotations

import json
import re
import resource
import subprocess
import time
from pathlib import Path

from benchlib.cases import Case, Result, Workload
from benchlib.weights import smollm2_source


def run_llama_cpp(case: Case, w: Workload) -> Result:
    """llama.cpp's llama-bench on the GGUF: prompt processing (pp) and text generation (tg) rates.

    Same positions as the other engines: they decode the new tokens right after the prompt (positions 512-639),
    and a decode step reads the whole filled KV cache, so tg is measured at a depth of the prompt's length
    (``-d``; llama-bench's plain tg starts from an empty context, ~1.5x faster for SmolLM2 Q4_1 here). pp is
    measured from an empty context, as the others' prefill. The empty-context tg goes in the note."""
    gguf = case.gguf or str(smollm2_source().gguf_path)
    cmd = [w.llama_cpp, "-m", gguf, "-p", str(w.prompt_tokens), "-n", str(w.new_tokens), "-d", f"0,{w.prompt_tokens}",
           "-t", str(w.threads), "-r", str(w.runs), "-o", "json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    pp, tg, tg_empty = parse_llama_bench(proc.stdout, w.prompt_tokens)
    note = f"{Path(gguf).name}; decode after {w.prompt_tokens} tokens (from an empty context: {tg_empty:.1f} tok/s)"
    result = Result("llama.cpp", case.model, case.dtype, case.setting, threads=w.threads,
                    prompt_tokens=w.prompt_tokens, new_tokens=w.new_tokens, note=note)
    result.prefill_tok_s, result.decode_tok_s = pp, tg
    result.ttft_s = w.prompt_tokens / pp if pp else 0.0
    result.load_s = time.perf_counter() - t0
    result.peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return result


def gguf_type(path: str) -> str:
    """The tensor type a GGUF's name states (llama.cpp's naming: "...-Q4_1.gguf", "...F32.gguf"), else "gguf"."""
    found = re.findall(r"(?<![A-Za-z0-9])(F32|F16|BF16|Q\d_[0-9A-Z_]+?|Q\d_\d)(?=[.-]|$)", Path(path).name.upper())
    return found[-1] if found else "gguf"


def parse_llama_bench(stdout: str, depth: int) -> tuple[float, float, float]:
    """(prompt tokens/s from an empty context, generation tokens/s at ``depth``, generation tokens/s from an empty
    context) from ``llama-bench -d 0,<depth> -o json`` output."""
    pp = tg = tg_empty = 0.0
    for test in json.loads(stdout[stdout.index("["):]):
        prompt, gen, at = test.get("n_prompt", 0), test.get("n_gen", 0), test.get("n_depth", 0)
        if prompt > 0 and gen == 0 and at == 0:
            pp = float(test["avg_ts"])
        elif gen > 0 and prompt == 0 and at == depth:
            tg = float(test["avg_ts"])
        if gen > 0 and prompt == 0 and at == 0:
            tg_empty = float(test["avg_ts"])
    if not tg:
        raise ValueError(f"llama-bench reported no generation at a depth of {depth} (a build without -d?): "
                         "use a llama.cpp build from 2025 or later")
    return pp, tg, tg_empty
