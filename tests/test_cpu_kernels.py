"""The batch-1 CPU op torch.ops.torchchat.gemv (torchchat/csrc/gemv.cpp): results against float64, the op
under Dynamo, the decode step routed through it, its build cache and its fallbacks (switched off, no compiler)."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.generators import local_generator, tiny_source
from torchchat import cpu_kernels
from torchchat.generate.base import GenerationArgs, Turn
from torchchat.quantize import Int8Linear

# Where both are present (this project's machines) a failed build fails the tests rather than skipping them.
pytestmark = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() == "DEFAULT" or not shutil.which("c++"),
                                reason="needs an AVX2 CPU and a C++ compiler")



@pytest.fixture(autouse=True, scope="module")
def op_loaded():
    """Builds (or finds in the cache) and loads the op; a failed build fails here."""
    assert cpu_kernels.available()


GREEDY = GenerationArgs(max_new_tokens=24, temperature=0, top_k=None, seed=0)


def random_weight(out_features: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    if dtype is torch.int8:
        return torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8)
    return torch.randn(out_features, in_features).to(dtype)


# Shapes cover the 16-wide vector loop, its scalar tail, and a last block of fewer than 4 rows.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("out_features,in_features", [(1, 1), (3, 15), (4, 16), (37, 17), (96, 256), (1537, 576)])
def test_gemv_matches_float64_reference(dtype, out_features, in_features):
    torch.manual_seed(out_features * 1000 + in_features)
    x = torch.randn(1, 1, in_features)
    w = random_weight(out_features, in_features, dtype)
    scale = torch.rand(out_features) if dtype is torch.int8 else None
    ref = F.linear(x.double(), w.double())  # (1, 1, out)
    if scale is not None:
        ref = ref * scale.double()
    y = torch.ops.torchchat.gemv(x, w, scale)
    assert y.shape == (1, 1, out_features) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_gemv_takes_and_returns_the_activation_dtype():
    x = torch.randn(1, 64).bfloat16()
    w = torch.randn(32, 64).bfloat16()
    y = torch.ops.torchchat.gemv(x, w)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, F.linear(x.float(), w.float()).bfloat16())


def test_supports_only_one_contiguous_row_on_cpu():
    w = torch.randn(8, 16)
    assert cpu_kernels.supports(torch.randn(1, 1, 16), w)
    assert not cpu_kernels.supports(torch.randn(2, 16), w)  # two rows: torch's GEMM
    assert not cpu_kernels.supports(torch.randn(1, 16), w.t().contiguous().t())  # a transposed view
    assert not cpu_kernels.supports(torch.randn(1, 16), w.half())  # no fp16 kernel


def test_bad_input_is_a_clear_error():
    with pytest.raises(RuntimeError, match="one row of 16 values"):
        torch.ops.torchchat.gemv(torch.randn(2, 16), torch.randn(8, 16))
    with pytest.raises(RuntimeError, match="not float32, bfloat16 or int8"):
        torch.ops.torchchat.gemv(torch.randn(1, 16), torch.randn(8, 16).half())


def test_op_traces_without_a_graph_break():
    x, w = torch.randn(1, 1, 48), torch.randn(20, 48)
    compiled = torch.compile(lambda x, w: torch.ops.torchchat.gemv(x, w) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w), 2 * F.linear(x, w))


def test_int8_linear_one_row_uses_the_kernel_with_its_scales(monkeypatch):
    torch.manual_seed(0)
    q = Int8Linear.from_linear(torch.nn.Linear(96, 40, bias=False))
    calls = []
    real = torch.ops.torchchat.gemv
    monkeypatch.setattr(torch.ops.torchchat, "gemv", lambda *a: calls.append(a) or real(*a))
    x = torch.randn(1, 1, 96)
    torch.testing.assert_close(q(x), F.linear(x, q.dequantize()), rtol=1e-5, atol=1e-5)
    assert len(calls) == 1


def test_decode_through_the_kernels_gives_the_same_greedy_tokens(tiny_model, monkeypatch):
    """LocalGenerator on CPU routes one-row linears to the op; switched off, they take torch's F.linear."""
    gen = local_generator(tiny_source(tiny_model))
    used = []
    real_supports = cpu_kernels.supports
    monkeypatch.setattr(cpu_kernels, "supports", lambda x, w: used.append(1) or real_supports(x, w))
    with_kernels = gen.complete(Turn(gen.encode_prompt("Once upon a time"), GREEDY))[0].tokens
    assert len(used) > 0
    monkeypatch.setattr(cpu_kernels, "supports", lambda x, w: False)
    without = gen.complete(Turn(gen.encode_prompt("Once upon a time"), GREEDY))[0].tokens
    assert with_kernels == without and len(with_kernels) == GREEDY.max_new_tokens


def _available_in_subprocess(tmp_path, **env) -> subprocess.CompletedProcess:
    code = "from torchchat import cpu_kernels; print(cpu_kernels.available())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TORCHCHAT_CACHE": str(tmp_path), **env})


def test_built_once_into_the_cache(tmp_path):
    first = _available_in_subprocess(tmp_path)
    assert first.stdout.strip() == "True", first.stderr
    built = list(tmp_path.glob("gemv-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    assert _available_in_subprocess(tmp_path).stdout.strip() == "True"
    assert built[0].stat().st_mtime_ns == mtime and list(tmp_path.glob("*")) == built  # reused, no leftovers


def test_switched_off_by_the_environment(tmp_path):
    proc = _available_in_subprocess(tmp_path, TORCHCHAT_CPU_KERNELS="0")
    assert proc.stdout.strip() == "False" and not list(tmp_path.glob("*"))


def test_without_a_compiler_falls_back_with_a_message(tmp_path):
    proc = _available_in_subprocess(tmp_path, CXX=str(tmp_path / "no-such-c++"))
    assert proc.returncode == 0 and proc.stdout.strip() == "False"
    assert "CPU decode kernels unavailable" in proc.stderr and "using torch's" in proc.stderr
