"""Latency and throughput of `torchchat.py server` under 1 and 4 concurrent clients; prints a table.

    python benchmarks/server_bench.py                                # starts a server on the default model
    python benchmarks/server_bench.py --url http://127.0.0.1:8000    # measures a server already running
    python benchmarks/server_bench.py -- --dtype bf16                # flags after -- go to the server

Each client sends streamed chat requests (temperature 0, `max_tokens` each) one after another.
Time to first token (TTFT) and latency are taken at the client, from sending to the first text
and to `[DONE]`; throughput is all completion tokens over the wall time of the level. The server
answers one request at a time, so with 4 clients TTFT includes the wait in its queue.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Write a short story about a robot who learns to paint.",
           "Explain how a bicycle works to a child.",
           "Describe a walk through a forest in autumn.",
           "Write a letter from a cat to its owner."]


@dataclass
class Sample:
    ttft_s: float
    latency_s: float
    tokens: int


def stream_chat(url: str, prompt: str, max_tokens: int) -> Sample:
    """One streamed chat request; returns its timings and completion tokens (from the usage chunk)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:500]!r}")
    ttft, tokens = None, 0
    for line in response:
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(chunk["error"]["message"])
        if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            ttft = time.perf_counter() - t0
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - t0
    conn.close()
    return Sample(ttft if ttft is not None else latency, latency, tokens)


def run_level(url: str, clients: int, requests_per_client: int, max_tokens: int) -> tuple[list[Sample], float]:
    def client(i: int) -> list[Sample]:
        return [stream_chat(url, PROMPTS[(i + k) % len(PROMPTS)], max_tokens) for k in range(requests_per_client)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        samples = [s for batch in pool.map(client, range(clients)) for s in batch]
    return samples, time.perf_counter() - t0


def table_row(clients: int, samples: list[Sample], wall_s: float) -> str:
    lat = [s.latency_s for s in samples]
    ttft = [s.ttft_s for s in samples]
    tokens = sum(s.tokens for s in samples)
    per_request = statistics.median(s.tokens / s.latency_s for s in samples)
    return (f"| {clients} | {len(samples)} | {tokens} | {statistics.median(ttft):.2f} / {max(ttft):.2f} | "
            f"{statistics.median(lat):.2f} / {max(lat):.2f} | {per_request:.1f} | {tokens / wall_s:.1f} |")


def start_server(flags: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(ROOT / "torchchat.py"), "server", "--port", str(port), *flags],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}; run it by hand to see why")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).close()
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    sys.exit("the server did not start within 300 s")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    server_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="a running server (default: start one)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4], help="concurrency levels")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)

    proc, url = (None, args.url) if args.url else start_server(server_flags)
    try:
        stream_chat(url, PROMPTS[0], 8)  # warm-up: first-call allocations and caches
        print(f"server {url}, {args.max_tokens} max tokens per request, temperature 0, "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs\n")
        print("| clients | requests | completion tokens | TTFT s (median / max) | latency s (median / max) "
              "| tok/s per request (median) | tok/s total |")
        print("|---|---|---|---|---|---|---|")
        for clients in args.clients:
            samples, wall = run_level(url, clients, args.requests_per_client, args.max_tokens)
            print(table_row(clients, samples, wall), flush=True)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
