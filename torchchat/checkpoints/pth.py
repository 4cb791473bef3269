"""A plain ``torch.save`` state dict in torchchat's (Meta's) names; gpt-fast's fused wqkv is accepted.

Its shape comes from a params.json beside the file, else from the known model of that name.
"""

from __future__ import annotations

from pathlib import Path

import torch

from torchchat.checkpoints.common import CheckpointError, LazyTensor, is_non_weight, state_dict_of, torch_load
from torchchat.checkpoints.meta import params_args
from torchchat.model import KNOWN_MODELS, ModelArgs

_FUSED_QKV = "attention.wqkv.weight"  # gpt-fast: wq, wk, wv stacked along dim 0


def model_args(path: Path, name: str) -> ModelArgs:
    params_path = path.parent / "params.json"
    if params_path.is_file():
        return params_args(params_path, name, state_dict_of(path, torch_load(path)), n_shards=1)
    if name in KNOWN_MODELS:
        return KNOWN_MODELS[name]
    raise CheckpointError(f"cannot tell the shape of the model in {path}: pass --model <name> "
                          f"(see `torchchat.py list`) or put its params.json beside it")


def tensors(path: Path, args: ModelArgs) -> dict[str, LazyTensor]:
    """Every tensor of the file (memory-mapped: loading returns a view, no copy)."""
    out = {}
    for name, t in state_dict_of(path, torch_load(path)).items():
        if is_non_weight(name):
            continue
        if name.endswith(_FUSED_QKV):
            out.update(_split_qkv(path, name, t, args))
        else:
            out[name] = LazyTensor(name, tuple(t.shape), lambda t=t: t)
    return out


def _split_qkv(path: Path, name: str, wqkv: torch.Tensor, args: ModelArgs) -> dict[str, LazyTensor]:
    sizes = {"wq": args.n_heads * args.head_dim, "wk": args.n_kv_heads * args.head_dim,
             "wv": args.n_kv_heads * args.head_dim}
    expected = (sum(sizes.values()), args.dim)
    if tuple(wqkv.shape) != expected:
        raise CheckpointError(f"tensor {name} in {path} has shape {tuple(wqkv.shape)}, expected {expected}: "
                              f"the checkpoint does not match the model config (check --model or params.json)")
    prefix = name[: -len(_FUSED_QKV)]
    out, start = {}, 0
    for part, rows in sizes.items():
        out[f"{prefix}attention.{part}.weight"] = LazyTensor(
            name, (rows, args.dim), lambda start=start, rows=rows: wqkv.narrow(0, start, rows))  # a view
        start += rows
    return out
