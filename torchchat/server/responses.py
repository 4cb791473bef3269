"""OpenAI's response bodies and stream chunks, for chat and for plain completions.

A stream is Server-Sent Events: ``data: {chunk}`` lines, then ``data: [DONE]``. Every sequence (choice)
streams token by token as the batch generates it; each chunk names its choice ``index``, so with ``n`` > 1
the choices' pieces interleave and clients assemble them by index.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import AsyncIterator

from torchchat.generate.base import Completion
from torchchat.errors import ConfigError
from torchchat.server.engine import EngineRequest
from torchchat.server.errors import ApiError, bad_request


def usage(prompt_tokens: int, completions: list[Completion], cached_tokens: int = 0) -> dict:
    """Token counts; the completion tokens of every choice, a stop token included (it was generated).
    ``cached_tokens``: the prompt's tokens found in a KV cache row (prefix reuse), as OpenAI reports them."""
    completion_tokens = sum(len(c.tokens) for c in completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def api_error(e: Exception) -> ApiError:
    """A failure reported by the worker -> what the client is told."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ConfigError):
        return bad_request(str(e))
    # The worker logged it. Its text (a collective's error on a distributed server, say) is not the client's.
    return ApiError(500, "generation failed; the server's log has the details", type="server_error")


class Shape:
    """What differs between the two endpoints: object names and the layout of a choice."""

    object = chunk_object = id_prefix = ""

    def __init__(self, model: str):
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = model

    def choice(self, index: int, completion: Completion) -> dict:
        raise NotImplementedError

    def delta(self, index: int, text: str | None, finish_reason: str | None = None) -> dict:
        raise NotImplementedError

    def opening(self, n: int) -> list[dict]:
        """Choices of a first chunk sent before any text (chat announces the role)."""
        return []

    def response(self, completions: list[Completion], prompt_tokens: int, cached_tokens: int = 0) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [self.choice(i, c) for i, c in enumerate(completions)],
                "usage": usage(prompt_tokens, completions, cached_tokens)}

    def chunk(self, choices: list[dict], **extra) -> str:
        body = {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                "choices": choices, **extra}
        return sse(body)


class ChatShape(Shape):
    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def choice(self, index: int, completion: Completion) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": completion.text},
                "logprobs": None, "finish_reason": completion.finish_reason}

    def delta(self, index: int, text: str | None, finish_reason: str | None = None) -> dict:
        return {"index": index, "delta": {} if text is None else {"content": text}, "logprobs": None,
                "finish_reason": finish_reason}

    def opening(self, n: int) -> list[dict]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(n)]


class TextShape(Shape):
    object, chunk_object, id_prefix = "text_completion", "text_completion", "cmpl"

    def choice(self, index: int, completion: Completion) -> dict:
        return {"index": index, "text": completion.text, "logprobs": None, "finish_reason": completion.finish_reason}

    def delta(self, index: int, text: str | None, finish_reason: str | None = None) -> dict:
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}


def sse(body: dict | str) -> str:
    data = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


class StopHoldBack:
    """Passes streamed text on, holding back any tail that may be the start of a stop string.

    The generator ends a sequence once a stop string appears in its text, and the final text stops
    before it; a stream must not show the first characters of a stop string that the next token
    completes. Text is released once it can no longer be part of one.
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.pending = ""
        self.sent = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        hits = [self.pending.find(s) for s in self.stops if s in self.pending]
        if hits:
            self.stopped = True
            return self._release(min(hits))
        longest = min(max((len(s) for s in self.stops), default=1) - 1, len(self.pending))  # <= MAX_STOP_CHARS
        held = next((k for k in range(longest, 0, -1) if any(self.pending.endswith(s[:k]) for s in self.stops)), 0)
        return self._release(len(self.pending) - held)

    def finish(self, final_text: str) -> str:
        """What the final text (already cut at a stop string by the generator) adds to what was sent."""
        return final_text[len(self.sent):] if final_text.startswith(self.sent) else ""

    def _release(self, n: int) -> str:
        out, self.pending = self.pending[:n], self.pending[n:]
        self.sent += out
        return out


async def stream_events(shape: Shape, request: EngineRequest, prompt_tokens: int,
                        include_usage: bool) -> AsyncIterator[str]:
    """The SSE body of a streamed request; leaving early (the client went away) cancels the generation."""
    extra = {"usage": None} if include_usage else {}
    n = request.turn.args.num_samples
    holds = [StopHoldBack(request.turn.args.stop) for _ in range(n)]  # one per choice
    try:
        if opening := shape.opening(n):
            yield shape.chunk(opening, **extra)
        async for index, piece in request.text():
            if text := holds[index].push(piece):
                yield shape.chunk([shape.delta(index, text)], **extra)
        completions = request.completions
        for i, c in enumerate(completions):
            if rest := holds[i].finish(c.text):
                yield shape.chunk([shape.delta(i, rest)], **extra)
        for i, c in enumerate(completions):
            yield shape.chunk([shape.delta(i, None, c.finish_reason)], **extra)
        if include_usage:
            yield shape.chunk([], usage=usage(prompt_tokens, completions, request.cached_tokens))
    except Exception as e:  # noqa: BLE001 - the status line is sent: the error goes in the stream
        yield sse(api_error(e).body())
    finally:
        request.cancel()  # no-op once done; on a disconnect its sequences leave the batch before the next step
    yield sse("[DONE]")
