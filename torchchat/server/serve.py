"""Running the server: bind the port, run uvicorn until SIGINT/SIGTERM.

Shutdown: uvicorn stops accepting connections and gives in-flight requests ``shutdown_timeout``
seconds to finish (a second Ctrl-C ends that wait); then the engine cuts what is left (each such
request ends with a 503 error, its sequences leave the batch before the next step). The application's
lifespan then stops the engine, whose worker calls ``generator.end_session()`` so that distributed
followers (``generator.follow()`` on the other ranks) return; the listening socket closes with the server.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import time

import uvicorn

from torchchat.generate.base import Generator
from torchchat.errors import ConfigError
from torchchat.server.app import ServerConfig, create_app
from torchchat.server.connections import (KEEP_ALIVE_S, HostCheck, guarded_protocol, quiet_accept_errors,
                                          raise_open_file_limit)
from torchchat.server.engine import Engine

BACKSTOP_S = 5.0  # after the grace period, how long cut requests get to end before uvicorn cancels them
# Distributed, a launcher (torchrun, torchchat's own) forwards the SIGINT it gets to every rank, so one Ctrl-C
# in a terminal reaches rank 0 twice, from the terminal and from the launcher, moments apart. A second
# SIGINT this soon after the first is that echo, not a second Ctrl-C (which skips the wait).
SIGINT_ECHO_S = 1.0


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now so that a busy port fails before any weight is loaded."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart over TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host") from e
    return sock


def serve(generator: Generator, config: ServerConfig, *, sock: socket.socket | None = None, launched: bool = False):
    """Serve ``generator`` over HTTP until SIGINT or SIGTERM (runs on the I/O process only).

    ``launched``: under a launcher that forwards a terminal's Ctrl-C to this process, which got it already
    (see ``SIGINT_ECHO_S``).
    """
    sock = sock or bind(config.host, config.port)
    _log_to_stderr()
    raise_open_file_limit(config.max_connections + 256)  # room for the cap, the model's files and the ranks
    quiet_accept_errors()
    engine = Engine(generator, max_queue=config.max_queue)
    app = HostCheck(create_app(engine, config), config.allowed_hosts)
    server = _Server(uvicorn.Config(app, log_level="info", http=guarded_protocol(config.max_connections),
                                    timeout_keep_alive=KEEP_ALIVE_S,
                                    timeout_graceful_shutdown=config.shutdown_timeout + BACKSTOP_S), engine,
                     config.shutdown_timeout, SIGINT_ECHO_S if launched else 0.0)
    host, port = sock.getsockname()[:2]
    generator.report(f"serving {config.model_id} on http://{_url_host(host)}:{port}/ (chat page; OpenAI API "
                     f"under /v1); Ctrl-C stops")
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()  # already done by the lifespan, unless a third Ctrl-C skipped it
        sock.close()


class _Server(uvicorn.Server):
    """uvicorn's server; when the grace period after a signal ends, the engine cuts what is pending.

    Cut requests end cleanly (a 503, or an error event and ``[DONE]`` in a stream), instead of
    uvicorn cancelling their tasks mid-write; uvicorn's own timeout stays as a backstop.
    """

    def __init__(self, config: uvicorn.Config, engine: Engine, grace_s: float, echo_s: float):
        super().__init__(config)
        self.engine = engine
        self.grace_s = grace_s
        self.echo_s = echo_s
        self.first_signal_at = 0.0
        self.cut_early = False

    def handle_exit(self, sig: int, frame):
        """uvicorn's, except that a second Ctrl-C ends the grace period now instead of forcing the exit.

        uvicorn's forced exit drops open connections mid-response and skips the application's
        shutdown, so asyncio cancels tasks under it (CancelledError tracebacks in the log). Here the
        engine cuts what is pending at once, as at the end of the grace period, and the shutdown runs
        as usual; a third Ctrl-C forces. Under a launcher, the echo of the first one is dropped.
        """
        if sig == signal.SIGINT and self.should_exit and not self.cut_early:
            if time.monotonic() - self.first_signal_at < self.echo_s:
                return  # the launcher's copy of the first Ctrl-C
            self.cut_early = True
            # Not from here: a signal handler may run while the event loop's thread holds the engine's lock.
            asyncio.get_running_loop().call_soon_threadsafe(self.engine.shutdown)
            return
        if not self.should_exit:
            self.first_signal_at = time.monotonic()
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None):
        cut = asyncio.get_running_loop().call_later(self.grace_s, self.engine.shutdown)
        try:
            await super().shutdown(sockets)
        finally:
            cut.cancel()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _log_to_stderr():
    log = logging.getLogger("torchchat.server")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))  # uvicorn's look
        log.addHandler(handler)
        log.setLevel(logging.INFO)
