"""GGUF quantized tensors -> torchchat's int4/int8 layouts (torchchat/checkpoints/gguf_quants.py), each compared,
unpacked as the layers unpack it, with gguf's own dequantization of the same bytes: equal where the mapping is
exact (Q4_0, Q4_1, Q8_0, Q5_0), within a derived bound where a scale is rounded (Q4_K) or a block re-quantized
(Q5_1, Q5_K, Q6_K).

Two kinds of input per type: random blocks (random bytes, the float16 fields replaced by random finite float16
values, subnormals included) and real-looking ones (gguf.quants.quantize of normal weights, where gguf 0.19
quantizes the type: not the K-quants; the report of the commit that added them has their errors on real files
made by llama-quantize)."""

import warnings

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QType

from torchchat.checkpoints import gguf_quants
from torchchat.checkpoints.common import CheckpointError
from torchchat.checkpoints.gguf_reader import GGUFTensor

# Byte offsets of each type's float16 fields within its block (llama.cpp's ggml-common.h).
FLOAT16_FIELDS = {QType.Q4_0: (0,), QType.Q4_1: (0, 2), QType.Q8_0: (0,), QType.Q5_0: (0,), QType.Q5_1: (0, 2),
                  QType.Q4_K: (0, 2), QType.Q5_K: (0, 2), QType.Q6_K: (208,)}
ROWS, WIDTH = 6, 512  # two blocks of 256 a row for the K-quants; 16 of 32 for the others


def random_float16(rng, size, max_exponent=30) -> np.ndarray:
    """Finite float16 values of every sign and magnitude: random sign, exponent field in [0, max_exponent]
    (0: zero and subnormals; 30: up to 65504), random mantissa."""
    sign = rng.integers(0, 2, size, dtype=np.uint16) << 15
    exponent = rng.integers(0, max_exponent + 1, size, dtype=np.uint16) << 10
    mantissa = rng.integers(0, 1 << 10, size, dtype=np.uint16)
    return (sign | exponent | mantissa).view(np.float16)


def random_tensor(qtype, rng, rows=ROWS, width=WIDTH, max_exponent=30, name="blk.0.attn_q.weight") -> GGUFTensor:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows, width // block_size, type_size), dtype=np.uint8)
    for offset in FLOAT16_FIELDS[qtype]:
        blocks[..., offset:offset + 2] = random_float16(rng, blocks.shape[:2] + (1,), max_exponent).view(np.uint8)
    return as_tensor(qtype, blocks.reshape(rows, -1), width, name)


def quantized_tensor(qtype, rng, rows=ROWS, width=WIDTH) -> GGUFTensor:
    """Weights as a model has them (normal, std 0.02), quantized by gguf."""
    weights = (rng.standard_normal((rows, width)) * 0.02).astype(np.float32)
    return as_tensor(qtype, gguf.quants.quantize(weights, qtype), width, "blk.0.ffn_down.weight")


def as_tensor(qtype, data: np.ndarray, width: int, name: str) -> GGUFTensor:
    data = np.ascontiguousarray(data)
    data.setflags(write=False)  # as the memory map is: the converters must not write to it
    return GGUFTensor(name, qtype, (width, *reversed(data.shape[:-1])), data)


def reference(t: GGUFTensor) -> torch.Tensor:
    rows = int(np.prod(t.shape[1:]))
    return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(rows, t.shape[0])


def int4_weights(packed: torch.Tensor, scales_and_mins: torch.Tensor) -> torch.Tensor:
    """W of the int4 layout, as quantize.Int4Linear.dequantize computes it in torch."""
    blocks = packed.view(packed.size(0), -1, 16)  # (rows, in / 32, 16)
    q = torch.cat([blocks & 15, blocks >> 4], dim=-1).float()  # (rows, in / 32, 32)
    sm = scales_and_mins.float()  # (rows, in / 32, 2)
    return (q * sm[..., :1] + sm[..., 1:]).view(packed.size(0), -1)  # (rows, in)


def int8_weights(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W of the int8 layout: weight * the scale of its block of 32."""
    blocks = weight.view(weight.size(0), -1, 32).float()  # (rows, in / 32, 32)
    return (blocks * scales.float()[..., None]).view(weight.size(0), -1)  # (rows, in)


def convert(t: GGUFTensor) -> torch.Tensor:
    """The tensor through our layout and back to float32, with the layout's types and shapes checked."""
    rows, width = int(np.prod(t.shape[1:])), t.shape[0]
    if gguf_quants.layout(t.tensor_type) == "int4":
        packed, scales_and_mins = gguf_quants.to_int4(t)
        assert packed.dtype == torch.uint8 and packed.shape == (rows, width // 2) and packed.is_contiguous()
        assert scales_and_mins.dtype == torch.float16 and scales_and_mins.shape == (rows, width // 32, 2)
        assert scales_and_mins.is_contiguous()
        return int4_weights(packed, scales_and_mins)
    weight, scales = gguf_quants.to_int8(t)
    assert weight.dtype == torch.int8 and weight.shape == (rows, width) and weight.is_contiguous()
    assert scales.dtype == torch.float16 and scales.shape == (rows, width // 32) and scales.is_contiguous()
    return int8_weights(weight, scales)


EXACT = [QType.Q4_0, QType.Q4_1, QType.Q8_0, QType.Q5_0]
REQUANTIZED = [QType.Q5_1, QType.Q5_K, QType.Q6_K]
ALL = [*EXACT, QType.Q4_K, *REQUANTIZED]
# Random scales up to 2^(20 - 15) x 2: a K-quant's products (d x 63 x 31) stay within float16.
K_MAX_EXPONENT = 20


@pytest.mark.parametrize("qtype", EXACT, ids=lambda q: q.name)
def test_exact_types_equal_gguf_on_random_blocks(qtype):
    rng = np.random.default_rng(int(qtype))
    # Q4_0's min is -8d: past |d| = 8188 (exponent field 27) it overflows float16 (tested below).
    t = random_tensor(qtype, rng, max_exponent=27 if qtype == QType.Q4_0 else 30)
    assert torch.equal(convert(t), reference(t))


@pytest.mark.parametrize("qtype", EXACT, ids=lambda q: q.name)
def test_exact_types_equal_gguf_on_quantized_weights(qtype):
    t = quantized_tensor(qtype, np.random.default_rng(int(qtype)))
    assert torch.equal(convert(t), reference(t))


def test_q4_k_is_within_the_float16_rounding_of_its_scales():
    """Q4_K -> int4 loses only the rounding of each sub-block's scale d * sc and min -dmin * m (exact in float32) to
    float16: at most 2^-11 of each (2^-25 below float16's normal range), times q <= 15 for the scale.
    Measured here: 0.94 of that bound at most."""
    t = random_tensor(QType.Q4_K, np.random.default_rng(3), max_exponent=K_MAX_EXPONENT)
    packed, scales_and_mins = gguf_quants.to_int4(t)
    sm = scales_and_mins.double().abs()  # (rows, in / 32, 2)
    rounding = torch.clamp(sm * 2 ** -11, min=2 ** -25)  # of the float16 values, a bound on the originals' too
    per_group = 15 * rounding[..., 0] + rounding[..., 1] + (15 * sm[..., 0] + sm[..., 1]) * 2 ** -22  # float32 ops
    bound = per_group.repeat_interleave(32, dim=1)  # (rows, in)
    error = (int4_weights(packed, scales_and_mins).double() - reference(t).double()).abs()
    assert (error <= bound).all(), (error / bound).max().item()
    assert error.max() > 0  # the rounding happens: this test would see a wrong bound


def requantization_bound(ref: torch.Tensor) -> torch.Tensor:
    """|error| of re-quantizing each block of 32 to int8 with scale s = max|w| / 127 rounded to float16 (by e, at
    most 2^-11 s, or 2^-25 below float16's normal range): half a step of the rounded scale, (s + e) / 2, or, for a
    value clipped at 127 where the scale rounded down, 127 e; plus float32's rounding."""
    amax = ref.double().abs().view(ref.size(0), -1, 32).amax(dim=-1)  # (rows, in / 32)
    s = amax / 127
    e = torch.clamp(s * 2 ** -11, min=2 ** -25)
    return (torch.maximum((s + e) / 2, 127 * e) + amax * 2 ** -22).repeat_interleave(32, dim=1)  # (rows, in)


@pytest.mark.parametrize("qtype", REQUANTIZED, ids=lambda q: q.name)
def test_requantized_types_are_within_half_a_step_of_gguf(qtype):
    """Measured: 0.998-0.9996 of the bound at most (a scale /126 instead of /127 goes past it). Row 0 starts with
    a block of zeros (zeros again, with a zero scale), row 1 with a block of the tiniest scales (2^-24): its int8
    scale may fall below float16's range."""
    t = random_tensor(qtype, np.random.default_rng(int(qtype)), max_exponent=K_MAX_EXPONENT)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = np.array(t.data).reshape(ROWS, -1, type_size)
    for offset in FLOAT16_FIELDS[qtype]:
        blocks[0, 0, offset:offset + 2] = np.array([0], dtype=np.float16).view(np.uint8)
        blocks[1, 0, offset:offset + 2] = np.array([2 ** -24], dtype=np.float16).view(np.uint8)
    t = as_tensor(qtype, blocks.reshape(ROWS, -1), WIDTH, t.name)
    ref = reference(t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division by zero on the way
        weight, scales = gguf_quants.to_int8(t)
    assert not weight[0, :block_size].any() and not scales[0, :block_size // 32].any()
    error = (int8_weights(weight, scales).double() - ref.double()).abs()
    assert (error <= requantization_bound(ref)).all()


def test_requantized_q5_1_weights_stay_close():
    """Q5_1 re-quantized to int8, on weights as gguf quantizes them (normal, std 0.02): measured 0.0162 of the RMS at
    most, 0.0045 of it on average (Q5_1's own error from the weights is ~8x that), 0.9996 of the per-block bound."""
    t = quantized_tensor(QType.Q5_1, np.random.default_rng(5), rows=64, width=1024)
    ref = reference(t)
    error = (convert(t) - ref).abs()
    rms = ref.pow(2).mean().sqrt()
    assert error.max() <= 0.018 * rms and error.mean() <= 0.005 * rms
    assert (error <= requantization_bound(ref)).all()


def test_layouts():
    assert [gguf_quants.layout(q) for q in ALL] == ["int4", "int4", "int8", "int8", "int4", "int8", "int8", "int8"]
    assert [gguf_quants.layout(q) for q in (QType.F32, QType.F16, QType.BF16, QType.Q2_K)] == [None] * 4


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_rows_are_converted_in_chunks(qtype, monkeypatch):
    """A tensor larger than a chunk (here 5 rows of 512 values a chunk, 13 rows of 3 x 13 in a 3-d tensor) gives
    what it gives in one chunk."""
    t = random_tensor(qtype, np.random.default_rng(7), rows=39, max_exponent=20)
    t = t._replace(shape=(WIDTH, 13, 3))
    whole = convert(t)
    monkeypatch.setattr(gguf_quants, "_CHUNK_VALUES", 5 * WIDTH + 1)
    assert torch.equal(convert(t), whole)
    if qtype in EXACT:
        assert torch.equal(whole, reference(t))


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_a_row_off_the_block_size_names_the_tensor(qtype):
    t = random_tensor(qtype, np.random.default_rng(0), max_exponent=K_MAX_EXPONENT, name="blk.3.ffn_up.weight")
    with pytest.raises(CheckpointError, match=r"blk\.3\.ffn_up\.weight.*not a multiple"):
        convert(t._replace(shape=(WIDTH - 16, ROWS)))  # its bytes still hold WIDTH values a row
    block_size = GGML_QUANT_SIZES[qtype][0]
    with pytest.raises(CheckpointError, match=r"blk\.3\.ffn_up\.weight.*bytes"):
        convert(t._replace(shape=(WIDTH - block_size, ROWS)))  # whole blocks, but not what the data holds


@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q4_K, QType.Q6_K], ids=lambda q: q.name)
def test_a_scale_past_float16_names_the_tensor(qtype):
    """A scale we compute can overflow float16 where the file's are finite: Q4_0's min -8d for |d| > 8188, Q4_K's
    d * sc, a re-quantized block's max|w| / 127. An error, not a row of infinities."""
    t = random_tensor(qtype, np.random.default_rng(0), max_exponent=K_MAX_EXPONENT, name="output.weight")
    type_size = GGML_QUANT_SIZES[qtype][1]
    blocks = np.array(t.data).reshape(ROWS, -1, type_size)
    offset = FLOAT16_FIELDS[qtype][0]
    blocks[2, 1, offset:offset + 2] = np.array([60000], dtype=np.float16).view(np.uint8)
    with pytest.raises(CheckpointError, match=r"output\.weight.*float16"):
        convert(as_tensor(qtype, blocks.reshape(ROWS, -1), WIDTH, "output.weight"))


def test_a_type_without_a_layout_is_refused():
    t = random_tensor(QType.Q8_0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="no int4 layout"):
        gguf_quants.to_int4(t)
