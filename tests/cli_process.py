"""Running `torchchat.py` as a user does, in a subprocess, and what tests compare it with."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.generators import tiny_source
from torchchat.generate.base import GenerationArgs
from torchchat.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def torchchat(*args, stdin: str | None = None, timeout: int = 180,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the CLI; its output decoded as written (text=True would turn a generated "\r" into "\n")."""
    proc = subprocess.run([sys.executable, str(ROOT / "torchchat.py"), *args],
                          input=None if stdin is None else stdin.encode(), capture_output=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "2",
                                         **(env or {})})
    proc.stdout, proc.stderr = (stream.decode("utf-8", "surrogateescape") for stream in (proc.stdout, proc.stderr))
    return proc


def chat_transcript(gen, lines: list[str], args: GenerationArgs, system_prompt: str | None = None) -> str:
    """What `torchchat.py chat` prints on stdout for these lines, then EOF (commands.read_user_line's prompts)."""
    pending = iter(lines)

    def read_user():
        gen.out.write("\nYou: ")
        line = next(pending, None)
        if line is None:
            gen.out.write("\n")
        elif line.strip() not in ("/bye", "/exit", "/quit"):
            gen.out.write("Assistant: ")
            return line
        return None
    gen.out = io.StringIO()
    gen.run_chat(args, read_user, system_prompt)
    return gen.out.getvalue()


def one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in proc.stderr


def write_endless_model(tiny, directory: Path, context: int) -> Path:
    """The tiny model with its stop tokens' output rows zeroed and a longer context; returns its model.pth.

    A stop token's logit, 0, is never the largest of 512 (the others are random projections, about half
    of them positive): every greedy reply runs to --max-new-tokens."""
    directory.mkdir(parents=True, exist_ok=True)
    state = torch.load(tiny.checkpoint)
    state["output.weight"][sorted(load_tokenizer(tiny_source(tiny)).stop_ids)] = 0
    torch.save(state, directory / "model.pth")
    params = json.loads((tiny.checkpoint.parent / "params.json").read_text())
    (directory / "params.json").write_text(json.dumps({**params, "max_seq_len": context}))
    return directory / "model.pth"
