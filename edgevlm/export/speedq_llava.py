"""SPEED-Q's model adapter for LLaVA (CLIP / SigLIP vision, Llama / Qwen2 text): training
samples from the calibration set, the vision features, and the forward pass from those
features to logits with the projector and language model in the autograd graph.

The stages (speedq.py) only call :class:`LlavaAdapter`; another family needs its own adapter
with the same four methods (vision blocks + their inputs, features, logits, samples).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from .calib_data import CalibSet
from .recipes import _llava_prompts, _pixels, llava_image_tokens, pad_batch, tokenizer
from .source import Source


@dataclass
class Batch:
    """One training batch: right-padded ids / mask [B, T] long, labels [B, T] (-100 = no loss:
    padding and image tokens), and the indices of its images in the calibration set (in order
    of occurrence; empty for text-only batches)."""

    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    images: list[int]

    def to(self, device) -> Batch:
        return Batch(self.ids.to(device), self.mask.to(device), self.labels.to(device), self.images)


class LlavaAdapter:
    def __init__(self, model: nn.Module, source: Source) -> None:
        self.model, self.source, self.cfg = model, source, source.config
        fam = source.family
        self.vt = fam.towers["vision"]
        self.image_id = self.cfg.get("image_token_id", self.cfg.get("image_token_index"))
        self.n_img = llava_image_tokens(self.cfg, fam)
        fls = self.cfg.get("vision_feature_layer", -2)
        fls = list(fls) if isinstance(fls, (list, tuple)) else [fls]
        n_layers = fam.dims["vL"]
        self.feature_layers = [f if f >= 0 else n_layers + 1 + f for f in fls]
        self.strategy = self.cfg.get("vision_feature_select_strategy", "default")

    # ---- modules ------------------------------------------------------------------------------
    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    @property
    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def vision_blocks(self) -> list[tuple[str, nn.Module]]:
        """(canonical prefix, block) of the vision blocks LLaVA uses, in order."""
        path = self.vt["blocks"]
        layers = self.model.get_submodule(path)
        return [(f"{path}.{i}", layers[i]) for i in range(self.vt["n"])]

    def pixels(self, calib: CalibSet) -> torch.Tensor:
        return _pixels(self.source, calib)   # float32 [N_img, C, H, W]

    # ---- forward ------------------------------------------------------------------------------
    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Selected vision hidden states before the projector, [N_img, n_img, pIn]."""
        out = self.vision_tower(pixel_values, output_hidden_states=True)
        hs = [out.hidden_states[i] for i in self.feature_layers]
        if self.strategy == "default":
            hs = [h[:, 1:] for h in hs]
        return torch.cat(hs, dim=-1)

    def logits(self, batch: Batch, feats: torch.Tensor | None) -> torch.Tensor:
        """Logits [B, T, V] of a batch; feats [n_images_in_batch, n_img, pIn] (pre-projector)."""
        x = self.language_model.get_input_embeddings()(batch.ids)
        if batch.images:
            rows = self.projector(feats).reshape(-1, x.shape[-1]).to(x.dtype)
            x = x.masked_scatter((batch.ids == self.image_id)[..., None], rows)
        h = self.language_model(inputs_embeds=x, attention_mask=batch.mask, use_cache=False).last_hidden_state
        return self.model.lm_head(h)

    # ---- data ---------------------------------------------------------------------------------
    @functools.cached_property
    def pad_id(self) -> int:
        tok = tokenizer(self.source)
        return tok.pad_token_id if tok.pad_token_id is not None else 0

    def batches(self, calib: CalibSet, batch_size: int, *, text_only: bool = True) -> list[Batch]:
        """Image + caption chat prompts (one image each, as the calibration recipe builds them),
        then, with ``text_only``, the calibration texts as plain LM samples.  Loss on every
        non-image, non-padding token."""
        tok = tokenizer(self.source)
        pad = self.pad_id
        prompts = _llava_prompts(self.source, tok, calib, self.image_id, self.n_img)
        out = []
        for i in range(0, len(prompts), batch_size):
            idx = list(range(i, min(i + batch_size, len(prompts))))
            out.append(self._batch([prompts[j] for j in idx], pad, idx))
        if text_only:
            texts = [tok(t)["input_ids"][:256] for t in calib.texts]
            texts = [t for t in texts if len(t) >= 2]
            for i in range(0, len(texts), batch_size):
                out.append(self._batch(texts[i:i + batch_size], pad, []))
        return out

    def sample(self, batch: Batch, feats: torch.Tensor | None, gen: torch.Generator, temperature: float = 1.0,
               max_new: int = 64) -> Batch:
        """Self-distillation data: each row of ``batch`` cut at a random point of its text part
        (after its image tokens, within the first half of what follows) and continued by
        sampling this model (the fp teacher) at ``temperature`` for as many tokens as were cut
        (at most ``max_new``).  Full forwards without a cache: O(new tokens) passes of the
        batch, fine at calibration sizes.  Returns a right-padded Batch on batch's device, loss
        on every non-image, non-padding token as :meth:`batches`."""
        dev = batch.ids.device
        rows = []
        for ids, am in zip(batch.ids.tolist(), batch.mask.tolist()):
            n = sum(am)
            first = max((i + 1 for i, t in enumerate(ids[:n]) if t == self.image_id), default=1)
            cut = first + int(torch.randint(0, max(1, (n - first) // 2 + 1), (1,), generator=gen))
            rows.append((ids[:min(cut, n)], min(max_new, n - min(cut, n))))
        new = max(k for _, k in rows)
        pad = self.pad_id
        cur = [list(p) for p, _ in rows]
        for _ in range(new):
            ids, am = pad_batch(cur, pad)
            logits = self.logits(Batch(ids.to(dev), am.to(dev), ids.to(dev), batch.images), feats)
            last = logits[torch.arange(len(cur), device=dev), am.sum(1).to(dev) - 1].float() / temperature
            last[:, self.image_id] = -math.inf     # image tokens come only with image features
            nxt = torch.multinomial(torch.softmax(last, -1).cpu(), 1, generator=gen)[:, 0].tolist()
            for r, (p, k) in enumerate(rows):
                if len(cur[r]) - len(p) < k:
                    cur[r].append(nxt[r])
        ids, am = pad_batch(cur, pad)
        return self._batch_from(ids, am, batch.images).to(dev)

    def _batch_from(self, ids: torch.Tensor, am: torch.Tensor, images: list[int]) -> Batch:
        labels = ids.clone()
        labels[(am == 0) | (ids == self.image_id)] = -100
        return Batch(ids, am, labels, images)

    def _batch(self, group: list[list[int]], pad: int, images: list[int]) -> Batch:
        return self._batch_from(*pad_batch(group, pad), images)


def check_family(source: Source) -> None:
    if source.family.name != "llava":
        raise ValueError(f"method speedq supports LlavaForConditionalGeneration (CLIP/SigLIP + Llama/Qwen2), got "
                         f"{source.family.architecture}; export it with --method gptq or rtn")


def adapter_for(model: nn.Module, source: Source) -> LlavaAdapter:
    check_family(source)
    return LlavaAdapter(model, source)
