"""The generation worker: one thread owns the Generator and serves queued requests one at a time.

Why one thread and a FIFO queue: the model has one KV cache, and a distributed generator's calls
are collectives that every rank must make in the same order. So requests never run side by side;
each one starts at KV position 0, overwriting the cache (the causal mask hides what the previous
request left beyond the new one's positions), and requests cannot mix tokens.

The HTTP side lives on an asyncio event loop; ``QueuedRequest`` carries a request's text pieces
and its result from the worker thread to that loop.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import AsyncIterator

from torchchat.generate.base import Completion, Generator, Turn
from torchchat.generate.stats import GenerationStats
from torchchat.server.errors import server_busy

log = logging.getLogger("torchchat.server")


class Cancelled(Exception):
    """The client went away: raised from the text callback to end the generation between two tokens."""


class QueuedRequest:
    """One request in the queue: the worker posts text pieces and then the outcome to the event loop."""

    def __init__(self, turn: Turn, loop: asyncio.AbstractEventLoop):
        self.turn = turn
        self.completions: list[Completion] | None = None
        self.cancelled = threading.Event()
        self.queued_at = time.perf_counter()
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
        self._raised = False
        self.streamed = 0  # text callbacks answered: the tokens of sequence 0 streamed so far

    def cancel(self, error: Exception | None = None):
        """Ask the worker to stop (between tokens) or never to start; ``error`` ends the listener's wait now."""
        self.cancelled.set()
        if error is not None:
            self.post(error)

    # ----- worker side -----

    def post(self, item):
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:
            pass  # the event loop is closed: nobody is listening any more

    def on_text(self, text: str, cancellable: bool):
        """The generator's text callback, on the worker thread."""
        if cancellable and self.cancelled.is_set() and not self._raised:
            self._raised = True  # once: complete() calls this again from its `finally` to flush
            raise Cancelled()
        if not self._raised:
            self.streamed += 1
        if text and not self.cancelled.is_set():
            self.post(text)

    # ----- event-loop side -----

    async def text(self) -> AsyncIterator[str]:
        """The text of sequence 0, piece by piece; ``completions`` is set when it ends."""
        while True:
            item = await self._events.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, list):
                self.completions = item
                return
            yield item

    async def result(self) -> list[Completion]:
        async for _ in self.text():
            pass
        return self.completions


class Engine:
    """Owns the generator on one worker thread; ``submit`` queues a request, ``stop`` ends the worker.

    ``cancellable=False`` where a generation must never end early on this process alone (a
    distributed generator: the other ranks would wait in a collective forever); a request whose
    client goes away, or that shutdown cuts, then stops streaming at once, but the generation runs
    to its end (max_tokens or a stop) before the worker takes the next request.
    """

    def __init__(self, generator: Generator, *, cancellable: bool = True, max_queue: int = 64):
        self.generator = generator
        self.cancellable = cancellable
        self.max_queue = max_queue
        self._queue: queue.Queue[QueuedRequest | None] = queue.Queue()
        self._pending: set[QueuedRequest] = set()  # queued or running
        self._stopping = False
        self._lock = threading.Lock()  # orders submit() against shutdown(): nothing enters after it
        self._thread = threading.Thread(target=self._run, name="generation-worker", daemon=True)

    def start(self):
        self._thread.start()

    def submit(self, turn: Turn) -> QueuedRequest:
        """Queue ``turn`` (already validated: it fits the context); answer 503 when full or stopping."""
        request = QueuedRequest(turn, asyncio.get_running_loop())
        with self._lock:
            if self._stopping:
                raise server_busy("the server is shutting down")
            if self._queue.qsize() >= self.max_queue:
                raise server_busy(f"{self._queue.qsize()} requests are waiting (--max-queue); retry later")
            self._pending.add(request)
            self._queue.put(request)
        return request

    def shutdown(self):
        """Refuse new requests; end every pending one now with a 503 (and stop the running one if cancellable)."""
        with self._lock:
            first = not self._stopping
            self._stopping = True
            pending = list(self._pending)
        for request in pending:
            request.cancel(server_busy("the server is shutting down; the request was cut"))
        if first:
            self._queue.put(None)  # after everything queued: the worker skips the cancelled ones, then ends

    def stop(self, timeout: float = 30.0):
        """``shutdown``, then wait for the worker to end (it tells distributed followers to leave)."""
        self.shutdown()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the generation worker did not stop within %.0f s", timeout)

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    # ----- the worker thread -----

    def _run(self):
        try:
            while (request := self._queue.get()) is not None:
                try:
                    self._serve(request)
                finally:
                    with self._lock:
                        self._pending.discard(request)
        finally:
            self._end_session()

    def _end_session(self):
        try:
            self.generator.end_session()  # distributed followers leave their loop
        except Exception as e:  # noqa: BLE001 - e.g. the followers were stopped first (torchrun forwards SIGTERM)
            log.warning("could not tell the other processes that the server stops: %s", str(e).splitlines()[0])

    def _serve(self, request: QueuedRequest):
        if request.cancelled.is_set():
            return  # its client left, or shutdown answered it, while it waited: the model never sees it
        started = time.perf_counter()
        try:
            completions = self.generator.serve_turn(request.turn, lambda text: request.on_text(text, self.cancellable))
        except Cancelled:
            log.info("request cancelled after streaming %d tokens", request.streamed)
        except Exception as e:  # noqa: BLE001 - every failure goes back to its request, the worker goes on
            log.exception("generation failed")
            request.post(e)
        else:
            request.post(completions)
            self._log(request, started, completions.stats)

    def _log(self, request: QueuedRequest, started: float, stats: GenerationStats):
        log.info("request done after %.2f s in the queue: %s", started - request.queued_at,
                 stats.summary(self.generator.device))
