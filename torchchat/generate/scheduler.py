"""The schedule of continuous batching: which sequences run in each forward step, in which KV cache rows.

Each ``step()`` (llama.cpp's server loop and vLLM's scheduler work alike, see shared/SERVING.md):

1. waiting requests join while free cache rows (slots) last: a request of ``n`` samples takes ``n``;
2. one prompt chunk (at most ``prefill_chunk`` tokens) of the oldest joined request whose prompt is not yet
   in its rows: a long prompt is fed over several steps, so the running streams stall for one chunk at most;
   its last chunk gives the request's first tokens;
3. one token of every sequence already decoding, each at its own position in its own row; with a drafter
   (``Generator.drafter``, speculative decoding), its newest token and its draft's tokens instead, all
   verified in one forward (see ``_decode_steps``).

A forward never mixes sequences of different requests in one prompt chunk, and each decoded row is computed
on its own (the backends' kernels keep rows independent), so a sequence's tokens do not depend on what runs
beside it. Finished sequences leave between steps; their rows keep their tokens for prefix reuse: a request
whose prompt starts with a free row's tokens (the next turn of a chat) is fed only the rest.

A backend whose forwards overlap (a pipeline: ``Generator.max_in_flight`` > 1) gets up to that many steps
in flight: the decoding sequences are split into that many groups, and a group's next step starts as soon as
its own tokens are back, while the other groups are in the pipe.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import torch

from torchchat.generate.requests import Request, Sequence
from torchchat.generate.speculative import verify_greedy, verify_sampled
from torchchat.generate.step import Step

PREFILL_CHUNK = 256  # prompt tokens per forward (times the request's samples): ~0.3 s of SmolLM2 on 2 cores


@dataclass
class Slot:
    """One KV cache row: the tokens whose keys and values it holds (from position 0), and who uses it."""

    index: int
    cached: list[int] = field(default_factory=list)
    sequence: Sequence | None = None
    last_used: int = 0


class Scheduler:
    """Joins, prompt chunks, decode steps and leaves for a generator's requests (see the module docstring)."""

    def __init__(self, generator, max_batch: int, prefill_chunk: int = PREFILL_CHUNK, prefix_reuse: bool = True):
        self.gen = generator
        self.slots = [Slot(i) for i in range(max_batch)]
        self.prefill_chunk = prefill_chunk
        self.prefix_reuse = prefix_reuse
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # joined, in order of joining
        self._clock = itertools.count(1)
        self._in_flight: deque[Step] = deque()

    @property
    def max_batch(self) -> int:
        return len(self.slots)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request):
        if request.turn.args.num_samples > self.max_batch:
            raise ValueError(f"{request.turn.args.num_samples} samples exceed the {self.max_batch} cache rows")
        self.waiting.append(request)

    def cancel(self, request: Request, error: BaseException):
        """End ``request`` now (a client left, Ctrl-C): its rows are free for the next step."""
        if request in self.waiting:
            self.waiting.remove(request)
        else:
            self._leave(request)  # Ctrl-C may have cut a leave short: the rows it holds are freed whatever it did
        if not request.done:
            request.finish(error)

    def drop_in_flight(self):
        """Forget the steps begun and not finished, here and in the generator (Ctrl-C between a step's start and
        its sampling). A row's ``cached`` tokens grow only once their step finished, so what a dropped step wrote
        past them is written again before it is read."""
        self._in_flight.clear()
        self.gen.forget_started()

    def fail_all(self, error: BaseException):
        """A forward failed: every request in the schedule ends with ``error`` (the caches may be half written)."""
        self.drop_in_flight()
        for request in list(self.running) + list(self.waiting):
            self.cancel(request, error)
        for slot in self.slots:
            slot.cached = []
        if self.gen.drafter is not None:
            self.gen.drafter.forget()

    # ----- one step -----

    def step(self):
        """Run what can run now: joins, then a prompt chunk and the decode steps (see the module docstring)."""
        self._admit()
        if self.waiting and not self.running and not self._in_flight:
            raise RuntimeError(f"internal error: {len(self.waiting)} request(s) wait for cache rows that nothing "
                               f"runs in")  # rows leaked: fail rather than spin forever
        depth = self.gen.max_in_flight
        for step in self._next_steps(depth):
            self.gen.start(step)
            self._in_flight.append(step)
            if len(self._in_flight) >= depth:
                self._finish_oldest()
        while self._in_flight and (depth == 1 or not self._has_ready_work()):
            self._finish_oldest()

    def _in_flight_ids(self) -> set[int]:
        """The ids of the sequences whose step is in flight: they wait for its logits."""
        return {id(seq) for step in self._in_flight for seq in step.sequences}

    def _has_ready_work(self) -> bool:
        """Is anything runnable that is not waiting on a step in flight (a pipeline keeps it busy)?"""
        busy = self._in_flight_ids()
        return any(id(seq) not in busy for request in self.running for seq in request.sequences
                   if not seq.finished)

    def _finish_oldest(self):
        step = self._in_flight.popleft()
        logits = self.gen.finish()  # (B, V) at each row's last token
        self._after(step, logits)

    def _next_steps(self, depth: int) -> list[Step]:
        """The steps to start now: a prompt chunk, then the decoding sequences not already in flight, in up to
        ``depth`` groups."""
        busy = self._in_flight_ids()
        steps = []
        prefilling = next((r for r in self.running if not r.sequences[0].decoding
                           and id(r.sequences[0]) not in busy), None)
        if prefilling is not None:
            steps.append(self._prompt_chunk(prefilling))
        decoding = [seq for r in self.running for seq in r.sequences
                    if seq.decoding and not seq.finished and id(seq) not in busy]
        if decoding:
            groups = min(len(decoding), max(1, depth - len(self._in_flight) - len(steps)))
            size = -(-len(decoding) // groups)
            steps += [s for i in range(0, len(decoding), size) for s in self._decode_steps(decoding[i:i + size])]
        return steps

    def _prompt_chunk(self, request: Request) -> Step:
        seqs = request.sequences
        per_row = max(1, self.prefill_chunk // len(seqs))
        chunk = seqs[0].pending[:per_row]
        last = len(chunk) == len(seqs[0].pending)
        tokens = torch.tensor([chunk] * len(seqs), dtype=torch.long)  # (n, T): every sample feeds the prompt
        return _step_of(seqs, tokens, prefill=True, last_chunk=last)

    def _decode_step(self, seqs: list[Sequence]) -> Step:
        tokens = torch.tensor([s.pending for s in seqs], dtype=torch.long)  # (B, 1): each one's newest token
        return _step_of(seqs, tokens)

    def _decode_steps(self, seqs: list[Sequence]) -> list[Step]:
        """The decode step of ``seqs``; with a drafter, a verification step: each sequence's newest token and
        its draft (up to k tokens, fewer near max_new_tokens or the end of the context), the rows padded to the
        longest draft. Sequences of one step may draft different amounts (prompt lookup finds nothing, a draft
        model's is cut short): a shorter row's padding positions are computed and discarded, which costs less
        than a forward per draft length. A row whose padding would run past the cache goes in a plain step."""
        drafter = self.gen.drafter
        if drafter is None:
            return [self._decode_step(seqs)]
        context_end = self.gen.max_seq_len
        drafts = []
        for seq in seqs:
            args = seq.request.turn.args
            most = min(drafter.k, args.max_new_tokens - len(seq.generated) - 1, context_end - seq.pos - 1)
            if seq.draft_pause > 0:  # its last drafts were all rejected: plain steps for a while
                seq.draft_pause -= 1
                most = 0
            context = self.slots[seq.slot].cached + seq.pending  # what its row holds, then its newest token
            drafts.append(drafter.propose(context, seq.slot, most, args, seq.rng))
        width = 1 + max(len(d.tokens) for d in drafts)
        if width == 1:
            return [self._decode_step(seqs)]
        fits = [i for i, seq in enumerate(seqs) if seq.pos + width <= context_end]
        rest = [seqs[i] for i in range(len(seqs)) if i not in fits]
        rows = [seqs[i].pending + drafts[i].tokens for i in fits]
        tokens = torch.tensor([row + row[-1:] * (width - len(row)) for row in rows], dtype=torch.long)  # (B, T)
        step = _step_of([seqs[i] for i in fits], tokens, verify=True)
        step.drafts = [drafts[i] for i in fits]
        return [step] + ([self._decode_step(rest)] if rest else [])

    def _after(self, step: Step, logits: torch.Tensor):
        """Book what the step fed into the caches; sample the rows that have a new token; let finished ones leave.
        Rows of a request cancelled while the step was in flight are skipped: their cache row may have a new
        occupant, whose own steps come after this one."""
        if step.verify:
            return self._after_verification(step, logits)
        fed = step.tokens.size(1)
        live = [(i, seq) for i, seq in enumerate(step.sequences) if not seq.request.done]
        for _, seq in live:
            self.slots[seq.slot].cached += seq.pending[:fed]
            seq.pending = seq.pending[fed:]
            seq.pos += fed
        if not live or (step.prefill and not step.last_chunk):
            return
        if all(seq.request.turn.args.temperature == 0 for _, seq in live):
            best = logits.argmax(dim=-1).tolist()  # (B,): greedy rows need no generator
            tokens = [best[i] for i, _ in live]
        else:
            tokens = [seq.sample(logits[i]) for i, seq in live]
        for (_, seq), token in zip(live, tokens):
            seq.accept(token)
        if step.prefill:
            live[0][1].request.first_tokens()
        self._leave_finished(seq for _, seq in live)

    def _after_verification(self, step: Step, logits: torch.Tensor):
        """logits (B, T, V): each row keeps the draft tokens the target agrees with and the target's next token
        (speculative.py); its cache row holds its newest token and the kept draft tokens, the rest is rolled
        back (the positions past them are overwritten before they are ever read)."""
        live = [(i, seq) for i, seq in enumerate(step.sequences) if not seq.request.done]
        for i, seq in live:
            draft, args = step.drafts[i], seq.request.turn.args
            rows = logits[i, :len(draft.tokens) + 1]  # (n + 1, V)
            new = verify_greedy(rows, draft.tokens) if args.temperature == 0 else \
                verify_sampled(rows, draft, args, seq.rng)
            stats = seq.request.stats
            stats.drafted += len(draft.tokens)
            stats.accepted += len(new) - 1
            stats.verifications += 1
            _back_off(seq, drafted=len(draft.tokens), kept=len(new) - 1)
            newest, taken = seq.pending, 0
            for token in new:  # in order, until a stop condition (a stop token among the kept drafts ends it)
                seq.accept(token)
                taken += 1
                if seq.finished:
                    break
            stats.verified_tokens += taken
            in_cache = newest + new[:min(taken, len(new) - 1)]  # fed with the step: the newest and kept drafts
            self.slots[seq.slot].cached += in_cache
            seq.pos += len(in_cache)
        self._leave_finished(seq for _, seq in live)

    def _leave_finished(self, seqs):
        """Requests all of whose sequences finished leave and end."""
        for request in {id(seq.request): seq.request for seq in seqs}.values():
            if all(seq.finished for seq in request.sequences):
                self._leave(request)
                request.finish()

    # ----- joining and leaving -----

    def _admit(self):
        while self.waiting:
            request = self.waiting[0]
            free = [slot for slot in self.slots if slot.sequence is None]
            if len(free) < len(request.sequences):
                return  # first come, first served: nobody overtakes the oldest
            self.waiting.popleft()
            self._join(request, free)

    def _join(self, request: Request, free: list[Slot]):
        prompt = request.turn.tokens
        if len(request.sequences) == 1 and self.prefix_reuse:
            slot, reused = self._best_slot(prompt, free)
            chosen = [slot]
        else:  # several samples feed their prompt together, from position 0
            chosen, reused = sorted(free, key=lambda s: s.last_used)[:len(request.sequences)], 0
        request.stats.prompt_tokens, request.stats.cached_tokens = len(prompt) - reused, reused
        now = next(self._clock)
        for seq, slot in zip(request.sequences, chosen):
            slot.sequence, slot.last_used = seq, now
            slot.cached = slot.cached[:reused]
            seq.slot, seq.pos, seq.pending = slot.index, reused, list(prompt[reused:])
        self.running.append(request)

    def _best_slot(self, prompt: list[int], free: list[Slot]) -> tuple[Slot, int]:
        """The free row to use and how many of the prompt's tokens it already holds.

        Only a row whose tokens all start the prompt is reused (the conversation it holds goes on), the
        longest first; at least one prompt token is fed, for its logits. Otherwise an empty row, else the least
        recently used, from position 0: a prefix shared with another conversation (a system prompt) is fed
        again, so that a request's tokens do not depend on which requests came before it (a prompt fed in
        other chunks rounds differently)."""
        def extends(slot: Slot) -> bool:
            return 0 < len(slot.cached) < len(prompt) and prompt[:len(slot.cached)] == slot.cached
        extending = [s for s in free if extends(s)]
        if extending:
            slot = max(extending, key=lambda s: len(s.cached))
            return slot, len(slot.cached)
        return next((s for s in free if not s.cached), None) or min(free, key=lambda s: s.last_used), 0

    def _leave(self, request: Request):
        if request in self.running:
            self.running.remove(request)
        for seq in request.sequences:
            if seq.slot >= 0 and self.slots[seq.slot].sequence is seq:
                self.slots[seq.slot].sequence = None


# A sequence whose draft was rejected whole drafts nothing for 1, 2, 4, ... up to this many decode steps (reset by a
# kept draft token): a verification of k + 1 rows costs more than a one-row step (prompt lookup on a text the model
# paraphrases: 13% of drafts kept, 0.95x plain decoding), and a draft model's drafts cost its forwards.
MAX_DRAFT_PAUSE = 16


def _back_off(seq: Sequence, drafted: int, kept: int):
    if kept > 0:
        seq.draft_backoff = 0
    elif drafted > 0:
        seq.draft_backoff = min(MAX_DRAFT_PAUSE, 2 * seq.draft_backoff or 1)
        seq.draft_pause = seq.draft_backoff


def _step_of(seqs: list[Sequence], tokens: torch.Tensor, **kind) -> Step:
    """The step feeding ``tokens`` (B, T) to ``seqs``, each at its own position in its own cache row."""
    return Step(tokens, torch.tensor([s.pos for s in seqs]), torch.tensor([s.slot for s in seqs]), list(seqs), **kind)
