"""Generator: everything about generation that does not depend on where the model runs.

A backend subclasses ``Generator`` and overrides two mid-level methods:

- ``prefill(tokens, start_pos)``: run the prompt through the model, return the first new token;
- ``decode_n_tokens(token, start_pos, n)``: yield up to ``n`` further tokens, one per step.

Both choose tokens with ``self.sample(logits)``, which applies the current request's sampling
settings. A multi-process backend may also override ``share_input`` (how the user's input,
read on one process, reaches the others) and sets ``is_io_rank`` False on the processes that
must not talk to the user. Everything else (encoding prompts and chat turns, stop conditions,
streaming text, statistics) lives here. See docs/backends.md for a complete example.
"""

from __future__ import annotations

import math
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, TextIO

import torch

from torchchat.errors import ConfigError, ContextFull
from torchchat.generate.sampling import sample
from torchchat.generate.stats import GenerationStats
from torchchat.generate.streaming import TextStreamer
from torchchat.model import ModelArgs


SEED_LIMIT = 2**64  # seeds are in [0, 2**64): what torch.Generator.manual_seed takes, unsigned
# Each sample is one more row of the KV cache and of every activation: 64 rows of a 2048-token cache are
# 3 GB for SmolLM2-135M, 17 GB for Llama 3.1 8B (float16 caches); more would exhaust memory mid-request.
MAX_NUM_SAMPLES = 64
MAX_STOP_STRINGS = 4  # as OpenAI allows
MAX_STOP_CHARS = 1000  # per stop string: each generated token is checked against this much recent text


@dataclass
class GenerationArgs:
    """How to generate: validated at construction, one per request."""

    max_new_tokens: int = 200
    temperature: float = 0.8  # 0: greedy
    top_k: int | None = 200  # None: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    seed: int | None = None  # None: a random seed
    num_samples: int = 1  # sequences generated at once from the same prompt
    stop: tuple[str, ...] = ()  # text that ends a sequence (checked on every process: all stop alike)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens ({self.max_new_tokens}) must be at least 1")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ConfigError(f"--temperature ({self.temperature}) must be >= 0 and finite (0 is greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"--top-k ({self.top_k}) must be at least 1")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p ({self.top_p}) must be in (0, 1]")
        if self.num_samples < 1:
            raise ConfigError(f"--num-samples ({self.num_samples}) must be at least 1")
        if self.num_samples > MAX_NUM_SAMPLES:
            raise ConfigError(f"--num-samples ({self.num_samples}) must be at most {MAX_NUM_SAMPLES}: each sample is "
                              f"a row of the KV cache and of every activation")
        if self.seed is not None and not 0 <= self.seed < SEED_LIMIT:
            raise ConfigError(f"--seed ({self.seed}) must be in [0, 2**64)")
        self.stop = tuple(self.stop)
        check_stop_strings(self.stop)


def check_stop_strings(stop: tuple[str, ...]):
    """At most MAX_STOP_STRINGS non-empty strings of at most MAX_STOP_CHARS characters (ConfigError)."""
    if len(stop) > MAX_STOP_STRINGS:
        raise ConfigError(f"at most {MAX_STOP_STRINGS} stop strings (got {len(stop)})")
    for s in stop:
        if not s:
            raise ConfigError("a stop string must not be empty")
        if len(s) > MAX_STOP_CHARS:
            raise ConfigError(f"a stop string has {len(s)} characters; at most {MAX_STOP_CHARS} are allowed")


def encode_prompt(tokenizer, text: str) -> list[int]:
    """A raw prompt (no chat template) -> its tokens, with BOS where the tokenizer wants one; ConfigError if none."""
    tokens = tokenizer.encode(text, bos=tokenizer.add_bos)
    if not tokens:
        raise ConfigError("the prompt is empty; pass --prompt TEXT or text on standard input")
    return tokens


def check_fits(prompt_tokens: int, max_new_tokens: int, context: int, start_pos: int = 0):
    """ContextFull unless a prompt of ``prompt_tokens`` at ``start_pos`` plus ``max_new_tokens`` fit in ``context``."""
    if start_pos + prompt_tokens + max_new_tokens > context:
        at = f" at position {start_pos}" if start_pos else ""
        raise ContextFull(f"prompt ({prompt_tokens} tokens{at}) plus --max-new-tokens ({max_new_tokens}) exceeds the "
                          f"context ({context}); shorten the prompt or lower --max-new-tokens")


@dataclass
class Completion:
    """One generated sequence."""

    tokens: list[int]
    text: str
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens or the context)
    stop_token: int | None = None


class Completions(list[Completion]):
    """What ``complete`` returns: one Completion per sequence (a list), and the request's figures in ``stats``."""

    def __init__(self, completions: list[Completion], stats: GenerationStats):
        super().__init__(completions)
        self.stats = stats


@dataclass
class Turn:
    """What one request sends to the model: the tokens to add and how to generate."""

    tokens: list[int]
    args: GenerationArgs
    start_pos: int = 0  # where the tokens go in the KV cache (chat keeps earlier turns there)


@dataclass
class _Batch:
    """Per-sequence progress of one generation."""

    size: int
    tokens: list[list[int]] = field(init=False)
    stop_tokens: list[int | None] = field(init=False)
    stopped_by_text: list[bool] = field(init=False)

    def __post_init__(self):
        self.tokens = [[] for _ in range(self.size)]
        self.stop_tokens = [None] * self.size
        self.stopped_by_text = [False] * self.size

    def active(self, i: int) -> bool:
        return self.stop_tokens[i] is None and not self.stopped_by_text[i]

    def add(self, step: list[int], stop_ids: frozenset[int], stop_text: Callable[[list[int]], bool] | None):
        for i, tok in enumerate(step):
            if self.active(i):
                self.tokens[i].append(tok)
                if tok in stop_ids:
                    self.stop_tokens[i] = tok
                elif stop_text is not None and stop_text(self.tokens[i]):
                    self.stopped_by_text[i] = True

    @property
    def done(self) -> bool:
        return not any(self.active(i) for i in range(self.size))


class Generator(ABC):
    """Base of every backend: input, chat templates, sampling, stop conditions, streaming, statistics.

    Subclasses implement ``prefill`` and ``decode_n_tokens``; see the module docstring.
    """

    chat_help = "chat: type a message; /bye or Ctrl-D ends, Ctrl-C stops a reply"

    def __init__(self, model_args: ModelArgs, tokenizer, chat_format, *, max_seq_len: int,
                 device: torch.device | str = "cpu", out: TextIO | None = None, err: TextIO | None = None,
                 is_io_rank: bool = True):
        self.model_args = model_args
        self.tokenizer = tokenizer
        self.chat_format = chat_format
        self.max_seq_len = max_seq_len
        self.device = torch.device(device)
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.is_io_rank = is_io_rank  # only this process reads the user and writes text
        self.stop_ids = frozenset(tokenizer.stop_ids)
        self.args = GenerationArgs()
        self._rng: torch.Generator | None = None
        self.last_stats = GenerationStats()
        self.last_step: list[int] = []  # the latest tokens yielded, one per sequence

    # ----- the backend's hooks -----

    @abstractmethod
    def prefill(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Run tokens (B, T) at positions [start_pos, start_pos + T); return the next token (B,)."""

    @abstractmethod
    def decode_n_tokens(self, token: torch.Tensor, start_pos: int, n: int) -> Iterator[torch.Tensor]:
        """Feed ``token`` (B,) at ``start_pos``, then each new token after it; yield up to n new tokens (B,).

        The caller may stop iterating early (a stop token, Ctrl-C); the backend must then be
        ready for the next ``prefill``.
        """

    def share_input(self, turn: Turn | None) -> Turn | None:
        """Give every process the request read by the I/O process (None: the session ends).

        One process: nothing to share.
        """
        return turn

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """Pick the next token (B,) from logits (B, V) with the current request's settings."""
        a = self.args
        return sample(logits, a.temperature, a.top_k, a.top_p, self._rng)

    # ----- token level -----

    def generate_tokens(self, turn: Turn) -> Iterator[list[int]]:
        """Yield one list of B token ids per step until every sequence stopped or max_new_tokens."""
        self._start_request(turn)
        prompt = torch.tensor([turn.tokens] * turn.args.num_samples, dtype=torch.long, device=self.device)
        stats = self.last_stats = GenerationStats(batch=prompt.size(0), prompt_tokens=prompt.size(1))
        t0 = time.perf_counter()
        token = self.prefill(prompt, turn.start_pos)
        self.last_step = token.tolist()
        stats.ttft_s, stats.new_tokens = time.perf_counter() - t0, 1
        yield self.last_step
        t1 = time.perf_counter()
        try:
            steps = self.decode_n_tokens(token, turn.start_pos + prompt.size(1), turn.args.max_new_tokens - 1)
            for token in steps:
                step = token.tolist()
                # One statement, no call inside: a Ctrl-C cannot land between the count and the token that a
                # chat reads back after an interrupted reply (ChatSession.reply).
                stats.new_tokens, self.last_step = stats.new_tokens + 1, step
                stats.decode_s = time.perf_counter() - t1
                yield step
        finally:
            stats.decode_s = time.perf_counter() - t1

    def _start_request(self, turn: Turn):
        check_fits(len(turn.tokens), turn.args.max_new_tokens, self.max_seq_len, turn.start_pos)
        self.args = turn.args
        seed = turn.args.seed if turn.args.seed is not None else int(torch.randint(0, 2**62, ()).item())
        self._rng = torch.Generator(device=self.device).manual_seed(seed)

    # ----- text level -----

    def complete(self, turn: Turn, on_text: Callable[[str], None] | None = None) -> Completions:
        """Generate from ``turn``; stream sequence 0's text to ``on_text``; return every sequence and the stats."""
        batch = _Batch(turn.args.num_samples)
        streamer = TextStreamer(self.tokenizer, turn.tokens, skip_ids=self.stop_ids)
        stop_text = self._stop_text_check(turn.args.stop)
        steps = self.generate_tokens(turn)
        try:
            for step in steps:
                streamed = batch.active(0)
                batch.add(step, self.stop_ids, stop_text)
                if on_text and streamed:
                    on_text(streamer.push(step[0]))
                if batch.done:
                    break
        finally:
            steps.close()
            if on_text:
                on_text(streamer.flush())
        return Completions([self._completion(batch, i, turn.args.stop) for i in range(batch.size)], self.last_stats)

    def _stop_text_check(self, stop: tuple[str, ...]) -> Callable[[list[int]], bool] | None:
        """A test for stop strings in a sequence's recent text (every process runs it on the same tokens)."""
        if not stop:
            return None
        window = max(len(s) for s in stop) + 16  # characters; a stop string ends within the last token

        def hit(tokens: list[int]) -> bool:
            tail = self.tokenizer.decode(tokens[-window:])
            return any(s in tail for s in stop)
        return hit

    def _completion(self, batch: _Batch, i: int, stop: tuple[str, ...]) -> Completion:
        tokens, stop_token = batch.tokens[i], batch.stop_tokens[i]
        text = self.tokenizer.decode(tokens[:-1] if stop_token is not None else tokens)
        if batch.stopped_by_text[i]:
            text = text[:min(text.find(s) for s in stop if s in text)]
        finished = stop_token is not None or batch.stopped_by_text[i]
        return Completion(tokens, text, "stop" if finished else "length", stop_token)

    def encode_prompt(self, text: str) -> list[int]:
        """A raw prompt (no chat template), with BOS where the tokenizer wants one."""
        return encode_prompt(self.tokenizer, text)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """A whole conversation (``[{"role": ..., "content": ...}, ...]``) with the chat template, ready for a reply."""
        return self.chat_format.encode_dialog(messages)

    def check_tokens(self, tokens: list[int]):
        """ConfigError unless every token id is in the model's vocabulary (a client may send ids)."""
        vocab = self.model_args.vocab_size
        if bad := [t for t in tokens if not 0 <= t < vocab]:
            raise ConfigError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")

    # ----- a session of requests served one at a time (the server): every process takes part -----

    def serve_turn(self, turn: Turn, on_text: Callable[[str], None] | None = None) -> Completions:
        """On the I/O process: give ``turn`` to every process (see ``shared_turns``) and complete it."""
        return self.complete(self.share_input(turn), on_text)

    def end_session(self):
        """On the I/O process: no more turns; the other processes' ``shared_turns`` ends."""
        self.share_input(None)

    def shared_turns(self) -> Iterator[Turn]:
        """On the other processes: each turn that the I/O process serves, until it ends the session.

        The caller completes each one (``complete(turn)``), as the I/O process does.
        """
        while (turn := self.share_input(None)) is not None:
            yield turn

    # ----- user level: the `generate` and `chat` commands -----

    def run_generate(self, prompt: str | None, args: GenerationArgs,
                     tokens: list[int] | None = None) -> list[Completion]:
        """`generate`: complete a raw prompt (read on the I/O process only), print it, report stats.

        ``tokens``: the prompt already encoded (the CLI encodes it once, to size the KV cache); else encoded here.
        """
        if self.is_io_rank and tokens is None:
            tokens = self.encode_prompt(prompt)
        turn = Turn(tokens, args) if self.is_io_rank else None
        turn = self.share_input(turn)
        if self.is_io_rank:
            self.write(prompt)
        completions = self.complete(turn, self.write if args.num_samples == 1 else None)
        self._print_samples(completions)
        self.report(completions.stats.summary(self.device))
        return completions

    def _print_samples(self, completions: list[Completion]):
        if len(completions) == 1:
            self.write("\n")
            return
        for i, c in enumerate(completions):
            self.write(f"\n--- sample {i} ---\n{c.text}\n")

    def run_chat(self, args: GenerationArgs, read_user: Callable[[], str | None],
                 system_prompt: str | None = None) -> int:
        """`chat`: multi-turn, history kept in the KV cache. Returns the number of replies."""
        session = ChatSession(self, args, system_prompt)
        while True:
            turn = self._read_turn(session, read_user) if self.is_io_rank else None
            turn = self.share_input(turn)
            if turn is None:
                return session.replies
            session.reply(turn)

    def _read_turn(self, session: "ChatSession", read_user: Callable[[], str | None]) -> Turn | None:
        """The next turn; empty lines are skipped, and a message too long for any chat is refused."""
        while True:
            text = read_user()
            if text is not None and not text.strip():
                continue
            try:
                return session.next_turn(text)
            except ContextFull as e:
                self.report(f"error: {e}")

    def write(self, text: str):
        if self.is_io_rank and text:
            self.out.write(text)
            self.out.flush()

    def report(self, line: str):
        """A statistics or status line: stderr, I/O process only."""
        if self.is_io_rank:
            print(line, file=self.err, flush=True)


class ChatSession:
    """The state of one conversation: where its tokens end in the KV cache, how the last reply ended.

    When the next message and a full reply (``max_new_tokens``) no longer fit after the history,
    the conversation starts again from that message (with the system prompt), and says so. A reply
    that still does not fit (a long message in a short context) is cut where the context ends, and
    says that too.
    """

    def __init__(self, generator: Generator, args: GenerationArgs, system_prompt: str | None):
        self.gen = generator
        self.args = args
        self.system_prompt = system_prompt
        self.pos = 0  # tokens of this conversation already in the KV cache
        self.closing: list[int] = []  # tokens that close the previous reply, fed with the next turn
        self.fresh = True  # no reply yet in this conversation
        self.replies = 0  # replies in the whole session, every conversation

    def next_turn(self, text: str | None) -> Turn | None:
        """The user's text -> the tokens of the next turn; None ends the chat (EOF, /bye)."""
        if text is None or text.strip() in ("/bye", "/exit", "/quit"):
            return None
        tokens = self._tokens(text)
        if not self.fresh and self.pos + len(tokens) + self.args.max_new_tokens > self.gen.max_seq_len:
            self.gen.report(f"the conversation fills the context ({self.gen.max_seq_len} tokens): starting a new "
                            f"chat from this message (raise --max-seq-length to keep more)")
            self.pos, self.closing, self.fresh = 0, [], True
            tokens = self._tokens(text)
        room = self.gen.max_seq_len - self.pos - len(tokens)
        if room < 1:
            raise ContextFull(f"the message ({len(tokens)} tokens with the chat template) does not fit in the "
                              f"context ({self.gen.max_seq_len} tokens); send a shorter one or raise "
                              f"--max-seq-length")
        return Turn(tokens, _with_max_new(self.args, min(self.args.max_new_tokens, room)), self.pos)

    def _tokens(self, text: str) -> list[int]:
        messages = [{"role": "user", "content": text}]
        if self.fresh and self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self.closing + self.gen.chat_format.encode_turn(messages, first=self.fresh)

    def reply(self, turn: Turn):
        """Generate and stream one reply; Ctrl-C ends the reply, not the chat."""
        completion = None
        try:
            completions = self.gen.complete(turn, self.gen.write)
            (completion,), stats = completions, completions.stats
        except KeyboardInterrupt:
            self.gen.write("\n[interrupted]")
            stats = self.gen.last_stats  # the figures of the reply so far
        cut = (completion is not None and completion.finish_reason == "length"
               and turn.args.max_new_tokens < self.args.max_new_tokens)
        if cut:
            self.gen.write("\n[cut: the context is full; the next message starts a new chat]")
        self.gen.write("\n")
        new_tokens = stats.new_tokens
        if new_tokens == 0:
            return  # interrupted during the prompt: the turn never entered the conversation
        # Every new token but the last was fed back into the KV cache (an interrupted step may be partial):
        # the next turn starts with the last one, then closes the reply unless that token already did.
        self.pos = turn.start_pos + len(turn.tokens) + new_tokens - 1
        last = self.gen.last_step[0]
        ended_by_stop = completion is not None and completion.stop_token is not None
        self.closing = [last] if ended_by_stop else [last, *self.gen.chat_format.end_of_turn]
        self.fresh = False
        self.replies += 1
        self.gen.report(stats.summary(self.gen.device))


def _with_max_new(args: GenerationArgs, max_new: int) -> GenerationArgs:
    return replace(args, max_new_tokens=max_new, num_samples=1)
