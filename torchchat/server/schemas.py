"""Request bodies of the OpenAI endpoints, and how a request becomes a ``GenerationArgs``.

Parameters the server cannot honour are never dropped silently: an OpenAI parameter is accepted
only at the value that changes nothing (``presence_penalty: 0``, ``response_format: {"type":
"text"}``, ``tools: []``, ...); any other value, or a name OpenAI does not have, is a 400 naming it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from torchchat.generate.base import SEED_LIMIT, GenerationArgs, check_stop_strings
from torchchat.errors import ConfigError
from torchchat.server.errors import bad_request

MAX_N = 8  # sequences per request (n): each one is a row of the KV cache

# JSON types are taken as they are, as OpenAI's API does: no "5" or true for an integer, no "0.5" for a
# number (an integer is a number). Every request model below is strict.

# OpenAI parameters of both endpoints, each with the values that leave the output unchanged
# (null is always accepted). Any other value is refused with a 400 naming the parameter.
COMMON_NEUTRAL: dict[str, tuple] = {
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "logit_bias": ({},),
    "logprobs": (False,),
    "store": (False,),
    "metadata": ({},),
    "service_tier": ("auto", "default"),  # one process, one tier
}


def reject_unsupported(extras: dict[str, Any], neutral: dict[str, tuple], where: str = ""):
    """Fields the models do not declare: accepted only when null or at a neutral value."""
    for name, value in extras.items():
        if value is None:
            continue
        param = f"{where}{name}"
        if name not in neutral:
            raise bad_request(f"unrecognized request argument supplied: {param}", param, "unknown_parameter")
        if value not in neutral[name]:
            accepted = " or ".join(repr(v) for v in (None, *neutral[name]))
            raise bad_request(f"{param} is not supported by this server (accepted: {accepted}; got {value!r})",
                              param, "unsupported_parameter")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False  # a last chunk with the token counts


class SamplingRequest(BaseModel):
    """What both endpoints share: model, length, sampling, stop strings, n, streaming."""

    model_config = ConfigDict(extra="allow", strict=True)  # extras: check_supported, one message each

    NEUTRAL: ClassVar[dict[str, tuple]] = COMMON_NEUTRAL
    PROMPT_PARAM: ClassVar[str] = "prompt"

    model: str | None = None  # None: the served model
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=1)  # not OpenAI's, but vLLM's and llama.cpp's
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the caller's records; it does not change the output

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v):
        try:
            check_stop_strings(tuple([v] if isinstance(v, str) else v or []))
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return v

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def check_supported(self):
        reject_unsupported(self.model_extra or {}, self.NEUTRAL)
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed with stream: true", "stream_options", "invalid_value")

    def requested_max_tokens(self) -> tuple[str, int | None]:
        return "max_tokens", self.max_tokens

    def generation_args(self, defaults: GenerationArgs, prompt_tokens: int, context: int) -> GenerationArgs:
        """This request's settings over the server's defaults; refuses what cannot fit in the context."""
        room = context - prompt_tokens
        if room < 1:
            raise bad_request(f"the prompt is {prompt_tokens} tokens but the context holds {context} with at "
                              f"least one left for the reply; shorten the prompt", self.PROMPT_PARAM,
                              "context_length_exceeded")
        name, asked = self.requested_max_tokens()
        if asked is not None and asked > room:
            raise bad_request(f"{name} ({asked}) plus the prompt ({prompt_tokens} tokens) exceeds the context "
                              f"({context} tokens); ask for {room} or fewer", name, "context_length_exceeded")
        given = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed}
        return replace(defaults, max_new_tokens=asked or min(defaults.max_new_tokens, room), num_samples=self.n,
                       stop=self.stops, **{k: v for k, v in given.items() if v is not None})


class ChatMessage(BaseModel):
    """One message of the conversation; text only."""

    model_config = ConfigDict(extra="allow", strict=True)

    # What clients echo back with an assistant message; accepted while null or empty.
    NEUTRAL: ClassVar[dict[str, tuple]] = {"name": (), "refusal": (), "tool_calls": ([],), "function_call": (),
                                           "audio": (), "annotations": ([],)}

    role: Literal["system", "developer", "user", "assistant"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v):
        """Content parts [{"type": "text", "text": ...}, ...] -> their text, one part per line."""
        if not isinstance(v, list):
            return v
        texts = []
        for i, part in enumerate(v):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content part {i} is of type {kind!r}; only text parts are supported")
            texts.append(part["text"])
        return "\n".join(texts)

    def as_dict(self) -> dict[str, str]:
        # OpenAI's "developer" role is the newer name of "system".
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    NEUTRAL: ClassVar[dict[str, tuple]] = {
        **COMMON_NEUTRAL,
        "top_logprobs": (0,),
        "response_format": ({"type": "text"},),
        "tools": ([],),
        "tool_choice": ("none",),
        "parallel_tool_calls": (True, False),  # without tools there is nothing to call in parallel
        "functions": ([],),
        "function_call": ("none",),
        "modalities": (["text"],),
    }
    PROMPT_PARAM: ClassVar[str] = "messages"

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def check_supported(self):
        super().check_supported()
        for i, message in enumerate(self.messages):
            reject_unsupported(message.model_extra or {}, ChatMessage.NEUTRAL, f"messages[{i}].")

    def requested_max_tokens(self) -> tuple[str, int | None]:
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens


class CompletionRequest(SamplingRequest):
    """POST /v1/completions: one prompt, as text or token ids."""

    NEUTRAL: ClassVar[dict[str, tuple]] = {**COMMON_NEUTRAL, "echo": (False,), "suffix": ("",), "best_of": (1,),
                                           "logprobs": ()}

    prompt: str | list[int]

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v):
        """OpenAI takes a string, a list of strings, token ids or a list of those; one prompt is served."""
        if isinstance(v, list) and v and all(isinstance(p, (str, list)) for p in v):
            if len(v) > 1:
                raise ValueError(f"one prompt per request is supported (got {len(v)}); send one request each")
            v = v[0]
        if not isinstance(v, (str, list)) or isinstance(v, list) and not all(_is_token_id(t) for t in v):
            raise ValueError("the prompt must be a string or a list of token ids (integers)")
        if not v:
            raise ValueError("the prompt is empty")
        return v


def _is_token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
