"""Run the server: load the models, build the app, hand it to uvicorn, shut down cleanly.

SIGTERM / Ctrl-C: uvicorn stops accepting connections and waits for open requests; at the
same moment (our ``handle_exit`` hook) the worker stops accepting jobs, answers every queued
one 503 and gives the running one ``shutdown_grace_s`` to finish before cancelling it at its
next token.  Then the app's lifespan stops the worker thread and unmaps the models.  A second
Ctrl-C forces the exit (uvicorn's behaviour).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from .config import ServerConfig

__all__ = ["build", "serve"]


def build(config: ServerConfig) -> Any:
    """Load every model and return the ASGI app (what ``serve`` runs; tests can mount it too)."""
    from ..runtime import set_num_threads
    from .app import AppState, create_app
    from .images import ImagePolicy
    from .metrics import Metrics
    from .models import load_models
    from .worker import Worker

    if config.threads:
        set_num_threads(config.threads)
    models = load_models(config.models, config.names, ctx=config.ctx, max_streams=config.max_streams)
    holder: dict[str, Any] = {}
    worker = Worker(config.max_queue, on_wait=lambda s: holder["m"].waited(s),
                    on_reject=lambda r: holder["m"].reject(r))
    metrics = Metrics({k: m.kind.value for k, m in models.items()}, worker.state)
    holder["m"] = metrics
    policy = ImagePolicy(config.allowed_image_dir, config.allow_remote_images, config.max_image_pixels,
                         config.max_remote_image_bytes, config.remote_timeout_s)
    state = AppState(config, models, worker, metrics, policy, time.time())
    return create_app(state), state


def serve(config: ServerConfig) -> None:
    """Blocks until the server is stopped (SIGTERM, SIGINT)."""
    import uvicorn

    app, state = build(config)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # Runs in a signal handler: hand the work to a thread (it takes the worker's lock,
            # which the interrupted main thread might hold).
            threading.Thread(target=state.worker.begin_shutdown, args=(config.shutdown_grace_s,),
                             daemon=True).start()
            super().handle_exit(sig, frame)

    log = logging.getLogger("edgevlm.server")
    log.setLevel(config.log_level.upper())
    if not log.handlers:  # uvicorn configures only its own loggers; print ours the same way
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(levelname)-9s %(message)s"))
        log.addHandler(h)
        log.propagate = False
    ucfg = uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                          # the worker cancels in-flight work after the grace period; uvicorn waits a
                          # little longer for those responses to be written before cancelling tasks
                          timeout_graceful_shutdown=int(config.shutdown_grace_s) + 5,
                          # a backstop far above the model queue: past it uvicorn answers 503 itself
                          limit_concurrency=64 + 8 * config.max_queue,
                          server_header=False)
    Server(ucfg).run()
