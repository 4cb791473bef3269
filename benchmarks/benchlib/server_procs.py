"""The servers server_bench.py measures, as processes it starts and stops: torchchat's and llama.cpp's.

Both listen on a free port of 127.0.0.1 and are ready when GET /health answers 200 (llama-server answers
503 while it loads the model). Their output goes to a log file, whose tail is shown if one fails to start.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from benchlib.llama_cpp_engine import gguf_type

ROOT = Path(__file__).resolve().parent.parent.parent
READY_TIMEOUT_S = 600  # a first start may build the C++ kernels (~1 min) and load a model on a busy machine
STOP_TIMEOUT_S = 60
GGUF_CACHE = Path.home() / ".cache" / "torchchat-bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    """A started server process (and its process group: a self-launched --pp job has one process a rank)."""

    proc: subprocess.Popen
    url: str
    log_path: Path
    command: list[str]

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> "RunningServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {' '.join(self.command)}\n"
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):  # not listening yet, or 503 while loading
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the server was not ready within {timeout:.0f} s: {' '.join(self.command)}\n"
                           f"{self.log_tail()}")

    def stop(self):
        """SIGTERM (a torchchat server drains, its launcher stops every rank), then SIGKILL what is left."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # ranks that outlived their launcher
        except ProcessLookupError:
            pass
        self.proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:]) + f"\n(log: {self.log_path})"


def _start(command: list[str], env: dict[str, str], port: int, log_path: Path) -> RunningServer:
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)  # its own group: stop() reaches every rank
    return RunningServer(proc, f"http://127.0.0.1:{port}", log_path, command)


def processes_of(flags: list[str]) -> int:
    """How many processes `torchchat.py server FLAGS` runs: --tp x --pp (its self-launcher starts them)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    known, _ = p.parse_known_args(flags)
    return known.tp * known.pp


def start_torchchat(flags: list[str], threads: int, log_path: Path) -> RunningServer:
    """`python torchchat.py server FLAGS` on a free port; ``threads`` intra-op threads in all, shared by its
    ranks (a --pp 2 job on 2 threads: 1 each), as llama-server's -t is the whole server's."""
    port = free_port()
    command = [sys.executable, str(ROOT / "torchchat.py"), "server", "--host", "127.0.0.1", "--port", str(port),
               *flags]
    per_process = str(max(1, threads // processes_of(flags)))
    env = dict(os.environ, OMP_NUM_THREADS=per_process, MKL_NUM_THREADS=per_process, PYTHONUNBUFFERED="1")
    return _start(command, env, port, log_path)


def llama_server_command(binary: str, gguf: str, slots: int, threads: int, ctx_per_slot: int,
                         port: int) -> list[str]:
    """llama-server with ``slots`` slots of ``ctx_per_slot`` positions each (its -c is the total, split evenly
    among the slots) on ``threads`` threads; the chat template comes from the GGUF."""
    return [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-np", str(slots), "-t", str(threads),
            "-c", str(ctx_per_slot * slots)]


def start_llama_server(binary: str, gguf: str, slots: int, threads: int, ctx_per_slot: int,
                       log_path: Path) -> RunningServer:
    port = free_port()
    command = llama_server_command(binary, gguf, slots, threads, ctx_per_slot, port)
    return _start(command, dict(os.environ), port, log_path)


def gguf_of_type(llama_server: str, source: Path, file_type: str) -> Path:
    """``source`` itself if it is already of ``file_type`` (e.g. "Q4_1"), else a copy made once with the
    llama-quantize next to ``llama_server`` and kept in ~/.cache/torchchat-bench."""
    if gguf_type(str(source)) == file_type:
        return source
    out = GGUF_CACHE / f"{source.stem}.{file_type}.gguf"
    if out.exists():
        return out
    quantize = Path(llama_server).with_name("llama-quantize")
    if not quantize.exists():
        raise SystemExit(f"a {file_type} copy of {source.name} needs llama-quantize next to llama-server "
                         f"({quantize} is missing): build the llama-quantize target too")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    subprocess.run([str(quantize), "--allow-requantize", str(source), str(partial), file_type], check=True,
                   capture_output=True)
    partial.rename(out)  # only a whole file gets the name a later run trusts
    return out
