"""Helpers for tests of the kernels' thread pool (torchchat/csrc/work_pool.h) and the ops on it: thread counts, the
pool's late-worker knob, its counts, and a deadline for calls that could hang. The ``pool`` fixture is in conftest."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

LATE_US = 300_000  # a late worker's sleep before it claims: far longer than any call below takes


def pool_counts() -> dict[str, int]:
    regions, caller, worker, wait_ns, sleeps, solo, woken = torch.ops.torchchat.work_pool_counts()
    return {"regions": regions, "caller_chunks": caller, "worker_chunks": worker, "solo_regions": solo,
            "woken_regions": woken}


def runs(threads: int, fn, late_us: int = 0):
    """fn() with torch's (and so the pool's) thread count at `threads`, each worker late by late_us."""
    torch.set_num_threads(threads)
    torch.ops.torchchat.work_pool_worker_delay(late_us)
    try:
        return fn()
    finally:
        torch.ops.torchchat.work_pool_worker_delay(0)


SETTINGS = [(2, 0), (3, 0), (2, 40), (3, LATE_US)]  # (threads, each worker late by us)


def returns_within(seconds: float, fn):
    """fn()'s value, or a failure if it has not returned after `seconds` (a caller left waiting for a thread that
    never claims its chunks would otherwise hang the suite; the stuck thread is a daemon, so pytest still exits)."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(value=fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the call has not returned after {seconds} s"
    return result["value"]


def pool_workers() -> list[int]:
    """The thread ids of the pool's workers in this process (they are named "torchchat-pool")."""
    tasks = Path("/proc/self/task")
    return [int(t.name) for t in tasks.iterdir() if (t / "comm").read_text().strip() == "torchchat-pool"]

