"""``edgevlm serve``: an OpenAI-compatible HTTP server for .evlm models (FastAPI + uvicorn).

    from edgevlm.server import ServerConfig, serve
    serve(ServerConfig(models=("smolvlm-q4.evlm", "clip-q4.evlm"), port=8080, threads=4))

Modules: config (ServerConfig), launch (load + uvicorn + shutdown), app (middleware, small
routes), routes_chat, routes_dual, schemas (pydantic -> OpenAPI), worker (bounded queue, the
one model thread), models (what each model kind does), images (data URI / path / URL with
limits), metrics (Prometheus text), errors (OpenAI error format).  Needs the ``server`` extra
(``pip install 'edgevlm[server]'``); like the runtime, it never imports torch.
"""

from __future__ import annotations

from .config import LabelSet, ServerConfig, load_label_sets

__all__ = ["LabelSet", "ServerConfig", "load_label_sets", "serve"]


def serve(config: ServerConfig) -> None:
    from .launch import serve as _serve

    _serve(config)
