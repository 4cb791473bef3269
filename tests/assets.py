"""Tiny real assets written by tests: tokenizer files and random-weight checkpoints."""

from __future__ import annotations

import base64
from pathlib import Path


def write_byte_tiktoken(path: Path) -> Path:
    """A Llama 3-format tiktoken file with one token per byte (256 ranks); specials are added on load."""
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    path.write_text("\n".join(lines) + "\n")
    return path
