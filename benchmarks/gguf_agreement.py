"""Greedy agreement of a GGUF run in its own quantization (what `generate` runs without --dtype) with the same file
dequantized to fp32, and with llama.cpp's llama-server on the same file, over several chat prompts.

Each prompt is a user question through the model's chat template; every engine gets the same prompt token ids and
generates ``--new-tokens`` greedy tokens without stopping at an end token. Per prompt: the fraction of positions
with the same token and the common prefix, against the fp32 run (and llama.cpp against our native run).

    python benchmarks/gguf_agreement.py                                  # the default model, ours only
    python benchmarks/gguf_agreement.py --llama-server PATH/llama-server --json agreement.json
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from benchlib.report import agreement  # noqa: E402
from benchlib.server_procs import start_llama_server  # noqa: E402

PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a transformer model is in two sentences.",
    "Give me three tips for learning to play the guitar.",
    "What is 17 times 23?",
    "Summarize the plot of Romeo and Juliet.",
    "How do I make a cup of green tea?",
    "Why is the sky blue?",
)


def prompt_ids(source) -> list[list[int]]:
    from torchchat.chat_format import chat_format_for
    from torchchat.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(source)
    chat = chat_format_for(tokenizer, source)
    return [chat.encode_turn([{"role": "user", "content": p}], first=True) for p in PROMPTS]


def torchchat_tokens(source, prompts: list[list[int]], new_tokens: int, keep_quantized: bool) -> list[list[int]]:
    from torchchat.generate.base import GenerationArgs, Turn
    from torchchat.generate.local import LocalGenerator
    from torchchat.tokenizer import load_tokenizer

    gen = LocalGenerator.from_source(source, load_tokenizer(source), None, dtype="fp32", keep_quantized=keep_quantized,
                                     max_seq_len=max(map(len, prompts)) + new_tokens, out=io.StringIO(),
                                     err=io.StringIO())
    args = GenerationArgs(max_new_tokens=new_tokens, temperature=0, top_k=None, seed=0)
    return [[step[0] for step in gen.generate_tokens(Turn(p, args))] for p in prompts]


def llama_cpp_tokens(binary: str, gguf: Path, prompts: list[list[int]], new_tokens: int,
                     threads: int) -> list[list[int]]:
    """llama-server's greedy tokens for each prompt (one slot, no prompt cache: each prompt from scratch)."""
    log = Path(tempfile.mkdtemp()) / "llama-server.log"
    server = start_llama_server(binary, str(gguf), 1, threads, max(map(len, prompts)) + new_tokens + 8, log)
    try:
        server.wait_ready()
        out = []
        for p in prompts:
            body = {"prompt": p, "n_predict": new_tokens, "temperature": 0, "top_k": 1, "ignore_eos": True,
                    "cache_prompt": False, "return_tokens": True}
            request = urllib.request.Request(f"{server.url}/completion", json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=600) as r:
                out.append(json.loads(r.read())["tokens"])
        return out
    finally:
        server.stop()


def compare(name: str, runs: list[list[int]], reference: list[list[int]]) -> dict:
    per_prompt = [agreement(ref, run) for ref, run in zip(reference, runs)]
    row = {"engine": name, "same": statistics.mean(a for a, _ in per_prompt),
           "prefix_median": statistics.median(p for _, p in per_prompt),
           "identical": sum(p == len(ref) for (_, p), ref in zip(per_prompt, reference)), "prompts": len(runs),
           "per_prompt": [{"same": a, "prefix": p} for a, p in per_prompt]}
    print(f"{name:<40} same {100 * row['same']:5.1f}%  median common prefix {row['prefix_median']:5.1f}  "
          f"identical {row['identical']}/{row['prompts']}")
    return row


def main(argv=None) -> int:
    from torchchat.catalog import ModelSource, embedded_gguf

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, default=None, help="the GGUF (default: the default model's Q4_1 file)")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt (default 64)")
    p.add_argument("--llama-server", metavar="PATH", help="llama.cpp's llama-server binary, to compare with")
    p.add_argument("--threads", type=int, default=2, help="llama-server's -t (default 2)")
    p.add_argument("--json", metavar="FILE", help="write the rows to FILE")
    args = p.parse_args(argv)
    gguf = args.gguf or embedded_gguf()
    source = ModelSource(gguf.stem, gguf_path=gguf)
    prompts = prompt_ids(source)
    native = torchchat_tokens(source, prompts, args.new_tokens, keep_quantized=True)
    fp32 = torchchat_tokens(source, prompts, args.new_tokens, keep_quantized=False)
    print(f"# {gguf.name}: {len(prompts)} chat prompts, {args.new_tokens} greedy tokens each", file=sys.stderr)
    rows = [compare("torchchat native vs torchchat fp32", native, fp32)]
    if args.llama_server:
        lcpp = llama_cpp_tokens(args.llama_server, gguf, prompts, args.new_tokens, args.threads)
        rows += [compare("llama.cpp vs torchchat native", lcpp, native),
                 compare("llama.cpp vs torchchat fp32", lcpp, fp32)]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
