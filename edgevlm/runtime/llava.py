"""LLaVA's vision side on the edgevlm runtime: CLIP/SigLIP tower -> selected hidden states ->
2-layer projector, and the ``LlavaProcessor`` prompt expansion (numpy; never torch).

transformers' ``LlavaModel.get_image_features``: ``hidden_states[k]`` for each
``vision_feature_layer`` k (``hidden_states[0]`` is the block-0 input, i.e. the embeddings after
CLIP's pre-LN; ``hidden_states[k]`` the output of block k-1), concatenated on the feature axis;
strategy ``"default"`` drops the CLS row; then ``linear_2(act(linear_1(.)))``.
``LlavaProcessor``: every ``<image>`` becomes ``(H/p)·(W/p) + num_additional_image_tokens``
image tokens (one fewer with strategy "default"); the text is tokenized with the tokenizer's
own special tokens (a Llama tokenizer prepends ``<s>``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .dual import _DEFAULTS, _Block
from .layers import Linear, get_activation, layer_norm, vector
from .preprocess import ImagePreprocessor
from .vlm_base import Prepared

__all__ = ["LlavaVision"]

F32 = np.float32
# transformers' config defaults for keys a config.json may omit: the CLIP / SigLIP vision towers'
_VISION_DEFAULTS = {"clip_vision_model": _DEFAULTS[("clip", "vision")],
                    "siglip_vision_model": _DEFAULTS[("siglip", "vision")]}


class LlavaVision:
    """Images -> projected image features [n_tokens, D_text]; prompts -> expanded token ids."""

    def __init__(self, f: Any, config: dict, isa: str | None = None) -> None:
        vc = dict(config.get("vision_config") or {})
        vtype = vc.get("model_type", "clip_vision_model")
        if vtype not in _VISION_DEFAULTS:
            raise ValueError(f"LLaVA vision tower {vtype!r} is not supported (clip_vision_model, siglip_vision_model)")
        vc = {**_VISION_DEFAULTS[vtype], **{k: v for k, v in vc.items() if v is not None}}
        self.clip = vtype == "clip_vision_model"
        w = vector(f, "vision.embed.patch.weight")                          # [D, C, P, P]
        self.dim, self.channels, self.patch, _ = w.shape
        self.patch_wt = np.ascontiguousarray(w.reshape(self.dim, -1).T)     # [C*P*P, D]
        self.patch_b = vector(f, "vision.embed.patch.bias") if "vision.embed.patch.bias" in f.records else None
        self.cls = vector(f, "vision.embed.class") if self.clip else None
        self.pos = vector(f, "vision.embed.pos")                            # [T, D]
        self.image_size = int(vc["image_size"])
        self.eps = float(vc["layer_norm_eps"])
        heads = int(vc["num_attention_heads"])
        act = get_activation(vc["hidden_act"])
        self.pre = (vector(f, "vision.pre_norm.weight"), vector(f, "vision.pre_norm.bias")) if self.clip else None
        n = 0
        while f"vision.blocks.{n}.norm1.weight" in f.records:
            n += 1
        self.blocks = [_Block.from_file(f, f"vision.blocks.{i}", heads, self.eps, act, isa) for i in range(n)]
        n_layers = int(vc.get("num_hidden_layers", n))
        fl = config.get("vision_feature_layer", -2)
        fl = list(fl) if isinstance(fl, (list, tuple)) else [fl]
        self.layers = [i if i >= 0 else n_layers + 1 + i for i in fl]
        if max(self.layers) > n or min(self.layers) < 0:
            raise ValueError(f"vision_feature_layer {fl} needs {max(self.layers)} vision blocks; the file has {n}")
        self.strategy = config.get("vision_feature_select_strategy", "default")
        if self.strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {self.strategy!r} is not supported (default, full)")
        self.fc1 = Linear.from_file(f, "projector.fc1", isa=isa)
        self.fc2 = Linear.from_file(f, "projector.fc2", isa=isa)
        self.proj_act = get_activation(config.get("projector_hidden_act", "gelu"))
        self.image_token_id = int(config.get("image_token_id", config.get("image_token_index", 32000)))
        pcfg = ((f.metadata or {}).get("extra") or {}).get("processor_config") or {}
        self.image_placeholder = pcfg.get("image_token", "<image>")
        self.num_additional = int(pcfg.get("num_additional_image_tokens", 1 if self.clip else 0))
        self.proc_patch = int(pcfg.get("patch_size", self.patch))
        self.proc_strategy = pcfg.get("vision_feature_select_strategy", self.strategy)
        self.preprocessor = ImagePreprocessor((f.metadata or {}).get("preprocess"),
                                              "clip" if self.clip else "siglip")

    def tokens_per_image(self, height: int, width: int) -> int:
        n = (height // self.proc_patch) * (width // self.proc_patch) + self.num_additional
        return n - 1 if self.proc_strategy == "default" else n

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        """float32 [B, C, S, S] -> projected features [B, n_tokens, D_text]."""
        px = np.asarray(pixel_values, dtype=F32)
        b, c, h, w = px.shape
        if (c, h, w) != (self.channels, self.image_size, self.image_size):
            raise ValueError(f"pixel_values must be [B, {self.channels}, {self.image_size}, {self.image_size}], "
                             f"got {px.shape}")
        p = self.patch
        x = px.reshape(b, c, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        x = x @ self.patch_wt                                              # [B, N, D]
        if self.patch_b is not None:
            x += self.patch_b
        if self.cls is not None:
            x = np.concatenate([np.broadcast_to(self.cls, (b, 1, self.dim)), x], axis=1)
        x = x + self.pos
        if self.pre is not None:
            x = layer_norm(x, *self.pre, self.eps)
        hidden = {0: x}
        for i, blk in enumerate(self.blocks[:max(self.layers)]):
            x = blk(x)
            hidden[i + 1] = x
        feats = np.concatenate([hidden[i] for i in self.layers], axis=-1)  # [B, T, nfeat*D]
        if self.strategy == "default":
            feats = feats[:, 1:]
        return self.fc2(self.proj_act(self.fc1(feats)))

    def prepare(self, text: str, images: list[Any], tokenizer: Any) -> Prepared:
        n_ph = text.count(self.image_placeholder)
        if n_ph != len(images):
            raise ValueError(f"the prompt has {n_ph} image placeholder(s) {self.image_placeholder!r} but "
                             f"{len(images)} image(s) were given")
        feats = None
        if images:
            px = self.preprocessor(list(images))                          # [B, 3, S, S]
            n_tok = self.tokens_per_image(px.shape[2], px.shape[3])
            text = text.replace(self.image_placeholder, self.image_placeholder * n_tok)
            feats = self.encode(px)
            if feats.shape[1] != n_tok:
                raise ValueError(f"the vision tower gives {feats.shape[1]} features per image but the processor "
                                 f"settings expand an image to {n_tok} tokens; processor_config.json and "
                                 "config.json disagree")
            feats = feats.reshape(-1, feats.shape[-1])
        ids, _ = tokenizer.encode(text, padding="do_not_pad", truncation=False)
        ids = ids[0]
        n_img = int((ids == self.image_token_id).sum())
        n_feat = 0 if feats is None else feats.shape[0]
        if n_img != n_feat:
            raise ValueError(f"the tokenized prompt has {n_img} image tokens but the images give {n_feat} features; "
                             f"does the prompt contain the image token {self.image_placeholder!r} as text?")
        return Prepared(ids, feats)
