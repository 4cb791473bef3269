"""A request in the schedule and its sequences: what each sequence has generated, when it stops, its text.

A ``Request`` is one turn (``Turn``: prompt tokens and ``GenerationArgs``); it becomes ``num_samples``
sequences, each with its own KV cache row (slot), position, random generator and text stream. The
scheduler (``scheduler.py``) feeds them; these classes only keep their state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from torchchat.generate.args import GenerationArgs, SEED_LIMIT
from torchchat.generate.sampling import sample
from torchchat.generate.stats import GenerationStats
from torchchat.generate.streaming import TextStreamer

# Sample i > 0 of a seeded request draws from seed + i * this (mod 2**64): sample 0 keeps the request's seed, so a
# request's first sample is the same text whatever num_samples it asks for (the golden ratio spreads the seeds).
_SAMPLE_SEED_STRIDE = 0x9E3779B97F4A7C15


@dataclass
class Turn:
    """What one request sends to the model: the tokens of the whole conversation so far and how to generate.

    The scheduler reuses whatever prefix of ``tokens`` a free cache row still holds (a chat's history), so a
    caller always sends everything."""

    tokens: list[int]
    args: GenerationArgs


@dataclass
class Completion:
    """One generated sequence."""

    tokens: list[int]
    text: str
    finish_reason: str  # "stop" (a stop token or string) or "length" (max_new_tokens)
    stop_token: int | None = None


class Completions(list[Completion]):
    """A request's result: one Completion per sequence (a list), and the request's figures in ``stats``."""

    def __init__(self, completions: list[Completion], stats: GenerationStats):
        super().__init__(completions)
        self.stats = stats


# on_text(index, text): a piece of sequence ``index``'s text; on_done(request): every sequence ended (or failed)
TextCallback = Callable[[int, str], None]


class Sequence:
    """One sequence of a request: its cache row, the tokens still to feed, what it generated, whether it stopped."""

    def __init__(self, request: "Request", index: int, rng: torch.Generator):
        self.request = request
        self.index = index  # which of the request's samples
        self.rng = rng
        self.slot = -1  # its KV cache row, once admitted
        self.pos = 0  # tokens already in its cache row
        self.pending: list[int] = []  # tokens to feed next: the prompt's unfed part, then the newest token
        self.generated: list[int] = []
        self.stop_token: int | None = None
        self.stopped_by_text = False
        # speculative decoding (scheduler.py): decode steps left without a draft, and the next such pause's length
        self.draft_pause = 0
        self.draft_backoff = 0
        self.streamer = TextStreamer(request.tokenizer, request.turn.tokens, skip_ids=request.stop_ids)

    @property
    def decoding(self) -> bool:
        """Its prompt is in the cache: each step feeds its newest token."""
        return bool(self.generated)

    @property
    def finished(self) -> bool:
        return (self.stop_token is not None or self.stopped_by_text
                or len(self.generated) >= self.request.turn.args.max_new_tokens)

    def accept(self, token: int):
        """A new token: record it, check the stop conditions, stream its text."""
        request = self.request
        self.generated.append(token)
        if token in request.stop_ids:
            self.stop_token = token
        elif request.stop_text is not None and request.stop_text(self.generated):
            self.stopped_by_text = True
        self.pending = [token]
        if request.on_text is not None:
            request.on_text(self.index, self.streamer.push(token))

    def sample(self, logits: torch.Tensor) -> int:
        """The next token from this sequence's logits (V,) with its request's settings and its own generator."""
        a = self.request.turn.args
        return int(sample(logits.view(1, -1), a.temperature, a.top_k, a.top_p, self.rng)[0])

    def completion(self) -> Completion:
        tokens, stop = self.generated, self.request.turn.args.stop
        if not self.request.with_text:
            return Completion(tokens, "", "length")
        text = self.request.tokenizer.decode(tokens[:-1] if self.stop_token is not None else tokens)
        if self.stopped_by_text:
            text = text[:min(text.find(s) for s in stop if s in text)]
        finished = self.stop_token is not None or self.stopped_by_text
        return Completion(tokens, text, "stop" if finished else "length", self.stop_token)


class Request:
    """A turn in the schedule: its sequences, their text streams, and when all have ended, ``completions``."""

    def __init__(self, turn: Turn, tokenizer, stop_ids: frozenset[int], stop_text: Callable[[list[int]], bool] | None,
                 device: torch.device, on_text: TextCallback | None = None,
                 on_done: Callable[["Request"], None] | None = None, with_text: bool = True):
        self.turn = turn
        self.with_text = with_text  # False: token ids only, no text (benchmarks: no stops, no detokenizing)
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.stop_text = stop_text
        self.on_text = on_text
        self.on_done = on_done
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.stats = GenerationStats(batch=turn.args.num_samples, prompt_tokens=len(turn.tokens))
        self.completions: Completions | None = None
        self.error: BaseException | None = None
        seed = turn.args.seed if turn.args.seed is not None else int(torch.randint(0, 2**62, ()).item())
        self.sequences = [Sequence(self, i, torch.Generator(device=device).manual_seed(
            (seed + i * _SAMPLE_SEED_STRIDE) % SEED_LIMIT)) for i in range(turn.args.num_samples)]

    @property
    def done(self) -> bool:
        return self.completions is not None or self.error is not None

    def first_tokens(self):
        """Every sequence has its first token: the time to first token is known."""
        self.first_token_at = time.perf_counter()
        self.stats.ttft_s = self.first_token_at - self.submitted

    def finish(self, error: BaseException | None = None):
        """Every sequence ended (or ``error`` ended them all): flush the streams, build the completions."""
        now = time.perf_counter()
        s = self.stats
        s.new_tokens = max(len(seq.generated) for seq in self.sequences)
        if self.first_token_at is not None:
            s.decode_s = now - self.first_token_at
        if error is not None:
            self.error = error
        else:
            if self.on_text is not None:
                for seq in self.sequences:
                    if text := seq.streamer.flush():
                        self.on_text(seq.index, text)
            self.completions = Completions([seq.completion() for seq in self.sequences], s)
        if self.on_done is not None:
            self.on_done(self)
