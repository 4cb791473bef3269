"""Speculative decoding: a drafter proposes up to ``k`` tokens for a sequence, the target model checks them all
in one forward over their positions (a verification step, ``Step.drafts``), and the sequence keeps the longest
prefix the target agrees with plus the target's own next token: 1 to k + 1 tokens a forward.

- Greedy: a draft token is kept while it is the target's argmax at its position; the token after is the
  target's argmax. The output is the target's greedy output (see docs/speculative.md for the rounding of a
  several-position forward against a one-token one).
- Sampled: the standard rejection rule (Leviathan et al. 2023; Chen et al. 2023): draft token x, drawn from the
  drafter's q, is kept with probability min(1, p(x) / q(x)), p the target's distribution with the request's
  temperature, top-k and top-p; at the first rejection the token is drawn from max(p - q, 0) renormalized;
  if all are kept, the next token from p. The tokens then follow p exactly, whatever q; every draw uses the
  sequence's own generator, so a seeded request is reproducible. A drafter that proposes without sampling
  (prompt lookup, or greedy drafting) has q one-hot at its token.

Rolling back is free: the KV caches are indexed by position and attention is masked by position, so the
rejected positions' keys and values are never read and are overwritten by the next tokens there.

Drafters:

- ``PromptLookupDrafter``: the tokens that followed the latest earlier occurrence of the context's last n-gram
  (n from ``ngram`` down to 1), as transformers' prompt lookup and llama.cpp's n-gram drafting do; no model.
- ``ModelDrafter``: a smaller model with the same vocabulary (or the target's own weights in int4), on a
  LocalGenerator of its own, whose KV cache has a row for each of the target's (the same slot): it feeds each
  row only what that row does not hold yet.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from torchchat.errors import ConfigError
from torchchat.generate.sampling import probabilities
from torchchat.generate.step import Step

SINGLE_STEPS = 4  # a draft model feeds this many tokens or fewer as one-position steps
MAX_SPECULATE_K = 32  # draft tokens a verification; more only add positions the target computes and discards


def check_speculate_k(k: int, max_seq_len: int):
    """ConfigError unless 1 <= k <= min(MAX_SPECULATE_K, max_seq_len - 2)."""
    most = min(MAX_SPECULATE_K, max_seq_len - 2)
    if not 1 <= k <= most:
        raise ConfigError(f"--speculate-k ({k}) must be between 1 and {most} (at most {MAX_SPECULATE_K}, and a "
                          f"verification of k + 1 positions must fit in the context of {max_seq_len} tokens)")


@dataclass
class Draft:
    """Up to k proposed tokens; ``probs`` (n, V) float32: the distribution each was drawn from, None when the
    drafter chose them without sampling (q one-hot)."""

    tokens: list[int]
    probs: torch.Tensor | None = None


class Drafter(ABC):
    """Proposes tokens for a sequence; ``k``: the most a verification checks."""

    def __init__(self, k: int):
        if k < 1:
            raise ConfigError(f"--speculate-k ({k}) must be at least 1")
        self.k = k

    @abstractmethod
    def propose(self, context: list[int], slot: int, most: int, args, rng: torch.Generator) -> Draft:
        """At most ``most`` tokens to follow ``context`` (the sequence's tokens so far: prompt and generated, its
        newest one last), for the sequence in KV cache row ``slot``; ``args``: its GenerationArgs."""

    def resize(self, max_batch: int):
        """The target now has ``max_batch`` cache rows. A drafter without caches: nothing to do."""
        return None

    def forget(self):
        """The target's caches were reset (a failed step): nothing held is trusted. Without caches: nothing."""
        return None


class PromptLookupDrafter(Drafter):
    """Drafts by copying: the tokens after the latest earlier occurrence of the context's last ``ngram`` tokens
    (then ``ngram - 1``, down to 1)."""

    def __init__(self, k: int, ngram: int):
        super().__init__(k)
        if ngram < 1:
            raise ConfigError(f"--prompt-lookup ({ngram}) must be at least 1 (the n-gram length matched)")
        self.ngram = ngram

    def propose(self, context: list[int], slot: int, most: int, args, rng: torch.Generator) -> Draft:
        return Draft(lookup(context, self.ngram, most))


def lookup(context: list[int], ngram: int, most: int) -> list[int]:
    """The (at most ``most``) tokens after the latest earlier occurrence of context's last n tokens, for the
    longest n <= ngram that occurs earlier; [] if none does."""
    if most < 1:
        return []
    end = len(context)
    for n in range(min(ngram, end - 1), 0, -1):
        tail = context[end - n:]
        for start in range(end - n - 1, -1, -1):  # latest first; the tail itself (start = end - n) excluded
            if context[start:start + n] == tail:
                return context[start + n:start + n + most]
    return []


class ModelDrafter(Drafter):
    """Drafts with a model of its own: ``generator``, a LocalGenerator with the target's context length and cache
    rows. Greedy requests get its argmax tokens; sampled ones draw from its distribution with the request's
    settings and generator (and their ``probs`` go to the rejection rule)."""

    def __init__(self, k: int, generator, chunk: int = 256):
        super().__init__(k)
        self.gen = generator
        self.chunk = chunk  # prompt tokens a forward, as the target's scheduler feeds them
        self.held: list[list[int]] = [[] for _ in range(generator.max_batch)]  # each draft cache row's tokens

    def resize(self, max_batch: int):
        if max_batch != self.gen.max_batch:
            self.gen.resize_batch(max_batch)
            self.held = [[] for _ in range(max_batch)]

    def forget(self):
        self.held = [[] for _ in self.held]

    def propose(self, context: list[int], slot: int, most: int, args, rng: torch.Generator) -> Draft:
        if most < 1:
            return Draft([])
        start = min(_common_prefix(self.held[slot], context), len(context) - 1)  # one token fed at least
        self.held[slot] = context[:start]  # until this call ends well
        logits = self._feed(context[start:], start, slot)  # (V,) after the newest token
        position, tokens, probs = len(context), [], []
        while True:
            token, q = self._choose(logits, args, rng)
            tokens.append(token)
            if q is not None:
                probs.append(q)
            if position >= self.gen.max_seq_len:
                break
            # every draft token is fed, the last one too: whether the target keeps all of them (then its own next
            # token follows the last) or rejects one (then its token replaces it), the next call feeds one token,
            # a fast one-position step, not a several-position forward
            logits = self._feed([token], position, slot)
            position += 1
            if len(tokens) == most:
                break
        self.held[slot] = context + tokens[:position - len(context)]
        return Draft(tokens, torch.stack(probs) if probs else None)

    def _feed(self, tokens: list[int], position: int, slot: int) -> torch.Tensor:
        """Feed ``tokens`` at ``position`` in row ``slot`` (a long context in chunks, a few tokens one at a time:
        a one-position step reads quantized weights as they are, a longer forward dequantizes them); the logits
        (V,) after them."""
        size = 1 if len(tokens) <= SINGLE_STEPS else self.chunk
        for begin in range(0, len(tokens), size):
            piece = tokens[begin:begin + size]
            step = Step(torch.tensor([piece], dtype=torch.long), torch.tensor([position + begin]),
                        torch.tensor([slot]))
            logits = self.gen.forward(step)[0]  # (V,)
        return logits

    @staticmethod
    def _choose(logits: torch.Tensor, args, rng: torch.Generator) -> tuple[int, torch.Tensor | None]:
        if args.temperature == 0:
            return int(logits.argmax()), None
        q = probabilities(logits.view(1, -1), args.temperature, args.top_k, args.top_p)[0]  # (V,)
        return int(torch.multinomial(q, 1, generator=rng)), q


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


# ---------------------------------------------------------------------------------------------
# Verification: which of a draft's tokens the target keeps, and the token after them


def verify_greedy(logits: torch.Tensor, draft: list[int]) -> list[int]:
    """logits (n + 1, V): the target's at the sequence's newest token and at each draft token -> the kept draft
    tokens and the target's next token (1 to n + 1 tokens)."""
    best = logits.argmax(dim=-1).tolist()  # (n + 1,)
    kept = next((j for j, token in enumerate(draft) if best[j] != token), len(draft))
    return draft[:kept] + [best[kept]]


def verify_sampled(logits: torch.Tensor, draft: Draft, args, rng: torch.Generator) -> list[int]:
    """logits (n + 1, V) as in ``verify_greedy``; the rejection rule (module docstring) with ``args``' temperature,
    top-k and top-p and the sequence's generator ``rng``."""
    p = probabilities(logits, args.temperature, args.top_k, args.top_p)  # (n + 1, V)
    out = []
    for j, token in enumerate(draft.tokens):
        q_token = 1.0 if draft.probs is None else float(draft.probs[j, token])
        u = float(torch.rand((), generator=rng))
        if u * q_token < float(p[j, token]):  # u < p / q, without dividing by a q of 0 (never drawn then)
            out.append(token)
            continue
        if draft.probs is None:  # q one-hot at token: max(p - q, 0) is p without the token
            residual = p[j].clone()
            residual[token] = 0
        else:
            residual = (p[j] - draft.probs[j]).clamp_(min=0)
        total = float(residual.sum())
        # p == q on the drafted support leaves nothing to renormalize: rejection had probability 0, so only
        # rounding got here; draw from p itself
        out.append(int(torch.multinomial(residual / total if total > 0 else p[j], 1, generator=rng)))
        return out
    out.append(int(torch.multinomial(p[len(draft.tokens)], 1, generator=rng)))
    return out
