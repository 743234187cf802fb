"""The models a server holds and what each can do; every method here runs in the model worker.

Two kinds, told apart from the file's metadata without building anything:
- GENERATIVE (LLaVA, Qwen2-VL, Idefics3/SmolVLM; :class:`edgevlm.runtime.vlm.Runtime`): chat;
- DUAL (CLIP, SigLIP; :class:`edgevlm.runtime.dual.DualEncoder`): embeddings and zero-shot
  classification with per-stream Q-TTA adaptation.

Classification state: text embeddings of a label set are computed once and kept with a
:class:`StreamStates` (one Q-TTA cache per ``stream_id``, LRU-bounded by ``max_streams``) under
the key (labels, prompt); at most ``MAX_LABEL_SETS`` such entries are kept (LRU), so the
memory held is bounded by MAX_LABEL_SETS x StreamStates.bytes_for(C, E, max_streams).  A
``stream_id`` therefore names a state *per label set*: the same id with other labels is another
stream (its caches are keyed on those labels' text embeddings and cannot be shared).
"""

from __future__ import annotations

import io
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MAX_LABEL_SETS", "DualService", "ModelKind", "ServedModel", "load_models"]

MAX_LABEL_SETS = 16
MAX_LABELS = 1000


class ModelKind(Enum):
    GENERATIVE = "generative"
    DUAL = "dual"


def detect_kind(path: str) -> ModelKind:
    """From the header only (no tensors are read)."""
    from .. import format as fmt
    from ..runtime.dual import SUPPORTED
    from ..runtime.vlm_base import FAMILY_CLASSES

    with fmt.open(path) as f:
        meta = f.metadata or {}
    arch, family = meta.get("architecture"), meta.get("family")
    if arch in SUPPORTED:
        return ModelKind.DUAL
    if family in FAMILY_CLASSES:
        return ModelKind.GENERATIVE
    raise ValueError(f"{path}: holds a {arch or family!r} export; edgevlm serve supports CLIP/SigLIP "
                     f"({', '.join(SUPPORTED)}) and generative VLMs ({', '.join(sorted(FAMILY_CLASSES))})")


@dataclass
class _LabelState:
    labels: tuple[str, ...]
    text: np.ndarray          # float32 [C, E], L2-normalised
    streams: Any              # edgevlm.adapt.StreamStates


class DualService:
    """Embeddings and classification on one DualEncoder (worker thread only: not thread-safe)."""

    def __init__(self, enc: Any, max_streams: int) -> None:
        self.enc = enc
        self.max_streams = max_streams
        self._sets: OrderedDict[tuple[tuple[str, ...], str], _LabelState] = OrderedDict()

    # -- embeddings -----------------------------------------------------------------------------
    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens of each text, special tokens included (no truncation), to report usage and to
        refuse texts longer than the text tower's context instead of silently cutting them."""
        tok = self.enc.tokenizer
        return [int(tok.encode([t], padding="do_not_pad", truncation=False)[1].sum()) for t in texts]

    def embed(self, items: list[tuple[str, Any]]) -> tuple[np.ndarray, int]:
        """items: ("text", str) or ("image", PIL image), in order -> (float32 [N, E], text tokens)."""
        texts = [(i, v) for i, (k, v) in enumerate(items) if k == "text"]
        images = [(i, v) for i, (k, v) in enumerate(items) if k == "image"]
        out = np.zeros((len(items), self.enc.embed_dim), dtype=np.float32)
        n_tokens = 0
        if texts:
            counts = self.count_tokens([t for _, t in texts])
            limit = self.enc.context_length
            for (i, _), n in zip(texts, counts):
                if n > limit:
                    raise ValueError(f"input[{i}] is {n} tokens; this model's text tower takes at most {limit}")
            n_tokens = sum(counts)
            out[[i for i, _ in texts]] = self.enc.encode_text([t for _, t in texts])
        for i, im in images:  # one at a time: images may differ in size before preprocessing
            out[i] = self.enc.encode_image(im)[0]
        return out, n_tokens

    # -- classification -------------------------------------------------------------------------
    def label_state(self, labels: tuple[str, ...], prompt: str, *, create: bool = True) -> _LabelState | None:
        from ..adapt import QTTAConfig, StreamStates

        key = (labels, prompt)
        st = self._sets.get(key)
        if st is not None:
            self._sets.move_to_end(key)
            return st
        if not create:
            return None
        text = self.enc.encode_text([prompt.format(x) for x in labels])
        # Q-TTA's zero-shot logits are logit_scale * cos: the model's own scale (exp of the stored log)
        cfg = QTTAConfig(logit_scale=float(np.exp(self.enc.logit_scale)))
        st = _LabelState(labels, text, StreamStates(text, cfg, max_streams=self.max_streams))
        while len(self._sets) >= MAX_LABEL_SETS:
            self._sets.popitem(last=False)
        self._sets[key] = st
        return st

    def classify(self, images: list[Any], labels: tuple[str, ...], prompt: str, stream_id: str | None,
                 adapt: bool, reset: bool, top_k: int | None) -> list[dict]:
        st = self.label_state(labels, prompt)
        q = st.streams.get(stream_id) if stream_id is not None else None
        if q is not None and reset:
            q.reset()
        results = []
        for idx, im in enumerate(images):
            f = self.enc.encode_image(im)                             # [1, E]
            if q is None:
                logits = self.enc.logits(f, st.text)[0]               # [C]
            else:
                # Q-TTA returns logit_scale*cos + cache terms; SigLIP's bias is a constant shift
                # that Q-TTA leaves out: add it so an empty cache gives exactly zero-shot scores.
                logits = q(f[0], adapt=adapt) + np.float32(self.enc.logit_bias)
            prob = self.enc.probabilities(logits[None])[0]
            order = np.argsort(-prob, kind="stable")[: top_k or len(labels)]
            results.append({"index": idx, "label": labels[int(order[0])], "score": float(prob[order[0]]),
                            "scores": [{"label": labels[int(k)], "score": float(prob[k])} for k in order]})
        return results

    def _stream(self, labels: tuple[str, ...], prompt: str, stream_id: str):
        st = self.label_state(labels, prompt, create=False)
        if st is None or stream_id not in st.streams:
            raise LookupError(f"no adaptation state for stream {stream_id!r} with these labels and prompt; it "
                              "is created by the first /v1/classify call with this stream_id (or an import)")
        return st.streams.get(stream_id)

    def export_state(self, labels: tuple[str, ...], prompt: str, stream_id: str) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **self._stream(labels, prompt, stream_id).state_dict())
        return buf.getvalue()

    def import_state(self, labels: tuple[str, ...], prompt: str, stream_id: str, data: bytes) -> int:
        st = self.label_state(labels, prompt)
        new = stream_id not in st.streams
        q = st.streams.get(stream_id)
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                q.load_state_dict({k: z[k] for k in z.files}, strict=True)
        except (ValueError, OSError, KeyError, EOFError) as e:
            if new:
                st.streams.drop(stream_id)
            raise ValueError(f"state: not a valid Q-TTA state for these labels ({e})") from None
        return int(q.nbytes)

    def reset(self, labels: tuple[str, ...], prompt: str, stream_id: str | None) -> int:
        """Empty one stream's caches, or drop every stream of the label set; returns streams affected."""
        st = self.label_state(labels, prompt, create=False)
        if st is None:
            return 0
        if stream_id is None:
            n = len(st.streams)
            st.streams.reset()
            return n
        if stream_id not in st.streams:
            return 0
        st.streams.reset(stream_id)
        return 1


@dataclass
class ServedModel:
    id: str
    path: str
    kind: ModelKind
    runtime: Any                      # vlm.Runtime | dual.DualEncoder
    dual: DualService | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def capabilities(self) -> list[str]:
        return ["chat"] if self.kind is ModelKind.GENERATIVE else ["embeddings", "classify"]

    @property
    def description(self) -> str:
        rt = self.runtime
        if self.kind is ModelKind.GENERATIVE:
            return f"{rt.family} generative VLM, context {rt.ctx} tokens"
        return f"{rt.architecture} dual encoder, {rt.embed_dim}-d embeddings"

    def close(self) -> None:
        self.runtime.close()


def load_models(paths: tuple[str, ...], names: tuple[str, ...], *, ctx: int | None,
                max_streams: int) -> dict[str, ServedModel]:
    from ..runtime.dual import DualEncoder
    from ..runtime.vlm import Runtime

    out: dict[str, ServedModel] = {}
    try:
        for path, name in zip(paths, names):
            kind = detect_kind(path)
            if kind is ModelKind.GENERATIVE:
                out[name] = ServedModel(name, str(Path(path)), kind, Runtime.load(path, ctx=ctx))
            else:
                enc = DualEncoder.load(path)
                out[name] = ServedModel(name, str(Path(path)), kind, enc, DualService(enc, max_streams))
    except BaseException:
        for m in out.values():
            m.close()
        raise
    return out
