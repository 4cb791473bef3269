"""Perplexity of a text, by llama.cpp's ``llama-perplexity`` protocol, so that the figures compare:

1. the whole text is tokenized once, BOS first where the tokenizer adds one;
2. it is cut into consecutive windows of ``window`` tokens; a tail that does not fill a window is dropped;
3. each window runs from position 0 (no context from the one before), its first token replaced by BOS where the
   tokenizer adds one;
4. only the second half of each window is scored: position j predicts token j + 1 for j in
   [window // 2, window - 1), so every scored token has at least half a window of context
   (``window - 1 - window // 2`` tokens a window: 255 of 512).

perplexity = exp(mean negative log-likelihood of the scored tokens), summed in float64. The windows go through
``Generator.score`` (any backend: one process, tensor or pipeline parallel).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

from torchchat.errors import ConfigError

DEFAULT_WINDOW = 512  # llama-perplexity's default -c


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    tokens: int  # scored
    windows: int
    window: int
    nll: float  # summed negative log-likelihood (nats)
    seconds: float
    tokens_per_s: float  # window tokens run (windows x window) per second

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def first_scored(window: int) -> int:
    """The first position whose prediction is scored (llama-perplexity's ``first = n_ctx / 2``)."""
    return window // 2


def windows_of(tokens: list[int], window: int, bos_id: int | None) -> list[list[int]]:
    """Consecutive windows of ``window`` tokens (the tail dropped), the first token of each replaced by ``bos_id``
    (None: kept). ConfigError if the text does not fill one window."""
    if window < 4:
        raise ConfigError(f"the window (--max-seq-length {window}) must be at least 4 tokens")
    if len(tokens) < window:
        raise ConfigError(f"the text has {len(tokens)} tokens, fewer than one window of {window}: give a longer text "
                          f"or a smaller --max-seq-length")
    out = []
    for start in range(0, len(tokens) - window + 1, window):
        w = tokens[start:start + window]
        out.append(w if bos_id is None else [bos_id, *w[1:]])
    return out


def perplexity(generator, tokens: list[int], window: int,
               progress: Callable[[int, int, float, float], None] | None = None) -> Perplexity:
    """The perplexity of ``tokens`` (the whole text, tokenized) through ``generator``; ``progress(done, total,
    perplexity so far, tokens/s)`` after each window."""
    bos = generator.tokenizer.bos_id if generator.tokenizer.add_bos else None
    windows = windows_of(tokens, window, bos)
    first = first_scored(window)
    nll, scored, done = 0.0, 0, 0
    started = time.perf_counter()

    def add(_i, log_probs):
        nonlocal nll, scored, done
        nll -= float(log_probs.double().sum())
        scored += log_probs.numel()
        done += 1
        if progress is not None:
            elapsed = time.perf_counter() - started
            progress(done, len(windows), math.exp(nll / scored), done * window / elapsed if elapsed else 0.0)

    generator.score(windows, first, add)
    seconds = time.perf_counter() - started
    return Perplexity(math.exp(nll / scored), scored, len(windows), window, nll, seconds,
                      len(windows) * window / seconds if seconds else 0.0)
