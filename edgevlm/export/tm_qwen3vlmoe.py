"""The tensor table of Qwen3-VL-MoE (``Qwen3VLMoeForConditionalGeneration``).  Pure data, no torch
(see :mod:`.tensor_map`).

Module names (transformers 5) and file keys, ``{i}`` a vision block / decoder layer, ``{j}`` a
DeepStack merger, ``{e}`` an expert:

    model.visual.patch_embed.proj.weight/bias   vision.embed.patch.weight/bias  DENSE [vD, C, Tp, P, P] (Conv3d) + bias
    model.visual.pos_embed.weight               vision.embed.pos                DENSE [vNpos, vD] (learned, square grid)
    model.visual.blocks.{i}.norm1 / norm2       vision.blocks.{i}.norm1/2       LayerNorm
    model.visual.blocks.{i}.attn.qkv / proj     vision.blocks.{i}.attn.qkv / o  LINEAR [3 vD, vD] / [vD, vD] + biases
    model.visual.blocks.{i}.mlp.linear_fc1/fc2  vision.blocks.{i}.mlp.fc1/fc2   LINEAR + biases (gelu tanh)
    model.visual.merger.norm / linear_fc1/fc2   projector.norm / fc1 / fc2      LayerNorm [vD]; [pIn, pIn], [tD, pIn]
    model.visual.deepstack_merger_list.{j}.*    projector.deepstack.{j}.*       LayerNorm [pIn] (after the m² shuffle)
    model.language_model.layers.{i}.self_attn   text.blocks.{i}.attn.q/k/v/o    LINEAR; q_norm / k_norm [hd] RMSNorm
    ...layers.{i}.mlp.gate.weight               text.blocks.{i}.moe.router.weight  DENSE [E, tD] (never quantized)
    ...layers.{i}.mlp.experts.gate_up_proj      text.blocks.{i}.moe.experts.{e}.gate / .up   LINEAR [Fe, tD] each
    ...layers.{i}.mlp.experts.down_proj         text.blocks.{i}.moe.experts.{e}.down         LINEAR [tD, Fe]
    ...layers.{i}.mlp.gate_proj/up_proj/down_proj (mlp_only_layers)  text.blocks.{i}.mlp.gate/up/down
    lm_head.weight                              lm_head.weight                  (tensor_map.lm_head)

The experts are one 3-D tensor per layer in the checkpoint; ``Family.fused`` splits it into one
[N, K] matrix per expert and projection (:func:`.tensor_map.fused_parts`), named
``...experts.gate_up_proj.{e}.gate`` / ``.{e}.up`` / ``...experts.down_proj.{e}``: those are the
canonical names the table rows, the quantizer and ``extra["src"]`` use.  Slice e of
``gate_up_proj`` is [2 Fe, tD] in the module layout, gate rows first (``chunk(2)`` in the HF
forward); the hub checkpoints store it transposed ([E, tD, 2 Fe]) and are accepted as
transformers accepts them (:func:`expert_slices`).  The router stays float16 (design.md: routing
decisions are discrete, a quantized router flips them).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from .tensor_map import Entry, Family, Kind, _dense, _fix_blocks, _text_dims, _vec, lm_head

ARCHITECTURE = "Qwen3VLMoeForConditionalGeneration"
NAME = "qwen3_vl_moe"

# transformers' config defaults for keys a config.json may omit
VISION_DEFAULTS = {"depth": 27, "hidden_size": 1152, "hidden_act": "gelu_pytorch_tanh", "intermediate_size": 4304,
                   "num_heads": 16, "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2,
                   "temporal_patch_size": 2, "out_hidden_size": 3584, "num_position_embeddings": 2304,
                   "deepstack_visual_indexes": [8, 16, 24]}
TEXT_DEFAULTS = {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
                 "num_attention_heads": 16, "hidden_act": "silu", "rms_norm_eps": 1e-6, "attention_bias": False,
                 "decoder_sparse_step": 1, "moe_intermediate_size": 1408, "num_experts_per_tok": 4,
                 "num_experts": 60, "mlp_only_layers": [], "max_position_embeddings": 128000}

RENAMES = ((r"^visual\.", "model.visual."),
           (r"^model\.(?!visual\.|language_model\.)", "model.language_model."))

# the fused expert tensors (canonical-name regex), as Family.fused rows
GATE_UP, DOWN = r"\.mlp\.experts\.gate_up_proj$", r"\.mlp\.experts\.down_proj$"


def vision_config(cfg: dict) -> dict:
    return {**VISION_DEFAULTS, **{k: v for k, v in (cfg.get("vision_config") or {}).items() if v is not None}}


def text_config(cfg: dict) -> dict:
    """The text config with defaults; ``num_local_experts`` (what transformers 5 writes) read as
    ``num_experts`` (what the hub configs write)."""
    tc = {k: v for k, v in (cfg.get("text_config") or {}).items() if v is not None}
    if "num_experts" not in tc and "num_local_experts" in tc:
        tc["num_experts"] = tc["num_local_experts"]
    return {**TEXT_DEFAULTS, **tc}


def moe_layers(tc: dict) -> list[int]:
    """Decoder layers with a sparse MoE block (``Qwen3VLMoeTextDecoderLayer.__init__``'s rule)."""
    step, only = int(tc["decoder_sparse_step"]), {int(i) for i in tc.get("mlp_only_layers") or []}
    return [i for i in range(int(tc["num_hidden_layers"]))
            if i not in only and int(tc["num_experts"]) > 0 and (i + 1) % step == 0]


def _dims(vc: dict, tc: dict) -> dict[str, int]:
    m = int(vc["spatial_merge_size"])
    d = int(vc["hidden_size"])
    npos = int(vc["num_position_embeddings"])
    if int(npos ** 0.5) ** 2 != npos:
        raise ValueError(f"vision num_position_embeddings {npos} is not a perfect square (a square grid of "
                         "learned positions); config.json is inconsistent")
    fe = int(tc["moe_intermediate_size"])
    return {"vD": d, "vF": int(vc["intermediate_size"]), "vL": int(vc["depth"]), "vC": int(vc["in_channels"]),
            "vP": int(vc["patch_size"]), "vTp": int(vc["temporal_patch_size"]), "vH": int(vc["num_heads"]),
            "vNpos": npos, "pIn": d * m * m, "pOut": int(vc["out_hidden_size"]),
            "nDS": len(vc["deepstack_visual_indexes"] or []), **_text_dims(tc),
            "tHd": int(tc.get("head_dim") or int(tc["hidden_size"]) // int(tc["num_attention_heads"])),
            "tE": int(tc["num_experts"]), "tFe": fe, "tFe2": 2 * fe}


def _vision_rows(dims: dict) -> list[Entry]:
    v, t, L, V = "model.visual", "vision", Kind.LINEAR, Kind.VECTOR
    b, k = f"{v}.blocks.{{i}}", "vision.blocks.{i}"
    rows = [_dense(f"{v}.patch_embed.proj.weight", "vision.embed.patch.weight", t, "vD", "vC", "vTp", "vP", "vP"),
            _vec(f"{v}.patch_embed.proj.bias", "vision.embed.patch.bias", t, "vD"),
            _dense(f"{v}.pos_embed.weight", "vision.embed.pos", t, "vNpos", "vD")]
    for n in ("norm1", "norm2"):
        rows += [_vec(f"{b}.{n}.weight", f"{k}.{n}.weight", t, "vD"), _vec(f"{b}.{n}.bias", f"{k}.{n}.bias", t, "vD")]
    for hf, ours, shape in (("attn.qkv", "attn.qkv", (3 * dims["vD"], "vD")), ("attn.proj", "attn.o", ("vD", "vD")),
                            ("mlp.linear_fc1", "mlp.fc1", ("vF", "vD")), ("mlp.linear_fc2", "mlp.fc2", ("vD", "vF"))):
        rows += [Entry(f"{b}.{hf}.weight", f"{k}.{ours}.weight", L, t, shape, blocks="vL"),
                 Entry(f"{b}.{hf}.bias", f"{k}.{ours}.bias", V, t, (shape[0],), min_bits=16, blocks="vL")]

    def merger(src: str, key: str, norm_dim: str, blocks: str | None) -> list[Entry]:
        p = "projector"
        return [Entry(f"{src}.norm.weight", f"{key}.norm.weight", V, p, (norm_dim,), 16, blocks),
                Entry(f"{src}.norm.bias", f"{key}.norm.bias", V, p, (norm_dim,), 16, blocks),
                Entry(f"{src}.linear_fc1.weight", f"{key}.fc1.weight", L, p, ("pIn", "pIn"), 4, blocks),
                Entry(f"{src}.linear_fc1.bias", f"{key}.fc1.bias", V, p, ("pIn",), 16, blocks),
                Entry(f"{src}.linear_fc2.weight", f"{key}.fc2.weight", L, p, ("tD", "pIn"), 4, blocks),
                Entry(f"{src}.linear_fc2.bias", f"{key}.fc2.bias", V, p, ("tD",), 16, blocks)]

    rows += merger(f"{v}.merger", "projector", "vD", None)
    if dims["nDS"]:
        rows += merger(f"{v}.deepstack_merger_list.{{i}}", "projector.deepstack.{i}", "pIn", "nDS")
    return rows


def _text_rows(tc: dict, dims: dict) -> list[Entry]:
    """Decoder layers: ``{i}`` rows where every layer has them, concrete layer indices for the
    MoE / dense MLP rows when the config mixes the two (``mlp_only_layers``, ``decoder_sparse_step``)."""
    lm, t, L = "model.language_model", "text", Kind.LINEAR
    b, k = f"{lm}.layers.{{i}}", "text.blocks.{i}"
    bias = bool(tc.get("attention_bias"))
    shapes = {"q": ("tHq", "tD"), "k": ("tHkv", "tD"), "v": ("tHkv", "tD"), "o": ("tD", "tHq")}
    rows = [Entry(f"{lm}.embed_tokens.weight", "text.embed.tok", Kind.EMBED, t, ("tV", "tD"), min_bits=8),
            _vec(f"{b}.input_layernorm.weight", f"{k}.norm1.weight", t, "tD"),
            _vec(f"{b}.post_attention_layernorm.weight", f"{k}.norm2.weight", t, "tD"),
            _vec(f"{b}.self_attn.q_norm.weight", f"{k}.attn.q_norm.weight", t, "tHd"),
            _vec(f"{b}.self_attn.k_norm.weight", f"{k}.attn.k_norm.weight", t, "tHd")]
    for x in "qkvo":
        rows.append(Entry(f"{b}.self_attn.{x}_proj.weight", f"{k}.attn.{x}.weight", L, t, shapes[x], blocks="tL"))
        if bias:
            rows.append(_vec(f"{b}.self_attn.{x}_proj.bias", f"{k}.attn.{x}.bias", t, shapes[x][0]))
    moe = moe_layers(tc)
    n = dims["tL"]

    def layer_rows(layers: list[int], make) -> list[Entry]:
        if len(layers) == n:
            return make("{i}")
        return [Entry(**{**r.__dict__, "src": r.src.replace("{i}", str(i)), "key": r.key.replace("{i}", str(i)),
                         "blocks": None}) for i in layers for r in make("{i}")]

    def moe_rows(i: str) -> list[Entry]:
        src, key = f"{lm}.layers.{i}.mlp", f"text.blocks.{i}.moe"
        out = [Entry(f"{src}.gate.weight", f"{key}.router.weight", Kind.DENSE, t, ("tE", "tD"), min_bits=16,
                     blocks="tL")]
        for e in range(dims["tE"]):
            ex = f"{key}.experts.{e}"
            out += [Entry(f"{src}.experts.gate_up_proj.{e}.gate", f"{ex}.gate.weight", L, t, ("tFe", "tD"), blocks="tL"),
                    Entry(f"{src}.experts.gate_up_proj.{e}.up", f"{ex}.up.weight", L, t, ("tFe", "tD"), blocks="tL"),
                    Entry(f"{src}.experts.down_proj.{e}", f"{ex}.down.weight", L, t, ("tD", "tFe"), blocks="tL")]
        return out

    def dense_rows(i: str) -> list[Entry]:
        src, key = f"{lm}.layers.{i}.mlp", f"text.blocks.{i}.mlp"
        return [Entry(f"{src}.{x}_proj.weight", f"{key}.{x}.weight", L, t, shape, blocks="tL")
                for x, shape in (("gate", ("tF", "tD")), ("up", ("tF", "tD")), ("down", ("tD", "tF")))]

    rows += layer_rows(moe, moe_rows) if moe else []
    dense = [i for i in range(n) if i not in moe]
    rows += layer_rows(dense, dense_rows) if dense else []
    rows.append(_vec(f"{lm}.norm.weight", "text.norm.weight", t, "tD"))
    return rows


def qwen3vlmoe_family(cfg: dict) -> Family:
    vc, tc = vision_config(cfg), text_config(cfg)
    dims = _dims(vc, tc)
    if dims["pOut"] != dims["tD"]:
        raise ValueError(f"the vision merger outputs {dims['pOut']} features but the language model is "
                         f"{dims['tD']} wide; config.json is inconsistent")
    deep = [int(i) for i in vc["deepstack_visual_indexes"] or []]
    if any(not 0 <= i < dims["vL"] for i in deep) or len(deep) > dims["tL"]:
        raise ValueError(f"deepstack_visual_indexes {deep} must name vision blocks 0..{dims['vL'] - 1}, at most "
                         f"one per decoder layer ({dims['tL']})")
    tied = bool(cfg.get("tie_word_embeddings", tc.get("tie_word_embeddings", False)))
    rows = _vision_rows(dims) + _text_rows(tc, dims)
    rows.append(lm_head("model.language_model.embed_tokens.weight", tied))
    drops = ((r"^model\.visual\.rotary_pos_emb\.", "buffer, recomputed at load"),
             (r"^model\.language_model\.rotary_emb\.", "buffer, recomputed at load"))
    return Family(NAME, ARCHITECTURE, _fix_blocks(rows), dims, drops=drops, renames=RENAMES,
                  fused=((GATE_UP, ("tFe2", "tD"), ("gate", "up")), (DOWN, ("tD", "tFe"), ())),
                  towers={"vision": {"blocks": "model.visual.blocks", "n": dims["vL"], "deepstack": deep,
                                     "merge": int(vc["spatial_merge_size"])},
                          "projector": {"module": "model.visual.merger",
                                        "deepstack": [f"model.visual.deepstack_merger_list.{j}"
                                                      for j in range(len(deep))]},
                          "text": {"blocks": "model.language_model.layers", "n": dims["tL"], "tied": tied,
                                   "moe": moe_layers(tc), "experts": dims["tE"],
                                   "top_k": int(tc["num_experts_per_tok"])}})


# ------------------------------------------------------------------------------------------
# The fused expert tensors, both ways (numpy; the recipe and the tests use these).

def expert_slices(fused: np.ndarray, n: int, k: int) -> np.ndarray:
    """A fused expert tensor [E, N, K] (module layout) or [E, K, N] (hub layout) -> [E, N, K], as
    transformers' ``Transpose(check_dims=True)`` reads it: as is when it already matches."""
    a = np.asarray(fused)
    if a.ndim != 3 or tuple(a.shape[1:]) not in ((n, k), (k, n)):
        raise ValueError(f"fused expert tensor must be [E, {n}, {k}] or [E, {k}, {n}], got {list(a.shape)}")
    return a if tuple(a.shape[1:]) == (n, k) else np.ascontiguousarray(a.transpose(0, 2, 1))


_PART = re.compile(r"^(?P<fused>.+\.mlp\.experts\.(?:gate_up_proj|down_proj))\.(?P<e>\d+)(?:\.(?P<part>gate|up))?$")


def fuse_experts(state: dict[str, Any]) -> dict[str, Any]:
    """{name: [N, K]} with per-expert entries (``...gate_up_proj.{e}.gate`` etc., e.g. from
    ``evaluate.dequantized_state_dict``) -> the same dict with each layer's experts fused back into
    the module parameters ``gate_up_proj`` [E, 2 Fe, tD] and ``down_proj`` [E, tD, Fe]."""
    out, groups = {}, {}
    for name, a in state.items():
        m = _PART.match(name)
        if m is None:
            out[name] = a
            continue
        groups.setdefault(m["fused"], {})[(int(m["e"]), m["part"])] = np.asarray(a)
    for fused, parts in groups.items():
        n_exp = 1 + max(e for e, _ in parts)
        if fused.endswith("gate_up_proj"):
            out[fused] = np.stack([np.concatenate([parts[(e, "gate")], parts[(e, "up")]]) for e in range(n_exp)])
        else:
            out[fused] = np.stack([parts[(e, None)] for e in range(n_exp)])
    return out
