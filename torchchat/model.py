"""The Llama-family Transformer and its ModelArgs, nothing else.

A plain module in the style of gpt-fast's and Meta's reference ``model.py``. It knows nothing of
distribution; two courtesies let parallelism be applied from outside (``torchchat/distributed``):

- heads are reshaped with ``-1`` so that sharded (local) head counts are inferred;
- layers live in a ``ModuleDict`` keyed by layer index, so parameter names survive a pipeline
  split, and ``forward`` passes through a missing embedding, norm or output layer.

Nor does it know the CPU fast path, applied from outside as well: it switches the modules to subclasses
that override three narrow methods, ``Attention.attend``, ``Transformer.forward_layers`` and
``Transformer.attention_mask``, and sets ``kv_cache_dtype``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from torchchat.errors import ConfigError


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency scaling of RoPE (long-context extension)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelArgs:
    """Shape of a Llama-family model. Validated at construction."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: same as n_heads (no GQA)
    vocab_size: int = 32000
    hidden_dim: int = 11008  # SwiGLU inner size
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_context: int = 4096  # the longest sequence the model was trained for
    tie_embeddings: bool = False  # output layer shares the token embedding
    head_dim: int = field(init=False)

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_context"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model {name} ({getattr(self, name)}) must be positive")
        if self.dim % self.n_heads:
            raise ConfigError(f"model n_heads ({self.n_heads}) must divide dim ({self.dim})")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        object.__setattr__(self, "head_dim", self.dim // self.n_heads)

    def with_(self, **changes) -> "ModelArgs":
        return replace(self, **changes)


def _llama3_scaling():
    return RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)


# Known configurations, by alias. Weights for most of them must come from a local directory.
KNOWN_MODELS: dict[str, ModelArgs] = {
    "smollm2-135m": ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152,
                              hidden_dim=1536, norm_eps=1e-5, rope_theta=100000.0, max_context=8192,
                              tie_embeddings=True),
    "stories15m": ModelArgs(dim=288, n_layers=6, n_heads=6, vocab_size=32000, hidden_dim=768, max_context=256),
    "stories42m": ModelArgs(dim=512, n_layers=8, n_heads=8, vocab_size=32000, hidden_dim=1376, max_context=1024),
    "stories110m": ModelArgs(dim=768, n_layers=12, n_heads=12, vocab_size=32000, hidden_dim=2048, max_context=1024),
    "llama2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, hidden_dim=11008),
    "llama2-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, hidden_dim=13824),
    "llama2-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000, hidden_dim=28672),
    "llama3-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=14336,
                           rope_theta=500000.0, max_context=8192),
    "llama3-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256, hidden_dim=28672,
                            rope_theta=500000.0, max_context=8192),
    "llama3.1-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=14336,
                             rope_theta=500000.0, rope_scaling=_llama3_scaling(), max_context=131072),
    "llama3.1-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256,
                              hidden_dim=28672, rope_theta=500000.0, rope_scaling=_llama3_scaling(),
                              max_context=131072),
    "llama3.1-405b": ModelArgs(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, vocab_size=128256,
                               hidden_dim=53248, rope_theta=500000.0, rope_scaling=_llama3_scaling(),
                               max_context=131072),
    "llama3.2-1b": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=8192,
                             rope_theta=500000.0, rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192),
                             max_context=131072, tie_embeddings=True),
    "llama3.2-3b": ModelArgs(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=128256, hidden_dim=8192,
                             rope_theta=500000.0, rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192),
                             max_context=131072, tie_embeddings=True),
}


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, with Llama 3.1 scaling when configured."""
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim))
    s = args.rope_scaling
    if s is None:
        return freqs.float()
    low_freq_wavelen = s.original_max_position / s.low_freq_factor
    high_freq_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / s.factor, freqs)
    mid = (wavelen <= low_freq_wavelen) & (wavelen >= high_freq_wavelen)
    scaled = torch.where(mid, (1 - smooth) * freqs / s.factor + smooth * freqs, scaled)
    return scaled.float()


def rope_cache(args: ModelArgs, seq_len: int) -> torch.Tensor:
    """cos/sin table for positions [0, seq_len): (seq_len, head_dim // 2, 2)."""
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), rope_frequencies(args))
    return torch.stack([freqs.cos(), freqs.sin()], dim=-1)


def apply_rotary_emb(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (Meta's layout). x: (B, T, H, head_dim), rope: (T, head_dim // 2, 2) shared by
    every row, or (B, T, head_dim // 2, 2) a row's own."""
    xp = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, H, head_dim // 2, 2)
    rope = rope.view(-1, xp.size(1), 1, xp.size(3), 2)  # (1 or B, T, 1, head_dim // 2, 2)
    out = torch.stack(
        [xp[..., 0] * rope[..., 0] - xp[..., 1] * rope[..., 1],
         xp[..., 1] * rope[..., 0] + xp[..., 0] * rope[..., 1]],
        dim=-1,
    )  # (B, T, H, head_dim // 2, 2)
    return out.flatten(3).type_as(x)  # (B, T, H, head_dim)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class KVCache(nn.Module):
    """Static cache: (max_batch, n_kv_heads, max_seq_len, head_dim) for keys and values; a cache row holds one
    sequence.

    Its head count is whatever the attention layer holds, so a tensor-parallel shard keeps only
    its local heads.
    """

    def __init__(self, batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None = None):
        """Write k, v (B, n_kv_heads, T, head_dim) at positions input_pos ((T,) for every row, or (B, T) a row's
        own) into cache rows ``rows`` ((B,); None: rows 0 .. B-1); return the whole caches (max_batch, ...)."""
        if rows is None and input_pos.dim() == 1:
            self.k[: k.size(0), :, input_pos] = k.to(self.k.dtype)
            self.v[: v.size(0), :, input_pos] = v.to(self.v.dtype)
            return self.k, self.v
        if rows is None:
            rows = torch.arange(k.size(0), device=k.device)
        pos = input_pos.expand(k.size(0), k.size(2))  # (B, T)
        # Advanced indices on dims 0 and 2, split by a slice: the indexed view is (B, T, n_kv_heads, head_dim).
        self.k[rows.view(-1, 1), :, pos] = k.transpose(1, 2).to(self.k.dtype)
        self.v[rows.view(-1, 1), :, pos] = v.transpose(1, 2).to(self.v.dtype)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.n_kv_heads = args.n_kv_heads  # a tensor-parallel plan sets this rank's share
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, rope, mask, input_pos, rows=None):
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, -1, self.head_dim)  # (B, T, n_heads, head_dim)
        k = self.wk(x).view(bsz, seqlen, -1, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        v = self.wv(x).view(bsz, seqlen, -1, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        q, k = apply_rotary_emb(q, rope), apply_rotary_emb(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head_dim)
        k, v = self.kv_cache.update(input_pos, k, v, rows)  # (max_batch, n_kv_heads, max_seq_len, head_dim)
        out = self.attend(q, k, v, mask, input_pos, rows)  # (B, n_heads, T, head_dim)
        out = out.transpose(1, 2).reshape(bsz, seqlen, -1)  # (B, T, n_heads * head_dim)
        return self.wo(out)

    def attend(self, q, k, v, mask, input_pos, rows=None) -> torch.Tensor:
        """Scaled dot-product attention with grouped KV heads over the cache positions the mask covers.
        q: (B, n_heads, T, hd); k/v: the whole caches (max_batch, n_kv_heads, S, hd); rows: the cache row of
        each of q's rows ((B,); None: 0 .. B-1); mask (1 or B, 1, T, kv_len) -> (B, n_heads, T, hd)."""
        k, v = cache_rows(k, v, q.size(0), rows)  # (B, n_kv_heads, S, head_dim)
        k, v = k[:, :, :mask.size(-1)], v[:, :, :mask.size(-1)]  # (B, n_kv_heads, kv_len, head_dim)
        return F.scaled_dot_product_attention(q, k.type_as(q), v.type_as(q), attn_mask=mask,
                                              enable_gqa=q.size(1) != k.size(1))


def cache_rows(k: torch.Tensor, v: torch.Tensor, batch: int, rows: torch.Tensor | None):
    """The caches' rows of a step's ``batch`` sequences: views of rows 0 .. batch-1, or a copy of ``rows``."""
    if rows is None:
        return k[:batch], v[:batch]
    return k[rows], v[rows]


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rope, mask, input_pos, rows=None):
        h = x + self.attention(self.attention_norm(x), rope, mask, input_pos, rows)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """The model. ``forward(tokens or hidden, input_pos) -> logits or hidden``.

    A pipeline stage may delete ``tok_embeddings`` (it then receives hidden states), or ``norm``
    and ``output`` (it then returns hidden states), and keep only some of ``layers``.
    With ``tie_embeddings`` the checkpoint loader gives ``output.weight`` the embedding's tensor.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.max_seq_len = 0
        self.max_batch = 0
        self.kv_cache_dtype: torch.dtype | None = None  # the caches' dtype; None: the parameters'

    def setup_caches(self, max_batch: int, max_seq_len: int, dtype=None, device=None):
        """Allocate the static KV caches and the rope table; idempotent for the same sizes (and dtype, if given)."""
        if max_seq_len > self.args.max_context:
            raise ConfigError(f"max sequence length ({max_seq_len}) exceeds the model's context "
                              f"({self.args.max_context}); lower --max-seq-length")
        first = next(iter(self.layers.values()), None)
        cache = first.attention.kv_cache if first is not None else None
        if (max_batch, max_seq_len) == (self.max_batch, self.max_seq_len) and \
                (dtype is None or cache is None or cache.k.dtype == dtype):
            return
        ref = next(p for p in self.parameters())
        device = device or ref.device
        dtype = dtype or self.kv_cache_dtype or ref.dtype
        for layer in self.layers.values():
            attn = layer.attention
            attn.kv_cache = KVCache(max_batch, attn.n_kv_heads, max_seq_len, attn.head_dim, dtype, device)
        self.register_buffer("rope", rope_cache(self.args, max_seq_len).to(device), persistent=False)
        causal = torch.tril(torch.ones(max_seq_len, max_seq_len, dtype=torch.bool, device=device))
        self.register_buffer("causal_mask", causal, persistent=False)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x: tokens (B, T) or hidden states (B, T, dim); input_pos: positions, (T,) shared by every row or (B, T)
        a row's own; rows: the KV cache row of each of x's rows ((B,) int64; None: rows 0 .. B-1)."""
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x  # (B, T, dim)
        rope = self.rope[input_pos]  # (T, head_dim // 2, 2) or (B, T, head_dim // 2, 2)
        h = self.forward_layers(h, rope, input_pos, rows)  # (B, T, dim)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is not None:
            h = self.output(h)  # (B, T, vocab)
        return h

    def forward_layers(self, h: torch.Tensor, rope: torch.Tensor, input_pos: torch.Tensor,
                       rows: torch.Tensor | None = None) -> torch.Tensor:
        """h (B, T, dim) through every block this model holds."""
        mask = self.attention_mask(input_pos)  # (T, kv_len) or (B, T, kv_len)
        mask = mask.view(-1, 1, *mask.shape[-2:])  # (1 or B, 1, T, kv_len)
        for layer in self.layers.values():
            h = layer(h, rope, mask, input_pos, rows)
        return h

    def attention_mask(self, input_pos: torch.Tensor) -> torch.Tensor:
        """Causal mask of the positions input_pos over the cache, the whole static cache: (T, max_seq_len) for
        shared positions (T,), (B, T, max_seq_len) for a row's own (B, T)."""
        return self.causal_mask[input_pos]
