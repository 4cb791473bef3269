"""This process's place in a distributed job: its rank, device, threads, log prefix and process group.

Everything here reads what torchrun (or torchchat's own launcher, ``torchchat/launch/spawn.py``)
puts in the environment. Nothing assumes one node: ``RANK`` numbers the processes of the whole
job, ``LOCAL_RANK`` those of this machine (it picks the GPU), and the two differ on every node
but the first.
"""

from __future__ import annotations

import io
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, TextIO

import torch
import torch.distributed as dist

from torchchat.errors import ConfigError

# The variables torchrun sets for each worker; all of them or none.
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# How long a collective on the default group may wait (per token, per layer, and the startup
# agreement): bounded, so that a rank that died or hung makes the others fail instead of waiting
# forever. The per-turn broadcast of the user's input waits for a human and runs on the long-timeout
# group of DistributedGenerator instead. Raise it for models whose prefill takes longer than this.
TIMEOUT_ENV = "TORCHCHAT_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 60.0

# What gloo and NCCL say when the other side of a collective went away or never answered.
_PEER_FAILURE_SIGNS = ("connection closed", "connection reset", "broken pipe", "timed out", "timeout",
                       "connection refused", "socket closed", "nccl communicator was aborted", "read error")


@dataclass(frozen=True)
class WorkerEnv:
    """Where this process sits in the job, as its launcher described it in the environment."""

    rank: int  # 0 .. world_size - 1 over every node; rank 0 talks to the user
    local_rank: int  # 0 .. local_world_size - 1 on this node; picks the GPU
    world_size: int
    local_world_size: int  # processes on this node
    master_addr: str
    master_port: int

    @classmethod
    def from_environ(cls, environ=None) -> "WorkerEnv | None":
        """The launcher's description; None when no launcher started this process."""
        environ = os.environ if environ is None else environ
        present = [v for v in LAUNCH_VARS if v in environ]
        if not present:
            return None
        missing = [v for v in LAUNCH_VARS if v not in environ]
        if missing:
            raise ConfigError(f"{', '.join(present)} set but not {', '.join(missing)}: start the job with torchrun, "
                              f"or unset them to let torchchat start its own processes")
        try:
            world_size = int(environ["WORLD_SIZE"])
            return cls(rank=int(environ["RANK"]), local_rank=int(environ["LOCAL_RANK"]), world_size=world_size,
                       local_world_size=int(environ.get("LOCAL_WORLD_SIZE", world_size)),
                       master_addr=environ["MASTER_ADDR"], master_port=int(environ["MASTER_PORT"]))
        except ValueError as e:
            raise ConfigError(f"a launcher variable is not a number ({e}); start the job with torchrun") from e

    @property
    def prefix(self) -> str:
        return f"[rank{self.rank}] "


def collective_timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV} ({raw!r}) must be a number of seconds") from None
    if seconds <= 0:
        raise ConfigError(f"{TIMEOUT_ENV} ({raw}) must be positive")
    return timedelta(seconds=seconds)


def worker_device(device_type: str, env: WorkerEnv) -> str:
    """"cpu" or "cuda" (as the CLI resolved --device) -> this rank's device: one GPU per local rank.

    LOCAL_RANK, not RANK: on every node but the first, ranks start above the GPU count.
    """
    return "cpu" if device_type == "cpu" else f"cuda:{env.local_rank}"


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_process(processes: int) -> int:
    """Intra-op threads for each of ``processes`` processes sharing this machine's cores."""
    return max(1, cpu_count() // processes)


def set_threads(env: WorkerEnv):
    """Share the node's cores between its ranks unless the user chose (OMP_NUM_THREADS)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(threads_per_process(env.local_world_size))


class RankPrefixed(io.TextIOBase):
    """A text stream that writes whole lines, each starting with ``prefix``.

    Every rank writes to the same terminal; whole lines written at once do not interleave.
    """

    def __init__(self, stream: TextIO, prefix: str):
        self.stream = stream
        self.prefix = prefix
        self._partial = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        if lines:
            self.stream.write("".join(f"{self.prefix}{line}\n" for line in lines))
            self.stream.flush()
        return len(text)

    def flush(self):
        self.stream.flush()

    def close_line(self):
        """Write what is left of an unfinished line (at exit)."""
        if self._partial:
            self.write("\n")

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return self.stream.isatty()


@contextmanager
def rank_prefixed_stderr(env: WorkerEnv) -> Iterator[RankPrefixed]:
    """Prefix every line this process writes to stderr (logs, stats, warnings, tracebacks) with its rank."""
    original = sys.stderr
    sys.stderr = RankPrefixed(original, env.prefix)
    try:
        yield sys.stderr
    finally:
        sys.stderr.close_line()
        sys.stderr = original


@contextmanager
def process_group(env: WorkerEnv, device: str) -> Iterator[None]:
    """Join the job's default process group; leave it on every way out (errors, Ctrl-C included)."""
    kwargs = {}
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        kwargs["device_id"] = torch.device(device)
    # init_method env://: MASTER_ADDR/MASTER_PORT (or, under torchrun's c10d rendezvous, its agent's store).
    dist.init_process_group(backend_for(device), rank=env.rank, world_size=env.world_size,
                            timeout=collective_timeout(), **kwargs)
    try:
        yield
    finally:
        dist.destroy_process_group()


def all_gather_objects(value) -> list:
    """Every rank's ``value``, in rank order, on every rank (pickled; startup only)."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def is_peer_failure(error: BaseException) -> bool:
    """Did a collective fail because another rank died, left or hung (not because of this rank)?"""
    if isinstance(error, getattr(dist, "DistNetworkError", ())):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(sign in text for sign in _PEER_FAILURE_SIGNS)
