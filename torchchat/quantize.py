"""Weight-only int8 and int4 quantization of the linear layers, through CPU kernels (torchchat's
gemv ops for decode steps, PyTorch's where those are unavailable).

``quantize_model(model, "int8" | "int4")`` replaces, in place, every ``nn.Linear`` whose shape the
kernel supports with a quantized linear; activations, norms and attention keep the model's dtype.
A decode step reads every weight once per step, so fewer weight bytes are fewer bytes to
stream from memory:

- int8: one float32 scale per output row (symmetric). 1 byte per weight. An input of a few rows (a decode
  step's sequences, up to ``kernels.MAX_GEMV_ROWS``) goes to ``torch.ops.torchchat.gemv`` (see torchchat.cpu), in
  float32; without it, to ``aten._weight_int8pack_mm``. ``Int8Linear`` also takes llama.cpp's Q8_0 layout, a
  float16 scale a block of 32 inputs (a GGUF's Q8_0 tensors, run as they are: the op rounds each row of the
  activations to int16 with one scale, as for a scale a row, where llama.cpp rounds them to int8 in blocks of 32,
  too coarse for an output layer's near-ties: see torchchat/csrc/gemv_rows.h), and ``Int8Embedding`` holds an
  embedding table in it, with the output layer tied to it over the same buffers (``Int8Linear.tied_to``).
- int4: groups of ``group_size`` weights along the input dimension share a scale and a min
  (asymmetric, min-max; llama.cpp's Q4_1 with groups of 32), float16 scales and mins: 0.625 bytes a
  weight. ``Int4Linear`` sends an input of a few rows to ``torch.ops.torchchat.gemv_int4``, which rounds the
  activations to int8 in blocks of 32 for integer dot products (as llama.cpp does; ~0.5% error a
  product). Without the op, ``Int4PackedLinear`` holds the same grid for ``aten._weight_int4pack_mm_for_cpu``.

The aten kernels are fast only with bfloat16 activations on AVX2 machines (their float32 path is
scalar, about 10x slower), so those calls compute in bfloat16 and cast back. A quantized linear
given a long input (a prompt) dequantizes a slice of rows at a time and uses a float32 GEMM
instead, which is faster (see ``_PREFILL_ROWS``; Int4Linear does so for any input of several rows).
The output layer is int8 under both schemes (see ``INT8_ONLY``); when it is tied to the
embedding (SmolLM2, Llama 3.2) it is quantized on its own, and the embedding table, read one row
per token, stays as it is.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from torchchat.cpu import kernels as cpu_kernels
from torchchat.cpu.decode import GemvLinear
from torchchat.errors import ConfigError

SCHEMES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts
DEFAULT_INT4_GROUP_SIZE = 32  # llama.cpp's Q4_1 block: SmolLM2's GGUF weights are re-quantized losslessly
# The output layer (hidden -> vocabulary logits) decides every greedy token: int4 there flips SmolLM2's
# first answer token, so "int4" quantizes it to int8 (llama.cpp's Q4 files also keep it at 6-8 bits).
INT8_ONLY = frozenset({"output"})
_COMPUTE_DTYPE = torch.bfloat16  # the kernels' fast path
# Inputs with at least this many rows (prompt tokens x batch) dequantize the weight and use a float32
# matmul: the weight-only kernels are made for matrix-vector products and are ~2x slower than MKL's
# GEMM on a 512-token prompt, while dequantizing costs one pass over the weight.
_PREFILL_ROWS = 32
_FLOAT_LINEARS = (nn.Linear, GemvLinear)  # what quantize_model replaces


INT8_BLOCK = 32  # inputs a block scale covers in Int8Linear's block form (llama.cpp's Q8_0)


def int8_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (rows, cols) in int8 blocks of INT8_BLOCK along a row, as llama.cpp's Q8_0 quantizes: a scale a block
    d = max|w| / 127 (float16), q = round(w / d). Returns q (rows, cols) int8 and d (rows, cols / 32) float16."""
    rows, cols = w.shape
    blocks = w.detach().float().reshape(rows, cols // INT8_BLOCK, INT8_BLOCK)  # (rows, n_blocks, 32)
    scales = (blocks.abs().amax(dim=-1) / 127).half()  # (rows, n_blocks)
    inverse = torch.where(scales > 0, 1 / scales.float(), torch.zeros_like(scales, dtype=torch.float32))
    q = torch.round(blocks * inverse[..., None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(rows, cols), scales


def dequantize_int8_blocks(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """weight (rows, cols) int8 times its block scales (rows, cols / 32): (rows, cols) float32."""
    rows, cols = weight.shape
    blocks = weight.view(rows, cols // INT8_BLOCK, INT8_BLOCK).float()  # (rows, n_blocks, 32)
    # Speed: in place (the same products): `blocks * scales[..., None]` into a new tensor measured 10.8 ms for
    # 8192 x 576, against 0.9 ms (SmolLM2's Q8_0 output layer, dequantized a slice at a time for a prompt or eval)
    return blocks.mul_(scales.float()[..., None]).view(rows, cols)


def _check_int8_blocks(weight: torch.Tensor, scales: torch.Tensor, what: str):
    rows, cols = weight.shape
    if weight.dtype != torch.int8 or cols % INT8_BLOCK or scales.shape != (rows, cols // INT8_BLOCK) \
            or scales.dtype != torch.float16:
        raise ValueError(f"{what} in int8 blocks: weight ({rows}, {cols}) int8 with {cols} a multiple of "
                         f"{INT8_BLOCK}, scales ({rows}, {cols // INT8_BLOCK}) float16; got {weight.dtype} weight, "
                         f"scales {tuple(scales.shape)} {scales.dtype}")


class Int8Linear(nn.Module):
    """y = x @ W.T with ``weight`` int8 (out, in), in one of two forms:

    - a scale a row: ``scales`` (out,) float32, W[o, i] = weight[o, i] * scales[o] (what ``--quantize int8`` makes);
    - a scale a block of 32 inputs: ``scales`` (out, in / 32) float16, W[o, i] = weight[o, i] * scales[o, i // 32]
      (llama.cpp's Q8_0 block (d, qs[32]) de-interleaved, as a GGUF's Q8_0 tensors load).

    An input of at most ``kernels.MAX_GEMV_ROWS`` rows (a decode step's sequences) goes to ``torch.ops.torchchat.gemv``
    (both forms: each row of x rounded to int16 with one scale, max|x| / 32767, for exact integer dot products); a
    long one (a prompt) to float32 GEMMs on slices of W. Without the op, the row form uses aten's int8 kernel, the
    block form float32 GEMMs.
    """

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.blocks = scales.dim() == 2  # the block form
        if self.blocks:
            _check_int8_blocks(weight, scales, "Int8Linear")
        elif weight.dtype != torch.int8 or scales.shape != (self.out_features,):
            raise ValueError(f"Int8Linear: weight ({self.out_features}, {self.in_features}) int8 with scales "
                             f"({self.out_features},) or ({self.out_features}, {self.in_features // INT8_BLOCK}); "
                             f"got {weight.dtype} weight, scales {tuple(scales.shape)}")
        self.register_buffer("weight", weight)  # (out, in) int8
        # (out,) float32 (a bf16 scale would be off by up to 0.4% a row), or (out, in / 32) float16
        self.register_buffer("scales", scales)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, blocks: bool = False) -> "Int8Linear":
        """``linear``'s weight quantized with a scale a row, or with ``blocks`` a scale a block of 32 inputs."""
        if blocks:
            return cls(*int8_blocks(linear.weight))
        w = linear.weight.detach().float()  # (out, in)
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-10)  # (out,)
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q, scales)

    @classmethod
    def tied_to(cls, embedding: "Int8Embedding") -> "Int8Linear":
        """The output layer tied to ``embedding`` (logits = h @ table.T): the very same buffers, no copy."""
        return cls(embedding.weight, embedding.scales)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        if self.blocks:
            return dequantize_int8_blocks(self.weight, self.scales).to(dtype)  # (out, in)
        return (self.weight.to(dtype) * self.scales.to(dtype)[:, None])  # (out, in)

    def _kernel_scales(self) -> bool:
        """Are the scales in the dtype the op reads for this form (a model's .to(dtype) converts them)?"""
        return self.scales.dtype == (torch.float16 if self.blocks else torch.float32)

    def gemv_operands(self):
        """(weight, aux, group_size) as ``torch.ops.torchchat.decode_layers`` takes it (torchchat.cpu)."""
        if not self._kernel_scales():
            return None
        return self.weight, self.scales, INT8_BLOCK if self.blocks else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (B * T, in)
        if rows.size(0) >= _PREFILL_ROWS:
            return self._float32_linear(x)
        if self._kernel_scales() and cpu_kernels.supports(rows, self.weight):  # a decode step's few rows
            return torch.ops.torchchat.gemv(x, self.weight, self.scales)
        if self.blocks:
            return self._float32_linear(x)
        y = torch.ops.aten._weight_int8pack_mm(rows.to(_COMPUTE_DTYPE), self.weight,
                                               self.scales.to(_COMPUTE_DTYPE))  # (B * T, out)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def weight_rows(self, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of W in float32: (end - start, in)."""
        if self.blocks:
            return dequantize_int8_blocks(self.weight[start:end], self.scales[start:end])
        return self.weight[start:end].float() * self.scales[start:end].float()[:, None]

    def _float32_linear(self, x: torch.Tensor) -> torch.Tensor:
        """A long input: float32 GEMMs on the weight dequantized a slice of rows at a time (bounded memory), on the
        kernels' threads where the op is built (cpu_kernels.takes_prompt)."""
        if self._kernel_scales() and cpu_kernels.takes_prompt(x):
            return torch.ops.torchchat.prompt_linear(x, self.weight, self.scales, INT8_BLOCK if self.blocks else 0)
        return cpu_kernels.float32_linear(x, self.out_features, self.weight_rows)

    def extra_repr(self) -> str:
        form = f"int8, blocks of {INT8_BLOCK}" if self.blocks else "int8"
        return f"in_features={self.in_features}, out_features={self.out_features}, {form}"


class Int8Embedding(nn.Module):
    """An embedding table in int8 blocks of 32 (llama.cpp's Q8_0, as a GGUF's token_embd.weight loads): row t is
    ``weight[t, i] * scales[t, i // 32]``; ``weight`` (vocab, dim) int8, ``scales`` (vocab, dim / 32) float16.
    ``forward(tokens)`` gathers the tokens' rows and dequantizes them to float32: (..., dim). A tied output layer is
    ``Int8Linear.tied_to(embedding)``, over the same buffers."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        _check_int8_blocks(weight, scales, "Int8Embedding")
        self.num_embeddings, self.embedding_dim = weight.shape
        self.register_buffer("weight", weight)  # (vocab, dim) int8
        self.register_buffer("scales", scales)  # (vocab, dim / 32) float16

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> "Int8Embedding":
        return cls(*int8_blocks(embedding.weight))

    def dequantize(self) -> torch.Tensor:
        """The whole table in float32: (vocab, dim)."""
        return dequantize_int8_blocks(self.weight, self.scales)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.weight[tokens]  # (..., dim) int8
        blocks = rows.view(*tokens.shape, -1, INT8_BLOCK).float()  # (..., dim / 32, 32)
        return (blocks * self.scales[tokens].float()[..., None]).view(*tokens.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8, blocks of {INT8_BLOCK}"


def _int4_grid(linear: nn.Linear, group_size: int):
    """Min-max 4-bit grid per group of ``group_size`` inputs: W ~ q * scale + low, q in [0, 15].
    Returns q (out, in) int32, scale and low (out, in / group_size) float32."""
    w = linear.weight.detach().float()  # (out, in)
    out_features, in_features = w.shape
    groups = w.reshape(out_features, in_features // group_size, group_size)  # (out, n_groups, g)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # (out, n_groups)
    scale = ((high - low) / 15).clamp(min=1e-10)
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return q.reshape(out_features, in_features), scale, low


class Int4Linear(nn.Module):
    """y = x @ W.T with W[n, k] = q[n, k] * scale[n, k // g] + min[n, k // g], q in [0, 15] (llama.cpp's
    Q4_1 layout, groups of g inputs), stored as ``torch.ops.torchchat.gemv_int4`` reads it.

    ``packed`` is (out, in / 2) uint8: in each block of 32 weights of a row, byte j holds q[j] in its low
    half and q[j + 16] in its high half. ``scales_and_mins`` is (out, in / g, 2) float16. An input of at
    most ``kernels.MAX_GEMV_ROWS`` rows (a decode step's sequences) goes to the op; longer ones (prompts)
    dequantize a slice of rows at a time for a float32 GEMM. Where the op is unavailable, quantize_model uses
    Int4PackedLinear (aten's kernel).
    """

    def __init__(self, packed: torch.Tensor, scales_and_mins: torch.Tensor, group_size: int):
        super().__init__()
        self.out_features, self.in_features = packed.size(0), 2 * packed.size(1)
        self.group_size = group_size
        self.register_buffer("packed", packed)  # (out, in / 2) uint8
        self.register_buffer("scales_and_mins", scales_and_mins)  # (out, in / group_size, 2) float16

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> "Int4Linear":
        q, scale, low = _int4_grid(linear, group_size)
        blocks = q.to(torch.uint8).view(q.size(0), -1, 2, 16)  # (out, in / 32, 2, 16): two halves of a block
        packed = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(q.size(0), -1)  # (out, in / 2)
        scales_and_mins = torch.stack([scale, low], dim=-1).to(torch.float16)  # (out, n_groups, 2)
        return cls(packed.contiguous(), scales_and_mins.contiguous(), group_size)

    @classmethod
    def tied_to(cls, embedding: "Int4Embedding") -> "Int4Linear":
        """The output layer tied to ``embedding`` (logits = h @ table.T): the very same buffers, no copy."""
        return cls(embedding.packed, embedding.scales_and_mins, embedding.group_size)

    def dequantize(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Rows [start, end) of W in float32: (end - start, in)."""
        return dequantize_int4(self.packed[start:end], self.scales_and_mins[start:end], self.group_size)

    def weight_rows(self, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of W in float32: (end - start, in)."""
        return self.dequantize(start, end)

    def gemv_operands(self):
        """(weight, aux, group_size) as ``torch.ops.torchchat.decode_layers`` takes it (torchchat.cpu)."""
        return self.packed, self.scales_and_mins, self.group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed.device.type == "cpu" and cpu_kernels.takes_rows(x):
            return torch.ops.torchchat.gemv_int4(x, self.packed, self.scales_and_mins, self.group_size)
        if self.packed.device.type == "cpu" and cpu_kernels.takes_prompt(x):  # dequantized a chunk at a time
            return torch.ops.torchchat.prompt_linear(x, self.packed, self.scales_and_mins, self.group_size)
        return cpu_kernels.float32_linear(x, self.out_features, self.dequantize)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4, "
                f"group_size={self.group_size}")


class Int4PackedLinear(nn.Module):
    """Int4Linear's weights in ``aten._weight_int4pack_mm_for_cpu``'s layout, for where torchchat's op is
    unavailable: y = x @ W.T with W[n, k] = (q[n, k] - 8) * scale[k // g, n] + zero[k // g, n].

    ``weight`` is q packed by ``aten._convert_weight_to_int4pack_for_cpu`` (uint8, two values a
    byte, in the kernel's tiled order); ``scales_and_zeros`` is (in / g, out, 2).
    """

    def __init__(self, weight: torch.Tensor, scales_and_zeros: torch.Tensor, in_features: int, group_size: int):
        super().__init__()
        self.in_features, self.out_features = in_features, scales_and_zeros.size(1)
        self.group_size = group_size
        self.register_buffer("weight", weight)  # packed int4, uint8
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # (in / group_size, out, 2) bfloat16

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> "Int4PackedLinear":
        q, scale, low = _int4_grid(linear, group_size)
        zero = low + 8 * scale  # the kernel computes (q - 8) * scale + zero
        scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1)  # (n_groups, out, 2)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        return cls(packed, scales_and_zeros.contiguous().to(_COMPUTE_DTYPE), linear.in_features, group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(_COMPUTE_DTYPE)  # (B * T, in)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.weight, self.group_size,
                                                        self.scales_and_zeros)  # (B * T, out)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4 (aten), "
                f"group_size={self.group_size}")


def dequantize_int4(packed: torch.Tensor, scales_and_mins: torch.Tensor, group_size: int) -> torch.Tensor:
    """Rows in Int4Linear's layout, packed (rows, in / 2) and scales_and_mins (rows, in / g, 2), in float32:
    (rows, in). One pass in C++ where the ops are built."""
    if packed.device.type == "cpu" and cpu_kernels.available():
        return torch.ops.torchchat.dequantize_int4(packed, scales_and_mins, group_size)
    blocks = packed.view(packed.size(0), -1, 16)  # (rows, in / 32, 16)
    q = torch.cat([blocks & 15, blocks >> 4], dim=-1)  # (rows, in / 32, 32): a block's 32 values in order
    q = q.view(packed.size(0), -1, group_size).float()  # (rows, n_groups, g)
    sm = scales_and_mins.float()  # (rows, n_groups, 2)
    return (q * sm[..., :1] + sm[..., 1:]).view(packed.size(0), 2 * packed.size(1))  # (rows, in)


class Int4Embedding(nn.Module):
    """An embedding table in Int4Linear's layout, groups of 32 (a GGUF's Q4_0/Q4_1/Q4_K token_embd.weight): row t is
    token t's embedding; ``forward(tokens)`` dequantizes the tokens' rows to float32: (..., dim), the table stays
    4-bit. A tied output layer is ``Int4Linear.tied_to(embedding)``, over the same buffers."""

    def __init__(self, packed: torch.Tensor, scales_and_mins: torch.Tensor, group_size: int = 32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = packed.size(0), 2 * packed.size(1)
        self.group_size = group_size
        self.register_buffer("packed", packed)  # (vocab, dim / 2) uint8
        self.register_buffer("scales_and_mins", scales_and_mins)  # (vocab, dim / group_size, 2) float16

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.reshape(-1)  # (N,)
        rows = dequantize_int4(self.packed[flat], self.scales_and_mins[flat], self.group_size)  # (N, dim)
        return rows.view(*tokens.shape, self.embedding_dim)  # (..., dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int4, group_size={self.group_size}"


def int4_group_size(in_features: int, out_features: int, preferred: int = DEFAULT_INT4_GROUP_SIZE) -> int | None:
    """The group size to use for a weight of this shape, or None if the int4 kernel cannot take it.

    The kernel needs out_features divisible by 16 and in_features by the group size; the preferred
    size is taken if it divides in_features, else the largest supported one that does.
    """
    if out_features % 16:
        return None
    if in_features % preferred == 0:
        return preferred
    fits = [g for g in INT4_GROUP_SIZES if in_features % g == 0]
    return max(fits) if fits else None


def quantize_model(model: nn.Module, scheme: str, *, group_size: int = DEFAULT_INT4_GROUP_SIZE) -> dict[str, int]:
    """Replace the model's nn.Linear layers in place with weight-only quantized ones.

    Returns counts: {"quantized": n, "skipped": m} (a layer is skipped, left as it is, when the
    kernel does not support its shape). CPU only: the kernels are PyTorch's CPU ones.
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown quantization '{scheme}': choose one of {', '.join(SCHEMES)}")
    if group_size not in INT4_GROUP_SIZES:
        raise ConfigError(f"int4 group size ({group_size}) must be one of {INT4_GROUP_SIZES}")
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ConfigError(f"--quantize uses PyTorch's CPU kernels; the model is on {device}: use --device cpu")
    counts = {"quantized": 0, "skipped": 0}
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) not in _FLOAT_LINEARS or getattr(child, "bias", None) is not None:
                continue
            full_name = f"{parent_name}.{name}" if parent_name else name
            new = _quantized(child, "int8" if full_name in INT8_ONLY else scheme, group_size)
            if new is None:
                counts["skipped"] += 1
                continue
            setattr(parent, name, new)
            counts["quantized"] += 1
    return counts


def _quantized(linear: nn.Linear, scheme: str, group_size: int) -> nn.Module | None:
    if scheme == "int8":
        return Int8Linear.from_linear(linear)
    g = int4_group_size(linear.in_features, linear.out_features, group_size)
    if g is None:
        return None
    return (Int4Linear if cpu_kernels.available() else Int4PackedLinear).from_linear(linear, g)


def describe_layers(model: nn.Module, dtype: str) -> str:
    """What a model's weights run as, for the load line: "fp32", or "int4 x210, int8 x2, fp32 activations"
    (the embedding counts as a layer)."""
    kinds = {Int8Linear: "int8", Int4Linear: "int4", Int4PackedLinear: "int4", Int8Embedding: "int8",
             Int4Embedding: "int4"}
    counts = {}
    for module in model.modules():
        kind = kinds.get(type(module))
        if kind is not None:
            counts[kind] = counts.get(kind, 0) + 1
    if not counts:
        return dtype
    return ", ".join(f"{kind} x{n}" for kind, n in sorted(counts.items(), key=lambda kv: -kv[1])) + \
        f", {dtype} activations"
