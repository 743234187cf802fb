"""Calibration recipe of Qwen3-VL-MoE: vision blocks -> merger + DeepStack mergers -> MoE language
model (experts per expert, :mod:`.calibrate_moe`) -> LM head.

Vision: every calibration image keeps its own patch grid (the processor's ``smart_resize``); a
batch is the images' patches concatenated, [N, C*Tp*P*P], and the model's own forward builds the
block-0 inputs (patch embedding + interpolated learned positions, 2-D rotary tables, per-image
spans) through :meth:`Calibrator.capture`.  The outputs of the ``deepstack_visual_indexes``
blocks are kept for the DeepStack mergers, each calibrated on the (quantized) block outputs it
reads at run time.

Text: chat-formatted prompts, one image each (as :mod:`.recipe_qwen2vl`), the quantized image
features spliced over the ``<|image_pad|>`` run, multimodal RoPE positions from the model's own
``get_rope_index``; the DeepStack features are added after decoder layers 0..n-1 at the image rows,
as ``Qwen3VLMoeTextModel.forward`` does.
"""

from __future__ import annotations

import numpy as np
import torch

from .calib_data import CalibSet
from .calibrate import Batch, Calibrator
from .calibrate_moe import MoeCalibrator
from .recipe_qwen2vl import _prompts, mrope_positions
from .recipes import _bs, image_processor, language_model_batches, pad_batch, tokenizer
from .source import Source


def _vision(cal: Calibrator, source: Source, calib: CalibSet):
    """Quantize the tower, the merger and the DeepStack mergers.  Returns per image the merged
    features [n_i, D_text], per DeepStack layer the same split, and all grids [n_images, 3]."""
    fam, m = source.family, cal.lm.model
    vt, pt = fam.towers["vision"], fam.towers["projector"]
    out = image_processor(source)(images=list(calib.images), return_tensors="np")
    pv = torch.from_numpy(np.ascontiguousarray(out["pixel_values"], dtype=np.float32))  # [ΣN, C*Tp*P*P]
    grid = torch.from_numpy(np.asarray(out["image_grid_thw"], dtype=np.int64))           # [n_images, 3]
    rows = np.concatenate([[0], np.cumsum(grid.prod(-1).numpy())])
    pre = ["model.visual.patch_embed", "model.visual.pos_embed"]
    for p in pre:
        cal.load(p)
    runs, grids = [], []
    for s in _bs(cal, len(grid)):
        px, g = pv[rows[s.start]:rows[s.stop]], grid[s]
        runs.append((lambda px=px, g=g: m.model.visual(px, grid_thw=g), None))
        grids.append(g)
    batches = cal.capture(vt["blocks"], runs)
    for p in pre:
        cal.lm.release(p)
    keep = frozenset(i + 1 for i in vt["deepstack"])  # kept[i + 1] = output of block i
    batches, kept = cal.run_tower("vision", vt["blocks"], vt["n"], batches, keep=keep)
    merged = cal.quantize_module("projector", pt["module"], [b.hidden for b in batches], [None] * len(batches))
    deep = [cal.quantize_module("projector", path, kept[i + 1], [None] * len(batches))
            for path, i in zip(pt["deepstack"], vt["deepstack"])]
    del batches, kept
    unit = vt["merge"] ** 2

    def split(per_batch: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for y, g in zip(per_batch, grids):
            out += list(torch.split(y, (g.prod(-1) // unit).tolist()))
        return out

    return split(merged), [split(d) for d in deep], torch.cat(grids)


def run_qwen3vlmoe(cal: Calibrator, source: Source, calib: CalibSet) -> None:
    fam, m, cfg = source.family, cal.lm.model, source.config
    tt = fam.towers["text"]
    feats, deep, grid = _vision(cal, source, calib)
    tok = tokenizer(source)
    image_id = int(cfg["image_token_id"])
    prompts = _prompts(source, tok, calib, image_id, [len(f) for f in feats])
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    rope_positions = mrope_positions(m, image_id, grid)

    batches: list[Batch] = language_model_batches(cal, tt, prompts, image_id, pad,
                                                  lambda s: torch.cat(feats[s], dim=0), rope_positions)
    slices = _bs(cal, len(prompts))  # the batches language_model_batches made, in order
    image_masks = [pad_batch(prompts[s], pad)[0] == image_id for s in slices]
    deep_rows = [[torch.cat(d[s], dim=0) for s in slices] for d in deep]  # [layer][batch] [n_b, D]
    del feats, deep
    moe = MoeCalibrator(cal)
    batches = moe.run_tower(tt, batches, image_masks, deep_rows)
    cal.moe_stats = moe.stats  # routing statistics per MoE layer (VEQ), for callers that want them
    if cal.q.wants_hessian("lm_head.weight"):
        norm = cal.load("model.language_model.norm")
        with torch.no_grad():
            xs = [norm(b.hidden) for b in batches]
        cal.lm.release("model.language_model.norm")
        cal.quantize_module("lm_head", "lm_head", xs, [b.mask for b in batches])
