"""Running distributed torchchat jobs as real processes in tests: torchrun, the self-launcher, two "nodes".

Every job runs in its own session (a signal for it alone, not for pytest), with a timeout, and is
cleaned up in ``finally``: torchrun starts its workers in sessions of their own, so leftovers are
found by a marker in their command line (the test model's unique path) and killed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from torchchat.launch.spawn import free_port

ROOT = Path(__file__).resolve().parent.parent
TORCHCHAT = str(ROOT / "torchchat.py")
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID")


def job_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # several processes share 2 cores
    return env


def torchchat(*args: str) -> list[str]:
    return [sys.executable, TORCHCHAT, *args]


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(nproc), TORCHCHAT, *args]


def two_nodes(*args: str) -> list[list[str]]:
    """Two single-process torchrun launchers meeting through a c10d rendezvous on this machine."""
    endpoint, run_id = f"127.0.0.1:{free_port()}", f"tc-{uuid.uuid4().hex[:8]}"
    return [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id,
             "--rdzv-conf", f"is_host={int(node == 0)}", "--local-addr", "127.0.0.1",
             "--max-restarts", "0", TORCHCHAT, *args]
            for node in (0, 1)]


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def error_lines(self) -> list[str]:
        """torchchat's own error lines (torchrun adds its own report around them)."""
        return [line for line in self.stderr.splitlines() if re.match(r"^(\[rank\d+\] )?error: ", line)]


class Job:
    """One launcher process (torchrun, or torchchat itself), its output in files."""

    def __init__(self, cmd: list[str], workdir: Path, marker: str, stdin: bool = False,
                 env: dict[str, str] | None = None):
        self.marker = marker
        name = uuid.uuid4().hex[:6]
        self.out_path, self.err_path = workdir / f"{name}.out", workdir / f"{name}.err"
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**job_env(), **(env or {})}, stdout=self._out,
                                     stderr=self._err,
                                     stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, text=True,
                                     start_new_session=True)

    def stdout(self) -> str:
        return self.out_path.read_text()

    def stderr(self) -> str:
        return self.err_path.read_text()

    def send(self, text: str, close: bool = False):
        self.proc.stdin.write(text)
        self.proc.stdin.flush()
        if close:
            self.proc.stdin.close()

    def wait_for(self, predicate, timeout: float, what: str) -> None:
        """Poll the job's output until ``predicate(self)`` holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return
            if self.proc.poll() is not None and not predicate(self):
                raise AssertionError(f"exited ({self.proc.returncode}) before {what}:\n{self.stderr()[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"no {what} within {timeout} s:\n{self.stderr()[-3000:]}")

    def rank_pid(self, rank: int) -> int | None:
        m = re.search(rf"^\[rank{rank}\] pid=(\d+)", self.stderr(), re.M)
        return int(m.group(1)) if m else None

    def finish(self, timeout: float, cleanup: bool = True) -> Finished:
        """Wait for the launcher to exit (SIGKILL at the timeout); ``cleanup``: then kill what it left."""
        try:
            if self.proc.stdin and not self.proc.stdin.closed:
                self.proc.stdin.close()
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            if cleanup:
                self.kill()
        return Finished(self.proc.returncode, self.stdout(), self.stderr(), time.monotonic() - self.started)

    def kill(self):
        """SIGKILL the launcher's session and every process carrying the marker (torchrun's workers)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        for pid in marked_pids(self.marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._out.close()
        self._err.close()


def run(cmd: list[str], workdir: Path, marker: str, stdin: str | None = None, timeout: float = 120) -> Finished:
    job = Job(cmd, workdir, marker, stdin=stdin is not None)
    try:
        if stdin is not None:
            job.send(stdin, close=True)
    except BrokenPipeError:
        pass
    return job.finish(timeout)


def rank_envs(world: int) -> list[dict[str, str]]:
    """What a launcher would set for each of ``world`` ranks on this machine (to watch each rank's exit)."""
    port = str(free_port())
    return [dict(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for r in range(world)]


def run_together(cmds: list[list[str]], workdir: Path, marker: str, timeout: float = 120,
                 envs: list[dict[str, str]] | None = None) -> list[Finished]:
    jobs = [Job(cmd, workdir, marker, env=env) for cmd, env in zip(cmds, envs or [None] * len(cmds))]
    try:
        deadline = time.monotonic() + timeout
        # Not cleaned up one by one: the marker is shared, and the other launcher may still be running.
        return [job.finish(max(1.0, deadline - time.monotonic()), cleanup=False) for job in jobs]
    finally:
        for job in jobs:
            job.kill()


def marked_pids(marker: str) -> list[int]:
    """Live processes (not zombies) whose command line contains ``marker``, other than this one."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids
