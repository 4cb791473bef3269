"""OpenAI's response bodies and stream chunks, for chat and for plain completions.

A stream is Server-Sent Events: ``data: {chunk}`` lines, then ``data: [DONE]``. Sequence 0 streams
token by token; with ``n`` > 1 the other sequences arrive whole at the end (each chunk names its
choice ``index``, so clients assemble them alike).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import AsyncIterator

from torchchat.generate.base import Completion
from torchchat.errors import ConfigError
from torchchat.server.engine import QueuedRequest
from torchchat.server.errors import ApiError, bad_request


def usage(prompt_tokens: int, completions: list[Completion]) -> dict:
    """Token counts; the completion tokens of every choice, a stop token included (it was generated)."""
    completion_tokens = sum(len(c.tokens) for c in completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


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

    def response(self, completions: list[Completion], prompt_tokens: int) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [self.choice(i, c) for i, c in enumerate(completions)],
                "usage": usage(prompt_tokens, completions)}

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


async def stream_events(shape: Shape, request: QueuedRequest, prompt_tokens: int,
                        include_usage: bool) -> AsyncIterator[str]:
    """The SSE body of a streamed request; leaving early (the client went away) cancels the generation."""
    extra = {"usage": None} if include_usage else {}
    hold = StopHoldBack(request.turn.args.stop)
    try:
        if opening := shape.opening(request.turn.args.num_samples):
            yield shape.chunk(opening, **extra)
        async for piece in request.text():
            if text := hold.push(piece):
                yield shape.chunk([shape.delta(0, text)], **extra)
        completions = request.completions
        if rest := hold.finish(completions[0].text):
            yield shape.chunk([shape.delta(0, rest)], **extra)
        for i, c in enumerate(completions[1:], start=1):
            yield shape.chunk([shape.delta(i, c.text)], **extra)
        for i, c in enumerate(completions):
            yield shape.chunk([shape.delta(i, None, c.finish_reason)], **extra)
        if include_usage:
            yield shape.chunk([], usage=usage(prompt_tokens, completions))
    except Exception as e:  # noqa: BLE001 - the status line is sent: the error goes in the stream
        yield sse(api_error(e).body())
    finally:
        request.cancel()  # no-op once done; on a disconnect it stops the worker between tokens
    yield sse("[DONE]")
