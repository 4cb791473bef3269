"""CPU hogs for ``bench.py --busy N``: N processes that spin for as long as a measurement runs, the stand-in for
the browser, build or other ranks a user's machine runs beside the model."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from typing import Iterator

# A busy loop with no I/O and no memory traffic: it takes a core and nothing else, as `yes > /dev/null` does.
SPIN = "while True: pass"


@contextlib.contextmanager
def cpu_hogs(n: int) -> Iterator[list[subprocess.Popen]]:
    """Start ``n`` spinning processes; kill them on leaving, whatever the block raised."""
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-c", SPIN], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
