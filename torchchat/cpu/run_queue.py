"""Is the machine overcommitted right now? The kernels' pool judges that from how its workers keep up
(csrc/work_pool.h), which takes ~128 regions: most of a run's first prompt. Before then the kernel's run queue
answers: other threads runnable beside ours, read a few times over ~2 ms (a CPU hog is runnable at every read; a
passing daemon rarely is)."""

from __future__ import annotations

import os
import time
from pathlib import Path

LOADAVG = Path("/proc/loadavg")
READS, READ_GAP_S = 3, 0.001


def others_runnable(loadavg: Path = LOADAVG) -> int | None:
    """Threads runnable on the machine now besides the one asking: /proc/loadavg's fourth field is
    "runnable/total" and counts the reader. None where there is no such file (not Linux)."""
    try:
        runnable = int(loadavg.read_text().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None
    return runnable - 1


def overcommitted(threads: int, loadavg: Path = LOADAVG) -> bool:
    """Would ``threads`` of ours find fewer cores than that, at every one of READS reads? (Our own other threads
    must be asleep: the pool's sleep within ~2 ms of its last region, OpenMP's within ~30 us.)"""
    cpus = os.cpu_count() or 1
    for read in range(READS):
        if read:
            time.sleep(READ_GAP_S)
        others = others_runnable(loadavg)
        if others is None or others + threads <= cpus:
            return False
    return True
