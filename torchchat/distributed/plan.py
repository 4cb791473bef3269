"""The plan of one forward step, as every rank receives it: one int64 tensor of a fixed size.

Rank 0 schedules; the other ranks keep no state of the requests: each step's plan tells them all they need
(which tokens, at which positions, in which KV cache rows), and it travels in one message whose size every
rank knows beforehand, so that a receive can be posted before the step is known:

    [kind, B, T, tokens (B * T), positions (B), rows (B), padding up to the capacity]

``RUN``: run the rows; ``RESIZE``: hold B cache rows from now on (the layout grows with them); ``END``: the
session is over. The capacity fits the largest step the scheduler makes: a prompt chunk of at most
``prefill_chunk`` tokens over its request's rows (at least one token a row), or one token of each of
``max_batch`` rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RUN, RESIZE, END = 0, 1, 2
KINDS = {RUN: "run", RESIZE: "resize", END: "end"}
HEADER = 3  # kind, B, T


@dataclass(frozen=True)
class Plan:
    """A step's plan read back: ``tokens`` (B, T), ``positions`` (B,), ``rows`` (B,) for RUN; ``batch`` for RESIZE."""

    kind: int
    batch: int = 0
    tokens: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    rows: torch.Tensor | None = None


@dataclass(frozen=True)
class PlanLayout:
    """The message's size for ``max_batch`` cache rows and prompt chunks of at most ``prefill_chunk`` tokens."""

    max_batch: int
    prefill_chunk: int

    def __post_init__(self):
        if self.max_batch < 1 or self.prefill_chunk < 1:
            raise ValueError(f"a plan needs max_batch ({self.max_batch}) and prefill_chunk ({self.prefill_chunk}) "
                             f"of at least 1")

    @property
    def max_tokens(self) -> int:
        """B * T of the largest step: a chunk (a token a row at least), or a decode step of every row."""
        return max(self.prefill_chunk, self.max_batch)

    @property
    def capacity(self) -> int:
        return HEADER + self.max_tokens + 2 * self.max_batch

    def empty(self) -> torch.Tensor:
        """A buffer to receive a plan into."""
        return torch.zeros(self.capacity, dtype=torch.long)

    def run(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """tokens (B, T), positions (B,), rows (B,) -> the message."""
        batch, seq_len = tokens.shape
        if batch > self.max_batch or batch * seq_len > self.max_tokens:
            raise ValueError(f"a step of {batch} x {seq_len} tokens exceeds the plan's {self.max_batch} rows and "
                             f"{self.max_tokens} tokens")
        plan = self.empty()
        plan[:HEADER] = torch.tensor([RUN, batch, seq_len])
        body = torch.cat([tokens.reshape(-1), positions.reshape(-1), rows.reshape(-1)])  # (B * T + 2 * B,)
        plan[HEADER:HEADER + body.numel()] = body
        return plan

    def resize(self, max_batch: int) -> torch.Tensor:
        plan = self.empty()
        plan[:2] = torch.tensor([RESIZE, max_batch])
        return plan

    def end(self) -> torch.Tensor:
        plan = self.empty()
        plan[0] = END
        return plan

    def read(self, plan: torch.Tensor) -> Plan:
        kind, batch, seq_len = plan[:HEADER].tolist()
        if kind not in KINDS or batch < 0 or seq_len < 0 or batch * seq_len + 2 * batch > self.capacity - HEADER:
            raise RuntimeError(f"a corrupt plan (kind {kind}, {batch} x {seq_len} tokens) for a layout of "
                               f"{self.max_batch} rows and {self.max_tokens} tokens")
        if kind != RUN:
            return Plan(kind, batch)
        n = batch * seq_len
        body = plan[HEADER:HEADER + n + 2 * batch]
        tokens = body[:n].view(batch, seq_len)  # (B, T)
        return Plan(RUN, batch, tokens, body[n:n + batch], body[n + batch:])

    def grown(self, max_batch: int) -> "PlanLayout":
        """The layout after a RESIZE to ``max_batch`` rows."""
        return PlanLayout(max_batch, self.prefill_chunk)
