"""Every communication of distributed generation, one named helper each, counted.

The sync budget (how many of each per turn, per forward step, per layer) is written in
``torchchat/generate/distributed.py``'s docstring; ``tests/test_sync_budget.py`` checks these
counters against it. Nothing else in torchchat calls ``torch.distributed`` collectives during
generation: the same test counts torch.distributed's own operations too (at the dispatcher), so a
collective added outside these helpers fails it.
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

import torch
import torch.distributed as dist

# helper name -> calls (or point-to-point operations) on this process since the last reset
COUNTS: Counter[str] = Counter()

# The per-turn broadcast waits for a human typing; it must not time out like per-token traffic does.
TURN_TIMEOUT = timedelta(days=30)


def reset_counts():
    COUNTS.clear()


def counts() -> dict[str, int]:
    return {name: n for name, n in COUNTS.items() if n}


def new_turn_group():
    """A gloo group over every rank with a very long timeout, for ``broadcast_turn`` only (once per job)."""
    return dist.new_group(backend="gloo", timeout=TURN_TIMEOUT)


def broadcast_turn(turn, group):
    """Per turn (and once at the end of a session): rank 0's request, or None, to every rank.

    Why: only rank 0 reads the user; every rank must run the same turn (tokens, sampling args,
    stop strings, cache position). Pickled: one gloo broadcast of the size, one of the bytes.
    """
    COUNTS["broadcast_turn"] += 1
    box = [turn]
    dist.broadcast_object_list(box, src=0, group=group, device=torch.device("cpu"))
    return box[0]


def broadcast_token(token: torch.Tensor, src: int) -> torch.Tensor:
    """Per forward step (prefill, then each decoded token): the sampled tokens (B,) from the rank
    that sampled them to every rank. Why: the first stage feeds them back, and every rank must
    yield the same tokens so that all stop at the same step, at any temperature."""
    COUNTS["broadcast_token"] += 1
    dist.broadcast(token, src=src)
    return token


def tp_all_reduce(partial: torch.Tensor, group) -> torch.Tensor:
    """Per row-wise layer per forward step (2 per transformer layer, 1 for a vocab-sharded
    embedding): sum the partial outputs of the tp ranks of a stage. In place."""
    COUNTS["tp_all_reduce"] += 1
    dist.all_reduce(partial, group=group)
    return partial


def tp_all_gather(shard: torch.Tensor, group, world: int) -> torch.Tensor:
    """Per forward step on the last stage: the vocab-sharded logits, concatenated along the last dim."""
    COUNTS["tp_all_gather"] += 1
    shard = shard.contiguous()
    parts = [torch.empty_like(shard) for _ in range(world)]
    dist.all_gather(parts, shard, group=group)
    return torch.cat(parts, dim=-1)


def activation_sends(ops: list) -> list:
    """Per forward step per microbatch on every stage but the last: its hidden states (mb, T, dim)
    to the same tp rank of the next stage. The pipeline schedule issues these P2P ops; counted here."""
    COUNTS["send_activation"] += len(ops)
    return ops


def activation_recvs(ops: list) -> list:
    """Per forward step per microbatch on every stage but the first: the matching receives."""
    COUNTS["recv_activation"] += len(ops)
    return ops


def stage_setup():
    """Per new activation shape of a stage (a new prompt length, the first decode step): the
    pipelining library's warm-up vote, one small send and one receive per stage boundary."""
    COUNTS["stage_setup"] += 1
