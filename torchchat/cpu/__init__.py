"""The CPU fast path behind one door: ``install(model)``.

Applied from outside to a plain ``model.Transformer`` on CPU, as torchtitan's parallelize functions are:

- the KV caches in float16 whatever the model's dtype (as llama.cpp's default). A decode step reads all
  of their filled part (SmolLM2 at 550 positions: 25 MB in float32, a fifth of an int4 token's bytes);
  the kernels read float16 directly and attend in float32. A bf16 model's keys and values fit float16
  exactly, short of its range;
- attention in float32 over the filled cache positions only (``decode.CPUAttention``), one-position steps
  through ``torch.ops.torchchat.decode_attention``;
- bias-free ``nn.Linear`` layers swapped for ``GemvLinear`` (inputs of a few rows through the gemv op);
- a decode step's blocks (up to ``kernels.MAX_GEMV_ROWS`` sequences, each at its own position in its own cache row)
  in one ``torch.ops.torchchat.decode_layers`` call (``decode.CPUTransformer``);
- the C allocator keeps a prompt's MB-sized temporaries in its heap, reused, rather than a fresh memory map each
  (``allocator``).

The kernels (``kernels``, sources in ``torchchat/csrc/``) are built at first use; where they are not
available only the first two apply, with torch's kernels. ``modes`` holds the torch function modes a
generator enters around a prompt (``Float32Linears``) or a compiled step without the ops (``GemvAsReduction``).
"""

from __future__ import annotations

import torch

from torchchat.cpu.allocator import keep_large_blocks_in_heap
from torchchat.cpu.decode import (BLOCK_LINEARS, CPUAttention, CPUTransformer, FusedDecode, GemvLinear, as_cpu,
                                  decode_layers, use_decode_attention, use_fused_decode, use_gemv)
from torchchat.cpu.kernels import CACHE_DTYPES, available, float32_linear, supports
from torchchat.cpu.modes import Float32Linears, GemvAsReduction, native_bf16

__all__ = ["install", "available", "supports", "float32_linear", "GemvLinear", "CPUAttention", "CPUTransformer",
           "FusedDecode", "BLOCK_LINEARS", "CACHE_DTYPES", "decode_layers", "use_gemv", "use_decode_attention",
           "use_fused_decode", "as_cpu", "Float32Linears", "GemvAsReduction", "native_bf16"]

CACHE_DTYPE = torch.float16


def install(model, *, linears: bool = True, fuse_layers: bool = True) -> dict[str, int]:
    """Apply the CPU fast path to ``model`` (a ``Transformer``, or a pipeline stage of one) in place.

    ``linears=False`` leaves the linears alone (a tensor-parallel rank whose layers are DTensor modules);
    ``fuse_layers=False`` keeps a decode step's blocks as modules (a TP rank all-reduces inside a block).
    Caches allocated from then on are float16 unless asked otherwise (``setup_caches(dtype=...)``); caches
    allocated before keep theirs. Call it again after replacing any of the model's modules or parameters.
    Returns what was routed to the ops: {"gemv": n linears, "attention": n layers, "fused": n layers},
    zeros where the kernels are unavailable.
    """
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"torchchat.cpu.install takes a model on the CPU; this one is on {device}")
    as_cpu(model)
    keep_large_blocks_in_heap()
    model.kv_cache_dtype = CACHE_DTYPE
    return {"gemv": use_gemv(model) if linears else 0, "attention": use_decode_attention(model),
            "fused": use_fused_decode(model) if fuse_layers else 0}
