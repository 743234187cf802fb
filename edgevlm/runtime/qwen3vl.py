"""Qwen3-VL(-MoE) vision side on the edgevlm runtime (numpy + the C++ kernels; never torch).

What runs is the transformers forward of ``Qwen3VLMoeVisionModel`` and ``Qwen3VLProcessor``:

preprocess  the Qwen2-VL image processor (:class:`~.qwen2vl_preprocess.QwenImagePreprocessor`:
            ``smart_resize`` on multiples of patch x merge, mean = std = 0.5 in the real models),
            patches in merge-block order.
patches     the Conv3d patch embedding as one matmul plus its bias: [N, C*Tp*P*P] @ [.., D] + b.
positions   a learned square table [S², D] resampled to each image's gh x gw grid by bilinear
            interpolation with ``align_corners=True`` (transformers'
            ``get_vision_interpolation_indices_and_weights``: 4 taps per patch), added to the patches.
rotary      2-D RoPE on q and k (hd/2 channels with the patch row, hd/2 with its column), as Qwen2-VL.
blocks      pre-LN, fused qkv + biases, attention within each image, fc1 -> tanh GELU -> fc2.
merger      LayerNorm [D] -> the m² neighbouring patches concatenated -> fc1 -> GELU (erf) -> fc2.
DeepStack   after each block in ``deepstack_visual_indexes`` a merger with a post-shuffle
            LayerNorm [D m²] gives one more [N / m², D_text] feature array; the decoder adds array
            l to the output of its layer l at the image-token rows (:class:`~.decoder.DeepStack`).
prepare     each ``<|image_pad|>`` expanded to t*h*w/m² copies, tokenized like the processor,
            multimodal RoPE positions [3, T] and ``rope_delta`` (Qwen3-VL's ``get_rope_index`` gives
            images the same (t, h, w) positions as Qwen2-VL's), DeepStack attached to the positions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .decoder import DeepStack
from .layers import Linear, gelu, get_activation, layer_norm, vector
from .qwen2vl import (_token_string, _VisionBlock, conv3d_patch, count_vision_blocks, cu_seqlens, rope_index,
                      vision_inv_freq, vision_positions)
from .qwen2vl_preprocess import QwenImagePreprocessor
from .vlm_base import Prepared

__all__ = ["Qwen3VLVision", "interpolation_taps"]

F32 = np.float32
IMAGE_PAD = "<|image_pad|>"
EPS = 1e-6  # every LayerNorm of the tower and the mergers hard-codes 1e-6

_VISION_DEFAULTS = {"num_heads": 16, "spatial_merge_size": 2, "hidden_act": "gelu_pytorch_tanh",
                    "deepstack_visual_indexes": [8, 16, 24]}


def interpolation_taps(grid: np.ndarray, side: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear (align_corners) resampling of a side x side table to every image's gh x gw grid:
    (indices int64 [ΣN, 4] into the flattened table, weights float32 [ΣN, 4]), patches in
    merge-block order, float32 arithmetic as transformers."""
    out_i, out_w = [], []
    for t, h, w in np.asarray(grid, dtype=np.int64).tolist():
        pos = vision_positions(np.array([[1, h, w]]), merge)                 # [h*w, 2] (row, col)

        def axis(index: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
            src = index.astype(F32) * F32(side - 1) / F32(max(size - 1, 1))  # [n]
            fl = np.floor(src)
            taps = np.clip(fl.astype(np.int64)[:, None] + np.arange(2), 0, side - 1)      # [n, 2]
            wts = np.maximum(F32(1) - np.abs(src[:, None] - fl[:, None] - np.arange(2, dtype=F32)), F32(0))
            return taps, wts.astype(F32)

        ht, hw = axis(pos[:, 0], h)
        wt, ww = axis(pos[:, 1], w)
        idx = (ht[:, :, None] * side + wt[:, None, :]).reshape(-1, 4)
        wts = (hw[:, :, None] * ww[:, None, :]).reshape(-1, 4)
        out_i.append(np.tile(idx, (t, 1)))
        out_w.append(np.tile(wts, (t, 1)))
    return np.concatenate(out_i), np.concatenate(out_w)


class _Merger:
    """Patch merger: [N, D] -> [N / m², D_text].  ``post_shuffle``: the LayerNorm runs on the m²
    concatenated patches [D m²] (the DeepStack mergers) instead of each patch [D]."""

    def __init__(self, f: Any, p: str, width: int, post_shuffle: bool, isa: str | None) -> None:
        self.norm = vector(f, f"{p}.norm.weight"), vector(f, f"{p}.norm.bias")
        self.fc1, self.fc2 = Linear.from_file(f, f"{p}.fc1", isa=isa), Linear.from_file(f, f"{p}.fc2", isa=isa)
        self.width, self.post = width, post_shuffle
        if self.norm[0].size != width:
            raise ValueError(f"{p}.norm has {self.norm[0].size} weights, expected {width}; config.json and the "
                             "weights disagree")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        k = self.fc1.k
        h = layer_norm(x.reshape(-1, k), *self.norm, EPS) if self.post else layer_norm(x, *self.norm, EPS)
        return self.fc2(gelu(self.fc1(h.reshape(-1, k))))


class Qwen3VLVision:
    """The vision family of Qwen3-VL-MoE exports (see :mod:`.vlm_base`)."""

    image_placeholder = "<|vision_start|><|image_pad|><|vision_end|>"

    def __init__(self, f: Any, config: dict, isa: str | None = None) -> None:
        path = getattr(f, "path", "file")
        vc = {**_VISION_DEFAULTS, **{k: v for k, v in (config.get("vision_config") or {}).items() if v is not None}}
        if "image_token_id" not in config:
            raise ValueError("config.json of this export has no image_token_id; re-export from a complete "
                             "Qwen3-VL folder")
        self.image_token_id = int(config["image_token_id"])
        for key in ("vision.embed.patch.weight", "vision.embed.pos", "projector.fc1.weight"):
            if key not in f.records:
                raise ValueError(f"{path}: no {key}; not a complete Qwen3-VL export. Re-export the model with "
                                 "`edgevlm export`.")
        self.dim, self.patch, tp, self.patch_wt = conv3d_patch(f)
        self.patch_b = vector(f, "vision.embed.patch.bias")
        self.pos = vector(f, "vision.embed.pos")                             # [S², D]
        self.side = int(round(self.pos.shape[0] ** 0.5))
        if self.side * self.side != self.pos.shape[0] or self.pos.shape[1] != self.dim:
            raise ValueError(f"vision.embed.pos must be a square grid of positions [S², {self.dim}], got "
                             f"{self.pos.shape}")
        self.heads = int(vc["num_heads"])
        self.merge = int(vc["spatial_merge_size"])
        self.inv_freq = vision_inv_freq(vc, self.dim // self.heads)
        n = count_vision_blocks(f)
        act = get_activation(vc["hidden_act"])
        self.blocks = [_VisionBlock.from_file(f, f"vision.blocks.{i}", self.heads, act, isa) for i in range(n)]
        unit = self.merge ** 2
        self.merger = _Merger(f, "projector", self.dim, False, isa)
        self.deep_index = [int(i) for i in vc["deepstack_visual_indexes"] or []]
        if any(not 0 <= i < n for i in self.deep_index):
            raise ValueError(f"deepstack_visual_indexes {self.deep_index} name blocks outside 0..{n - 1}")
        self.deep = [_Merger(f, f"projector.deepstack.{j}", self.dim * unit, True, isa)
                     for j in range(len(self.deep_index))]
        if self.merger.fc1.k != self.dim * unit:
            raise ValueError(f"projector.fc1 reads {self.merger.fc1.k} features, expected {self.dim} x {self.merge}² "
                             "(vision width x merge units); config.json and the weights disagree")
        self.pre = QwenImagePreprocessor.from_config((getattr(f, "metadata", None) or {}).get("preprocess"))
        if (self.pre.patch_size, self.pre.temporal_patch_size, self.pre.merge_size) != (self.patch, tp, self.merge):
            raise ValueError(f"preprocessor patch {self.pre.patch_size} / temporal {self.pre.temporal_patch_size} / "
                             f"merge {self.pre.merge_size} do not match the model's {self.patch} / {tp} / {self.merge}")
        self.out_dim = self.merger.fc2.n

    # -- vision ------------------------------------------------------------------------------------
    def rotary(self, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin float32 [ΣN, head_dim]: (row freqs | column freqs) twice, as HF."""
        pos = vision_positions(grid, self.merge).astype(F32)                  # [N, 2]
        ang = (pos[:, :, None] * self.inv_freq).reshape(len(pos), -1)         # [N, hd/2] = (h | w)
        ang = np.concatenate([ang, ang], axis=-1)                             # [N, hd]
        return np.cos(ang), np.sin(ang)

    def encode(self, pixel_values: np.ndarray, grid_thw: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """pixel_values float32 [ΣN, C*Tp*P*P], grid_thw int [n, 3] -> (features float32 [ΣN / m²,
        D_text], DeepStack features: one [ΣN / m², D_text] per ``deepstack_visual_indexes`` entry)."""
        px = np.asarray(pixel_values, dtype=F32)
        grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
        if px.ndim != 2 or px.shape[1] != self.patch_wt.shape[0]:
            raise ValueError(f"pixel_values must be [N, {self.patch_wt.shape[0]}] float32, got {px.shape}")
        if int(grid.prod(-1).sum()) != px.shape[0] or (grid[:, 1:] % self.merge).any():
            raise ValueError(f"grid_thw {grid.tolist()} does not describe {px.shape[0]} patches in whole "
                             f"{self.merge} x {self.merge} merge units")
        x = px @ self.patch_wt + self.patch_b                                 # [N, D]
        idx, wts = interpolation_taps(grid, self.side, self.merge)            # [N, 4]
        x = x + (self.pos[idx] * wts[:, :, None]).sum(1)
        cos, sin = self.rotary(grid)
        cu = cu_seqlens(grid)
        deep = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, cu)
            if i in self.deep_index:
                deep.append(self.deep[self.deep_index.index(i)](x))
        return self.merger(x), deep

    def image_features(self, images: list[Any]) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
        """Images -> (one float32 [t*h*w / m², D_text] array per image, the DeepStack arrays split
        the same way: [layer][image])."""
        pv, grid = self.pre(list(images))
        y, deep = self.encode(pv, grid)
        cuts = np.cumsum(grid.prod(-1) // self.merge ** 2)[:-1]
        return np.split(y, cuts), [np.split(d, cuts) for d in deep]

    # -- the prompt --------------------------------------------------------------------------------
    def prepare(self, text: str, images: list[Any], tokenizer: Any) -> Prepared:
        images = list(images or [])
        pad = _token_string(tokenizer, self.image_token_id) or IMAGE_PAD
        n_ph = text.count(pad)
        if n_ph != len(images):
            raise ValueError(f"the prompt has {n_ph} {pad} placeholder(s) but {len(images)} image(s) were given; "
                             f"write one {self.image_placeholder} per image (the chat template does this)")
        feats, deep, grid = None, [], None
        if images:
            pv, grid = self.pre(images)
            feats, deep = self.encode(pv, grid)
            counts = (grid.prod(-1) // self.merge ** 2).tolist()
            pieces = text.split(pad)                                          # the processor's expansion
            text = pieces[0] + "".join(pad * c + p for c, p in zip(counts, pieces[1:]))
        ids, _ = tokenizer.encode(text, padding="do_not_pad", truncation=False)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        mask = ids == self.image_token_id
        if int(mask.sum()) != (0 if feats is None else len(feats)):
            raise ValueError(f"the tokenized prompt holds {int(mask.sum())} image tokens but the images give "
                             f"{0 if feats is None else len(feats)}; does the text contain {pad} itself?")
        positions, delta = rope_index(ids, grid, self.image_token_id, self.merge)
        return Prepared(ids, feats, positions, delta, DeepStack(mask, deep) if deep else None)
