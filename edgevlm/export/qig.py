"""QIG (Xiang et al., CVPR 2026; design.md Part 2 section 3): per-token weights for the AWQ scale
search from integrated gradients of the block-level quantization discrepancy.

For a scale group g of a block f (awq.ScaleGroup) and a calibration batch with block input
x [B, T, D], f_q is f with g's linears replaced by their plain quantized values (what the file
would hold at s = 1; with ``act8`` their inputs also int8-quantized as the W4A8 kernels do) and

    F(x) = Σ_{b,t real} || f(x)_bt - f_q(x)_bt ||²                    (block-output discrepancy)
    IG   = (x - x') ⊙ (1/K) Σ_{k=0..K-1} ∇F(x' + α_k (x - x')),  α_k = linspace(0, 1, K)
    I_bt = Σ_c |IG_btc|,  normalised per sample to mean 1 over its real tokens (token_importance),

with x' = 0 (weight-only) or the int8-quantized input (``quantized``).  Weight-only clips each
sample's weights to [q1 - 1.5 IQR, q3 + 1.5 IQR] (heavy-tailed massive-activation tokens) and
renormalises; W4A8 does not (the paper's code).  The gradient of the *sum* over tokens gives an
input token credit for the errors it causes in other tokens through attention.  The weights
multiply the padding mask in awq.ScaleSearch's block-output loss, and (``hessian=True``) the
block's GPTQ Hessians H = 2XᵀCX/ΣC (the mean over the block's groups).  Not here: the grid
search and folding (awq.py), bits (pipeline.py).  The paper's warm-up quirk (uniform weights for
the first few searches) is not reproduced: IG everywhere (design.md 3.5).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .awq import FakeQuant, ScaleGroup, ScaleSearch

#: activation groups the kernels use (csrc/kernels/kernels.h QActs: int8 per row and weight group)
_ACT_GROUPS = (128, 64, 32)


def act_fake_quant(x: torch.Tensor, group: int = 128) -> torch.Tensor:
    """x [..., K] as the int8-activation kernels see it: per token and K-group of ``group`` (or the
    largest of 128/64/32 dividing K, else the whole row) d = max|x| / 127, x ≈ d round(x / d).
    Straight-through: the value is quantized, the gradient passes unchanged (d/dx of round = 1)."""
    k = x.shape[-1]
    g = next((c for c in (group, *_ACT_GROUPS) if c <= group and k % c == 0), k)
    xg = x.reshape(*x.shape[:-1], k // g, g)
    d = xg.detach().abs().amax(-1, keepdim=True) / 127.0
    q = torch.where(d > 0, torch.round(xg.detach() / d.clamp(min=1e-30)).clamp(-127, 127) * d, torch.zeros_like(xg))
    return (xg + (q - xg.detach())).reshape(x.shape)


def iqr_clip(w: torch.Tensor) -> torch.Tensor:
    """Clip w [n] >= 0 to [q1 - 1.5 (q3 - q1), q3 + 1.5 (q3 - q1)] (its quartiles)."""
    q1, q3 = torch.quantile(w, 0.25), torch.quantile(w, 0.75)
    return w.clamp(min=float(q1 - 1.5 * (q3 - q1)), max=float(q3 + 1.5 * (q3 - q1))).clamp(min=0.0)


def token_importance(ig: torch.Tensor, mask: torch.Tensor | None, clip: bool) -> torch.Tensor:
    """Per-token weights [B, T] from IG [B, T, D]: Σ_c |IG|, zero on padding, normalised to mean 1
    per sample over its real tokens (IQR-clipped first with ``clip``); a sample whose importances
    are all zero gets uniform weights (1).

    Mean 1, not the paper's sum 1: the paper pads every sample to one length T and normalises
    over T positions, so its per-sample sums are one constant times T; with samples of different
    lengths (ours: real tokens only) a sum of 1 would give a short sample's tokens more weight
    each than a long sample's, a reweighting of samples the paper does not make.  Mean 1 keeps
    every token's weight relative to AWQ-uniform's 1 and moves weight only within a sample."""
    imp = ig.abs().sum(-1).double()                                          # [B, T]
    m = torch.ones_like(imp, dtype=torch.bool) if mask is None else mask.bool()
    out = torch.zeros_like(imp)
    for b in range(imp.shape[0]):
        v = imp[b][m[b]]
        if v.numel() == 0:
            continue
        if float(v.sum()) <= 0:
            v = torch.ones_like(v)
        v = v / v.mean()
        if clip and v.numel() >= 4:
            v = iqr_clip(v)
            v = v / v.mean() if float(v.sum()) > 0 else torch.ones_like(v)
        out[b][m[b]] = v
    return out.float()


def integrated_gradients(block: nn.Module, batch, quantized: dict[str, torch.Tensor], steps: int,
                         baseline: torch.Tensor, act_modules: Sequence[nn.Module] = (), act_group: int = 128
                         ) -> torch.Tensor:
    """IG [B, T, D] of F (module docstring) for one batch (calibrate.Batch), from ``baseline``
    [B, T, D] to batch.hidden.  ``quantized``: {parameter name in the block: quantized value},
    the f_q overrides; ``act_modules``: modules whose first input f_q int8-quantizes."""
    from torch.func import functional_call

    x = batch.hidden.detach().to(torch.float32)
    mask = batch.mask.to(torch.float32) if batch.mask is not None else None
    grad = torch.zeros_like(x)

    def quantize_input(mod, args):
        return (act_fake_quant(args[0], act_group), *args[1:])

    def run(h: torch.Tensor, params: dict, quant_acts: bool) -> torch.Tensor:
        hooks = [m.register_forward_pre_hook(quantize_input) for m in act_modules] if quant_acts else []
        try:
            out = functional_call(block, params, (h, *batch.args), dict(batch.kwargs))
        finally:
            for h_ in hooks:
                h_.remove()
        return out[0] if isinstance(out, (tuple, list)) else out

    with torch.enable_grad():
        for alpha in torch.linspace(0.0, 1.0, steps).tolist():      # both endpoints, weights 1/K
            h = (baseline + alpha * (x - baseline)).detach().requires_grad_(True)
            d = (run(h, {}, False) - run(h, quantized, True)).square().sum(-1)   # [B, T]
            f = (d * mask).sum() if mask is not None else d.sum()
            (g,) = torch.autograd.grad(f, h)
            grad += g
    return (x - baseline) * (grad / steps)


class QigWeights:
    """awq.GroupWeight for QIG: integrated-gradient token weights per scale group and batch.

    ``hessian``: also hand the block's GPTQ Hessians these weights (Batch.token_weight, the mean
    over the block's groups), reset at every block."""

    def __init__(self, fake_quant: FakeQuant, *, steps: int = 32, baseline: str = "zero", act8: bool = False,
                 act_group: int = 128, hessian: bool = False) -> None:
        if baseline not in ("zero", "quantized"):
            raise ValueError(f"[QigWeights] expected baseline 'zero' or 'quantized', got {baseline!r}")
        if not (isinstance(steps, int) and steps >= 2):
            raise ValueError(f"[QigWeights] expected steps an integer >= 2, got {steps!r}")
        self.fake_quant, self.steps, self.baseline = fake_quant, steps, baseline
        self.act8, self.act_group, self.hessian = act8, act_group, hessian
        self._path: str | None = None
        self._n = 0                      # groups averaged into the current block's Hessian weights

    def __call__(self, path: str, block: nn.Module, g: ScaleGroup, batches: Sequence) -> list[torch.Tensor] | None:
        if path != self._path:    # a new block (ScaleSearch.run has reset Batch.token_weight)
            self._path, self._n = path, 0
        if g.fused or not g.linears:
            return None        # MoE expert groups: searched on expert outputs (awq._search_experts)
        quantized, mods = {}, []
        for n in g.linears:
            m = block.get_submodule(n)
            q = self.fake_quant(f"{path}.{n}.weight", m.weight.data)
            if q is None:
                return None
            quantized[f"{n}.weight"] = q
            mods.append(m)
        out = []
        for b in batches:
            x = b.hidden.detach().to(torch.float32)
            base = act_fake_quant(x, self.act_group).detach() if self.baseline == "quantized" else torch.zeros_like(x)
            ig = integrated_gradients(block, b, quantized, self.steps, base, mods if self.act8 else (), self.act_group)
            out.append(token_importance(ig, b.mask, clip=not self.act8))
        if self.hessian:
            for b, w in zip(batches, out):
                prev = b.token_weight if b.token_weight is not None else torch.zeros_like(w)
                b.token_weight = (prev * self._n + w) / (self._n + 1)
            self._n += 1
        return out


def make_search(cfg, fake_quant: FakeQuant) -> ScaleSearch:
    """The scale search of ``--method qig`` (config.ExportConfig)."""
    act_quant = (lambda x: act_fake_quant(x, cfg.group)) if cfg.qig_act8 else None
    tw = QigWeights(fake_quant, steps=cfg.qig_steps, baseline=cfg.effective_qig_baseline.value, act8=cfg.qig_act8,
                    act_group=cfg.group, hessian=cfg.qig_hessian)
    return ScaleSearch(fake_quant, n_grid=cfg.awq_grid, group_weight=tw, act_quant=act_quant)


__all__ = ["QigWeights", "act_fake_quant", "integrated_gradients", "iqr_clip", "make_search", "token_importance"]
