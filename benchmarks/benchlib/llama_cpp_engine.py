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
    """llama.cpp's llama-bench on the GGUF: prompt processing (pp) and text generation (tg) rates."""
    gguf = case.gguf or str(smollm2_source().gguf_path)
    cmd = [w.llama_cpp, "-m", gguf, "-p", str(w.prompt_tokens), "-n", str(w.new_tokens), "-t", str(w.threads),
           "-r", str(w.runs), "-o", "json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result = Result("llama.cpp", case.model, case.dtype, case.setting, threads=w.threads,
                    prompt_tokens=w.prompt_tokens, new_tokens=w.new_tokens, note=Path(gguf).name)
    pp, tg = parse_llama_bench(proc.stdout)
    result.prefill_tok_s, result.decode_tok_s = pp, tg
    result.ttft_s = w.prompt_tokens / pp if pp else 0.0
    result.load_s = time.perf_counter() - t0
    result.peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return result


def gguf_type(path: str) -> str:
    """The tensor type a GGUF's name states (llama.cpp's naming: "...-Q4_1.gguf", "...F32.gguf"), else "gguf"."""
    found = re.findall(r"(?<![A-Za-z0-9])(F32|F16|BF16|Q\d_[0-9A-Z_]+?|Q\d_\d)(?=[.-]|$)", Path(path).name.upper())
    return found[-1] if found else "gguf"


def parse_llama_bench(stdout: str) -> tuple[float, float]:
    """(prompt tokens/s, generation tokens/s) from ``llama-bench -o json`` output."""
    pp = tg = 0.0
    for test in json.loads(stdout[stdout.index("["):]):
        if test.get("n_prompt", 0) > 0 and test.get("n_gen", 0) == 0:
            pp = float(test["avg_ts"])
        elif test.get("n_gen", 0) > 0 and test.get("n_prompt", 0) == 0:
            tg = float(test["avg_ts"])
    return pp, tg
