"""Reference ("golden") inputs and outputs of a Hugging Face model folder, computed with transformers.

:func:`write_golden` loads the folder in float32 (eval mode, no grad), preprocesses synthetic or
given images with the model's own PIL image processor and texts with its own tokenizer, runs the
model and writes one ``.npz`` (plain numpy arrays; no pickle needed to read it back) that a
runtime can compare against.  Keys by model type:

CLIP / SigLIP
    ``pixel_values`` [N,3,H,W] f32, ``input_ids`` [T,L] i64, ``attention_mask`` [T,L] (CLIP only:
    SigLIP is run without one, as google/siglip is), ``image_embeds`` [N,E] and ``text_embeds``
    [T,E] (projected and L2-normalised, as transformers returns them), ``logits_per_image``
    [N,T], ``logits_per_text`` [T,N], ``vision_last_hidden_state``, ``text_last_hidden_state``,
    ``vision_pooler_output``, ``text_pooler_output``, and the raw images (see below).
    SigLIP texts are padded to ``max_length`` (the tokenizer's ``model_max_length``), which is how
    SigLIP was trained and what its model card tells users to pass to ``SiglipProcessor``
    (the processor itself does not set it).
LLaVA
    ``num_pairs``, ``num_image_tokens`` [P], and per (image, prompt) pair ``i``: ``prompt_{i}``
    (the chat-formatted text, a numpy unicode scalar), ``input_ids_{i}`` [1,S] (after
    ``<image>`` expansion by ``LlavaProcessor``), ``pixel_values_{i}`` [1,3,H,W],
    ``image_features_{i}`` [n_img_tokens, D] (projector output), ``logits_{i}`` [S,V] (first
    forward step) and ``generated_ids_{i}`` [G] (greedy ``generate``: the new tokens only; G may
    be less than ``max_new_tokens`` when eos comes first), plus the raw images.
BERT
    ``input_ids``, ``attention_mask``, ``token_type_ids`` (when the tokenizer makes them),
    ``last_hidden_state`` [T,L,D], ``sentence_embedding`` [T,D] (attention-masked mean, not
    normalised) and ``sentence_embedding_l2`` (the same, L2-normalised: what sentence-transformers
    returns for all-MiniLM-L6-v2, whose pipeline ends with a Normalize module).

Raw images: ``images_uint8`` [N,H,W,3] when all have the same size, else ``image_0``,
``image_1``, ... [H,W,3]; ``num_images`` always.  ``meta`` is a JSON string (numpy unicode
scalar: ``json.loads(str(npz["meta"]))``) with the model type, library versions, the texts /
prompts, image sizes and the preprocessing choices.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .source import _read_json_or_empty, pil_image_processor

__all__ = ["DEFAULT_PROMPTS", "DEFAULT_TEXTS", "SUPPORTED", "synthetic_images", "write_golden"]

SUPPORTED = ("clip", "siglip", "llava", "bert")

DEFAULT_TEXTS = ["a photo of a cat", "a diagram of a neural network", "two people walking on the beach"]
DEFAULT_PROMPTS = ["What is shown in this image?", "Describe the image briefly.", "What color is the car?"]



def synthetic_images() -> list:
    """Three deterministic RGB test images of different sizes (W x H): a 48x40 colour gradient,
    a 32x32 coloured checkerboard, and 64x50 concentric rings."""
    from PIL import Image

    y, x = np.mgrid[0:40, 0:48].astype(np.float32)
    grad = np.stack([x / 47 * 255, y / 39 * 255, (x + y) / 85 * 255], -1)
    y, x = np.mgrid[0:32, 0:32]
    chk = ((x // 4 + y // 4) % 2).astype(np.float32)
    board = np.stack([chk * 230 + 10, (1 - chk) * 200 + 20, np.full_like(chk, 90.0)], -1)
    y, x = np.mgrid[0:50, 0:64].astype(np.float32)
    r = np.hypot(x - 31.5, y - 24.5)
    rings = np.stack([127.5 + 127.5 * np.sin(r / 2.0), 127.5 + 127.5 * np.cos(r / 3.0), 255 - r * 3], -1)
    return [Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "RGB") for a in (grad, board, rings)]


def _raw_images(images: list, out: dict) -> list[list[int]]:
    arrays = [np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images]
    out["num_images"] = np.int64(len(arrays))
    if arrays and all(a.shape == arrays[0].shape for a in arrays):
        out["images_uint8"] = np.stack(arrays)
    else:
        for i, a in enumerate(arrays):
            out[f"image_{i}"] = a
    return [[int(a.shape[1]), int(a.shape[0])] for a in arrays]  # (width, height) as PIL reports


def _np(t) -> np.ndarray:
    a = t.detach().cpu().numpy()
    return a.astype(np.float32) if a.dtype.kind == "f" else a.astype(np.int64)


def _model_type(model_dir: Path) -> tuple[str, dict]:
    cfg = _read_json_or_empty(model_dir / "config.json")
    if not cfg:
        raise ValueError(f"{model_dir}: no config.json; not a Hugging Face model folder")
    mt = cfg.get("model_type")
    if mt not in SUPPORTED:
        raise ValueError(f"unsupported model type {mt!r} in {model_dir / 'config.json'}: write_golden supports "
                         f"{', '.join(SUPPORTED)}")
    return mt, cfg


def _dual_encoder(model_dir: Path, mt: str, images: list, texts: list[str], out: dict, meta: dict) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    if not images or not texts:
        raise ValueError(f"a {mt} golden needs at least one image and one text")
    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    improc = pil_image_processor(model_dir, mt)
    pixel_values = improc(images=images, return_tensors="pt")["pixel_values"].to(torch.float32)
    if mt == "siglip":
        max_len = min(int(tok.model_max_length), int(model.config.text_config.max_position_embeddings))
        enc = tok(texts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
        kwargs = {"input_ids": enc["input_ids"]}  # google/siglip is used without an attention mask
        meta["text_padding"] = f"max_length={max_len}, no attention_mask"
    else:
        enc = tok(texts, padding=True, truncation=True, return_tensors="pt")
        kwargs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        meta["text_padding"] = "longest, with attention_mask"
    with torch.no_grad():
        o = model(pixel_values=pixel_values, **kwargs)
    out["pixel_values"] = _np(pixel_values)
    for k, v in kwargs.items():
        out[k] = _np(v)
    out["image_embeds"] = _np(o.image_embeds)
    out["text_embeds"] = _np(o.text_embeds)
    out["logits_per_image"] = _np(o.logits_per_image)
    out["logits_per_text"] = _np(o.logits_per_text)
    out["vision_last_hidden_state"] = _np(o.vision_model_output.last_hidden_state)
    out["vision_pooler_output"] = _np(o.vision_model_output.pooler_output)
    out["text_last_hidden_state"] = _np(o.text_model_output.last_hidden_state)
    out["text_pooler_output"] = _np(o.text_model_output.pooler_output)
    meta.update(texts=list(texts), image_processor=type(improc).__name__)


def _llava_processor(model_dir: Path, cfg: dict):
    """A ``LlavaProcessor`` built from the folder's parts with the PIL image processor.

    ``LlavaProcessor`` itself needs no torchvision; it is built explicitly (rather than with
    ``AutoProcessor``) so the image processor is always the PIL one.  Its token-count settings
    come from processor_config.json when present, else from config.json (CLIP towers add a CLS
    token: ``num_additional_image_tokens=1``)."""
    from transformers import AutoTokenizer, LlavaProcessor

    vcfg = cfg.get("vision_config") or {}
    vtype = vcfg.get("model_type", "clip_vision_model")
    pcfg = _read_json_or_empty(model_dir / "processor_config.json")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    improc = pil_image_processor(model_dir, vtype)
    template = pcfg.get("chat_template") or getattr(tok, "chat_template", None)
    if template is None and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    proc = LlavaProcessor(
        image_processor=improc, tokenizer=tok,
        patch_size=pcfg.get("patch_size", vcfg.get("patch_size", 14)),
        vision_feature_select_strategy=pcfg.get("vision_feature_select_strategy",
                                                cfg.get("vision_feature_select_strategy", "default")),
        num_additional_image_tokens=pcfg.get("num_additional_image_tokens",
                                             1 if vtype == "clip_vision_model" else 0),
        image_token=pcfg.get("image_token", "<image>"), chat_template=template)
    return proc, template


def _llava(model_dir: Path, cfg: dict, images: list, prompts: list[str], max_new_tokens: int, out: dict,
           meta: dict) -> None:
    import torch
    from transformers import LlavaForConditionalGeneration

    if not images:
        raise ValueError("a llava golden needs at least one image")
    if len(prompts) == 1:
        prompts = prompts * len(images)
    if len(prompts) != len(images):
        raise ValueError(f"llava: {len(images)} images but {len(prompts)} prompts; give one prompt or one per image")
    model = LlavaForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    proc, template = _llava_processor(model_dir, cfg)
    formatted, n_tokens = [], []
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        if template is not None:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            text = proc.tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                                      tokenize=False)
        else:  # llava-1.5's format
            text = f"USER: {proc.image_token}\n{prompt} ASSISTANT:"
        enc = proc(images=[image], text=[text], return_tensors="pt")
        ids, pv = enc["input_ids"], enc["pixel_values"].to(torch.float32)
        mask = enc.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=pv, attention_mask=mask).logits[0]
            feats = model.get_image_features(
                pixel_values=pv, vision_feature_layer=model.config.vision_feature_layer,
                vision_feature_select_strategy=model.config.vision_feature_select_strategy)
            gen = model.generate(input_ids=ids, pixel_values=pv, attention_mask=mask, do_sample=False, num_beams=1,
                                 max_new_tokens=max_new_tokens)
        if not torch.is_tensor(feats) and hasattr(feats, "pooler_output"):
            feats = feats.pooler_output  # transformers 5: a model output whose pooler_output is per-image list
        if isinstance(feats, (list, tuple)):
            feats = torch.cat(list(feats), 0)
        feats = feats.reshape(-1, feats.shape[-1])
        n_img = int((ids == model.config.image_token_id).sum())
        if n_img != feats.shape[0]:
            raise RuntimeError(f"llava: {n_img} image tokens in input_ids but {feats.shape[0]} image features")
        out[f"prompt_{i}"] = np.array(text)
        out[f"input_ids_{i}"] = _np(ids)
        out[f"pixel_values_{i}"] = _np(pv)
        out[f"image_features_{i}"] = _np(feats)
        out[f"logits_{i}"] = _np(logits)
        out[f"generated_ids_{i}"] = _np(gen[0, ids.shape[1]:])
        formatted.append(text)
        n_tokens.append(n_img)
    out["num_pairs"] = np.int64(len(formatted))
    out["num_image_tokens"] = np.array(n_tokens, dtype=np.int64)
    meta.update(prompts=list(prompts), formatted_prompts=formatted, max_new_tokens=max_new_tokens,
                image_processor=type(proc.image_processor).__name__,
                vision_model_type=(cfg.get("vision_config") or {}).get("model_type"),
                text_model_type=(cfg.get("text_config") or {}).get("model_type"),
                vision_feature_select_strategy=proc.vision_feature_select_strategy,
                vision_feature_layer=model.config.vision_feature_layer, image_token_id=model.config.image_token_id,
                num_image_tokens=n_tokens)


def _bert(model_dir: Path, texts: list[str], out: dict, meta: dict) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    if not texts:
        raise ValueError("a bert golden needs at least one text")
    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    enc = tok(texts, padding=True, truncation=True, return_tensors="pt")
    kwargs = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    with torch.no_grad():
        hidden = model(**kwargs).last_hidden_state
    m = kwargs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    emb = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    for k, v in kwargs.items():
        out[k] = _np(v)
    out["last_hidden_state"] = _np(hidden)
    out["sentence_embedding"] = _np(emb)
    out["sentence_embedding_l2"] = _np(torch.nn.functional.normalize(emb, dim=-1))
    meta.update(texts=list(texts), pooling="attention-masked mean, not normalised")


def write_golden(model_dir, out_path, *, images: list | None = None, texts: list[str] | None = None,
                 max_new_tokens: int = 8) -> Path:
    """Run the HF folder ``model_dir`` with transformers (fp32) and write reference inputs and
    outputs to ``out_path`` (.npz).  See the module docstring for the keys.

    ``images`` (PIL images) default to :func:`synthetic_images`; ``texts`` default to
    :data:`DEFAULT_TEXTS` (CLIP, SigLIP, BERT) or :data:`DEFAULT_PROMPTS` (LLaVA, which pairs
    image i with prompt i, or one prompt with every image).  Raises ValueError for a model type
    other than clip, siglip, llava and bert.
    """
    import torch
    import transformers

    model_dir, out_path = Path(model_dir), Path(out_path)
    mt, cfg = _model_type(model_dir)
    if images is None and mt != "bert":
        images = synthetic_images()
    images = list(images or [])
    out: dict[str, Any] = {}
    meta: dict[str, Any] = {"model_type": mt, "architectures": cfg.get("architectures"),
                            "transformers": transformers.__version__, "torch": torch.__version__,
                            "numpy": np.__version__, "dtype": "float32"}
    if images:
        meta["image_sizes_wh"] = _raw_images(images, out)
    with torch.inference_mode():
        if mt in ("clip", "siglip"):
            _dual_encoder(model_dir, mt, images, list(texts) if texts is not None else DEFAULT_TEXTS, out, meta)
        elif mt == "llava":
            _llava(model_dir, cfg, images, list(texts) if texts is not None else DEFAULT_PROMPTS, max_new_tokens,
                   out, meta)
        else:
            _bert(model_dir, list(texts) if texts is not None else DEFAULT_TEXTS, out, meta)
    out["meta"] = np.array(json.dumps(meta, sort_keys=True))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "wb") as f:  # a file object: np.savez appends no ".npz" to the name
        np.savez(f, **out)
    return out_path
