"""Scoring positions instead of sampling: the log-probability of the token each position predicts (``eval``).

A backend's ``forward`` takes a ``Step`` with ``targets`` (B, T) (-1 where a position is not scored) and returns
``target_log_probs`` of its hidden states: log softmax over the vocabulary at the scored positions only, a bounded
number of positions' logits at a time.
"""

from __future__ import annotations

import torch

SCORE_ROWS = 256  # positions whose logits exist at once: 256 x SmolLM2's 49,152 in float32 is 50 MB


def target_log_probs(output: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[b, t] | position t of row b) from the final hidden states (B, T, dim) through the output layer;
    (B, T) float32, 0 where ``targets`` is -1."""
    scored = (targets >= 0).nonzero(as_tuple=True)  # (N,) row and position indices
    h, t = hidden[scored], targets[scored]  # (N, dim), (N,)
    parts = []
    for start in range(0, h.size(0), SCORE_ROWS):
        logits = output(h[start:start + SCORE_ROWS]).float()  # (n, V)
        parts.append(torch.log_softmax(logits, dim=-1).gather(-1, t[start:start + SCORE_ROWS, None])[:, 0])  # (n,)
    out = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    if parts:
        out[scored] = torch.cat(parts)
    return out
