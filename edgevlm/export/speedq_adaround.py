"""SPEED-Q stage 1: block-wise AdaRound (BRECQ) of the vision tower.

Each linear weight W [N, K] of a block keeps the file's own RTN group parameters (float16 scale
and min per group, ``qtypes`` q2/q4) and learns only how each weight rounds:

    W~ = scale * clamp(floor((W - min) / scale) + h(V), 0, qmax) + min
    h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1),  zeta = 1.1, gamma = -0.1

minimising ||f_k(X_k; W) - f_k(X~_k; W~)||² (summed over features, mean over tokens; X_k the
full-precision inputs, X~_k those from the already-quantized earlier blocks) plus
lambda Σ (1 - |2 h(V) - 1|^beta): no regulariser for the first ``warmup`` of the iterations, then
beta decays linearly from 20 to 2.  Rounding up where h(V) >= 0.5 (V >= 0) gives the codes; the
dequantized weight is the file's scale * code + min, so the stored tensor equals what the next
blocks were calibrated on.  BRECQ / the SPEED-Q brief default to 20000 iterations per block on
1024 images; :class:`AdaRoundConfig` defaults to a bound that finishes a tiny model in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .. import qtypes
from .quantize import QuantResult, _result

ZETA, GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class AdaRoundConfig:
    """iters: Adam steps per block (BRECQ: 20000); lr: Adam lr on V (BRECQ: 1e-3); weight:
    the rounding regulariser's lambda (0.01); beta: its (start, end) exponent (20 -> 2); warmup:
    fraction of the iterations without it (0.2); batch: calibration samples per step."""

    iters: int = 200
    lr: float = 1e-3
    weight: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    batch: int = 8

    def __post_init__(self) -> None:
        if isinstance(self.iters, bool) or not (isinstance(self.iters, int) and self.iters >= 0):
            raise ValueError(f"AdaRound iters must be a non-negative integer, got {self.iters!r}")
        if not (self.lr > 0 and self.weight >= 0 and 0 <= self.warmup < 1 and self.batch >= 1):
            raise ValueError(f"AdaRound needs lr > 0, weight >= 0, 0 <= warmup < 1 and batch >= 1, got {self}")


def _h(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


class _SoftRound(nn.Module):
    """Parametrization of one linear's weight during the search: W~ from V (the original W
    is ignored; its floor codes and group params are fixed at construction)."""

    def __init__(self, w: torch.Tensor, qtype: str, group: int) -> None:
        super().__init__()
        qt = qtypes.get(qtype)
        n, k = w.shape
        wn = np.ascontiguousarray(w.detach().to("cpu", torch.float32).numpy())
        _, scales, mins = qt.quantize(wn, group)          # the file's RTN params, float16 [N, G]
        self.qtype, self.group, self.qmax = qtype, group, (1 << qt.bits) - 1
        self.scales16, self.mins16 = scales, mins
        dev = w.device
        s = torch.from_numpy(scales.astype(np.float32)).to(dev)[..., None]     # [N, G, 1]
        m = torch.from_numpy(mins.astype(np.float32)).to(dev)[..., None]
        x = (w.detach().float().reshape(n, k // group, group) - m) / torch.where(s > 0, s, torch.ones_like(s))
        base = torch.floor(x)
        rest = (x - base).clamp(1e-4, 1 - 1e-4)   # the fraction h(V) starts at (exact soft init)
        self.register_buffer("s", s)
        self.register_buffer("m", m)
        self.register_buffer("base", base)
        self.register_buffer("rtn", torch.round(x).clamp(0, self.qmax))
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.hard = False

    def codes(self) -> torch.Tensor:
        """Hard codes [N, G, group] float32: round up where h(V) >= 0.5."""
        return (self.base + (self.v.detach() >= 0).float()).clamp(0, self.qmax)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        c = self.codes() if self.hard else (self.base + _h(self.v)).clamp(0, self.qmax)
        return (self.s * c + self.m).reshape(w.shape)

    def round_loss(self, beta: float) -> torch.Tensor:
        return (1 - (2 * _h(self.v) - 1).abs().pow(beta)).sum()

    def result(self, codes: torch.Tensor) -> QuantResult:
        n = codes.shape[0]
        return _result(qtypes.get(self.qtype), self.group, codes.reshape(n, -1).cpu().numpy(),
                       self.scales16, self.mins16)


def _linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def block_error(block: nn.Module, call, inputs: list, targets: list) -> float:
    """Σ ||block(x~) - y||² / Σ ||y||² over the calibration batches (no gradient)."""
    num = den = 0.0
    with torch.no_grad():
        for x, y in zip(inputs, targets):
            out = call(block, x)
            num += float(((out - y) ** 2).sum())
            den += float((y ** 2).sum())
    return num / max(den, 1e-30)


def adaround_block(block: nn.Module, call, inputs: list, targets: list, qtype_of, cfg: AdaRoundConfig,
                   seed: int = 0, log=None) -> tuple[dict[str, QuantResult], float, float]:
    """AdaRound every linear of ``block`` jointly on its block output.

    call(block, x) -> y runs the block on one batch x (a Batch-like object the caller knows);
    inputs: the quantized-prefix inputs X~ per batch; targets: the full-precision outputs f(X)
    [B, T, D] per batch.  qtype_of(name, weight) -> (qtype, group) or None (linear left alone).
    Leaves the block's linears holding the hard-rounded weights (what the file stores) and returns
    ({linear name: QuantResult}, relative block error with RTN rounding, with AdaRound)."""
    from torch.nn.utils import parametrize

    params: dict[str, _SoftRound] = {}
    for name, lin in _linears(block).items():
        qg = qtype_of(name, lin.weight)
        if qg is None:
            continue
        p = _SoftRound(lin.weight.data, *qg)
        parametrize.register_parametrization(lin, "weight", p, unsafe=True)
        params[name] = p
    for p in block.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.v.requires_grad_(True)
    try:
        _set(params, "rtn")
        err_rtn = block_error(block, call, inputs, targets)
        _set(params, "soft")
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam([p.v for p in params.values()], lr=cfg.lr)
        warm = int(cfg.warmup * cfg.iters)
        b0, b1 = cfg.beta
        for it in range(cfg.iters):
            j = int(torch.randint(len(inputs), (1,), generator=gen))
            with torch.enable_grad():
                out = call(block, inputs[j])
                rec = ((out - targets[j]) ** 2).sum(-1).mean()
                loss = rec
                if it >= warm:
                    t = (it - warm) / max(cfg.iters - warm, 1)
                    beta = b1 + (b0 - b1) * max(0.0, 1.0 - t)
                    loss = loss + cfg.weight * sum(p.round_loss(beta) for p in params.values())
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            if log is not None and (it + 1) % max(1, cfg.iters // 4) == 0:
                log(f"  adaround iter {it + 1}/{cfg.iters}: reconstruction {float(rec):.3e}")
        _set(params, "hard")
        err_ada = block_error(block, call, inputs, targets)
        results = {name: p.result(p.codes()) for name, p in params.items()}
    finally:
        for name in params:
            parametrize.remove_parametrizations(_linears(block)[name], "weight", leave_parametrized=False)
    for name, res in results.items():   # the file's dequantized value, float32 as the q-type computes it
        lin = _linears(block)[name]
        lin.weight = nn.Parameter(res.deq.to(lin.weight.device), requires_grad=False)
    return results, err_rtn, err_ada


def _set(params: dict[str, _SoftRound], mode: str) -> None:
    """rtn: round to nearest (the init); soft: h(V) during the search; hard: h(V) >= 0.5."""
    for p in params.values():
        p.hard = mode != "soft"
        if mode == "rtn":
            p._saved = p.v.data.clone()
            # V with base + (V >= 0) == round-to-nearest codes: +1 where RTN rounded up
            p.v.data = torch.where(p.rtn > p.base, 1.0, -1.0)
        elif hasattr(p, "_saved"):
            p.v.data = p._saved
            del p._saved
