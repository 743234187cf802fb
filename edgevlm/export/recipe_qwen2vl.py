"""Calibration recipe of Qwen2-VL / Qwen2.5-VL: vision blocks -> merger -> language model -> LM head.

Dynamic resolution: every calibration image keeps its own patch grid (the model's processor
resizes it with ``smart_resize``), and a calibration batch is what the HF model runs: the
images' patches concatenated, [N, C*Tp*P*P], with ``cu_seqlens`` marking where each image's
(or, in Qwen2.5-VL's windowed blocks, each window's) attention span ends.  The model's own
forward builds the block-0 inputs (patch embedding, 2-D rotary tables, spans) through
:meth:`Calibrator.capture`.

Qwen2.5-VL mixes windowed and full-attention vision blocks, while a calibration batch replays
block 0's kwargs for every block; a forward pre-hook on each block sets the span that block
gets in the HF forward (both spans are computed with transformers' own ``vision_utils``).

The language model then runs on chat-formatted prompts, one image each, with the
(quantized) image features spliced over the ``<|image_pad|>`` run exactly as the processor
expands it, and the multimodal RoPE positions from the model's own ``get_rope_index``, so the
decoder blocks see what they see at inference.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .calib_data import CalibSet
from .calibrate import Batch, Calibrator
from .recipes import _bs, image_processor, language_model_batches, quantize_language_model, tokenizer
from .source import Source

# private kwargs a vision Batch carries for the span hooks (popped before the block sees them)
_CU_FULL, _CU_WINDOW = "_edgevlm_cu_seqlens_full", "_edgevlm_cu_seqlens_window"


def _vision_batches(cal: Calibrator, source: Source, calib: CalibSet) -> tuple[list[Batch], list[torch.Tensor]]:
    """Block-0 inputs of the vision tower, ``cal.batch_size`` images per batch; and each
    batch's grid_thw [n, 3]."""
    fam, m = source.family, cal.lm.model
    vt = fam.towers["vision"]
    proc = image_processor(source)
    out = proc(images=list(calib.images), return_tensors="np")
    pv = torch.from_numpy(np.ascontiguousarray(out["pixel_values"], dtype=np.float32))  # [ΣN, C*Tp*P*P]
    grid = torch.from_numpy(np.asarray(out["image_grid_thw"], dtype=np.int64))           # [n_images, 3]
    rows = np.concatenate([[0], np.cumsum(grid.prod(-1).numpy())])
    visual = m.model.visual
    cal.load("model.visual.patch_embed")
    runs, grids = [], []
    for s in _bs(cal, len(grid)):
        px, g = pv[rows[s.start]:rows[s.stop]], grid[s]
        runs.append((lambda px=px, g=g: visual(px, grid_thw=g), None))
        grids.append(g)
    batches = cal.capture(vt["blocks"], runs)
    cal.lm.release("model.visual.patch_embed")
    if fam.name == "qwen2_5_vl":
        from transformers.vision_utils import get_vision_cu_seqlens, get_vision_window_index

        for b, g in zip(batches, grids):
            _, cu_window = get_vision_window_index(g, spatial_merge_size=vt["merge"], window_size=vt["window"],
                                                   patch_size=vt["patch"])
            b.kwargs[_CU_FULL], b.kwargs[_CU_WINDOW] = get_vision_cu_seqlens(g), cu_window
    return batches, grids


def _span_hooks(blocks: Any, full_attention: list[int]) -> list:
    """Qwen2.5-VL: block i attends over whole images when i is in ``fullatt_block_indexes``, else
    over windows, as ``Qwen2_5_VisionTransformerPretrainedModel.forward`` passes it."""
    handles = []
    for i, blk in enumerate(blocks):
        def hook(mod, args, kwargs, full=i in full_attention):
            kw = dict(kwargs)
            cu_full, cu_window = kw.pop(_CU_FULL, None), kw.pop(_CU_WINDOW, None)
            if cu_full is not None:
                kw["cu_seqlens"] = cu_full if full else cu_window
            return args, kw
        handles.append(blk.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def _image_features(cal: Calibrator, source: Source, calib: CalibSet) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Quantize the vision tower and the merger; returns each image's merged features
    [n_i, D_text] (in the HF token order) and all grids [n_images, 3]."""
    fam, m = source.family, cal.lm.model
    vt = fam.towers["vision"]
    batches, grids = _vision_batches(cal, source, calib)
    handles = _span_hooks(m.model.visual.blocks, vt["full_attention"]) if fam.name == "qwen2_5_vl" else []
    try:
        batches, _ = cal.run_tower("vision", vt["blocks"], vt["n"], batches)
    finally:
        for h in handles:
            h.remove()
    merged = cal.quantize_module("projector", fam.towers["projector"]["module"], [b.hidden for b in batches],
                                 [None] * len(batches))          # per batch [ΣN / m², D_text]
    del batches
    feats: list[torch.Tensor] = []
    unit = vt["merge"] ** 2
    for y, g in zip(merged, grids):
        if fam.name == "qwen2_5_vl":  # the tower ran in window order: back to raster-of-merge-blocks order
            from transformers.vision_utils import get_vision_window_index

            win, _ = get_vision_window_index(g, spatial_merge_size=vt["merge"], window_size=vt["window"],
                                             patch_size=vt["patch"])
            y = y[torch.argsort(win)]
        feats += list(torch.split(y, (g.prod(-1) // unit).tolist()))
    return feats, torch.cat(grids)


def _prompts(source: Source, tok, calib: CalibSet, image_id: int, counts: list[int]) -> list[list[int]]:
    """One chat-formatted prompt per image (its caption as the answer), the image placeholder
    expanded to the image's token count as ``Qwen2VLProcessor`` does, tokenized as it does."""
    pad = tok.convert_ids_to_tokens(image_id)
    captions = calib.captions or ("",) * len(calib.images)
    out = []
    for cap, n in zip(captions, counts):
        if source.chat_template:
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
                    {"role": "assistant", "content": [{"type": "text", "text": cap or "An image."}]}]
            text = tok.apply_chat_template(msgs, tokenize=False, chat_template=source.chat_template)
        else:
            text = f"<|vision_start|>{pad}<|vision_end|>Describe the image. {cap}"
        if text.count(pad) != 1:  # a template that does not write the placeholder: put it first
            text = pad + text.replace(pad, "")
        ids = tok(text.replace(pad, pad * n))["input_ids"]
        if ids.count(image_id) != n:
            raise RuntimeError(f"internal error: the prompt holds {ids.count(image_id)} image tokens, expected {n}")
        out.append(ids)
    return out


def _text_batches(cal: Calibrator, source: Source, calib: CalibSet, feats: list[torch.Tensor],
                  grid: torch.Tensor) -> tuple[list[Batch], list[list[int]]]:
    """Decoder-layer-0 inputs on the calibration prompts (right-padded batches, image features
    spliced in, mrope positions from ``get_rope_index``); and the prompts' token ids."""
    fam, m, cfg = source.family, cal.lm.model, source.config
    tt = fam.towers["text"]
    tok = tokenizer(source)
    image_id = int(cfg["image_token_id"])
    prompts = _prompts(source, tok, calib, image_id, [len(f) for f in feats])
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    rope_positions = mrope_positions(m, image_id, grid)

    batches = language_model_batches(cal, tt, prompts, image_id, pad, lambda s: torch.cat(feats[s], dim=0),
                                     rope_positions)
    return batches, prompts


def run_qwen2vl(cal: Calibrator, source: Source, calib: CalibSet) -> None:
    tt = source.family.towers["text"]
    feats, grid = _image_features(cal, source, calib)
    batches, _ = _text_batches(cal, source, calib, feats, grid)
    del feats
    quantize_language_model(cal, tt, batches)


def mrope_positions(model: Any, image_id: int, grid: torch.Tensor):
    """The extra-kwargs hook of :func:`recipes.language_model_batches` for Qwen-VL models:
    a batch's multimodal RoPE ``position_ids`` [3, B, T] from the model's ``get_rope_index``
    (``mm_token_type_ids`` marks the image tokens; transformers 5 needs it).  grid: the
    images' (t, h, w) [n_images, 3], sliced per batch."""
    def rope_positions(ids: torch.Tensor, am: torch.Tensor, s: slice) -> dict:
        mm = (ids == image_id).to(torch.int32)  # mm_token_type_ids: 1 = image token
        pos, _ = model.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=grid[s], attention_mask=am)
        return {"position_ids": pos}
    return rope_positions
