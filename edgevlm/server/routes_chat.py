"""POST /v1/chat/completions: OpenAI chat with image parts, non-streaming and SSE streaming.

Messages are converted to the transformers multimodal message format the export's chat
template expects (``{"type": "image"}`` placeholders, images in order of appearance) and run
by :meth:`edgevlm.runtime.vlm.Runtime.generate` in the model worker.  Images are fetched and
decoded before the job is queued, in the request's thread.

Streaming: the response starts only once the first text piece (or the end) is there, so a
request that fails in the worker before any token (prompt longer than the context, an image
count the template does not expect) still gets a proper 4xx status.  After that, an error is
sent as an SSE ``data: {"error": {...}}`` event (what the openai client raises from).  Closing
the connection cancels the generation at its next token.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from .app import ERRORS, MAX_IMAGES_PER_REQUEST, EventStream, run_job, worker_error
from .errors import APIError
from .images import load_image
from .models import ModelKind
from .schemas import ChatCompletion, ChatCompletionRequest, ImagePart
from .worker import ShuttingDown

__all__ = ["router"]

router = APIRouter(tags=["openai"])

MAX_STOP = 16
# A cheap bound before tokenizing: no tokenizer makes tokens of 32+ characters on average, so a
# text longer than 32 x ctx characters cannot fit and is refused without running the tokenizer.
CHARS_PER_TOKEN_BOUND = 32


def convert_messages(req: ChatCompletionRequest) -> tuple[list[dict], list[tuple[str, str]], int]:
    """OpenAI messages -> (template messages, [(image url, param name)], characters of text)."""
    out, refs, chars = [], [], 0
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        if m.content is None or isinstance(m.content, str):
            text = m.content or ""
            chars += len(text)
            out.append({"role": role, "content": text})
            continue
        parts = []
        for j, p in enumerate(m.content):
            if isinstance(p, ImagePart):
                if role != "user":
                    raise APIError(400, f"messages[{i}]: only user messages may hold images (this one is {m.role})",
                                   f"messages[{i}].content[{j}]", "invalid_value")
                refs.append((p.image_url.url, f"messages[{i}].content[{j}].image_url"))
                parts.append({"type": "image"})
            else:
                chars += len(p.text)
                parts.append({"type": "text", "text": p.text})
        out.append({"role": role, "content": parts})
    return out, refs, chars


def _check(req: ChatCompletionRequest) -> tuple[int | None, list[str]]:
    if req.n != 1:
        raise APIError(400, f"n={req.n} is not supported: this server generates one choice per request", "n",
                       "unsupported_value")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name):
            raise APIError(400, f"{name} is not supported; use repetition_penalty (extra_body) instead", name,
                           "unsupported_value")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP or any(not s or len(s) > 256 for s in stop):
        raise APIError(400, f"stop: up to {MAX_STOP} non-empty strings of at most 256 characters", "stop",
                       "invalid_value")
    max_tokens = req.max_tokens or req.max_completion_tokens
    return max_tokens, stop


@router.post("/v1/chat/completions", response_model=ChatCompletion,
             responses={**ERRORS, 200: {"description": "a chat.completion, or with stream: true a text/event-stream "
                                                       "of chat.completion.chunk events ending in data: [DONE]",
                                        "content": {"text/event-stream": {}}}})
async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
    state = request.app.state.edgevlm
    m = state.model(req.model, ModelKind.GENERATIVE, route="/v1/chat/completions")
    rt = m.runtime
    max_tokens, stop = _check(req)
    max_tokens = max_tokens or state.config.default_max_tokens
    messages, refs, chars = convert_messages(req)
    if chars > CHARS_PER_TOKEN_BOUND * rt.ctx:
        raise APIError(400, f"the messages hold {chars} characters, far more than this model's context of {rt.ctx} "
                            "tokens can take; shorten them", "messages", "context_length_exceeded")
    if len(refs) > MAX_IMAGES_PER_REQUEST:
        raise APIError(400, f"{len(refs)} images in one request; the limit is {MAX_IMAGES_PER_REQUEST}", "messages",
                       "too_many_images")
    images = [await run_in_threadpool(load_image, url, state.images, param) for url, param in refs]
    params = dict(max_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                  repetition_penalty=req.repetition_penalty, seed=req.seed, stop=stop)

    def generate(job):  # runs in the model worker
        on_text = (lambda piece: job.emit(("text", piece))) if req.stream else None
        g = rt.generate(messages, images, on_text=on_text, cancel=job.cancel, **params)
        state.metrics.generation(g.prompt_tokens, len(g.token_ids), g.timings)
        return g

    meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": m.id}
    if not req.stream:
        g = await run_job(state, request, "/v1/chat/completions", generate)
        if g.finish_reason == "cancelled":  # only SIGTERM cancels a job whose client is still there
            raise ShuttingDown("the server is shutting down and cancelled this generation")
        return JSONResponse({**meta, "object": "chat.completion",
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text},
                                          "finish_reason": g.finish_reason, "logprobs": None}],
                             "usage": g.usage})

    job, events = state.worker.submit(generate, "/v1/chat/completions")
    first_wait = EventStream(events, job, request)
    try:
        first = await first_wait.next()
    except BaseException as e:
        job.cancel.set()
        first_wait.close()
        if isinstance(e, Exception):
            raise worker_error(e) from None
        raise
    if first[0] == "error":
        raise worker_error(first[1])
    if first[0] == "done" and first[1].finish_reason == "cancelled":
        raise ShuttingDown("the server is shutting down and cancelled this generation")
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return StreamingResponse(_sse(first, events, job, meta, include_usage), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(first: tuple[str, Any], events, job, meta: dict, include_usage: bool):
    def chunk(delta: dict, finish: str | None = None) -> str:
        c = {**meta, "object": "chat.completion.chunk",
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if include_usage:
            c["usage"] = None
        return _event(c)

    try:
        yield chunk({"role": "assistant", "content": ""})
        kind, value = first
        while True:
            if kind == "text":
                yield chunk({"content": value})
            elif kind == "done":
                if value.finish_reason == "cancelled":
                    yield _event(ShuttingDown("the server is shutting down and cancelled this generation").body())
                    return
                yield chunk({}, value.finish_reason)
                if include_usage:
                    yield _event({**meta, "object": "chat.completion.chunk", "choices": [], "usage": value.usage})
                yield "data: [DONE]\n\n"
                return
            else:
                yield _event(worker_error(value).body())
                return
            kind, value = await events.get()
    finally:
        # Normal end: a no-op.  Client gone (Starlette cancels this generator on disconnect):
        # the generation stops at its next token and the worker moves on.
        job.cancel.set()
