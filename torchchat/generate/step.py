"""One forward step of a generator, as the scheduler makes it and a backend runs it (``Generator.forward``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from torchchat.generate.requests import Sequence


@dataclass
class Step:
    """One forward: B rows of T tokens, row i at positions [positions[i], positions[i] + T) of cache row rows[i]."""

    tokens: torch.Tensor  # (B, T) int64
    positions: torch.Tensor  # (B,) int64
    rows: torch.Tensor  # (B,) int64
    sequences: list[Sequence] = field(repr=False, default_factory=list)  # the scheduler's, on the scheduling process
    prefill: bool = False  # a prompt chunk (one request's rows)
    last_chunk: bool = True  # a prompt chunk that ends the prompt: its logits give the first tokens
    # Scoring (Generator.score): (B, T) int64, the token each position predicts, -1 where not scored; the forward
    # then returns each scored position's log-probability of its target, (B, T) float32 (0 elsewhere), not logits.
    targets: torch.Tensor | None = None
    # Verification (speculative.py): row i feeds its newest token, its draft's tokens, then padding up to T (computed
    # and discarded); the forward returns the logits at every position, (B, T, V). ``drafts``: the scheduler's, on
    # the scheduling process; the other processes of a distributed generator know only ``verify``.
    verify: bool = False
    drafts: list | None = field(repr=False, default=None)  # speculative.Draft, one a row

    @property
    def input_pos(self) -> torch.Tensor:
        """(B, T): each row's positions."""
        return self.positions.view(-1, 1) + torch.arange(self.tokens.size(1), device=self.positions.device)
