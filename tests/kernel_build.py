"""The mark for tests of the CPU kernels (torchchat/cpu): they need an AVX2 CPU and a C++ compiler. Where both are
present (this project's machines) the ``kernels_loaded`` fixture (conftest) builds and loads the op, so a failed
build fails the tests rather than skipping them."""

from __future__ import annotations

import shutil

import pytest
import torch

needs_kernels = [pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() == "DEFAULT" or not shutil.which("c++"),
                                    reason="needs an AVX2 CPU and a C++ compiler"),
                 pytest.mark.usefixtures("kernels_loaded")]
