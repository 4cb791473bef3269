"""Connection hygiene, as production ASGI servers do it: a cap on open connections, a deadline for a
request's headers, one log line per burst of refusals, and a check of the Host header.

Without these, a client that opens thousands of connections and sends nothing holds a file
descriptor each until the process runs out; then every real request fails, and asyncio logs a
traceback for each connection it can no longer accept. uvicorn's ``limit_concurrency`` does not
help there: it answers 503 only to a request that arrives, and keeps the silent connections open.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("torchchat.server")

HEADER_TIMEOUT_S = 10.0  # a connection that has not sent a whole request head by then is closed
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this (uvicorn's default)
REFUSAL_LOG_EVERY_S = 10.0  # refusals are logged once per this many seconds, with their count


class _RefusalLog:
    """Counts refused connections; logs the first of a burst at once, then a count every interval."""

    def __init__(self):
        self.count = 0
        self.logged_at = -float("inf")

    def refused(self, why: str):
        self.count += 1
        now = time.monotonic()
        if now - self.logged_at >= REFUSAL_LOG_EVERY_S:
            log.warning("refused %d connection(s) in the last %.0f s: %s", self.count,
                        min(now - self.logged_at, REFUSAL_LOG_EVERY_S), why)
            self.count, self.logged_at = 0, now


def guarded_protocol(max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a cap on open connections and a deadline for each request head."""
    refusals = _RefusalLog()

    class GuardedH11Protocol(H11Protocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._head_deadline: asyncio.TimerHandle | None = None  # closes a connection whose head is late

        def connection_made(self, transport: asyncio.Transport):  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                refusals.refused(f"{len(self.connections) - 1} connections are open (--max-connections "
                                 f"{max_connections})")
                transport.abort()
                return
            self._await_head()

        def data_received(self, data: bytes):
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle:  # a whole request head arrived
                self._cancel_deadline()

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing():
                self._await_head()  # the next request on this keep-alive connection has the same deadline

        def connection_lost(self, exc):
            self._cancel_deadline()
            super().connection_lost(exc)

        def _await_head(self):
            self._cancel_deadline()
            self._head_deadline = self.loop.call_later(HEADER_TIMEOUT_S, self._head_too_late)

        def _cancel_deadline(self):
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None

        def _head_too_late(self):
            self._head_deadline = None
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self.transport.close()

    return GuardedH11Protocol


class _AcceptErrorFilter(logging.Filter):
    """asyncio logs a traceback each time it cannot accept a connection (no file descriptor left):
    thousands a second under a flood. Those become one line per interval, with their count."""

    def __init__(self):
        super().__init__()
        self.refusals = _RefusalLog()

    def filter(self, record: logging.LogRecord) -> bool:
        if "accept" not in record.getMessage():
            return True
        self.refusals.refused(f"cannot accept connections: {record.exc_info[1] if record.exc_info else 'error'}")
        return False


def quiet_accept_errors():
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _AcceptErrorFilter) for f in logger.filters):
        logger.addFilter(_AcceptErrorFilter())


def raise_open_file_limit(wanted: int):
    """Raise this process's soft limit on open files towards ``wanted`` (never above the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def default_allowed_hosts(bind_host: str) -> tuple[str, ...]:
    """Bound to loopback, only loopback names are served: a web page can then reach the server only
    through DNS rebinding (its own name resolving to 127.0.0.1), which this check refuses."""
    return LOOPBACK_HOSTS if bind_host in ("127.0.0.1", "localhost", "::1") else ()


class HostCheck:
    """ASGI middleware: a request whose Host header (port aside) is not allowed gets an OpenAI-style 400."""

    def __init__(self, app, allowed_hosts: tuple[str, ...]):
        self.app = app
        self.allowed = frozenset(h.lower() for h in allowed_hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.allowed or _host_name(scope) in self.allowed:
            return await self.app(scope, receive, send)
        body = json.dumps({"error": {"message": f"Host header {_host_name(scope)!r} is not served here "
                                                "(--allowed-hosts)", "type": "invalid_request_error",
                                     "param": None, "code": "host_not_allowed"}}).encode()
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _host_name(scope) -> str:
    """The Host header without its port ("[::1]:8000" -> "[::1]", "localhost:8000" -> "localhost")."""
    host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "").lower()
    return host if host.endswith("]") else host.rsplit(":", 1)[0] if ":" in host else host
