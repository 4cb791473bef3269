"""Tensor parallelism: a declarative DTensor plan, applied to the unmodified model, then made cheap.

``parallelize`` applies the plan with ``parallelize_module`` (Megatron-style: column-wise q/k/v
and w1/w3, row-wise wo and w2, a vocab-sharded embedding and output). The plan is the single
source of truth: the placements it gives each parameter decide which slice of the checkpoint a
rank loads (``shard_of``), and which collective ``localize`` installs after each module.

``localize`` then swaps every DTensor parameter for its plain local shard and replaces DTensor's
input/output hooks by plain ones: nothing for a column-wise layer, an all-reduce after the
vocab-sharded embedding; a row-wise linear becomes a ``RowwiseLinear``, which all-reduces its
partial sums in float32 and rounds them once, as one process's linear does, and the output layer a
``GatheredLinear`` (the logits' all-gather). DTensor's eager dispatch costs about 0.15-0.2 ms per
parallel linear on CPU (about 2x per token, docs: distributed.md); these cost only the collective
itself. Without ``localize`` the model runs as DTensors (the reference, for tests, in float32: it
rounds each bf16 partial sum).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from torchchat.cpu import kernels as cpu_kernels
from torchchat.cpu.decode import GemvLinear
from torchchat.distributed.collectives import tp_all_gather, tp_all_reduce
from torchchat.distributed.vocab_parallel import vocab_parallel_log_probs
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
    for layer in model.layers.values():  # this rank's share of the KV heads, for its caches (as torchtitan)
        layer.attention.n_kv_heads = model.args.n_kv_heads // tp_mesh.size()
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
        _install_collective(model, fqn, module, style, group, world, rank)


def _drop_dtensor_hooks(module: nn.Module):
    """The hooks distribute_module added (``parallelize`` checked there were no others)."""
    for hooks in (module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs, module._forward_hooks,
                  module._forward_hooks_with_kwargs, module._forward_hooks_always_called):
        hooks.clear()


def _install_collective(model: nn.Module, fqn: str, module: nn.Module, style: ParallelStyle, group, world: int,
                        rank: int):
    replicated_out = isinstance(style.output_layouts[0], Replicate)
    owner, _, name = fqn.rpartition(".")
    plain_linear = type(module) is nn.Linear and module.bias is None
    if isinstance(style, ColwiseParallel) and plain_linear:
        if replicated_out:
            setattr(model.get_submodule(owner), name, GatheredLinear(module.weight, group, world, rank))
        # else: the output stays sharded on the last dim (heads, hidden units): no communication
    elif isinstance(style, RowwiseParallel) and plain_linear and replicated_out:
        setattr(model.get_submodule(owner), name, RowwiseLinear(module.weight, group))
    elif isinstance(style, RowwiseParallel) and isinstance(module, nn.Embedding) and replicated_out:
        _vocab_shard_lookup(module, group, rank)
    else:
        raise NotImplementedError(f"no plain-tensor version of {style} on {fqn} ({type(module).__name__})")


class RowwiseLinear(nn.Module):
    """A row-wise parallel linear (``wo``, ``w2``) on its plain local shard: this rank's partial sums over
    its slice of the input features, all-reduced over the tp group.

    The partial sums stay in float32 through the all-reduce and are rounded to the model's dtype once,
    after it, as one process's linear rounds its float32 accumulator once: they differ from one process's
    only by the order of the float32 additions, which now and then moves a bf16 value to its neighbour
    (SmolLM2's shapes at TP 3: about 1 in 10^4). Rounding each partial sum to bf16 and adding them in bf16,
    as DTensor's RowwiseParallel does, moved 38% of them at the tiny model's shapes, and greedy runs of 32
    tokens parted from one process's on 4 of 8 prompts (now 0 of 8 against its modules; docs/distributed.md).
    Cost: a bf16 model's all-reduces carry float32, twice the bytes, in the same number.

    That is on CPU, where the float32 sums come free (the gemv op sums in float32; a prompt's bf16 linears run
    as float32 GEMMs anyway, as in LocalGenerator). Elsewhere (CUDA, not measured here: no GPU) the partial
    sums stay in the model's dtype as before: a float32 copy of the weight at every step would cost more
    than the linear itself.
    """

    def __init__(self, weight: nn.Parameter, group):
        super().__init__()
        self.weight = weight  # (out, in / tp): the input features are split
        self.group = group  # the tp group of this rank's stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in / tp)
        return tp_all_reduce(_partial_sums(x, self.weight), self.group).to(x.dtype)  # (..., out)


def _partial_sums(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T``: in float32 on CPU, whatever the weight's float dtype; elsewhere in x's dtype."""
    if x.device.type != "cpu":
        return F.linear(x, weight)  # (..., out)
    x = x.float()
    if cpu_kernels.supports(x, weight):  # one row (a batch-1 decode step): the op LocalGenerator uses
        return torch.ops.torchchat.gemv(x, weight)  # (..., out), float32
    if weight.dtype in (torch.float32, torch.bfloat16) and weight.is_contiguous() and cpu_kernels.takes_prompt(x):
        return torch.ops.torchchat.prompt_linear(x, weight)  # (..., out): a prompt, on the kernels' threads
    if weight.dtype == torch.float32:
        return F.linear(x, weight)
    return cpu_kernels.float32_linear(x, weight.size(0), lambda start, end: weight[start:end].float())


class GatheredLinear(GemvLinear):
    """A column-wise parallel linear whose output is replicated (the output layer): this rank's vocab
    shard of the logits, for the last position only, all-gathered. Generation samples there alone, and
    a prompt's every position would multiply the work and the gathered bytes by its length. The shard is
    computed as one process computes its rows (``GemvLinear``: the gemv op for one row on CPU).

    Scoring (``log_probs``) gathers nothing: a vocab-parallel log-softmax (``vocab_parallel.py``)."""

    def __init__(self, weight: nn.Parameter, group, world: int, rank: int):
        super().__init__(weight)  # (vocab / tp, dim): rows [rank * vocab / tp, (rank + 1) * vocab / tp)
        self.group, self.world, self.rank = group, world, rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, dim)
        return tp_all_gather(super().forward(x[:, -1:]), self.group, self.world)  # (B, 1, vocab)

    def every_position(self, x: torch.Tensor) -> torch.Tensor:
        """A verification step's logits (speculative decoding): every position's, gathered, (B, T, vocab)."""
        return tp_all_gather(super().forward(x), self.group, self.world)  # (B, T, vocab)

    def log_probs(self, hidden: torch.Tensor, targets: torch.Tensor, rows_at_once: int) -> torch.Tensor:
        """hidden (B, T, dim), targets (B, T) (-1: not scored) -> (B, T) float32 log-probabilities of the targets,
        as ``generate/scoring.target_log_probs`` gives them, from this rank's vocab shard and two all-reduces."""
        return vocab_parallel_log_probs(super().forward, self.rank * self.out_features, self.out_features, hidden,
                                        targets, self.group, rows_at_once)


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
