"""Tensor table of Idefics3 / SmolVLM (``Idefics3ForConditionalGeneration``,
``SmolVLMForConditionalGeneration``): a SigLIP-style vision tower whose patch grid may be any
size (positions bucketed from the patch attention mask), a pixel-shuffle connector with one
bias-free linear, and a Llama language model.

Module (= saved checkpoint) names, transformers 5::

    model.vision_model.embeddings.patch_embedding.{weight,bias}   conv [vD, C, P, P]
    model.vision_model.embeddings.position_embedding.weight       [(image_size/P)^2, vD]
    model.vision_model.encoder.layers.{i}.*                        SigLIP encoder layers
    model.vision_model.post_layernorm.{weight,bias}
    model.connector.modality_projection.proj.weight               [tD, vD * scale_factor^2]
    model.text_model.{embed_tokens,layers.{i}.*,norm}              Llama
    lm_head.weight                                                 from embed_tokens when tied

The hub checkpoints (HuggingFaceM4/Idefics3-8B-Llama3, HuggingFaceTB/SmolVLM-*) use these
names too (transformers has no key conversion for these families), so there are no ``renames``.
"""

from __future__ import annotations

from .tensor_map import (Entry, Family, Kind, _decoder, _dense, _fix_blocks, _norm, _text_dims, _vec, _vit_block,
                         lm_head)

__all__ = ["idefics3_family"]

# Idefics3VisionConfig / SmolVLMVisionConfig class defaults (the same), for keys a config.json may omit
_VISION_DEFAULTS = {"hidden_size": 1152, "intermediate_size": 3072, "num_hidden_layers": 12,
                    "num_attention_heads": 16, "num_channels": 3, "image_size": 224, "patch_size": 32}
_ARCH = {"idefics3": "Idefics3ForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration"}


def _name(cfg: dict) -> str:
    archs = cfg.get("architectures") or []
    for name, arch in _ARCH.items():
        if arch in archs:
            return name
    mt = cfg.get("model_type")
    if mt in _ARCH:
        return mt
    raise ValueError(f"not an Idefics3/SmolVLM config (architectures {archs}, model_type {mt!r}); expected "
                     f"{' or '.join(_ARCH.values())}")


def idefics3_family(cfg: dict) -> Family:
    """The table for an Idefics3 / SmolVLM config.json dict."""
    name = _name(cfg)
    vc = {**_VISION_DEFAULTS, **(cfg.get("vision_config") or {})}
    tc = dict(cfg.get("text_config") or {})
    ttype = tc.get("model_type", "llama")
    if ttype != "llama":
        raise ValueError(f"{_ARCH[name]} with a {ttype!r} language model is not supported; supported: llama")
    sf = int(cfg.get("scale_factor", 2))
    if sf < 1:
        raise ValueError(f"scale_factor must be a positive integer, got {cfg.get('scale_factor')!r}")
    side = vc["image_size"] // vc["patch_size"]
    if side % sf:
        raise ValueError(f"vision image_size / patch_size = {side} patches per side is not divisible by "
                         f"scale_factor {sf}; the connector's pixel shuffle cannot run")
    dims = {"vD": vc["hidden_size"], "vF": vc["intermediate_size"], "vL": vc["num_hidden_layers"],
            "vC": vc["num_channels"], "vP": vc["patch_size"], "vT": side * side, "vH": vc["num_attention_heads"],
            **_text_dims(tc)}
    dims["pIn"] = dims["vD"] * sf * sf
    v, t = "model.vision_model", "model.text_model"
    rows = [_dense(f"{v}.embeddings.patch_embedding.weight", "vision.embed.patch.weight", "vision",
                   "vD", "vC", "vP", "vP"),
            _vec(f"{v}.embeddings.patch_embedding.bias", "vision.embed.patch.bias", "vision", "vD"),
            _dense(f"{v}.embeddings.position_embedding.weight", "vision.embed.pos", "vision", "vT", "vD"),
            *_vit_block(f"{v}.encoder.layers.{{i}}", "vision.blocks.{i}", "vision", "vD", "vF", "vL"),
            *_norm(f"{v}.post_layernorm", "vision.post_norm", "vision", "vD"),
            Entry("model.connector.modality_projection.proj.weight", "projector.proj.weight", Kind.LINEAR,
                  "projector", ("tD", "pIn"), min_bits=4),
            Entry(f"{t}.embed_tokens.weight", "text.embed.tok", Kind.EMBED, "text", ("tV", "tD"), min_bits=8),
            *_decoder(t, "text", qkv_bias=tc.get("attention_bias", False), o_bias=tc.get("attention_bias", False),
                      mlp_bias=tc.get("mlp_bias", False)),
            _vec(f"{t}.norm.weight", "text.norm.weight", "text", "tD")]
    tied = bool(cfg.get("tie_word_embeddings", tc.get("tie_word_embeddings", False)))
    drops = [(rf"^{v}\.embeddings\.position_ids$", "buffer, recomputed at load"),
             (rf"^{t}\.rotary_emb\.", "buffer, recomputed at load")]
    rows.append(lm_head(f"{t}.embed_tokens.weight", tied))
    return Family(name, _ARCH[name], _fix_blocks(rows), dims, drops=tuple(drops),
                  towers={"vision": {"module": v, "blocks": f"{v}.encoder.layers", "n": dims["vL"],
                                     "post_norm": f"{v}.post_layernorm"},
                          "projector": {"module": "model.connector", "scale_factor": sf},
                          "text": {"blocks": f"{t}.layers", "n": dims["tL"], "tied": tied}})
