"""The modules ``torchchat.cpu.install`` puts into a plain model: ``GemvLinear`` for bias-free linears,
``CPUAttention`` and ``CPUTransformer`` (subclasses the model's ``Attention`` and ``Transformer`` are switched
to in place, so parameter names and checkpoints are unchanged), and ``FusedDecode``, a decode step's blocks (a
batch of sequences, each at its own position) in one ``torch.ops.torchchat.decode_layers`` call.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from torchchat.cpu import kernels
from torchchat.cpu.kernels import CACHE_DTYPES
from torchchat.model import Attention, Transformer, cache_rows

# The block op's linears, in the order it takes them (torchchat/csrc/decode_layers.cpp reads them by index,
# enum LinearIndex): the one place that order is written on the Python side.
BLOCK_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                 "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")
_BLOCK_LINEAR_PATHS = tuple(tuple(name.split(".")) for name in BLOCK_LINEARS)  # ("attention", "wq"), ...


def _block_linears(block) -> tuple:
    """The block's linears in BLOCK_LINEARS order (plain getattrs: Dynamo traces them, not attrgetter)."""
    return tuple(getattr(getattr(block, owner), name) for owner, name in _BLOCK_LINEAR_PATHS)


class GemvLinear(torch.nn.Module):
    """A bias-free linear layer that sends an input of at most ``kernels.MAX_GEMV_ROWS`` rows (a decode step's
    sequences, a short prompt) to the op: the weight is read once for all of them, and each row's result is the
    one it gets alone.

    Holds the very ``weight`` Parameter of the layer it replaces (a tied output layer stays tied). A float32 prompt
    goes to ``torch.ops.torchchat.prompt_linear`` (MKL's GEMM kernels on tiles the kernels' threads claim, without
    the static split that a busy machine stalls: on this torch, F.linear's very bits); any other input to
    ``F.linear``.
    """

    def __init__(self, weight: torch.nn.Parameter):
        super().__init__()
        self.weight = weight  # (out, in)
        self.out_features, self.in_features = weight.shape

    def gemv_operands(self):
        """(weight, aux, group_size) as ``torch.ops.torchchat.decode_layers`` takes a linear, or None for a
        weight type it does not take (see use_fused_decode)."""
        ok = self.weight.dtype in (torch.float32, torch.bfloat16) and self.weight.is_contiguous()
        return (self.weight, None, 0) if ok else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype and kernels.supports(x, self.weight):
            return torch.ops.torchchat.gemv(x, self.weight)  # (..., out)
        if x.dtype == torch.float32 == self.weight.dtype and self.weight.is_contiguous() and kernels.takes_prompt(x):
            return torch.ops.torchchat.prompt_linear(x, self.weight)  # (..., out): a prompt, on the kernels' threads
        return torch.nn.functional.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, gemv"


def use_gemv(model: torch.nn.Module) -> int:
    """Replace, in place, the model's bias-free ``nn.Linear`` layers (exactly that type: quantized ones
    call the op themselves) with ``GemvLinear``. Returns how many; 0 where the op is unavailable."""
    if not kernels.available():
        return 0
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child.bias is None:
                setattr(parent, name, GemvLinear(child.weight))
                count += 1
    return count


class CPUAttention(Attention):
    """``Attention`` on CPU: one-position steps through ``torch.ops.torchchat.decode_attention`` (set by
    ``use_decode_attention``; it reads only the filled cache positions, so a compiled step's shapes stay
    static), other steps in float32.

    Speed: PyTorch's CPU flash-attention kernel is about 4x slower in bf16 than converting to float32 and
    back, on CPUs without native bf16 (SmolLM2 decode step, 544 cached positions: 756 -> 180 us a layer);
    the result is as precise or more.
    """

    decode_attention = None  # the op, or None: torch's attention

    def attend(self, q, k, v, mask, input_pos, rows=None) -> torch.Tensor:
        if q.size(2) == 1 and self.decode_attention is not None and k.dtype in CACHE_DTYPES:
            positions, cache_rows_ = step_rows(input_pos, rows, q.size(0))  # (B,), (B,)
            return self.decode_attention(q, k, v, positions, cache_rows_)  # (B, n_heads, 1, head_dim)
        k, v = cache_rows(k, v, q.size(0), rows)  # (B, n_kv_heads, S, head_dim)
        k, v = k[:, :, :mask.size(-1)], v[:, :, :mask.size(-1)]  # (B, n_kv_heads, kv_len, head_dim)
        gqa = q.size(1) != k.size(1)
        if q.dtype != torch.float32 or k.dtype != torch.float32:
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=gqa)
            return out.to(q.dtype)  # (B, n_heads, T, head_dim)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def step_rows(input_pos: torch.Tensor, rows: torch.Tensor | None, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A one-position step's (positions, cache rows) as the ops take them, each (B,): input_pos is (1,), shared by
    every row, or (B, 1), a row's own; rows (B,), or None for rows 0 .. B-1."""
    positions = input_pos.reshape(-1).expand(batch)  # (B,)
    if rows is None:
        rows = torch.arange(batch, device=input_pos.device)
    return positions, rows


class CPUTransformer(Transformer):
    """``Transformer`` on CPU: a decode step's blocks (one position of each of up to ``kernels.MAX_GEMV_ROWS``
    sequences, each at its own position in its own cache row) through ``decode_layers`` (a ``FusedDecode``, set by
    ``use_fused_decode``), and in eager mode attention over the filled cache positions only."""

    decode_layers = None  # a FusedDecode, or None: the blocks' modules

    def forward_layers(self, h: torch.Tensor, rope: torch.Tensor, input_pos: torch.Tensor,
                       rows: torch.Tensor | None = None) -> torch.Tensor:
        if self.decode_layers is not None and h.size(1) == 1 and h.size(0) <= kernels.MAX_GEMV_ROWS:
            out = self.decode_layers(self, h, rope, input_pos, rows)  # (B, 1, dim), or None: caches it cannot read
            if out is not None:
                return out
        return super().forward_layers(h, rope, input_pos, rows)

    def attention_mask(self, input_pos: torch.Tensor) -> torch.Tensor:
        """Speed: in eager mode only the filled positions, [0, last position], so a step does not attend
        over the whole static cache (SmolLM2, 2048-position chat cache, early in a chat: 30 x ~500 us of
        attention a token saved). Compiled code keeps static shapes (no recompiles)."""
        if torch.compiler.is_compiling():
            return super().attention_mask(input_pos)
        return self.causal_mask[input_pos, :int(input_pos.max()) + 1]  # (T, kv_len) or (B, T, kv_len)


@functools.cache
def _cpu_class(cls: type) -> type:
    """cls's CPU subclass: CPUAttention or CPUTransformer for those, one mixing it in for a subclass of them."""
    for base, cpu in ((Attention, CPUAttention), (Transformer, CPUTransformer)):
        if cls is base or issubclass(cls, cpu):
            return cpu if cls is base else cls
        if issubclass(cls, base):
            return type(f"CPU{cls.__name__}", (cls, cpu), {})
    return cls


def as_cpu(model: torch.nn.Module) -> torch.nn.Module:
    """Switch, in place, the model and its Attention modules to their CPU classes (same state)."""
    for module in model.modules():
        module.__class__ = _cpu_class(type(module))
    return model


def use_decode_attention(model: torch.nn.Module) -> int:
    """Send the model's one-position attention steps to ``torch.ops.torchchat.decode_attention`` (its CPU
    attention layers': ``as_cpu``); a step whose cache it cannot read (not float16 or float32) keeps torch's
    attention. Returns how many attention layers; 0 where unavailable."""
    if not kernels.available():
        return 0
    count = 0
    for module in as_cpu(model).modules():
        if isinstance(module, CPUAttention):
            module.decode_attention = torch.ops.torchchat.decode_attention
            count += 1
    return count


def use_fused_decode(model: torch.nn.Module) -> int:
    """Send the model's decode steps (one position of each of up to ``kernels.MAX_GEMV_ROWS`` sequences) through
    all its layers to ``torch.ops.torchchat.decode_layers``: one call a step, ~5 thread wake-ups a layer instead of
    ~15 ops and their dispatches (csrc/decode_layers.cpp says why). The model must be a CPUTransformer (``as_cpu``) and
    every block qualify: norms float32 or bfloat16 with one eps, and each linear giving ``gemv_operands()``
    (GemvLinear: float32/bfloat16; quantize's Int8Linear, a scale a row or a block, Int4Linear); the caches,
    float16 or float32, are checked when the op's arguments are gathered (steps with other caches keep the modules).
    Prompts and larger batches keep the modules' own path. Call it again after replacing any of the model's modules or
    parameters. Returns how many layers; 0 where it does not apply."""
    blocks = list(as_cpu(model).layers.values()) if isinstance(model, Transformer) else []
    if not kernels.available() or not blocks or not all(_fusable(block, blocks[0]) for block in blocks):
        return 0
    model.decode_layers = FusedDecode()
    return len(blocks)


class FusedDecode:
    """``CPUTransformer.decode_layers`` as ``use_fused_decode`` sets it: ``decode_layers`` with the op's arguments
    gathered once.

    Speed: gathering the ~230 tensors of SmolLM2's 30 blocks from their modules takes ~1 ms of Python a token
    (nn.Module attribute lookups and the garbage collector's passes over the new lists), a tenth of an
    int4 token. Eager steps reuse them while the caches they were gathered with are the model's (a larger
    batch re-allocates every cache: ``Transformer.setup_caches``), checking the caches then. A compiled
    step gathers them in its traced code: Dynamo lifts them as the graph's inputs and passes them itself at
    every call (its own per-call cost, docs/performance.md).
    """

    def __init__(self):
        self._arguments: tuple | None = None
        self._first_cache: torch.Tensor | None = None  # the first block's k cache when they were gathered

    def __call__(self, model, h: torch.Tensor, rope: torch.Tensor, input_pos: torch.Tensor,
                 rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """h (B, 1, dim) through the blocks, or None where the caches are not ones the op reads."""
        if torch.compiler.is_compiling():
            return decode_layers(model, h, rope, input_pos, rows) if _caches_fit(model) else None
        first_cache = next(iter(model.layers.values())).attention.kv_cache.k
        if self._first_cache is not first_cache:
            fits = _caches_fit(model)
            self._arguments, self._first_cache = _decode_layers_arguments(model) if fits else None, first_cache
        if self._arguments is None:
            return None
        return torch.ops.torchchat.decode_layers(h, *self._arguments, *_step(h, rope, input_pos, rows))  # (B, 1, dim)


def decode_layers(model, h: torch.Tensor, rope: torch.Tensor, input_pos: torch.Tensor,
                  rows: torch.Tensor | None = None) -> torch.Tensor:
    """h (B, 1, dim), one position of each sequence, through every block of the model in one op call; writes each
    row's position into its cache row. rope, input_pos, rows: as ``Transformer.forward_layers`` takes them."""
    return torch.ops.torchchat.decode_layers(h, *_decode_layers_arguments(model),
                                             *_step(h, rope, input_pos, rows))  # (B, 1, dim)


def _step(h: torch.Tensor, rope: torch.Tensor, input_pos: torch.Tensor, rows: torch.Tensor | None) -> tuple:
    """The op's (rope, input_pos, rows) for a step of h's B rows: rope (1, hd / 2, 2), shared, or (B, 1, hd / 2, 2),
    a row's own, as (B, 1, hd / 2, 2); input_pos and rows as ``step_rows`` gives them."""
    batch = h.size(0)
    rope = rope.reshape(-1, 1, *rope.shape[-2:]).expand(batch, -1, -1, -1)  # (B, 1, head_dim // 2, 2)
    return rope, *step_rows(input_pos, rows, batch)


def _decode_layers_arguments(model) -> tuple:
    """The op's (norms, eps, linears, group_sizes, k_caches, v_caches) for the model's blocks."""
    norms, tensors, group_sizes, k_caches, v_caches = [], [], [], [], []
    for block in model.layers.values():
        norms += [block.attention_norm.weight, block.ffn_norm.weight]
        for linear in _block_linears(block):
            weight, aux, group_size = linear.gemv_operands()
            tensors += [weight, aux]
            group_sizes.append(group_size)
        k_caches.append(block.attention.kv_cache.k)
        v_caches.append(block.attention.kv_cache.v)
    eps = next(iter(model.layers.values())).attention_norm.eps
    return norms, eps, tensors, group_sizes, k_caches, v_caches


def _caches_fit(model) -> bool:
    """Are all the blocks' caches ones the op reads (float16 or float32)?"""
    caches = [block.attention.kv_cache for block in model.layers.values()]
    return all(cache is not None and cache.k.dtype in CACHE_DTYPES for cache in caches)


def _fusable(block, first) -> bool:
    norms = (block.attention_norm, block.ffn_norm)
    return (all(norm.eps == first.attention_norm.eps for norm in norms)
            and all(norm.weight.dtype in (torch.float32, torch.bfloat16) for norm in norms)
            and all(getattr(linear, "gemv_operands", lambda: None)() is not None for linear in _block_linears(block)))
