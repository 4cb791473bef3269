"""Loading only this rank's part of the weights: its stage's layers, its tensor-parallel shards.

The model is built on the meta device, trimmed to the stage and parallelized there; then the
checkpoint loader reads just the names this rank kept (``keep``) and slices each full tensor to
the shard the plan placed here (``transform``), one tensor at a time, so that no rank ever holds
the whole model. The same checkpoints as one process: GGUF, Hugging Face, Meta, model.pth.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from torchchat.distributed.tensor_parallel import shard_of
from torchchat.model import Transformer


def load_rank_weights(source, model: Transformer, layouts: dict[str, torch.Tensor], *, dtype: torch.dtype,
                      device: torch.device):
    """Fill the meta ``model`` with this rank's weights.

    ``layouts``: parameter name -> the DTensor the plan made of it (its placements decide the
    slice), for the parameters that are sharded; the others are loaded whole.
    """
    from torchchat.checkpoint import load_state_dict

    wanted = dict(model.named_parameters())
    tie = _shared_output(model, layouts)
    keep = (lambda name: name in wanted and name != "output.weight") if tie else wanted.__contains__

    def transform(name: str, full: torch.Tensor) -> torch.Tensor:
        layout = layouts.get(name)
        local = full.clone() if layout is None else shard_of(full, layout)
        return local.to(device)

    state = load_state_dict(source, model.args, keep=keep, transform=transform, dtype=dtype)
    for name, tensor in state.items():
        _assign(model, name, tensor, layouts.get(name), wanted[name])
    if tie:  # one Parameter for both: the same rows of the same tensor (see _shared_output)
        model.output.weight = model.tok_embeddings.weight


def _shared_output(model: Transformer, layouts: dict[str, torch.Tensor]) -> bool:
    """A tied output on a rank that also holds the embedding, sharded alike (or not at all), can share it."""
    if not (model.args.tie_embeddings and model.output is not None and model.tok_embeddings is not None):
        return False
    emb, out = layouts.get("tok_embeddings.weight"), layouts.get("output.weight")
    if emb is None or out is None:
        return emb is None and out is None
    return emb.placements == out.placements


def _assign(model: nn.Module, name: str, tensor: torch.Tensor, layout: torch.Tensor | None, meta: torch.Tensor):
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    if isinstance(meta, DTensor):  # the DTensor reference path (not localized)
        tensor = DTensor.from_local(tensor, layout.device_mesh, layout.placements, run_check=False)
    elif tensor.shape != meta.shape:
        raise RuntimeError(f"{name}: loaded {tuple(tensor.shape)}, the model expects {tuple(meta.shape)}")
    setattr(module, leaf, nn.Parameter(tensor, requires_grad=False))
