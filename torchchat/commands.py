"""What each command does, once its flags are parsed: `generate`, `chat`, `eval`, `list`, `server`.

Each command has a handler for one process, ``cmd_*(args)``, and those that may run over several
processes also a handler for one rank, ``*_on_rank(args, prep, build, io_rank)``: the launcher
(``torchchat/launch/``) calls it on every rank with its checked ``prep``, its generator factory
``build(args, prep, max_seq_len, max_batch=1)`` (``max_seq_len`` None on the ranks that do not
read the user: they take the reading rank's) and whether this rank talks to the user.

No torch import at module level: the CLI imports this module for `--help`.
"""

from __future__ import annotations

import sys

from torchchat.builder import DEFAULT_CHAT_SEQ_LEN, Prepared, build_generator, generation_args
from torchchat.errors import ConfigError


def read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    if sys.stdin is None or sys.stdin.isatty():
        raise ConfigError("no prompt: pass --prompt TEXT or pipe the text on standard input")
    return sys.stdin.read()


def generate_seq_len(args, prep: Prepared, prompt_len: int, gen_args) -> int:
    """The KV cache length `generate` needs for a prompt of ``prompt_len`` tokens; ContextFull if it does not fit
    (checked here, before any weight is loaded; the generator checks each request the same way)."""
    from torchchat.generate.base import check_fits

    max_seq_len = prep.max_seq_len(args, prompt_len + gen_args.max_new_tokens)
    check_fits(prompt_len, gen_args.max_new_tokens, max_seq_len)
    return max_seq_len


def cmd_generate(args, prep: Prepared | None = None, build=build_generator, read=read_prompt) -> int:
    """`generate`. On a rank, ``read`` returns None where the prompt is not read (see the module docstring).

    The prompt is encoded once, here: its length sizes the KV cache, and the generator takes its tokens.
    """
    from torchchat.generate.base import encode_prompt

    gen_args = generation_args(args, args.num_samples)
    prep = prep or Prepared(args)
    prompt = read(args)
    tokens = None if prompt is None else encode_prompt(prep.tokenizer, prompt)
    max_seq_len = None if tokens is None else generate_seq_len(args, prep, len(tokens), gen_args)
    generator = build(args, prep, max_seq_len, max_batch=gen_args.num_samples)
    generator.run_generate(prompt, gen_args, tokens=tokens)
    return 0


def generate_on_rank(args, prep: Prepared, build, io_rank: bool) -> int:
    return cmd_generate(args, prep=prep, build=build, read=read_prompt if io_rank else lambda _args: None)


def read_user_line() -> str | None:
    """One user turn from the terminal (blank lines are skipped); None at EOF, Ctrl-C or /bye."""
    text = ""
    while not text.strip():
        try:
            text = input("\nYou: ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stdout)
            return None
    if text.strip() in ("/bye", "/exit", "/quit"):
        return None
    print("Assistant: ", end="", flush=True)
    return text


def cmd_chat(args, prep: Prepared | None = None, build=build_generator) -> int:
    """`chat`; on a rank, with the launcher's checked ``prep`` and its generator factory."""
    gen_args = generation_args(args)
    prep = prep or Prepared(args)
    max_seq_len = prep.max_seq_len(args, DEFAULT_CHAT_SEQ_LEN)
    if gen_args.max_new_tokens >= max_seq_len:
        raise ConfigError(f"--max-new-tokens ({gen_args.max_new_tokens}) must be below the context ({max_seq_len})")
    generator = build(args, prep, max_seq_len)
    generator.report(generator.chat_help)
    generator.run_chat(gen_args, read_user_line, args.system_prompt)
    return 0


def chat_on_rank(args, prep: Prepared, build, io_rank: bool) -> int:
    return cmd_chat(args, prep=prep, build=build)


def read_eval_text(args) -> str:
    """The text `eval` scores (--text-file), checked before any weight loads."""
    from pathlib import Path

    path = Path(args.text_file)
    if not path.is_file():
        raise ConfigError(f"text file not found: {path} (check --text-file)")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ConfigError(f"{path} is empty: give --text-file a text to score")
    return text


def cmd_eval(args, prep: Prepared | None = None, build=build_generator, read=read_eval_text) -> int:
    """`eval`: the perplexity of a text (torchchat/perplexity.py has the protocol). On a rank, ``read`` returns None
    where the text is not read: that rank follows the reading one's forwards."""
    import json
    from pathlib import Path

    from torchchat.perplexity import DEFAULT_WINDOW, perplexity, windows_of

    prep = prep or Prepared(args)
    text = read(args)
    window = tokens = None
    if text is not None:  # every check before the weights load: the window, the text's length
        window = prep.max_seq_len(args, DEFAULT_WINDOW)
        tokens = prep.tokenizer.encode(text, bos=prep.tokenizer.add_bos)
        windows_of(tokens, window, None)
    generator = build(args, prep, window, max_batch=args.batch * args.pp)  # a pipeline keeps each stage busy
    if not generator.is_io_rank:
        generator.follow()
        return 0
    def progress(done: int, total: int, ppl: float, rate: float):
        if done % max(1, total // 20) == 0 or done == total:  # about 20 lines, whatever the text's length
            generator.report(f"eval: {done}/{total} windows, perplexity so far {ppl:.4f}, {rate:.1f} tokens/s")

    try:
        result = perplexity(generator, tokens, window, progress)
    finally:
        generator.end_session()
    generator.report(f"eval: {result.windows} windows of {window} tokens ({result.tokens} scored) in "
                     f"{result.seconds:.1f} s, {result.tokens_per_s:.1f} tokens/s")
    if args.json:
        figures = {"model": prep.source.name, "text_file": str(args.text_file), "batch": args.batch, **result.as_dict()}
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    generator.write(f"perplexity: {result.perplexity:.4f} over {result.tokens} tokens\n")
    return 0


def eval_on_rank(args, prep: Prepared, build, io_rank: bool) -> int:
    return cmd_eval(args, prep=prep, build=build, read=read_eval_text if io_rank else lambda _args: None)


def cmd_list(args) -> int:
    """Every known model, with what it runs as by default (see builder.weights_dtype) where it is available."""
    from torchchat.builder import describe_weights
    from torchchat.catalog import ModelSource, list_models
    from torchchat.checkpoint import CheckpointError, weight_types
    from torchchat.model import KNOWN_MODELS

    rows = []
    for name, path in list_models():
        a = KNOWN_MODELS[name]
        runs_as = "-"
        if path is not None:
            try:
                gguf = path.suffix == ".gguf"
                runs_as = describe_weights(weight_types(ModelSource(name, gguf_path=path)) if gguf else {})
            except CheckpointError:
                runs_as = "unreadable"
        rows.append((name, a.n_layers, a.dim, f"{a.n_heads}/{a.n_kv_heads}", a.max_context, runs_as,
                     path or "not available"))
    width = max(len("runs as"), *(len(r[5]) for r in rows))
    print(f"{'model':<16} {'layers':>6} {'dim':>6} {'heads':>9} {'context':>8}  {'runs as':<{width}}  available")
    for name, layers, dim, heads, context, runs_as, where in rows:
        print(f"{name:<16} {layers:>6} {dim:>6} {heads:>9} {context:>8}  {runs_as:<{width}}  {where}")
    return 0


def server_config(args, model_id: str):
    from torchchat.server import ServerConfig

    hosts = None if args.allowed_hosts is None else tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip())
    return ServerConfig(model_id, generation_args(args), host=args.host, port=args.port, max_queue=args.max_queue,
                        shutdown_timeout=args.shutdown_timeout, max_body_bytes=int(args.max_body_size * 2**20),
                        max_connections=args.max_connections, allowed_hosts=hosts)


def cmd_server(args) -> int:
    """`server`, one process: check the model files, take the port, load the weights, serve."""
    server = _import_server()
    prep = Prepared(args)
    config = server_config(args, prep.source.name)
    sock = server.bind(config.host, config.port)  # a busy port fails now, not after loading the weights
    try:
        generator = build_generator(args, prep, prep.max_seq_len(args, DEFAULT_CHAT_SEQ_LEN), args.max_batch)
        server.serve(generator, config, sock=sock)
    finally:
        sock.close()
    return 0


def server_on_rank(args, prep: Prepared, build, io_rank: bool) -> int:
    """Every rank: rank 0 serves and schedules the batch, the others run the steps it schedules until it stops."""
    server = _import_server()
    generator = build(args, prep, prep.max_seq_len(args, DEFAULT_CHAT_SEQ_LEN), max_batch=args.max_batch)
    if not io_rank:
        generator.follow()
        return 0
    server.serve(generator, server_config(args, prep.source.name), launched=True)
    return 0


def _import_server():
    try:
        import torchchat.server as server
    except ImportError as e:
        raise ConfigError(f"the server needs FastAPI and uvicorn ({e}): pip install -r requirements.txt") from e
    return server
