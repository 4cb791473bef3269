"""Generator: everything about generation that does not depend on where the model runs.

A backend subclasses ``Generator`` and overrides one method:

- ``forward(step) -> logits``: run a ``Step`` (``scheduler.py``): B rows of T tokens, row i at its own
  positions in its own KV cache row, and return the logits (B, V) at each row's last token.

The base class owns the rest: requests become sequences (``requests.py``) that the ``Scheduler`` batches
continuously (joins and leaves between steps, prompts in chunks, prefix reuse), sampling with each
sequence's own settings and generator, stop conditions, streamed text, statistics, and the ``generate``
and ``chat`` commands. A backend whose forwards can overlap (a pipeline) sets ``max_in_flight`` and
overrides ``start(step)`` / ``finish()``. A multi-process backend sets ``is_io_rank`` False on the processes
that must not talk to the user; those run ``follow()`` while the I/O process schedules, and ``end_session()``
releases them. See docs/backends.md for a complete example.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import replace
from typing import Callable, Iterator, TextIO

import torch

from torchchat.errors import ConfigError, ContextFull
from torchchat.generate.args import (MAX_NUM_SAMPLES, MAX_STOP_CHARS, MAX_STOP_STRINGS, SEED_LIMIT,  # noqa: F401
                                     GenerationArgs, check_fits, check_stop_strings, encode_prompt)
from torchchat.generate.requests import Completion, Completions, Request, TextCallback, Turn  # noqa: F401
from torchchat.generate.scheduler import PREFILL_CHUNK, Scheduler, Step
from torchchat.generate.speculative import Drafter, check_speculate_k
from torchchat.generate.stats import GenerationStats
from torchchat.model import ModelArgs


class Generator(ABC):
    """Base of every backend: input, chat templates, scheduling, sampling, stop conditions, streaming, statistics.

    Subclasses implement ``forward``; see the module docstring.
    """

    chat_help = "chat: type a message; /bye or Ctrl-D ends, Ctrl-C stops a reply"
    max_in_flight = 1  # forward steps the backend runs at once (a pipeline: one per stage)

    def __init__(self, model_args: ModelArgs, tokenizer, chat_format, *, max_seq_len: int, max_batch: int = 1,
                 device: torch.device | str = "cpu", out: TextIO | None = None, err: TextIO | None = None,
                 is_io_rank: bool = True, prefill_chunk: int = PREFILL_CHUNK, prefix_reuse: bool = True,
                 drafter: Drafter | None = None):
        if max_batch < 1:
            raise ConfigError(f"--max-batch ({max_batch}) must be at least 1")
        if prefill_chunk < 1:
            raise ConfigError(f"the prefill chunk ({prefill_chunk} tokens) must be at least 1")
        self.model_args = model_args
        self.tokenizer = tokenizer
        self.chat_format = chat_format
        self.max_seq_len = max_seq_len
        self.max_batch = max_batch  # KV cache rows: sequences in flight at once
        self.device = torch.device(device)
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.is_io_rank = is_io_rank  # only this process reads the user, schedules and writes text
        self.stop_ids = frozenset(tokenizer.stop_ids)
        if drafter is not None:
            check_speculate_k(drafter.k, max_seq_len)
        self.drafter = drafter  # speculative decoding (speculative.py): verification steps instead of decode steps
        self.scheduler = Scheduler(self, max_batch, prefill_chunk, prefix_reuse)
        self.last_stats = GenerationStats()  # the figures of the latest request that ended
        self._results: deque[torch.Tensor] = deque()

    # ----- the backend's hooks -----

    @abstractmethod
    def forward(self, step: Step) -> torch.Tensor:
        """Run ``step.tokens`` (B, T), row i at positions [step.positions[i], step.positions[i] + T) of KV cache
        row ``step.rows[i]``; return the logits (B, V) at each row's last token (a verification step,
        ``step.verify``: at every position, (B, T, V))."""

    def start(self, step: Step):
        """Begin ``step``; its logits come from ``finish``, in order. One process: run it now."""
        self._results.append(self.forward(step))

    def finish(self) -> torch.Tensor:
        """The logits (B, V) of the oldest step begun and not yet finished."""
        return self._results.popleft()

    def forget_started(self):
        """Drop the steps begun and not finished: Ctrl-C landed between a ``start`` and its ``finish``, and the
        next ``finish`` must answer the next ``start``. A backend that overrides ``start``/``finish`` overrides
        this too."""
        self._results.clear()

    def resize_batch(self, max_batch: int):
        """Hold ``max_batch`` sequences from now on (called with nothing in flight). Optional: ConfigError here."""
        raise ConfigError(f"{max_batch} samples exceed the {self.max_batch} sequences this generator runs at once "
                          f"(--max-batch)")

    def _resized(self, max_batch: int):
        """For a backend's ``resize_batch``: the schedule's cache rows follow."""
        self.max_batch = max_batch
        self.scheduler = Scheduler(self, max_batch, self.scheduler.prefill_chunk, self.scheduler.prefix_reuse)
        if self.drafter is not None:
            self.drafter.resize(max_batch)

    def follow(self):
        """On a process that is not the I/O one: run the steps the I/O process schedules until it ends the
        session. One process: nothing to follow."""
        return None

    def end_session(self):
        """On the I/O process: no more requests; the other processes' ``follow`` returns. One process: nothing."""
        return None

    # ----- requests -----

    def submit(self, turn: Turn, on_text: TextCallback | None = None,
               on_done: Callable[[Request], None] | None = None, *, stops: bool = True) -> Request:
        """Put ``turn`` in the schedule; ``on_text(index, text)`` streams each sequence's text, ``on_done(request)``
        runs when every sequence ended. ConfigError/ContextFull for a request that cannot run.

        ``stops=False``: no stop token or string ends it early (benchmarks: always ``max_new_tokens``), and the
        completions carry token ids only (no text)."""
        check_fits(len(turn.tokens), turn.args.max_new_tokens, self.max_seq_len)
        if turn.args.num_samples > self.max_batch:
            if self.scheduler.busy:
                raise ConfigError(f"{turn.args.num_samples} samples exceed the {self.max_batch} sequences this "
                                  f"generator runs at once (--max-batch)")
            self.resize_batch(turn.args.num_samples)
        stop_ids = self.stop_ids if stops else frozenset()
        stop_text = self._stop_text_check(turn.args.stop) if stops else None
        request = Request(turn, self.tokenizer, stop_ids, stop_text, self.device, on_text, on_done, with_text=stops)
        self.scheduler.add(request)
        return request

    def cancel(self, request: Request, error: BaseException):
        """End ``request`` between steps: its sequences leave, their cache rows are free."""
        self.scheduler.cancel(request, error)

    def step(self):
        """One round of the schedule (see scheduler.py). A failing forward fails every request in it, then raises;
        Ctrl-C drops the steps in flight (their logits unread), then raises, and ``run_until`` ends its request."""
        try:
            self.scheduler.step()
        except Exception as e:
            self.scheduler.fail_all(e)
            raise
        except BaseException:
            self.scheduler.drop_in_flight()
            raise

    def run_until(self, request: Request):
        """Step until ``request`` ended. Ctrl-C (or any error) ends the request, then propagates."""
        try:
            while not request.done:
                self.step()
        except BaseException as e:
            if not request.done:
                self.cancel(request, e)
            raise
        finally:
            self.last_stats = request.stats
        if request.error is not None:
            raise request.error

    def complete(self, turn: Turn, on_text: Callable[[str], None] | None = None) -> Completions:
        """Generate from ``turn``; stream sequence 0's text to ``on_text``; return every sequence and the stats."""
        stream = (lambda i, text: on_text(text) if i == 0 and text else None) if on_text else None
        request = self.submit(turn, stream)
        self.run_until(request)
        return request.completions

    def generate_tokens(self, turn: Turn) -> Iterator[list[int]]:
        """The token ids of each step, one per sequence, ``max_new_tokens`` of them whatever the stop tokens
        (benchmarks, tests); the figures are in ``last_stats`` when it ends."""
        request = self.submit(turn, stops=False)
        yielded = 0
        try:
            while True:
                if request.error is not None:
                    raise request.error
                n = min(len(seq.generated) for seq in request.sequences)
                for k in range(yielded, n):
                    yield [seq.generated[k] for seq in request.sequences]
                yielded = n
                if request.done:
                    return
                self.step()
        finally:
            if not request.done:
                self.cancel(request, GeneratorExit())
            self.last_stats = request.stats

    def _stop_text_check(self, stop: tuple[str, ...]) -> Callable[[list[int]], bool] | None:
        """A test for stop strings in a sequence's recent text."""
        if not stop:
            return None
        window = max(len(s) for s in stop) + 16  # characters; a stop string ends within the last token

        def hit(tokens: list[int]) -> bool:
            tail = self.tokenizer.decode(tokens[-window:])
            return any(s in tail for s in stop)
        return hit

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

    # ----- scoring: the `eval` command -----

    def score(self, windows: list[list[int]], first_scored: int,
              on_scored: Callable[[int, torch.Tensor], None] | None = None) -> list[torch.Tensor]:
        """Each window's log-probabilities ``log p(w[j + 1] | w[:j + 1])`` for j in [first_scored, len(w) - 1): a
        float32 tensor of ``len(w) - 1 - first_scored`` values a window, in order.

        Every window runs alone from position 0 in a KV cache row of its own (nothing reused), as a prompt does:
        ``max_batch // max_in_flight`` windows a forward, up to ``max_in_flight`` forwards in flight (a pipeline's
        stages each busy with one; each in-flight forward in its own rows). ``on_scored(i, log_probs)`` as window i's
        figures arrive. The windows have one length, at most ``max_seq_len``. Not while requests run."""
        if self.scheduler.busy:
            raise RuntimeError("score() while requests are running")
        length = len(windows[0]) if windows else 0
        if any(len(w) != length for w in windows) or not 0 <= first_scored < length - 1:
            raise ValueError(f"windows of one length (> {first_scored + 1}) are scored: got lengths "
                             f"{sorted(set(map(len, windows)))}")
        if length > self.max_seq_len:
            raise ConfigError(f"windows of {length} tokens exceed the KV cache ({self.max_seq_len} positions)")
        per_step = max(1, self.max_batch // self.max_in_flight)
        out: list[torch.Tensor | None] = [None] * len(windows)
        in_flight: deque[range] = deque()

        def collect():
            indices, log_probs = in_flight.popleft(), self.finish()  # (B, T)
            for k, i in enumerate(indices):
                out[i] = log_probs[k, first_scored:length - 1].float().cpu()
                if on_scored is not None:
                    on_scored(i, out[i])

        for n, begin in enumerate(range(0, len(windows), per_step)):
            indices = range(begin, min(begin + per_step, len(windows)))
            tokens = torch.tensor([windows[i] for i in indices], dtype=torch.long)  # (B, T)
            targets = torch.full_like(tokens, -1)
            targets[:, first_scored:-1] = tokens[:, first_scored + 1:]  # position j predicts token j + 1
            first_row = (n % self.max_in_flight) * per_step  # in-flight forwards never share a cache row
            step = Step(tokens, torch.zeros(len(indices), dtype=torch.long),
                        torch.arange(first_row, first_row + len(indices)), prefill=True, targets=targets)
            if len(in_flight) == self.max_in_flight:
                collect()
            self.start(step)
            in_flight.append(indices)
        while in_flight:
            collect()
        return out

    # ----- user level: the `generate` and `chat` commands -----

    def run_generate(self, prompt: str | None, args: GenerationArgs,
                     tokens: list[int] | None = None) -> list[Completion] | None:
        """`generate`: complete a raw prompt, print it, report stats; on the other processes, follow.

        ``tokens``: the prompt already encoded (the CLI encodes it once, to size the KV cache); else encoded here.
        """
        if not self.is_io_rank:
            self.follow()
            return None
        try:
            if tokens is None:
                tokens = self.encode_prompt(prompt)
            self.write(prompt)
            completions = self.complete(Turn(tokens, args), self.write if args.num_samples == 1 else None)
        finally:
            self.end_session()
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
        """`chat`: multi-turn, the history kept in the KV cache (prefix reuse). Returns the number of replies."""
        if not self.is_io_rank:
            self.follow()
            return 0
        session = ChatSession(self, args, system_prompt)
        try:
            while (turn := self._read_turn(session, read_user)) is not None:
                session.reply(turn)
        finally:
            self.end_session()
        return session.replies

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
    """The state of one conversation: its tokens so far (the scheduler finds them in a cache row and feeds only
    the new ones), how the last reply ended.

    When the next message and a full reply (``max_new_tokens``) no longer fit after the history,
    the conversation starts again from that message (with the system prompt), and says so. A reply
    that still does not fit (a long message in a short context) is cut where the context ends, and
    says that too.
    """

    def __init__(self, generator: Generator, args: GenerationArgs, system_prompt: str | None):
        self.gen = generator
        self.args = args
        self.system_prompt = system_prompt
        self.history: list[int] = []  # the conversation's tokens, the last reply's included
        self.closing: list[int] = []  # tokens that close the previous reply, fed with the next turn
        self.replies = 0  # replies in the whole session, every conversation

    @property
    def fresh(self) -> bool:
        """No reply yet in this conversation."""
        return not self.history

    def next_turn(self, text: str | None) -> Turn | None:
        """The user's text -> the next turn (the whole conversation); None ends the chat (EOF, /bye)."""
        if text is None or text.strip() in ("/bye", "/exit", "/quit"):
            return None
        tokens = self._tokens(text)
        if not self.fresh and len(tokens) + self.args.max_new_tokens > self.gen.max_seq_len:
            self.gen.report(f"the conversation fills the context ({self.gen.max_seq_len} tokens): starting a new "
                            f"chat from this message (raise --max-seq-length to keep more)")
            self.history, self.closing = [], []
            tokens = self._tokens(text)
        room = self.gen.max_seq_len - len(tokens)
        if room < 1:
            new = len(tokens) - len(self.history)
            raise ContextFull(f"the message ({new} tokens with the chat template) does not fit in the "
                              f"context ({self.gen.max_seq_len} tokens); send a shorter one or raise "
                              f"--max-seq-length")
        return Turn(tokens, _with_max_new(self.args, min(self.args.max_new_tokens, room)))

    def _tokens(self, text: str) -> list[int]:
        messages = [{"role": "user", "content": text}]
        if self.fresh and self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self.history + self.closing + self.gen.chat_format.encode_turn(messages, first=self.fresh)

    def reply(self, turn: Turn):
        """Generate and stream one reply; Ctrl-C ends the reply, not the chat."""
        request = self.gen.submit(turn, lambda _i, text: self.gen.write(text))
        interrupted = False
        try:
            self.gen.run_until(request)
        except KeyboardInterrupt:
            self.gen.write("\n[interrupted]")
            interrupted = True
        (seq,) = request.sequences
        completion = None if interrupted else request.completions[0]
        cut = (completion is not None and completion.finish_reason == "length"
               and turn.args.max_new_tokens < self.args.max_new_tokens)
        if cut:
            self.gen.write("\n[cut: the context is full; the next message starts a new chat]")
        self.gen.write("\n")
        if not seq.generated:
            return  # interrupted during the prompt: the turn never entered the conversation
        # The reply's tokens join the history; the next turn closes the reply unless a stop token already did.
        self.history = turn.tokens + seq.generated
        ended_by_stop = seq.stop_token is not None
        self.closing = [] if ended_by_stop else list(self.gen.chat_format.end_of_turn)
        self.replies += 1
        self.gen.report(request.stats.summary(self.gen.device))


def _with_max_new(args: GenerationArgs, max_new: int) -> GenerationArgs:
    return replace(args, max_new_tokens=max_new, num_samples=1)
