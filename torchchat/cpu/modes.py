"""Torch function modes of the CPU fast path that a generator enters around a forward pass (not module
swaps: they apply to whatever linears a model holds, DTensor-free ones included): a prompt's bf16/fp16
linears as float32 GEMMs on CPUs without native bf16 (``Float32Linears``), and a compiled decode step's
one-row linears as reductions where the gemv op is unavailable (``GemvAsReduction``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from torchchat.cpu import kernels


class Float32Linears(TorchFunctionMode):
    """Speed, prefill only: F.linear on bf16/fp16 inputs of many rows computes in float32, then casts back.

    Without native bf16 instructions (AVX2) oneDNN's bf16 GEMM is ~8x slower than MKL's float32 one
    (512 x 576 x 1536: 93 ms vs 12 ms); converting the weight costs one pass over it. The sum is
    accumulated in float32 either way. The weight is converted a slice of rows at a time
    (``kernels.float32_linear``).
    """

    MIN_ROWS = 16  # below this (decode steps) the weight read dominates: keep bf16

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and self._applies(*args, **kwargs):
            return self._linear(*args, **kwargs)
        return func(*args, **kwargs)

    def _applies(self, x, weight, bias=None) -> bool:
        reduced = (torch.bfloat16, torch.float16)
        return x.dtype in reduced and weight.dtype in reduced and x.numel() // x.size(-1) >= self.MIN_ROWS

    def _linear(self, x, weight, bias=None):
        if weight.is_contiguous() and weight.dtype == torch.bfloat16 and kernels.takes_prompt(x):
            y = torch.ops.torchchat.prompt_linear(x.float(), weight)  # (..., out) float32, on the kernels' threads
            return (y if bias is None else y + bias.float()).to(x.dtype)
        return kernels.float32_linear(x, weight.size(0), lambda start, end: weight[start:end].float(), bias)


class GemvAsReduction(TorchFunctionMode):
    """Speed, compiled CPU decode steps without the gemv op: F.linear of a single row is written as
    multiply-and-sum, which Inductor turns into one fused, vectorized, multi-threaded loop (MKL's
    matrix-vector product runs on one thread here). Traced by Dynamo, so it costs nothing at run
    time; eager code never sees it (an unfused multiply would be slow there).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and _one_row(*args, **kwargs):
            x, weight = args[0], args[1]
            return (x.unsqueeze(-2) * weight).sum(-1)  # (..., 1, in) * (out, in) -> (..., out)
        return func(*args, **kwargs)


def _one_row(x, weight, bias=None) -> bool:
    return bias is None and x.numel() == x.size(-1) and x.dtype == weight.dtype and weight.dim() == 2


@functools.cache
def native_bf16() -> bool:
    """Does this CPU have bf16 matrix instructions (AVX512-BF16 or AMX), so oneDNN's bf16 GEMM is fast?"""
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
