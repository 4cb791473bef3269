"""Scoring positions instead of sampling: the log-probability of the token each position predicts (``eval``).

A backend's ``forward`` takes a ``Step`` with ``targets`` (B, T) (-1 where a position is not scored) and returns
``target_log_probs`` of its hidden states: the log softmax over the vocabulary at the scored positions only.

Speed: a window scores half its positions (255 of 512), so the output layer runs on 255 rows where a prompt runs
it on one. The vocabulary is taken a slice of the output layer's rows at a time, for all the forward's scored
positions at once, with a running log-sum-exp (the max so far, the sum of exp(logit - max) rescaled when the max
grows): each slice of a quantized output layer is dequantized once a forward, not once per 256 positions (SmolLM2's
Q8_0 output, batch 4: 0.70 s of scoring a forward, measured, against fp32's 0.38 s), and the logits held at once are
positions x slice, not positions x vocabulary.
"""

from __future__ import annotations

from typing import Callable

import torch

SCORE_ROWS = 256  # positions whose logits exist at once where the output layer cannot be sliced
VOCAB_SLICE = 8192  # output rows (vocabulary entries) dequantized and multiplied at once: 18 MB of SmolLM2's in float32


def target_log_probs(output: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[b, t] | position t of row b) from the final hidden states (B, T, dim) through the output layer;
    (B, T) float32, 0 where ``targets`` is -1."""
    scored = (targets >= 0).nonzero(as_tuple=True)  # (N,) row and position indices
    h, t = hidden[scored], targets[scored]  # (N, dim), (N,)
    rows = weight_rows(output)
    if rows is None:
        scores = _by_positions(output, h, t)
    else:
        scores = _by_vocabulary_slices(rows, output.out_features, h.float(), t)
    out = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    out[scored] = scores
    return out


def weight_rows(output: torch.nn.Module) -> Callable[[int, int], torch.Tensor] | None:
    """``rows(start, end)`` -> the output layer's rows [start, end) in float32 (its ``weight_rows``, or its float
    weight sliced); None for a layer that cannot give them (then its forward is used)."""
    rows = getattr(output, "weight_rows", None)
    if rows is not None:
        return rows
    weight = getattr(output, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.dim() == 2 \
            and getattr(output, "bias", None) is None:
        return lambda start, end: weight[start:end].float()
    return None


def _by_vocabulary_slices(rows, vocab_size: int, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The log softmax at ``t`` of h @ W.T, W taken ``VOCAB_SLICE`` rows at a time: (N,) float32."""
    n = h.size(0)
    running_max = torch.full((n,), float("-inf"), device=h.device)
    running_sum = torch.zeros(n, device=h.device)
    target_logit = torch.zeros(n, device=h.device)
    for start in range(0, vocab_size, VOCAB_SLICE):
        end = min(start + VOCAB_SLICE, vocab_size)
        logits = h @ rows(start, end).T  # (N, end - start)
        new_max = torch.maximum(running_max, logits.amax(dim=-1))
        running_sum = running_sum * torch.exp(running_max - new_max) + torch.exp(logits - new_max[:, None]).sum(-1)
        running_max = new_max
        here = (t >= start) & (t < end)
        target_logit[here] = logits[here, t[here] - start]
    return target_logit - running_max - torch.log(running_sum)


def _by_positions(output: torch.nn.Module, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The layer's own forward, ``SCORE_ROWS`` positions at a time: (N,) float32."""
    parts = []
    for start in range(0, h.size(0), SCORE_ROWS):
        logits = output(h[start:start + SCORE_ROWS]).float()  # (n, V)
        parts.append(torch.log_softmax(logits, dim=-1).gather(-1, t[start:start + SCORE_ROWS, None])[:, 0])  # (n,)
    return torch.cat(parts) if parts else h.new_zeros(0)
