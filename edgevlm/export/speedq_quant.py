"""SPEED-Q's weight quantizers in torch, each one the exact twin of what the file stores.

* :func:`bilevel_qdq` - the bilevel (double) quantizer of SPEED-Q's ``BilevelQuantizer``:
  per group of ``group`` input columns an asymmetric min-max scale s and a rounded integer
  zero z; the scales themselves 4-bit min-max quantized in runs of ``rows`` output rows at one
  column group (SPEED-Q's ``qq_group_size`` over its group-major regrouping).  Float32, operation
  for operation as ``edgevlm.qtypes.q2b.quantize`` (2-bit, g16, rows 16), so the 2-bit QAT
  model's weights *are* the q2b file's dequantized weights, bit for bit.
* :class:`BilevelSTE` - the same in the forward pass with SPEED-Q's straight-through gradient
  (identity inside the quantization range [-S z, S (qmax - z)], zero outside).
* :func:`sym4_result` - SPEED-Q's embedding / LM-head quantizer (4-bit symmetric, group 32),
  written as an exact q4 tensor.
* :func:`autoclip_` - SPEED-Q's asymmetric clipping init (``autoclip.auto_2clip_layer``).

Not here: training loops (speedq.py), the vision tower's AdaRound (speedq_adaround.py).
"""

from __future__ import annotations

import numpy as np
import torch

from .. import qtypes
from ..qtypes._rtn import fp16_ceil
from .quantize import BilevelResult, QuantResult, _result

SCALE_BITS = 4            # level-2 width of the scales (SPEED-Q qq_scale_bits)
RECIPES = {2: (16, 16), 4: (32, 128)}   # bits -> (group, level-2 rows): SPEED-Q's 2-bit / 4-bit scripts


def _minmax(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEED-Q's asymmetric min-max over the last axis, float32: (scale, -min / scale).
    Equal min and max become -1 / +1; the scale is clamped to >= 1e-5 (q2b._minmax_params)."""
    lo, hi = x.amin(-1), x.amax(-1)
    same = lo == hi
    lo = torch.where(same, torch.full_like(lo, -1.0), lo)
    hi = torch.where(same, torch.full_like(hi, 1.0), hi)
    s = ((hi - lo) / float(qmax)).clamp_min(1e-5)
    return s, -lo / s


def bilevel_params(w: torch.Tensor, bits: int, group: int, rows: int):
    """Bilevel params of W float32 [N, K] (detached).  Returns

    codes  float32 [N, G, group] in [0, qmax]       (level-1 codes q)
    z      float32 [N, G] integers in [0, qmax]      (level-1 zeros)
    c      float32 [N, G] integers in [0, 15]        (4-bit scale codes)
    d, m   float32 [NB, G]                           (level-2 scale / zero per row block)
    S      float32 [N, G]                            (dequantized scales d (c - m))

    with dequantized weights S (q - z).  NB = ceil(N / rows); a short last block uses its own rows."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"[bilevel] expected K a multiple of group {group}, got W of shape [{n}, {k}]")
    qmax = (1 << bits) - 1
    wg = w.reshape(n, k // group, group)
    s1, zr = _minmax(wg, qmax)                                       # [N, G]
    z = torch.round(zr).clamp_(0, qmax)
    nb = -(-n // rows)
    pad = nb * rows - n      # repeat the last row: min/max of the last block stay its own rows'
    sp = torch.cat([s1, s1[-1:].expand(pad, -1)]) if pad else s1
    d, m = _minmax(sp.reshape(nb, rows, -1).transpose(1, 2), (1 << SCALE_BITS) - 1)   # [NB, G]
    rb = torch.arange(n, device=w.device) // rows
    dr, mr = d[rb], m[rb]                                            # [N, G]
    c = torch.round(s1 / dr.clamp_min(1e-9) + mr).clamp_(0, (1 << SCALE_BITS) - 1)
    S = dr * (c - mr)
    q = torch.round(wg / S.clamp_min(1e-9)[..., None] + z[..., None]).clamp_(0, qmax)
    return q, z, c, d, m, S


def bilevel_qdq(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Fake-quantized W float32 [N, K] under the ``bits`` recipe (no gradient)."""
    group, rows = RECIPES[bits]
    with torch.no_grad():
        q, z, _, _, _, S = bilevel_params(w.detach().float(), bits, group, rows)
        if bits == 4:   # stored as q4: fp16 scale, fp16 min = -S z (see q4_storage)
            return q4_storage(w.detach().float(), q, z, S)[0]
        return (S[..., None] * (q - z[..., None])).reshape(w.shape)


def q4_storage(w: torch.Tensor, q: torch.Tensor, z: torch.Tensor, S: torch.Tensor):
    """The 4-bit recipe as a q4 g32 tensor (q4 holds an fp16 scale and an fp16 min per group;
    SPEED-Q's d (c - m) is a float32 product that fp16 cannot hold, and -S z needs up to 15
    significant bits).  The stored scale is S16 = fp16(S), the codes are re-rounded against it,
    and min = fp16(-S16 z): dequantized S16 q + min, float32, as q4 does.  So the 4-bit QAT
    forward includes these two fp16 roundings (relative 2^-11 of the scale) and the file is
    that forward bit for bit.  Returns (deq [N, K], codes uint8-valued [N, K], S16 [N, G], M16 [N, G])."""
    n, k = w.shape
    wg = w.reshape(n, S.shape[1], -1)
    s16 = S.half().float()
    qq = torch.round(wg / s16.clamp_min(1e-9)[..., None] + z[..., None]).clamp_(0, 15)
    m16 = (-(s16 * z)).half().float()
    deq = s16[..., None] * qq + m16[..., None]
    del q
    return deq.reshape(n, k), qq.reshape(n, k), s16, m16


class _STE(torch.autograd.Function):
    """Forward: the fake-quantized weight; backward: the gradient where w lies in
    [-S z, S (qmax - z)] (SPEED-Q's STEFunction mask), 0 elsewhere."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, bits: int) -> torch.Tensor:
        group, rows = RECIPES[bits]
        wd = w.detach()
        q, z, _, _, _, S = bilevel_params(wd, bits, group, rows)
        n, k = wd.shape
        qmax = (1 << bits) - 1
        wg = wd.reshape(n, k // group, group)
        lo, hi = -S * z, S * (qmax - z)                               # [N, G]
        ctx.save_for_backward(((wg >= lo[..., None]) & (wg <= hi[..., None])).reshape(n, k))
        if bits == 4:
            return q4_storage(wd, q, z, S)[0]
        return (S[..., None] * (q - z[..., None])).reshape(n, k)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return g * mask, None


class BilevelSTE(torch.nn.Module):
    """A torch parametrization: weight -> its bilevel fake quantization (recomputed from the
    current weight on every forward, as SPEED-Q's QLinear does)."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        if bits not in RECIPES:
            raise ValueError(f"[BilevelSTE] expected bits in {sorted(RECIPES)}, got {bits!r}")
        self.bits = bits

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _STE.apply(w, self.bits)


def bilevel_result(w: torch.Tensor, bits: int) -> BilevelResult | QuantResult:
    """The file tensor of a trained LM linear: q2b (2-bit) or q4 g32 (4-bit), with ``deq`` the
    QAT forward's fake-quantized weight (bit for bit what the file dequantizes to)."""
    group, rows = RECIPES[bits]
    w = w.detach().to("cpu", torch.float32)
    n, k = w.shape
    q, z, c, d, m, S = bilevel_params(w, bits, group, rows)
    if bits == 4:
        deq, qq, s16, m16 = q4_storage(w, q, z, S)
        res = _result(qtypes.get("q4"), group, qq.numpy(), s16.half().numpy(), m16.half().numpy())
        if not torch.equal(res.deq, deq):
            raise RuntimeError("internal error: the q4 storage of the 4-bit bilevel weights is not exact")
        return res
    deq = (S[..., None] * (q - z[..., None])).reshape(n, k)
    u8 = lambda t: np.ascontiguousarray(t.numpy().astype(np.uint8))  # noqa: E731 - integer-valued
    parts = qtypes.q2b.Parts(u8(q.reshape(n, k)), u8(z), u8(c), d.numpy().copy(), m.numpy().copy())
    return BilevelResult(parts, deq)


def sym4_result(w: torch.Tensor, group: int) -> QuantResult:
    """Embedding / LM-head quantizer: 4-bit symmetric per group, levels -8..7 times
    s = fp16_ceil(max|w| / 7), written as q4 with codes k + 8 and min = -8 s (exact in fp16
    and in the float32 dequantization).  SPEED-Q's quant_groups uses s = 2 max|w| / 15 with
    levels -7..8 instead; its min -7 s is not fp16-exact, so this keeps the design brief's
    symmetric absmax form (Part 2 section 0), which q4 stores without error."""
    wn = np.ascontiguousarray(w.detach().to("cpu", torch.float32).numpy())
    n, k = wn.shape
    wg = wn.reshape(n, k // group, group)
    s = fp16_ceil(np.abs(wg).max(-1) / np.float32(7))               # float16 [N, G]
    fs = s.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(fs > 0, np.rint(wg / fs), np.float32(0))
    codes = (np.clip(r, -8, 7) + 8).reshape(n, k)
    return _result(qtypes.get("q4"), group, codes, s, (-8 * s.astype(np.float32)).astype(np.float16))


# ---- asymmetric clipping init ---------------------------------------------------------------
def group_gram(x: torch.Tensor, group: int) -> torch.Tensor:
    """Σ_t x_t,g x_t,gᵀ per input group: x [T, K] -> float64 [G, group, group] (the diagonal
    blocks of XᵀX, all a per-group output error needs)."""
    xg = x.detach().double().reshape(x.shape[0], -1, group)
    return torch.einsum("tgi,tgj->gij", xg, xg)


def autoclip_(w: torch.Tensor, gram: torch.Tensor, bits: int, n_grid: int = 10, step: float = 0.05) -> torch.Tensor:
    """SPEED-Q's asymmetric clip search (``auto_2clip_layer``), in place on W [N, K]: per row and
    group, max' = max (1 - i step), min' = min (1 - j step), i, j < n_grid, minimising the group's
    output error ||X_g (Q(clamp(w, min', max')) - w)||² = Δᵀ (X_gᵀX_g) Δ with Q the level-1
    min-max quantizer (rounded zero); i = j = 0 (no clip) is the first candidate and ties keep
    the earlier one.  ``gram``: :func:`group_gram` of the layer's inputs.  Returns the float64
    [N, G] error ratio best / unclipped."""
    group, _ = RECIPES[bits]
    qmax = (1 << bits) - 1
    n, k = w.shape
    with torch.no_grad():
        wg = w.detach().float().reshape(n, k // group, group)
        mx, mn = wg.amax(-1, keepdim=True), wg.amin(-1, keepdim=True)
        gm = gram.to(w.device)
        best = best_lo = best_hi = base = None
        for i in range(n_grid):
            for j in range(n_grid):
                hi, lo = mx * (1 - i * step), mn * (1 - j * step)
                wc = torch.minimum(torch.maximum(wg, lo), hi)
                s, zr = _minmax(wc, qmax)
                z = torch.round(zr).clamp_(0, qmax)[..., None]
                s = s[..., None]
                dq = s * (torch.round(wc / s + z).clamp_(0, qmax) - z)
                delta = (dq - wg).double()
                err = torch.einsum("ngi,gij,ngj->ng", delta, gm.double(), delta)
                if best is None:
                    best, best_lo, best_hi, base = err, lo.expand_as(mn).clone(), hi.clone(), err
                    continue
                better = err < best
                best = torch.where(better, err, best)
                best_lo = torch.where(better[..., None], lo, best_lo)
                best_hi = torch.where(better[..., None], hi, best_hi)
        w.copy_(torch.minimum(torch.maximum(wg, best_lo), best_hi).reshape(n, k).to(w.dtype))
    return (best / base.clamp_min(1e-30)).cpu()
