"""The FastAPI app of `tide serve`: OpenAI's routes over one engine.

    GET  /v1/models, /v1/models/{id}   the one model served
    POST /v1/chat/completions          messages through the model's chat template
    POST /v1/completions               a prompt as it is (text or token ids)
    GET  /health                       200 {"status": "ok"} while serving
    GET  /metrics                      Prometheus text

A request is checked and turned into a Job in a worker thread of the event loop (jobs.py:
templates and tokenizing are CPU work), queued on the scheduler (429 when full), and answered
from the job's events, whole or as Server-Sent Events (responses.py). With an API key, every
route but /health wants ``Authorization: Bearer KEY``."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from . import errors
from .errors import APIError
from .jobs import chat_job, completion_job, prompt_text
from .metrics import Metrics
from .middleware import BodyLimit, RequestCounter
from .responses import ChatFormat, CompletionFormat, answer, events, whole
from .scheduler import Job, QueueFull, Scheduler, ShuttingDown
from .schemas import ChatRequest, CompletionRequest, Sampling

MAX_BODY_BYTES = 4 << 20
STOP_SECONDS = 10  # the most the app's shutdown waits for the running decode's step to end
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


def endpoint_of(path: str) -> str:
    """The /metrics label of a request path (unknown paths share one, so labels stay few)."""
    if path.startswith("/v1/models/"):
        return "/v1/models"
    return path if path in ENDPOINTS else "other"


def _key_check(api_key: str):
    """The dependency that wants ``Authorization: Bearer <api_key>``."""
    expected = api_key.encode()

    async def check(authorization: str | None = Header(None)) -> None:
        if authorization is None:
            raise APIError(401, "no API key: send the header 'Authorization: Bearer KEY'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        scheme, _, given = authorization.partition(" ")
        # headers arrive decoded as latin-1: encoding back gives the bytes sent
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("latin-1"), expected):
            raise APIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return check


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Cancel `job` when its client disconnects. The body has been read, so the next message
    is the disconnect (for a stream, Starlette's own listener receives it too: both wake)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel("disconnect")


def create_app(engine, *, model_name: str, defaults: dict | None = None, api_key: str | None = None,
               max_queue: int = 16, max_batch: int | None = None, max_body: int = MAX_BODY_BYTES) -> FastAPI:
    """The app serving `engine` as `model_name`. defaults: decoding options for requests that do
    not set them (the command line's; None values: the model's). max_batch: requests decoded
    together (default: the engine's max_batch, what it was loaded for). The scheduler's worker starts
    and stops with the app's lifespan; ``app.state.scheduler`` and ``app.state.metrics`` are
    there for the server and tests."""
    metrics = Metrics()
    scheduler = Scheduler(engine, max_queue=max_queue, max_batch=max_batch or engine.max_batch,
                          on_result=metrics.generation, on_step=metrics.step)
    defaults = {name: value for name, value in (defaults or {}).items() if value is not None}
    card = {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "tide-local"}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            scheduler.close()
            await asyncio.to_thread(scheduler.join, STOP_SECONDS)  # a running decode ends at its next step

    app = FastAPI(title="tide serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.metrics = scheduler, metrics
    errors.install(app)
    app.add_middleware(BodyLimit, max_bytes=max_body)
    app.add_middleware(RequestCounter, metrics=metrics, endpoint_of=endpoint_of)  # outermost: sees the 413s too
    auth = [Depends(_key_check(api_key))] if api_key else []

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"the model '{name}' does not exist: this server serves '{model_name}'",
                           param="model", code="model_not_found")

    async def respond(request: Request, body: Sampling, job: Job,
                      fmt: ChatFormat | CompletionFormat) -> JSONResponse | StreamingResponse:
        """Queue `job`, then answer from its events; the job lives as long as its client."""
        try:
            scheduler.submit(job)
        except QueueFull as err:
            raise APIError(429, f"the server is busy: {err}; retry later", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except ShuttingDown:
            raise errors.shutting_down() from None
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        parts = answer(job, engine.tokenizer, body.stop_strings())
        if not body.stream:
            try:
                return JSONResponse(fmt.response(await whole(parts)))
            finally:
                watcher.cancel()
                job.cancel("disconnect")  # a no-op once it finished; ends it if this handler was cancelled

        async def stream() -> AsyncIterator[str]:
            try:
                async for event in events(fmt, parts):
                    yield event
            finally:  # the end, or the client gone (the stream is cancelled or its send fails)
                watcher.cancel()
                job.cancel("disconnect")

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/health")
    async def health() -> JSONResponse:
        if scheduler.closed:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", dependencies=auth)
    async def metrics_text() -> PlainTextResponse:
        text = metrics.render(waiting=scheduler.waiting, running=scheduler.running,
                              device=engine.offload is not None)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def model(model_id: str) -> dict:
        check_model(model_id)
        return card

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body.model)
        job = await run_in_threadpool(chat_job, engine, body, defaults, asyncio.get_running_loop())
        return await respond(request, body, job, ChatFormat(model_name, body.include_usage()))

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        job = await run_in_threadpool(completion_job, engine, body, defaults, asyncio.get_running_loop())
        echo = prompt_text(engine, body) if body.echo else ""
        return await respond(request, body, job, CompletionFormat(model_name, body.include_usage(), echo))

    return app
