"""The HTTP application: OpenAI's /v1 endpoints and the chat page, in front of an ``Engine``.

Requests are checked, tokenized and fitted to the context here, on the event loop; only valid
turns reach the engine's queue, so the worker (and, distributed, every rank) never sees a request
that could fail halfway.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse, StreamingResponse

from torchchat.catalog import canonical_name
from torchchat.generate.base import GenerationArgs, Turn
from torchchat.model import ConfigError
from torchchat.server.engine import Engine, QueuedRequest
from torchchat.server.errors import ApiError, bad_request, install_error_handlers
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
    max_queue: int = 64  # requests waiting beyond this are answered 503
    shutdown_timeout: float = 10.0  # seconds in-flight requests get to finish after SIGINT/SIGTERM

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port ({self.port}) must be in [0, 65535]")
        if self.max_queue < 1:
            raise ConfigError(f"--max-queue ({self.max_queue}) must be at least 1")
        if self.shutdown_timeout < 0:
            raise ConfigError(f"--shutdown-timeout ({self.shutdown_timeout}) must be >= 0")


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
        return {"status": "ok", "model": self.config.model_id, "queued": self.engine.queued}

    async def models(self) -> dict:
        return {"object": "list", "data": [self._card()]}

    async def model(self, model_id: str) -> dict:
        self._check_model(model_id)
        return self._card()

    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        self._check(body)
        messages = [m.as_dict() for m in body.messages]
        try:
            tokens = self.generator.chat_format.encode_dialog(messages)
        except ConfigError as e:
            raise bad_request(str(e), "messages") from e
        return await self._answer(ChatShape(self.config.model_id), body, tokens, request)

    async def completions(self, body: CompletionRequest, request: Request):
        self._check(body)
        return await self._answer(TextShape(self.config.model_id), body, self._prompt_tokens(body.prompt), request)

    # ----- shared steps -----

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
        if isinstance(prompt, str):
            try:
                return self.generator.encode_prompt(prompt)
            except ConfigError as e:
                raise bad_request(str(e), "prompt") from e
        vocab = self.generator.model_args.vocab_size
        if bad := [t for t in prompt if not 0 <= t < vocab]:
            raise bad_request(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
        return prompt

    async def _answer(self, shape: Shape, body: SamplingRequest, tokens: list[int], request: Request):
        args = body.generation_args(self.config.defaults, len(tokens), self.generator.max_seq_len)
        queued = self.engine.submit(Turn(tokens, args))
        if body.stream:
            events = stream_events(shape, queued, len(tokens), body.include_usage)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        completions = await _result_unless_gone(queued, request)
        if completions is None:
            return Response(status_code=499)  # nobody is listening; the status is only for the access log
        return shape.response(completions, len(tokens))


async def _result_unless_gone(queued: QueuedRequest, request: Request):
    """The completions, or None when the client hung up first (the worker then stops between tokens)."""
    task = asyncio.ensure_future(queued.result())
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
            queued.cancel()
            task.cancel()
