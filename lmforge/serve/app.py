"""`lmforge serve`: an HTTP service for task models, embeddings and chat (FastAPI).

Routes (all but /, /health and /ready need an API key when keys are configured):

    GET  /                       the playground page (chat and classify; calls the API with a typed key)
    GET  /health                 alive (200 while the process runs)
    GET  /ready                  200 once every model is loaded and warmed, else 503
    GET  /metrics                Prometheus text: requests and latency by route/status, queue
                                 depth and time, batch sizes, tokens in/out, TTFT, time per token
    GET  /v1/models              the models served
    POST /v1/classify            {"model", "input": text | [texts]}   (also relation, pair-score)
    POST /v1/ner                 {"model", "input": text | [texts]}
    POST /v1/qa                  {"model", "input": {"question", "context"} | [...]}
    POST /v1/embeddings          OpenAI shape: {"model", "input": text | [texts]}
    POST /v1/chat/completions    OpenAI shape, with "stream": true for server-sent events
    POST /v1/completions         OpenAI shape
    (apps)                       ``extensions`` add their routes and pages (e.g. the support
                                 assistant's /v1/apps/support/* and /apps/support)

Encoder requests are batched dynamically (``DynamicBatcher``); generation runs one request at a
time per model (``Generator``). Errors are JSON ``{"error": {"message", "type", "code"}}``
and never carry a traceback: 400 bad input (token counts and limits named), 401 missing or
wrong key, 404 unknown model, 413 body too large, 429 queue full (Retry-After), 504 timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from lmforge.errors import LmforgeError
from lmforge.generation import GenerationConfig
from lmforge.serve.auth import ApiKeys, presented_key
from lmforge.serve.batching import DynamicBatcher, Overloaded
from lmforge.serve.compute import compute
from lmforge.serve.engine import Delta, Timings
from lmforge.serve.metrics import ServerMetrics
from lmforge.serve.models import Served, load_served, warm

access_log = logging.getLogger("lmforge.access")
log = logging.getLogger("lmforge.serve")
MIN_TEMPERATURE = 1e-3  # temperatures below this decode greedily (OpenAI's 0 means greedy)
OPEN_PATHS = ("/health", "/ready", "/")  # "/" is the static playground page: no data in it


@dataclass
class ServeSettings:
    max_body_bytes: int = 1_000_000
    request_timeout_s: float = 60.0
    max_queue: int = 256  # encoder inputs waiting, per model
    max_generation_queue: int = 16  # generation requests running or waiting, per model
    max_batch: int = 32
    max_batch_tokens: int = 16384
    batch_wait_ms: float = 5.0
    default_max_tokens: int = 256


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


def error_response(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status,
                        headers=headers)


# ----------------------------------------------------------------------------- request bodies
class InputRequest(BaseModel):
    model: str | None = None
    input: str | list[str]


class QaPair(BaseModel):
    question: str
    context: str


class QaRequest(BaseModel):
    model: str | None = None
    input: QaPair | list[QaPair]


class Message(BaseModel):
    role: str
    content: str


class _Sampling(BaseModel):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str


# ----------------------------------------------------------------------------- the app
class Extension(Protocol):
    """An application served beside the models: loaded at start-up (before /ready says 200),
    then its routes are added; its ``pages`` are open like the playground (no data in them)."""

    name: str
    pages: tuple[str, ...]

    def load(self) -> None: ...

    def mount(self, app: FastAPI, server: Server) -> None: ...


class Server:
    """What the routes share: models, batchers, keys, limits, metrics, readiness."""

    def __init__(self, specs: list[str] | list[Served], keys: ApiKeys | None, settings: ServeSettings,
                 adapters: dict[str, str] | None = None, extensions: list[Extension] | None = None) -> None:
        self.specs, self.keys, self.settings = specs, keys, settings
        self.extensions = list(extensions or [])
        self.open_paths = (*OPEN_PATHS, *(page for e in self.extensions for page in e.pages))
        self.adapter_folders = dict(adapters or {})
        self.adapters: dict[str, str] = {}  # adapter name -> the served decoder it runs on
        self.metrics = ServerMetrics()
        self.models: dict[str, Served] = {}
        self.batchers: dict[str, DynamicBatcher] = {}
        self.generating: dict[str, int] = {}
        self.ready = False
        self.accepting = True

    async def start(self) -> None:
        for spec in self.specs:
            served = spec if isinstance(spec, Served) else await compute().run(load_served, spec)
            if served.name in self.models:
                raise LmforgeError(f"two models are named {served.name!r}; name them NAME=PATH")
            await compute().run(warm, served)
            self.models[served.name] = served
            if served.kind in ("task", "embedding"):
                run = served.run_task if served.kind == "task" else served.run_embeddings
                batcher = DynamicBatcher(run, served.name, self.metrics, self.settings.max_batch,
                                         self.settings.max_batch_tokens, self.settings.batch_wait_ms,
                                         self.settings.max_queue)
                batcher.start()
                self.batchers[served.name] = batcher
        if self.adapter_folders:
            decoders = [m for m in self.models.values() if m.kind == "generate"]
            if not decoders:
                raise LmforgeError("--adapters need a decoder to run on; none is served")
            for name, folder in self.adapter_folders.items():
                if name in self.models:
                    raise LmforgeError(f"adapter {name!r} has the name of a served model; rename one")
                await compute().run(decoders[0].generator.add_adapter, name, folder)
                self.adapters[name] = decoders[0].name
        for extension in self.extensions:
            await compute().run(extension.load)
        self.ready = True

    async def stop(self) -> None:
        for batcher in self.batchers.values():
            await batcher.stop()

    def pick_generation(self, name: str | None) -> tuple[Served, str]:
        """The decoder and adapter ("" = none) a chat or completion request names."""
        if name in self.adapters:
            return self.models[self.adapters[name]], name  # type: ignore[index]
        return self.pick(name, "chat"), ""

    def pick(self, name: str | None, route: str) -> Served:
        fitting = [m for m in self.models.values() if m.route == route]
        if name is None:
            if not fitting:
                raise ApiError(404, f"no model here answers /v1/{route}", "not_found_error")
            return fitting[0]
        if name not in self.models:
            raise ApiError(404, f"model {name!r} is not served here (served: {', '.join([*self.models, *self.adapters])})",
                           "not_found_error")
        served = self.models[name]
        if served.route != route:
            raise ApiError(400, f"model {name!r} answers /v1/{served.route}, not /v1/{route}")
        return served

    def check_tokens(self, served: Served, texts: list[str]) -> int:
        total = 0
        for index, text in enumerate(texts):
            count = served.count_tokens(text)
            if count > served.max_tokens:
                raise ApiError(400, f"input {index} has {count} tokens; the limit of model {served.name!r} is "
                                    f"{served.max_tokens}")
            total += count
        return total

    async def offload(self, function: Any, *args: Any) -> Any:
        """``function(*args)`` on the compute thread, answered 504 past the request timeout
        (the applications' blocking calls)."""
        try:
            return await asyncio.wait_for(compute().run(function, *args), self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, f"the request took longer than {self.settings.request_timeout_s:g} s",
                           "timeout_error") from None

    async def batched(self, served: Served, items: list[Any], tokens: int) -> list[Any]:
        self.metrics.tokens_in.labels(served.name).inc(tokens)
        try:
            return await asyncio.wait_for(self.batchers[served.name].submit(items, tokens),
                                          self.settings.request_timeout_s)
        except Overloaded as error:
            raise ApiError(429, str(error), "rate_limit_error", {"Retry-After": str(error.retry_after)}) from None
        except asyncio.TimeoutError:
            raise ApiError(504, f"the request took longer than {self.settings.request_timeout_s:g} s",
                           "timeout_error") from None


def create_app(models: list[str] | list[Served], api_keys: ApiKeys | None = None,
               settings: ServeSettings | None = None, adapters: dict[str, str] | None = None,
               extensions: list[Extension] | None = None) -> FastAPI:
    """The app serving ``models`` (``NAME=PATH`` or paths); ``adapters`` (name -> adapter
    folder) run on the served decoder and are chosen by the request's ``model``;
    ``extensions`` are applications with their own routes, behind the same keys and limits."""
    server = Server(models, api_keys, settings or ServeSettings(), adapters, extensions)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await server.start()
        yield
        await server.stop()

    app = FastAPI(title="lmforge", lifespan=lifespan)
    app.state.server = server

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        started = time.perf_counter()
        route = request.url.path
        key_name = None
        response: Response
        try:
            if route not in server.open_paths and server.keys is not None:
                key_name = server.keys.check(presented_key(request.headers.get("authorization"),
                                                           request.headers.get("x-api-key")))
                if key_name is None:
                    raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY or X-Api-Key: KEY)",
                                   "authentication_error")
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > server.settings.max_body_bytes:
                raise ApiError(413, f"the body has {int(length):,} bytes; the limit is "
                                    f"{server.settings.max_body_bytes:,}", "request_too_large")
            if not server.accepting and route not in server.open_paths:
                raise ApiError(503, "the server is shutting down", "unavailable", {"Retry-After": "1"})
            response = await call_next(request)
        except ApiError as error:
            response = error_response(error.status, error.message, error.kind, error.headers)
        except Exception:  # noqa: BLE001 - logged here; the client gets no traceback
            log.exception("unhandled error on %s", route)
            response = error_response(500, "internal error (logged on the server)", "server_error")
        elapsed = time.perf_counter() - started
        status = str(response.status_code)
        if route.startswith("/v1/") or route in ("/metrics",):
            server.metrics.requests.labels(route, status).inc()
            server.metrics.latency.labels(route, status).observe(elapsed)
        access_log.info(json.dumps({"time": round(time.time(), 3), "method": request.method, "path": route,
                                    "status": response.status_code, "ms": round(elapsed * 1000, 2),
                                    "key": key_name, "client": request.client.host if request.client else None}))
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.message, error.kind, error.headers)

    @app.exception_handler(LmforgeError)
    async def user_error(request: Request, error: LmforgeError) -> JSONResponse:
        return error_response(400, str(error), "invalid_request_error")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in error.errors())
        return error_response(400, f"invalid request: {problems}", "invalid_request_error")

    @app.get("/", include_in_schema=False)
    async def playground() -> HTMLResponse:
        from lmforge.serve.playground import PAGE

        return HTMLResponse(PAGE)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        body = {"ready": server.ready, "models": list(server.models), "apps": [e.name for e in server.extensions]}
        return JSONResponse(body, status_code=200 if server.ready and server.accepting else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        data = [{"id": name, "object": "model", "owned_by": "lmforge", "kind": m.kind, "route": f"/v1/{m.route}"}
                for name, m in server.models.items()]
        data += [{"id": name, "object": "model", "owned_by": "lmforge", "kind": "adapter", "route": "/v1/chat",
                  "parent": base} for name, base in server.adapters.items()]
        return {"object": "list", "data": data}

    def texts_of(value: str | list[str]) -> list[str]:
        texts = [value] if isinstance(value, str) else list(value)
        if not texts:
            raise ApiError(400, "input is empty: give a text or a list of texts")
        return texts

    async def task_route(body: InputRequest, route: str) -> dict[str, Any]:
        served = server.pick(body.model, route)
        texts = texts_of(body.input)
        tokens = server.check_tokens(served, texts)
        records = [{"text": t} for t in texts]
        predictions = await server.batched(served, records, tokens)
        return {"object": "list", "model": served.name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "data": [{"index": i, **p} for i, p in enumerate(predictions)]}

    @app.post("/v1/classify")
    async def classify(body: InputRequest) -> dict[str, Any]:
        return await task_route(body, "classify")

    @app.post("/v1/ner")
    async def ner(body: InputRequest) -> dict[str, Any]:
        return await task_route(body, "ner")

    @app.post("/v1/qa")
    async def qa(body: QaRequest) -> dict[str, Any]:
        served = server.pick(body.model, "qa")
        pairs = [body.input] if isinstance(body.input, QaPair) else list(body.input)
        if not pairs:
            raise ApiError(400, "input is empty")
        tokens = server.check_tokens(served, [p.question for p in pairs])
        records = [{"id": str(i), "question": p.question, "context": p.context} for i, p in enumerate(pairs)]
        tokens += sum(served.count_tokens(p.context) for p in pairs)  # long contexts are windowed
        predictions = await server.batched(served, records, tokens)
        return {"object": "list", "model": served.name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "data": [{"index": i, **p} for i, p in enumerate(predictions)]}

    @app.post("/v1/embeddings")
    async def embeddings(body: InputRequest) -> dict[str, Any]:
        served = server.pick(body.model, "embeddings")
        texts = texts_of(body.input)
        tokens = server.check_tokens(served, texts)
        vectors = await server.batched(served, texts, tokens)
        return {"object": "list", "model": served.name,
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def generation(request: Request, body: _Sampling, messages: list[dict[str, str]] | None,
                         prompt: str | None) -> Response:
        served, adapter = server.pick_generation(body.model)
        generator = served.generator
        ids = generator.prompt_ids(prompt, messages)
        max_tokens = body.max_tokens or min(server.settings.default_max_tokens, served.max_tokens - len(ids))
        if max_tokens < 1 or len(ids) + max_tokens > served.max_tokens:
            raise ApiError(400, f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens}; together they "
                                f"may not exceed the {served.max_tokens} positions of model {served.name!r}")
        waiting = server.generating.get(served.name, 0)
        if waiting >= server.settings.max_generation_queue:
            raise ApiError(429, "the server is at capacity; retry later", "rate_limit_error", {"Retry-After": "1"})
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        sample = body.temperature >= MIN_TEMPERATURE  # below it, sampling is argmax with overflow risks
        config = GenerationConfig(max_new_tokens=max_tokens, do_sample=sample,
                                  temperature=body.temperature if sample else 1.0, top_p=body.top_p,
                                  stop_strings=[s for s in stop if s], seed=body.seed)
        server.metrics.tokens_in.labels(served.name).inc(len(ids))
        chat = messages is not None
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        cancel = threading.Event()
        timings = Timings()
        queue: asyncio.Queue[Delta | BaseException | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        server.generating[served.name] = waiting + 1

        def produce() -> None:
            try:
                for delta in generator.stream(ids, config, cancel, timings, adapter):
                    loop.call_soon_threadsafe(queue.put_nowait, delta)
            except BaseException as error:  # noqa: BLE001 - handed to the request
                loop.call_soon_threadsafe(queue.put_nowait, error)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        worker = loop.run_in_executor(None, produce)
        deadline = time.perf_counter() + server.settings.request_timeout_s

        async def deltas() -> AsyncIterator[Delta]:
            try:
                while True:
                    remaining = deadline - time.perf_counter()
                    try:
                        item = await asyncio.wait_for(queue.get(), max(remaining, 0.001))
                    except asyncio.TimeoutError:
                        cancel.set()
                        raise ApiError(504, f"the request took longer than {server.settings.request_timeout_s:g} s",
                                       "timeout_error") from None
                    if item is None:
                        return
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                cancel.set()  # a client that went away, or a timeout: stop generating
                await asyncio.shield(worker)
                server.generating[served.name] -= 1
                server.metrics.tokens_out.labels(served.name).inc(timings.completion_tokens)
                server.metrics.tokens_cached.labels(served.name).inc(timings.cached_tokens)
                if timings.first_token_s is not None:
                    server.metrics.time_to_first_token.labels(served.name).observe(timings.first_token_s)
                    if timings.completion_tokens > 1:
                        rest = time.perf_counter() - timings.started - timings.first_token_s
                        server.metrics.time_per_output_token.labels(served.name).observe(
                            rest / (timings.completion_tokens - 1))

        def usage() -> dict[str, int]:
            return {"prompt_tokens": timings.prompt_tokens, "completion_tokens": timings.completion_tokens,
                    "total_tokens": timings.prompt_tokens + timings.completion_tokens,
                    "prompt_tokens_details": {"cached_tokens": timings.cached_tokens}}

        def finish_reason(reason: str | None) -> str | None:
            return "stop" if reason == "cancelled" else reason

        if not body.stream:
            text, reason = [], None
            async for delta in deltas():
                text.append(delta.text)
                reason = delta.finish_reason or reason
            if reason == "error":
                raise ApiError(500, "generation failed (logged on the server)", "server_error")
            content = "".join(text)
            choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": content},
                                       "finish_reason": finish_reason(reason)} if chat else
                                      {"index": 0, "text": content, "finish_reason": finish_reason(reason)})
            return JSONResponse({"id": ident, "object": "chat.completion" if chat else "text_completion",
                                 "created": created, "model": body.model or served.name, "choices": [choice],
                                 "usage": usage()})

        async def events() -> AsyncIterator[str]:
            kind = "chat.completion.chunk" if chat else "text_completion"
            if chat:
                first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                yield _event({"id": ident, "object": kind, "created": created, "model": served.name,
                              "choices": [first]})
            try:
                async for delta in deltas():
                    if await request.is_disconnected():
                        cancel.set()
                        return
                    reason = finish_reason(delta.finish_reason)
                    piece = ({"index": 0, "delta": {"content": delta.text} if delta.text else {},
                              "finish_reason": reason} if chat else
                             {"index": 0, "text": delta.text, "finish_reason": reason})
                    yield _event({"id": ident, "object": kind, "created": created, "model": served.name,
                                  "choices": [piece]})
            except ApiError as error:
                yield _event({"error": {"message": error.message, "type": error.kind, "code": error.status}})
            except Exception:  # noqa: BLE001 - the stream ends with an error event, no traceback
                log.exception("generation failed")
                yield _event({"error": {"message": "internal error (logged on the server)", "type": "server_error",
                                        "code": 500}})
            yield _event({"id": ident, "object": kind, "created": created, "model": served.name, "choices": [],
                          "usage": usage()})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest) -> Response:
        return await generation(request, body, [m.model_dump() for m in body.messages], None)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest) -> Response:
        return await generation(request, body, None, body.prompt)

    for extension in server.extensions:
        extension.mount(app, server)
    return app


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"
