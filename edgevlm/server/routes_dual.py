"""CLIP/SigLIP routes: POST /v1/embeddings, /v1/classify and the adaptation-state routes.

/v1/embeddings follows OpenAI's (text in, L2-normalised float vectors out, ``encoding_format``
float or base64 little-endian float32, which the openai client asks for by default); an input
item may also be an ``image_url`` part, embedded into the same space.  ``dimensions`` other than
the model's width is refused: CLIP/SigLIP embeddings are not trained to be truncated.

/v1/classify: zero-shot over ``labels`` (or a named ``label_set``), optionally through a
``stream_id``'s Q-TTA state (``adapt`` updates it; ``reset`` empties it first).
/v1/classify/reset, /v1/classify/state/export and /v1/classify/state/import manage those states
(the state travels as base64 of an .npz, never pickled).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from .app import ERRORS, MAX_IMAGES_PER_REQUEST, AppState, run_job
from .config import LabelSet
from .errors import APIError
from .images import load_image
from .models import MAX_LABELS, ModelKind
from .schemas import (Classification, ClassifyRequest, EmbeddingList, EmbeddingRequest, ImagePart, ImageURL,
                      StateImportRequest, StateRequest, TextPart)

__all__ = ["router"]

router = APIRouter()

MAX_EMBED_INPUTS = 256


@router.post("/v1/embeddings", tags=["openai"], response_model=EmbeddingList, responses=ERRORS)
async def embeddings(req: EmbeddingRequest, request: Request) -> Any:
    state: AppState = request.app.state.edgevlm
    m = state.model(req.model, ModelKind.DUAL, route="/v1/embeddings")
    enc = m.runtime
    if req.dimensions is not None and req.dimensions != enc.embed_dim:
        raise APIError(400, f"dimensions={req.dimensions}: {m.id} gives {enc.embed_dim}-d embeddings and they cannot "
                            "be shortened (CLIP/SigLIP are not trained for truncation); leave dimensions out",
                       "dimensions", "unsupported_value")
    raw = [req.input] if isinstance(req.input, str) else list(req.input)
    if not raw:
        raise APIError(400, "input is empty: give a text, a list of texts or image_url parts", "input", "invalid_value")
    if len(raw) > MAX_EMBED_INPUTS:
        raise APIError(400, f"{len(raw)} inputs in one request; the limit is {MAX_EMBED_INPUTS}", "input",
                       "invalid_value")
    items: list[tuple[str, Any]] = []
    n_images = 0
    for i, x in enumerate(raw):
        if isinstance(x, str):
            if not x:
                raise APIError(400, f"input[{i}] is an empty string", f"input[{i}]", "invalid_value")
            items.append(("text", x))
        elif isinstance(x, TextPart):
            items.append(("text", x.text))
        elif isinstance(x, ImagePart):
            n_images += 1
            items.append(("image", (x.image_url.url, f"input[{i}].image_url")))
        else:
            raise APIError(400, f"input[{i}]: token-id input is not supported; send the text itself", f"input[{i}]",
                           "invalid_value")
    if n_images > MAX_IMAGES_PER_REQUEST:
        raise APIError(400, f"{n_images} images in one request; the limit is {MAX_IMAGES_PER_REQUEST}", "input",
                       "too_many_images")
    for k, (kind, v) in enumerate(items):
        if kind == "image":
            items[k] = ("image", await run_in_threadpool(load_image, v[0], state.images, v[1]))
    vecs, n_tokens = await run_job(state, request, "/v1/embeddings", lambda job: m.dual.embed(items))
    if req.encoding_format == "base64":
        data = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vecs]
    else:
        data = vecs.tolist()
    return JSONResponse({"object": "list", "model": m.id,
                         "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
                         "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})


def _labels(state: AppState, req: Any) -> tuple[tuple[str, ...], str]:
    """(labels, prompt) from labels= or label_set= (+ prompt=), validated."""
    if (req.labels is None) == (req.label_set is None):
        raise APIError(400, "give exactly one of labels (a list of class names) or label_set (a name from the "
                            f"server's --label-sets: {', '.join(state.config.label_sets) or 'none configured'})",
                       "labels", "invalid_value")
    if req.label_set is not None:
        ls = state.config.label_sets.get(req.label_set)
        if ls is None:
            raise APIError(404, f"no label set {req.label_set!r} on this server; it has: "
                                f"{', '.join(state.config.label_sets) or 'none (start it with --label-sets FILE)'}",
                           "label_set", "label_set_not_found")
        return ls.labels, req.prompt or ls.prompt
    if len(req.labels) > MAX_LABELS:
        raise APIError(400, f"{len(req.labels)} labels; the limit is {MAX_LABELS}", "labels", "invalid_value")
    try:
        ls = LabelSet(tuple(req.labels), req.prompt or "a photo of a {}")
    except ValueError as e:
        raise APIError(400, f"labels/prompt: {e}", "labels", "invalid_value") from None
    return ls.labels, ls.prompt


@router.post("/v1/classify", tags=["classify"], response_model=Classification, responses=ERRORS)
async def classify(req: ClassifyRequest, request: Request) -> Any:
    state: AppState = request.app.state.edgevlm
    m = state.model(req.model, ModelKind.DUAL, route="/v1/classify")
    labels, prompt = _labels(state, req)
    if (req.image is None) == (req.images is None):
        raise APIError(400, "give exactly one of image (one image) or images (a list, classified in order)", "image",
                       "invalid_value")
    refs = [req.image] if req.image is not None else list(req.images)
    if not refs or len(refs) > MAX_IMAGES_PER_REQUEST:
        raise APIError(400, f"images: give 1 to {MAX_IMAGES_PER_REQUEST} images, got {len(refs)}", "images",
                       "invalid_value")
    adapt = bool(req.stream_id) if req.adapt is None else req.adapt
    if req.stream_id is None and (req.adapt or req.reset):
        raise APIError(400, "adapt/reset act on an adaptation state: give a stream_id (any name for the camera or "
                            "session, e.g. 'cam1')", "stream_id", "invalid_value")
    images = []
    for i, r in enumerate(refs):
        url = r.url if isinstance(r, ImageURL) else r
        where = "image" if req.image is not None else f"images[{i}]"
        images.append(await run_in_threadpool(load_image, url, state.images, where))
    results = await run_job(state, request, "/v1/classify", lambda job: m.dual.classify(
        images, labels, prompt, req.stream_id, adapt, req.reset, req.top_k))
    return JSONResponse({"object": "classification", "model": m.id, "stream_id": req.stream_id,
                         "adapted": bool(adapt and req.stream_id), "labels": list(labels), "results": results})


@router.post("/v1/classify/reset", tags=["classify"], responses=ERRORS)
async def classify_reset(req: StateRequest, request: Request) -> Any:
    """Empty one stream's Q-TTA caches (``stream_id``), or drop every stream of the label set."""
    state: AppState = request.app.state.edgevlm
    m = state.model(req.model, ModelKind.DUAL, route="/v1/classify/reset")
    labels, prompt = _labels(state, req)
    n = await run_job(state, request, "/v1/classify/reset", lambda job: m.dual.reset(labels, prompt, req.stream_id))
    return JSONResponse({"object": "classify.reset", "model": m.id, "stream_id": req.stream_id, "streams_reset": n})


@router.post("/v1/classify/state/export", tags=["classify"], responses=ERRORS)
async def classify_export(req: StateRequest, request: Request) -> Any:
    """A stream's Q-TTA state as base64 of an .npz (arrays + config + classifier hash; no pickle)."""
    state: AppState = request.app.state.edgevlm
    m = state.model(req.model, ModelKind.DUAL, route="/v1/classify/state/export")
    if req.stream_id is None:
        raise APIError(400, "stream_id is required: which stream's state to export", "stream_id", "invalid_value")
    labels, prompt = _labels(state, req)
    data = await run_job(state, request, "/v1/classify/state/export",
                         lambda job: m.dual.export_state(labels, prompt, req.stream_id))
    return JSONResponse({"object": "classify.state", "model": m.id, "stream_id": req.stream_id, "bytes": len(data),
                         "state": base64.b64encode(data).decode()})


@router.post("/v1/classify/state/import", tags=["classify"], responses=ERRORS)
async def classify_import(req: StateImportRequest, request: Request) -> Any:
    """Restore a state exported for the same model, labels and prompt into ``stream_id``."""
    state: AppState = request.app.state.edgevlm
    m = state.model(req.model, ModelKind.DUAL, route="/v1/classify/state/import")
    labels, prompt = _labels(state, req)
    try:
        data = base64.b64decode(req.state, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "state is not valid base64 (send the 'state' string /v1/classify/state/export returned)",
                       "state", "invalid_value") from None
    n = await run_job(state, request, "/v1/classify/state/import",
                      lambda job: m.dual.import_state(labels, prompt, req.stream_id, data))
    return JSONResponse({"object": "classify.state", "model": m.id, "stream_id": req.stream_id, "state_bytes": n,
                         "imported": True})

