"""The CPU decode ops torch.ops.torchchat.gemv and gemv_int4 (torchchat/csrc/): results against float64, a batch's
rows bit-identical to one-row calls, the ops under Dynamo, the decode step routed through them, the kernels' build
cache and their fallbacks (switched off, no compiler). decode_attention: test_decode_attention.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.generators import local_generator, tiny_source
from tests.kernel_build import needs_kernels
from torchchat import cpu as cpu_kernels
from torchchat.generate.base import GenerationArgs, Turn
from torchchat.quantize import Int4Linear, Int8Linear

ROOT = Path(__file__).resolve().parent.parent
pytestmark = needs_kernels


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
    if dtype is torch.int8:  # x is rounded to int16 (one scale): within 1e-4 of exact, 1e-5 of what the op computes
        torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
        ref = F.linear(int16_rounded(x).double(), w.double()) * scale.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def int16_rounded(x: torch.Tensor) -> torch.Tensor:
    """x as the int8 kernel reads it: round(x * 32767 / max|x|) * (max|x| / 32767), float32 steps."""
    amax = x.abs().max().float()
    return torch.round(x * (32767 / amax)) * (amax / 32767)


def test_gemv_takes_and_returns_the_activation_dtype():
    x = torch.randn(1, 64).bfloat16()
    w = torch.randn(32, 64).bfloat16()
    y = torch.ops.torchchat.gemv(x, w)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, F.linear(x.float(), w.float()).bfloat16())


def test_supports_up_to_max_rows_on_cpu():
    w = torch.randn(8, 16)
    rows = cpu_kernels.kernels.MAX_GEMV_ROWS
    assert cpu_kernels.supports(torch.randn(1, 1, 16), w)
    assert cpu_kernels.supports(torch.randn(rows, 1, 16), w)  # a decode step's sequences
    assert not cpu_kernels.supports(torch.randn(1, rows + 1, 16), w)  # more rows: torch's GEMM
    assert not cpu_kernels.supports(torch.randn(1, 16), w.t().contiguous().t())  # a transposed view
    assert not cpu_kernels.supports(torch.randn(1, 16), w.half())  # no fp16 kernel


def test_bad_input_is_a_clear_error():
    with pytest.raises(RuntimeError, match="rows of 16 values"):
        torch.ops.torchchat.gemv(torch.randn(2, 15), torch.randn(8, 16))
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
    torch.testing.assert_close(q(x), F.linear(x, q.dequantize()), rtol=1e-4, atol=1e-4)  # x in int16: ~1e-5
    assert len(calls) == 1


# ----- gemv_int4 -----

def int4_reference(layer: Int4Linear, x: torch.Tensor) -> torch.Tensor:
    """What gemv_int4 computes, in float64: the dequantized weight times x quantized to int8 in blocks of 32
    (float32 rounding steps as the op takes them)."""
    blocks = x.reshape(-1, 32)  # (in / 32, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127  # (in / 32, 1)
    inverse = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    x_quantized = (torch.round(blocks * inverse) * d).reshape(1, -1)  # (1, in)
    return x_quantized.double() @ layer.dequantize().double().T  # (1, out)


# group_size 32 reads 8 blocks (256 inputs) at a time, then the rest through masks: in_features of 1-7
# blocks, exactly 1 and 8 chunks, and SmolLM2's 576 (2 chunks + 2 blocks); other group sizes block by block.
@pytest.mark.parametrize("out_features,in_features,group_size", [(1, 32, 32), (37, 64, 32), (5, 224, 32),
                                                                 (16, 256, 32), (48, 2048, 32), (33, 2272, 32),
                                                                 (96, 256, 64), (1536, 576, 32), (64, 512, 256)])
def test_gemv_int4_matches_float64_reference(out_features, in_features, group_size):
    """The op against its definition in float64 (same grid, same scales, same int8 activations), and close to
    the product with unrounded activations (~0.5% measured)."""
    torch.manual_seed(out_features + in_features)
    layer = Int4Linear.from_linear(torch.nn.Linear(in_features, out_features, bias=False), group_size)
    x = torch.randn(1, 1, in_features)
    if in_features > 32:
        x[..., :32] = 0  # a block of zeros: its scale is 0, not a division by zero
    y = torch.ops.torchchat.gemv_int4(x, layer.packed, layer.scales_and_mins, group_size)
    assert y.shape == (1, 1, out_features) and y.dtype == torch.float32
    ref = int4_reference(layer, x)
    torch.testing.assert_close(y.view(1, -1).double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    if out_features > 1:  # one dot product of 32 terms can be off by 2%; many are ~0.5% (measured)
        exact = F.linear(x.double(), layer.dequantize().double())
        assert ((y.double() - exact).norm() / exact.norm()).item() < 0.01


@pytest.mark.parametrize("out_features,in_features,group_size", [(37, 64, 32), (96, 256, 128)])
def test_dequantize_int4_matches_unpacking_with_torch_ops(out_features, in_features, group_size, monkeypatch):
    """The op (prompts' float32 GEMMs) against Int4Linear's own torch-op unpacking, rows sliced as
    float32_linear slices them."""
    torch.manual_seed(in_features)
    layer = Int4Linear.from_linear(torch.nn.Linear(in_features, out_features, bias=False), group_size)
    with_op = layer.dequantize(5, 30)
    monkeypatch.setattr(cpu_kernels.kernels, "available", lambda: False)
    with_torch = layer.dequantize(5, 30)
    assert with_op.shape == (25, in_features) and with_op.dtype == torch.float32
    torch.testing.assert_close(with_op, with_torch, rtol=1e-6, atol=1e-7)


# ----- int8 blocks (Int8Linear's block form, llama.cpp's Q8_0): gemv with (out, in / 32) float16 scales -----

def int8_blocks_reference(weight: torch.Tensor, scales: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What gemv computes for an int8 weight in blocks of 32, in float64: x rounded as the op rounds it (as for int8
    rows: int16 with one scale for the row, float32 steps: xq = round(x * (32767 / max|x|)), d = max|x| / 32767),
    times the dequantized weight."""
    x = x.reshape(1, -1)  # (1, in)
    amax = x.abs().max().float()
    # float32 32767 / max|x| as the op divides (a Python number over a tensor is a reciprocal times it: a last bit
    # apart, which moves some values to the next step)
    inverse = torch.tensor(32767.0) / amax if amax > 0 else torch.zeros(())
    x_rounded = torch.round(x * inverse).double() * (amax / 32767).double()  # (1, in)
    return x_rounded @ dequantized_int8_blocks(weight, scales).T  # (1, out)


def dequantized_int8_blocks(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W[o, i] = weight[o, i] * scales[o, i // 32], (out, in) float64."""
    w = weight.double().view(weight.size(0), -1, 32) * scales.double()[..., None]  # (out, in / 32, 32)
    return w.view(weight.size(0), -1)


def int8_activation_blocks(x: torch.Tensor) -> torch.Tensor:
    """x (in,) as llama.cpp's ggml_vec_dot_q8_0_q8_0 reads it (and this op did before it took int16 rows): int8 in
    blocks of 32, d = max|x| / 127 a block, in float64."""
    blocks = x.reshape(-1, 32).double()  # (in / 32, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127  # (in / 32, 1)
    return (torch.round(blocks / d) * d).view(-1)


def random_int8_blocks(out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight over the whole int8 range, -128 included (a Q8_0 file may hold it; llama.cpp's quantizer makes
    -127..127), with float16 block scales."""
    weight = torch.randint(-128, 128, (out_features, in_features), dtype=torch.int8)
    return weight, (torch.rand(out_features, in_features // 32) * 0.02).half()


# 8 blocks (256 inputs) at a time, then the rest (1-7 blocks): in_features of 1-7 blocks, exactly 1 and 8 chunks,
# a partial chunk after several, and SmolLM2's 576 (2 chunks + 2 blocks).
@pytest.mark.parametrize("out_features,in_features", [(1, 32), (37, 64), (5, 224), (16, 256), (48, 2048),
                                                      (33, 2272), (1536, 576)])
def test_gemv_int8_blocks_matches_exact_reference(out_features, in_features):
    """The op against its definition in float64 (the same rounding of x, exact products): equal to float32
    rounding. Close to the product with unrounded x. A row of zeros: all zeros, not a division by zero."""
    torch.manual_seed(out_features + in_features)
    weight, scales = random_int8_blocks(out_features, in_features)
    x = torch.randn(1, 1, in_features)
    if in_features > 32:
        x[..., :32] = 0  # a block of zeros among others
    y = torch.ops.torchchat.gemv(x, weight, scales)
    assert y.shape == (1, 1, out_features) and y.dtype == torch.float32
    ref = int8_blocks_reference(weight, scales, x)
    # measured at most 1.2e-7 of the largest output (float32 block sums, scale products and sums)
    torch.testing.assert_close(y.view(1, -1).double(), ref, rtol=0, atol=1e-6 * ref.abs().max().item())
    if out_features > 1:  # x to int16 with a scale a row: 3.6e-5 at most (measured; int8 blocks of 32: ~0.4%)
        exact = x.view(1, -1).double() @ dequantized_int8_blocks(weight, scales).T
        assert ((y.view(1, -1).double() - exact).norm() / exact.norm()).item() < 1e-4
    assert torch.equal(torch.ops.torchchat.gemv(torch.zeros(1, in_features), weight, scales),
                       torch.zeros(1, out_features))


def test_gemv_int8_blocks_keep_a_near_tie_that_int8_activation_blocks_flip():
    """Why the block form rounds x to int16 with a scale a row, not to int8 in blocks of 32 as llama.cpp does: a
    hidden state with an outlier channel (SmolLM2's last one has block maxima from 2 to 33) puts the other values of
    the outlier's block on a grid of 1/127 of the outlier, and an output layer's near-tie flips (SmolLM2's 'The'
    25.325 against 'L' 25.243 did). Two output rows equal but for block 0, where they differ along that grid's
    rounding error, and block 1's scale, set so that row 0 wins by half of what the rounding moves: int8 blocks
    (checked here in float64) pick row 1; the op must pick row 0, its margin within 1% of the exact one."""
    torch.manual_seed(0)
    x = torch.randn(576) * 0.5
    x[0] = 33.0  # block 0's int8 step: 33 / 127 = 0.26; the row's int16 step: 33 / 32767 = 0.001
    int8_error = int8_activation_blocks(x) - x.double()  # (in,)
    toward_error = torch.sign(int8_error[1:32]).to(torch.int8)  # (31,)
    weight = torch.randint(-127, 128, (2, 576), dtype=torch.int8)
    weight[1] = weight[0]
    weight[0, 1:32] = -32 * toward_error  # row 1 - row 0 in block 0: 64 along the error's sign
    weight[1, 1:32] = 32 * toward_error
    weight[:, 32:64] = (100 * torch.sign(x[32:64])).to(torch.int8)  # block 1: sum(weight * x) large and positive
    scales = torch.full((2, 18), 0.01).half()

    def row_1_minus_row_0(s, x_read):
        return (x_read @ dequantized_int8_blocks(weight, s).T).diff().item()

    shift = 0.01 * 64 * int8_error[1:32].abs().sum().item()  # what int8 blocks add to row 1 - row 0
    block_1 = 0.01 * (weight[0, 32:64].double() @ x[32:64].double()).item()
    scales[1, 1] = 0.01 * (1 - (row_1_minus_row_0(scales, x.double()) + shift / 2) / block_1)
    exact = row_1_minus_row_0(scales, x.double())
    assert -0.75 * shift < exact < -0.25 * shift  # row 0 wins (float16 moved the scale a little)
    assert row_1_minus_row_0(scales, int8_activation_blocks(x)) > 0.25 * shift  # int8 blocks flip it
    y = torch.ops.torchchat.gemv(x.view(1, -1), weight, scales)[0]  # (2,)
    assert y.argmax().item() == 0
    assert abs((y[1] - y[0]).item() - exact) < 0.01 * abs(exact)  # measured 0.19% of the margin


def test_gemv_int8_blocks_rows_equal_one_row_calls(two_threads):
    """1 to MAX_GEMV_ROWS rows of very different scales on 2 threads: each row bit-identical to its one-row call on
    1 thread. 352 inputs: a whole 8-block chunk and a partial one."""
    torch.manual_seed(0)
    weight, scales = random_int8_blocks(160, 352)  # 160 outputs: more than a thread's 64-row grain
    limit = cpu_kernels.kernels.MAX_GEMV_ROWS
    x = torch.randn(limit, 1, 352) * torch.logspace(-2, 2, limit).view(limit, 1, 1)
    batches = {rows: torch.ops.torchchat.gemv(x[:rows], weight, scales) for rows in range(1, limit + 1)}
    torch.set_num_threads(1)
    alone = [torch.ops.torchchat.gemv(x[r:r + 1], weight, scales) for r in range(limit)]
    for rows, y in batches.items():
        for r in range(rows):
            assert torch.equal(y[r:r + 1], alone[r]), f"row {r} of {rows}"


def test_gemv_int8_blocks_bad_input_is_a_clear_error():
    weight, scales = random_int8_blocks(8, 64)
    with pytest.raises(RuntimeError, match="block scales .* must be \\(8, 2\\) float16"):
        torch.ops.torchchat.gemv(torch.randn(1, 64), weight, scales[:, :1].contiguous())
    with pytest.raises(RuntimeError, match="must be \\(8, 1\\) float16"):
        torch.ops.torchchat.gemv(torch.randn(1, 48), weight[:, :48].contiguous(), scales[:, :1].contiguous())


def test_gemv_int4_bad_input_is_a_clear_error():
    layer = Int4Linear.from_linear(torch.nn.Linear(64, 16, bias=False), 32)
    with pytest.raises(RuntimeError, match="group_size \\(48\\) must be a multiple of 32"):
        torch.ops.torchchat.gemv_int4(torch.randn(1, 64), layer.packed, layer.scales_and_mins, 48)
    with pytest.raises(RuntimeError, match="rows of 64 values"):
        torch.ops.torchchat.gemv_int4(torch.randn(2, 32), layer.packed, layer.scales_and_mins, 32)
    with pytest.raises(RuntimeError, match="float16"):
        torch.ops.torchchat.gemv_int4(torch.randn(1, 64), layer.packed, layer.scales_and_mins.float(), 32)


def test_int4_linear_one_row_uses_the_kernel_and_traces(monkeypatch):
    torch.manual_seed(0)
    layer = Int4Linear.from_linear(torch.nn.Linear(128, 48, bias=False), 32)
    x = torch.randn(1, 1, 128)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x).view(1, -1).double(), int4_reference(layer, x), rtol=1e-5, atol=1e-5)
    calls = []
    real = torch.ops.torchchat.gemv_int4
    monkeypatch.setattr(torch.ops.torchchat, "gemv_int4", lambda *a: calls.append(a) or real(*a))
    layer(x)
    assert len(calls) == 1


# ----- batches: each row as if alone -----

@pytest.mark.parametrize("kind", ["GemvLinear", "Int8Linear", "Int8Linear-blocks", "Int4Linear"])
def test_linears_send_up_to_max_rows_to_the_op(kind, monkeypatch):
    """A decode step's sequences (up to MAX_GEMV_ROWS rows) go to the row kernels, one call for all of them; a
    longer input (a prompt) to torch's GEMMs."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=False)
    layer = {"GemvLinear": lambda: cpu_kernels.GemvLinear(linear.weight),
             "Int8Linear": lambda: Int8Linear.from_linear(linear),
             "Int8Linear-blocks": lambda: Int8Linear.from_linear(linear, blocks=True),
             "Int4Linear": lambda: Int4Linear.from_linear(linear, 32)}[kind]()
    op = "gemv_int4" if kind == "Int4Linear" else "gemv"
    calls = []
    real = getattr(torch.ops.torchchat, op)
    monkeypatch.setattr(torch.ops.torchchat, op, lambda *a: calls.append(a[0].shape) or real(*a))
    limit = cpu_kernels.kernels.MAX_GEMV_ROWS
    with torch.no_grad():
        for rows in (1, limit, limit + 1):
            assert layer(torch.randn(rows, 1, 64)).shape == (rows, 1, 48)
    assert calls == [(1, 1, 64), (limit, 1, 64)]


def one_op(kind: str, out_features: int):
    """(gemv call taking x, in_features) for a random weight of this kind. in_features cover every loop of the row
    kernels: float32/bfloat16 309 = 9 x 32 + 2 x 8 + 5 (the 32-wide loop, the 8-wide one, the scalar tail), int8 the
    same (a 256-input chunk, 32- and 16-wide steps, a scalar tail), 4-bit a whole 8-block chunk and a partial one."""
    if kind.startswith("int4"):
        group_size = 64 if kind.endswith("g64") else 32
        in_features = 384 if group_size == 64 else 352
        layer = Int4Linear.from_linear(torch.nn.Linear(in_features, out_features, bias=False), group_size)
        packed, scales_and_mins = layer.packed, layer.scales_and_mins
        return (lambda x: torch.ops.torchchat.gemv_int4(x, packed, scales_and_mins, group_size)), in_features
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}[kind]
    w = random_weight(out_features, 309, dtype)
    scale = torch.rand(out_features) if dtype is torch.int8 else None
    return (lambda x: torch.ops.torchchat.gemv(x, w, scale)), 309


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8", "int4", "int4-g64"])
def test_gemv_rows_equal_one_row_calls(kind, rows, two_threads):
    """Several rows (a decode step's sequences) read the weight once for all of them, and each row's output (on 2
    threads) is bit-identical to the one-row call on that row (on 1): its own int16/int8 rounding of x, its own
    accumulators. Rows of different scales, so that a rounding shared between rows shows."""
    torch.manual_seed(rows)
    op, in_features = one_op(kind, 160)  # 160 outputs: more than a thread's 64-row grain
    x = torch.randn(rows, 1, in_features) * torch.logspace(-2, 2, rows).view(rows, 1, 1)
    y = op(x)
    assert y.shape == (rows, 1, 160)
    torch.set_num_threads(1)  # and alone on one thread
    for r in range(rows):
        assert torch.equal(y[r], op(x[r:r + 1])[0]), f"row {r} of {rows}"


OPS = ("gemv", "gemv_int4", "dequantize_int4", "decode_attention", "decode_layers")


def plain_generator(source, monkeypatch):
    """A LocalGenerator built and run as with TORCHCHAT_CPU_KERNELS=0 (in this process, where the ops are
    loaded: ``available()`` is False, as the switch makes it): torch's modules only. The generator's
    ``complete`` runs with every op replaced by one that fails, so nothing can reach the kernels."""
    with monkeypatch.context() as m:
        m.setattr(cpu_kernels.kernels, "available", lambda: False)
        gen = local_generator(source)
    assert gen.model.decode_layers is None
    assert not any(isinstance(module, cpu_kernels.GemvLinear) for module in gen.model.modules())
    assert all(layer.attention.decode_attention is None for layer in gen.model.layers.values())

    def refuse(*args):
        raise AssertionError("a torchchat op was called with the kernels off")

    real_complete = gen.complete

    def complete(*args, **kwargs):
        with monkeypatch.context() as m:
            m.setattr(cpu_kernels.kernels, "available", lambda: False)
            for op in OPS:
                m.setattr(torch.ops.torchchat, op, refuse)
            return real_complete(*args, **kwargs)
    gen.complete = complete
    return gen


def test_decode_through_the_kernels_gives_the_same_greedy_tokens(tiny_model, monkeypatch):
    """LocalGenerator on CPU runs each batch-1 decode step through decode_layers (the blocks) and gemv (the
    output layer); built with the kernels off, it runs torch's modules. float32: the same greedy tokens (the
    logits differ by at most 6.7e-5 of the largest, the top two by at least 2.7e-3 over 40 steps: measured)."""
    gen = local_generator(tiny_source(tiny_model))
    calls = {op: 0 for op in OPS}
    for op in OPS:
        real = getattr(torch.ops.torchchat, op)
        monkeypatch.setattr(torch.ops.torchchat, op,
                            lambda *a, op=op, real=real: calls.__setitem__(op, calls[op] + 1) or real(*a))
    with_kernels = gen.complete(Turn(gen.encode_prompt("Once upon a time"), GREEDY))[0].tokens
    steps = GREEDY.max_new_tokens - 1  # the first token comes from prefill, its last position's logits from gemv
    assert calls == {"gemv": steps + 1, "gemv_int4": 0, "dequantize_int4": 0, "decode_attention": 0,
                     "decode_layers": steps}
    plain = plain_generator(tiny_source(tiny_model), monkeypatch)
    without = plain.complete(Turn(plain.encode_prompt("Once upon a time"), GREEDY))[0].tokens
    assert with_kernels == without and len(with_kernels) == GREEDY.max_new_tokens


def _available_in_subprocess(tmp_path, **env) -> subprocess.CompletedProcess:
    code = "from torchchat import cpu as cpu_kernels; print(cpu_kernels.available())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TORCHCHAT_CACHE": str(tmp_path), **env})


def test_built_once_into_the_cache(tmp_path):
    first = _available_in_subprocess(tmp_path)
    assert first.stdout.strip() == "True", first.stderr
    built = list(tmp_path.glob("kernels-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    assert _available_in_subprocess(tmp_path).stdout.strip() == "True"
    assert built[0].stat().st_mtime_ns == mtime and list(tmp_path.glob("*")) == built  # reused, no leftovers


def test_switched_off_by_the_environment(tmp_path):
    proc = _available_in_subprocess(tmp_path, TORCHCHAT_CPU_KERNELS="0")
    assert proc.stdout.strip() == "False" and not list(tmp_path.glob("*"))


def test_generate_with_the_kernels_switched_off(tiny_model, tmp_path):
    """TORCHCHAT_CPU_KERNELS=0 python torchchat.py generate: torch's modules only (its kernel cache, empty, stays
    empty: the library was neither built nor loaded) and, in float32, the text the kernels give in this process
    (test_decode_through_the_kernels_gives_the_same_greedy_tokens measures the margin)."""
    command = [sys.executable, str(ROOT / "torchchat.py"), "generate", *tiny_model.cli_flags(),
               "--prompt", "Once upon a time", "--max-new-tokens", "24", "--temperature", "0"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=ROOT,
                          env={**os.environ, "TORCHCHAT_CACHE": str(tmp_path), "TORCHCHAT_CPU_KERNELS": "0"})
    assert proc.returncode == 0, proc.stderr
    assert not list(tmp_path.iterdir()) and "building" not in proc.stderr
    gen = local_generator(tiny_source(tiny_model))
    assert isinstance(gen.model.decode_layers, cpu_kernels.FusedDecode)  # here, the kernels
    expected = gen.run_generate("Once upon a time", GenerationArgs(max_new_tokens=24, temperature=0))[0].text
    assert proc.stdout == "Once upon a time" + expected + "\n"


def test_without_a_compiler_falls_back_with_a_message(tmp_path):
    proc = _available_in_subprocess(tmp_path, CXX=str(tmp_path / "no-such-c++"))
    assert proc.returncode == 0 and proc.stdout.strip() == "False"
    assert "CPU decode kernels unavailable" in proc.stderr and "using torch's" in proc.stderr
