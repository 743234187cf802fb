"""Qwen2-VL / Qwen2.5-VL vision side on the edgevlm runtime (numpy + the C++ kernels; never torch).

What runs is the transformers forward of ``Qwen2VisionTransformerPretrainedModel`` /
``Qwen2_5_VisionTransformerPretrainedModel`` and of ``Qwen2VLProcessor``:

preprocess  :class:`~.qwen2vl_preprocess.QwenImagePreprocessor` (dynamic resolution: each image
            keeps its own grid of gh x gw patches, gh, gw multiples of the merge size m).
patches     the Conv3d patch embedding as one matmul: [N, C*Tp*P*P] @ [C*Tp*P*P, D], no bias.
rotary      2-D RoPE: head_dim/2 channels rotate with the patch row, head_dim/2 with its column
            (positions in merge-block order), applied to q and k of every block.
blocks      pre-norm: x += proj(attn(norm1 x)); x += mlp(norm2 x).  Qwen2-VL: LayerNorm, fused
            qkv, fc1 -> act -> fc2, every block attends within its image.  Qwen2.5-VL: RMSNorm,
            SwiGLU (gate/up/down, with biases), tokens permuted into windows of
            ``window_size`` pixels (whole m x m merge units), windowed attention except in
            ``fullatt_block_indexes`` blocks, which attend within the image.
merger      norm (LayerNorm / RMSNorm) -> the m² neighbouring patches concatenated -> fc1 ->
            GELU (erf) -> fc2: one text-width feature per merged token, back in raster order.
prepare     each ``<|image_pad|>`` expanded to t*h*w/m² copies, tokenized like the processor,
            multimodal RoPE positions [3, T] and ``rope_delta`` as ``get_rope_index``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .layers import Linear, attention, gelu, get_activation, layer_norm, rms_norm, vector
from .qwen2vl_preprocess import QwenImagePreprocessor
from .vlm_base import Prepared

__all__ = ["Qwen2VLVision", "cu_seqlens", "rope_index", "vision_positions", "window_index"]

F32 = np.float32
IMAGE_PAD = "<|image_pad|>"
EPS = 1e-6  # both towers hard-code 1e-6 in their norms
#: attention scores [S, H, Tq, L] float32 computed at once at most this many bytes (queries chunked)
SCORE_BYTES = 64 << 20

_VISION_DEFAULTS = {"num_heads": 16, "spatial_merge_size": 2, "window_size": 112,
                    "fullatt_block_indexes": [7, 15, 23, 31]}


# ------------------------------------------------------------------------------ index helpers

def vision_positions(grid: np.ndarray, merge: int) -> np.ndarray:
    """Rotary (row, column) of every patch, int64 [ΣN, 2], patches in merge-block order
    (transformers ``get_vision_position_ids``)."""
    out = []
    for t, h, w in np.asarray(grid, dtype=np.int64).tolist():
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        blk = (h // merge, merge, w // merge, merge)
        hh = hh.reshape(blk).transpose(0, 2, 1, 3).reshape(-1)
        ww = ww.reshape(blk).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hh, ww], axis=-1), (t, 1)))
    return np.concatenate(out, axis=0)


def cu_seqlens(grid: np.ndarray) -> np.ndarray:
    """Attention spans of the full-attention blocks: one per frame, int64 [n_frames + 1]."""
    g = np.asarray(grid, dtype=np.int64)
    return np.concatenate([[0], np.cumsum(np.repeat(g[:, 1] * g[:, 2], g[:, 0]))])


def window_index(grid: np.ndarray, merge: int, window_size: int, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL windows (transformers ``get_vision_window_index``): the merge units in window
    order, int64 [ΣN / m²], and the window spans in patches, int64 [n_windows + 1]."""
    vw = window_size // merge // patch  # window side in merge units
    if vw < 1:
        raise ValueError(f"window_size {window_size} is smaller than one merge unit ({merge} x {patch} px)")
    unit = merge * merge
    index, cu, base = [], [0], 0
    for t, h, w in np.asarray(grid, dtype=np.int64).tolist():
        lh, lw = h // merge, w // merge
        ph, pw = vw - lh % vw, vw - lw % vw  # as HF: a whole empty window row when lh % vw == 0
        padded = np.full((t, lh + ph, lw + pw), -100, dtype=np.int64)
        padded[:, :lh, :lw] = np.arange(t * lh * lw).reshape(t, lh, lw)
        nh, nw = (lh + ph) // vw, (lw + pw) // vw
        padded = padded.reshape(t, nh, vw, nw, vw).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, vw, vw)
        lens = (padded != -100).sum(axis=(2, 3)).reshape(-1)
        flat = padded.reshape(-1)
        index.append(flat[flat != -100] + base)
        cu.extend((np.cumsum(lens) * unit + cu[-1]).tolist())
        base += t * lh * lw
    cu_arr = np.asarray(cu, dtype=np.int64)
    keep = np.concatenate([[True], cu_arr[1:] != cu_arr[:-1]])  # torch.unique_consecutive
    return np.concatenate(index), cu_arr[keep]


def rope_index(input_ids: np.ndarray, grid: np.ndarray | None, image_token_id: int,
               merge: int) -> tuple[np.ndarray, int]:
    """Multimodal RoPE positions int64 [3, T] (temporal, row, column) and rope_delta, as
    transformers' ``Qwen2VLModel.get_rope_index`` for one unpadded sequence: a text run
    continues 0, 1, 2, ... in all three sections; a run of image tokens gets (start + frame,
    start + row, start + column) of its merged grid and advances the start by max(h, w) / m."""
    ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
    n = ids.size
    is_img = ids == image_token_id
    edges = np.flatnonzero(np.diff(is_img.astype(np.int8))) + 1
    starts, ends = np.concatenate([[0], edges]), np.concatenate([edges, [n]])
    grids = [] if grid is None else np.asarray(grid, dtype=np.int64).tolist()
    parts, cur, k = [], 0, 0
    for a, b in zip(starts.tolist(), ends.tolist()):
        if not is_img[a]:
            parts.append(np.broadcast_to(np.arange(b - a, dtype=np.int64) + cur, (3, b - a)))
            cur += b - a
            continue
        if k >= len(grids):
            raise ValueError(f"the prompt has more runs of image tokens than the {len(grids)} image(s) given")
        t, h, w = grids[k]
        k += 1
        lt, lh, lw = t, h // merge, w // merge
        if lt * lh * lw != b - a:
            raise ValueError(f"a run of {b - a} image tokens at position {a} does not match image {k - 1} "
                             f"({lt * lh * lw} tokens); two images need text (e.g. <|vision_end|>) between them")
        tt, hh, ww = np.meshgrid(np.arange(lt), np.arange(lh), np.arange(lw), indexing="ij")
        parts.append(np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]).astype(np.int64) + cur)
        cur += max(h, w) // merge
    if k != len(grids):
        raise ValueError(f"{len(grids)} image(s) given but the prompt has {k} run(s) of image tokens")
    pos = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), dtype=np.int64)
    delta = int(pos.max()) + 1 - n if n else 0
    return np.ascontiguousarray(pos), delta


# ------------------------------------------------------------------------------ the tower

def _rotate_half(x: np.ndarray) -> np.ndarray:
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def segment_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, cu: np.ndarray, heads: int) -> np.ndarray:
    """Bidirectional attention within each span [cu[j], cu[j+1]) of q, k, v [N, D] -> [N, D]
    (the HF per-span loop); spans of equal length run as one batch, long ones in query chunks."""
    out = np.empty_like(q)
    cu = np.asarray(cu, dtype=np.int64)
    starts, lens = cu[:-1], np.diff(cu)
    for span in np.unique(lens[lens > 0]).tolist():
        idx = starts[lens == span][:, None] + np.arange(span)[None]          # [S, L]
        ks, vs = k[idx], v[idx]                                             # [S, L, D]
        rows = max(1, SCORE_BYTES // (idx.shape[0] * heads * span * 4))
        for a in range(0, span, rows):
            sub = idx[:, a:a + rows]
            out[sub] = attention(q[sub], ks, vs, heads)
    return out


@dataclass(frozen=True)
class _VisionBlock:
    """One Qwen2-VL / Qwen2.5-VL vision block; x [N, D] -> [N, D]."""

    norm1: tuple[np.ndarray, np.ndarray | None]   # weight, bias (None: RMSNorm)
    norm2: tuple[np.ndarray, np.ndarray | None]
    qkv: Linear                                   # [3D, D], rows q | k | v, heads contiguous
    o: Linear
    mlp: tuple[Linear, ...]                       # (fc1, fc2) or (gate, up, down)
    heads: int
    act: Any

    @classmethod
    def from_file(cls, f: Any, p: str, heads: int, act: Any, isa: str | None) -> _VisionBlock:
        def norm(n: str):
            b = f"{p}.{n}.bias"
            return vector(f, f"{p}.{n}.weight"), (vector(f, b) if b in f.records else None)
        names = ("gate", "up", "down") if f"{p}.mlp.gate.weight" in f.records else ("fc1", "fc2")
        return cls(norm("norm1"), norm("norm2"), Linear.from_file(f, f"{p}.attn.qkv", isa=isa),
                   Linear.from_file(f, f"{p}.attn.o", isa=isa),
                   tuple(Linear.from_file(f, f"{p}.mlp.{n}", isa=isa) for n in names), heads, act)

    @staticmethod
    def _norm(x: np.ndarray, wb: tuple[np.ndarray, np.ndarray | None]) -> np.ndarray:
        w, b = wb
        return rms_norm(x, w, EPS) if b is None else layer_norm(x, w, b, EPS)

    def __call__(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, cu: np.ndarray) -> np.ndarray:
        n, d = x.shape
        hd = d // self.heads
        qkv = self.qkv(self._norm(x, self.norm1)).reshape(n, 3, self.heads, hd)
        c, s = cos[:, None], sin[:, None]                                    # [N, 1, hd]
        q = qkv[:, 0] * c + _rotate_half(qkv[:, 0]) * s                       # [N, H, hd]
        k = qkv[:, 1] * c + _rotate_half(qkv[:, 1]) * s
        a = segment_attention(q.reshape(n, d), k.reshape(n, d), np.ascontiguousarray(qkv[:, 2]).reshape(n, d),
                              cu, self.heads)
        x = x + self.o(a)
        h = self._norm(x, self.norm2)
        if len(self.mlp) == 2:
            fc1, fc2 = self.mlp
            return x + fc2(self.act(fc1(h)))
        gate, up, down = self.mlp
        return x + down(self.act(gate(h)) * up(h))


def conv3d_patch(f: Any) -> tuple[int, int, int, np.ndarray]:
    """The Conv3d patch embedding ``vision.embed.patch.weight`` [D, C, Tp, P, P] of a Qwen-VL
    export as (D, P, Tp, a matmul weight [C*Tp*P*P, D])."""
    w = vector(f, "vision.embed.patch.weight")
    if w.ndim != 5:
        raise ValueError(f"vision.embed.patch.weight must be a Conv3d weight [D, C, Tp, P, P], got {w.shape}")
    dim, _, tp, patch, _ = w.shape
    return dim, patch, tp, np.ascontiguousarray(w.reshape(dim, -1).T)


def vision_inv_freq(vc: dict, head_dim: int) -> np.ndarray:
    """The vision tower's 2-D RoPE inverse frequencies float32 [head_dim / 4]: row and column
    each rotate head_dim / 2 channels (transformers' VisionRotaryEmbedding, float32 math)."""
    theta = float((vc.get("rope_parameters") or {}).get("rope_theta", vc.get("rope_theta", 10000.0)))
    sd = head_dim // 2
    return (F32(1.0) / (F32(theta) ** (np.arange(0, sd, 2, dtype=F32) / F32(sd)))).astype(F32)


def count_vision_blocks(f: Any) -> int:
    """How many ``vision.blocks.{i}`` the file holds (ValueError if none)."""
    n = 0
    while f"vision.blocks.{n}.attn.qkv.weight" in f.records:
        n += 1
    if n == 0:
        raise ValueError(f"{getattr(f, 'path', 'file')}: no vision.blocks.* tensors; not a complete export")
    return n


class Qwen2VLVision:
    """The vision family of Qwen2-VL and Qwen2.5-VL exports (see :mod:`.vlm_base`)."""

    image_placeholder = "<|vision_start|><|image_pad|><|vision_end|>"

    def __init__(self, f: Any, config: dict, isa: str | None = None) -> None:
        family = (getattr(f, "metadata", None) or {}).get("family") or config.get("model_type")
        if family not in ("qwen2_vl", "qwen2_5_vl"):
            raise ValueError(f"{getattr(f, 'path', 'file')}: a {family!r} export is not Qwen2-VL / Qwen2.5-VL")
        self.family = family
        vc = {**_VISION_DEFAULTS, **{k: v for k, v in (config.get("vision_config") or {}).items() if v is not None}}
        if "image_token_id" not in config:
            raise ValueError("config.json of this export has no image_token_id; re-export from a complete "
                             "Qwen2-VL folder")
        self.image_token_id = int(config["image_token_id"])
        if "vision.embed.patch.weight" not in f.records:
            raise ValueError(f"{getattr(f, 'path', 'file')}: no vision.embed.patch.weight; not a complete Qwen2-VL "
                             "export. Re-export the model with `edgevlm export`.")
        self.dim, self.patch, tp, self.patch_wt = conv3d_patch(f)
        self.heads = int(vc["num_heads"])
        self.merge = int(vc["spatial_merge_size"])
        self.inv_freq = vision_inv_freq(vc, self.dim // self.heads)
        self.windowed = family == "qwen2_5_vl"
        self.window_size = int(vc["window_size"])
        n = count_vision_blocks(f)
        self.full = set(int(i) for i in vc["fullatt_block_indexes"]) if self.windowed else set(range(n))
        act = get_activation(vc.get("hidden_act") or ("silu" if self.windowed else "quick_gelu"))
        self.blocks = [_VisionBlock.from_file(f, f"vision.blocks.{i}", self.heads, act, isa) for i in range(n)]
        nb = "projector.norm.bias"
        self.merger_norm = (vector(f, "projector.norm.weight"), vector(f, nb) if nb in f.records else None)
        self.fc1 = Linear.from_file(f, "projector.fc1", isa=isa)
        self.fc2 = Linear.from_file(f, "projector.fc2", isa=isa)
        if self.fc1.k != self.dim * self.merge ** 2:
            raise ValueError(f"projector.fc1 reads {self.fc1.k} features, expected {self.dim} x {self.merge}² "
                             "(vision width x merge units); config.json and the weights disagree")
        self.pre = QwenImagePreprocessor.from_config((getattr(f, "metadata", None) or {}).get("preprocess"))
        if (self.pre.patch_size, self.pre.temporal_patch_size, self.pre.merge_size) != (self.patch, tp, self.merge):
            raise ValueError(f"preprocessor patch {self.pre.patch_size} / temporal {self.pre.temporal_patch_size} / "
                             f"merge {self.pre.merge_size} do not match the model's {self.patch} / {tp} / {self.merge}")
        self.out_dim = self.fc2.n

    # -- vision ------------------------------------------------------------------------------------
    def rotary(self, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin float32 [ΣN, head_dim]: (row freqs | column freqs) twice, as HF."""
        pos = vision_positions(grid, self.merge).astype(F32)                  # [N, 2]
        ang = pos[:, :, None] * self.inv_freq                                 # [N, 2, hd/4]
        ang = ang.reshape(len(pos), -1)                                       # [N, hd/2] = (h | w)
        ang = np.concatenate([ang, ang], axis=-1)                             # [N, hd]
        return np.cos(ang), np.sin(ang)

    def encode(self, pixel_values: np.ndarray, grid_thw: np.ndarray) -> np.ndarray:
        """pixel_values float32 [ΣN, C*Tp*P*P], grid_thw int [n, 3] -> features float32
        [ΣN / m², D_text], images in order, each in raster order of its merged grid."""
        px = np.asarray(pixel_values, dtype=F32)
        grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
        if px.ndim != 2 or px.shape[1] != self.patch_wt.shape[0]:
            raise ValueError(f"pixel_values must be [N, {self.patch_wt.shape[0]}] float32, got {px.shape}")
        if int(grid.prod(-1).sum()) != px.shape[0] or (grid[:, 1:] % self.merge).any():
            raise ValueError(f"grid_thw {grid.tolist()} does not describe {px.shape[0]} patches in whole "
                             f"{self.merge} x {self.merge} merge units")
        x = px @ self.patch_wt                                                # [N, D]
        cos, sin = self.rotary(grid)
        cu_full = cu_seqlens(grid)
        cu_win, order = cu_full, None
        unit = self.merge ** 2
        if self.windowed:
            order, cu_win = window_index(grid, self.merge, self.window_size, self.patch)
            rows = (order[:, None] * unit + np.arange(unit)[None]).reshape(-1)  # merge units -> patch rows
            x, cos, sin = x[rows], cos[rows], sin[rows]
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, cu_full if i in self.full else cu_win)
        w, b = self.merger_norm
        h = rms_norm(x, w, EPS) if b is None else layer_norm(x, w, b, EPS)
        y = self.fc2(gelu(self.fc1(h.reshape(-1, self.fc1.k))))             # [N / m², D_text]
        if order is not None:
            y = y[np.argsort(order)]
        return y

    def image_features(self, images: list[Any]) -> list[np.ndarray]:
        """Images -> one float32 [t*h*w / m², D_text] array per image."""
        pv, grid = self.pre(list(images))
        y = self.encode(pv, grid)
        return np.split(y, np.cumsum(grid.prod(-1) // self.merge ** 2)[:-1])

    # -- the prompt --------------------------------------------------------------------------------
    def prepare(self, text: str, images: list[Any], tokenizer: Any) -> Prepared:
        images = list(images or [])
        pad = _token_string(tokenizer, self.image_token_id) or IMAGE_PAD
        n_ph = text.count(pad)
        if n_ph != len(images):
            raise ValueError(f"the prompt has {n_ph} {pad} placeholder(s) but {len(images)} image(s) were given; "
                             f"write one {self.image_placeholder} per image (the chat template does this)")
        feats, grid = None, None
        if images:
            pv, grid = self.pre(images)
            feats = self.encode(pv, grid)
            counts = (grid.prod(-1) // self.merge ** 2).tolist()
            pieces = text.split(pad)                                          # Qwen2VLProcessor's expansion
            text = pieces[0] + "".join(pad * c + p for c, p in zip(counts, pieces[1:]))
        ids, _ = tokenizer.encode(text, padding="do_not_pad", truncation=False)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        n_tok = int((ids == self.image_token_id).sum())
        if n_tok != (0 if feats is None else len(feats)):
            raise ValueError(f"the tokenized prompt holds {n_tok} image tokens but the images give "
                             f"{0 if feats is None else len(feats)}; does the text contain {pad} itself?")
        positions, delta = rope_index(ids, grid, self.image_token_id, self.merge)
        return Prepared(ids, feats, positions, delta)


def _token_string(tokenizer: Any, token_id: int) -> str | None:
    backend = getattr(tokenizer, "backend", None)
    if backend is not None and hasattr(backend, "id_to_token"):
        return backend.id_to_token(int(token_id))
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        return tokenizer.convert_ids_to_tokens(int(token_id))
    return None
