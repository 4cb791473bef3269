"""GGUF quantized tensors -> torchchat's int4/int8 layouts (torchchat/checkpoints/gguf_quants.py), each compared,
unpacked as the layers unpack it, with gguf's own dequantization of the same bytes: equal where the mapping is
exact (Q4_0, Q4_1, Q8_0), within a derived bound where a scale is rounded or a block re-quantized.

Two kinds of input per type: random blocks (random bytes, the float16 fields replaced by random finite float16
values, subnormals included) and real-looking ones (gguf.quants.quantize of normal weights, where gguf 0.19
quantizes the type)."""

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
FLOAT16_FIELDS = {QType.Q4_0: (0,), QType.Q4_1: (0, 2), QType.Q8_0: (0,)}
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


EXACT = [QType.Q4_0, QType.Q4_1, QType.Q8_0]


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


def test_layouts():
    assert [gguf_quants.layout(q) for q in (QType.Q4_0, QType.Q4_1, QType.Q8_0)] == ["int4", "int4", "int8"]
    assert [gguf_quants.layout(q) for q in (QType.F32, QType.F16, QType.BF16, QType.Q2_K)] == [None] * 4


@pytest.mark.parametrize("qtype", EXACT, ids=lambda q: q.name)
def test_rows_are_converted_in_chunks(qtype, monkeypatch):
    """A tensor larger than a chunk (here 5 rows of 512 values a chunk, 13 rows of 3 x 13 in a 3-d tensor) gives
    what it gives in one chunk."""
    t = random_tensor(qtype, np.random.default_rng(7), rows=39, max_exponent=20)
    t = t._replace(shape=(WIDTH, 13, 3))
    whole = convert(t)
    monkeypatch.setattr(gguf_quants, "_CHUNK_VALUES", 5 * WIDTH + 1)
    assert torch.equal(convert(t), whole)
    assert torch.equal(whole, reference(t))


@pytest.mark.parametrize("qtype", EXACT, ids=lambda q: q.name)
def test_a_row_off_the_block_size_names_the_tensor(qtype):
    t = random_tensor(qtype, np.random.default_rng(0), name="blk.3.ffn_up.weight")
    with pytest.raises(CheckpointError, match=r"blk\.3\.ffn_up\.weight.*not a multiple"):
        convert(t._replace(shape=(WIDTH - 16, ROWS)))  # its bytes still hold WIDTH values a row
    with pytest.raises(CheckpointError, match=r"blk\.3\.ffn_up\.weight.*bytes"):
        convert(t._replace(shape=(WIDTH - 32, ROWS)))  # a whole number of blocks, but not what the data holds


def test_a_scale_past_float16_names_the_tensor():
    """Q4_0's min, -8d, overflows float16 for |d| > 8188: an error, not a row of infinities."""
    t = random_tensor(QType.Q4_0, np.random.default_rng(0), max_exponent=20, name="output.weight")
    blocks = np.array(t.data).reshape(ROWS, -1, 18)
    blocks[2, 3, 0:2] = np.array([10000], dtype=np.float16).view(np.uint8)
    with pytest.raises(CheckpointError, match=r"output\.weight.*float16"):
        convert(as_tensor(QType.Q4_0, blocks.reshape(ROWS, -1), WIDTH, "output.weight"))


def test_a_type_without_a_layout_is_refused():
    t = random_tensor(QType.Q8_0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="no int4 layout"):
        gguf_quants.to_int4(t)
