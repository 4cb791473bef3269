"""Tensor parallelism: a declarative DTensor plan, applied to the unmodified model, then made cheap.

``parallelize`` applies the plan with ``parallelize_module`` (Megatron-style: column-wise q/k/v
and w1/w3, row-wise wo and w2, a vocab-sharded embedding and output). The plan is the single
source of truth: the placements it gives each parameter decide which slice of the checkpoint a
rank loads (``shard_of``), and which collective ``localize`` installs after each module.

``localize`` then swaps every DTensor parameter for its plain local shard and replaces DTensor's
input/output hooks by plain ones: nothing for a column-wise layer, an all-reduce after a
row-wise one, an all-gather of the logits. DTensor's eager dispatch costs about 0.15-0.2 ms per
parallel linear on CPU (about 2x per token, docs: DISTRIBUTED.md); these hooks cost only the
collective itself. Without ``localize`` the model runs as DTensors (the reference, for tests).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from torchchat.distributed.collectives import tp_all_gather, tp_all_reduce
from torchchat.model import Transformer

COLUMN_WISE = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
ROW_WISE = ("attention.wo", "feed_forward.w2")


def tp_plan(model: Transformer) -> dict[str, ParallelStyle]:
    """The plan for the parts of the model this rank holds (a pipeline stage may lack some)."""
    plan: dict[str, ParallelStyle] = {}
    if model.tok_embeddings is not None:  # vocab rows split: each rank looks up its rows, then sum
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    for i in model.layers:
        plan.update({f"layers.{i}.{name}": ColwiseParallel() for name in COLUMN_WISE})
        plan.update({f"layers.{i}.{name}": RowwiseParallel() for name in ROW_WISE})
    if model.output is not None:  # vocab rows split (the same rows as a tied embedding), logits gathered
        plan["output"] = ColwiseParallel(output_layouts=Replicate())
    return plan


def parallelize(model: Transformer, tp_mesh) -> dict[str, ParallelStyle]:
    """Apply the plan (on the meta device: no data moves); each rank keeps what it will load."""
    plan = tp_plan(model)
    for fqn in plan:
        module = model.get_submodule(fqn)
        if module._forward_hooks or module._forward_pre_hooks:
            raise RuntimeError(f"{fqn} already has forward hooks; localize() would remove them")
    parallelize_module(model, tp_mesh, plan, src_data_rank=None)
    return plan


def shard_of(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a full checkpoint tensor, as the plan placed the parameter ``like``."""
    if not isinstance(like, DTensor):
        return full
    mesh, (placement,) = like.device_mesh, like.placements
    if isinstance(placement, Shard):
        full = full.chunk(mesh.size(), dim=placement.dim)[mesh.get_local_rank()]
    local = full.clone()  # a copy, so the full tensor can be freed right away
    if local.shape != like.to_local().shape:
        raise RuntimeError(f"shard of shape {tuple(local.shape)} for a local parameter of shape "
                           f"{tuple(like.to_local().shape)}")
    return local


def localize(model: Transformer, plan: dict[str, ParallelStyle], tp_mesh):
    """Plain local shards and plain collectives for the hot path, derived from the applied plan."""
    group, world, rank = tp_mesh.get_group(), tp_mesh.size(), tp_mesh.get_local_rank()
    for fqn, style in plan.items():
        module = model.get_submodule(fqn)
        _drop_dtensor_hooks(module)
        for name, param in list(module.named_parameters(recurse=False)):
            module.register_parameter(name, nn.Parameter(param.to_local(), requires_grad=False))
        _install_collective(fqn, module, style, group, world, rank)


def _drop_dtensor_hooks(module: nn.Module):
    """The hooks distribute_module added (``parallelize`` checked there were no others)."""
    for hooks in (module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs, module._forward_hooks,
                  module._forward_hooks_with_kwargs, module._forward_hooks_always_called):
        hooks.clear()


def _install_collective(fqn: str, module: nn.Module, style: ParallelStyle, group, world: int, rank: int):
    replicated_out = isinstance(style.output_layouts[0], Replicate)
    if isinstance(style, ColwiseParallel) and isinstance(module, nn.Linear):
        if replicated_out:
            module.register_forward_hook(_gather_last_position(group, world))
        # else: the output stays sharded on the last dim (heads, hidden units): no communication
    elif isinstance(style, RowwiseParallel) and isinstance(module, nn.Linear) and replicated_out:
        module.register_forward_hook(lambda _m, _args, partial: tp_all_reduce(partial, group))
    elif isinstance(style, RowwiseParallel) and isinstance(module, nn.Embedding) and replicated_out:
        _vocab_shard_lookup(module, group, rank)
    else:
        raise NotImplementedError(f"no plain-tensor version of {style} on {fqn} ({type(module).__name__})")


def _gather_last_position(group, world: int):
    """Vocab-sharded logits -> full logits, for the last position only: generation samples there
    alone, and a prompt's every position would multiply the gathered bytes by its length."""
    def hook(_module, _args, shard):  # shard: (B, T, vocab / tp)
        return tp_all_gather(shard[:, -1:], group, world)  # (B, 1, vocab)
    return hook


def _vocab_shard_lookup(embedding: nn.Embedding, group, rank: int):
    """Rows [start, start + rows) of the vocabulary: look up the tokens that fall there, zeros for
    the others, then sum over the tp ranks (what DTensor's MaskPartial does)."""
    rows = embedding.weight.shape[0]
    start = rank * rows
    outside: list[torch.Tensor] = []  # the pre-hook's mask, for the hook after the lookup

    def before(_module, args):
        (tokens,) = args  # (B, T) global ids
        local = tokens - start
        mask = (local < 0) | (local >= rows)
        outside.append(mask)
        return (local.masked_fill(mask, 0),)

    def after(_module, _args, looked_up):  # (B, T, dim)
        mask = outside.pop()
        return tp_all_reduce(looked_up.masked_fill(mask.unsqueeze(-1), 0), group)

    embedding.register_forward_pre_hook(before)
    embedding.register_forward_hook(after)
