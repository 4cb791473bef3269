"""The generation worker: one thread owns the Generator and drives its schedule; requests join the running batch.

Why one thread: the KV cache rows, the schedule and, distributed, the collectives of every step belong to one
sequence of calls that every rank must make in the same order. The HTTP side lives on an asyncio event loop:
it validates and tokenizes requests, then posts them to the worker's inbox (a thread-safe queue). The worker
submits them to the generator's scheduler, where they wait for free cache rows and then join the batch; it
applies cancellations (a client gone, shutdown) between two steps, and calls ``generator.step()`` while
anything runs or waits; idle, it blocks on the inbox. Each request's text pieces and its outcome travel back
to the event loop through its ``EngineRequest``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import AsyncIterator

from torchchat.generate.base import Completions, Generator, Request, Turn
from torchchat.server.errors import server_busy

log = logging.getLogger("torchchat.server")


class Cancelled(Exception):
    """The client went away: its request left the batch between two steps."""


class EngineRequest:
    """One request, from the event loop's side: the worker posts its text pieces, then its outcome.

    Text pieces are ``(index, text)``: the text of the request's sequence ``index`` (a choice), as it arrives.
    """

    def __init__(self, turn: Turn, loop: asyncio.AbstractEventLoop, inbox: queue.Queue):
        self.turn = turn
        self.scheduled: Request | None = None  # the generator's request, once the worker submitted it
        self.completions: Completions | None = None  # set when it ends, before text() returns
        self.cached_tokens = 0  # prompt tokens found in a cache row (prefix reuse), not fed again
        self.cancelled = threading.Event()
        self.streamed = 0  # tokens streamed so far, every sequence
        self._loop = loop
        self._inbox = inbox
        self._events: asyncio.Queue = asyncio.Queue()

    def cancel(self, error: Exception | None = None):
        """Ask the worker to drop it between two steps (or never to start it); ``error`` ends the listener's
        wait now. A no-op on the worker's side once it ended."""
        if error is not None:
            self.post(error)
        if not self.cancelled.is_set():
            self.cancelled.set()
            if self.completions is None:  # else it ended: nothing left to stop
                self._inbox.put(("cancel", self))

    # ----- worker side -----

    def post(self, item):
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:
            pass  # the event loop is closed: nobody is listening any more

    def on_text(self, index: int, text: str):
        """The generator's text callback, on the worker thread."""
        self.streamed += 1
        if text and not self.cancelled.is_set():
            self.post((index, text))

    # ----- event-loop side -----

    async def text(self) -> AsyncIterator[tuple[int, str]]:
        """``(index, text)`` pieces as the sequences generate them; ``completions`` is set when it ends."""
        while True:
            item = await self._events.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, Completions):
                self.completions = item
                return
            yield item

    async def result(self) -> Completions:
        async for _ in self.text():
            pass
        return self.completions


class Engine:
    """Owns the generator on one worker thread; ``submit`` hands it a request, ``stop`` ends the worker.

    ``max_queue``: requests allowed to wait for a free cache row; beyond, ``submit`` answers 503.
    """

    def __init__(self, generator: Generator, *, max_queue: int = 64):
        self.generator = generator
        self.max_queue = max_queue
        self._inbox: queue.Queue[tuple[str, EngineRequest] | None] = queue.Queue()
        self._pending: set[EngineRequest] = set()  # submitted here, not ended: shutdown cuts them
        self._unadmitted: list[EngineRequest] = []  # not yet in the batch, in arrival order
        self._free_rows = generator.max_batch  # cache rows no running request holds, after the last step
        self._running = 0  # requests in the batch, after the last step
        self._stopping = False
        self._lock = threading.Lock()  # orders submit() against shutdown() and the worker's figures
        self._thread = threading.Thread(target=self._run, name="generation-worker", daemon=True)

    def start(self):
        self._thread.start()

    def submit(self, turn: Turn) -> EngineRequest:
        """Hand ``turn`` (already validated: it fits the context and the batch) to the worker; 503 when
        ``max_queue`` requests wait already, or when stopping."""
        request = EngineRequest(turn, asyncio.get_running_loop(), self._inbox)
        with self._lock:
            if self._stopping:
                raise server_busy("the server is shutting down")
            if (waiting := self._waiting_locked()) >= self.max_queue:
                raise server_busy(f"{waiting} requests are waiting for a free slot (--max-queue); retry later")
            self._pending.add(request)
            self._unadmitted.append(request)
            self._inbox.put(("submit", request))
        return request

    def health(self) -> dict:
        """Requests in the batch, requests waiting for a free slot, and the slots (KV cache rows)."""
        with self._lock:
            return {"running": self._running, "waiting": self._waiting_locked(),
                    "max_batch": self.generator.max_batch}

    def shutdown(self):
        """Refuse new requests; end every pending one now with a 503 (running ones leave the batch)."""
        with self._lock:
            first = not self._stopping
            self._stopping = True
            pending = list(self._pending)
        for request in pending:
            request.cancel(server_busy("the server is shutting down; the request was cut"))
        if first:
            self._inbox.put(None)  # after the cancellations: the worker applies them, then ends

    def stop(self, timeout: float = 30.0):
        """``shutdown``, then wait for the worker to end (it tells distributed followers to leave)."""
        self.shutdown()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the generation worker did not stop within %.0f s", timeout)

    def _waiting_locked(self) -> int:
        """Requests that will not find free rows at the next step: the schedule admits in arrival order, a
        request of n samples taking n rows."""
        free = self._free_rows
        for i, request in enumerate(self._unadmitted):
            free -= request.turn.args.num_samples
            if free < 0:
                return len(self._unadmitted) - i
        return 0

    # ----- the worker thread -----

    def _run(self):
        try:
            while self._take_inbox():
                if self.generator.scheduler.busy:
                    self._step()
                self._publish()
        finally:
            with self._lock:
                self._stopping = True  # normally already; after a bug in the worker, nobody would serve them
            self._cut_all()
            self._end_session()

    def _take_inbox(self) -> bool:
        """Submit new requests and apply cancellations; block while nothing runs. False once told to stop."""
        block = not self.generator.scheduler.busy
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if item is None:
                return False
            kind, request = item
            if kind == "submit":
                self._submit(request)
            elif request.scheduled is not None and not request.scheduled.done:
                self.generator.cancel(request.scheduled, Cancelled())  # its rows are free for the next step

    def _submit(self, request: EngineRequest):
        if request.cancelled.is_set():  # its client left, or shutdown answered it, before the model saw it
            self._forget(request)
            return
        try:
            request.scheduled = self.generator.submit(request.turn, request.on_text,
                                                    lambda done: self._done(request, done))
        except Exception as e:  # noqa: BLE001 - a request the generator refuses fails alone
            log.warning("request refused by the generator: %s", e)
            self._forget(request)
            request.post(e)

    def _step(self):
        try:
            self.generator.step()
        except Exception:  # noqa: BLE001 - the scheduler failed every request in it (a 500 each); serve on
            log.exception("generation failed: every request in the batch was answered with an error")

    def _done(self, request: EngineRequest, done: Request):
        """The generator's on_done, on the worker thread: the figures first (it has left the batch), so that a
        client that sees its answer sees them too."""
        self._forget(request)
        self._publish()
        if done.error is None:
            request.cached_tokens = done.stats.cached_tokens
            request.post(done.completions)
            log.info("request done: %s", done.completions.stats.summary(self.generator.device))
            return
        if isinstance(done.error, Cancelled):
            log.info("request cancelled after streaming %d tokens", request.streamed)
        request.post(done.error)

    def _forget(self, request: EngineRequest):
        with self._lock:
            self._pending.discard(request)
            if request in self._unadmitted:
                self._unadmitted.remove(request)

    def _publish(self):
        """The figures ``submit`` and ``/health`` read: who joined the batch, how many rows are free."""
        scheduler = self.generator.scheduler
        waiting = {id(r) for r in scheduler.waiting}
        held = sum(len(r.sequences) for r in scheduler.running)
        with self._lock:
            self._unadmitted = [r for r in self._unadmitted if r.scheduled is None or id(r.scheduled) in waiting]
            self._free_rows = self.generator.max_batch - held
            self._running = len(scheduler.running)

    def _cut_all(self):
        """The worker ends (shutdown, or a bug in it): nothing may stay in the schedule unanswered."""
        with self._lock:
            pending = list(self._pending)
        for request in pending:
            request.post(server_busy("the server is shutting down; the request was cut"))
            if request.scheduled is not None and not request.scheduled.done:
                self.generator.cancel(request.scheduled, Cancelled())

    def _end_session(self):
        try:
            self.generator.end_session()  # distributed followers leave their loop
        except Exception as e:  # noqa: BLE001 - e.g. the followers were stopped first (torchrun forwards SIGTERM)
            log.warning("could not tell the other processes that the server stops: %s", str(e).splitlines()[0])
