"""The plan of one forward step, as every rank receives it: one int64 tensor of a fixed size.

Rank 0 schedules; the other ranks keep no state of the requests: each step's plan tells them all they need
(which tokens, at which positions, in which KV cache rows), and it travels in one message whose size every
rank knows beforehand, so that a receive can be posted before the step is known:

    [kind, B, T, tokens (B * T), positions (B), rows (B), padding up to the capacity]
    [SCORE, B, T, tokens (B * T), targets (B * T), positions (B), rows (B), padding]

``RUN``: run the rows; ``VERIFY``: run them and return the logits at every position (speculative decoding:
each row's newest token and its draft tokens, ``Step.verify``); ``SCORE``: run them and score the positions whose
target is not -1 (``Generator.score``,
`eval`: the last stage returns log-probabilities, not logits); ``RESIZE``: hold B cache rows from now on (the
layout grows with them); ``GROW``: plans of scoring steps of up to T tokens (B * T) follow, the capacity grows
to fit them (a window of 512 tokens a row outgrows the scheduler's steps); ``END``: the session is over. The
capacity fits the largest step the scheduler makes: a prompt chunk of at most ``prefill_chunk`` tokens over its
request's rows (at least one token a row), or one token of each of ``max_batch`` rows (``verify_width`` tokens
when speculating: the newest token and up to k draft tokens); and, after a GROW, a
scoring step of ``score_tokens`` tokens and as many targets.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

RUN, RESIZE, END, SCORE, GROW, VERIFY = 0, 1, 2, 3, 4, 5
KINDS = {RUN: "run", RESIZE: "resize", END: "end", SCORE: "score", GROW: "grow", VERIFY: "verify"}
HEADER = 3  # kind, B, T


@dataclass(frozen=True)
class Plan:
    """A step's plan read back: ``tokens`` (B, T), ``positions`` (B,), ``rows`` (B,) for RUN and SCORE, and
    ``targets`` (B, T) for SCORE; ``batch`` for RESIZE; ``score_tokens`` for GROW."""

    kind: int
    batch: int = 0
    tokens: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    score_tokens: int = 0


@dataclass(frozen=True)
class PlanLayout:
    """The message's size for ``max_batch`` cache rows, prompt chunks of at most ``prefill_chunk`` tokens and
    scoring steps of at most ``score_tokens`` tokens (0 until a GROW)."""

    max_batch: int
    prefill_chunk: int
    score_tokens: int = 0
    verify_width: int = 1  # tokens a row of a decode step: 1, or k + 1 with speculative decoding

    def __post_init__(self):
        if self.max_batch < 1 or self.prefill_chunk < 1 or self.score_tokens < 0 or self.verify_width < 1:
            raise ValueError(f"a plan needs max_batch ({self.max_batch}) and prefill_chunk ({self.prefill_chunk}) "
                             f"of at least 1 and score_tokens ({self.score_tokens}) of at least 0")

    @property
    def max_tokens(self) -> int:
        """B * T of the largest step: a chunk (a token a row at least), or a decode (verification) step of every
        row."""
        return max(self.prefill_chunk, self.max_batch * self.verify_width)

    @property
    def capacity(self) -> int:
        return HEADER + max(self.max_tokens, 2 * self.score_tokens) + 2 * self.max_batch  # tokens and targets

    def empty(self) -> torch.Tensor:
        """A buffer to receive a plan into."""
        return torch.zeros(self.capacity, dtype=torch.long)

    def run(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor,
            targets: torch.Tensor | None = None, verify: bool = False) -> torch.Tensor:
        """tokens (B, T), positions (B,), rows (B,), targets (B, T) or None -> the message (SCORE with targets,
        VERIFY for a verification step)."""
        batch, seq_len = tokens.shape
        room = self.max_tokens if targets is None else self.score_tokens
        if batch > self.max_batch or batch * seq_len > room:
            raise ValueError(f"a step of {batch} x {seq_len} tokens exceeds the plan's {self.max_batch} rows and "
                             f"{room} tokens")
        plan = self.empty()
        plan[:HEADER] = torch.tensor([SCORE if targets is not None else VERIFY if verify else RUN, batch, seq_len])
        scored = [] if targets is None else [targets.reshape(-1)]
        body = torch.cat([tokens.reshape(-1), *scored, positions.reshape(-1), rows.reshape(-1)])  # (B * T [* 2] + 2B,)
        plan[HEADER:HEADER + body.numel()] = body
        return plan

    def resize(self, max_batch: int) -> torch.Tensor:
        plan = self.empty()
        plan[:2] = torch.tensor([RESIZE, max_batch])
        return plan

    def grow(self, score_tokens: int) -> torch.Tensor:
        """Plans of scoring steps of up to ``score_tokens`` tokens follow (sent in this layout's size)."""
        plan = self.empty()
        plan[:HEADER] = torch.tensor([GROW, 0, score_tokens])
        return plan

    def end(self) -> torch.Tensor:
        plan = self.empty()
        plan[0] = END
        return plan

    def read(self, plan: torch.Tensor) -> Plan:
        kind, batch, seq_len = plan[:HEADER].tolist()
        n = batch * seq_len * (2 if kind == SCORE else 1)  # tokens, and as many targets
        if kind not in KINDS or batch < 0 or seq_len < 0 or n + 2 * batch > self.capacity - HEADER:
            raise RuntimeError(f"a corrupt plan (kind {kind}, {batch} x {seq_len} tokens) for a layout of "
                               f"{self.max_batch} rows and {self.max_tokens} tokens")
        if kind == GROW:
            return Plan(GROW, score_tokens=seq_len)
        if kind not in (RUN, SCORE, VERIFY):
            return Plan(kind, batch)
        body = plan[HEADER:HEADER + n + 2 * batch]
        tokens = body[:batch * seq_len].view(batch, seq_len)  # (B, T)
        targets = body[batch * seq_len:n].view(batch, seq_len) if kind == SCORE else None  # (B, T)
        return Plan(kind, batch, tokens, body[n:n + batch], body[n + batch:], targets)

    def grown(self, max_batch: int) -> "PlanLayout":
        """The layout after a RESIZE to ``max_batch`` rows."""
        return replace(self, max_batch=max_batch)

    def scoring(self, score_tokens: int) -> "PlanLayout":
        """The layout after a GROW to scoring steps of ``score_tokens`` tokens."""
        return replace(self, score_tokens=score_tokens)
