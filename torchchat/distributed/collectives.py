"""Every communication of distributed generation, one named helper each, counted.

The sync budget (how many of each per forward step, per layer, per session) is written in
``torchchat/generate/distributed.py``'s docstring; ``tests/test_sync_budget.py`` checks these
counters against it. Nothing else in torchchat calls ``torch.distributed`` collectives during
generation: the same test counts torch.distributed's own operations too (at the dispatcher), so a
collective added outside these helpers fails it.

Waits. A rank with nothing to do waits for the next plan as long as the user takes to type (a chat), so
plans travel on groups with a very long timeout (``new_long_group``). Everything else is waited for at most
``collective_timeout()`` (TORCHCHAT_DIST_TIMEOUT_S), per operation: the rank that sends a plan waits that long
for it to be taken, and a rank that has a plan waits that long for the hidden states and logits of its step,
so that a rank that died or hung mid-step fails the others in bounded time.
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

import torch
import torch.distributed as dist

from torchchat.distributed.process_group import collective_timeout

# helper name -> calls (or point-to-point operations) on this process since the last reset
COUNTS: Counter[str] = Counter()

# Waits for a human typing (the next plan of a chat) must not time out like a step's traffic does.
LONG_TIMEOUT = timedelta(days=30)


def reset_counts():
    COUNTS.clear()


def counts() -> dict[str, int]:
    return {name: n for name, n in COUNTS.items() if n}


def new_long_group():
    """A gloo group of every rank whose waits may last as long as a human's (plans only; every rank calls it)."""
    return dist.new_group(backend="gloo", timeout=LONG_TIMEOUT)


# ----- the plan of each step (torchchat/distributed/plan.py): int64 on the CPU, on the long-timeout group -----

def send_plan(plan: torch.Tensor, dst: int, group):
    """Per forward step (and per resize, and once when a session ends): the step's plan from rank 0 to each
    other rank of the first stage, and from every stage but the last to the same tp rank of the next, before
    the sender computes. Why: only rank 0 schedules, and the other ranks keep no state; the plan says which
    rows their layers run. Returns the pending send (wait, with ``wait_step``, before reusing ``plan``).

    Point-to-point, not a broadcast, on the first stage: a gloo collective whose wait times out keeps running
    in the group's worker thread until the group's own timeout (30 days here), and the process cannot exit
    (it joins that thread); a point-to-point send that times out closes its connection instead."""
    COUNTS["send_plan"] += 1
    return dist.isend(plan, dst=dst, group=group)


def recv_plan(plan: torch.Tensor, src: int, group) -> torch.Tensor:
    """The matching receive on every rank but 0: waits as long as the next request takes."""
    COUNTS["recv_plan"] += 1
    _wait(dist.irecv(plan, src=src, group=group), None)
    return plan


# ----- hidden states and logits: the model's dtype, on the model's device -----

def send_activation(hidden: torch.Tensor, dst: int, group):
    """Per forward step on every stage but the last: its hidden states (B, T, dim) to the same tp rank of the
    next stage. Returns the pending send."""
    COUNTS["send_activation"] += 1
    return dist.isend(hidden, dst=dst, group=group)


def recv_activation(hidden: torch.Tensor, src: int, group) -> torch.Tensor:
    """The matching receive on every stage but the first, once its plan (and so the shape) arrived."""
    COUNTS["recv_activation"] += 1
    _wait(dist.irecv(hidden, src=src, group=group), collective_timeout())
    return hidden


def send_logits(logits: torch.Tensor, dst: int, group):
    """Per forward step on tp rank 0 of the last stage (pp > 1): the logits (B, V) at each row's last token to
    rank 0. Why: rank 0 samples every sequence with its own settings and generator. Returns the pending send."""
    COUNTS["send_logits"] += 1
    return dist.isend(logits, dst=dst, group=group)


def post_recv_logits(logits: torch.Tensor, src: int, group):
    """The matching receive on rank 0, posted when the step starts (so that the last stage's send completes
    while rank 0 starts the next group) and waited for with ``wait_step``. Returns the pending receive."""
    COUNTS["recv_logits"] += 1
    return dist.irecv(logits, src=src, group=group)


def send_scores(log_probs: torch.Tensor, dst: int, group):
    """Per scoring step (``Generator.score``, `eval`) on tp rank 0 of the last stage (pp > 1), instead of
    ``send_logits``: the scored positions' log-probabilities (B, T) float32 to rank 0. Why: rank 0 sums the
    text's perplexity; (B, T) float32 is what it needs, not a position's (B, V) logits. Returns the pending send."""
    COUNTS["send_scores"] += 1
    return dist.isend(log_probs, dst=dst, group=group)


def post_recv_scores(log_probs: torch.Tensor, src: int, group):
    """The matching receive on rank 0, posted when the scoring step starts, as ``post_recv_logits`` is."""
    COUNTS["recv_scores"] += 1
    return dist.irecv(log_probs, src=src, group=group)


def wait_step(work):
    """Wait for a pending send or receive of a step's traffic, at most the collective timeout."""
    _wait(work, collective_timeout())


# ----- tensor parallelism inside a stage -----

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


def tp_score_max(local_max: torch.Tensor, group) -> torch.Tensor:
    """Per scoring step on the last stage (tp > 1): the max over the vocabulary of each scored position's logits,
    (N,) float32, from each rank's max over its vocab shard. Why: every rank's sum of exponentials must be taken
    against the same max, for the shards' sums to add up (and for exp not to overflow). In place."""
    COUNTS["tp_score_max"] += 1
    dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
    return local_max


def tp_score_sum(sums: torch.Tensor, group) -> torch.Tensor:
    """Per scoring step on the last stage (tp > 1), after ``tp_score_max``: (2, N) float32, each rank's sum of
    exp(logit - max) over its vocab shard, and each target's logit where the rank's shard holds it (0 elsewhere).
    Why: the softmax's denominator is the sum over every shard, and only one rank has each target's logit. In
    place."""
    COUNTS["tp_score_sum"] += 1
    dist.all_reduce(sums, group=group)
    return sums


def _wait(work, timeout: timedelta | None):
    """``timeout`` None: the group's own (a long group's: as long as a human takes)."""
    if timeout is None:
        work.wait()
    else:
        work.wait(timeout)
