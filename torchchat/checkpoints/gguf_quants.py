"""GGUF quantized blocks -> torchchat's quantized layouts, a chunk of rows at a time, never a float copy of a tensor.

The layouts (quantize.Int4Linear, quantize.Int8Linear), per row of ``in`` weights, in blocks of 32:
    int4: packed (out, in/2) uint8, byte j of a block holds q[j] (low nibble) and q[j+16] (high nibble), q in [0, 15];
          scales_and_mins (out, in/32, 2) float16; W = q * scale + min.
    int8: weight (out, in) int8, scales (out, in/32) float16; W = weight * scale.

How each GGUF type maps (llama.cpp's ggml-common.h block structs):
    Q4_0 (d, qs[16])          -> int4, scale d, min -8d: exact.
    Q4_1 (d, m, qs[16])       -> int4, scale d, min m: exact (the same bytes, de-interleaved).
    Q8_0 (d, qs[32])          -> int8, exact.
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


def layout(qtype: QType) -> str | None:
    """"int4" or "int8": the layout a tensor of this type loads into; None: not kept quantized (dequantized)."""
    if qtype in _INT4:
        return "int4"
    if qtype in _INT8:
        return "int8"
    return None


def to_int4(t: GGUFTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed (out, in/2) uint8, scales_and_mins (out, in/32, 2) float16) of a Q4_0 or Q4_1 tensor."""
    convert = _converter(t, _INT4, "int4")
    rows, n = _rows_and_width(t)
    packed = np.empty((rows, n // 2), dtype=np.uint8)
    scales_and_mins = np.empty((rows, n // GROUP, 2), dtype=np.float16)
    with np.errstate(over="ignore"):  # a scale past float16: reported below, with the tensor's name
        for start, end, blocks in _row_chunks(t, rows, n):
            convert(blocks, packed[start:end], scales_and_mins[start:end])
    _check_finite(t, scales_and_mins)
    return torch.from_numpy(packed), torch.from_numpy(scales_and_mins)


def to_int8(t: GGUFTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (out, in) int8, scales (out, in/32) float16) of a Q8_0 tensor."""
    convert = _converter(t, _INT8, "int8")
    rows, n = _rows_and_width(t)
    weight = np.empty((rows, n), dtype=np.int8)
    scales = np.empty((rows, n // GROUP), dtype=np.float16)
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


# --- int8 -------------------------------------------------------------------------------------------------------

def _q8_0_to_int8(blocks: np.ndarray, weight: np.ndarray, scales: np.ndarray) -> None:
    scales[...] = blocks[..., 0:2].view(np.float16)[..., 0]
    weight[...] = blocks[..., 2:34].view(np.int8).reshape(weight.shape)


_INT4 = {QType.Q4_0: _q4_0_to_int4, QType.Q4_1: _q4_1_to_int4}
_INT8 = {QType.Q8_0: _q8_0_to_int8}


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
    |d| = 8188): no real model's weights come near that, a damaged file can."""
    if not np.isfinite(scales).all():
        raise CheckpointError(f"tensor {t.name}: its {t.tensor_type.name} scales do not fit in float16 "
                              f"(|scale| > 65504): the file is damaged")

