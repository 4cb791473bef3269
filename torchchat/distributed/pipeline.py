"""Pipeline parallelism by hand: the stage split, and how each step moves through the stages.

``trim_to_stage`` deletes what a stage does not own (other layers; the embedding before the first stage; the
norm and output after the last), so parameter names and the KV cache of the kept layers are the model's own.

``StepRoute`` moves a step's plan (``plan.py``), hidden states and logits between the ranks of the
("pp", "tp") mesh, one stage being the whole model when pp == 1. Rank 0 (tp rank 0 of the first stage)
schedules:

- rank 0 sends each plan to the other ranks of the first stage (its tp peers);
- tp rank j of stage s > 0 receives the plan, then the hidden states (B, T, dim), from tp rank j of stage
  s - 1; the plan goes on before a stage computes, the hidden states after. Every rank but 0 receives one
  plan a step: the messages of a broadcast, each waited for on its own (``collectives.send_plan`` says why);
- tp rank 0 of the last stage sends the logits (B, V) to rank 0, which posted the receive when it started
  the step: rank 0 starts the next group of sequences while this one is in the pipe (no drain per token).
  A scoring step (its plan carries targets) sends the scored positions' log-probabilities (B, T) float32
  instead, the same way: windows flow through the stages as continuously as decode steps.

Point-to-point transfers between stages are written out here, not taken from ``torch.distributed.pipelining``:
its schedules wait for each step's tokens (a drain per token), its stages have static shapes, and a
hand-written continuous pipeline measured 70 tok/s against GPipe's 50 on 2 stages (shared/DISTRIBUTED.md).
"""

from __future__ import annotations

from collections import deque

import torch

from torchchat.distributed.collectives import (post_recv_logits, post_recv_scores, recv_activation, recv_plan,
                                               send_activation, send_logits, send_plan, send_scores, wait_step)
from torchchat.model import Transformer


def trim_to_stage(model: Transformer, layers: range, stage: int, num_stages: int):
    """Keep ``layers`` (global indices, names unchanged) and what the stage's place in the pipeline needs."""
    for name in list(model.layers):
        if int(name) not in layers:
            del model.layers[name]
    if stage > 0:
        model.tok_embeddings = None  # receives hidden states
    if stage < num_stages - 1:
        model.norm = None  # sends hidden states
        model.output = None


class StepRoute:
    """This rank's links for each step (see the module docstring).

    ``plan_group``: a long-timeout group of every rank (plans); ``pp_group``: this tp rank's pipeline group
    (hidden states); ``logits_group``: rank 0 and the last stage's tp rank 0 (logits; None with one stage). On
    NCCL a communicator runs its transfers in the order they were issued: rank 0's pending receive of a step's
    logits must not hold up its next step's hidden states.
    """

    def __init__(self, mesh, rank: int, plan_group, pp_group, logits_group, device: torch.device,
                 dtype: torch.dtype, dim: int, vocab_size: int):
        grid = mesh.mesh  # (pp, tp) global ranks
        self.stage, tp_rank = mesh.get_local_rank("pp"), mesh.get_local_rank("tp")
        self.num_stages = grid.size(0)
        self.rank = rank
        self.io_rank = int(grid[0, 0])
        self.logits_rank = int(grid[-1, 0])  # sends the logits to rank 0
        self.prev = int(grid[self.stage - 1, tp_rank]) if not self.is_first else None  # hidden states from
        self.next = int(grid[self.stage + 1, tp_rank]) if not self.is_last else None  # hidden states to
        self.plan_from = self.prev if not self.is_first else self.io_rank if rank != self.io_rank else None
        self.plan_to = [int(r) for r in grid[0, 1:]] if rank == self.io_rank else []  # rank 0's tp peers
        if self.next is not None:
            self.plan_to.append(self.next)
        self.plan_group, self.pp_group, self.logits_group = plan_group, pp_group, logits_group
        self.device, self.dtype, self.dim, self.vocab_size = device, dtype, dim, vocab_size
        # Pending sends and the tensors they read, of the latest step and of the one before
        self._sends: list[tuple[object, torch.Tensor]] = []
        self._older_sends: list[tuple[object, torch.Tensor]] = []
        self._logits: deque[tuple[object | None, torch.Tensor]] = deque()  # rank 0: (pending receive, logits)

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    def share_plan(self, plan: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``plan`` to this rank (in place into ``plan`` elsewhere), then on to the ranks it goes to
        from here. Begins a step."""
        self._flush(self._older_sends)  # two steps back: taken by now, or about to be
        self._older_sends, self._sends = self._sends, []
        if self.plan_from is not None:
            recv_plan(plan, self.plan_from, self.plan_group)
        for dst in self.plan_to:
            self._sends.append((send_plan(plan, dst, self.plan_group), plan))
        return plan

    def hidden_in(self, batch: int, seq_len: int) -> torch.Tensor:
        """The previous stage's hidden states (B, T, dim) for the plan just shared (stages after the first)."""
        hidden = torch.empty(batch, seq_len, self.dim, dtype=self.dtype, device=self.device)
        return recv_activation(hidden, self.prev, self.pp_group)

    def expect_logits(self, batch: int, positions: int | None = None):
        """Rank 0, when it starts a step that another rank finishes: post the receive of its logits (B, V), or
        (B, T, V) at every position of a verification step (``positions`` = T)."""
        if self.rank == self.io_rank and self.rank != self.logits_rank:
            shape = (batch, self.vocab_size) if positions is None else (batch, positions, self.vocab_size)
            logits = torch.empty(shape, dtype=self.dtype, device=self.device)
            self._logits.append((post_recv_logits(logits, self.logits_rank, self.logits_group), logits))

    def expect_scores(self, batch: int, seq_len: int):
        """Rank 0, when it starts a scoring step that another rank finishes: post the receive of its (B, T)
        float32 log-probabilities."""
        if self.rank == self.io_rank and self.rank != self.logits_rank:
            scores = torch.empty(batch, seq_len, dtype=torch.float32, device=self.device)
            self._logits.append((post_recv_scores(scores, self.logits_rank, self.logits_group), scores))

    def pass_on(self, out: torch.Tensor, scores: bool = False):
        """After this rank's layers: hidden states (B, T, dim) to the next stage, or the last stage's logits (B, V)
        (``scores``: a scoring step's log-probabilities (B, T) float32) to rank 0 (kept here when this is rank 0)."""
        expected = torch.float32 if scores and self.is_last else self.dtype
        if out.dtype != expected:
            raise RuntimeError(f"stage {self.stage} made {out.dtype} outputs; their receiver expects {expected}")
        out = out.contiguous()
        if not self.is_last:
            self._sends.append((send_activation(out, self.next, self.pp_group), out))
        elif self.rank == self.io_rank:
            self._logits.append((None, out))
        elif self.rank == self.logits_rank:
            send = send_scores if scores else send_logits
            self._sends.append((send(out, self.io_rank, self.logits_group), out))

    def take_logits(self) -> torch.Tensor:
        """Rank 0: the logits (B, V) (or a scoring step's (B, T) log-probabilities) of the oldest step started and
        not yet taken."""
        work, logits = self._logits.popleft()
        if work is not None:
            wait_step(work)
        return logits

    def drain(self):
        """Wait for every pending transfer (a session's end; logits nobody took are dropped)."""
        while self._logits:
            self.take_logits()
        self._flush(self._older_sends)
        self._flush(self._sends)

    @staticmethod
    def _flush(sends: list):
        for work, _ in sends:
            wait_step(work)
        sends.clear()
