"""One chat request to an OpenAI-compatible server (torchchat's or llama.cpp's), timed at the client.

Plain ``http.client`` on purpose: the timings are the server's, not a client library's retries or pools.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from dataclasses import dataclass

REQUEST_TIMEOUT_S = 1800  # a whole answer of a slow setting (fp32, a queue of 8 ahead) fits well within


@dataclass
class Reply:
    """What a client saw of one request: its text, the server's token counts, and when things happened."""

    text: str
    completion_tokens: int  # the server's usage figure: tokens actually generated
    prompt_tokens: int
    cached_tokens: int | None  # usage.prompt_tokens_details.cached_tokens, where the server reports it
    start_s: float  # time.perf_counter() when the request was sent
    first_s: float | None  # when the first text arrived (streamed requests only)
    end_s: float  # when the whole answer had arrived
    finish_reason: str | None = None

    @property
    def latency_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_s is None else self.first_s - self.start_s


class Progress:
    """A streamed request's chunks so far, read by another thread (the short-request probe's trigger)."""

    def __init__(self):
        self.chunks = 0  # chunks that carried text

    def add(self):
        self.chunks += 1  # one writer (the request's thread); readers only compare, so no lock is needed


def chat(url: str, messages: list[dict], max_tokens: int, stream: bool = False,
         progress: Progress | None = None) -> Reply:
    """POST /v1/chat/completions, greedy (temperature 0); raises RuntimeError on an error answer."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}  # the token counts come in a last chunk
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=REQUEST_TIMEOUT_S)
    try:
        start = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:500]!r}")
        if stream:
            return _read_stream(response, start, progress)
        answer = json.loads(response.read())
        end = time.perf_counter()
    finally:
        conn.close()
    choice = answer["choices"][0]
    return Reply(choice["message"].get("content") or "", *_counts(answer["usage"]), start, None, end,
                 choice.get("finish_reason"))


def _read_stream(response, start: float, progress: Progress | None) -> Reply:
    text, first, usage, finish = [], None, None, None
    for line in response:
        if not line.startswith(b"data: "):
            continue
        data = line[len(b"data: "):].strip()
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(chunk["error"].get("message", str(chunk["error"])))
        for choice in chunk.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                first = first if first is not None else time.perf_counter()
                text.append(piece)
                if progress is not None:
                    progress.add()
            finish = choice.get("finish_reason") or finish
        usage = chunk.get("usage") or usage
    end = time.perf_counter()
    if usage is None:
        raise RuntimeError("the stream carried no usage chunk (stream_options.include_usage unsupported?)")
    return Reply("".join(text), *_counts(usage), start, first, end, finish)


def _counts(usage: dict) -> tuple[int, int, int | None]:
    """(completion tokens, prompt tokens, cached prompt tokens or None) from an OpenAI usage object."""
    details = usage.get("prompt_tokens_details") or {}
    return usage["completion_tokens"], usage["prompt_tokens"], details.get("cached_tokens")
