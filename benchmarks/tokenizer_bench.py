"""Encode speed of the tokenizer engines on about 1 MB of English text (the docstrings of Python's standard
library), first pass (empty word cache) and second pass, in tokens/s.

    python benchmarks/tokenizer_bench.py

Engines: Llama 3's vocabulary as a GGUF (llama.cpp's test vocabulary, merge rank in Python) and as Meta's
tiktoken file (the same tokens, checked), and SmolLM2's GGUF vocabulary by tiktoken (proven exact) and by
merge rank in Python (forced, for comparison).
"""

from __future__ import annotations

import ast
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import llamacpp_vocab  # noqa: E402
from tests.assets import llama3_tokenizer_model  # noqa: E402
from torchchat.catalog import ModelSource, embedded_gguf  # noqa: E402
from torchchat.tokenizer import load_tokenizer  # noqa: E402


def english_text(size: int = 1_000_000) -> str:
    parts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and (doc := ast.get_docstring(node)):
                parts.append(doc)
                total += len(doc) + 2
                if total >= size:
                    return "\n\n".join(parts)
    return "\n\n".join(parts)


def timed(tok, text: str) -> tuple[list[int], float, float]:
    start = time.perf_counter()
    ids = tok.encode(text)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    tok.encode(text)
    return ids, len(ids) / cold, len(ids) / (time.perf_counter() - start)


def forced_merge_rank(path: Path):
    from torchchat import tokenizer

    exact = tokenizer.tiktoken_is_exact
    tokenizer.tiktoken_is_exact = lambda index, merges: "forced"
    try:
        return load_tokenizer(ModelSource("forced", gguf_path=path))
    finally:
        tokenizer.tiktoken_is_exact = exact


def main():
    text = english_text()
    print(f"text: {len(text.encode()):,} bytes")
    rows = []
    if not llamacpp_vocab.missing():
        rows.append(("llama-bpe GGUF", load_tokenizer(ModelSource("l", gguf_path=llamacpp_vocab.vocab_files(
            "llama-bpe")[0]))))
    if (meta := llama3_tokenizer_model()) is not None:
        rows.append(("Llama 3 tiktoken file", load_tokenizer(ModelSource("m", checkpoint_path=meta.parent / "x.pth",
                                                                         tokenizer_path=meta))))
    if (smol := embedded_gguf()) is not None:
        rows.append(("SmolLM2 GGUF", load_tokenizer(ModelSource("s", gguf_path=smol))))
        rows.append(("SmolLM2 GGUF, merge rank forced", forced_merge_rank(smol)))
    results = {}
    print(f"{'vocabulary':34} {'engine':20} {'tokens':>9} {'first pass tok/s':>17} {'second pass tok/s':>18}")
    for name, tok in rows:
        ids, cold, warm = timed(tok, text)
        results[name] = ids
        print(f"{name:34} {type(tok).__name__:20} {len(ids):9,} {cold:17,.0f} {warm:18,.0f}")
    pairs = [("llama-bpe GGUF", "Llama 3 tiktoken file"), ("SmolLM2 GGUF", "SmolLM2 GGUF, merge rank forced")]
    for a, b in pairs:
        if a in results and b in results:
            print(f"{a} == {b}: {results[a] == results[b]}")


if __name__ == "__main__":
    main()
