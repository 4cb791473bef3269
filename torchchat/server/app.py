"""The HTTP application: OpenAI's /v1 endpoints and the chat page, in front of an ``Engine``.

Requests are read (at most ``max_body_bytes``), parsed, checked, tokenized and fitted to the
context here (and ``n`` to the batch); only valid turns reach the engine, so the worker (and, distributed,
every rank) never sees a request that could fail halfway. Parsing and tokenizing run on a thread, not
on the event loop, so that a large body does not stall the streams of other clients.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import ValidationError

from torchchat.catalog import canonical_name
from torchchat.generate.base import GenerationArgs, Turn
from torchchat.errors import ConfigError
from torchchat.server.connections import default_allowed_hosts
from torchchat.server.engine import Engine, EngineRequest
from torchchat.server.errors import ApiError, bad_request, install_error_handlers, validation_error
from torchchat.server.responses import ChatShape, Shape, TextShape, api_error, stream_events
from torchchat.server.schemas import ChatCompletionRequest, CompletionRequest, SamplingRequest

CHAT_PAGE = Path(__file__).parent / "static" / "index.html"
DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is still there


@dataclass
class ServerConfig:
    """How to serve: the model's name, the defaults of requests, where to listen, limits."""

    model_id: str  # the name clients pass as "model" (its aliases are accepted too)
    defaults: GenerationArgs = field(default_factory=GenerationArgs)  # for what a request leaves out
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port
    max_queue: int = 64  # requests waiting for a free slot beyond this are answered 503
    shutdown_timeout: float = 10.0  # seconds in-flight requests get to finish after SIGINT/SIGTERM
    max_body_bytes: int = 8 * 2**20  # larger request bodies are answered 413 unread
    max_connections: int = 256  # open connections beyond this are closed at once
    allowed_hosts: tuple[str, ...] | None = None  # Host names served; None: loopback names when bound
    # to loopback, else any; ("*",): any (see connections.py)

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port ({self.port}) must be in [0, 65535]")
        if self.max_queue < 1:
            raise ConfigError(f"--max-queue ({self.max_queue}) must be at least 1")
        if not 0 <= self.shutdown_timeout < float("inf"):
            raise ConfigError(f"--shutdown-timeout ({self.shutdown_timeout}) must be a finite number >= 0")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"--max-body-size ({self.max_body_bytes} bytes) must be at least 1 KiB")
        if self.max_connections < 1:
            raise ConfigError(f"--max-connections ({self.max_connections}) must be at least 1")
        if self.allowed_hosts is None:
            self.allowed_hosts = default_allowed_hosts(self.host)
        elif "*" in self.allowed_hosts:
            self.allowed_hosts = ()


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    """The application; its lifespan starts the engine's worker and stops it at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)  # off the loop: the worker may be finishing a token

    app = FastAPI(title="torchchat", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    routes = _Routes(engine, config)
    app.get("/", response_class=HTMLResponse)(routes.chat_page)
    app.get("/health")(routes.health)
    app.get("/v1/models")(routes.models)
    app.get("/v1/models/{model_id:path}")(routes.model)
    app.post("/v1/chat/completions")(routes.chat_completions)
    app.post("/v1/completions")(routes.completions)
    return app


class _Routes:
    def __init__(self, engine: Engine, config: ServerConfig):
        self.engine = engine
        self.generator = engine.generator
        self.config = config
        self.page = CHAT_PAGE.read_text(encoding="utf-8")

    async def chat_page(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    async def health(self) -> dict:
        return {"status": "ok", "model": self.config.model_id, **self.engine.health()}

    async def models(self) -> dict:
        return {"object": "list", "data": [self._card()]}

    async def model(self, model_id: str) -> dict:
        self._check_model(model_id)
        return self._card()

    async def chat_completions(self, request: Request):
        body, tokens = await self._parse(request, ChatCompletionRequest, self._chat_tokens)
        return await self._answer(ChatShape(self.config.model_id), body, tokens, request)

    async def completions(self, request: Request):
        body, tokens = await self._parse(request, CompletionRequest, lambda b: self._prompt_tokens(b.prompt))
        return await self._answer(TextShape(self.config.model_id), body, tokens, request)

    # ----- shared steps -----

    async def _parse(self, request: Request, model: type[SamplingRequest], tokens_of):
        """The body, read up to the size limit, then parsed, checked and tokenized on a thread."""
        raw = await read_body(request, self.config.max_body_bytes)
        return await asyncio.to_thread(self._validate, raw, model, tokens_of)

    def _validate(self, raw: bytes, model: type[SamplingRequest], tokens_of):
        if not raw.strip():
            raise bad_request("the request body is empty; send a JSON object")
        try:
            body = model.model_validate_json(raw)
        except ValidationError as e:
            raise validation_error(e) from None
        self._check(body)
        return body, tokens_of(body)

    def _chat_tokens(self, body: ChatCompletionRequest) -> list[int]:
        try:
            return self.generator.encode_chat([m.as_dict() for m in body.messages])
        except ConfigError as e:
            raise bad_request(str(e), "messages") from e

    def _card(self) -> dict:
        return {"id": self.config.model_id, "object": "model", "created": 0, "owned_by": "torchchat",
                "context_length": self.generator.max_seq_len}

    def _check(self, body: SamplingRequest):
        body.check_supported()
        if body.model is not None:
            self._check_model(body.model)

    def _check_model(self, name: str):
        try:
            if name == self.config.model_id or canonical_name(name) == self.config.model_id:
                return
        except ConfigError:
            pass  # not a known name either
        raise ApiError(404, f"the model '{name}' does not exist; this server serves '{self.config.model_id}'",
                       param="model", code="model_not_found")

    def _prompt_tokens(self, prompt: str | list[int]) -> list[int]:
        try:
            if isinstance(prompt, str):
                return self.generator.encode_prompt(prompt)
            self.generator.check_tokens(prompt)
            return prompt
        except ConfigError as e:
            raise bad_request(str(e), "prompt") from e

    async def _answer(self, shape: Shape, body: SamplingRequest, tokens: list[int], request: Request):
        try:
            args = body.generation_args(self.config.defaults, len(tokens), self.generator.max_seq_len)
        except ConfigError as e:  # a combination that GenerationArgs refuses
            raise bad_request(str(e)) from e
        if body.n > (rows := self.generator.max_batch):
            raise bad_request(f"n ({body.n}) exceeds the {rows} sequences this server runs at once (--max-batch "
                              f"{rows}); ask for fewer", "n")
        submitted = self.engine.submit(Turn(tokens, args))
        if body.stream:
            events = stream_events(shape, submitted, len(tokens), body.include_usage)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        completions = await _result_unless_gone(submitted, request)
        if completions is None:
            return Response(status_code=499)  # nobody is listening; the status is only for the access log
        return shape.response(completions, len(tokens), submitted.cached_tokens)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 as soon as it is known to exceed ``limit`` bytes (the rest is not read)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"the request body ({size} bytes or more) exceeds the server's limit of {limit} bytes "
                         f"(--max-body-size)", code="request_too_large")


async def _result_unless_gone(submitted: EngineRequest, request: Request):
    """The completions, or None when the client hung up first (its sequences then leave the batch)."""
    task = asyncio.ensure_future(submitted.result())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                try:
                    return task.result()
                except Exception as e:
                    raise api_error(e) from e
            if await request.is_disconnected():
                return None
    finally:
        if not task.done():
            submitted.cancel()
            task.cancel()
