"""Calibration recipe for Idefics3 / SmolVLM: vision tower on the processor's tiles -> post
LayerNorm -> connector (pixel shuffle + linear) -> Llama on chat-formatted prompts with the
(quantized) image features spliced in -> LM head when untied.

Everything an image goes through is transformers' own code: the model's PIL image processor
makes the frames (tiles of ``max_image_size`` + the global image), the patch attention mask is
derived from its ``pixel_attention_mask`` exactly as ``get_image_features`` does (padded patches
are masked as attention keys by the model's forward and left out of the Hessians), and the
prompts are expanded with the processor's image prompt string
(:func:`edgevlm.runtime.idefics3.image_prompt_string`, the same text ``Idefics3Processor`` /
``SmolVLMProcessor`` build; tested there).

Every frame of every calibration image is calibrated on: an image of R x C tiles contributes
R*C + 1 frames of (image_size / patch_size)^2 patches each, so the vision activations scale with
the processor's ``size["longest_edge"]`` (for SmolVLM at 2048 / 512: 17 frames x 1024 patches per
image).  Lower ``--n-calib`` if that is too much memory.
"""

from __future__ import annotations

import numpy as np
import torch

from ..runtime.idefics3 import IMAGE_TOKEN, image_prompt_string
from .calib_data import CalibSet
from .calibrate import Calibrator, chunks
from .recipes import calibrate_language_model, image_processor, tokenizer
from .source import Source

__all__ = ["run_idefics3"]


def _frames(source: Source, calib: CalibSet) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int]]]:
    """All frames of all calibration images: pixel_values [F, 3, M, M], patch mask bool
    [F, M/P, M/P], and per image (rows, cols, n_frames)."""
    proc = image_processor(source)
    pvs, pms, layout = [], [], []
    for im in calib.images:
        out = proc(images=[[im]], return_tensors="np", return_row_col_info=True)
        pv = np.asarray(out["pixel_values"], dtype=np.float32)[0]          # [F, 3, H, W]
        pm = out.get("pixel_attention_mask")
        pm = np.ones((pv.shape[0], *pv.shape[2:]), np.int64) if pm is None else np.asarray(pm)[0]
        pvs.append(pv)
        pms.append(pm)
        layout.append((int(out["rows"][0][0]), int(out["cols"][0][0]), pv.shape[0]))
    shapes = {p.shape[1:] for p in pvs}
    if len(shapes) != 1:
        raise RuntimeError(f"internal error: the image processor made frames of different sizes {sorted(shapes)}")
    pv = torch.from_numpy(np.concatenate(pvs))
    pixel_mask = torch.from_numpy(np.concatenate(pms))
    p = source.family.dims["vP"]
    grid = pixel_mask.unfold(1, p, p).unfold(2, p, p)                        # as get_image_features
    return pv, grid.sum(dim=(-1, -2)) > 0, layout


def _prompts(source: Source, tok, calib: CalibSet, layout: list[tuple[int, int, int]], seq_len: int,
             image_id: int) -> list[list[int]]:
    """Chat-formatted "describe the image" + caption prompts, image placeholders expanded."""
    prompts = []
    caps = calib.captions or ("",) * len(calib.images)
    for (rows, cols, n_frames), cap in zip(layout, caps):
        answer = cap or "An image."
        if source.chat_template:
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
            text = tok.apply_chat_template(msgs, tokenize=False, chat_template=source.chat_template)
        else:
            text = f"User:{IMAGE_TOKEN}Describe the image.<end_of_utterance>\nAssistant: {answer}<end_of_utterance>\n"
        if text.count(IMAGE_TOKEN) != 1:  # a template that drops the image part: put it first
            text = IMAGE_TOKEN + text.replace(IMAGE_TOKEN, "")
        text = text.replace(IMAGE_TOKEN, image_prompt_string(rows, cols, seq_len))
        ids = tok(text)["input_ids"]  # special tokens added as the processor adds them
        if ids.count(image_id) != n_frames * seq_len:
            raise RuntimeError(f"internal error: the calibration prompt has {ids.count(image_id)} image tokens, "
                               f"expected {n_frames} frames x {seq_len}")
        prompts.append(ids)
    return prompts


def run_idefics3(cal: Calibrator, source: Source, calib: CalibSet) -> None:
    fam, cfg = source.family, source.config
    vt, pt, tt = fam.towers["vision"], fam.towers["projector"], fam.towers["text"]
    # -- vision tower on every frame ------------------------------------------------------------
    pv, patch_mask, layout = _frames(source, calib)
    tokens_mask = patch_mask.reshape(patch_mask.shape[0], -1).to(torch.long)  # [F, N] 1 = real patch
    emb = f"{vt['module']}.embeddings"
    cal.load(emb)
    vision = cal.lm.module(vt["module"])
    runs = [(lambda s=s: vision(pixel_values=pv[s], patch_attention_mask=patch_mask[s]), tokens_mask[s])
            for s in chunks(len(pv), cal.batch_size)]
    batches = cal.capture(vt["blocks"], runs)
    del runs, pv  # the pixels are not needed past the block-0 inputs
    cal.lm.release(emb)
    batches, _ = cal.run_tower("vision", vt["blocks"], vt["n"], batches)
    norm = cal.load(vt["post_norm"])
    with torch.no_grad():
        hidden = [norm(b.hidden) for b in batches]
    cal.lm.release(vt["post_norm"])
    del batches
    # -- connector: pixel shuffle + linear; every output token feeds the LM, so no token mask ----
    feats = cal.quantize_module("projector", pt["module"], hidden, [None] * len(hidden))
    feats = torch.cat(feats, dim=0)                                          # [F, seq, D_text]
    del hidden
    seq_len = feats.shape[1]
    want = int(((source.extra_files.get("processor_config") or {}).get("image_seq_len")) or seq_len)
    if want != seq_len:
        raise ValueError(f"processor_config.json image_seq_len is {want} but the connector makes {seq_len} tokens "
                         "per frame; the processor and model configs disagree")
    # -- language model on chat prompts with the image features spliced in ----------------------
    tok = tokenizer(source)
    image_id = int(cfg.get("image_token_id", cfg.get("image_token_index", -1)))
    prompts = _prompts(source, tok, calib, layout, seq_len, image_id)
    starts = np.cumsum([0] + [n for _, _, n in layout])
    per_image = [feats[starts[i]:starts[i + 1]].reshape(-1, feats.shape[-1]) for i in range(len(layout))]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    # row-major concatenation of each prompt's images = masked_scatter order
    calibrate_language_model(cal, tt, prompts, image_id, pad, lambda s: torch.cat(per_image[s], dim=0))

