"""torchchat's own launcher: `python torchchat.py generate --tp 2 --pp 2 ...` without torchrun.

It checks the job as every rank would (bad --tp/--pp fail here, before any process starts), finds
a free port, starts tp x pp copies of the same command line as ranks 0..N-1 on this machine, and
watches them: the first rank that fails stops the others (SIGTERM, then SIGKILL after a grace
period) and is the one reported; Ctrl-C stops them all. Only rank 0 gets this process's standard
input (a chat works through the launcher); every rank shares its stdout and stderr.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torchchat.distributed.process_group import WorkerEnv, threads_per_process
from torchchat.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PEER_FAILED, EXIT_USER_ERROR

POLL_S = 0.05
FAILURE_GRACE_S = 5.0  # after SIGTERM, before SIGKILL
INTERRUPT_GRACE_S = 20.0  # after Ctrl-C, for ranks to finish on their own (a server drains its requests)

# A rank runs the same command line again, from the same package as this launcher, whatever started it
# (torchchat.py, the `torchchat` console script, python -m). A string, not an import: the launcher
# sits below the CLI.
_ENTRY = "import sys; from torchchat.cli import main; sys.exit(main(sys.argv[1:]))"
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
LAUNCHER_PID_ENV = "TORCHCHAT_LAUNCHER_PID"


def launch_workers(argv: list[str], world: int, check: Callable[[WorkerEnv], object]) -> int:
    """Check the job (``check``: what every rank checks, as rank 0 of this machine), start its ranks, wait for
    them; the exit code is 0 only if every rank succeeded."""
    check(WorkerEnv(rank=0, local_rank=0, world_size=world, local_world_size=world, master_addr="127.0.0.1",
                    master_port=0))
    workers = Workers.start(argv, world, free_port())
    return workers.wait()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (the OS picks it); rank 0 binds it moments later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def worker_environ(rank: int, world: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
               GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               PYTHONPATH=os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p))
    env[LAUNCHER_PID_ENV] = str(os.getpid())
    env.setdefault("OMP_NUM_THREADS", str(threads_per_process(world)))  # ranks share this machine's cores
    return env


def die_with_launcher():
    """In a self-launched rank (Linux): if the launcher is killed outright (SIGKILL), this rank goes too."""
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if launcher is None or sys.platform != "linux":
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(launcher):  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Exit:
    rank: int
    pid: int
    code: int  # negative: killed by that signal

    @property
    def echo(self) -> bool:
        """A rank that only failed because another one did (it exited EXIT_PEER_FAILED)."""
        return self.code == EXIT_PEER_FAILED

    def describe(self) -> str:
        if self.echo:  # no rank failed on its own: one hung, or its failure went unseen
            return f"rank {self.rank} (pid {self.pid}) lost contact with another rank"
        if self.code < 0:
            return f"rank {self.rank} (pid {self.pid}) was killed by {signal.Signals(-self.code).name}"
        return f"rank {self.rank} (pid {self.pid}) failed with exit code {self.code}"


class Workers:
    """The running ranks of a self-launched job."""

    def __init__(self, procs: list[subprocess.Popen]):
        self.procs = procs
        self.exits: dict[int, Exit] = {}

    @classmethod
    def start(cls, argv: list[str], world: int, port: int) -> "Workers":
        procs = []
        try:
            for rank in range(world):
                procs.append(subprocess.Popen(
                    [sys.executable, "-c", _ENTRY, *argv], env=worker_environ(rank, world, port),
                    stdin=None if rank == 0 else subprocess.DEVNULL))  # only rank 0 reads the user
        except BaseException:
            cls(procs).stop(signal.SIGKILL)
            raise
        return cls(procs)

    def wait(self) -> int:
        """Until every rank ended, or one failed (then stop the rest). Ctrl-C and SIGTERM stop them all."""
        previous = signal.signal(signal.SIGTERM, _terminated)
        try:
            failure = self._watch()
            if failure is not None:
                self.stop(signal.SIGTERM)
                return self._report(failure)
            return EXIT_OK
        except KeyboardInterrupt:
            self._interrupt()
            return EXIT_INTERRUPTED
        finally:
            self.stop(signal.SIGKILL, grace=0)  # nothing outlives the launcher
            signal.signal(signal.SIGTERM, previous)

    def _watch(self) -> Exit | None:
        """Poll until all ended (None) or one failed (the first real failure, echoes last)."""
        while len(self.exits) < len(self.procs):
            ended = self._collect()
            failures = sorted((e for e in ended if e.code != 0), key=lambda e: (e.echo, e.rank))
            if failures:
                return failures[0]
            time.sleep(POLL_S)
        return None

    def _collect(self) -> list[Exit]:
        ended = []
        for rank, proc in enumerate(self.procs):
            if rank not in self.exits and proc.poll() is not None:
                ended.append(Exit(rank, proc.pid, proc.returncode))
        for e in ended:
            self.exits[e.rank] = e
        return ended

    def _report(self, failure: Exit) -> int:
        if failure.code in (EXIT_USER_ERROR, EXIT_INTERRUPTED):  # a user error or Ctrl-C: the rank said so already
            return failure.code
        others = len(self.procs) - 1
        print(f"error: {failure.describe()}; stopped the other {others} rank{'s' if others != 1 else ''}",
              file=sys.stderr, flush=True)
        return failure.code if 0 < failure.code < 128 and not failure.echo else 1

    def _interrupt(self):
        """Ctrl-C: every rank gets SIGINT (the terminal sent it to all; a `kill -INT` to us, we forward it)."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        self._signal_alive(signal.SIGINT)
        self._wait_all(INTERRUPT_GRACE_S)
        self.stop(signal.SIGTERM)

    def stop(self, sig: signal.Signals, grace: float = FAILURE_GRACE_S):
        """Send ``sig`` to the ranks still running; SIGKILL those still there after ``grace`` seconds."""
        self._signal_alive(sig)
        if not self._wait_all(grace):
            self._signal_alive(signal.SIGKILL)
            self._wait_all(None)

    def _signal_alive(self, sig: signal.Signals):
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    def _wait_all(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False
        return True


def _terminated(signum, frame):
    raise KeyboardInterrupt  # SIGTERM on the launcher: stop the ranks as for Ctrl-C

