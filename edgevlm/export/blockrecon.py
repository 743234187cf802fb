"""Block-wise reconstruction after GPTQ: once GPTQ has fixed the integer codes of every linear
of a transformer block, tune the block's *continuous* quantization parameters - each group's
float16 (scale, min), and optionally the float32 norm and bias vectors the file stores - with
Adam on the block-output error over the calibration tokens, codes frozen.

GPTQ (and quantize.refit) fit each linear to its own output, one layer at a time; this fits the
block's output through the attention softmax, the GELU and the post-norms, where the layer-wise
errors meet.  The target is the full-precision block on full-precision inputs (a second
activation stream kept from the tower's input on: OmniQuant's choice), so a block can also undo
part of the error the earlier quantized blocks left in its inputs; the quantized side runs on the
inputs the earlier quantized blocks actually produce (the Calibrator's batches).

With ``codes_steps`` > 0 the codes move too: for the first ``codes_steps`` steps each code may
move one step up or down from GPTQ's by signed gradient descent through the rounding (SignRound
started from the GPTQ solution, signround.py), jointly with the params; the following ``steps``
tune the params on the codes reached.
Not here: learnable clipping, activation quantization, folds.  The
result always holds exactly what the file stores: the tuned params are rounded to float16 before
the final check, and a block keeps its GPTQ params unless the rounded ones lower its error on
the whole calibration set.  Memory: one block, its codes as float32, the second activation stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from .. import qtypes
from .quantize import QuantResult, _result
from .signround import SignCodes


class RefineQuantizer(Protocol):
    """What the refiner needs from the export pipeline (pipeline._ExportQuantizer implements it)."""

    def quant_result(self, canonical: str) -> QuantResult | None:
        """The low-bit result just stored for the linear weight ``canonical`` (codes + params),
        or None if it is not a refinable low-bit weight (float16, q8, not stored yet)."""

    def requantized(self, canonical: str, res: QuantResult, info: dict) -> torch.Tensor:
        """Store ``res`` (new params; codes unchanged unless codes_steps > 0) in place of the weight's earlier result;
        returns what the file now holds (float32 [N, K]).  ``info`` goes to the record."""

    def wants_refine(self, canonical: str) -> bool:
        """True if the float vector ``canonical`` (a norm or bias stored as float32) may be tuned."""

    def restore(self, canonical: str, t: torch.Tensor) -> torch.Tensor:
        """Replace an already stored vector; returns what the file now holds."""


@dataclass(frozen=True)
class RefineSettings:
    """steps: Adam steps per block, one calibration batch each (cosine-decayed learning rate).
    lr: Adam learning rate in units of the parameters' own size (relative change of a scale,
    min shift in scales, change of a vector in its rms, per step).  vectors: also tune the
    block's float32 norm weights/biases and linear biases.  seed: batch order.
    codes_steps: steps, before the ``steps`` above, during which the codes move too (0 = codes
    frozen); codes_lr: the signed step of the rounding offsets V in code units, decayed linearly
    to 0 over codes_steps (0.01 x 200 steps: the largest possible move of V is 1, one code)."""

    steps: int = 200
    lr: float = 3e-3
    vectors: bool = False
    seed: int = 0
    codes_steps: int = 0
    codes_lr: float = 1e-2


@dataclass
class _Group:
    """The tunable view of one quantized linear: W = (s0 (1 + a)) * C + (m0 + s0 b) per group."""

    canon: str
    name: str                 # module path inside the block
    res: QuantResult
    codes: torch.Tensor       # float32 [N, G, group]
    s0: torch.Tensor          # float32 [N, G] (the stored float16 values)
    m0: torch.Tensor          # float32 [N, G]
    a: torch.Tensor           # float32 [N, G], requires grad: relative scale change
    b: torch.Tensor           # float32 [N, G], requires grad: min shift in units of s0
    movable: SignCodes | None = None   # codes_steps > 0: the movable codes; None = codes frozen
    moving: bool = False               # weight() uses movable.codes() (else self.codes)

    def weight(self) -> torch.Tensor:
        n, g, gs = self.codes.shape
        s = self.s0 * (1 + self.a)
        m = self.m0 + self.s0 * self.b
        c = self.movable.codes() if self.moving else self.codes
        return (s.unsqueeze(-1) * c + m.unsqueeze(-1)).reshape(n, g * gs)

    def harden(self) -> None:
        """End of the codes phase: the codes are fixed where they are (float32 [N, G, group])."""
        self.codes = self.movable.hard()
        self.moving = False

    def rounded(self) -> QuantResult:
        """The tuned params (and codes) as the file stores them (float16, scales >= 0): exact deq."""
        with torch.no_grad():
            s = (self.s0 * (1 + self.a)).clamp(min=0).numpy().astype(np.float16)
            m = (self.m0 + self.s0 * self.b).numpy().astype(np.float16)
        ok = np.isfinite(s) & np.isfinite(m)   # an fp16 overflow keeps that group's old params
        s = np.where(ok, s, self.res.scales)
        m = np.where(ok, m, self.res.mins)
        codes = self.res.codes if self.movable is None else \
            self.codes.reshape(self.res.codes.shape).numpy().astype(self.res.codes.dtype)
        return _result(qtypes.get(self.res.qtype), self.res.group, codes, s, m)


@dataclass
class _Vector:
    """v = v0 + r d, r = rms(v0) (or 1 for an all-zero vector)."""

    canon: str
    name: str
    v0: torch.Tensor
    r: float
    d: torch.Tensor

    def value(self) -> torch.Tensor:
        return self.v0 + self.r * self.d


class BlockRefiner:
    """Hooks for Calibrator.run_tower: :meth:`before` (full-precision block, before its linears
    are quantized) and :meth:`after` (codes fixed; tunes and re-stores the params)."""

    def __init__(self, quantizer: RefineQuantizer, settings: RefineSettings, progress: bool = False,
                 log: Callable[[str], None] | None = None) -> None:
        self.q, self.s, self.progress, self.log = quantizer, settings, progress, log
        self._fp: list[torch.Tensor] | None = None     # full-precision stream, [B, T, D] per batch
        self._w_fp: dict[str, torch.Tensor] = {}        # codes_steps > 0: the block's fp linear weights
        self.history: list[dict] = []                  # per block: losses before/after, kept

    # ---- hooks ------------------------------------------------------------------------------
    def before(self, index: int, block: nn.Module, batches: list) -> list[torch.Tensor]:
        """Advance the full-precision stream through ``block`` (still full precision) and return
        it: the block's targets [B, T, D] per batch.  A tower's stream starts from its block-0
        inputs as the file computes them (quantized embedding tables, earlier towers)."""
        if index == 0 or self._fp is None or len(self._fp) != len(batches):
            self._fp = [b.hidden.clone() for b in batches]
        with torch.no_grad():
            self._fp = [_call(block, x, b, None) for x, b in zip(self._fp, batches)]
        if self.s.codes_steps > 0:   # V starts toward these (signround.py)
            self._w_fp = {n: m.weight.detach().to(torch.float32).clone()
                          for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        return self._fp

    def after(self, path: str, block: nn.Module, batches: list, targets: list[torch.Tensor]) -> dict | None:
        """Tune the block whose linears hold their GPTQ values against ``targets`` (from
        :meth:`before`) on the quantized inputs ``batches[j].hidden``.  Re-stores the params
        through the quantizer and leaves the block on what the file holds.  Returns the block's
        record (relative output MSE of GPTQ and of the tuned params, kept or not), or None when
        the block has no low-bit asymmetric linear."""
        groups, vectors = self._collect(path, block)
        if not groups:
            return None
        params = [t for g in groups for t in (g.a, g.b)] + [v.d for v in vectors]
        opt = torch.optim.Adam(params, lr=self.s.lr)
        rng = np.random.default_rng(self.s.seed)
        plain = self.loss(block, batches, targets, {**{f"{g.name}.weight": g.res.deq for g in groups},
                                                    **{v.name: v.v0 for v in vectors}})
        n_codes = self.s.codes_steps
        moving = n_codes > 0
        total = n_codes + self.s.steps
        steps = _bar(range(total), f"refine {path}", self.progress)
        with torch.enable_grad():
            for t in steps:
                if t % len(batches) == 0:
                    order = rng.permutation(len(batches))
                j = int(order[t % len(batches)])
                for pg in opt.param_groups:   # cosine decay to 0: the last steps settle, not jump
                    pg["lr"] = self.s.lr * 0.5 * (1 + math.cos(math.pi * t / total))
                if t == n_codes and moving:   # codes phase over: codes fixed from here on
                    for g in groups:
                        g.harden()
                    moving = False
                num, den = _sq_err(block, batches[j], targets[j], groups, vectors)
                loss = num / den.clamp(min=1e-30)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if moving:   # signed step, linearly decayed (SignRound's schedule)
                    for g in groups:
                        g.movable.step(self.s.codes_lr * (1 - t / n_codes))
                if hasattr(steps, "set_postfix_str") and t % 20 == 0:
                    steps.set_postfix_str(f"batch rel. MSE {float(loss):.3e} (GPTQ {plain:.3e} on all)")
        if moving:   # steps == 0 (refused by ExportConfig, allowed here): fix the codes now
            for g in groups:
                g.harden()
        moved = sum(int((g.codes != torch.from_numpy(g.res.codes.astype(np.float32)).reshape(g.codes.shape)).sum())
                    for g in groups)
        tuned = [g.rounded() for g in groups]
        after = self.loss(block, batches, targets, {**{f"{g.name}.weight": r.deq for g, r in zip(groups, tuned)},
                                                    **{v.name: v.value().detach() for v in vectors}})
        keep = after < plain
        rec = {"block": path, "loss_gptq": plain, "loss_refined": after, "kept": bool(keep)}
        if n_codes:
            rec["codes_moved"] = moved
        self.history.append(rec)
        if self.log is not None:
            self.log(f"block refine {path}: rel. output MSE {plain:.3e} -> {after:.3e}"
                     + (f", {moved} codes moved" if n_codes else "")
                     + ("" if keep else " (not lower: GPTQ params kept)"))
        self._w_fp = {}
        info = {"loss_ratio": after / max(plain, 1e-30), "kept": bool(keep),
                **({"codes_moved": moved if keep else 0} if n_codes else {})}
        for g, res in zip(groups, tuned):
            final = self.q.requantized(g.canon, res if keep else g.res, info)
            _set(block, f"{g.name}.weight", final)
        for v in vectors:
            held = self.q.restore(v.canon, (v.value() if keep else v.v0).detach().clone())
            _set(block, v.name, held)
        return rec

    # ---- pieces -----------------------------------------------------------------------------
    def _collect(self, path: str, block: nn.Module) -> tuple[list[_Group], list[_Vector]]:
        groups = []
        for name, m in block.named_modules():
            if not isinstance(m, nn.Linear):
                continue
            canon = f"{path}.{name}.weight"
            res = self.q.quant_result(canon)
            if res is None or res.mins is None:   # q8 / float weights: nothing worth tuning
                continue
            n, k = res.codes.shape
            g = k // res.group
            s0 = torch.from_numpy(res.scales.astype(np.float32))
            m0 = torch.from_numpy(res.mins.astype(np.float32))
            codes = torch.from_numpy(res.codes.astype(np.float32)).reshape(n, g, res.group)
            movable = None
            if self.s.codes_steps > 0:
                w = self._w_fp[name].reshape(n, g, res.group)
                x = (w - m0.unsqueeze(-1)) / s0.unsqueeze(-1)   # s0 == 0: nan/inf, SignCodes starts V at 0
                movable = SignCodes(codes, x, (1 << qtypes.get(res.qtype).bits) - 1)
            groups.append(_Group(canon, name, res, codes, s0, m0,
                                 torch.zeros(n, g, requires_grad=True), torch.zeros(n, g, requires_grad=True),
                                 movable, movable is not None))
        vectors = []
        if self.s.vectors:
            for name, p in block.named_parameters():
                canon = f"{path}.{name}"
                if p.ndim != 1 or not self.q.wants_refine(canon):
                    continue
                v0 = p.detach().clone().float()
                r = float(v0.pow(2).mean().sqrt())
                vectors.append(_Vector(canon, name, v0, r if r > 0 else 1.0, torch.zeros_like(v0, requires_grad=True)))
        return groups, vectors

    @staticmethod
    def loss(block: nn.Module, batches: list, targets: list[torch.Tensor], over: dict[str, torch.Tensor]) -> float:
        """Relative block-output MSE Σ|y - t|² / Σ|t|² over every real token, with the block's
        parameters replaced by ``over`` (name inside the block -> tensor)."""
        num = den = 0.0
        with torch.no_grad():
            for b, t in zip(batches, targets):
                n, d = _masked_sq(_call(block, b.hidden, b, over), t, b.mask)
                num += float(n)
                den += float(d)
        return num / max(den, 1e-30)


def _sq_err(block: nn.Module, b, target: torch.Tensor, groups: list[_Group],
            vectors: list[_Vector]) -> tuple[torch.Tensor, torch.Tensor]:
    over = {f"{g.name}.weight": g.weight() for g in groups}
    over.update({v.name: v.value() for v in vectors})
    return _masked_sq(_call(block, b.hidden, b, over), target, b.mask)


def _masked_sq(y: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ (y - t)², Σ t²) over real tokens; y, t [B, T, D], mask [B, T] (None = all)."""
    d2, t2 = (y - t).pow(2).sum(-1), t.pow(2).sum(-1)
    if mask is not None and tuple(mask.shape) == tuple(d2.shape):
        m = mask.to(d2.dtype)
        d2, t2 = d2 * m, t2 * m
    return d2.sum(), t2.sum()


def _call(block: nn.Module, hidden: torch.Tensor, b, over: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """The block on ``hidden`` with the batch's other inputs; ``over`` replaces parameters."""
    if over:
        out = torch.func.functional_call(block, over, (hidden, *b.args), b.kwargs, strict=False)
    else:
        out = block(hidden, *b.args, **b.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _set(block: nn.Module, name: str, t: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    m = block.get_submodule(owner) if owner else block
    m._parameters[leaf] = nn.Parameter(t.to(torch.float32), requires_grad=False)


def _bar(it, desc: str, enabled: bool) -> Any:
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, unit="step", leave=False, dynamic_ncols=True)
