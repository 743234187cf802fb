"""Idefics3 / SmolVLM vision side on the edgevlm runtime (numpy + the C++ kernels; never torch).

What runs is transformers' ``Idefics3Model.get_image_features`` / ``SmolVLMModel.get_image_features``
plus the processor's prompt expansion:

preprocess  :mod:`.idefics3_preprocess` (tiles of ``max_image_size`` + a global image per image).
vision      patch conv (as a matmul) + a position embedding looked up by *bucketed* fractional
            coordinates: a frame whose real (unpadded) part is ``nh x nw`` patches maps patch
            (i, j) to bucket(i / nh) * S + bucket(j / nw) on the tower's S x S position grid
            (S = image_size / patch_size), with transformers' float32 arithmetic and its
            ``torch.arange`` boundaries reproduced bit for bit (:func:`torch_arange_f32`); padded
            patches get position 0 and are masked as attention keys -> SigLIP encoder layers
            (pre-LN, biases) -> post LayerNorm.
connector   pixel shuffle (``Idefics3Connector.pixel_shuffle``: [F, S*S, D] ->
            [F, S*S / s^2, D * s^2], s = scale_factor) -> one bias-free linear to the text width.
prompt      each ``<image>`` of the chat-formatted text becomes, for a split image of R x C tiles,
            ``<fake_token_around_image><row_r_col_c>`` + ``<image>`` * image_seq_len per tile, a
            ``\\n`` after each row, then ``\\n<fake_token_around_image><global-img>`` + ``<image>`` *
            image_seq_len + ``<fake_token_around_image>``; an unsplit image only has the global part.
            The text is then tokenized with the tokenizer's special tokens (as the processor does).

The image features of a prompt are every frame's image_seq_len rows, frame after frame, image
after image: the order of the ``<image>`` tokens in the expanded prompt.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .dual import _Block
from .idefics3_preprocess import Idefics3ImagePreprocessor, Idefics3Images
from .layers import ENCODER_ROWS, Linear, encoder_layer_, get_activation, layer_norm_fast, raw_tensor, to_f32, vector
from .vlm_base import Prepared

__all__ = ["Idefics3Vision", "bucket_position_ids", "image_prompt_string", "pixel_shuffle", "torch_arange_f32"]

F32 = np.float32
IMAGE_TOKEN = "<image>"
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"

# Idefics3VisionConfig / SmolVLMVisionConfig defaults for keys a config.json may omit
_VISION_DEFAULTS = {"hidden_size": 1152, "num_attention_heads": 16, "image_size": 224, "patch_size": 32,
                    "num_channels": 3, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}


# ------------------------------------------------------------------------------------ prompt

def image_prompt_string(rows: int, cols: int, image_seq_len: int, *, image_token: str = IMAGE_TOKEN,
                        fake_token: str = FAKE_TOKEN, global_token: str = GLOBAL_TOKEN) -> str:
    """The text one image becomes (transformers' ``Idefics3Processor.replace_image_token`` /
    SmolVLM's ``get_image_prompt_string``); rows = cols = 0 for an image that was not split."""
    glob = f"{fake_token}{global_token}" + image_token * image_seq_len + fake_token
    if rows == 0 and cols == 0:
        return glob
    out = ""
    for r in range(rows):
        for c in range(cols):
            out += f"{fake_token}<row_{r + 1}_col_{c + 1}>" + image_token * image_seq_len
        out += "\n"
    return out + "\n" + glob


# --------------------------------------------------------------------------------- positions

def torch_arange_f32(start: float, end: float, step: float) -> np.ndarray:
    """``torch.arange(start, end, step)`` in float32 on CPU, bit for bit.

    torch computes the length as ceil((end - start) / step) in double; the values in double
    (``start + step * i``) cast to float32, except that its vectorised CPU kernel fills runs of
    2 x 8 elements as ``float32(float32(start + step * i0) + j * step)`` (base rounded to float32
    first), leaving only the tail to the scalar formula.  The rounding differs from the plain
    formula for some lengths (e.g. 1/19), and bucketization depends on it.  Measured identical to
    torch 2.x for every 1/n, n < 3000, on the AVX2, AVX512 and default CPU kernels."""
    n = max(0, math.ceil((end - start) / step))
    out = np.empty(n, dtype=np.float64)
    vec = 8
    full = n // (2 * vec) * (2 * vec)
    for i0 in range(0, full, vec):
        base = float(F32(start + step * i0))
        out[i0:i0 + vec] = base + np.arange(vec) * step
    tail = np.arange(full, n)
    out[full:] = start + step * tail
    return out.astype(F32)


def bucket_position_ids(patch_mask: np.ndarray, side: int) -> np.ndarray:
    """Position ids of Idefics3VisionEmbeddings: patch_mask bool [F, h, w] (True = real patch) ->
    int64 [F, h*w] indices into the S x S position table (S = ``side``); padded patches get 0.

    Real patches at (i, j) of a frame whose real part is nh x nw patches get
    bucket(i * (1/nh)) * S + bucket(j * (1/nw)), all in float32 as transformers computes it
    (coordinates clamped to 1 - 1e-6, ``bucketize(right=True)`` = searchsorted side="right")."""
    pm = np.asarray(patch_mask, dtype=bool)
    f, h, w = pm.shape
    bounds = torch_arange_f32(1 / side, 1.0, 1 / side)                  # [S - 1 (+1)] f32
    nh = pm[:, :, 0].sum(1).astype(F32)                                 # [F] real rows (first column)
    nw = pm[:, 0, :].sum(1).astype(F32)                                 # [F] real columns (first row)
    with np.errstate(divide="ignore"):
        step_h, step_w = F32(1.0) / nh, F32(1.0) / nw                   # inf for an all-padding frame
    lim = F32(1.0 - 1e-6)
    with np.errstate(invalid="ignore"):
        ch = np.minimum(np.arange(h, dtype=F32)[None, :] * step_h[:, None], lim)  # [F, h]
        cw = np.minimum(np.arange(w, dtype=F32)[None, :] * step_w[:, None], lim)  # [F, w]
    bh = np.searchsorted(bounds, np.nan_to_num(ch, nan=lim), side="right")       # [F, h]
    bw = np.searchsorted(bounds, np.nan_to_num(cw, nan=lim), side="right")       # [F, w]
    ids = (bh[:, :, None] * side + bw[:, None, :]).reshape(f, h * w).astype(np.int64)
    return np.where(pm.reshape(f, h * w), ids, 0)


def _raw(f: Any, key: str) -> tuple[np.ndarray, str]:
    """(the file's view of raw float tensor ``key``, its qtype) for :func:`.layers.to_f32` at use."""
    view, qtype = raw_tensor(f, key)
    if qtype not in ("f32", "f16", "bf16"):   # checked at load, not at the first encode
        raise ValueError(f"{key}: expected a raw float tensor (f32/f16/bf16), found qtype {qtype}")
    return view, qtype


def pixel_shuffle(x: np.ndarray, scale: int) -> np.ndarray:
    """``Idefics3Connector.pixel_shuffle``: [F, S*S, D] -> [F, S*S / scale^2, D * scale^2]."""
    b, seq, d = x.shape
    side = int(seq ** 0.5)
    if side * side != seq or side % scale:
        raise ValueError(f"pixel shuffle needs a square patch grid divisible by scale_factor {scale}; got {seq} "
                         "patches (is the tile size max_image_size a multiple of patch_size * scale_factor?)")
    x = x.reshape(b, side, side // scale, d * scale)        # [F, H, W/s, D*s]
    x = x.transpose(0, 2, 1, 3)                             # [F, W/s, H, D*s]
    x = x.reshape(b, side // scale, side // scale, d * scale * scale)
    x = x.transpose(0, 2, 1, 3)                             # [F, H/s, W/s, D*s^2]
    return np.ascontiguousarray(x).reshape(b, seq // (scale * scale), d * scale * scale)


# ------------------------------------------------------------------------------------ vision

class Idefics3Vision:
    """The vision side of an Idefics3 / SmolVLM ``.evlm`` export (see the module docstring).

    ``cls(f, config, isa)``: ``f`` an open EvlmFile, ``config`` the config.json dict, ``isa`` the
    quantized-linear kernel choice (None: fastest for this CPU; "ref": exact fp32 activations).
    ``batch_frames`` frames go through the tower at once: one frame's attention scores are
    heads x patches^2 float32 (SmolVLM-256M: 12 x 1024^2 = 50 MB), so the default is 1.
    ``rows``: MLP rows per block in each layer (:func:`.layers.encoder_layer_`)."""

    image_placeholder = IMAGE_TOKEN

    def __init__(self, f: Any, config: dict, isa: str | None = None, *, batch_frames: int = 1,
                 rows: int = ENCODER_ROWS) -> None:
        meta = getattr(f, "metadata", None) or {}
        self.file, self.isa, self.batch_frames = f, isa, max(1, int(batch_frames))
        if int(rows) < 1:
            raise ValueError(f"rows (MLP rows per encoder block) must be >= 1, got {rows}")
        self.rows = int(rows)
        vc = {**_VISION_DEFAULTS, **{k: v for k, v in (config.get("vision_config") or {}).items() if v is not None}}
        self.patch = int(vc["patch_size"])
        self.side = int(vc["image_size"]) // self.patch         # S: the position grid is S x S
        self.scale = int(config.get("scale_factor", 2))
        self.heads = int(vc["num_attention_heads"])
        self.eps = float(vc["layer_norm_eps"])
        # The patch-conv weight and the position table stay file views (f16/bf16/f32), cast per
        # encode: float32 copies would be anonymous memory (SmolVLM-256M: 5 MiB) held through
        # the language model's phase, where Runtime.release_vision drops only file pages.
        self._patch_raw = _raw(f, "vision.embed.patch.weight")  # [D, C, P, P]
        self.dim, self.channels = int(self._patch_raw[0].shape[0]), int(self._patch_raw[0].shape[1])
        self.patch_b = vector(f, "vision.embed.patch.bias")     # [D]
        self._pos_raw = _raw(f, "vision.embed.pos")             # [S*S, D]
        if self._pos_raw[0].shape[0] != self.side * self.side:
            raise ValueError(f"vision.embed.pos has {self._pos_raw[0].shape[0]} rows but vision_config image_size / "
                             f"patch_size gives a {self.side} x {self.side} grid; config and weights disagree")
        act = get_activation(vc["hidden_act"])
        self.blocks = []
        while f"vision.blocks.{len(self.blocks)}.norm1.weight" in f.records:
            self.blocks.append(_Block.from_file(f, f"vision.blocks.{len(self.blocks)}", self.heads, self.eps, act, isa))
        if not self.blocks:
            raise ValueError(f"{getattr(f, 'path', 'file')}: no vision.blocks.* tensors; not an Idefics3/SmolVLM "
                             "export")
        self.post = (vector(f, "vision.post_norm.weight"), vector(f, "vision.post_norm.bias"))
        self.proj = Linear.from_file(f, "projector.proj", bias=False, isa=isa)  # [D_text, D * s^2]
        if self.proj.k != self.dim * self.scale ** 2:
            raise ValueError(f"projector.proj takes {self.proj.k} features but vision width {self.dim} x "
                             f"scale_factor^2 = {self.dim * self.scale ** 2}")
        pcfg = (meta.get("extra") or {}).get("processor_config") or {}
        default_len = self.side ** 2 // self.scale ** 2
        self.image_seq_len = int(pcfg.get("image_seq_len", default_len))
        if self.image_seq_len != default_len:
            raise ValueError(f"processor_config image_seq_len {self.image_seq_len} does not match the vision tower "
                             f"((image_size / patch_size)^2 / scale_factor^2 = {default_len})")
        self.image_token_id = int(config.get("image_token_id", config.get("image_token_index", -1)))
        if self.image_token_id < 0:
            raise ValueError("config.json has no image_token_id")
        self.preprocessor = Idefics3ImagePreprocessor(meta.get("preprocess"))
        tile = self.preprocessor.tile
        if tile % (self.patch * self.scale) or (tile // self.patch) ** 2 // self.scale ** 2 != self.image_seq_len:
            raise ValueError(f"the processor's max_image_size {tile} px tiles make {tile // self.patch} x "
                             f"{tile // self.patch} patches, which scale_factor {self.scale} does not turn into "
                             f"image_seq_len {self.image_seq_len} tokens; preprocessor_config.json and config.json "
                             "disagree")

    # -- features ---------------------------------------------------------------------------------
    def patch_mask(self, pixel_attention_mask: np.ndarray) -> np.ndarray:
        """int/bool [F, H, W] pixel mask -> bool [F, H/P, W/P]: a patch is real if any pixel is."""
        m = np.asarray(pixel_attention_mask)
        f, h, w = m.shape
        gh, gw, p = h // self.patch, w // self.patch, self.patch
        m = m[:, :gh * p, :gw * p].reshape(f, gh, p, gw, p)
        return m.sum(axis=(2, 4)) > 0

    def encode(self, pixel_values: np.ndarray, pixel_attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Frames float32 [F, C, H, W] (+ int mask [F, H, W]) -> image features float32
        [F, image_seq_len, D_text] (``get_image_features``' pooler output, per frame)."""
        px = np.asarray(pixel_values, dtype=F32)
        if px.ndim != 4 or px.shape[1] != self.channels:
            raise ValueError(f"pixel_values must be [F, {self.channels}, H, W] float32, got {px.shape}")
        f, _, h, w = px.shape
        pam = np.ones((f, h, w), dtype=bool) if pixel_attention_mask is None else np.asarray(pixel_attention_mask)
        if pam.shape != (f, h, w):
            raise ValueError(f"pixel_attention_mask must be [F, H, W] = {[f, h, w]}, got {list(pam.shape)}")
        out = [self._encode(px[i:i + self.batch_frames], pam[i:i + self.batch_frames])
               for i in range(0, f, self.batch_frames)]
        return np.concatenate(out) if out else np.zeros((0, self.image_seq_len, self.proj.n), F32)

    def _encode(self, px: np.ndarray, pam: np.ndarray) -> np.ndarray:
        b, c, h, w = px.shape
        p = self.patch
        gh, gw = h // p, w // p
        x = px[:, :, :gh * p, :gw * p].reshape(b, c, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5)
        wt = np.ascontiguousarray(to_f32(*self._patch_raw).reshape(self.dim, -1).T)  # [C*P*P, D]
        x = x.reshape(b, gh * gw, c * p * p) @ wt               # [B, N, D] (conv, valid padding)
        del wt
        x += self.patch_b
        pm = self.patch_mask(pam)                               # [B, gh, gw]
        pos, qtype = self._pos_raw
        x += to_f32(pos[bucket_position_ids(pm, self.side)], qtype)  # [B, N, D]: rows gathered, then cast
        key_mask = None if pm.all() else pm.reshape(b, gh * gw)
        for blk in self.blocks:  # in place; a layer's temporaries peak at ~4 x [B, N, D]
            encoder_layer_(blk, x, key_mask=key_mask, rows=self.rows)
        x = layer_norm_fast(x, *self.post, self.eps)
        return self.proj(pixel_shuffle(x, self.scale))          # [B, N / s^2, D_text]

    def preprocess(self, images: Any) -> Idefics3Images:
        return self.preprocessor(images)

    # -- the VisionFamily contract ----------------------------------------------------------------
    def expand(self, text: str, images: Idefics3Images) -> str:
        """The prompt with each ``<image>`` replaced by its tiles' tokens (the processor's text)."""
        parts = text.split(IMAGE_TOKEN)
        if len(parts) - 1 != len(images.rows):
            raise ValueError(f"the prompt has {len(parts) - 1} {IMAGE_TOKEN} placeholder(s) but "
                             f"{len(images.rows)} image(s) were given; put one {IMAGE_TOKEN} per image")
        out = [parts[0]]
        for r, c, rest in zip(images.rows, images.cols, parts[1:]):
            out += [image_prompt_string(r, c, self.image_seq_len), rest]
        return "".join(out)

    def prepare(self, text: str, images: list[Any], tokenizer: Any) -> Prepared:
        """Chat-formatted ``text`` with one ``<image>`` per image -> token ids and image features."""
        images = list(images or [])
        n_ph = text.count(IMAGE_TOKEN)
        if n_ph != len(images):
            raise ValueError(f"the prompt has {n_ph} {IMAGE_TOKEN} placeholder(s) but {len(images)} image(s) were "
                             f"given; put one {IMAGE_TOKEN} per image in the prompt")
        tok_id = tokenizer.token_to_id(IMAGE_TOKEN)
        if images and tok_id != self.image_token_id:
            raise ValueError(f"the tokenizer maps {IMAGE_TOKEN} to {tok_id} but config.json's image_token_id is "
                             f"{self.image_token_id}; the export's tokenizer and config disagree")
        feats = None
        if images:
            batch = self.preprocess(images)
            text = self.expand(text, batch)
            feats = self.encode(batch.pixel_values, batch.pixel_attention_mask)
            feats = feats.reshape(-1, feats.shape[-1])          # [frames * image_seq_len, D_text]
        ids, _ = tokenizer.encode(text, padding="do_not_pad", truncation=False, add_special_tokens=True)
        ids = np.asarray(ids[0], dtype=np.int64)
        n_tok = int((ids == self.image_token_id).sum())
        if n_tok != (0 if feats is None else feats.shape[0]):
            raise ValueError(f"the tokenized prompt has {n_tok} image tokens but the images give "
                             f"{0 if feats is None else feats.shape[0]} feature rows; does the prompt contain "
                             f"{IMAGE_TOKEN} text that is not an image placeholder?")
        return Prepared(ids, feats)

    def __repr__(self) -> str:
        return (f"Idefics3Vision({len(self.blocks)} blocks, width {self.dim}, grid {self.side}x{self.side}, "
                f"scale {self.scale}, {self.image_seq_len} tokens per frame, {self.preprocessor!r})")
