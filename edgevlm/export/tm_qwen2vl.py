"""The tensor table of Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``).  Pure data, no torch (see :mod:`.tensor_map`).

Module names (transformers 5) and file keys, ``{i}`` a vision block / decoder layer:

    model.visual.patch_embed.proj.weight      vision.embed.patch.weight   DENSE [vD, C, Tp, P, P] (Conv3d)
    model.visual.blocks.{i}.norm1 / norm2     vision.blocks.{i}.norm1/2   LayerNorm (2-VL) / RMSNorm (2.5-VL)
    model.visual.blocks.{i}.attn.qkv          vision.blocks.{i}.attn.qkv  LINEAR [3 vD, vD] + bias (fused q|k|v)
    model.visual.blocks.{i}.attn.proj         vision.blocks.{i}.attn.o    LINEAR [vD, vD] + bias
    2-VL   mlp.fc1 / mlp.fc2                  vision.blocks.{i}.mlp.fc1/fc2         + biases
    2.5-VL mlp.gate_proj / up_proj / down_proj vision.blocks.{i}.mlp.gate/up/down    + biases
    model.visual.merger.ln_q                  projector.norm              LayerNorm (2-VL) / RMSNorm (2.5-VL)
    model.visual.merger.mlp.0 / mlp.2         projector.fc1 / fc2         LINEAR [pIn, pIn] / [tD, pIn], pIn = vD m^2
    model.language_model.*                    text.*                      via tensor_map._decoder (Qwen2: q/k/v bias)
    lm_head.weight                            lm_head.weight              from embed_tokens when tied (Qwen2-VL-2B)

Checkpoints spell the language model ``model.*`` and the tower ``visual.*`` (the hub layout,
which ``save_pretrained`` of transformers 5 still writes); :data:`RENAMES` maps them on the
module names.  Hub config.json files of Qwen2-VL keep the text settings at the top level (no
``text_config``), which :func:`text_config` accepts as well.
"""

from __future__ import annotations

from .tensor_map import Entry, Family, Kind, _decoder, _dense, _fix_blocks, _text_dims, _vec, lm_head

ARCHITECTURES = {"Qwen2VLForConditionalGeneration": "qwen2_vl",
                 "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl"}
MODEL_TYPES = {"qwen2_vl": "Qwen2VLForConditionalGeneration",
               "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}

# transformers' vision config defaults for keys a config.json may omit
VISION_DEFAULTS = {
    "qwen2_vl": {"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "hidden_act": "quick_gelu", "mlp_ratio": 4,
                 "num_heads": 16, "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2,
                 "temporal_patch_size": 2},
    "qwen2_5_vl": {"depth": 32, "hidden_size": 3584, "hidden_act": "silu", "intermediate_size": 3420,
                   "num_heads": 16, "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2,
                   "temporal_patch_size": 2, "window_size": 112, "out_hidden_size": 3584,
                   "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 4},
}
TEXT_DEFAULTS = {"rms_norm_eps": 1e-6, "hidden_act": "silu", "rope_theta": 1000000.0}

RENAMES = ((r"^visual\.", "model.visual."),
           (r"^model\.(?!visual\.|language_model\.)", "model.language_model."))


def family_name(cfg: dict) -> str:
    archs = cfg.get("architectures") or []
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    mt = cfg.get("model_type", "")
    if mt in MODEL_TYPES:
        return mt
    raise ValueError(f"not a Qwen2-VL / Qwen2.5-VL config (architectures {archs}, model_type {mt!r}); expected "
                     f"one of {', '.join(ARCHITECTURES)}")


def vision_config(cfg: dict) -> dict:
    """The vision config with transformers' defaults filled in (``in_chans`` read as ``in_channels``)."""
    name = family_name(cfg)
    vc = dict(cfg.get("vision_config") or {})
    if "in_channels" not in vc and "in_chans" in vc:  # older hub configs
        vc["in_channels"] = vc["in_chans"]
    return {**VISION_DEFAULTS[name], **{k: v for k, v in vc.items() if v is not None}}


def text_config(cfg: dict) -> dict:
    """The language-model config: ``text_config`` (transformers 5), else the top-level keys (hub
    Qwen2-VL configs), with ``rope_scaling`` / ``rope_theta`` kept as given."""
    tc = cfg.get("text_config")
    if tc:
        return {**TEXT_DEFAULTS, **tc}
    flat = {k: v for k, v in cfg.items() if k not in ("vision_config", "architectures", "model_type")}
    return {**TEXT_DEFAULTS, **flat}


def vision_dims(name: str, vc: dict) -> dict[str, int]:
    if name == "qwen2_vl":
        d, f, out = int(vc["embed_dim"]), int(vc["embed_dim"] * vc["mlp_ratio"]), int(vc["hidden_size"])
    else:
        d, f, out = int(vc["hidden_size"]), int(vc["intermediate_size"]), int(vc["out_hidden_size"])
    m = int(vc["spatial_merge_size"])
    return {"vD": d, "vF": f, "vL": int(vc["depth"]), "vC": int(vc["in_channels"]), "vP": int(vc["patch_size"]),
            "vTp": int(vc["temporal_patch_size"]), "vH": int(vc["num_heads"]), "pIn": d * m * m, "pOut": out}


def qwen2vl_family(cfg: dict) -> Family:
    name = family_name(cfg)
    vc, tc = vision_config(cfg), text_config(cfg)
    dims = {**vision_dims(name, vc), **_text_dims(tc)}
    if dims["pOut"] != dims["tD"]:
        raise ValueError(f"the vision merger outputs {dims['pOut']} features but the language model is "
                         f"{dims['tD']} wide; config.json is inconsistent")
    v, t, L = "model.visual", "vision", Kind.LINEAR
    b, k = f"{v}.blocks.{{i}}", "vision.blocks.{i}"
    rms = name == "qwen2_5_vl"  # Qwen2.5-VL: RMSNorm everywhere in the tower, SwiGLU MLP
    rows = [_dense(f"{v}.patch_embed.proj.weight", "vision.embed.patch.weight", t, "vD", "vC", "vTp", "vP", "vP")]
    for n in ("norm1", "norm2"):
        rows.append(_vec(f"{b}.{n}.weight", f"{k}.{n}.weight", t, "vD"))
        if not rms:
            rows.append(_vec(f"{b}.{n}.bias", f"{k}.{n}.bias", t, "vD"))
    rows += [Entry(f"{b}.attn.qkv.weight", f"{k}.attn.qkv.weight", L, t, (3 * dims["vD"], "vD")),
             Entry(f"{b}.attn.qkv.bias", f"{k}.attn.qkv.bias", Kind.VECTOR, t, (3 * dims["vD"],), min_bits=16),
             Entry(f"{b}.attn.proj.weight", f"{k}.attn.o.weight", L, t, ("vD", "vD")),
             _vec(f"{b}.attn.proj.bias", f"{k}.attn.o.bias", t, "vD")]
    mlp = ((("gate_proj", "gate", ("vF", "vD")), ("up_proj", "up", ("vF", "vD")), ("down_proj", "down", ("vD", "vF")))
           if rms else (("fc1", "fc1", ("vF", "vD")), ("fc2", "fc2", ("vD", "vF"))))
    for hf, ours, shape in mlp:
        rows += [Entry(f"{b}.mlp.{hf}.weight", f"{k}.mlp.{ours}.weight", L, t, shape),
                 _vec(f"{b}.mlp.{hf}.bias", f"{k}.mlp.{ours}.bias", t, shape[0])]
    p = "projector"
    rows.append(_vec(f"{v}.merger.ln_q.weight", "projector.norm.weight", p, "vD"))
    if not rms:
        rows.append(_vec(f"{v}.merger.ln_q.bias", "projector.norm.bias", p, "vD"))
    rows += [Entry(f"{v}.merger.mlp.0.weight", "projector.fc1.weight", L, p, ("pIn", "pIn"), min_bits=4),
             _vec(f"{v}.merger.mlp.0.bias", "projector.fc1.bias", p, "pIn"),
             Entry(f"{v}.merger.mlp.2.weight", "projector.fc2.weight", L, p, ("tD", "pIn"), min_bits=4),
             _vec(f"{v}.merger.mlp.2.bias", "projector.fc2.bias", p, "tD")]
    lm = "model.language_model"
    rows += [Entry(f"{lm}.embed_tokens.weight", "text.embed.tok", Kind.EMBED, "text", ("tV", "tD"), min_bits=8),
             *_decoder(lm, "text", qkv_bias=True, o_bias=False, mlp_bias=False),
             _vec(f"{lm}.norm.weight", "text.norm.weight", "text", "tD")]
    tied = bool(cfg.get("tie_word_embeddings", tc.get("tie_word_embeddings", False)))
    drops = [(r"^model\.visual\.rotary_pos_emb\.", "buffer, recomputed at load"),
             (r"^model\.language_model\.rotary_emb\.", "buffer, recomputed at load")]
    rows.append(lm_head(f"{lm}.embed_tokens.weight", tied))
    full = [int(i) for i in vc.get("fullatt_block_indexes") or []] if rms else list(range(dims["vL"]))
    return Family(name, MODEL_TYPES[name], _fix_blocks(rows), dims, drops=tuple(drops), renames=RENAMES,
                  towers={"vision": {"blocks": f"{v}.blocks", "n": dims["vL"], "full_attention": full,
                                     "merge": int(vc["spatial_merge_size"]), "patch": dims["vP"],
                                     "window": int(vc.get("window_size", 0) or 0)},
                          "projector": {"module": f"{v}.merger"},
                          "text": {"blocks": f"{lm}.layers", "n": dims["tL"], "tied": tied}})
