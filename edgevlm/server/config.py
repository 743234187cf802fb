"""Server configuration: one frozen dataclass, one field per ``edgevlm serve`` flag.

Validation happens here, at construction, with ValueErrors that say what was expected and how
to fix it; the rest of the server trusts these values.  Nothing here loads a model or imports
the HTTP stack.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

__all__ = ["LabelSet", "ServerConfig", "load_label_sets"]

# Defaults: a Pi 5 has 4-8 GiB; these keep one request's working set small.
DEFAULT_MAX_BODY = 20 * 1024 * 1024          # bytes: a few base64 photos fit, an unbounded upload does not
DEFAULT_MAX_PIXELS = 16_000_000              # a 16 Mpx RGB decode is 48 MB: the decompression-bomb guard
DEFAULT_REMOTE_BYTES = 10 * 1024 * 1024      # bytes read from one remote image URL
DEFAULT_REMOTE_TIMEOUT = 10.0                # seconds for one remote image fetch, connect to last byte


@dataclass(frozen=True)
class LabelSet:
    """A named zero-shot label set for /v1/classify: class names and the prompt template."""

    labels: tuple[str, ...]
    prompt: str = "a photo of a {}"

    def __post_init__(self) -> None:
        labels = tuple(self.labels) if isinstance(self.labels, (list, tuple)) else self.labels
        if not isinstance(labels, tuple) or len(labels) < 2 or not all(isinstance(x, str) and x.strip()
                                                                       for x in labels):
            raise ValueError(f"a label set needs at least two non-empty label strings, got {self.labels!r}")
        if len(set(labels)) != len(labels):
            raise ValueError(f"label set has duplicate labels: {list(labels)}")
        if not isinstance(self.prompt, str) or "{}" not in self.prompt:
            raise ValueError(f"a label-set prompt must contain {{}} where the label goes, got {self.prompt!r}")
        object.__setattr__(self, "labels", labels)


def load_label_sets(path: str | os.PathLike) -> dict[str, LabelSet]:
    """A JSON file ``{"name": ["a", "b"] | {"labels": [...], "prompt": "a photo of a {}"}}``."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except OSError as e:
        raise ValueError(f"--label-sets {p}: cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--label-sets {p}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"--label-sets {p}: expected a JSON object mapping names to label lists")
    out: dict[str, LabelSet] = {}
    for name, v in raw.items():
        try:
            out[name] = LabelSet(tuple(v)) if isinstance(v, list) else LabelSet(tuple(v["labels"]),
                                                                               v.get("prompt", "a photo of a {}"))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"--label-sets {p}: entry {name!r}: {e}; expected a list of labels or "
                             '{"labels": [...], "prompt": "... {} ..."}') from None
    return out


def _positive_int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    return v


@dataclass(frozen=True)
class ServerConfig:
    """``edgevlm serve`` settings (flag ``--max-queue`` is field ``max_queue``, and so on).

    models / names: the .evlm files and their model ids (default: each file's stem).
    max_queue: requests that may wait behind the one running; one more is a 503.
    threads: kernel threads (0: the runtime default, all cores).
    allowed_image_dir: local image paths are served only from under this folder (None: none are).
    """

    models: tuple[str, ...]
    names: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    max_queue: int = 8
    threads: int = 0
    allow_remote_images: bool = False
    allowed_image_dir: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_remote_image_bytes: int = DEFAULT_REMOTE_BYTES
    remote_timeout_s: float = DEFAULT_REMOTE_TIMEOUT
    ctx: int | None = None                   # KV-cache length of generative models (None: min(model, 4096))
    default_max_tokens: int = 256            # a chat request without max_tokens
    max_streams: int = 64                    # Q-TTA stream states per (model, label set), LRU beyond
    label_sets: Mapping[str, LabelSet] = field(default_factory=dict)
    shutdown_grace_s: float = 10.0           # SIGTERM: in-flight work may finish this long, then is cancelled
    log_level: str = "info"

    def __post_init__(self) -> None:
        models = tuple(str(m) for m in self.models)
        if not models:
            raise ValueError("give at least one MODEL.evlm to serve")
        for m in models:
            if not Path(m).is_file():
                raise ValueError(f"{m}: no such model file (expected an .evlm written by `edgevlm export`)")
        names = tuple(self.names) or tuple(Path(m).stem for m in models)
        if len(names) != len(models):
            raise ValueError(f"--name was given {len(names)} time(s) for {len(models)} model(s); give one "
                             "--name per model, in the same order, or none (ids = file stems)")
        if len(set(names)) != len(names):
            raise ValueError(f"model ids must be unique, got {list(names)}; use --name to tell them apart")
        for n in names:
            if not n or any(c.isspace() for c in n):
                raise ValueError(f"model id {n!r} must be non-empty without spaces")
        object.__setattr__(self, "models", models)
        object.__setattr__(self, "names", names)
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or len(self.api_key) < 8):
            raise ValueError("--api-key must be at least 8 characters (or leave it out for no authentication)")
        _positive_int("max_queue", self.max_queue)
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(f"threads must be an integer >= 0 (0 = all cores), got {self.threads!r}")
        if self.allowed_image_dir is not None:
            d = Path(self.allowed_image_dir)
            if not d.is_dir():
                raise ValueError(f"--allowed-image-dir {d}: not a folder")
            object.__setattr__(self, "allowed_image_dir", os.path.realpath(d))
        for name in ("max_body_bytes", "max_image_pixels", "max_remote_image_bytes", "default_max_tokens",
                     "max_streams"):
            _positive_int(name, getattr(self, name))
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        for name in ("remote_timeout_s", "shutdown_grace_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got {v!r}")
        if self.ctx is not None:
            _positive_int("ctx", self.ctx)
        if not all(isinstance(v, LabelSet) for v in self.label_sets.values()):
            raise ValueError("label_sets must map names to LabelSet (see load_label_sets)")
        object.__setattr__(self, "label_sets", MappingProxyType(dict(self.label_sets)))
        if self.log_level not in ("critical", "error", "warning", "info", "debug"):
            raise ValueError(f"log_level must be critical|error|warning|info|debug, got {self.log_level!r}")
