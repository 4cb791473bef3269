"""Scoring under tensor parallelism without gathering the vocabulary: a vocab-parallel log-softmax.

Each tp rank of the last stage holds rows [start, start + V / tp) of the output layer, so its logits of a scored
position are a shard of the vocabulary. ``log p(target) = logit[target] - M - log(sum_v exp(logit[v] - M))``
needs, for each scored position, only three numbers from the whole vocabulary: its max M, its sum of
exponentials, its target's logit. Each rank computes its shard's max and sum of exponentials (against its own
max) and picks the target's logit if its shard holds it; two all-reduces combine them, as Megatron's
vocab-parallel cross entropy does (all-reduce MAX of the maxima, then all-reduce SUM of the sums, rescaled to
the common max, with the masked target logits in the same message):

- bytes per scored position: 4 (the max) + 8 (the sum and the target's logit), float32, on every rank; gathering
  the logits instead moves ``(tp - 1) / tp * V`` values to each rank (SmolLM2, V = 49,152, float32 at tp 2:
  98 KB a position, 8,000x more; a 512-token window's 255 scored positions: 25 MB against 3 KB);
- memory: a rank holds at most ``rows_at_once`` positions x V / tp logits at once, never a position's whole
  vocabulary.

The result equals one process's ``log_softmax`` but for the order of the float32 additions (max and sums per
shard, then across shards).
"""

from __future__ import annotations

from typing import Callable

import torch

from torchchat.distributed.collectives import tp_score_max, tp_score_sum


def vocab_parallel_log_probs(shard_logits: Callable[[torch.Tensor], torch.Tensor], vocab_start: int, shard_rows: int,
                             hidden: torch.Tensor, targets: torch.Tensor, group, rows_at_once: int) -> torch.Tensor:
    """log p(targets[b, t] | position t of row b): (B, T) float32, 0 where ``targets`` is -1, from the final
    hidden states (B, T, dim); ``shard_logits(h)`` (n, dim) -> (n, V / tp) is this rank's shard of the output layer,
    vocabulary rows [vocab_start, vocab_start + shard_rows), applied to ``rows_at_once`` positions at a time (the
    memory bound, as ``generate/scoring.py``'s). Every tp rank of the stage calls it with the same
    targets (two all-reduces, whatever the number of positions)."""
    scored = (targets >= 0).nonzero(as_tuple=True)  # (N,) row and position indices
    h, local = hidden[scored], targets[scored] - vocab_start  # (N, dim), (N,): the target's row in this shard
    mine = (local >= 0) & (local < shard_rows)  # (N,): this shard holds the target
    local = local.masked_fill(~mine, 0)
    maxes, sums, picked = [], [], []
    for start in range(0, h.size(0), rows_at_once):
        logits = shard_logits(h[start:start + rows_at_once]).float()  # (n, V / tp)
        top = logits.amax(dim=-1)  # (n,)
        maxes.append(top)
        sums.append((logits - top[:, None]).exp().sum(dim=-1))  # (n,), against this shard's max
        picked.append(logits.gather(-1, local[start:start + rows_at_once, None])[:, 0])  # (n,)
    shard_max = torch.cat(maxes) if maxes else h.new_zeros(0, dtype=torch.float32)  # (N,)
    top = tp_score_max(shard_max.clone(), group)  # the vocabulary's max, for one common scale
    stats = torch.stack([torch.cat(sums) * torch.exp(shard_max - top),
                         torch.cat(picked).masked_fill(~mine, 0.0)]) if maxes else h.new_zeros(2, 0)  # (2, N)
    total, target_logit = tp_score_sum(stats.float(), group)  # over the shards: the sum of exp, the target's logit
    out = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    out[scored] = target_logit - top - torch.log(total)
    return out
