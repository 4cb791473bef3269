"""GGUF quantized blocks -> torchchat's quantized layouts, a chunk of rows at a time, never a float copy of a tensor.

The layouts (quantize.Int4Linear, quantize.Int8Linear), per row of ``in`` weights, in blocks of 32:
    int4: packed (out, in/2) uint8, byte j of a block holds q[j] (low nibble) and q[j+16] (high nibble), q in [0, 15];
          scales_and_mins (out, in/32, 2) float16; W = q * scale + min.
    int8: weight (out, in) int8, scales (out, in/32) float16; W = weight * scale.

How each GGUF type maps (llama.cpp's ggml-common.h block structs):
    Q4_0 (d, qs[16])          -> int4, scale d, min -8d: exact.
    Q4_1 (d, m, qs[16])       -> int4, scale d, min m: exact (the same bytes, de-interleaved).
    Q4_K (d, dmin, sc[12], qs[128]) per 256: 8 sub-blocks of 32, W = d*sc_i*q - dmin*m_i
                              -> int4, scale d*sc_i and min -dmin*m_i rounded to float16 (the only loss).
    Q8_0 (d, qs[32])          -> int8, exact.
    Q5_0 (d, qh[4], qs[16])   -> int8, weight q - 16, scale d: exact.
    Q5_1 (d, m, qh, qs), Q5_K (d, dmin, sc, qh, qs per 256): a min per block of 32, which int8 lacks;
    Q6_K (ql, qh, int8 sc[16], d per 256): a scale per 16 values, and a block of 32's two 6-bit sub-blocks share
    an exact float16 scale with int8 values in 1% of blocks (SmolLM2 Q6_K)
                              -> int8 re-quantized from their values (as gguf.quants.dequantize computes them), per
                                 block of 32: scale max|w| / 127 in float16, at most half an int8 step off.
Errors against gguf.quants.dequantize on SmolLM2's llama-quantize'd tensors, max (mean) |error| / the tensor's RMS:
Q4_K 0.019 (0.0005), Q5_1 0.19 (0.005), Q5_K 0.07 (0.005), Q6_K 0.12 (0.0045): the largest where one outlier
sets a block's int8 step, each a fraction of the type's own step (Q6_K: a quarter, 1/254 of max|w| against 1/64).
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QType

from torchchat.checkpoints.common import CheckpointError
from torchchat.checkpoints.gguf_reader import GGUFTensor

GROUP = 32  # the block of both our layouts
_CHUNK_VALUES = 1 << 20  # weights converted at once: 4 MB as float32, where a chunk is dequantized


def _torch_owned(shape: tuple[int, ...], dtype: torch.dtype) -> np.ndarray:
    """An uninitialized array in memory torch allocated (the numpy view of a torch tensor). Why: torch's CPU allocator
    aligns to 64 bytes and asks for transparent huge pages for large blocks; the same weights in numpy's memory
    made SmolLM2's 512-token prefill ~12% slower (0.76 s against 0.67 s, measured)."""
    return torch.empty(shape, dtype=dtype).numpy()


def layout(qtype: QType) -> str | None:
    """"int4" or "int8": the layout a tensor of this type loads into; None: not kept quantized (dequantized)."""
    if qtype in _INT4:
        return "int4"
    if qtype in _INT8:
        return "int8"
    return None


def to_int4(t: GGUFTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed (out, in/2) uint8, scales_and_mins (out, in/32, 2) float16) of a Q4_0, Q4_1 or Q4_K tensor."""
    convert = _converter(t, _INT4, "int4")
    rows, n = _rows_and_width(t)
    packed = _torch_owned((rows, n // 2), torch.uint8)
    scales_and_mins = _torch_owned((rows, n // GROUP, 2), torch.float16)
    with np.errstate(over="ignore"):  # a scale past float16: reported below, with the tensor's name
        for start, end, blocks in _row_chunks(t, rows, n):
            convert(blocks, packed[start:end], scales_and_mins[start:end])
    _check_finite(t, scales_and_mins)
    return torch.from_numpy(packed), torch.from_numpy(scales_and_mins)


def to_int8(t: GGUFTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (out, in) int8, scales (out, in/32) float16) of a Q8_0, Q5_0, Q5_1, Q5_K or Q6_K tensor."""
    convert = _converter(t, _INT8, "int8")
    rows, n = _rows_and_width(t)
    weight = _torch_owned((rows, n), torch.int8)
    scales = _torch_owned((rows, n // GROUP), torch.float16)
    with np.errstate(over="ignore"):
        for start, end, blocks in _row_chunks(t, rows, n):
            convert(blocks, weight[start:end], scales[start:end])
    _check_finite(t, scales)
    return torch.from_numpy(weight), torch.from_numpy(scales)


# --- int4 -------------------------------------------------------------------------------------------------------
# Each converter takes a chunk's blocks (rows, blocks per row, bytes per block) and fills the chunk's outputs.

def _q4_0_to_int4(blocks: np.ndarray, packed: np.ndarray, scales_and_mins: np.ndarray) -> None:
    d = blocks[..., 0:2].view(np.float16)[..., 0]  # (rows, n_blocks)
    scales_and_mins[..., 0] = d
    scales_and_mins[..., 1] = d * np.float16(-8)  # exact in float16 (a power of two) unless |d| > 8188
    packed[...] = blocks[..., 2:18].reshape(packed.shape)  # (rows, n_blocks * 16): already our nibble order


def _q4_1_to_int4(blocks: np.ndarray, packed: np.ndarray, scales_and_mins: np.ndarray) -> None:
    scales_and_mins[...] = blocks[..., 0:4].view(np.float16).reshape(scales_and_mins.shape)  # (d, m) per block
    packed[...] = blocks[..., 4:20].reshape(packed.shape)


def _q4_k_to_int4(blocks: np.ndarray, packed: np.ndarray, scales_and_mins: np.ndarray) -> None:
    rows, n_blocks, _ = blocks.shape
    d = blocks[..., 0:2].view(np.float16).astype(np.float32)  # (rows, n_blocks, 1)
    dmin = blocks[..., 2:4].view(np.float16).astype(np.float32)
    sc, m = _k_scales_and_mins(blocks[..., 4:16])  # (rows, n_blocks, 8) each
    sm = scales_and_mins.reshape(rows, n_blocks, 8, 2)
    sm[..., 0] = d * sc  # exact in float32 (11 x 6 bits), rounded to float16 here
    sm[..., 1] = -(dmin * m)
    # qs: 4 groups of 32 bytes; group i holds sub-block 2i in its low nibbles and 2i+1 in its high nibbles, value j
    # of a sub-block in byte j. Ours: byte j of a sub-block holds its values j and j + 16.
    qs = blocks[..., 16:144].reshape(rows, n_blocks, 4, 2, 16)  # (rows, n_blocks, group, half, 16)
    first, second = qs[..., 0, :], qs[..., 1, :]  # values 0..15 and 16..31 of both sub-blocks of a group
    out = packed.reshape(rows, n_blocks, 4, 2, 16)  # (rows, n_blocks, group, sub-block of the group, 16)
    out[..., 0, :] = (first & 0x0F) | (second << 4)
    out[..., 1, :] = (first >> 4) | (second & 0xF0)


def _k_scales_and_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins of a Q4_K/Q5_K block, as llama.cpp's get_scale_min_k4, in float32.
    packed (rows, n_blocks, 12) bytes: 0-3 low 6 bits of scales 0-3 (high 2 bits: scales 4-7's top bits), 4-7
    the same for mins, 8-11 low nibble scales 4-7, high nibble mins 4-7."""
    q = packed.reshape(*packed.shape[:-1], 3, 4)  # (rows, n_blocks, 3, 4)
    d, m, md = q[..., 0, :], q[..., 1, :], q[..., 2, :]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)  # (rows, n_blocks, 8)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


# --- int8 -------------------------------------------------------------------------------------------------------

def _q8_0_to_int8(blocks: np.ndarray, weight: np.ndarray, scales: np.ndarray) -> None:
    scales[...] = blocks[..., 0:2].view(np.float16)[..., 0]
    weight[...] = blocks[..., 2:34].view(np.int8).reshape(weight.shape)


def _q5_0_to_int8(blocks: np.ndarray, weight: np.ndarray, scales: np.ndarray) -> None:
    scales[...] = blocks[..., 0:2].view(np.float16)[..., 0]
    weight[...] = _five_bit_values(blocks[..., 2:6], blocks[..., 6:22]).reshape(weight.shape)
    weight -= 16


def _five_bit_values(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """(rows, n_blocks, 32) uint8 values of Q5_0/Q5_1 blocks: value j's low 4 bits in byte j % 16 of qs (j < 16:
    low nibble, else high), its 5th bit in bit j of qh (4 bytes, little-endian)."""
    high = np.unpackbits(qh, axis=-1, bitorder="little") << 4  # (rows, n_blocks, 32)
    high[..., :16] |= qs & 0x0F
    high[..., 16:] |= qs >> 4
    return high


# Q5_1, Q5_K and Q6_K: each gives its values as q * a + b, q an integer (rows, sub-blocks, values per sub-block),
# a and b (rows, sub-blocks) float32, computed as gguf.quants.dequantize computes them (the same float32 values).

def _q5_1_levels(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    d_m = blocks[..., 0:4].view(np.float16).astype(np.float32)  # (rows, n_blocks, 2)
    return _five_bit_values(blocks[..., 4:8], blocks[..., 8:24]), d_m[..., 0], d_m[..., 1]


def _q5_k_levels(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    rows, n_blocks, _ = blocks.shape
    d = blocks[..., 0:2].view(np.float16).astype(np.float32)  # (rows, n_blocks, 1)
    dmin = blocks[..., 2:4].view(np.float16).astype(np.float32)
    sc, m = _k_scales_and_mins(blocks[..., 4:16])  # (rows, n_blocks, 8)
    # Sub-block i: its low 4 bits in the low (i even) or high (i odd) nibbles of qs group i // 2 (32 bytes), its
    # 5th bit in bit i of each of the 32 bytes of qh.
    qh = blocks[..., 16:48].reshape(rows, n_blocks, 1, 32) >> np.arange(8, dtype=np.uint8)[:, None]  # (.., 8, 32)
    qs = blocks[..., 48:176].reshape(rows, n_blocks, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8)[:, None]
    q = (qs.reshape(rows, n_blocks, 8, 32) & 0x0F) | ((qh & 1) << 4)  # (rows, n_blocks, 8, 32)
    return q.reshape(rows, -1, 32), (d * sc).reshape(rows, -1), (-(dmin * m)).reshape(rows, -1)


def _q6_k_levels(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    rows, n_blocks, _ = blocks.shape
    # Two halves of 128 values; in half h, value 32k + l (k < 4) has its low 4 bits in ql[64h + l + 32 (k odd)]'s
    # low (k < 2) or high nibble, its top 2 bits in bits 2k, 2k+1 of qh[32h + l]; a signed 8-bit scale per 16.
    ql = blocks[..., 0:128].reshape(rows, n_blocks, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8)[:, None]
    qh = blocks[..., 128:192].reshape(rows, n_blocks, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]
    q = (ql.reshape(rows, n_blocks, 8, 32) & 0x0F) | ((qh.reshape(rows, n_blocks, 8, 32) & 3) << 4)
    q = q.view(np.int8) - np.int8(32)  # (rows, n_blocks, 8, 32) in [-32, 31]
    d = blocks[..., 208:210].view(np.float16).astype(np.float32)  # (rows, n_blocks, 1)
    a = d * blocks[..., 192:208].view(np.int8).astype(np.float32)  # (rows, n_blocks, 16)
    return q.reshape(rows, -1, 16), a.reshape(rows, -1), None


def _requantized_to_int8(levels: Callable) -> Callable[[np.ndarray, np.ndarray, np.ndarray], None]:
    """A converter that re-quantizes a type's values to int8 per block of 32, scale = max|w| / 127 in float16.
    In numpy, in place: as fast as torch on one thread (~140M values/s here), and torch's threads on a busy machine
    were 5-15x slower."""
    def convert(blocks: np.ndarray, weight: np.ndarray, scales: np.ndarray) -> None:
        rows = blocks.shape[0]
        q, a, b = levels(blocks)
        values = q.astype(np.float32)  # (rows, sub-blocks, values per sub-block)
        values *= a[..., None]
        if b is not None:
            values += b[..., None]
        values = values.reshape(rows, -1, GROUP)  # (rows, n / 32, 32)
        scale = (np.abs(values).max(axis=-1) / np.float32(127)).astype(np.float16)  # (rows, n / 32)
        scales[...] = scale
        step = scale.astype(np.float32)[..., None]
        step[step == 0] = 1  # an all-zero block (or one below float16's range): round(w / 1) = 0
        values /= step
        np.rint(values, out=values)
        np.clip(values, -127, 127, out=values)  # the float16 scale may round below max|w| / 127
        weight[...] = values.reshape(weight.shape)
    return convert


_INT4 = {QType.Q4_0: _q4_0_to_int4, QType.Q4_1: _q4_1_to_int4, QType.Q4_K: _q4_k_to_int4}
_INT8 = {QType.Q8_0: _q8_0_to_int8, QType.Q5_0: _q5_0_to_int8,
         QType.Q5_1: _requantized_to_int8(_q5_1_levels), QType.Q5_K: _requantized_to_int8(_q5_k_levels),
         QType.Q6_K: _requantized_to_int8(_q6_k_levels)}


# --- shared -----------------------------------------------------------------------------------------------------

def _converter(t: GGUFTensor, table: dict, name: str) -> Callable:
    if t.tensor_type not in table:
        raise ValueError(f"tensor {t.name} is of type {t.tensor_type.name}, which has no {name} layout "
                         f"(layout() says which types have one)")
    return table[t.tensor_type]


def _rows_and_width(t: GGUFTensor) -> tuple[int, int]:
    """(rows, values per row) of a tensor, checked against its block size and its data."""
    block_size, type_size = GGML_QUANT_SIZES[t.tensor_type]
    n = int(t.shape[0])
    rows = int(np.prod(t.shape[1:], dtype=np.int64))
    for size, what in ((block_size, f"{t.tensor_type.name}'s block size"), (GROUP, "torchchat's group size")):
        if n % size:
            raise CheckpointError(f"tensor {t.name}: its rows of {n} values are not a multiple of {what} ({size}); "
                                  f"the file is damaged or was written by a broken tool: re-convert the model")
    if t.data.size != rows * (n // block_size) * type_size:
        raise CheckpointError(f"tensor {t.name}: {t.data.size} bytes for {rows} rows of {n} {t.tensor_type.name} "
                              f"values ({rows * (n // block_size) * type_size} expected): re-convert the model")
    return rows, n


def _row_chunks(t: GGUFTensor, rows: int, n: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(start, end, blocks (end - start, blocks per row, bytes per block)) over the rows of a tensor."""
    block_size, type_size = GGML_QUANT_SIZES[t.tensor_type]
    blocks = t.data.reshape(rows, n // block_size, type_size)  # a view of the memory map
    step = max(1, _CHUNK_VALUES // n)
    for start in range(0, rows, step):
        end = min(rows, start + step)
        yield start, end, blocks[start:end]


def _check_finite(t: GGUFTensor, scales: np.ndarray) -> None:
    """A scale computed here can overflow float16 where the file's own fields stay finite (Q4_0's min, -8d, past
    |d| = 8188; Q4_K's d * sc; a re-quantized block's max|w| / 127): no real model's weights come near that, a
    damaged file can."""
    if not np.isfinite(scales).all():
        raise CheckpointError(f"tensor {t.name}: its {t.tensor_type.name} scales do not fit in float16 "
                              f"(|scale| > 65504): the file is damaged")

