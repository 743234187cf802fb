"""SPEED-Q (arXiv 2511.08914): staged low-bit quantization with self-distillation, as an export method.

    stage 1  vision tower: block-wise AdaRound (speedq_adaround.py) on image-only calibration,
             each block fed by the already-quantized earlier blocks; frozen afterwards.
    stage 2  projector alignment: only the projector trains (next-token CE on the calibration
             image + caption prompts); vision tower = the quantized one, language model = fp.
    stage 3  language-model QAT: embeddings and LM head quantized once (4-bit g32) and frozen,
             every LM linear through the recipe's quantizer (2-bit g16 with 4-bit scales in runs
             of 16 rows, or 4-bit g32 / runs of 128) with a straight-through gradient, loss =
             CAKLD against the fp model (gamma = the teacher's mean max probability) +
             label-smoothed CE (0.1); the projector trains too.  Start (SpeedQConfig.init):
             GPTQ  (default, speedq_gptq.py) GPTQ layer by layer on the recipe's own grid, then
                   QAT on that frozen grid from GPTQ's weights; embeddings/head asymmetric q4
                   (RTN + clip search / GPTQ);
             RTN   the paper's: asymmetric clipping init, bilevel min-max params recomputed every
                   forward; embeddings/head 4-bit symmetric.
             Data: the calibration prompts plus ``gen`` teacher-sampled continuations of each;
             a held-out ``val`` fraction of the calibration set picks the stage-2 and stage-3
             weights kept (lowest KL(fp || q) on it, evaluated every ``eval_every`` steps).
    export   LM linears as q2b (2-bit) or q4 g32 (4-bit), bit for bit the QAT forward's weights;
             vision linears at the AdaRound codes (q2 / q4 at group 32: SPEED-Q's g16 is not a
             q2 group); projector float16; embeddings / head q4 g32 holding the quantized values
             exactly.

Unlike the other methods the whole model is in memory (QAT needs every layer at once, plus the
fp teacher): for the 1-2B models of the paper that is a GPU job (``speedq_device``); the code is
device-agnostic.  Families: LLaVA (speedq_llava.py); others raise ValueError.  Training budgets
are bounded by :class:`SpeedQConfig` (defaults sized for small models; the paper's are noted).
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .calib_data import CalibSet
from .config import SpeedQInit
from .lazy import capture_block_inputs
from .speedq_adaround import AdaRoundConfig, adaround_block
from .speedq_gptq import GridSTE, gptq_head_q4, gptq_init
from .speedq_llava import adapter_for, check_family
from .quantize import rtn
from .speedq_quant import BilevelSTE, autoclip_, bilevel_result, group_gram, RECIPES, sym4_result
from .tensor_map import Kind

LABEL_SMOOTHING = 0.1   # SPEED-Q's LabelSmoother(epsilon=0.1)
CALKD_BATCHES = 100     # teacher batches behind gamma (SPEED-Q calkd_steps)


@dataclass(frozen=True)
class SpeedQConfig:
    """Training budget and optimiser of the three stages.

    bits          2 (q2b LM) or 4 (q4 g32 LM).
    steps         stage-3 QAT optimiser steps (paper: ~10.6K steps at batch 64, 1 epoch of 680K samples).
    stage2_steps  stage-2 projector steps (paper: 1 epoch of ~68K samples).
    lr            AdamW learning rate of stages 2 and 3, cosine schedule with ``warmup`` (paper:
                  8e-6 over thousands of steps; a few hundred steps need a larger one).
    adaround      stage-1 settings (AdaRoundConfig; paper/BRECQ: 20000 iterations per block).
    warmup        fraction of the steps with a linear lr warmup (paper 3%).
    weight_decay  AdamW weight decay (paper 0.01 in stage 2).
    grad_clip     max gradient norm (HF Trainer's default 1.0).
    batch_size    samples per step; device: torch device string ("cpu", "cuda", ...); progress: tqdm bars.
    init          stage-3 start (SpeedQInit): GPTQ on the recipe grid, then QAT on that frozen grid
                  (default), or the paper's clip init with min-max params recomputed per forward.
    val           fraction of the calibration samples held out of stages 2-3; stage 3 keeps the
                  weights with the lowest held-out KL(fp || q) (evaluated every ``eval_every``
                  steps and at step 0); 0: no hold-out, the last step's weights.
    gen           teacher-sampled continuations per training prompt added to the stage-3 data.
    """

    bits: int = 2
    steps: int = 100
    stage2_steps: int = 30
    lr: float = 1e-4
    adaround: AdaRoundConfig = AdaRoundConfig()
    warmup: float = 0.03
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 8
    device: str = "cpu"
    seed: int = 0
    progress: bool = True
    init: SpeedQInit = SpeedQInit.GPTQ
    val: float = 0.125
    eval_every: int = 25
    gen: int = 1

    def __post_init__(self) -> None:
        if self.bits not in RECIPES:
            raise ValueError(f"speedq bits must be one of {sorted(RECIPES)} (SPEED-Q's 2-bit and 4-bit recipes), "
                             f"got {self.bits!r}; use --method gptq for other widths")
        for name in ("steps", "stage2_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not (isinstance(v, int) and v >= 0):
                raise ValueError(f"speedq {name} must be a non-negative integer, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"speedq lr must be a positive number, got {self.lr!r}")

    @classmethod
    def from_export(cls, cfg) -> SpeedQConfig:
        return cls(bits=cfg.bits, steps=cfg.speedq_steps, stage2_steps=cfg.speedq_stage2_steps, lr=cfg.speedq_lr,
                   adaround=AdaRoundConfig(iters=cfg.speedq_adaround_iters, batch=cfg.batch_size),
                   batch_size=cfg.batch_size, device=cfg.speedq_device, seed=cfg.seed, progress=cfg.progress,
                   init=cfg.speedq_init, val=cfg.speedq_val, eval_every=cfg.speedq_eval_every, gen=cfg.speedq_gen)


# ---- planning --------------------------------------------------------------------------------
def plan_target(m, cfg):
    """pipeline.plan_target for method speedq (see the module docstring for the layout)."""
    from .pipeline import Target, _group_for

    e = m.entry
    if e.kind is Kind.VECTOR:
        return Target("f32", 32, 0)
    if e.kind is Kind.DENSE or e.tower == "projector":
        return Target("f16", 16, 0, "speedq: projector trained in float" if e.tower == "projector" else "")
    n, k = m.shape
    head = e.kind is Kind.EMBED or e.src == "lm_head.weight"
    if e.tower == "text" and not head and cfg.bits == 2 and k % 32 == 0:
        return Target("q2b", 2, 16)
    bits = 4 if head else cfg.bits
    g = _group_for(k, 32)
    if g is None:
        return Target("f16", 16, 0, f"in-features {k} is not a multiple of 32: kept float16")
    note = (f"speedq: 4-bit {'symmetric' if cfg.speedq_init.value == 'rtn' else 'asymmetric'} g32 "
            "(embeddings / head)") if head else \
        ("speedq: AdaRound at group 32" if e.tower == "vision" else "speedq: bilevel 4-bit g32")
    return Target(f"q{bits}", bits, g, note)


# ---- the recipe --------------------------------------------------------------------------------
def run(cal, source, calib: CalibSet) -> None:
    """The pipeline recipe of method speedq: trains, then stores every mapped tensor through
    the pipeline's quantizer (``cal.q``), the trained codes as presets."""
    import transformers

    check_family(source)
    q = cal.q
    scfg = SpeedQConfig.from_export(q.cfg)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if q.cfg.progress else (lambda s: None)
    torch.manual_seed(scfg.seed)
    dev = torch.device(scfg.device)
    with torch.enable_grad():
        model = getattr(transformers, source.family.architecture).from_pretrained(
            source.path, dtype=torch.float32).to(dev).eval()
        ad = adapter_for(model, source)
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        tad = adapter_for(teacher, source)
        key_of = {c: m.key for c, m in q.by_canon.items()}
        stage1(ad, calib, q, key_of, scfg, log)
        train, val = split_calib(calib, scfg.val, scfg.seed)
        batches, vbatches = ad.batches(train, scfg.batch_size), ad.batches(val, scfg.batch_size) if val else []
        n_train = len(train.images)          # image indices >= n_train are the held-out images
        with torch.no_grad():
            pv = torch.cat([ad.pixels(train)] + ([ad.pixels(val)] if val and val.images else [])).to(dev)
            feats_q = ad.features(pv)          # quantized vision tower, frozen from here on
            feats_fp = tad.features(pv)
        vbatches = [_shift_images(b, n_train) for b in vbatches]
        stage2(ad, tad, batches, feats_q, feats_fp, scfg, log, vbatches)
        sampled = []
        if scfg.gen and scfg.steps:
            gen = torch.Generator(device="cpu").manual_seed(scfg.seed + 1)
            with torch.no_grad():
                sampled = [tad.sample(b.to(dev), _feats(feats_fp, b), gen) for b in batches for _ in range(scfg.gen)]
        log(f"speedq stage 3: {len(batches)} calibration + {len(sampled)} teacher-sampled training batches, "
            f"{len(vbatches)} held-out")
        stage3(ad, tad, batches, feats_q, feats_fp, q, key_of, scfg, log, vbatches, sampled)
    state = dict(model.named_parameters(remove_duplicate=False))
    ref = dict(teacher.named_parameters(remove_duplicate=False))
    for m in q.by_canon.values():
        if m.key in q.done:
            continue
        # quantized tensors: error against the original fp weight; the rest: the trained value
        src = ref if m.key in q.preset else state
        t = src.get(m.canonical)
        if t is None:
            raise RuntimeError(f"internal error: speedq has no value for {m.canonical}")
        q._store_matrix(m, t.detach().to("cpu", torch.float32).reshape(m.shape), None)


def split_calib(calib: CalibSet, frac: float, seed: int) -> tuple[CalibSet, CalibSet | None]:
    """(train, held-out): a seeded ``frac`` of the images (with their captions) and of the texts,
    at least one of each where there are two or more; (calib, None) for frac 0."""
    if frac <= 0:
        return calib, None
    gen = torch.Generator().manual_seed(seed + 7)

    def cut(n: int) -> tuple[list[int], list[int]]:
        k = min(n - 1, max(1, round(frac * n))) if n >= 2 else 0
        perm = torch.randperm(n, generator=gen).tolist()
        return sorted(perm[k:]), sorted(perm[:k])

    (ti, vi), (tt, vt) = cut(len(calib.images)), cut(len(calib.texts))
    caps = calib.captions or ("",) * len(calib.images)
    part = lambda ii, tx, tag: CalibSet(tuple(calib.images[i] for i in ii), tuple(caps[i] for i in ii),  # noqa: E731
                                        tuple(calib.texts[i] for i in tx), f"{calib.source} ({tag})")
    return part(ti, tt, "speedq train"), (part(vi, vt, "speedq held-out") if vi or vt else None)


def _shift_images(b, n: int):
    return type(b)(b.ids, b.mask, b.labels, [i + n for i in b.images])


# ---- stage 1 -----------------------------------------------------------------------------------
def _call(block: nn.Module, b) -> torch.Tensor:
    out = block(b[0], *b[1], **b[2])
    return out[0] if isinstance(out, (tuple, list)) else out


def stage1(ad, calib: CalibSet, q, key_of: dict, cfg: SpeedQConfig, log) -> list[tuple[float, float]]:
    """AdaRound of the vision blocks (image-only); stores presets; returns (rtn, adaround) errors."""
    dev = torch.device(cfg.device)
    pv = ad.pixels(calib).to(dev)
    blocks = ad.vision_blocks()
    xs = []
    for s in range(0, len(pv), cfg.adaround.batch):
        h, a, kw = capture_block_inputs(lambda s=s: ad.vision_tower(pixel_values=pv[s:s + cfg.adaround.batch]),
                                        blocks[0][1])
        xs.append((h, a, kw))
    fp_in, q_in = xs, list(xs)
    errs = []
    for i, (prefix, block) in enumerate(blocks):
        with torch.no_grad():
            targets = [_call(block, b) for b in fp_in]

        def qtype_of(name: str, w: torch.Tensor, prefix=prefix):
            key = key_of.get(f"{prefix}.{name}.weight")
            tgt = q.targets.get(key) if key else None
            return (tgt.qtype, tgt.group) if tgt is not None and tgt.qtype.startswith("q") else None

        res, e_rtn, e_ada = adaround_block(block, _call, q_in, targets, qtype_of, cfg.adaround,
                                           seed=cfg.seed + i)
        for name, r in res.items():
            q.preset[key_of[f"{prefix}.{name}.weight"]] = ("adaround", r)
        with torch.no_grad():
            q_in = [(_call(block, b), b[1], b[2]) for b in q_in]
        fp_in = [(t, b[1], b[2]) for t, b in zip(targets, fp_in)]
        q.block_done("vision", i, math.sqrt(e_ada))
        errs.append((e_rtn, e_ada))
        log(f"speedq stage 1: vision block {i}: relative squared output error RTN {e_rtn:.3e} -> "
            f"AdaRound {e_ada:.3e}")
    for p in ad.vision_tower.parameters():
        p.requires_grad_(False)
    return errs


# ---- stages 2 and 3 -------------------------------------------------------------------------------
def _feats(feats: torch.Tensor, b) -> torch.Tensor | None:
    return feats[b.images] if b.images else None


def _ce(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Next-token CE over the label positions (logits [B, T, V], labels [B, T])."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                           label_smoothing=smoothing)


def cakld(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
    """SPEED-Q's (BitDistiller's) confidence-aware KL: per position gamma KL(p_s || p_t) +
    (1 - gamma) KL(p_t || p_s), summed over the positions that predict a label (shifted, so the
    positions match the CE's), averaged over the batch.  logits [B, T, V] float32."""
    ls, lt = F.log_softmax(student[:, :-1], -1), F.log_softmax(teacher[:, :-1], -1)
    ps, pt = ls.exp(), lt.exp()
    rev = (ps * (ls - lt)).sum(-1)           # KL(p_s || p_t)   [B, T-1]
    fwd = (pt * (lt - ls)).sum(-1)           # KL(p_t || p_s)
    mask = (labels[:, 1:] != -100).to(student.dtype)
    return ((gamma * rev + (1 - gamma) * fwd) * mask).sum(-1).mean()


def _schedule(opt, steps: int, warmup: float):
    w = max(1, int(round(warmup * steps)))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / w if s < w else 0.5 * (1 + math.cos(math.pi * (s - w) / max(1, steps - w))))


def fidelity(student, teacher, batches: list, feats_s, feats_t, device="cpu") -> tuple[float, float]:
    """(mean KL(p_t || p_s) per label token, greedy agreement: the fraction of label positions
    where both argmaxes agree), teacher-forced, of two adapters over ``batches`` (no gradient)."""
    kl = agree = count = 0.0
    with torch.no_grad():
        for b in batches:
            b = b.to(torch.device(device))
            lt = F.log_softmax(teacher.logits(b, _feats(feats_t, b))[:, :-1].float(), -1)
            ls = F.log_softmax(student.logits(b, _feats(feats_s, b))[:, :-1].float(), -1)
            m = b.labels[:, 1:] != -100
            kl += float((lt.exp() * (lt - ls)).sum(-1)[m].sum())
            agree += float((lt.argmax(-1) == ls.argmax(-1))[m].sum())
            count += float(m.sum())
    return kl / max(count, 1.0), agree / max(count, 1.0)


def _loop(steps: int, batches: list, loss_fn, params: list, cfg: SpeedQConfig, desc: str, log,
          val_fn=None) -> list[float]:
    """AdamW + warmup/cosine over ``steps`` batches (a seeded permutation, repeated); returns the
    losses.  With ``val_fn`` (() -> held-out score, lower is better), evaluated at step 0, every
    ``cfg.eval_every`` steps and at the end, ``params`` end at their best-scoring values."""
    if steps == 0 or not batches:
        return []
    best = (val_fn(), 0, [p.detach().clone() for p in params]) if val_fn else None
    dev = torch.device(cfg.device)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = _schedule(opt, steps, cfg.warmup)
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    losses = []
    bar = range(steps)
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr)
    for _ in bar:
        if not order:
            order = torch.randperm(len(batches), generator=gen).tolist()
        b = batches[order.pop()].to(dev)
        loss = loss_fn(b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"loss {losses[-1]:.4f}")
        if best is not None and (len(losses) % cfg.eval_every == 0 or len(losses) == steps):
            score = val_fn()
            if score < best[0]:
                best = (score, len(losses), [p.detach().clone() for p in params])
    if best is not None:
        with torch.no_grad():
            for p, v in zip(params, best[2]):
                p.copy_(v)
        log(f"{desc}: kept step {best[1]} of {steps} (held-out score {best[0]:.5f})")
    return losses


def stage2(ad, tad, batches, feats_q, feats_fp, cfg: SpeedQConfig, log, vbatches: list | None = None) -> list[float]:
    """Projector alignment: train only the projector, CE on the image prompts (no smoothing);
    with ``vbatches``, the projector kept is the one with the lowest held-out KL(fp || q)."""
    for p in ad.model.parameters():
        p.requires_grad_(False)
    params = list(ad.projector.parameters())
    for p in params:
        p.requires_grad_(True)
    mm = [b for b in batches if b.images]
    vmm = [b for b in vbatches or () if b.images]
    val_fn = (lambda: fidelity(ad, tad, vmm, feats_q, feats_fp, cfg.device)[0]) if vmm else None
    return _loop(cfg.stage2_steps, mm, lambda b: _ce(ad.logits(b, _feats(feats_q, b)), b.labels, 0.0),
                 params, cfg, "speedq stage 2 (projector)", log, val_fn)


def _lm_linears(ad) -> dict[str, nn.Linear]:
    lm = ad.language_model
    root = "model.language_model"
    return {f"{root}.{n}.weight": m for n, m in lm.named_modules() if isinstance(m, nn.Linear)}


def _clip_init(ad, batches, feats_q, cfg: SpeedQConfig, linears: dict) -> None:
    """SPEED-Q's asymmetric clipping init of the LM linears except q/k, from their inputs on
    the training batches (group Gram blocks, float64)."""
    group = RECIPES[cfg.bits][0]
    grams: dict[str, torch.Tensor] = {}
    hooks = []
    for name, lin in linears.items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            continue

        def hook(mod, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            g = group_gram(x[cur["mask"]], group)
            grams[name] = grams[name] + g if name in grams else g
        hooks.append(lin.register_forward_pre_hook(hook))
    cur: dict = {}
    try:
        with torch.no_grad():
            for b in batches[:CALKD_BATCHES]:
                b = b.to(torch.device(cfg.device))
                cur["mask"] = b.mask.reshape(-1).bool()
                ad.logits(b, _feats(feats_q, b))
    finally:
        for h in hooks:
            h.remove()
    for name, gram in grams.items():
        autoclip_(linears[name].weight.data, gram, cfg.bits)


def teacher_confidence(tad, batches, feats_fp, cfg: SpeedQConfig) -> float:
    """gamma: the teacher's max softmax probability averaged over the label positions of up to
    CALKD_BATCHES batches."""
    num = den = 0.0
    with torch.no_grad():
        for b in batches[:CALKD_BATCHES]:
            b = b.to(torch.device(cfg.device))
            p = F.softmax(tad.logits(b, _feats(feats_fp, b))[:, :-1], -1).amax(-1)
            m = b.labels[:, 1:] != -100
            num += float(p[m].sum())
            den += float(m.sum())
    return num / max(den, 1.0)


def stage3(ad, tad, batches, feats_q, feats_fp, q, key_of: dict, cfg: SpeedQConfig, log,
           vbatches: list | None = None, sampled: list | None = None) -> list[float]:
    """LM QAT with distillation; stores the presets of the LM linears, embeddings and head.
    ``vbatches``: held-out batches for the early stopping (see SpeedQConfig.val); ``sampled``:
    teacher-sampled batches trained on with ``batches`` (the init and gamma use ``batches`` only,
    so the QAT of a run starts where the same export with 0 steps ends)."""
    from torch.nn.utils import parametrize

    model = ad.model
    for p in model.parameters():
        p.requires_grad_(False)
    # embeddings and head: 4-bit g32 once, frozen (one tensor when tied).  The paper's init:
    # symmetric absmax; the GPTQ init: the same q4 bytes used asymmetrically (clip-searched RTN
    # for the embedding, GPTQ for an untied head on the quantized LM's final hidden states).
    emb = ad.language_model.get_input_embeddings().weight
    heads = [("model.language_model.embed_tokens.weight", emb), ("lm_head.weight", model.lm_head.weight)]
    gptq_head = cfg.init is SpeedQInit.GPTQ and model.lm_head.weight is not emb
    done: dict[int, object] = {}   # a tied head is the embedding tensor: quantized once, stored under both keys
    for canon, w in heads:
        key = key_of.get(canon)
        tgt = q.targets.get(key) if key else None
        if tgt is None or not tgt.qtype.startswith("q") or (gptq_head and canon == "lm_head.weight"):
            continue
        r = done.get(id(w))
        if r is None:
            r = done[id(w)] = sym4_result(w.data, tgt.group) if cfg.init is SpeedQInit.RTN else \
                rtn(w.data, "q4", tgt.group, clip_search=True)
            w.data.copy_(r.deq.to(w.device))
        q.preset[key] = ("speedq-sym4" if cfg.init is SpeedQInit.RTN else "speedq-rtn4+clip", r)
    # the LM linears the file stores quantized (one whose in-features fit no group stays fp16, untrained by QAT)
    linears = {c: lin for c, lin in _lm_linears(ad).items()
               if c in key_of and q.targets[key_of[c]].qtype.startswith("q")}
    dev = torch.device(cfg.device)
    if cfg.init is SpeedQInit.GPTQ:    # the QAT starts from GPTQ's weights on a frozen grid
        grids = gptq_init(ad, batches, lambda b: _feats(feats_q, b), linears, cfg.bits, dev, log)
        quantizers = {c: GridSTE(grids[c].to(dev)) for c in linears}
        key = key_of.get("lm_head.weight")
        if gptq_head and key and q.targets[key].qtype.startswith("q"):
            r = gptq_head_q4(ad, batches, lambda b: _feats(feats_q, b), q.targets[key].group, dev)
            q.preset[key] = ("speedq-gptq4", r)
    else:                              # the paper's: clip init, min-max params every forward
        _clip_init(ad, batches, feats_q, cfg, linears)
        quantizers = {c: BilevelSTE(cfg.bits) for c in linears}
    gamma = teacher_confidence(tad, batches, feats_fp, cfg)
    log(f"speedq stage 3: teacher confidence gamma = {gamma:.4f}")
    for c, lin in linears.items():
        parametrize.register_parametrization(lin, "weight", quantizers[c], unsafe=True)
    params = [p for n, p in ad.language_model.named_parameters() if "embed_tokens" not in n]
    params += list(ad.projector.parameters())
    for p in params:
        p.requires_grad_(True)

    def loss_fn(b):
        with torch.no_grad():
            t = tad.logits(b, _feats(feats_fp, b))
        s = ad.logits(b, _feats(feats_q, b))
        return cakld(s, t, b.labels, gamma) + _ce(s, b.labels, LABEL_SMOOTHING)

    val_fn = (lambda: fidelity(ad, tad, vbatches, feats_q, feats_fp, cfg.device)[0]) if vbatches else None
    try:
        losses = _loop(cfg.steps, batches + list(sampled or ()), loss_fn, params, cfg,
                       f"speedq stage 3 (QAT {cfg.bits}-bit)", log, val_fn)
    finally:
        for lin in linears.values():
            parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)
    for p in model.parameters():
        p.requires_grad_(False)
    label = f"speedq-{cfg.init.value}+qat{cfg.bits}"
    for canon, lin in linears.items():
        key = key_of[canon]
        if (q.targets[key].qtype == "q2b") != (cfg.bits == 2):
            raise RuntimeError(f"internal error: {canon} planned as {q.targets[key].qtype} for {cfg.bits}-bit speedq")
        res = grids[canon].result(lin.weight.data) if cfg.init is SpeedQInit.GPTQ else \
            bilevel_result(lin.weight.data, cfg.bits)
        with torch.no_grad():   # the model holds the file's values (what the QAT forward computed)
            lin.weight.copy_(res.deq.to(lin.weight.device))
        q.preset[key] = (label, res)
    return losses


__all__ = ["SpeedQConfig", "cakld", "plan_target", "run", "stage1", "stage2", "stage3"]
