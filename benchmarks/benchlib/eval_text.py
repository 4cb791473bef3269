"""The text eval_bench.py scores: English prose both engines read, on any machine, without a download.

CPython ships its language reference's help topics (``pydoc_data.topics``: what ``help("if")`` prints): plain
English with code samples, like wikitext. The benchmark takes the topics in sorted order, joined by a blank line,
cut to ``chars`` characters, and writes them without a trailing newline (llama-perplexity drops one from -f; eval
would keep it). The text changes only with Python's patch release: the JSON records the version and a sha256.
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path

DEFAULT_CHARS = 20_000  # SmolLM2: 4,717 tokens, 9 windows of 512


def reference_text(chars: int = DEFAULT_CHARS) -> str:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[name].strip() for name in sorted(topics))
    if len(text) < chars:
        raise SystemExit(f"pydoc_data.topics has {len(text)} characters, fewer than --text-chars {chars}")
    return text[:chars].rstrip()


def write_reference_text(path: Path, chars: int = DEFAULT_CHARS) -> dict:
    """Write the text to ``path``; what identifies it (for the JSON)."""
    text = reference_text(chars)
    path.write_text(text, encoding="utf-8")
    return {"text": f"pydoc_data.topics (Python {platform.python_version()}), first {chars} characters",
            "text_sha256": hashlib.sha256(text.encode()).hexdigest(), "text_chars": len(text)}


def describe_text_file(path: Path) -> dict:
    data = path.read_bytes()
    return {"text": str(path), "text_sha256": hashlib.sha256(data).hexdigest(), "text_chars": len(data.decode())}
