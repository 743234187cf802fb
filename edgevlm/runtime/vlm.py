"""Generative VLMs on the edgevlm runtime: image + prompt -> text, with a KV cache (never torch).

    from edgevlm.runtime.vlm import Runtime
    rt = Runtime.load("smolvlm-q4.evlm", ctx=2048, threads=2)
    out = rt.generate("What is in the image?", images=["cat.jpg"], max_tokens=64)
    print(out.text, out.usage)
    for piece in rt.stream("Describe it.", images=["cat.jpg"]):   # text as it is generated
        print(piece, end="", flush=True)

Flow: the chat template stored in the file formats the conversation (one image placeholder per
image); the family's vision side (:mod:`.vlm_base`) expands the placeholders as the HF processor
does, tokenizes and encodes the images; the token embeddings get the image features written
over the image-token rows; prefill runs the whole prompt through the decoder (every linear one
GEMM), then decode runs one token at a time (GEMV) until max_tokens, an end-of-sequence id or
a stop string.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import format as fmt
from .chat import ChatTemplate, user_message
from .decoder import Decoder, KVCache
from .memory import FilePages, trim_heap
from .sampling import Sampler, SamplingConfig
from .tokenizer import Tokenizer
from .vlm_base import Prepared, family_class

__all__ = ["Generation", "Runtime"]

F32 = np.float32
DEFAULT_CTX = 4096


@dataclass
class Generation:
    """The result of :meth:`Runtime.generate`."""

    text: str
    token_ids: list[int]                 # generated ids (an end-of-sequence id included, as HF generate)
    prompt_tokens: int
    finish_reason: str                   # "stop" (eos or stop string) | "length" (max_tokens or ctx)
    timings: dict[str, float] = field(default_factory=dict)  # encode_ms, prefill_ms, decode_ms, ttft_ms

    @property
    def usage(self) -> dict[str, int]:
        n = len(self.token_ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}


class Runtime:
    """A generative VLM export (LLaVA, Qwen2-VL, Idefics3/SmolVLM): vision side + decoder."""

    def __init__(self, f: Any, *, ctx: int | None = None, isa: str | None = None,
                 release_vision: bool = True, kv_dtype: str = "f32") -> None:
        meta = f.metadata or {}
        self.file = f
        self.family: str = meta.get("family", "")
        cls = family_class(self.family)
        self.config: dict = meta.get("config") or {}
        tcfg = self.config.get("text_config") or self.config
        self.decoder = Decoder(f, tcfg, isa=isa)
        self.vision = cls(f, self.config, isa)
        self.tokenizer = Tokenizer.from_evlm(f)
        tmeta = meta.get("tokenizer") or {}
        specials = {k: self.tokenizer._special(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.chat = ChatTemplate(tmeta["chat_template"], specials) if tmeta.get("chat_template") else None
        gen = meta.get("generation_config") or {}
        eos = gen.get("eos_token_id", tcfg.get("eos_token_id", self.tokenizer.eos_token_id))
        self.eos_ids = {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None}
        limit = self.decoder.max_positions
        self.ctx = int(ctx) if ctx is not None else min(limit or DEFAULT_CTX, DEFAULT_CTX)
        if limit and self.ctx > limit:
            raise ValueError(f"ctx {self.ctx} exceeds the model's max_position_embeddings {limit}")
        #: "f32" (default) or "f16": the KV cache's element type (Decoder.new_cache)
        self.kv_dtype = kv_dtype
        self.cache: KVCache = self.decoder.new_cache(self.ctx, kv_dtype)  # preallocated once, reused per request
        #: after each image encode, unmap the vision tower's and connector's file pages and trim
        #: the C heap (:mod:`.memory`): the language model's phase then runs without the encode's
        #: memory (SmolVLM-256M q4: RSS after the encode 137 -> 58 MiB: 50 MiB of weights, 29 MiB
        #: of freed heap); the next image maps the pages back from the page cache (~2 ms)
        self.release_vision = bool(release_vision)
        self._vision_pages = FilePages(f, lambda name: name.startswith(("vision.", "projector.")))

    @classmethod
    def load(cls, path: str | os.PathLike, *, ctx: int | None = None, threads: int | None = None,
             isa: str | None = None, verify: bool = False, device: str = "cpu",
             release_vision: bool = True, kv_dtype: str = "f32") -> Runtime:
        """mmap ``path`` and build the model (quantized weights stay in the mapping).
        ``release_vision``: see :attr:`release_vision` (False keeps the vision weights mapped,
        e.g. for a server encoding images back to back). ``kv_dtype``: "f32" (default: exact
        keys/values) or "f16" (half the KV memory and decode-attention reads).

        ``device="cuda"``: the packed linears run on the GPU (Triton kernels, needs the cuda extra;
        see runtime/cuda_linear.py), the rest of the forward pass stays numpy."""
        from .blas import limit_numpy_blas
        from .cuda_linear import kernel_target

        isa = kernel_target(device, isa)
        limit_numpy_blas()  # numpy's BLAS threads would spin on the kernels' cores
        if threads is not None:
            from . import set_num_threads

            set_num_threads(threads)
        f = fmt.open(path, verify=verify)
        try:
            return cls(f, ctx=ctx, isa=isa, release_vision=release_vision, kv_dtype=kv_dtype)
        except BaseException:
            f.close()
            raise

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def kv_bytes(self) -> int:
        return self.cache.nbytes

    def set_ctx(self, ctx: int) -> None:
        """Reallocate the KV cache for ``ctx`` positions (untouched pages cost no memory)."""
        limit = self.decoder.max_positions
        if limit and ctx > limit:
            raise ValueError(f"ctx {ctx} exceeds the model's max_position_embeddings {limit}")
        self.cache = self.decoder.new_cache(ctx, self.kv_dtype)
        self.ctx = int(ctx)

    # -- prompt --------------------------------------------------------------------------------
    def format(self, prompt: str | list[dict], n_images: int = 0) -> str:
        """A user prompt (str) or a message list -> the chat-formatted text with image placeholders."""
        if isinstance(prompt, str):
            messages = [user_message(prompt, n_images)]
        else:
            messages = list(prompt)
        if self.chat is not None:
            return self.chat.render(messages, add_generation_prompt=True)
        if self.family != "llava":
            raise ValueError("this export has no chat template; pass an already formatted prompt with raw=True")
        # llava-1.5's format, the LlavaProcessor documentation's default
        text = " ".join(p.get("text", "") if isinstance(p, dict) else str(p)
                        for m in messages for p in (m["content"] if isinstance(m["content"], list) else [m["content"]]))
        return f"USER: {self.vision.image_placeholder * n_images}\n{text} ASSISTANT:"

    def prepare(self, text: str, images: Sequence[Any] = ()) -> Prepared:
        """A formatted prompt + its images -> token ids, image features, positions."""
        p = self.vision.prepare(text, list(images), self.tokenizer)
        if images and self.release_vision:
            self._vision_pages.release()
            trim_heap()
        if p.input_ids.size + 1 > self.ctx:
            raise ValueError(f"the prompt is {p.input_ids.size} tokens (images included) but the context holds "
                             f"{self.ctx}; raise ctx (--ctx) or use a shorter prompt / fewer images")
        return p

    def _embed(self, p: Prepared) -> np.ndarray:
        x = self.decoder.embed(p.input_ids)                                  # [T, D]
        if p.image_features is not None and len(p.image_features):
            sel = p.input_ids == self.vision.image_token_id
            feats = np.asarray(p.image_features, dtype=F32)
            if int(sel.sum()) != feats.shape[0]:
                raise ValueError(f"{int(sel.sum())} image tokens but {feats.shape[0]} image feature rows")
            x[sel] = feats
        return x

    def logits(self, p: Prepared) -> np.ndarray:
        """Logits float32 [T, V] for every prompt position (a fresh cache; for tests and scoring)."""
        cache = self.decoder.new_cache(p.input_ids.size, self.kv_dtype)
        return self.decoder.forward(self._embed(p), cache, p.positions, all_logits=True, deepstack=p.deepstack)

    # -- generation ----------------------------------------------------------------------------
    def _positions(self, p: Prepared, i: int) -> np.ndarray | None:
        if p.positions is None:
            return None
        return np.full((3, 1) if p.positions.ndim == 2 else (1,), i + p.rope_delta, dtype=np.int64)

    def generate_ids(self, p: Prepared, max_tokens: int = 64, sampling: SamplingConfig | None = None, *,
                     on_token: Callable[[int], bool | None] | None = None,
                     timings: dict[str, float] | None = None, ignore_eos: bool = False) -> list[int]:
        """Token ids after the prompt (greedy unless ``sampling`` says otherwise), stopping at an
        eos id (included; not with ``ignore_eos``, for benchmarks), ``max_tokens`` or the context
        end.  ``on_token(id)`` returning True stops.  ``timings`` gets prefill_ms (prompt in, first
        token out), decode_ms (the rest) and the token counts."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        sampler = Sampler(sampling or SamplingConfig())
        cache = self.cache
        cache.reset()
        t0 = time.perf_counter()
        logits = self.decoder.forward(self._embed(p), cache, p.positions, deepstack=p.deepstack)
        seen = list(p.input_ids.tolist())
        out: list[int] = []
        t_first = None
        while True:
            tok = sampler(logits, np.asarray(seen))
            out.append(tok)
            seen.append(tok)
            if t_first is None:
                t_first = time.perf_counter()
            if on_token is not None and on_token(tok):
                break
            if (tok in self.eos_ids and not ignore_eos) or len(out) >= max_tokens or cache.length >= cache.ctx:
                break
            i = cache.length
            logits = self.decoder.forward(self.decoder.embed([tok]), cache, self._positions(p, i))
        t1 = time.perf_counter()
        if timings is not None:
            timings.update(prefill_ms=1e3 * (t_first - t0), decode_ms=1e3 * (t1 - t_first),
                           decode_tokens=len(out) - 1, prompt_tokens=int(p.input_ids.size))
        return out

    def stream(self, prompt: str | list[dict], images: Sequence[Any] = (), **kwargs: Any) -> Iterator[str]:
        """Yield text pieces as they are generated (same arguments as :meth:`generate`)."""
        import queue
        import threading

        q: queue.Queue = queue.Queue()
        stop = threading.Event()

        def run() -> None:
            try:
                self.generate(prompt, images, on_text=q.put, cancel=stop, **kwargs)
                q.put(None)
            except BaseException as e:  # surfaced in the consumer's thread
                q.put(e)

        th = threading.Thread(target=run, daemon=True)
        th.start()
        try:
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            th.join()

    def generate(self, prompt: str | list[dict], images: Sequence[Any] = (), *, max_tokens: int = 256,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 seed: int | None = None, stop: Sequence[str] = (), raw: bool = False,
                 on_text: Callable[[str], None] | None = None, cancel: Any = None) -> Generation:
        """Generate a reply.  ``prompt``: user text (one user turn with ``images``), or a message
        list; ``raw=True``: ``prompt`` is already formatted.  ``on_text(piece)`` streams text;
        ``cancel`` (an Event-like with ``is_set()``) stops early, finish_reason "cancelled"."""
        images = list(images)
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p,
                                  repetition_penalty=repetition_penalty, seed=seed)
        stops = [s for s in stop if s]
        t0 = time.perf_counter()
        if raw:
            if not isinstance(prompt, str):
                raise ValueError("raw=True needs the prompt as one formatted string")
            text = prompt
        else:
            text = self.format(prompt, len(images))
        p = self.prepare(text, images)
        t_enc = time.perf_counter()
        state = {"emitted": "", "reason": None}
        ids: list[int] = []

        def on_token(tok: int) -> bool:
            ids.append(tok)
            if cancel is not None and cancel.is_set():
                state["reason"] = "cancelled"
                return True
            full = self.tokenizer.decode(ids, skip_special_tokens=True)
            hit = min((i for i in (full.find(s) for s in stops) if i >= 0), default=-1)
            if hit >= 0:
                full, state["reason"] = full[:hit], "stop"
            elif full.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                return False
            else:  # hold back a tail that may become a stop string
                hold = max((k for s in stops for k in range(1, len(s)) if full.endswith(s[:k])), default=0)
                full = full[:len(full) - hold]
            if len(full) > len(state["emitted"]) and full.startswith(state["emitted"]):
                piece = full[len(state["emitted"]):]
                state["emitted"] = full
                if on_text is not None:
                    on_text(piece)
            return state["reason"] is not None

        timings: dict[str, float] = {}
        self.generate_ids(p, max_tokens, sampling, on_token=on_token, timings=timings)
        reason = state["reason"]
        if reason is None:
            reason = "stop" if ids and ids[-1] in self.eos_ids else "length"
            final = self.tokenizer.decode(ids, skip_special_tokens=True)
            if final.startswith(state["emitted"]) and len(final) > len(state["emitted"]):
                if on_text is not None:
                    on_text(final[len(state["emitted"]):])
                state["emitted"] = final
        timings.update(encode_ms=1e3 * (t_enc - t0), ttft_ms=1e3 * (t_enc - t0) + timings["prefill_ms"])
        return Generation(state["emitted"], ids, int(p.input_ids.size), reason, timings)
