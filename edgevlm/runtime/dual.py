"""CLIP / SigLIP dual encoders on the edgevlm runtime (numpy + the C++ kernels; never torch).

    from edgevlm.runtime import load_dual, set_num_threads
    model = load_dual("clip-vit-b16.evlm")        # mmap; quantized weights are never dequantized whole
    img = model.encode_image(["cat.jpg", pil_image, uint8_array])   # [B, E] float32, L2-normalised
    txt = model.encode_text(["a photo of a cat", "a photo of a dog"])  # [T, E], L2-normalised
    logits = model.logits(img, txt)                 # [B, T]
    probs = model.classify(images, ["cat", "dog"])  # [B, L]

What runs is exactly the transformers forward pass of ``CLIPModel`` / ``SiglipModel``:

vision   patches (conv as a matmul) [+ CLIP class token] + positions [-> CLIP pre-LN] ->
         pre-LN blocks (x += attn(LN1 x); x += fc2(act(fc1(LN2 x)))) ->
         CLIP: post-LN of the class token, ``visual_projection``;
         SigLIP: post-LN of all tokens, multi-head attention pooling head (probe query, LN, MLP).
text     token rows (dequantized per lookup) + positions -> blocks (CLIP causal + padding mask;
         SigLIP bidirectional) -> final LN -> pooled token -> CLIP ``text_projection`` /
         SigLIP ``head`` (with bias).  CLIP pools the first ``eos_token_id`` of each row (or, when
         the config's ``eos_token_id`` is 2, the legacy ``argmax(input_ids)``); SigLIP pools the
         last position, texts padded to ``max_length`` and run without an attention mask, as
         google/siglip is used.
logits   CLIP ``exp(logit_scale) * cos``; SigLIP ``exp(logit_scale) * cos + logit_bias``.

Thread count: :func:`edgevlm.runtime.set_num_threads` (the quantized-linear kernels); dense
matmuls use numpy's BLAS and its own thread settings.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import format as fmt
from .layers import Embedding, Linear, activate_, get_activation, sigmoid, softmax, vector
from .layers import attention_fast as attention
from .layers import layer_norm_fast as layer_norm
from .preprocess import ImagePreprocessor, _is_single
from .tokenizer import Tokenizer

__all__ = ["DualEncoder", "load_dual"]

F32 = np.float32
SUPPORTED = {"CLIPModel": "clip", "SiglipModel": "siglip"}

# transformers' config defaults for keys a config.json may omit
_DEFAULTS = {
    ("clip", "vision"): {"num_attention_heads": 12, "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu",
                         "image_size": 224, "patch_size": 32},
    ("clip", "text"): {"num_attention_heads": 8, "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu",
                       "max_position_embeddings": 77, "eos_token_id": 49407},
    ("siglip", "vision"): {"num_attention_heads": 12, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh",
                           "image_size": 224, "patch_size": 16, "vision_use_head": True},
    ("siglip", "text"): {"num_attention_heads": 12, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh",
                         "max_position_embeddings": 64},
}


def _file_name(f: Any) -> str:
    return str(getattr(f, "path", "file"))


def _need(f: Any, key: str) -> None:
    if key not in f.records:
        raise ValueError(f"{_file_name(f)}: tensor {key!r} is missing; this file is not a complete CLIP/SigLIP "
                         "export. Re-export the model with `edgevlm export`.")


def _l2(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation of [B, E] (a zero row stays zero)."""
    n = np.sqrt(np.sum(x.astype(np.float64) ** 2, axis=-1, keepdims=True)).astype(F32)
    return x / np.maximum(n, F32(1e-30))


@dataclass
class _Block:
    """One pre-LN transformer encoder layer (CLIP / SigLIP encoder layer)."""

    n1w: np.ndarray
    n1b: np.ndarray
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    n2w: np.ndarray
    n2b: np.ndarray
    fc1: Linear
    fc2: Linear
    heads: int
    eps: float
    act: Any

    @classmethod
    def from_file(cls, f: Any, p: str, heads: int, eps: float, act: Any, isa: str | None = None) -> _Block:
        return cls(vector(f, f"{p}.norm1.weight"), vector(f, f"{p}.norm1.bias"),
                   *(Linear.from_file(f, f"{p}.attn.{x}", isa=isa) for x in "qkvo"),
                   vector(f, f"{p}.norm2.weight"), vector(f, f"{p}.norm2.bias"),
                   Linear.from_file(f, f"{p}.mlp.fc1", isa=isa), Linear.from_file(f, f"{p}.mlp.fc2", isa=isa),
                   heads, eps, act)

    def __call__(self, x: np.ndarray, *, causal: bool = False, key_mask: np.ndarray | None = None,
                 keep: np.ndarray | None = None) -> np.ndarray:
        """x [B, T, D] -> [B, T, D]; with ``keep`` (int [B]) only that row of each sequence is
        computed past the keys/values (the last layer when only a pooled token is needed): [B, 1, D]."""
        h = layer_norm(x, self.n1w, self.n1b, self.eps)                  # [B, T, D]
        k, v = self.k(h), self.v(h)                                      # [B, T, D]
        q_pos = None
        if keep is not None:
            rows = np.arange(x.shape[0])
            h, x = h[rows, keep][:, None], x[rows, keep][:, None]        # [B, 1, D]
            q_pos = np.asarray(keep)[:, None]
        a = attention(self.q(h), k, v, self.heads, causal=causal, key_mask=key_mask, q_pos=q_pos)
        x = x + self.o(a)
        return x + self.fc2(activate_(self.act, self.fc1(layer_norm(x, self.n2w, self.n2b, self.eps))))


def _blocks(f: Any, prefix: str, heads: int, eps: float, act: Any, isa: str | None) -> list[_Block]:
    n = 0
    while f"{prefix}.{n}.norm1.weight" in f.records:
        n += 1
    if n == 0:
        raise ValueError(f"{_file_name(f)}: no {prefix}.* tensors; not a complete CLIP/SigLIP export")
    return [_Block.from_file(f, f"{prefix}.{i}", heads, eps, act, isa) for i in range(n)]


class VisionTower:
    """pixel_values float32 [B, C, H, W] -> image features [B, E] (before L2 normalisation)."""

    def __init__(self, f: Any, family: str, cfg: dict, isa: str | None = None) -> None:
        c = {**_DEFAULTS[(family, "vision")], **{k: v for k, v in cfg.items() if v is not None}}
        self.family = family
        _need(f, "vision.embed.patch.weight")
        w = vector(f, "vision.embed.patch.weight")                      # [D, C, P, P]
        self.dim, self.channels, self.patch, _ = w.shape
        self.patch_wt = np.ascontiguousarray(w.reshape(self.dim, -1).T)  # [C*P*P, D]
        self.patch_b = vector(f, "vision.embed.patch.bias") if "vision.embed.patch.bias" in f.records else None
        self.pos = vector(f, "vision.embed.pos")                        # [T, D]
        self.cls = vector(f, "vision.embed.class") if family == "clip" else None  # [D]
        self.image_size = int(c["image_size"])
        self.grid = self.image_size // self.patch
        n_tokens = self.grid * self.grid + (1 if self.cls is not None else 0)
        if self.pos.shape[0] != n_tokens:
            raise ValueError(f"{_file_name(f)}: vision.embed.pos has {self.pos.shape[0]} rows, but image_size "
                             f"{self.image_size} / patch {self.patch} gives {n_tokens} tokens")
        self.eps = float(c["layer_norm_eps"])
        self.heads = int(c["num_attention_heads"])
        act = get_activation(c["hidden_act"])
        if family == "clip":
            self.pre = (vector(f, "vision.pre_norm.weight"), vector(f, "vision.pre_norm.bias"))
        self.blocks = _blocks(f, "vision.blocks", self.heads, self.eps, act, isa)
        self.post = (vector(f, "vision.post_norm.weight"), vector(f, "vision.post_norm.bias"))
        if family == "clip":
            _need(f, "vision.proj.weight")
            self.proj = Linear.from_file(f, "vision.proj", bias=False)
        else:
            if not c.get("vision_use_head", True) or "vision.head.probe" not in f.records:
                raise ValueError(f"{_file_name(f)}: this SigLIP vision tower has no pooling head "
                                 "(vision_use_head=false), so it has no image embedding")
            self.probe = vector(f, "vision.head.probe").reshape(1, 1, self.dim)   # [1, 1, D]
            inw = vector(f, "vision.head.attn.in_proj.weight")                   # [3D, D]
            inb = vector(f, "vision.head.attn.in_proj.bias")                     # [3D]
            d = self.dim
            self.head_q = Linear(weight=inw[:d], bias=inb[:d])
            self.head_kv = Linear(weight=inw[d:], bias=inb[d:])                  # k and v in one GEMM
            self.head_out = Linear.from_file(f, "vision.head.attn.out_proj")
            self.head_norm = (vector(f, "vision.head.norm.weight"), vector(f, "vision.head.norm.bias"))
            self.head_fc1 = Linear.from_file(f, "vision.head.mlp.fc1")
            self.head_fc2 = Linear.from_file(f, "vision.head.mlp.fc2")
            self.act = act
            self.head_q_probe = self.head_q(self.probe)                          # [1, 1, D], input-independent
        self.out_dim = self.proj.n if family == "clip" else self.dim

    def patchify(self, px: np.ndarray) -> np.ndarray:
        """[B, C, H, W] -> [B, gh*gw, C*P*P] in the conv's (C, P, P) weight order, row-major patches."""
        b, c, h, w = px.shape
        p = self.patch
        x = px.reshape(b, c, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def __call__(self, pixel_values: np.ndarray) -> np.ndarray:
        px = np.asarray(pixel_values, dtype=F32)
        if px.ndim == 3:
            px = px[None]
        want = (self.channels, self.image_size, self.image_size)
        if px.ndim != 4 or px.shape[1:] != want:
            raise ValueError(f"pixel_values must be [B, {want[0]}, {want[1]}, {want[2]}] float32, got {px.shape}")
        x = self.patchify(px) @ self.patch_wt                           # [B, N, D]
        if self.patch_b is not None:
            x += self.patch_b
        if self.cls is not None:
            cls = np.broadcast_to(self.cls, (x.shape[0], 1, self.dim))
            x = np.concatenate([cls, x], axis=1)                         # [B, 1+N, D]
        x = x + self.pos
        if self.family == "clip":
            x = layer_norm(x, *self.pre, self.eps)
            last = len(self.blocks) - 1
            for i, blk in enumerate(self.blocks):
                # only the class token leaves the tower: the last layer computes just that row
                x = blk(x, keep=np.zeros(x.shape[0], dtype=np.int64) if i == last else None)
            pooled = layer_norm(x[:, 0], *self.post, self.eps)           # [B, D]
            return self.proj(pooled)                                     # [B, E]
        for blk in self.blocks:
            x = blk(x)
        x = layer_norm(x, *self.post, self.eps)                          # [B, N, D]
        return self._map_head(x)

    def _map_head(self, x: np.ndarray) -> np.ndarray:
        """SigLIP multi-head attention pooling: [B, N, D] -> [B, D]."""
        b, d = x.shape[0], self.dim
        kv = self.head_kv(x)                                             # [B, N, 2D]
        q = np.broadcast_to(self.head_q_probe, (b, 1, d))
        a = attention(q, kv[..., :d], kv[..., d:], self.heads)           # [B, 1, D]
        h = self.head_out(a)
        h = h + self.head_fc2(self.act(self.head_fc1(layer_norm(h, *self.head_norm, self.eps))))
        return h[:, 0]


class TextTower:
    """input_ids int [B, T] (+ attention_mask) -> text features [B, E] (before L2 normalisation)."""

    def __init__(self, f: Any, family: str, cfg: dict, isa: str | None = None) -> None:
        c = {**_DEFAULTS[(family, "text")], **{k: v for k, v in cfg.items() if v is not None}}
        self.family = family
        _need(f, "text.embed.tok")
        self.tok = Embedding.from_file(f, "text.embed.tok")              # [V, D] rows on demand
        self.pos = vector(f, "text.embed.pos")                           # [Tmax, D]
        self.max_positions = self.pos.shape[0]
        self.eps = float(c["layer_norm_eps"])
        self.heads = int(c["num_attention_heads"])
        self.eos_token_id = c.get("eos_token_id")
        self.blocks = _blocks(f, "text.blocks", self.heads, self.eps, get_activation(c["hidden_act"]), isa)
        self.final = (vector(f, "text.final_norm.weight"), vector(f, "text.final_norm.bias"))
        if family == "clip":
            _need(f, "text.proj.weight")
            self.proj = Linear.from_file(f, "text.proj", bias=False)
        else:
            _need(f, "text.head.weight")
            self.proj = Linear.from_file(f, "text.head")
        self.out_dim = self.proj.n

    def pool_index(self, ids: np.ndarray) -> np.ndarray:
        """Which position of each row is pooled: int64 [B]."""
        if self.family == "siglip":
            return np.full(ids.shape[0], ids.shape[1] - 1, dtype=np.int64)
        if self.eos_token_id == 2:  # configs from before transformers PR #24773: eot is the largest id
            return ids.argmax(-1).astype(np.int64)
        return (ids == self.eos_token_id).astype(np.int32).argmax(-1).astype(np.int64)  # first eos (0 if none)

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.dtype.kind not in "iu":
            raise ValueError(f"input_ids must be an integer array [B, T], got {ids.dtype} {ids.shape}")
        b, t = ids.shape
        if t > self.max_positions:
            raise ValueError(f"sequence length {t} exceeds max_position_embeddings {self.max_positions}")
        mask = None
        if attention_mask is not None:
            mask = np.asarray(attention_mask).reshape(b, t)
            if mask.all():
                mask = None
        x = self.tok(ids) + self.pos[:t]                                 # [B, T, D]
        causal = self.family == "clip"
        keep = self.pool_index(ids)
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            x = blk(x, causal=causal, key_mask=mask, keep=keep if i == last else None)
        pooled = layer_norm(x[:, 0], *self.final, self.eps)              # [B, D] (the kept row)
        return self.proj(pooled)                                         # [B, E]


class DualEncoder:
    """A CLIP or SigLIP ``.evlm`` export: image and text towers, preprocessing, tokenizer."""

    def __init__(self, f: Any, *, isa: str | None = None) -> None:
        meta = f.metadata or {}
        arch, family = meta.get("architecture"), meta.get("family")
        if arch not in SUPPORTED or family != SUPPORTED[arch]:
            raise ValueError(f"{_file_name(f)} is not a CLIP/SigLIP export (architecture {arch!r}, family "
                             f"{family!r}); DualEncoder loads CLIPModel and SiglipModel exports only")
        self.file = f
        self.family: str = family
        self.architecture: str = arch
        self.config: dict = meta.get("config") or {}
        vcfg = self.config.get("vision_config") or {}
        tcfg = self.config.get("text_config") or {}
        self.isa = isa
        self.vision = VisionTower(f, family, vcfg, isa)
        self.text = TextTower(f, family, tcfg, isa)
        if self.vision.out_dim != self.text.out_dim:
            raise ValueError(f"{_file_name(f)}: image embeddings have {self.vision.out_dim} dims but text "
                             f"embeddings {self.text.out_dim}")
        self.embed_dim = self.vision.out_dim
        _need(f, "logit_scale")
        self.logit_scale = float(vector(f, "logit_scale").reshape(-1)[0])
        self.logit_bias = float(vector(f, "logit_bias").reshape(-1)[0]) if family == "siglip" else 0.0
        self._pre: ImagePreprocessor | None = None
        self._tok: Tokenizer | None = None

    @classmethod
    def load(cls, path: str | os.PathLike, *, verify: bool = False, threads: int | None = None,
             isa: str | None = None, device: str = "cpu") -> DualEncoder:
        """mmap ``path`` and build both towers (quantized weights stay in the mapping).

        ``verify`` checks every tensor's checksum first (reads the whole file); ``threads`` sets
        the kernel thread count (edgevlm.runtime.set_num_threads, process-wide); ``isa`` picks the
        quantized-linear kernels (None: the fastest for this CPU, whose SIMD paths quantize
        activations to int8 per group; "ref": the portable reference with exact fp32
        activations, slower; see edgevlm.runtime.kernel_info()); ``device="cuda"`` runs the packed
        linears on the GPU instead (runtime/cuda_linear.py)."""
        from .blas import limit_numpy_blas
        from .cuda_linear import kernel_target

        isa = kernel_target(device, isa)
        limit_numpy_blas()  # numpy's BLAS threads would spin on the kernels' cores
        if threads is not None:
            from . import set_num_threads

            set_num_threads(threads)
        f = fmt.open(path, verify=verify)
        try:
            return cls(f, isa=isa)
        except BaseException:
            f.close()
            raise

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> DualEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<DualEncoder {self.architecture} {_file_name(self.file)!r}: embed {self.embed_dim}, "
                f"image {self.vision.image_size}px, {len(self.vision.blocks)}+{len(self.text.blocks)} blocks>")

    # -- inputs -----------------------------------------------------------------------------------
    @property
    def preprocessor(self) -> ImagePreprocessor:
        if self._pre is None:
            cfg = self.file.metadata.get("preprocess")
            if not cfg:
                raise ValueError(f"{_file_name(self.file)}: no preprocessor_config in this export; preprocess "
                                 "images yourself and call encode_pixels(pixel_values)")
            self._pre = ImagePreprocessor(cfg, self.family)
        return self._pre

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tok is None:
            self._tok = Tokenizer.from_evlm(self.file)
        return self._tok

    @property
    def context_length(self) -> int:
        """Longest token sequence: min(tokenizer model_max_length, max_position_embeddings)."""
        mml = self.tokenizer.model_max_length
        return min(mml, self.text.max_positions) if mml else self.text.max_positions

    def preprocess(self, images: Any) -> np.ndarray:
        """Images -> pixel_values float32 [B, 3, H, W] (the HF image processor's output)."""
        return self.preprocessor(images)

    def tokenize(self, texts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> (input_ids, attention_mask) int64 [B, T] as the model expects them:
        CLIP pads to the longest text, SigLIP to the context length."""
        padding = "max_length" if self.family == "siglip" else "longest"
        return self.tokenizer.encode(texts, max_length=self.context_length, padding=padding, truncation=True)

    # -- embeddings ---------------------------------------------------------------------------------
    def encode_pixels(self, pixel_values: np.ndarray, *, normalize: bool = True, batch_size: int = 16) -> np.ndarray:
        """pixel_values float32 [B, 3, H, W] (already preprocessed) -> [B, E]."""
        px = np.asarray(pixel_values, dtype=F32)
        if px.ndim == 3:
            px = px[None]
        out = np.concatenate([self.vision(px[i:i + batch_size]) for i in range(0, len(px), max(1, batch_size))])
        return _l2(out) if normalize else out

    def encode_image(self, images: Any, *, normalize: bool = True, batch_size: int = 16) -> np.ndarray:
        """Images (one or a list of PIL images, uint8 [H, W, 3] arrays, paths) -> float32 [B, E],
        L2-normalised unless ``normalize=False``.  A float array [B, 3, H, W] is taken as
        pixel_values already preprocessed."""
        if isinstance(images, np.ndarray) and images.dtype.kind == "f":
            return self.encode_pixels(images, normalize=normalize, batch_size=batch_size)
        batch = [images] if _is_single(images) else list(images)
        outs = [self.encode_pixels(self.preprocess(batch[i:i + batch_size]), normalize=normalize,
                                   batch_size=batch_size) for i in range(0, len(batch), max(1, batch_size))]
        if not outs:
            raise ValueError("no images given")
        return np.concatenate(outs)

    def encode_tokens(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, *,
                      normalize: bool = True) -> np.ndarray:
        """Token ids int [B, T] (+ mask; SigLIP models are normally run without one) -> [B, E]."""
        out = self.text(input_ids, attention_mask)
        return _l2(out) if normalize else out

    def encode_text(self, texts: str | Sequence[str], *, normalize: bool = True, batch_size: int = 64) -> np.ndarray:
        """Texts -> float32 [B, E], L2-normalised unless ``normalize=False``."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("no texts given")
        outs = []
        for i in range(0, len(texts), max(1, batch_size)):
            ids, mask = self.tokenize(texts[i:i + batch_size])
            # SigLIP: no attention mask (pads are attended to, as in training and google/siglip usage)
            outs.append(self.encode_tokens(ids, mask if self.family == "clip" else None, normalize=normalize))
        return np.concatenate(outs)

    # -- scores -------------------------------------------------------------------------------------
    def logits(self, image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
        """[Bi, E] x [Bt, E] (L2-normalised) -> logits_per_image [Bi, Bt]:
        CLIP exp(logit_scale) * cos, SigLIP exp(logit_scale) * cos + logit_bias."""
        a = np.atleast_2d(np.asarray(image_emb, dtype=F32))
        b = np.atleast_2d(np.asarray(text_emb, dtype=F32))
        if a.shape[-1] != self.embed_dim or b.shape[-1] != self.embed_dim:
            raise ValueError(f"embeddings must be [*, {self.embed_dim}], got {a.shape} and {b.shape}")
        return (a @ b.T) * F32(np.exp(self.logit_scale)) + F32(self.logit_bias)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """CLIP: softmax over the texts (labels compete; rows sum to 1).  SigLIP: element-wise
        sigmoid (each label is an independent yes/no, the SigLIP training objective; rows need not
        sum to 1)."""
        return softmax(logits, axis=-1) if self.family == "clip" else sigmoid(logits)

    def classify(self, images: Any, labels: Sequence[str], prompt: str = "a photo of a {}") -> np.ndarray:
        """Zero-shot classification: float32 [B, L] probabilities of each label for each image
        (see :meth:`probabilities`: softmax for CLIP, sigmoid for SigLIP)."""
        labels = [labels] if isinstance(labels, str) else list(labels)
        if not labels:
            raise ValueError("no labels given")
        texts = [prompt.format(lbl) if "{}" in prompt else f"{prompt} {lbl}" for lbl in labels]
        return self.probabilities(self.logits(self.encode_image(images), self.encode_text(texts)))


def load_dual(path: str | os.PathLike, **kwargs: Any) -> DualEncoder:
    """:meth:`DualEncoder.load`."""
    return DualEncoder.load(path, **kwargs)
