"""torchchat: Llama-family models from the command line, a Python API and an OpenAI-compatible server.

Importing the package sets OpenMP's wait for the process when the user has not (before torch loads libgomp, which
reads it once): ``OPENMP_DEFAULTS``."""

import os

# torch's own kernels (a prompt's GEMMs, elementwise ops) run on GNU OpenMP's threads, which spin 300,000 rounds
# (~1 ms) at every wait before they sleep. On a machine with other busy processes (or several ranks of one job) a
# spinning thread takes the core the thread it waits for needs: SmolLM2's 128-token prompt, 2 threads beside one
# CPU hog, ran at 89 tokens/s (865 on the quiet machine). 10,000 rounds (~30 us) keep the quiet speed (878) and
# triple the busy one (250); the decode kernels have threads of their own (torchchat/csrc/work_pool.h).
OPENMP_DEFAULTS = {"GOMP_SPINCOUNT": "10000"}


def set_openmp_defaults(environ=os.environ) -> None:
    """OPENMP_DEFAULTS into ``environ`` unless the user chose a wait (GOMP_SPINCOUNT or OMP_WAIT_POLICY)."""
    if "GOMP_SPINCOUNT" not in environ and "OMP_WAIT_POLICY" not in environ:
        environ.update(OPENMP_DEFAULTS)


set_openmp_defaults()
