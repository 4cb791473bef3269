"""Running `torchchat.py server` as a real process in tests: a free port, readiness, signals, its log.

``stop()`` also checks how the server ended: the exit code a clean shutdown gives for the signal it
got, and no traceback anywhere in its log (a request the server answers with a 4xx or a handled
failure must not log one either), so a fixture's teardown fails on what no test asserted.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.distributed_procs import marked_pids

ROOT = Path(__file__).resolve().parent.parent
TRACEBACK = "Traceback (most recent call last):"
# The exit code of a clean shutdown after each signal: uvicorn re-raises SIGTERM once it has shut down;
# the CLI turns SIGINT (Ctrl-C) into 130.
CLEAN_EXITS = {signal.SIGTERM: -signal.SIGTERM, signal.SIGINT: 130}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Could a new server listen there? (SO_REUSEADDR, as servers bind: closed connections may linger.)"""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def openai_client(server: "ServerProcess", timeout: float = 120.0):
    """The official client, pointed at ``server``; no retries (a test sees the first answer)."""
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=timeout)


def tracebacks(log: str) -> list[str]:
    """Every traceback in a log, each up to its exception line (a rank's "[rank0] " prefix kept)."""
    lines, found = log.splitlines(), []
    for i, line in enumerate(lines):
        if TRACEBACK not in line:
            continue
        prefix, block = re.match(r"(\[rank\d+\] )?", line).group(), [line]
        for following in lines[i + 1:]:
            block.append(following)
            body = following.removeprefix(prefix)
            if body and not body[0].isspace():  # the exception line ends the frames
                break
        found.append("\n".join(block))
    return found


class ServerProcess:
    """`python torchchat.py server --port P ...` (or another launcher), output in a log file.

    ``clean_exits``: the exit code of a clean shutdown after each signal, where a launcher changes it;
    ``launcher_traceback``: a regex of the one traceback the launcher itself prints on purpose (torchrun
    raises on the Ctrl-C it forwards), matched against the traceback's exception line.
    """

    def __init__(self, flags: list[str], log_path: Path, launcher: list[str] | None = None,
                 clean_exits: dict[int, int] | None = None, launcher_traceback: str | None = None):
        self.port = free_port()
        self.log_path = log_path
        self.clean_exits = {**CLEAN_EXITS, **(clean_exits or {})}
        self.launcher_traceback = re.compile(launcher_traceback) if launcher_traceback else None
        self.signalled: int | None = None  # the first signal sent: it decides the clean exit code
        self.hung_s: float | None = None  # set when stop() had to kill it
        self.marker = f"--host 127.0.0.1 --port {self.port} "  # in the command line of each of its processes
        command = [*(launcher or [sys.executable]), str(ROOT / "torchchat.py"), "server", *self.marker.split(), *flags]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)  # a signal for it alone, not for pytest

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 180.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.25)
        self.stop(check=False)
        raise TimeoutError(f"the server was not ready within {timeout:.0f} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, count: int, timeout: float = 20.0) -> int:
        """How many times ``text`` is in the log, once it reaches ``count`` or ``timeout`` passed (a line the server
        writes between steps may come after a reply the client already has)."""
        deadline = time.monotonic() + timeout
        while (seen := self.log().count(text)) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        return seen

    def send_signal(self, sig: int, group: bool = False):
        """To the server, or to its whole process group (as a terminal's Ctrl-C reaches every rank)."""
        if self.signalled is None:
            self.signalled = sig
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0, group: bool = False, check: bool = True) -> int:
        """Signal it (``group``: its whole process group), wait for the exit; kill what is left if it hangs.

        Returns the exit code. ``check``: fail (AssertionError) unless it ended as a clean shutdown does,
        without a traceback.
        """
        if self.proc.poll() is None:
            self.send_signal(sig, group)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.hung_s = timeout
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._kill_leftovers()
        self._log.close()
        if check:
            self.check_ended_cleanly()
        return self.proc.returncode

    def _kill_leftovers(self):
        """Ranks that outlived their launcher (torchrun starts them in sessions of their own)."""
        for pid in marked_pids(self.marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def check_ended_cleanly(self):
        """The exit code of a clean shutdown after the signal it got, and no traceback in its log."""
        problems = [f"still running {self.hung_s:.0f} s after the signal: killed"] if self.hung_s else []
        expected = self.clean_exits.get(self.signalled)
        if self.proc.returncode != expected:
            after = signal.Signals(self.signalled).name if self.signalled else "no signal"
            problems.append(f"exit code {self.proc.returncode} after {after} (a clean shutdown gives {expected})")
        for tb in tracebacks(self.log()):
            if not (self.launcher_traceback and self.launcher_traceback.search(tb.splitlines()[-1])):
                problems.append(f"a traceback in its log:\n{tb}")
        if problems:
            raise AssertionError(f"the server at {self.log_path} did not end cleanly: " + "\n".join(problems))

    def post(self, path: str, body: bytes | dict, timeout: float = 60.0) -> tuple[int, dict]:
        """A raw POST (for bodies an OpenAI client would never send); returns (status, JSON body)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())
