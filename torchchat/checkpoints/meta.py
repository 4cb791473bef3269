"""Meta's layout: params.json and consolidated.NN.pth, one shard per model-parallel rank.

The weights already use torchchat's names and Meta's interleaved RoPE layout; sharded checkpoints
are concatenated back, one tensor at a time, along the dimension that Meta's model parallelism split.
``params_args`` is shared with plain .pth files that have a params.json beside them.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from torchchat.checkpoints.common import (
    CheckpointError, LazyTensor, checked_args, default_context, is_non_weight, read_json, state_dict_of, torch_load,
)
from torchchat.model import KNOWN_MODELS, ModelArgs, RopeScaling

# How fairscale's ColumnParallelLinear / RowParallelLinear split Meta's weights across ranks.
_CAT_DIM0 = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "feed_forward.w1.weight",
             "feed_forward.w3.weight", "output.weight")
_CAT_DIM1 = ("attention.wo.weight", "feed_forward.w2.weight")


def is_meta_dir(path: Path) -> bool:
    return (path / "params.json").is_file()


def model_args(path: Path, name: str) -> ModelArgs:
    shards = _shard_paths(path)
    first = state_dict_of(shards[0], torch_load(shards[0]), strip_prefixes=False)
    return params_args(path / "params.json", name, first, len(shards))


def params_args(params_path: Path, name: str, first_shard: dict[str, torch.Tensor], n_shards: int) -> ModelArgs:
    """ModelArgs from a Meta params.json (and the gpt-fast / torchchat spellings of its keys).

    ``first_shard`` (memory-mapped) answers what params.json may leave out: the vocabulary size
    (Llama 2's is -1) and whether there is an output layer of its own.
    """
    params = read_json(params_path)

    def need(*keys):
        for key in keys:
            if key in params:
                return params[key]
        raise CheckpointError(f"{params_path} lacks '{keys[0]}': re-download the model's params.json")

    def first_of(*keys, default=None):
        return next((params[k] for k in keys if params.get(k) is not None), default)

    dim = need("dim")
    hidden_dim = first_of("hidden_dim", "intermediate_size") or meta_hidden_dim(
        dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier"))
    tie = first_of("tie_embeddings", "tie_word_embeddings")
    return checked_args(
        params_path,
        dim=dim,
        n_layers=need("n_layers", "n_layer"),
        n_heads=need("n_heads", "n_head"),
        n_kv_heads=first_of("n_kv_heads", "n_local_heads"),
        vocab_size=_vocab_size(params_path, params.get("vocab_size", -1), dim, first_shard, n_shards),
        hidden_dim=hidden_dim,
        norm_eps=float(params.get("norm_eps", 1e-5)),
        rope_theta=float(first_of("rope_theta", "rope_base", default=10000.0)),
        rope_scaling=_rope_scaling(params, name),
        max_context=first_of("max_seq_len", "max_seq_length", "block_size", default=default_context(name)),
        tie_embeddings=bool(tie) if tie is not None else _ties_embeddings(first_shard),
    )


def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The SwiGLU inner size exactly as Meta's FeedForward computes it."""
    hidden_dim = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden_dim = int(ffn_dim_multiplier * hidden_dim)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


def _ties_embeddings(state: dict[str, torch.Tensor]) -> bool:
    """No output layer of its own, or torch.save of a tied model: both names on one storage."""
    out, emb = state.get("output.weight"), state.get("tok_embeddings.weight")
    return out is None or (emb is not None and out.untyped_storage().data_ptr() == emb.untyped_storage().data_ptr())


def _vocab_size(params_path, vocab_size: int, dim: int, first_shard: dict, n_shards: int) -> int:
    if vocab_size > 0:
        return vocab_size
    emb = first_shard.get("tok_embeddings.weight")
    if emb is None:
        raise CheckpointError(f"{params_path} gives no vocab_size and the checkpoint has no tok_embeddings.weight: "
                              f"add vocab_size to params.json")
    # Llama 2 splits the embedding along dim (each shard holds every token), Llama 3 along the vocabulary.
    return emb.shape[0] if emb.shape[1] != dim else emb.shape[0] * n_shards


def _rope_scaling(params: dict, name: str) -> RopeScaling | None:
    if not params.get("use_scaled_rope"):
        return None
    # Meta's params.json says only *that* RoPE is scaled; its factor is 8 for Llama 3.1 and 32 for
    # Llama 3.2, so a known model's own setting wins over the 3.1 defaults.
    known = KNOWN_MODELS.get(name)
    base = known.rope_scaling if known is not None and known.rope_scaling is not None else RopeScaling()
    return RopeScaling(factor=float(params.get("rope_scaling_factor", base.factor)),
                       low_freq_factor=float(params.get("low_freq_factor", base.low_freq_factor)),
                       high_freq_factor=float(params.get("high_freq_factor", base.high_freq_factor)),
                       original_max_position=int(params.get("original_max_position", base.original_max_position)))


def tensors(path: Path, args: ModelArgs) -> dict[str, LazyTensor]:
    """Every tensor, merged across the shards on load (the shards are memory-mapped, not read)."""
    paths = _shard_paths(path)
    shards = [state_dict_of(p, torch_load(p), strip_prefixes=False) for p in paths]
    out = {}
    for name in shards[0]:
        if is_non_weight(name):
            continue
        parts = []
        for p, shard in zip(paths, shards):
            if name not in shard:
                raise CheckpointError(f"{p} lacks {name}, which {paths[0].name} has: re-download the model")
            parts.append(shard[name])
        dim = _cat_dim(name, parts, args)
        shape = list(parts[0].shape)
        if dim is not None:
            shape[dim] = sum(t.shape[dim] for t in parts)
        out[name] = LazyTensor(name, tuple(shape), functools.partial(_merge, parts, dim))
    return out


def _cat_dim(name: str, parts: list[torch.Tensor], args: ModelArgs) -> int | None:
    if len(parts) == 1 or parts[0].dim() < 2:
        return None  # one shard, or a replicated norm
    if name.endswith(_CAT_DIM0):
        return 0
    if name.endswith(_CAT_DIM1):
        return 1
    if name == "tok_embeddings.weight":
        return 1 if parts[0].shape[1] * len(parts) == args.dim else 0
    return None  # not a weight of this model: reported as unexpected with the first shard's shape


def _merge(parts: list[torch.Tensor], dim: int | None) -> torch.Tensor:
    return parts[0] if dim is None else torch.cat(parts, dim=dim)


def _shard_paths(path: Path) -> list[Path]:
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise CheckpointError(f"{path} has params.json but no consolidated.*.pth: download the weights into it")
    return shards
