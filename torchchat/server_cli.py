"""The `server` command: flags and handlers. Imports nothing heavy, so that `--help` stays fast.

Two handlers: ``handler`` for one process, ``handler_distributed(generator, args)`` for the
distributed launcher, which builds the generator on every rank and calls it on each.
"""

from __future__ import annotations

from torchchat.errors import ConfigError


def add_parser(sub, add_model_flags, add_runtime_flags, add_sampling_flags):
    from torchchat.cli import finite_float

    p = sub.add_parser("server", help="serve an OpenAI-compatible HTTP API and a chat page",
                       description="Serve the model over HTTP: OpenAI's /v1/chat/completions, /v1/completions and "
                                   "/v1/models, and a chat page at /. Requests are queued and answered one at a "
                                   "time. SIGINT or SIGTERM stops it.")
    add_model_flags(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    g.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    g.add_argument("--max-queue", type=int, default=64, help="requests allowed to wait; more are answered 503")
    g.add_argument("--shutdown-timeout", type=finite_float, default=10.0,
                   help="seconds in-flight requests get to finish after SIGINT/SIGTERM before they are cut")
    g.add_argument("--max-body-size", type=finite_float, default=8.0,
                   help="largest request body in MiB; larger ones are answered 413 without being read")
    g.add_argument("--max-connections", type=int, default=256,
                   help="open connections allowed at once; more are closed at once (one log line per burst)")
    g.add_argument("--allowed-hosts", default=None,
                   help="comma-separated Host header names served, '*' for any (default: localhost, 127.0.0.1 "
                        "and [::1] when --host is loopback, else any; guards against DNS rebinding)")
    add_sampling_flags(p)  # the defaults of requests that leave a parameter out
    add_runtime_flags(p)
    p.set_defaults(handler=cmd_server, handler_distributed=serve_distributed)


def server_config(args, model_id: str):
    from torchchat.cli import generation_args
    from torchchat.server import ServerConfig

    hosts = None if args.allowed_hosts is None else tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip())
    return ServerConfig(model_id, generation_args(args), host=args.host, port=args.port, max_queue=args.max_queue,
                        shutdown_timeout=args.shutdown_timeout, max_body_bytes=int(args.max_body_size * 2**20),
                        max_connections=args.max_connections, allowed_hosts=hosts)


def cmd_server(args) -> int:
    """One process: check the model files, take the port, load the weights, serve."""
    from torchchat.cli import DEFAULT_CHAT_SEQ_LEN, Prepared, build_generator

    server = _import_server()
    prep = Prepared(args)
    config = server_config(args, prep.source.name)
    sock = server.bind(config.host, config.port)  # a busy port fails now, not after loading the weights
    try:
        generator = build_generator(args, prep, prep.max_seq_len(args, DEFAULT_CHAT_SEQ_LEN))
        server.serve(generator, config, sock=sock)
    finally:
        sock.close()
    return 0


def serve_distributed(generator, args) -> int:
    """Every rank, with the generator the launcher built: rank 0 serves, the others follow each request.

    A request whose client goes away is generated to its end and discarded: ending it early on the
    serving rank alone would leave the others waiting in a collective.
    """
    from torchchat.cli import resolve_source

    server = _import_server()
    if not generator.is_io_rank:
        server.follow(generator)
        return 0
    server.serve(generator, server_config(args, resolve_source(args).name), cancellable=False,
                 launched=True)
    return 0


def _import_server():
    try:
        import torchchat.server as server
    except ImportError as e:
        raise ConfigError(f"the server needs FastAPI and uvicorn ({e}): pip install -r requirements.txt") from e
    return server
