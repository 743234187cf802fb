"""SPEED-Q stage-3 initialisation from GPTQ, and the frozen-grid QAT quantizer it hands over.

SPEED-Q's own init (speedq.py, ``SpeedQInit.RTN``) clips the weights and lets QAT start from
their min-max rounding, which at 2 bits is the worst PTQ point.  ``SpeedQInit.GPTQ`` starts
the distillation from the best one instead:

1. :func:`gptq_init` runs GPTQ layer by layer over the language model (each decoder layer fed
   by the already-quantized earlier layers, Hessians H = 2XᵀX / n over the non-padding tokens
   of the training batches) **on the recipe's own grid**: when GPTQ reaches a column group, the
   group's grid is chosen from the error-updated weights of all rows at once (SPEED-Q's
   asymmetric clip search on the group's diagonal Hessian block, except for q/k; then the
   bilevel min-max parameters, 4-bit scales in runs of rows included).  So the result is a
   q2b (2-bit) / q4 g32 (4-bit) tensor, the same bits as the QAT's.
2. The QAT then keeps each grid frozen (:class:`GridSTE`): latent weights start at GPTQ's
   dequantized values, the forward rounds them to the nearest point of the frozen grid, the
   straight-through gradient passes inside the grid's range.  Step 0 *is* the GPTQ solution,
   so the distillation (with early stopping on held-out calibration data, speedq.py) can only
   move away from it where that lowers the loss; the file stores the same grid with the
   trained codes (:meth:`Grid.result`), bit for bit the QAT forward.

Shapes: W [N, K]; G = K / group column groups; NB = ceil(N / rows) level-2 row blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .. import qtypes
from .lazy import call_block, capture_block_inputs
from .quantize import BilevelResult, Hessian, QuantResult, _inverse_cholesky, _result, gptq, output_error
from .speedq_quant import RECIPES, autoclip_, bilevel_params

DAMP = 0.01              # GPTQ's relative damping of diag(H)
BLOCK = 128              # GPTQ's lazy-update block (columns)
NO_CLIP = ("q_proj", "k_proj")   # SPEED-Q / AWQ skip the clip search where outputs meet in q kᵀ


@dataclass(frozen=True, eq=False)
class Grid:
    """The frozen quantization grid of one LM linear under the ``bits`` recipe.

    scale  float32 [N, G]  level-1 step: 2-bit S = d (c - m) (q2b), 4-bit fp16(S) (q4's scale)
    zero   float32 [N, G]  integer zero z in [0, qmax]
    mins   float32 [N, G]  4-bit only: q4's min fp16(-scale z); None for 2-bit
    c      uint8 [N, G]; d, m float32 [NB, G]   2-bit only: q2b's scale codes / level-2 params

    codes(w) = clamp(round(w / scale + z), 0, qmax); dequantized: 2-bit scale (q - z), 4-bit
    scale q + mins, both in float32 exactly as the file's dequantization."""

    bits: int
    scale: torch.Tensor
    zero: torch.Tensor
    mins: torch.Tensor | None = None
    c: np.ndarray | None = None
    d: np.ndarray | None = None
    m: np.ndarray | None = None

    @property
    def group(self) -> int:
        return RECIPES[self.bits][0]

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def _g(self, w: torch.Tensor) -> torch.Tensor:
        return w.reshape(w.shape[0], -1, self.group)

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """Nearest codes float32 [N, K] of weights W [N, K]."""
        q = torch.round(self._g(w) / self.scale.clamp_min(1e-9)[..., None] + self.zero[..., None])
        return q.clamp_(0, self.qmax).reshape(w.shape)

    def deq(self, codes: torch.Tensor) -> torch.Tensor:
        """The file's float32 dequantization of codes [N, K]."""
        q = self._g(codes)
        if self.mins is None:
            return (self.scale[..., None] * (q - self.zero[..., None])).reshape(codes.shape)
        return (self.scale[..., None] * q + self.mins[..., None]).reshape(codes.shape)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lowest, highest) grid value per group, float32 [N, G]."""
        if self.mins is None:
            return -self.scale * self.zero, self.scale * (self.qmax - self.zero)
        return self.mins.clone(), self.scale * self.qmax + self.mins

    def to(self, device) -> Grid:
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Grid(self.bits, mv(self.scale), mv(self.zero), mv(self.mins), self.c, self.d, self.m)

    def result(self, w: torch.Tensor) -> BilevelResult | QuantResult:
        """The file tensor of W [N, K] on this grid (q2b or q4 g32); its ``deq`` equals
        ``self.deq(self.codes(w))`` bit for bit."""
        w = w.detach().to("cpu", torch.float32)
        g = self.to("cpu")
        codes = g.codes(w)
        if self.bits == 4:
            return _result(qtypes.get("q4"), self.group, codes.numpy(), g.scale.half().numpy(), g.mins.half().numpy())
        u8 = lambda t: np.ascontiguousarray(t.numpy().astype(np.uint8))  # noqa: E731 - integer-valued
        parts = qtypes.q2b.Parts(u8(codes), u8(g.zero), np.ascontiguousarray(self.c), self.d.copy(), self.m.copy())
        return BilevelResult(parts, g.deq(codes))


def _slab_grid(wg: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...]:
    """Grid params of one column group, weights wg float32 [N, group]: (scale [N], zero [N],
    mins [N] | None, c [N], d [NB], m [NB]) (the bilevel quantizer on that group alone: its
    level-2 params depend on no other group)."""
    group, rows = RECIPES[bits]
    _, z, c, d, m, S = bilevel_params(wg, bits, group, rows)
    if bits == 4:   # q4 storage (speedq_quant.q4_storage): fp16 scale, fp16 min = -scale z
        s16 = S.half().float()
        return s16[:, 0], z[:, 0], (-(s16 * z)).half().float()[:, 0], c[:, 0], d[:, 0], m[:, 0]
    return S[:, 0], z[:, 0], None, c[:, 0], d[:, 0], m[:, 0]


def gptq_grid(w: torch.Tensor, H: torch.Tensor, bits: int, *, clip: bool = True, damp: float = DAMP) -> Grid:
    """GPTQ of W [N, K] against H [K, K] on the ``bits`` recipe's grid (module docstring).

    Columns in order; each column's rounding error, scaled by the inverse-Hessian Cholesky
    factor, goes onto the later columns (lazily beyond the current block).  A column group's
    grid comes from its error-updated weights when its first column is reached, after the
    clip search (``clip``) on the group's diagonal block of H.  Returns the grid; the GPTQ
    codes are ``grid.codes(W')`` of the returned grid's own dequantized weights, which the
    caller gets as ``W`` overwritten in place (W holds grid values on return)."""
    group, rows = RECIPES[bits]
    n, k = w.shape
    if k % group or tuple(H.shape) != (k, k):
        raise ValueError(f"[gptq_grid] expected W [N, K] with K a multiple of {group} and H [K, K], "
                         f"got W {list(w.shape)} and H {list(H.shape)}")
    dev = w.device
    Hd = H.detach().to("cpu", torch.float64).clone()
    diag = torch.diagonal(Hd)
    hblocks = Hd.reshape(k // group, group, k // group, group).diagonal(dim1=0, dim2=2).permute(2, 0, 1).clone()
    dead = diag == 0                  # never-active inputs: any weight gives the same output
    diag[dead] = 1.0
    U = _inverse_cholesky(Hd, damp, (n, k)).float().to(dev)   # upper, [K, K]
    W = w.detach().float().clone()
    W[:, dead.to(dev)] = 0.0
    G = k // group
    nb = -(-n // rows)
    scale, zero = torch.zeros(n, G, device=dev), torch.zeros(n, G, device=dev)
    mins = torch.zeros(n, G, device=dev) if bits == 4 else None
    c = torch.zeros(n, G, device=dev)
    d, m = torch.zeros(nb, G, device=dev), torch.zeros(nb, G, device=dev)
    qmax = (1 << bits) - 1
    bs = max(group, BLOCK // group * group)
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        W1, Err1, U1 = W[:, i1:i2].clone(), torch.zeros(n, i2 - i1, device=dev), U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            g = j // group
            if j % group == 0:
                slab = W1[:, i:i + group].clone()
                if clip:
                    autoclip_(slab, hblocks[g:g + 1], bits)
                s_, z_, mn_, c_, d_, m_ = _slab_grid(slab, bits)
                scale[:, g], zero[:, g], c[:, g], d[:, g], m[:, g] = s_, z_, c_, d_, m_
                if mins is not None:
                    mins[:, g] = mn_
            col = W1[:, i]
            q = torch.round(col / scale[:, g].clamp_min(1e-9) + zero[:, g]).clamp_(0, qmax)
            dq = scale[:, g] * (q - zero[:, g]) if mins is None else scale[:, g] * q + mins[:, g]
            err = (col - dq) / U1[i, i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            W1[:, i] = dq
            Err1[:, i] = err
        W[:, i1:i2] = W1
        if i2 < k:
            W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)
    u8 = lambda t: np.ascontiguousarray(t.cpu().numpy().astype(np.uint8))  # noqa: E731 - integer-valued
    grid = Grid(bits, scale, zero, mins, u8(c), d.cpu().numpy().copy(), m.cpu().numpy().copy())
    w.data.copy_(W.to(w.dtype))
    return grid


class _GridSTEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, grid: Grid) -> torch.Tensor:
        wd = w.detach()
        lo, hi = grid.range()
        wg = grid._g(wd)
        ctx.save_for_backward(((wg >= lo[..., None]) & (wg <= hi[..., None])).reshape(wd.shape))
        return grid.deq(grid.codes(wd))

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return g * mask, None


class GridSTE(nn.Module):
    """A torch parametrization: weight -> its nearest point on a frozen :class:`Grid`, with
    the straight-through gradient inside the grid's range (zero outside, as SPEED-Q's STE)."""

    def __init__(self, grid: Grid) -> None:
        super().__init__()
        self.grid = grid

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _GridSTEFn.apply(w, self.grid)


def gptq_init(ad, batches: list, feats, linears: dict[str, nn.Linear], bits: int, device, log) -> dict[str, Grid]:
    """GPTQ on the recipe grid of every linear in ``linears`` (canonical name -> module), decoder
    layer by decoder layer: layer i's Hessians come from inputs that ran through the already
    quantized layers < i (GPTQ's sequential calibration).  Leaves each linear holding its GPTQ
    dequantized weight (the QAT's start) and returns the grids.  ``feats(batch)``: the batch's
    (quantized-tower) image features or None; Hessians count non-padding tokens only."""
    layers = ad.language_model.layers
    root = "model.language_model.layers"
    xs, masks = [], []
    for b in batches:
        b = b.to(device)
        xs.append(capture_block_inputs(lambda b=b: ad.logits(b, feats(b)), layers[0]))
        masks.append(b.mask.bool())
    grids: dict[str, Grid] = {}
    for i, layer in enumerate(layers):
        mine = {n: lin for n, lin in layer.named_modules()
                if isinstance(lin, nn.Linear) and f"{root}.{i}.{n}.weight" in linears}
        hess = {n: Hessian(lin.in_features) for n, lin in mine.items()}
        cur: dict = {}
        hooks = [lin.register_forward_pre_hook(lambda mod, args, n=n: hess[n].add(args[0][cur["mask"]]))
                 for n, lin in mine.items()]
        try:
            for (h, a, kw), mask in zip(xs, masks):
                cur["mask"] = mask
                call_block(layer, h, a, kw)
        finally:
            for hk in hooks:
                hk.remove()
        errs = []
        for n, lin in mine.items():
            w0 = lin.weight.detach().to("cpu", torch.float32).clone()
            H = hess[n].matrix()
            grids[f"{root}.{i}.{n}.weight"] = gptq_grid(lin.weight, H, bits, clip=n.rsplit(".", 1)[-1] not in NO_CLIP)
            err, energy = output_error(w0, lin.weight.detach().to("cpu", torch.float32), H)
            errs.append(err / max(energy, 1e-30))
        xs = [(call_block(layer, h, a, kw), a, kw) for h, a, kw in xs]
        log(f"speedq stage 3 init: GPTQ on the {bits}-bit grid, layer {i}: relative output error "
            f"mean {np.mean(errs):.3e} max {np.max(errs):.3e}")
    return grids


def gptq_head_q4(ad, batches: list, feats, group: int, device) -> QuantResult:
    """The (untied) LM head as q4 ``group``: GPTQ (act-order, clip search) on the Hessian of its
    inputs, the quantized LM's final hidden states over the non-padding tokens.  Leaves the
    head holding the result; returns it."""
    head = ad.model.lm_head
    hess = Hessian(head.in_features)
    cur: dict = {}
    hook = head.register_forward_pre_hook(lambda mod, args: hess.add(args[0][cur["mask"]]))
    try:
        with torch.no_grad():
            for b in batches:
                b = b.to(device)
                cur["mask"] = b.mask.bool()
                ad.logits(b, feats(b))
    finally:
        hook.remove()
    res = gptq(head.weight.detach(), hess.matrix(), "q4", group, act_order=True, clip_search=True)
    head.weight.data.copy_(res.deq.to(head.weight.device))
    return res


__all__ = ["Grid", "GridSTE", "gptq_grid", "gptq_head_q4", "gptq_init"]
