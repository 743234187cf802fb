"""The ASGI application: state, the auth / size-limit / metrics middleware, and the small routes.

Routes: GET /health, GET /metrics, GET /v1/models[/{id}] here; POST /v1/chat/completions in
:mod:`.routes_chat`; POST /v1/embeddings and /v1/classify[...] in :mod:`.routes_dual`.
OpenAPI schema: /openapi.json (docs at /docs).

Order of checks for every request, before any route code or body parsing: the API key (401),
then the body size (413; a chunked body is counted as it arrives).  Both answer in the OpenAI
error format.  /health and the schema/docs pages need no key (liveness probes, discovery).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPBearer

from .config import ServerConfig
from .errors import APIError, error_body, install_handlers
from .images import ImagePolicy
from .metrics import Metrics
from .models import ModelKind, ServedModel
from .schemas import ErrorResponse, ModelCard, ModelList
from .worker import Cancelled, Worker

__all__ = ["AppState", "EventStream", "create_app"]

log = logging.getLogger("edgevlm.server")

OPEN_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
MAX_IMAGES_PER_REQUEST = 32          # bounds work per request beyond what the body limit does
# A refused body up to this size is read and dropped before the 413 is sent (see Gate._drain);
# past it the connection is closed on the client, which may then see a reset instead.
DRAIN_MAX = 256 * 1024 * 1024
ROUTES = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/embeddings", "/v1/classify",
          "/v1/classify/reset", "/v1/classify/state/export", "/v1/classify/state/import")

# Documented error answers (every route may return these; the body is always ErrorResponse).
ERRORS: dict[int | str, dict[str, Any]] = {
    c: {"model": ErrorResponse, "description": d} for c, d in (
        (400, "invalid request (message says what and how to fix it)"), (401, "missing or wrong API key"),
        (403, "image source refused (local path outside --allowed-image-dir, remote URL not enabled)"),
        (404, "unknown model"), (413, "body, image or file over a limit"),
        (503, "queue full or shutting down; see Retry-After"))}


@dataclass
class AppState:
    config: ServerConfig
    models: dict[str, ServedModel]
    worker: Worker
    metrics: Metrics
    images: ImagePolicy
    started: float

    def model(self, name: str, kind: ModelKind | None = None, *, route: str = "") -> ServedModel:
        m = self.models.get(name)
        if m is None:
            raise APIError(404, f"the model {name!r} does not exist on this server; it serves: "
                                f"{', '.join(self.models)} (GET /v1/models)", "model", "model_not_found")
        if kind is not None and m.kind is not kind:
            if m.kind is ModelKind.DUAL:
                what = (f"{name!r} is a {m.runtime.architecture} dual encoder: it has no text decoder, so it "
                        "cannot chat; use /v1/embeddings or /v1/classify with it")
            else:
                what = (f"{name!r} is a generative VLM ({m.runtime.family}): it has no embedding head or "
                        f"zero-shot classifier, so {route} needs a CLIP/SigLIP model"
                        + (f" (this server has: {', '.join(k for k, v in self.models.items() if v.kind is kind)})"
                           if any(v.kind is kind for v in self.models.values()) else ""))
            raise APIError(400, what, "model", "model_not_supported")
        return m


class EventStream:
    """Reads a job's events while watching the client: a disconnect cancels the job.

    Keeps one pending ``queue.get()`` task across waits (cancelling a half-finished get could
    drop an event), and polls ``request.is_disconnected()`` every ``poll_s`` in between.  Only
    for non-streaming responses: a StreamingResponse listens for the disconnect itself."""

    def __init__(self, events: asyncio.Queue, job: Any, request: Request, poll_s: float = 0.2) -> None:
        self.events, self.job, self.request, self.poll_s = events, job, request, poll_s
        self._get: asyncio.Task | None = None

    async def next(self) -> tuple[str, Any]:
        while True:
            if self._get is None:
                self._get = asyncio.ensure_future(self.events.get())
            done, _ = await asyncio.wait({self._get}, timeout=self.poll_s)
            if done:
                item, self._get = self._get.result(), None
                return item
            if await self.request.is_disconnected():
                self.job.cancel.set()
                self.close()
                raise Cancelled()

    async def result(self) -> Any:
        """Wait for ("done", result); raise the job's error; skip streamed pieces."""
        while True:
            kind, value = await self.next()
            if kind == "done":
                return value
            if kind == "error":
                raise value

    def close(self) -> None:
        if self._get is not None:
            self._get.cancel()
            self._get = None


def worker_error(e: BaseException) -> APIError:
    """An exception from a job -> the answer.  The runtime raises ValueError for bad input
    (prompt longer than the context, image count vs placeholders, a bad state file)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, Cancelled):
        return APIError(499, "client closed the request", code="client_closed_request")
    if isinstance(e, LookupError):
        return APIError(404, str(e).strip("'\""), code="not_found")
    if isinstance(e, ValueError):
        return APIError(400, str(e), code="invalid_request")
    log.error("model worker failed: %r", e, exc_info=e)
    return APIError(500, f"internal error in the model worker ({type(e).__name__}: {e})", code="internal_error")


async def run_job(state: AppState, request: Request, route: str, fn) -> Any:
    """Submit ``fn(job)`` to the worker and wait for its result, cancelling it if the client leaves."""
    job, events = state.worker.submit(fn, route)
    stream = EventStream(events, job, request)
    try:
        return await stream.result()
    except asyncio.CancelledError:  # the request task itself was cancelled (shutdown timeout)
        job.cancel.set()
        raise
    except Exception as e:
        job.cancel.set()
        raise worker_error(e) from None
    finally:
        stream.close()


class Gate:
    """Pure ASGI middleware: API key, body-size limit, per-route metrics.  Runs before FastAPI
    reads the body, so an unauthenticated or oversized upload costs nothing."""

    def __init__(self, app: Any, state: AppState) -> None:
        self.app, self.state = app, state
        key = state.config.api_key
        self._want = f"Bearer {key}".encode() if key else None

    @staticmethod
    async def _reply(send, status: int, message: str, code: str, headers: dict | None = None) -> None:
        body = json.dumps(error_body(status, message, None, code)).encode()
        hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": hdrs})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    async def _drain(receive, budget: int = 1 << 62) -> None:
        """Read and drop the rest of a refused body, so that a client which sends all of it before
        reading (most do) gets the 413 instead of a connection reset; memory stays flat."""
        while budget > 0:
            msg = await receive()
            if msg["type"] != "http.request" or not msg.get("more_body"):
                return
            budget -= len(msg.get("body", b""))

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope["path"]
        route = path if path in ROUTES else ("/v1/models" if path.startswith("/v1/models/") else "other")
        status = {"code": 500}

        async def send_(msg) -> None:
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)

        try:
            await self._handle(scope, receive, send_, path)
        finally:
            self.state.metrics.request(route, status["code"], time.perf_counter() - t0)

    async def _handle(self, scope, receive, send, path: str) -> None:
        headers = dict(scope["headers"])
        if self._want is not None and path not in OPEN_PATHS:
            got = headers.get(b"authorization")
            if got is None:
                return await self._reply(send, 401, "missing API key: send the header 'Authorization: Bearer KEY' "
                                                    "(the openai client does this with api_key=KEY)", "missing_api_key")
            if not hmac.compare_digest(got, self._want):
                return await self._reply(send, 401, "incorrect API key provided", "invalid_api_key")
        limit = self.state.config.max_body_bytes
        too_big = (f"the request body is over this server's limit of {limit} bytes (--max-body-bytes); send "
                   "smaller images or fewer of them")
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await self._reply(send, 400, "invalid Content-Length header", "invalid_request")
            if int(length) > limit:
                if int(length) <= DRAIN_MAX:
                    await self._drain(receive)
                return await self._reply(send, 413, too_big, "body_too_large")
            return await self.app(scope, receive, send)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        # chunked upload: read it here, counting, so the limit holds without a Content-Length
        chunks, n = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            n += len(chunks[-1])
            if n > limit:
                if msg.get("more_body"):
                    await self._drain(receive, DRAIN_MAX - n)
                return await self._reply(send, 413, too_big, "body_too_large")
            if not msg.get("more_body"):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def receive_() -> dict:
            return replay.pop() if replay else await receive()

        await self.app(scope, receive_, send)


def create_app(state: AppState) -> Any:
    """The ASGI app (FastAPI behind :class:`Gate`) over a loaded :class:`AppState`; the worker
    starts and stops with the app's lifespan."""
    from contextlib import asynccontextmanager

    from . import routes_chat, routes_dual

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.worker.start()
        log.info("edgevlm serve: %s", ", ".join(f"{m.id} ({m.description})" for m in state.models.values()))
        yield
        # uvicorn has stopped accepting and waited for open requests (or cancelled them):
        # stop the worker and release the mapped models.
        state.worker.stop(timeout=max(state.config.shutdown_grace_s, 1.0))
        for m in state.models.values():
            m.close()
        log.info("edgevlm serve: shutdown complete")

    app = FastAPI(title="edgevlm server", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible chat, embeddings and zero-shot classification with test-time "
                              "adaptation, for quantized vision-language models (.evlm) on edge hardware.")
    app.state.edgevlm = state
    install_handlers(app)
    # HTTPBearer(auto_error=False) only documents the scheme in the OpenAPI schema: Gate enforces it.
    auth = [Depends(HTTPBearer(auto_error=False))]

    @app.get("/health", tags=["ops"])
    async def health() -> JSONResponse:
        waiting, capacity, running = state.worker.state()
        ok = state.worker.accepting
        return JSONResponse({"status": "ok" if ok else "shutting_down", "models": list(state.models),
                             "queue": {"waiting": waiting, "capacity": capacity, "running": running},
                             "uptime_s": round(time.time() - state.started, 1)}, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["ops"], dependencies=auth, response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def card(m: ServedModel) -> dict:
        return {"id": m.id, "object": "model", "created": m.created, "owned_by": "edgevlm",
                "capabilities": m.capabilities}

    @app.get("/v1/models", tags=["openai"], dependencies=auth, response_model=ModelList)
    async def list_models() -> dict:
        return {"object": "list", "data": [card(m) for m in state.models.values()]}

    @app.get("/v1/models/{model_id}", tags=["openai"], dependencies=auth, response_model=ModelCard,
             responses={404: ERRORS[404]})
    async def get_model(model_id: str) -> dict:
        return card(state.model(model_id))

    app.include_router(routes_chat.router, dependencies=auth)
    app.include_router(routes_dual.router, dependencies=auth)
    return Gate(app, state)  # type: ignore[return-value]


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("edgevlm")
    except Exception:  # noqa: BLE001 - a source checkout without metadata
        return "0"
