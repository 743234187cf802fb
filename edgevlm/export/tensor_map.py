"""Which source tensor goes where: one declarative table per model family.

A table row (:class:`Entry`) says, for one Hugging Face parameter name (with ``{i}`` for the
block index): the key it gets in the ``.evlm`` file, its kind (quantizable linear, embedding
table, dense matrix kept float16, float32 vector), the tower it belongs to, its expected shape
(symbols resolved from config.json) and the lowest width it may be stored at.  ``drops`` lists
checkpoint tensors that are deliberately not exported, each with its reason.  A checkpoint
tensor that matches neither is an error, as is a row with no tensor: nothing is skipped
silently.  Names are the module names of the transformers model class; ``renames`` map older
checkpoint spellings (e.g. hub LLaVA's ``language_model.model.*``) onto them.

File keys are family-independent (``vision.blocks.{i}.attn.q.weight``, ``text.embed.tok``, ...)
so one runtime reads every family.  No torch here: pure data plus the functions that build it.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any


class Kind(str, enum.Enum):
    LINEAR = "linear"   # nn.Linear weight [N, K]: quantized at the tower's width
    EMBED = "embed"     # lookup table [V, D]: rows quantized (never below 8 bits)
    DENSE = "dense"     # matrix kept float16: patch conv, position tables, final projections
    VECTOR = "vector"   # biases, norms, scalars: float32 (tiny, and exact)


@dataclass(frozen=True)
class Entry:
    src: str                      # module parameter name; "{i}" = block index
    key: str                      # file key; "{i}" = block index
    kind: Kind
    tower: str                    # "vision" | "projector" | "text"
    shape: tuple[Any, ...]        # ints or dim symbols of Family.dims
    min_bits: int = 2             # lowest width allowed (16 = never quantized)
    blocks: str | None = None     # dims symbol giving the number of blocks when "{i}" is used
    tied_from: str | None = None  # src of the row whose tensor this row reuses when the checkpoint
                                  # lacks ``src`` (a tied LM head reads the token embeddings)


@dataclass(frozen=True)
class Family:
    """Everything the exporter needs to know about one architecture, as data."""

    name: str                                  # "clip", "siglip", "llava", "bert"
    architecture: str                          # HF class name, e.g. "CLIPModel"
    entries: tuple[Entry, ...]
    dims: dict[str, int]                       # shape symbols resolved from config.json
    drops: tuple[tuple[str, str], ...] = ()    # (regex over canonical names, reason)
    renames: tuple[tuple[str, str], ...] = ()  # (regex over checkpoint names, replacement)
    towers: dict[str, Any] = field(default_factory=dict)  # tower -> calibration facts (calibrate.py)
    # Checkpoint tensors [E, N, K] that hold E file tensors (MoE experts fused in one 3-D tensor):
    # (regex over canonical names, one slice's (N, K) in dim symbols, names of the equal row blocks
    # a slice splits into, or () to keep it whole).  See fused_parts.
    fused: tuple[tuple[str, tuple[Any, Any], tuple[str, ...]], ...] = ()

    def canonical(self, ckpt_name: str) -> str:
        for pat, rep in self.renames:
            new, n = re.subn(pat, rep, ckpt_name, count=1)
            if n:
                return new
        return ckpt_name


# --------------------------------------------------------------------------------------------
# Building blocks (one function per tower type; the tables below assemble them).

def _vit_block(src: str, key: str, tower: str, d: str, f: str, n: str) -> list[Entry]:
    """CLIP / SigLIP encoder layer (pre-LN, biases everywhere).  d, f, n: dim symbols."""
    L, V = Kind.LINEAR, Kind.VECTOR
    rows = [(f"{src}.layer_norm1.weight", f"{key}.norm1.weight", V, (d,)),
            (f"{src}.layer_norm1.bias", f"{key}.norm1.bias", V, (d,))]
    for hf, ours in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("out_proj", "o")):
        rows += [(f"{src}.self_attn.{hf}.weight", f"{key}.attn.{ours}.weight", L, (d, d)),
                 (f"{src}.self_attn.{hf}.bias", f"{key}.attn.{ours}.bias", V, (d,))]
    rows += [(f"{src}.layer_norm2.weight", f"{key}.norm2.weight", V, (d,)),
             (f"{src}.layer_norm2.bias", f"{key}.norm2.bias", V, (d,)),
             (f"{src}.mlp.fc1.weight", f"{key}.mlp.fc1.weight", L, (f, d)),
             (f"{src}.mlp.fc1.bias", f"{key}.mlp.fc1.bias", V, (f,)),
             (f"{src}.mlp.fc2.weight", f"{key}.mlp.fc2.weight", L, (d, f)),
             (f"{src}.mlp.fc2.bias", f"{key}.mlp.fc2.bias", V, (d,))]
    return [Entry(s, k, kind, tower, shape, blocks=n) for s, k, kind, shape in rows]


def _vec(src: str, key: str, tower: str, *shape: Any) -> Entry:
    return Entry(src, key, Kind.VECTOR, tower, tuple(shape), min_bits=16)


def _dense(src: str, key: str, tower: str, *shape: Any) -> Entry:
    return Entry(src, key, Kind.DENSE, tower, tuple(shape), min_bits=16)


def _norm(src: str, key: str, tower: str, d: str, bias: bool = True) -> list[Entry]:
    out = [_vec(f"{src}.weight", f"{key}.weight", tower, d)]
    return out + [_vec(f"{src}.bias", f"{key}.bias", tower, d)] if bias else out


def _clip_vision(src: str, key: str, *, class_token: bool, pre_norm: bool, blocks: str) -> list[Entry]:
    """CLIP (class token, pre-LN) or SigLIP (no class token) vision embeddings + blocks."""
    t = "vision"
    rows = [_dense(f"{src}.embeddings.patch_embedding.weight", f"{key}.embed.patch.weight", t, "vD", "vC", "vP", "vP"),
            _dense(f"{src}.embeddings.position_embedding.weight", f"{key}.embed.pos", t, "vT", "vD")]
    if class_token:
        rows.append(_vec(f"{src}.embeddings.class_embedding", f"{key}.embed.class", t, "vD"))
    else:  # SigLIP's patch conv has a bias
        rows.append(_vec(f"{src}.embeddings.patch_embedding.bias", f"{key}.embed.patch.bias", t, "vD"))
    if pre_norm:
        rows += _norm(f"{src}.pre_layrnorm", f"{key}.pre_norm", t, "vD")
    rows += _vit_block(f"{src}.encoder.layers.{{i}}", f"{key}.blocks.{{i}}", t, "vD", "vF", blocks)
    return rows


def _clip_text(src: str, key: str, *, text_bits_min: int = 8) -> list[Entry]:
    t = "text"
    return [Entry(f"{src}.embeddings.token_embedding.weight", f"{key}.embed.tok", Kind.EMBED, t, ("tV", "tD"),
                  min_bits=text_bits_min),
            _dense(f"{src}.embeddings.position_embedding.weight", f"{key}.embed.pos", t, "tT", "tD"),
            *_vit_block(f"{src}.encoder.layers.{{i}}", f"{key}.blocks.{{i}}", t, "tD", "tF", "tL"),
            *_norm(f"{src}.final_layer_norm", f"{key}.final_norm", t, "tD")]


def _decoder(src: str, key: str, *, qkv_bias: bool, o_bias: bool, mlp_bias: bool) -> list[Entry]:
    """Llama / Qwen2 decoder layers (RMSNorm, GQA attention, SwiGLU MLP)."""
    t, L = "text", Kind.LINEAR
    b = f"{src}.layers.{{i}}"
    k = f"{key}.blocks.{{i}}"
    shapes = {"q": ("tHq", "tD"), "k": ("tHkv", "tD"), "v": ("tHkv", "tD"), "o": ("tD", "tHq")}
    rows = [_vec(f"{b}.input_layernorm.weight", f"{k}.norm1.weight", t, "tD")]
    for x in "qkvo":
        rows.append(Entry(f"{b}.self_attn.{x}_proj.weight", f"{k}.attn.{x}.weight", L, t, shapes[x], blocks="tL"))
        if (qkv_bias and x != "o") or (o_bias and x == "o"):
            rows.append(Entry(f"{b}.self_attn.{x}_proj.bias", f"{k}.attn.{x}.bias", Kind.VECTOR, t,
                              (shapes[x][0],), min_bits=16, blocks="tL"))
    rows.append(_vec(f"{b}.post_attention_layernorm.weight", f"{k}.norm2.weight", t, "tD"))
    for x, shape in (("gate", ("tF", "tD")), ("up", ("tF", "tD")), ("down", ("tD", "tF"))):
        rows.append(Entry(f"{b}.mlp.{x}_proj.weight", f"{k}.mlp.{x}.weight", L, t, shape, blocks="tL"))
        if mlp_bias:
            rows.append(Entry(f"{b}.mlp.{x}_proj.bias", f"{k}.mlp.{x}.bias", Kind.VECTOR, t, (shape[0],),
                              min_bits=16, blocks="tL"))
    return rows  # per-block _vec rows get their block count from _fix_blocks


def lm_head(embed_src: str, tied: bool) -> Entry:
    """The LM head row.  A tied head (tie_word_embeddings) still gets its own packed matrix,
    quantized from the token-embedding tensor at the language model's width (>= 4 bits): the
    embedding table stays 8-bit for lookups, but as the head it would be read in full for every
    generated token -- for a 1.5B LM with a 151936-token vocabulary that is 0.23 GB at 8 bits,
    a third of the per-token traffic of a 4-bit model.  The pipeline drops this row again when the
    head would not be narrower than the table (fp16/8-bit exports), so nothing is stored twice."""
    return Entry("lm_head.weight", "lm_head.weight", Kind.LINEAR, "text", ("tV", "tD"), min_bits=4,
                 tied_from=embed_src if tied else None)


def _fix_blocks(rows: list[Entry]) -> tuple[Entry, ...]:
    """Give every "{i}" row without a block count the count of its tower's blocks."""
    out = []
    for r in rows:
        if "{i}" in r.src and r.blocks is None:
            r = Entry(**{**r.__dict__, "blocks": "vL" if r.tower == "vision" else "tL"})
        out.append(r)
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Dims from config.json (dicts, so this module needs no transformers import).

def _vision_dims(vc: dict, *, class_token: bool) -> dict[str, int]:
    n_patches = (vc["image_size"] // vc["patch_size"]) ** 2
    return {"vD": vc["hidden_size"], "vF": vc["intermediate_size"], "vL": vc["num_hidden_layers"],
            "vC": vc.get("num_channels", 3), "vP": vc["patch_size"], "vT": n_patches + int(class_token),
            "vH": vc["num_attention_heads"]}


def _text_dims(tc: dict) -> dict[str, int]:
    d, h = tc["hidden_size"], tc["num_attention_heads"]
    hd = tc.get("head_dim") or d // h
    return {"tD": d, "tF": tc["intermediate_size"], "tL": tc["num_hidden_layers"], "tV": tc["vocab_size"],
            "tT": tc.get("max_position_embeddings", 0), "tHq": h * hd,
            "tHkv": tc.get("num_key_value_heads", h) * hd}


# CLIP defaults that CLIPVisionConfig/CLIPTextConfig fill in when config.json omits them.
_CLIP_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                         "num_attention_heads": 12, "image_size": 224, "patch_size": 32, "num_channels": 3}
_CLIP_TEXT_DEFAULTS = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                       "num_attention_heads": 8, "vocab_size": 49408, "max_position_embeddings": 77}
_SIGLIP_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                           "num_attention_heads": 12, "image_size": 224, "patch_size": 16, "num_channels": 3}
_SIGLIP_TEXT_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                         "num_attention_heads": 12, "vocab_size": 32000, "max_position_embeddings": 64}


def _sub(cfg: dict, name: str, defaults: dict) -> dict:
    return {**defaults, **(cfg.get(name) or {})}


def clip_family(cfg: dict) -> Family:
    vc = _sub(cfg, "vision_config", _CLIP_VISION_DEFAULTS)
    tc = _sub(cfg, "text_config", _CLIP_TEXT_DEFAULTS)
    dims = {**_vision_dims(vc, class_token=True), **_text_dims(tc), "E": cfg.get("projection_dim", 512)}
    rows = [*_clip_vision("vision_model", "vision", class_token=True, pre_norm=True, blocks="vL"),
            *_norm("vision_model.post_layernorm", "vision.post_norm", "vision", "vD"),
            _dense("visual_projection.weight", "vision.proj.weight", "vision", "E", "vD"),
            *_clip_text("text_model", "text"),
            _dense("text_projection.weight", "text.proj.weight", "text", "E", "tD"),
            _vec("logit_scale", "logit_scale", "text")]
    return Family("clip", "CLIPModel", _fix_blocks(rows), dims,
                  drops=((r"^(vision|text)_model\.embeddings\.position_ids$", "buffer, recomputed at load"),),
                  towers={"vision": {"blocks": "vision_model.encoder.layers", "n": dims["vL"]},
                          "text": {"blocks": "text_model.encoder.layers", "n": dims["tL"]}})


def siglip_family(cfg: dict) -> Family:
    vc = _sub(cfg, "vision_config", _SIGLIP_VISION_DEFAULTS)
    tc = _sub(cfg, "text_config", _SIGLIP_TEXT_DEFAULTS)
    dims = {**_vision_dims(vc, class_token=False), **_text_dims(tc)}
    rows = [*_clip_vision("vision_model", "vision", class_token=False, pre_norm=False, blocks="vL"),
            *_norm("vision_model.post_layernorm", "vision.post_norm", "vision", "vD")]
    if vc.get("vision_use_head", True):
        h = "vision_model.head"
        rows += [_dense(f"{h}.probe", "vision.head.probe", "vision", 1, 1, "vD"),
                 _dense(f"{h}.attention.in_proj_weight", "vision.head.attn.in_proj.weight", "vision", 3 * dims["vD"], "vD"),
                 _vec(f"{h}.attention.in_proj_bias", "vision.head.attn.in_proj.bias", "vision", 3 * dims["vD"]),
                 _dense(f"{h}.attention.out_proj.weight", "vision.head.attn.out_proj.weight", "vision", "vD", "vD"),
                 _vec(f"{h}.attention.out_proj.bias", "vision.head.attn.out_proj.bias", "vision", "vD"),
                 *_norm(f"{h}.layernorm", "vision.head.norm", "vision", "vD"),
                 _dense(f"{h}.mlp.fc1.weight", "vision.head.mlp.fc1.weight", "vision", "vF", "vD"),
                 _vec(f"{h}.mlp.fc1.bias", "vision.head.mlp.fc1.bias", "vision", "vF"),
                 _dense(f"{h}.mlp.fc2.weight", "vision.head.mlp.fc2.weight", "vision", "vD", "vF"),
                 _vec(f"{h}.mlp.fc2.bias", "vision.head.mlp.fc2.bias", "vision", "vD")]
    rows += [*_clip_text("text_model", "text"),
             _dense("text_model.head.weight", "text.head.weight", "text", tc.get("projection_size") or dims["tD"], "tD"),
             _vec("text_model.head.bias", "text.head.bias", "text", tc.get("projection_size") or dims["tD"]),
             _vec("logit_scale", "logit_scale", "text", 1), _vec("logit_bias", "logit_bias", "text", 1)]
    return Family("siglip", "SiglipModel", _fix_blocks(rows), dims,
                  drops=((r"^(vision|text)_model\.embeddings\.position_ids$", "buffer, recomputed at load"),),
                  towers={"vision": {"blocks": "vision_model.encoder.layers", "n": dims["vL"]},
                          "text": {"blocks": "text_model.encoder.layers", "n": dims["tL"]}})


def _feature_layers(cfg: dict) -> list[int]:
    fl = cfg.get("vision_feature_layer", -2)
    return list(fl) if isinstance(fl, (list, tuple)) else [fl]


def llava_used_vision_layers(cfg: dict, n_layers: int) -> int:
    """Vision blocks LLaVA actually runs: hidden_states[k] is the output of block k-1
    (hidden_states[0] is the block-0 input), so blocks past the deepest selected one are dead."""
    idx = [f if f >= 0 else n_layers + 1 + f for f in _feature_layers(cfg)]
    if any(not 0 < i <= n_layers for i in idx):
        raise ValueError(f"vision_feature_layer {cfg.get('vision_feature_layer')} is out of range for a vision "
                         f"tower of {n_layers} layers")
    return max(idx)


def llava_family(cfg: dict) -> Family:
    vc, tc = dict(cfg.get("vision_config") or {}), dict(cfg.get("text_config") or {})
    vtype, ttype = vc.get("model_type", "clip_vision_model"), tc.get("model_type", "llama")
    if vtype not in ("clip_vision_model", "siglip_vision_model"):
        raise ValueError(f"LLaVA with a {vtype!r} vision tower is not supported; supported: CLIP, SigLIP")
    if ttype not in ("llama", "qwen2"):
        raise ValueError(f"LLaVA with a {ttype!r} language model is not supported; supported: llama, qwen2")
    clip = vtype == "clip_vision_model"
    vc = {**(_CLIP_VISION_DEFAULTS if clip else _SIGLIP_VISION_DEFAULTS), **vc}
    dims = {**_vision_dims(vc, class_token=clip), **_text_dims(tc)}
    used = llava_used_vision_layers(cfg, dims["vL"])
    dims["vLused"] = used
    nfeat = len(_feature_layers(cfg))
    dims["pIn"] = nfeat * dims["vD"]
    v = "model.vision_tower"
    rows = _clip_vision(v, "vision", class_token=clip, pre_norm=clip, blocks="vLused")
    pb = cfg.get("multimodal_projector_bias", True)
    rows += [Entry("model.multi_modal_projector.linear_1.weight", "projector.fc1.weight", Kind.LINEAR, "projector",
                   ("tD", "pIn"), min_bits=4),
             Entry("model.multi_modal_projector.linear_2.weight", "projector.fc2.weight", Kind.LINEAR, "projector",
                   ("tD", "tD"), min_bits=4)]
    if pb:
        rows += [_vec("model.multi_modal_projector.linear_1.bias", "projector.fc1.bias", "projector", "tD"),
                 _vec("model.multi_modal_projector.linear_2.bias", "projector.fc2.bias", "projector", "tD")]
    qwen = ttype == "qwen2"
    rows += [Entry("model.language_model.embed_tokens.weight", "text.embed.tok", Kind.EMBED, "text", ("tV", "tD"),
                   min_bits=8),
             *_decoder("model.language_model", "text", qkv_bias=qwen or tc.get("attention_bias", False),
                       o_bias=(not qwen) and tc.get("attention_bias", False), mlp_bias=tc.get("mlp_bias", False)),
             _vec("model.language_model.norm.weight", "text.norm.weight", "text", "tD")]
    tied = cfg.get("tie_word_embeddings", tc.get("tie_word_embeddings", False))
    drops = [(r"^model\.vision_tower\.embeddings\.position_ids$", "buffer, recomputed at load"),
             (r"^model\.vision_tower\.post_layernorm\.", "unused: LLaVA reads hidden states before it"),
             (r"^model\.vision_tower\.head\.", "unused: LLaVA reads hidden states, not the pooled output"),
             (r"^model\.language_model\.rotary_emb\.", "buffer, recomputed at load")]
    if used < dims["vL"]:
        drops.append((rf"^model\.vision_tower\.encoder\.layers\.({'|'.join(map(str, range(used, dims['vL'])))})\.",
                      f"unused: vision_feature_layer={cfg.get('vision_feature_layer', -2)} reads the output of "
                      f"block {used - 1}"))
    rows.append(lm_head("model.language_model.embed_tokens.weight", tied))
    renames = ((r"^language_model\.lm_head\.", "lm_head."),
               (r"^language_model\.model\.", "model.language_model."),
               (r"^language_model\.", "model.language_model."),
               (r"^vision_tower\.vision_model\.", "model.vision_tower."),
               (r"^vision_tower\.", "model.vision_tower."),
               (r"^multi_modal_projector\.", "model.multi_modal_projector."))
    rows = [Entry(**{**r.__dict__, "blocks": "vLused"}) if r.blocks == "vL" else r for r in rows]
    return Family("llava", "LlavaForConditionalGeneration", _fix_blocks(rows), dims, drops=tuple(drops),
                  renames=renames,
                  towers={"vision": {"blocks": f"{v}.encoder.layers", "n": used, "clip": clip},
                          "projector": {"module": "model.multi_modal_projector"},
                          "text": {"blocks": "model.language_model.layers", "n": dims["tL"], "tied": tied}})


def bert_family(cfg: dict) -> Family:
    """BERT-family sentence encoder (e.g. all-MiniLM-L6-v2); the text tower only."""
    d = {"tD": cfg["hidden_size"], "tF": cfg["intermediate_size"], "tL": cfg["num_hidden_layers"],
         "tV": cfg["vocab_size"], "tT": cfg.get("max_position_embeddings", 512), "tTT": cfg.get("type_vocab_size", 2)}
    t, L = "text", Kind.LINEAR
    rows = [Entry("embeddings.word_embeddings.weight", "text.embed.tok", Kind.EMBED, t, ("tV", "tD"), min_bits=8),
            _dense("embeddings.position_embeddings.weight", "text.embed.pos", t, "tT", "tD"),
            _dense("embeddings.token_type_embeddings.weight", "text.embed.type", t, "tTT", "tD"),
            *_norm("embeddings.LayerNorm", "text.embed.norm", t, "tD")]
    b, k = "encoder.layer.{i}", "text.blocks.{i}"
    for hf, ours, shape in (("attention.self.query", "attn.q", ("tD", "tD")),
                            ("attention.self.key", "attn.k", ("tD", "tD")),
                            ("attention.self.value", "attn.v", ("tD", "tD")),
                            ("attention.output.dense", "attn.o", ("tD", "tD")),
                            ("intermediate.dense", "mlp.fc1", ("tF", "tD")),
                            ("output.dense", "mlp.fc2", ("tD", "tF"))):
        rows += [Entry(f"{b}.{hf}.weight", f"{k}.{ours}.weight", L, t, shape),
                 _vec(f"{b}.{hf}.bias", f"{k}.{ours}.bias", t, shape[0])]
    rows += [*_norm(f"{b}.attention.output.LayerNorm", f"{k}.norm1", t, "tD"),
             *_norm(f"{b}.output.LayerNorm", f"{k}.norm2", t, "tD")]
    if cfg.get("add_pooling_layer", True):
        rows += [_dense("pooler.dense.weight", "text.pooler.weight", t, "tD", "tD"),
                 _vec("pooler.dense.bias", "text.pooler.bias", t, "tD")]
    return Family("bert", "BertModel", _fix_blocks(rows), d,
                  drops=((r"^embeddings\.(position_ids|token_type_ids)$", "buffer, recomputed at load"),
                         (r"^cls\.", "pre-training head, not part of the encoder")),
                  renames=((r"^bert\.", ""),),
                  towers={"text": {"blocks": "encoder.layer", "n": d["tL"]}})


def _lazy(module: str, fn: str):
    """A table builder that lives in its own module (imported on first use; it imports this one)."""
    def build(cfg: dict) -> Family:
        import importlib

        return getattr(importlib.import_module(f"{__package__}.{module}"), fn)(cfg)
    build.__name__ = fn
    return build


#: architecture (config.json "architectures"[0]) -> table builder
FAMILIES = {
    "CLIPModel": clip_family,
    "SiglipModel": siglip_family,
    "LlavaForConditionalGeneration": llava_family,
    "BertModel": bert_family,
    "Qwen2VLForConditionalGeneration": _lazy("tm_qwen2vl", "qwen2vl_family"),
    "Qwen2_5_VLForConditionalGeneration": _lazy("tm_qwen2vl", "qwen2vl_family"),
    "Idefics3ForConditionalGeneration": _lazy("tm_idefics3", "idefics3_family"),
    "SmolVLMForConditionalGeneration": _lazy("tm_idefics3", "idefics3_family"),
    "Qwen3VLMoeForConditionalGeneration": _lazy("tm_qwen3vlmoe", "qwen3vlmoe_family"),
}
#: model_type fallback when "architectures" is missing
MODEL_TYPES = {"clip": "CLIPModel", "siglip": "SiglipModel", "llava": "LlavaForConditionalGeneration",
               "bert": "BertModel", "qwen2_vl": "Qwen2VLForConditionalGeneration",
               "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "idefics3": "Idefics3ForConditionalGeneration",
               "smolvlm": "SmolVLMForConditionalGeneration"}


def family_for(cfg: dict) -> Family:
    """The table for a config.json dict; ValueError naming the architecture when unsupported."""
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in FAMILIES), None)
    if arch is None and not archs:
        arch = MODEL_TYPES.get(cfg.get("model_type", ""))
    if arch is None:
        what = ", ".join(archs) if archs else f"model_type {cfg.get('model_type')!r}"
        raise ValueError(f"unsupported architecture {what}: edgevlm export supports {', '.join(FAMILIES)} "
                         "(check config.json's \"architectures\")")
    try:
        return FAMILIES[arch](cfg)
    except KeyError as e:
        raise ValueError(f"config.json of this {arch} lacks {e.args[0]!r}; is the config complete?") from None


# --------------------------------------------------------------------------------------------
# Matching checkpoint names against a table.

@dataclass(frozen=True)
class Mapped:
    """One checkpoint tensor resolved against the table."""

    ckpt: str             # name in the safetensors file
    canonical: str        # module parameter name
    entry: Entry
    key: str              # file key, "{i}" filled in
    block: int | None     # block index when the entry is per block
    shape: tuple[int, ...]


def _pattern(src: str) -> re.Pattern:
    return re.compile("^" + re.escape(src).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


def resolve(family: Family, ckpt_shapes: dict[str, tuple[int, ...]]) -> tuple[list[Mapped], dict[str, str]]:
    """Map every checkpoint tensor through the table.

    Returns (mapped rows in table order, {ckpt name: drop reason}).  Raises ValueError listing
    unmapped checkpoint tensors, table rows with no tensor, and shape mismatches.
    """
    ckpt_shapes = fused_parts(family, ckpt_shapes)
    pats = [(_pattern(e.src), e) for e in family.entries]
    drops = [(re.compile(p), why) for p, why in family.drops]
    found: dict[tuple[int, int | None], Mapped] = {}
    dropped: dict[str, str] = {}
    unmapped, bad_shape = [], []
    for ckpt, shape in ckpt_shapes.items():
        canon = family.canonical(ckpt)
        why = next((w for p, w in drops if p.search(canon)), None)
        if why is not None:
            dropped[ckpt] = why
            continue
        for idx, (pat, e) in enumerate(pats):
            m = pat.match(canon)
            if not m:
                continue
            blk = int(m.group("i")) if "i" in m.groupdict() else None
            if blk is not None and blk >= family.dims[e.blocks]:
                continue
            want = tuple(family.dims[s] if isinstance(s, str) else s for s in e.shape)
            if tuple(shape) != want and not (e.kind is Kind.VECTOR and int(_prod(shape)) == int(_prod(want))):
                bad_shape.append(f"{ckpt}: expected {list(want)}, got {list(shape)}")
            key = e.key.replace("{i}", str(blk)) if blk is not None else e.key
            found[(idx, blk)] = Mapped(ckpt, canon, e, key, blk, tuple(shape))
            break
        else:
            unmapped.append(ckpt)
    _resolve_tied(pats, found)
    missing = []
    for idx, (_, e) in enumerate(pats):
        n = family.dims[e.blocks] if "{i}" in e.src else None
        for blk in (range(n) if n is not None else [None]):
            if (idx, blk) not in found:
                missing.append(e.src.replace("{i}", str(blk)) if blk is not None else e.src)
    problems = []
    if unmapped:
        problems.append(f"{len(unmapped)} checkpoint tensor(s) that the {family.architecture} table does not map: "
                        + ", ".join(sorted(unmapped)[:8]) + (" ..." if len(unmapped) > 8 else ""))
    if missing:
        problems.append(f"{len(missing)} tensor(s) the {family.architecture} table needs are missing from the "
                        "checkpoint: " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
    if bad_shape:
        problems.append("shape mismatch against config.json: " + "; ".join(bad_shape[:8]))
    if problems:
        raise ValueError("; ".join(problems) + ". Is this an unmodified Hugging Face checkpoint of a supported "
                         "architecture, and does config.json match the weights?")
    # table order, blocks in order: the file is laid out the way the runtime walks it
    order = sorted(found, key=lambda t: (_tower_rank(pats[t[0]][1].tower), t[1] if t[1] is not None else -1, t[0]))
    return [found[k] for k in order], dropped


def _resolve_tied(pats: list[tuple[re.Pattern, Entry]], found: dict[tuple[int, int | None], Mapped]) -> None:
    """Rows with ``tied_from`` whose own tensor the checkpoint lacks reuse the tensor of the row
    they are tied to (same checkpoint name and shape; canonical name and key stay their own)."""
    by_src = {m.entry.src: m for m in found.values() if m.block is None}
    for idx, (_, e) in enumerate(pats):
        if e.tied_from is None or (idx, None) in found or e.tied_from not in by_src:
            continue
        t = by_src[e.tied_from]
        found[(idx, None)] = Mapped(t.ckpt, e.src, e, e.key, None, t.shape)


def fused_parts(family: Family, ckpt_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """``ckpt_shapes`` with every fused tensor of ``family.fused`` replaced by its parts, named
    ``{ckpt}.{e}`` (whole slice e) or ``{ckpt}.{e}.{part}`` (row block ``part`` of slice e), each
    with the [N, K] shape the file stores.  Slices are read as transformers reads them: as they
    are when a slice is [N, K] (what ``save_pretrained`` of transformers 5 writes), transposed
    when it is [K, N] (the hub layout of Qwen3-VL-MoE); a slice that is neither keeps its own
    shape, so that resolve reports the mismatch."""
    if not family.fused:
        return ckpt_shapes
    specs = [(re.compile(p), nk, parts) for p, nk, parts in family.fused]
    out: dict[str, tuple[int, ...]] = {}
    for ckpt, shape in ckpt_shapes.items():
        canon = family.canonical(ckpt)
        spec = next(((nk, parts) for p, nk, parts in specs if p.search(canon)), None)
        if spec is None or len(shape) != 3:
            out[ckpt] = shape
            continue
        n, k = (family.dims[s] if isinstance(s, str) else s for s in spec[0])
        parts = spec[1]
        slice_nk = (n, k) if tuple(shape[1:]) in ((n, k), (k, n)) else tuple(shape[1:])
        for e in range(shape[0]):
            if not parts:
                out[f"{ckpt}.{e}"] = slice_nk
            for part in parts:
                out[f"{ckpt}.{e}.{part}"] = (slice_nk[0] // len(parts), slice_nk[1])
    return out


def _tower_rank(tower: str) -> int:
    return {"vision": 0, "projector": 1, "text": 2}[tower]


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
