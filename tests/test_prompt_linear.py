"""torch.ops.torchchat.prompt_linear (torchchat/csrc/prompt_linear.cpp): a prompt's rows times a weight of every
format the ops take, as MKL GEMMs on tiles the kernels' threads claim. It must equal the float32 product with the
weight dequantized, whatever the tiles (shapes that do not divide them), the thread count, late workers and the busy
machine's finer tiles; and the layers must route prompts to it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.kernel_pool import LATE_US, SETTINGS, pool_counts, returns_within, runs
from torchchat import cpu as cpu_kernels
from torchchat.cpu import run_queue
from torchchat.quantize import Int4Linear, Int8Linear

pytestmark = pytest.mark.skipif(not (cpu_kernels.available() and torch.ops.torchchat.prompt_linear_available()),
                                reason="CPU kernels (with torch's MKL) not built")


def weights(out_features: int, in_features: int) -> dict[str, tuple]:
    """name -> ((weight, aux, group_size) as the op takes it, W in float32)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    w = linear.weight.detach()
    rows, blocks = Int8Linear.from_linear(linear), Int8Linear.from_linear(linear, blocks=True)
    int4_32, int4_64 = Int4Linear.from_linear(linear, 32), Int4Linear.from_linear(linear, 64)
    return {
        "fp32": ((w, None, 0), w),
        "bf16": ((w.bfloat16(), None, 0), w.bfloat16().float()),
        "int8 rows": ((rows.weight, rows.scales, 0), rows.dequantize()),
        "int8 blocks": ((blocks.weight, blocks.scales, 32), blocks.dequantize()),
        "int4 g32": ((int4_32.packed, int4_32.scales_and_mins, 32), int4_32.dequantize()),
        "int4 g64": ((int4_64.packed, int4_64.scales_and_mins, 64), int4_64.dequantize()),
    }


@pytest.mark.parametrize("rows, out_features, in_features", [(13, 200, 64), (700, 1000, 128), (64, 4096, 576)])
def test_equals_the_float32_product_with_the_weight_dequantized(rows, out_features, in_features, pool):
    """Tiles of x (512 rows) and of W (whole multiples of 16 rows) that do not divide the shapes, and every format."""
    torch.manual_seed(1)
    x = torch.randn(rows, in_features)
    for name, ((weight, aux, group_size), w) in weights(out_features, in_features).items():
        got = runs(2, lambda: torch.ops.torchchat.prompt_linear(x, weight, aux, group_size))
        want = F.linear(x, w)
        assert got.shape == want.shape and got.dtype == torch.float32, name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_keeps_xs_leading_dims_and_dtype(pool):
    torch.manual_seed(2)
    x, w = torch.randn(2, 40, 64), torch.randn(96, 64)
    out = torch.ops.torchchat.prompt_linear(x.bfloat16(), w)
    assert out.shape == (2, 40, 96) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.linear(x.bfloat16().float(), w), rtol=1e-2, atol=1e-2)


def test_same_bits_whatever_the_threads_and_on_a_busy_machine(pool):
    """1, 2 and 3 threads, late workers, and the finer tiles the pool's busy judgement brings (made with workers that
    never help): bit-identical."""
    torch.manual_seed(3)
    x = torch.randn(600, 576)
    for name, ((weight, aux, group_size), _) in weights(1536, 576).items():
        product = lambda: torch.ops.torchchat.prompt_linear(x, weight, aux, group_size)  # noqa: E731
        reference = runs(1, product)
        for threads, late_us in SETTINGS:
            assert torch.equal(runs(threads, product, late_us), reference), f"{name}: {threads} threads, {late_us} us"
    weight, aux, group_size = weights(1536, 576)["int4 g32"][0]
    product = lambda: torch.ops.torchchat.prompt_linear(x, weight, aux, group_size)  # noqa: E731
    reference = runs(1, product)
    small = torch.randn(256, 576)
    torch.ops.torchchat.work_pool_reset()

    def busy_then_prompt():
        for _ in range(200):  # regions the late workers never help with: the pool is judged busy
            torch.ops.torchchat.gemv(x[:1], small)
        return product()

    out = returns_within(60, lambda: runs(2, busy_then_prompt, LATE_US))
    assert pool_counts()["solo_regions"] > 0  # busy
    assert torch.equal(out, reference)


def test_bad_operands_are_refused():
    x = torch.randn(20, 64)
    with pytest.raises(RuntimeError, match="rows of 64 values"):
        torch.ops.torchchat.prompt_linear(torch.randn(20, 32), torch.randn(8, 64))
    with pytest.raises(RuntimeError, match="row scales"):
        torch.ops.torchchat.prompt_linear(x, torch.zeros(8, 64, dtype=torch.int8), torch.ones(3), 0)
    with pytest.raises(RuntimeError, match="group size"):
        torch.ops.torchchat.prompt_linear(x, torch.zeros(8, 32, dtype=torch.uint8), torch.ones(8, 2, 2).half(), 48)


def test_the_layers_send_prompts_to_it(pool):
    """A prompt through the CPU fast path's linear, and the int8 and int4 layers: published to the pool (one region a
    call with 2 threads), equal to the float32 product."""
    torch.manual_seed(4)
    linear = torch.nn.Linear(576, 1536, bias=False)
    x = torch.randn(1, 100, 576)
    layers = {"gemv": cpu_kernels.GemvLinear(linear.weight), "int8": Int8Linear.from_linear(linear),
              "int4": Int4Linear.from_linear(linear, 32)}
    for name, layer in layers.items():
        w = linear.weight.detach() if name == "gemv" else layer.dequantize()
        torch.ops.torchchat.work_pool_reset()
        with torch.no_grad():
            out = runs(2, lambda: layer(x))
        assert pool_counts()["regions"] == 1, name
        torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_on_a_busy_machine_a_prompts_torch_ops_run_on_one_thread_and_its_gemms_on_the_pool(pool, monkeypatch):
    """one_torch_thread_when_busy: quiet, nothing changes; once the pool judges the machine busy (workers that never
    help), torch runs one thread inside and the pool still publishes the GEMMs' regions to its workers; both
    counts come back on leaving."""
    torch.manual_seed(5)
    x, w, small = torch.randn(64, 576), torch.randn(1536, 576), torch.randn(256, 576)
    torch.set_num_threads(2)
    monkeypatch.setattr(run_queue, "overcommitted", lambda threads: False)  # quiet, whatever else this machine runs
    with cpu_kernels.kernels.one_torch_thread_when_busy(torch.device("cpu")):
        assert torch.get_num_threads() == 2  # quiet: as it was
    torch.ops.torchchat.work_pool_reset()

    def busy_then_prompt():
        for _ in range(200):
            torch.ops.torchchat.gemv(x[:1], small)
        assert torch.ops.torchchat.work_pool_busy()
        regions = pool_counts()["regions"]
        with cpu_kernels.kernels.one_torch_thread_when_busy(torch.device("cpu")):
            threads = torch.get_num_threads()
            out = torch.ops.torchchat.prompt_linear(x, w)
        return threads, pool_counts()["regions"] - regions, out, torch.get_num_threads()

    inside, published, out, after = returns_within(60, lambda: runs(2, busy_then_prompt, LATE_US))
    assert inside == 1 and published == 1 and after == 2
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-5)
    torch.ops.torchchat.work_pool_reset()
    runs(1, lambda: torch.ops.torchchat.prompt_linear(x, w))
    assert pool_counts()["regions"] == 0  # the pool follows torch's count (one thread: serial) again


def test_before_the_pool_judges_the_run_queue_decides(pool, monkeypatch):
    """With no region of late (a run's first prompt), one_torch_thread_when_busy asks the run queue: overcommitted,
    the prompt's torch ops run on one thread and the pool runs as on a busy machine from then on; not, nothing
    changes. After a recent region the pool's own judgement stands and the run queue is not read."""
    x, w, cpu = torch.randn(64, 576), torch.randn(1536, 576), torch.device("cpu")
    asked: list[int] = []

    def run_queue_says(overcommitted: bool):
        monkeypatch.setattr(run_queue, "overcommitted", lambda threads: asked.append(threads) or overcommitted)

    torch.set_num_threads(2)
    assert torch.ops.torchchat.work_pool_idle_s() == float("inf")  # reset: as if no region had run
    run_queue_says(False)
    with cpu_kernels.kernels.one_torch_thread_when_busy(cpu):
        assert torch.get_num_threads() == 2
    assert asked == [2] and not torch.ops.torchchat.work_pool_busy()

    run_queue_says(True)
    with cpu_kernels.kernels.one_torch_thread_when_busy(cpu):
        inside = torch.get_num_threads()
    assert inside == 1 and torch.get_num_threads() == 2 and asked == [2, 2]
    assert torch.ops.torchchat.work_pool_busy()  # and the pool follows

    torch.ops.torchchat.work_pool_reset()
    torch.ops.torchchat.prompt_linear(x, w)  # a region on two threads: a judgement under way
    monkeypatch.setattr(cpu_kernels.kernels, "STALE_JUDGEMENT_S", 3600.0)  # recent, however slow this machine is
    assert torch.ops.torchchat.work_pool_idle_s() < 3600.0
    with cpu_kernels.kernels.one_torch_thread_when_busy(cpu):
        assert torch.get_num_threads() == 2
    assert asked == [2, 2] and not torch.ops.torchchat.work_pool_busy()
