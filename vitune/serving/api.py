"""The HTTP API (FastAPI): OpenAI's chat completions and embeddings, around the batching engine.

    POST /v1/chat/completions   JSON, or server-sent events with `stream: true` (ending `data: [DONE]`)
    GET  /v1/models             the one served model
    POST /v1/embeddings         text (and images: an `image_url` part as an input, a vitune extension)
                                through the retrieval head; 400 where the model has none
    GET  /health                200 {"status": "ok"}; 503 while draining or if the engine stopped
    GET  /metrics               Prometheus text (metrics.py)
    GET  /                      the web page (page.py): public; it asks for the API key itself

With an API key (`ServeSettings.api_key`), /v1/* and /metrics need `Authorization: Bearer KEY`
(401 otherwise); /health never does. Every error is an OpenAI-style body with a 4xx status
(5xx only for the server's own failures, and never a traceback). Bodies are parsed by hand
(schema.py), so messages name the JSON path of the field at fault. Image decoding and prompt
rendering run in worker threads, the model in the engine thread: the event loop never computes.
"""

from __future__ import annotations

import asyncio
import hmac
import sys
import time
import traceback
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from vitune.inference.assistant import Assistant
from vitune.serving import embeddings as emb
from vitune.serving.bridge import ClientGone, DisconnectWatch, EventQueue, next_event
from vitune.serving.engine import Delta, Engine, EngineStats, Finished, Handle, Started
from vitune.serving.errors import ApiError, bad_request, not_found, unauthorized, unavailable
from vitune.serving.guard import Gate, Lifecycle
from vitune.serving.images import load_image_url
from vitune.serving.jobs import build_job
from vitune.serving.metrics import Metrics, Observe
from vitune.serving.page import page
from vitune.serving.responses import DONE, Completion, Usage, embedding_list, error_event, model_list
from vitune.serving.schema import ChatRequest, ImagePart, parse_chat, parse_embeddings, parse_json
from vitune.serving.settings import ServeSettings


@dataclass
class ServerState:
    assistant: Assistant
    settings: ServeSettings
    model_name: str
    engine: Engine
    metrics: Metrics = field(default_factory=Metrics)
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(assistant: Assistant, settings: ServeSettings, model_name: str = "vitune") -> FastAPI:
    """The app; its engine thread starts and stops with the app's lifespan. `app.state.server`
    is the `ServerState` (the runner reads its lifecycle to drain)."""
    stats = EngineStats()
    state = ServerState(assistant, settings, settings.model_name or model_name, Engine(assistant, settings.max_batch,
                                                                                      stats))
    state.metrics.watch(stats)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        state.engine.start()
        yield
        await run_in_threadpool(state.engine.stop)

    app = FastAPI(title="vitune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    _routes(app, state)
    _error_handlers(app)
    app.add_middleware(Gate, lifecycle=state.lifecycle, max_body_bytes=settings.max_body_bytes,
                       read_timeout_s=settings.read_timeout_s)
    app.add_middleware(Observe, metrics=state.metrics)  # outermost: the gate's refusals are counted too
    return app


def _routes(app: FastAPI, state: ServerState) -> None:
    def auth(request: Request) -> None:
        key = state.settings.api_key
        if not key:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise unauthorized()

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat_completions(request: Request) -> Response:
        return await _chat(state, request)

    @app.post("/v1/embeddings", dependencies=[Depends(auth)])
    async def embeddings(request: Request) -> Response:
        return await _embeddings(state, request)

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models() -> dict:
        return model_list(state.model_name, state.created)

    @app.get("/v1/models/{model_id}", dependencies=[Depends(auth)])
    async def model(model_id: str) -> dict:
        _check_model(state, model_id)
        return model_list(state.model_name, state.created)["data"][0]

    @app.get("/health")
    async def health() -> Response:
        ok = state.engine.alive and not state.lifecycle.draining
        status = "ok" if ok else "draining" if state.lifecycle.draining else "engine stopped"
        return JSONResponse({"status": status, "model": state.model_name, "running": state.engine.stats.running,
                             "waiting": state.engine.stats.waiting}, 200 if ok else 503)

    @app.get("/metrics", dependencies=[Depends(auth)])
    async def metrics() -> Response:
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/")
    async def index() -> Response:
        body, headers = page()
        return Response(body, media_type="text/html; charset=utf-8", headers=headers)


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, e: ApiError) -> Response:
        return JSONResponse(e.body(), e.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, e: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(ApiError(e.status_code, str(e.detail), None, code).body(), e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal(_request: Request, e: Exception) -> Response:
        traceback.print_exception(e, file=sys.stderr)
        err = ApiError(500, f"internal server error ({type(e).__name__}); the server logged it", None,
                       "internal_error", "server_error")
        return JSONResponse(err.body(), 500)


def _check_model(state: ServerState, model: str) -> None:
    if model != state.model_name:
        raise not_found(f"model {model!r} is not served here; this server serves {state.model_name!r} "
                        "(GET /v1/models)", "model", "model_not_found")


async def _prepare(state: ServerState, request: Request) -> tuple[ChatRequest, object]:
    req = parse_chat(parse_json(await request.body()))
    _check_model(state, req.model)
    images = req.images
    if len(images) > state.settings.max_images:
        raise bad_request("messages", f"{len(images)} images, over this server's limit of "
                                      f"{state.settings.max_images} per request", "too_many_images")
    return req, await run_in_threadpool(_make_job, state, req, images)


def _make_job(state: ServerState, req: ChatRequest, images: list[ImagePart]):
    decoded = [load_image_url(p.url, p.param, state.settings) for p in images]
    return build_job(state.assistant, req, decoded, state.settings.default_max_tokens)


async def _chat(state: ServerState, request: Request) -> Response:
    t0 = time.monotonic()
    req, job = await _prepare(state, request)
    if state.engine.stats.waiting >= state.settings.max_queue:
        raise unavailable(f"the server is overloaded ({state.engine.stats.waiting} requests waiting); retry later")
    events = EventQueue(asyncio.get_running_loop())
    try:
        handle = state.engine.submit(job, events.emit)
    except RuntimeError:
        raise unavailable("the server is shutting down") from None
    watch = DisconnectWatch(request.receive)
    try:
        first = await next_event(events, watch, handle)
        if isinstance(first, Finished):
            raise _failed(first)
        state.metrics.ttft.observe(time.monotonic() - t0)
        if req.stream:
            watch.close()
            return StreamingResponse(_sse(state, req, events, handle), media_type="text/event-stream",
                                     headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        finished = await _last_event(events, watch, handle)
    except ClientGone:
        return Response(status_code=499)
    finally:
        watch.close()
    if finished.reason not in ("stop", "length"):
        raise _failed(finished)
    _count_tokens(state, finished)
    usage = Usage(finished.prompt_tokens, finished.completion_tokens)
    return JSONResponse(Completion.new(state.model_name).full(finished.text, finished.reason, usage))


async def _last_event(events: EventQueue, watch: DisconnectWatch, handle: Handle) -> Finished:
    while not isinstance(event := await next_event(events, watch, handle), Finished):
        pass
    return event


def _failed(finished: Finished) -> ApiError:
    if finished.reason == "cancelled":
        return unavailable("the request was cancelled: the server is shutting down")
    return ApiError(500, f"generation failed: {finished.error}", None, "generation_failed", "server_error")


def _count_tokens(state: ServerState, finished: Finished) -> None:
    state.metrics.prompt_tokens.inc(finished.prompt_tokens)
    state.metrics.completion_tokens.inc(finished.completion_tokens)


async def _sse(state: ServerState, req: ChatRequest, events: EventQueue, handle: Handle):
    """The stream after the first token: role, content deltas, the finish chunk, usage, [DONE]."""
    c = Completion.new(state.model_name)
    usage_on = req.include_usage
    try:
        yield c.chunk({"role": "assistant", "content": ""}, with_usage=usage_on)
        while True:
            event = await events.get()
            if isinstance(event, Delta):  # with the deltas queued behind it: one chunk
                yield c.chunk({"content": event.text + events.more_text()}, with_usage=usage_on)
            elif isinstance(event, Finished):
                break
            elif not isinstance(event, Started):
                raise TypeError(f"unexpected engine event {event!r}")
        if event.reason not in ("stop", "length"):
            yield error_event(_failed(event).body())
            return
        _count_tokens(state, event)
        yield c.chunk({}, event.reason, with_usage=usage_on)
        if usage_on:
            yield c.usage_chunk(Usage(event.prompt_tokens, event.completion_tokens))
        yield DONE
    finally:
        handle.cancel()  # a no-op once finished; frees the slot of a client that went away


async def _embeddings(state: ServerState, request: Request) -> Response:
    req = parse_embeddings(parse_json(await request.body()), state.settings.max_embedding_inputs)
    _check_model(state, req.model)
    if not emb.has_retrieval_head(state.assistant):
        raise bad_request("model", f"{state.model_name} has no retrieval head (model.contrastive.dim is 0), so it "
                                   "makes no embeddings", "embeddings_unsupported")
    n_images = sum(isinstance(x, ImagePart) for x in req.inputs)
    if n_images > state.settings.max_images:
        raise bad_request("input", f"{n_images} images, over this server's limit of {state.settings.max_images} "
                                   "per request", "too_many_images")

    def compute():
        items = [x.text if not isinstance(x, ImagePart) else load_image_url(x.url, x.param, state.settings)
                 for x in req.inputs]
        return emb.embed(state.assistant, items)
    vectors, n_tokens = await run_in_threadpool(compute)
    state.metrics.prompt_tokens.inc(n_tokens)
    return JSONResponse(embedding_list(state.model_name, [emb.encode_vector(v, req.encoding_format)
                                                          for v in vectors], n_tokens))

