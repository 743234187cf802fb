"""Calibration recipes: how calibration data flows through each family's towers.

Each recipe turns images/texts into block-0 inputs with the model's own embedding code
(through :meth:`Calibrator.capture`), then walks the towers block by block.  Which tensors
exist and where they go is :mod:`.tensor_map`'s job; bits are the pipeline's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .calib_data import CalibSet
from .calibrate import Calibrator, chunks
from .source import Source, pil_image_processor


def image_processor(source: Source):
    """The model's own image processor, PIL backend (torchvision is not required)."""
    vision_type = (source.config.get("vision_config") or {}).get("model_type") or source.config.get("model_type", "")
    return pil_image_processor(source.path, vision_type)


def tokenizer(source: Source):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.path)


def _pixels(source: Source, calib: CalibSet) -> torch.Tensor:
    proc = image_processor(source)
    out = proc(images=list(calib.images), return_tensors="np")
    return torch.from_numpy(np.ascontiguousarray(out["pixel_values"], dtype=np.float32))


def _bs(cal: Calibrator, n: int) -> list[slice]:
    return list(chunks(n, cal.batch_size))


# ------------------------------------------------------------------------------------------------
def run_dual_encoder(cal: Calibrator, source: Source, calib: CalibSet) -> None:
    """CLIP / SigLIP: the vision tower on images, the text tower on texts."""
    fam, m = source.family, cal.lm.model
    clip = fam.name == "clip"
    # vision
    pv = _pixels(source, calib)
    pre = ["vision_model.embeddings"] + (["vision_model.pre_layrnorm"] if clip else [])
    for p in pre:
        cal.load(p)
    vt = fam.towers["vision"]
    runs = [(lambda s=s: m.vision_model(pixel_values=pv[s]), None) for s in _bs(cal, len(pv))]
    batches = cal.capture(vt["blocks"], runs)
    for p in pre:
        cal.lm.release(p)
    cal.run_tower("vision", vt["blocks"], vt["n"], batches)
    del batches, pv
    # text
    tok = tokenizer(source)
    max_len = fam.dims["tT"]
    if clip:
        enc = tok(list(calib.texts), padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
    else:  # SigLIP is trained on max_length padding and pools the last position: calibrate like that
        enc = tok(list(calib.texts), padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    ids = enc["input_ids"]
    am = enc.get("attention_mask") if clip else None
    cal.load("text_model.embeddings")
    tt = fam.towers["text"]
    runs = []
    for s in _bs(cal, len(ids)):
        kw: dict[str, Any] = {"input_ids": ids[s]}
        if am is not None:
            kw["attention_mask"] = am[s]
        runs.append((lambda kw=kw: m.text_model(**kw), am[s] if am is not None else None))
    batches = cal.capture(tt["blocks"], runs)
    cal.lm.release("text_model.embeddings")
    cal.run_tower("text", tt["blocks"], tt["n"], batches)


# ------------------------------------------------------------------------------------------------
def llava_image_tokens(cfg: dict, fam) -> int:
    """Image tokens per image: patches, plus CLS for a CLIP tower with strategy "full"."""
    n = (fam.dims["vT"])
    clip = fam.towers["vision"]["clip"]
    if clip and cfg.get("vision_feature_select_strategy", "default") == "default":
        n -= 1
    return n


def _llava_prompts(source: Source, tok, calib: CalibSet, image_id: int, n_img: int) -> list[list[int]]:
    prompts = []
    for cap in calib.captions or ("",) * len(calib.images):
        if source.chat_template:
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
                    {"role": "assistant", "content": [{"type": "text", "text": cap or "An image."}]}]
            text = tok.apply_chat_template(msgs, tokenize=False, chat_template=source.chat_template)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok("USER: ")["input_ids"] + [image_id] + tok(f"\nDescribe the image. ASSISTANT: {cap}",
                                                                add_special_tokens=False)["input_ids"]
        if ids.count(image_id) != 1:  # templates that do not emit the image token: put it first
            ids = [i for i in ids if i != image_id]
            ids = ids[:1] + [image_id] + ids[1:]
        k = ids.index(image_id)
        prompts.append(ids[:k] + [image_id] * n_img + ids[k + 1:])
    return prompts


def run_llava(cal: Calibrator, source: Source, calib: CalibSet) -> None:
    """LLaVA: vision blocks up to the selected feature layer -> projector -> language model
    on chat-formatted prompts with the (quantized) image features spliced in -> LM head."""
    fam, m, cfg = source.family, cal.lm.model, source.config
    vt, tt = fam.towers["vision"], fam.towers["text"]
    vpath = vt["blocks"].rsplit(".encoder.layers", 1)[0]
    pv = _pixels(source, calib)
    pre = [f"{vpath}.embeddings"] + ([f"{vpath}.pre_layrnorm"] if vt["clip"] else [])
    for p in pre:
        cal.load(p)
    runs = [(lambda s=s: cal.lm.module(vpath)(pixel_values=pv[s]), None) for s in _bs(cal, len(pv))]
    batches = cal.capture(vt["blocks"], runs)
    for p in pre:
        cal.lm.release(p)
    n_layers = fam.dims["vL"]
    fls = cfg.get("vision_feature_layer", -2)
    fls = list(fls) if isinstance(fls, (list, tuple)) else [fls]
    idx = [f if f >= 0 else n_layers + 1 + f for f in fls]
    _, kept = cal.run_tower("vision", vt["blocks"], vt["n"], batches, keep=frozenset(idx))
    del batches
    strategy = cfg.get("vision_feature_select_strategy", "default")
    feats = []
    for j in range(len(kept[idx[0]])):
        hs = [kept[i][j] for i in idx]
        if strategy == "default":
            hs = [h[:, 1:] for h in hs]
        feats.append(torch.cat(hs, dim=-1))
    del kept
    proj = cal.quantize_module("projector", fam.towers["projector"]["module"], feats, [None] * len(feats))
    image_feats = torch.cat(proj, dim=0)  # [N_img, n_img_tokens, D]
    del feats, proj

    tok = tokenizer(source)
    image_id = cfg.get("image_token_id", cfg.get("image_token_index"))
    n_img = llava_image_tokens(cfg, fam)
    if image_feats.shape[1] != n_img:
        raise RuntimeError(f"internal error: {image_feats.shape[1]} image features per image, expected {n_img}")
    prompts = _llava_prompts(source, tok, calib, image_id, n_img)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    calibrate_language_model(cal, tt, prompts, image_id, pad, lambda s: image_feats[s].reshape(-1, image_feats.shape[-1]))


def pad_batch(group: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> right-padded ids and attention mask, both long [B, T_max]."""
    t = max(len(p) for p in group)
    ids = torch.full((len(group), t), pad, dtype=torch.long)
    am = torch.zeros((len(group), t), dtype=torch.long)
    for r, p in enumerate(group):
        ids[r, :len(p)] = torch.tensor(p)
        am[r, :len(p)] = 1
    return ids, am


def language_model_batches(cal: Calibrator, tt: dict, prompts: list[list[int]], image_id: int, pad: int,
                           image_rows: Callable[[slice], torch.Tensor],
                           extra: Callable[[torch.Tensor, torch.Tensor, slice], dict] | None = None) -> list:
    """Decoder-block-0 inputs of a generative VLM on chat-formatted calibration prompts
    (right-padded batches).  ``tt``: the family's text tower facts; ``image_rows(s)``: the image
    features [n, D] of prompts[s] in order of occurrence (written over the image-token rows, as
    ``masked_scatter`` does); ``extra(ids, am, s)``: more forward kwargs (e.g. mrope positions)."""
    lm_path = tt["blocks"].rsplit(".layers", 1)[0]
    emb = cal.load(f"{lm_path}.embed_tokens")
    runs = []
    for s in _bs(cal, len(prompts)):
        ids, am = pad_batch(prompts[s], pad)
        with torch.no_grad():
            kw = extra(ids, am, s) if extra is not None else {}
            x = emb(ids)
            x[ids == image_id] = image_rows(s).to(x.dtype)
        runs.append((lambda x=x, am=am, kw=kw: cal.lm.module(lm_path)(inputs_embeds=x, attention_mask=am,
                                                                      use_cache=False, **kw), am))
    batches = cal.capture(tt["blocks"], runs)
    cal.lm.release(f"{lm_path}.embed_tokens")
    return batches


def quantize_language_model(cal: Calibrator, tt: dict, batches: list) -> None:
    """The decoder blocks from their captured inputs, then the LM head on the final norm's
    outputs when the file holds it quantized (untied, or tied but narrower than the 8-bit
    embedding table: see tensor_map.lm_head)."""
    batches, _ = cal.run_tower("text", tt["blocks"], tt["n"], batches)
    if cal.q.wants_hessian("lm_head.weight"):
        lm_path = tt["blocks"].rsplit(".layers", 1)[0]
        norm = cal.load(f"{lm_path}.norm")
        with torch.no_grad():
            xs = [norm(b.hidden) for b in batches]
        cal.lm.release(f"{lm_path}.norm")
        cal.quantize_module("lm_head", "lm_head", xs, [b.mask for b in batches])


def calibrate_language_model(cal: Calibrator, tt: dict, prompts: list[list[int]], image_id: int, pad: int,
                             image_rows: Callable[[slice], torch.Tensor]) -> None:
    """:func:`language_model_batches` then :func:`quantize_language_model`."""
    quantize_language_model(cal, tt, language_model_batches(cal, tt, prompts, image_id, pad, image_rows))


# ------------------------------------------------------------------------------------------------
def run_text_encoder(cal: Calibrator, source: Source, calib: CalibSet) -> None:
    """BERT-family sentence encoders: the encoder blocks on the calibration texts."""
    fam, m = source.family, cal.lm.model
    tok = tokenizer(source)
    enc = tok(list(calib.texts), padding="longest", truncation=True, max_length=min(fam.dims["tT"], 256),
              return_tensors="pt")
    cal.load("embeddings")
    runs = []
    for s in _bs(cal, len(enc["input_ids"])):
        kw = {k: v[s] for k, v in enc.items()}
        runs.append((lambda kw=kw: m(**kw), enc["attention_mask"][s]))
    tt = fam.towers["text"]
    batches = cal.capture(tt["blocks"], runs)
    cal.lm.release("embeddings")
    cal.run_tower("text", tt["blocks"], tt["n"], batches)


def _lazy(module: str, fn: str):
    """A recipe that lives in its own module (imported on first use)."""
    def run(cal: Calibrator, source: Source, calib: CalibSet) -> None:
        import importlib

        return getattr(importlib.import_module(f"{__package__}.{module}"), fn)(cal, source, calib)
    run.__name__ = fn
    return run


#: Family.name -> recipe
RECIPES = {"clip": run_dual_encoder, "siglip": run_dual_encoder, "llava": run_llava, "bert": run_text_encoder,
           "qwen2_vl": _lazy("recipe_qwen2vl", "run_qwen2vl"), "qwen2_5_vl": _lazy("recipe_qwen2vl", "run_qwen2vl"),
           "idefics3": _lazy("recipe_idefics3", "run_idefics3"), "smolvlm": _lazy("recipe_idefics3", "run_idefics3"),
           "qwen3_vl_moe": _lazy("recipe_qwen3vlmoe", "run_qwen3vlmoe")}
