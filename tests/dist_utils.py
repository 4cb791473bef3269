"""Running a function on N real processes joined in a gloo process group, with a timeout.

``run_ranks(fn, world, *args)`` starts ``world`` processes (forkserver, torch preloaded once), each
calls ``init_worker`` then ``fn(rank, world, *args)``; it returns every rank's return value, in
rank order. A rank that raises fails the call with its traceback; a hang past ``timeout`` kills
every process and fails, never hangs CI. The port comes from binding port 0.

``CollectiveCount`` counts the collectives a rank starts where torch.distributed starts them, and
``assert_every_rank`` compares each rank's result with the expected one.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import tempfile
import time
import traceback
from collections import Counter
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

_PRELOAD = ["torch", "torch.distributed", "torch.distributed.tensor.parallel", "torchchat.model",
            "torchchat.generate.base"]


class RanksFailed(AssertionError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_worker(rank: int, world: int, port: int, timeout_s: float = 60.0):
    """What torchchat/launch/worker.py does for the CLI: one thread, env:// rendezvous on localhost, gloo."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))


def _entry(fn, rank: int, world: int, port: int, out_dir: str, args: tuple):
    path = Path(out_dir) / f"rank{rank}.pkl"
    try:
        init_worker(rank, world, port)
        result = ("ok", fn(rank, world, *args))
    except BaseException:  # noqa: BLE001 - reported by the parent, with the traceback
        result = ("error", traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    path.write_bytes(pickle.dumps(result))


def run_ranks(fn, world: int, *args, timeout: float = 120.0) -> list:
    """fn(rank, world, *args) on ``world`` processes; their results in rank order."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_entry, args=(fn, rank, world, port, out_dir, args), daemon=True)
                 for rank in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            _wait(procs, Path(out_dir), deadline)
        finally:
            hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
        return _collect(Path(out_dir), procs, hung, timeout)


def _wait(procs, out_dir: Path, deadline: float):
    """Until every rank exits, the deadline passes, or one rank failed (the others would only wait)."""
    while time.monotonic() < deadline and any(p.is_alive() for p in procs):
        for rank, p in enumerate(procs):
            if p.exitcode is not None and _failed(out_dir / f"rank{rank}.pkl"):
                return
        time.sleep(0.05)


def _failed(path: Path) -> bool:
    return not path.exists() or pickle.loads(path.read_bytes())[0] == "error"


def _collect(out_dir: Path, procs, hung: list[int], timeout: float) -> list:
    results, errors = [], []
    for rank, p in enumerate(procs):
        path = out_dir / f"rank{rank}.pkl"
        if not path.exists():
            why = f"killed: still running (timeout {timeout:.0f} s, or another rank failed)" if rank in hung else \
                f"exit code {p.exitcode}, no result"
            errors.append(f"rank {rank}: {why}")
            results.append(None)
            continue
        status, value = pickle.loads(path.read_bytes())
        if status == "error":
            errors.append(f"rank {rank}:\n{value}")
        results.append(value)
    if errors:
        raise RanksFailed("\n".join(errors))
    return results


def assert_every_rank(results: list, expected, what: str):
    """Each rank's result equals ``expected`` (not rank 0's alone): name the ranks that differ."""
    wrong = [rank for rank, result in enumerate(results) if result != expected]
    assert not wrong, f"{what}: rank(s) {wrong} of {len(results)} differ from the expected result:\n" + \
        "\n".join(f"rank {rank}: {results[rank]}" for rank in wrong) + f"\nexpected: {expected}"


# The dispatcher's communication ops (torch's own c10d and functional-collective libraries), by kind.
_COMMUNICATION_NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional", "_c10d_functional_autograd")
_NOT_COMMUNICATION = {"wait_tensor", "_wrap_tensor_autograd", "check_for_nan"}  # waits, wrappers, checks
_KINDS = {
    "broadcast_": "broadcast", "broadcast": "broadcast",
    "allreduce_": "all_reduce", "allreduce_coalesced_": "all_reduce", "all_reduce": "all_reduce",
    "all_reduce_": "all_reduce", "all_reduce_coalesced": "all_reduce", "all_reduce_coalesced_": "all_reduce",
    "allgather_": "all_gather", "_allgather_base_": "all_gather", "allgather_coalesced_": "all_gather",
    "allgather_into_tensor_coalesced_": "all_gather", "all_gather_into_tensor": "all_gather",
    "all_gather_into_tensor_out": "all_gather", "all_gather_into_tensor_coalesced": "all_gather",
    "send": "send", "isend": "send", "recv_": "recv", "recv_any_source_": "recv", "irecv": "recv",
    "barrier": "barrier", "monitored_barrier_": "barrier",
}


class CollectiveCount(TorchDispatchMode):
    """Counts, by kind, every communication this thread starts while the mode is on, at the boundary under
    torch.distributed: the dispatcher's c10d ops, which every ProcessGroup collective and point-to-point
    operation calls (``dist.broadcast``, ``dist.barrier``, ``dist.batch_isend_irecv``'s sends, the
    ``*_object_list`` helpers' tensors), and the functional collectives (DTensor's, ``funcol``). Nothing that
    communicates through a process group gets past it (a TCPStore used as a side channel would). Kinds not
    in ``_KINDS`` are counted under their op's own name, so that they fail any expected count.
    """

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in _COMMUNICATION_NAMESPACES and func._opname not in _NOT_COMMUNICATION:
            self.counts[_KINDS.get(func._opname, func.name())] += 1
        return func(*args, **(kwargs or {}))
