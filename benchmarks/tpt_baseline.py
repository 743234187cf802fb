"""TPT (test-time prompt tuning, Shu et al., NeurIPS 2022): the gradient-based TTA baseline.

A small, faithful CPU/fp32 re-implementation on a Hugging Face ``CLIPModel`` (transformers 5.x),
following the released code (azshue/TPT, ``tpt_classification.py``):

- per test image, 64 views: the original (resize + center crop, the CLIP processor) and 63
  random-resized crops (scale 0.08-1, ratio 3/4-4/3, bilinear) with a random horizontal flip,
  TPT's ``get_preaugment`` for the ImageNet variants;
- image features of all 64 views in one batch with no grad (the image encoder is frozen);
- learnable context vectors ``ctx`` [n_ctx, W], initialised from the token embeddings of
  ``ctx_init`` ("a photo of a": 4 tokens), put in place of those tokens in every class prompt
  "<bos> a photo of a {class} <eos>", run through the frozen text encoder *with* grad;
- logits = exp(logit_scale) · f̂ t̂ᵀ [64, C]; keep the 10% lowest-entropy views (int(64·0.1)=6);
  loss = entropy of their averaged probability (TPT's ``avg_entropy``); one AdamW step, lr 5e-3;
- predict the original view with the tuned prompt; reset ``ctx`` and the optimizer per image.

The text encoder with injected context: ``CLIPTextModel.forward`` in transformers 5.24 takes
``input_ids`` only, so the same steps are done here by hand: ``embeddings(inputs_embeds=...)``
(adds positions), ``create_causal_mask`` (causal + padding mask, as the model builds it),
``encoder(..., is_causal=True)``, ``final_layer_norm``, then the pooled row is the first
``eos_token_id`` of the *token ids* (the legacy argmax when eos id is 2), exactly as the model
pools.  The context replaces tokens in place, so sequence length and EOS positions do not move;
with ``ctx`` = the init tokens' embeddings this reproduces ``get_text_features`` (tested).

Prompts are padded to ``max_position_embeddings`` by default (77 for OpenAI CLIP), as TPT's
``clip.tokenize`` does; ``pad="longest"`` pads to the longest prompt (less activation memory,
same result: the causal mask keeps padding out of the EOS row).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

__all__ = ["TPTConfig", "TPT", "random_resized_crop", "avg_entropy", "select_confident"]


@dataclass(frozen=True)
class TPTConfig:
    n_views: int = 64              # original + 63 augmented
    top: float = 0.1               # fraction of lowest-entropy views kept (int(64*0.1) = 6)
    lr: float = 5e-3               # AdamW, TPT's default
    steps: int = 1                 # TPT's tta_steps
    ctx_init: str = "a photo of a"
    pad: str = "max_length"        # "max_length" (TPT / clip.tokenize) or "longest"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_views < 1 or self.steps < 1 or not (0 < self.top <= 1) or self.lr <= 0:
            raise ValueError(f"need n_views >= 1, steps >= 1, 0 < top <= 1, lr > 0; got {self}")


def random_resized_crop(img: Image.Image, size: int, rng: np.random.Generator,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> Image.Image:
    """torchvision's RandomResizedCrop + RandomHorizontalFlip(0.5) on a PIL image (no torchvision
    here): 10 tries at a box of random area fraction and log-uniform aspect, else center crop."""
    w, h = img.size
    area = w * h
    box = None
    for _ in range(10):
        a = area * rng.uniform(*scale)
        r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            box = (x, y, x + cw, y + ch)
            break
    if box is None:  # fallback: the largest center crop within the ratio range
        r = w / h
        cw, ch = (w, h) if ratio[0] <= r <= ratio[1] else \
            ((int(round(h * ratio[0])), h) if r < ratio[0] else (w, int(round(w / ratio[1]))))
        x, y = (w - cw) // 2, (h - ch) // 2
        box = (x, y, x + cw, y + ch)
    out = img.crop(box).resize((size, size), Image.BILINEAR)
    return out.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else out


def select_confident(logits: torch.Tensor, top: float) -> torch.Tensor:
    """Indices of the int(N·top) lowest-entropy rows of logits [N, C] (TPT's select_confident_samples)."""
    ent = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
    return torch.argsort(ent, descending=False)[: max(1, int(logits.shape[0] * top))]


def avg_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean probability of logits [N, C], computed in log space (TPT's avg_entropy)."""
    logp = logits - logits.logsumexp(dim=-1, keepdim=True)            # [N, C]
    avg = logp.logsumexp(dim=0) - math.log(logp.shape[0])            # [C] log of mean prob
    avg = torch.clamp(avg, min=torch.finfo(avg.dtype).min)
    return -(avg * avg.exp()).sum(-1)


class TPT:
    """TPT over a fixed label set on a ``CLIPModel`` (+ its tokenizer and CLIP image processor)."""

    def __init__(self, model, tokenizer, processor, classnames: list[str], config: TPTConfig = TPTConfig()):
        from transformers.masking_utils import create_causal_mask

        self._mask_fn = create_causal_mask
        self.model = model.eval()
        for p in self.model.parameters():        # CLIP is frozen: only ctx learns
            p.requires_grad_(False)
        self.cfg, self.proc = config, processor
        self.tm = model.text_model
        tcfg = self.tm.config
        self.image_size = int(model.config.vision_config.image_size)

        ctx_ids = tokenizer(config.ctx_init, add_special_tokens=False)["input_ids"]
        if not ctx_ids:
            raise ValueError(f"ctx_init {config.ctx_init!r} tokenizes to nothing")
        prompts = [f"{config.ctx_init} {c}" for c in classnames]
        if config.pad == "max_length":
            enc = tokenizer(prompts, padding="max_length", max_length=tcfg.max_position_embeddings,
                            truncation=True, return_tensors="pt")
        elif config.pad == "longest":
            enc = tokenizer(prompts, padding="longest", return_tensors="pt")
        else:
            raise ValueError(f"pad must be 'max_length' or 'longest', got {config.pad!r}")
        ids, self.attn = enc["input_ids"], enc["attention_mask"]     # [C, T]
        start = 1 if ids[0, 0].item() == tokenizer.bos_token_id else 0
        n = len(ctx_ids)
        if not torch.equal(ids[:, start:start + n], torch.tensor(ctx_ids).expand(len(prompts), -1)):
            raise ValueError(f"the tokens of {config.ctx_init!r} are not a common prefix of every prompt "
                             "(the tokenizer merges them with the class name); pick another ctx_init")
        self.ids, self.start, self.n_ctx = ids, start, n
        # the row each prompt is pooled at, as CLIPTextModel.forward picks it
        if tcfg.eos_token_id == 2:
            self.pool = ids.to(torch.int).argmax(-1)
        else:
            if not (ids == tcfg.eos_token_id).any(-1).all():
                raise ValueError("a prompt has no eos token (truncated?): the EOS pooling would be wrong")
            self.pool = (ids == tcfg.eos_token_id).int().argmax(-1)
        with torch.no_grad():
            emb = self.tm.embeddings.token_embedding(ids)             # [C, T, W], frozen
        self.prefix, self.suffix = emb[:, :start], emb[:, start + n:]
        self.ctx_init = emb[0, start:start + n].clone()                # [n_ctx, W]
        self.ctx = torch.nn.Parameter(self.ctx_init.clone())
        self.opt = torch.optim.AdamW([self.ctx], lr=config.lr)
        self.mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(processor.image_std, dtype=torch.float32).view(3, 1, 1)
        self.rng = np.random.default_rng(config.seed)
        self.scale = float(model.logit_scale.exp())

    # -- text -----------------------------------------------------------------------------------
    def text_features(self) -> torch.Tensor:
        """[C, E] L2-normalised class features with the current ``ctx`` (differentiable in ctx)."""
        C = self.ids.shape[0]
        emb = torch.cat([self.prefix, self.ctx.unsqueeze(0).expand(C, -1, -1), self.suffix], 1)  # [C, T, W]
        h = self.tm.embeddings(inputs_embeds=emb)                                  # + positions
        mask = self._mask_fn(config=self.tm.config, inputs_embeds=h, attention_mask=self.attn, cache=None)
        h = self.tm.encoder(inputs_embeds=h, attention_mask=mask, is_causal=True).last_hidden_state
        h = self.tm.final_layer_norm(h)
        pooled = h[torch.arange(C), self.pool]                                     # [C, W]
        t = self.model.text_projection(pooled)                                    # [C, E]
        return t / t.norm(dim=-1, keepdim=True)

    # -- images ---------------------------------------------------------------------------------
    def views(self, image) -> torch.Tensor:
        """pixel_values [n_views, 3, S, S]: the processor's view, then n_views-1 random crops."""
        img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        img = img.convert("RGB")
        first = torch.from_numpy(self.proc(images=[img], return_tensors="np")["pixel_values"])
        S = self.image_size
        aug = [np.asarray(random_resized_crop(img, S, self.rng), dtype=np.float32)
               for _ in range(self.cfg.n_views - 1)]
        x = torch.from_numpy(np.stack(aug)).permute(0, 3, 1, 2) / 255.0            # [N-1, 3, S, S]
        return torch.cat([first.float(), (x - self.mean) / self.std], 0)

    @torch.no_grad()
    def image_features(self, px: torch.Tensor) -> torch.Tensor:
        f = self.model.get_image_features(pixel_values=px)
        f = f.pooler_output if hasattr(f, "pooler_output") else f
        return f / f.norm(dim=-1, keepdim=True)                                   # [N, E]

    # -- TPT ------------------------------------------------------------------------------------
    def reset(self) -> None:
        with torch.no_grad():
            self.ctx.copy_(self.ctx_init)
        self.opt.state.clear()          # AdamW moments and step count start over per image

    def step(self, feats: torch.Tensor) -> torch.Tensor:
        """One TPT step on view features [N, E]: entropy of the confident views' mean prediction,
        backward into ctx, AdamW.  Returns the step's logits [N, C] (before the update)."""
        self.opt.zero_grad(set_to_none=True)
        logits = self.scale * feats @ self.text_features().T                      # [N, C]
        idx = select_confident(logits.detach(), self.cfg.top)
        loss = avg_entropy(logits[idx])
        loss.backward()
        self.opt.step()
        return logits.detach()

    def predict(self, image, step_context=None) -> tuple[int, int, dict]:
        """(zero-shot prediction with the initial prompt, TPT prediction, timings) for one image.

        ``step_context``: a context-manager factory entered around the tuning steps only (the
        memory benchmark installs ``saved_tensors_hooks`` and peak-RSS probes there)."""
        self.reset()
        t0 = time.perf_counter()
        feats = self.image_features(self.views(image))                             # [64, E]
        t1 = time.perf_counter()
        with step_context() if step_context is not None else contextlib.nullcontext():
            for k in range(self.cfg.steps):
                logits = self.step(feats)
                if k == 0:   # row 0 = the original view under the initial prompt: zero-shot
                    zs = int(logits[0].argmax())
        t2 = time.perf_counter()
        with torch.no_grad():
            pred = int((feats[0] @ self.text_features().T).argmax())
        t3 = time.perf_counter()
        return zs, pred, {"views_s": t1 - t0, "tune_s": t2 - t1, "predict_s": t3 - t2}
