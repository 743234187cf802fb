"""Activation-aware per-input-channel weight scaling (AWQ, Lin et al. 2024), searched block by block.

For a *scale group* - linears that read one input x [T, C] produced by one op (a norm, or the
rows of a previous linear) - the search takes a_c = mean_t |x_tc| over real tokens and, for r on
a grid in [0, 1), s = a^r / sqrt(max(a^r) min(a^r)).  Each candidate replaces the group's
weights by Q(W diag(s)) diag(s)^-1 (the model is otherwise full precision) and measures the
token-weighted squared error of the *block output* against the full-precision block; r = 0
(s = 1, plain quantization) comes first and ties keep it, so the chosen s never raises that loss.
The winner is folded in exactly: W <- W diag(s) for the group's linears and the producing op's
output channels are divided by s (norm weight and bias, or the previous linear's rows and bias).
The quantizer (RTN or GPTQ) then sees the scaled weights; the file holds scaled weights and
folded vectors, so neither the format nor the runtime changes.

Which folds are exact is data (:data:`LAYOUTS`), per block layout, like AutoAWQ's per-model
scaling groups.  Token weights (``token_weight(group, batch) -> [B, T]``) weight the loss: QIG
(design.md Part 2 section 3) is this engine with integrated-gradient token importances.  Not
here: choosing bits, Hessians, packing (calibrate.py / pipeline.py do that).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .lazy import call_block


class Prev(str, enum.Enum):
    NORM = "norm"       # LayerNorm / RMSNorm: weight (and bias) [C] divided by s
    LINEAR = "linear"   # nn.Linear whose rows [C, *] (and bias [C]) are divided by s


@dataclass(frozen=True)
class ScaleGroup:
    """Linears (module names relative to the block) reading the output of ``prev``."""

    name: str
    prev: str
    prev_kind: Prev
    linears: tuple[str, ...]


@dataclass(frozen=True)
class Layout:
    """The exact folds of one block layout, plus the linears that get none and why."""

    families: tuple[str, ...]
    groups: tuple[ScaleGroup, ...]
    not_folded: tuple[tuple[str, str], ...] = ()

    def modules(self) -> set[str]:
        return {m for g in self.groups for m in (g.prev, *g.linears)}


_N, _L = Prev.NORM, Prev.LINEAR
_GELU_FC2 = ("mlp.fc2", "its input is GELU(fc1(x)): a per-channel scale does not commute with GELU")

#: Block layouts, first match wins (matched by module names: see :func:`layout_for`).
LAYOUTS: tuple[Layout, ...] = (
    # BERT is post-LN: the previous block's output LayerNorm (or the embeddings LayerNorm) feeds
    # both Q/K/V and the residual of attention.output.LayerNorm, and attention.output.LayerNorm
    # feeds both intermediate.dense and the residual of output.LayerNorm.  Dividing such a norm
    # by s changes the residual too, so only v -> o is exact (the attention mixes tokens, not
    # channels: softmax(QK^T) (V / s) = (softmax(QK^T) V) / s per channel).
    Layout(("bert",),
           (ScaleGroup("o", "attention.self.value", _L, ("attention.output.dense",)),),
           (("attention.self.query/key/value", "post-LN: the input norm also feeds the residual"),
            ("intermediate.dense", "post-LN: attention.output.LayerNorm also feeds the residual"),
            ("output.dense", "its input is GELU(intermediate.dense(x))"))),
    # CLIP / SigLIP encoder layers (also LLaVA's vision towers): pre-LN, the norms feed only linears.
    Layout(("clip", "siglip"),
           (ScaleGroup("qkv", "layer_norm1", _N, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ScaleGroup("o", "self_attn.v_proj", _L, ("self_attn.out_proj",)),
            ScaleGroup("fc1", "layer_norm2", _N, ("mlp.fc1",))),
           (_GELU_FC2,)),
    # Llama / Qwen2 decoder layers: RMSNorm -> q/k/v and gate/up; v -> o (skipped under GQA,
    # where v has fewer rows than o has inputs); up -> down (down reads act(gate) * up).
    Layout(("llama", "qwen2"),
           (ScaleGroup("qkv", "input_layernorm", _N, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ScaleGroup("o", "self_attn.v_proj", _L, ("self_attn.o_proj",)),
            ScaleGroup("gate_up", "post_attention_layernorm", _N, ("mlp.gate_proj", "mlp.up_proj")),
            ScaleGroup("down", "mlp.up_proj", _L, ("mlp.down_proj",)))),
)


def layout_for(block: nn.Module) -> Layout | None:
    """The first layout all of whose modules exist in ``block`` (None: no known folds)."""
    names = {n for n, _ in block.named_modules()}
    for lay in LAYOUTS:
        if lay.modules() <= names:
            return lay
    return None


def foldable(block: nn.Module, g: ScaleGroup) -> bool:
    """True if scaling ``g`` is exact in this block: the linears share an input width C, and
    ``prev`` produces exactly C channels (a norm with a weight [C]; a linear with C rows; under
    GQA v has fewer rows than o has inputs, so the v -> o fold is skipped, as in AWQ)."""
    lin = [block.get_submodule(n) for n in g.linears]
    if not all(isinstance(m, nn.Linear) for m in lin) or len({m.in_features for m in lin}) != 1:
        return False
    c = lin[0].in_features
    prev = block.get_submodule(g.prev)
    if g.prev_kind is Prev.LINEAR:
        return isinstance(prev, nn.Linear) and prev.out_features == c
    w = getattr(prev, "weight", None)
    # A norm computing x * (1 + w) (Gemma) would need (1 + w) / s - 1: not declared anywhere yet.
    return isinstance(w, torch.Tensor) and tuple(w.shape) == (c,)


def fold(block: nn.Module, g: ScaleGroup, s: torch.Tensor) -> list[str]:
    """Fold s float32 [C] into ``block`` in place: linears' input columns times s, ``prev``'s output
    channels divided by s.  Returns the names (relative to the block) of the changed non-linear
    parameters (norm vectors, the previous linear's bias): the caller re-stores them."""
    prev = block.get_submodule(g.prev)
    changed = []
    with torch.no_grad():
        if g.prev_kind is Prev.LINEAR:
            prev.weight.div_(s[:, None])
        else:
            prev.weight.div_(s)
            changed.append(f"{g.prev}.weight")
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s)
            changed.append(f"{g.prev}.bias")
        for n in g.linears:
            block.get_submodule(n).weight.mul_(s[None, :])
    return changed


@dataclass(frozen=True)
class Folded:
    """One applied fold: ``ratio`` r, loss at r (vs r = 0), the changed vectors."""

    group: str
    linears: tuple[str, ...]      # canonical weight names
    ratio: float
    loss: float
    loss_plain: float
    changed: tuple[str, ...]      # canonical parameter names (norm / bias vectors)


# fake_quant(canonical weight name, W [N, K] float32) -> what the file would hold, or None if
# that weight is not quantized (then the group is left alone).
FakeQuant = Callable[[str, torch.Tensor], "torch.Tensor | None"]
# token_weight(group name, batch) -> [B, T] >= 0 loss weights (multiplied with the padding mask).
TokenWeight = Callable[[str, object], "torch.Tensor | None"]


class ScaleSearch:
    """The per-block search; :meth:`run` is called by the calibration loop before quantizing."""

    def __init__(self, fake_quant: FakeQuant, *, n_grid: int = 20, token_weight: TokenWeight | None = None) -> None:
        if not (isinstance(n_grid, int) and n_grid >= 2):
            raise ValueError(f"[ScaleSearch] expected n_grid an integer >= 2, got {n_grid!r}")
        self.fake_quant, self.n_grid, self.token_weight = fake_quant, n_grid, token_weight

    def run(self, path: str, block: nn.Module, batches: Sequence) -> list[Folded]:
        """Search and fold every foldable group of ``block`` (module ``path``) in forward order,
        each with the earlier groups' scales already folded.  ``batches``: calibrate.Batch list."""
        lay = layout_for(block)
        if lay is None:
            return []
        ref = [call_block(block, b.hidden, b.args, b.kwargs) for b in batches]   # fp outputs [B, T, D]
        weights = None
        out = []
        for g in lay.groups:
            if not foldable(block, g):
                continue
            canon = tuple(f"{path}.{n}.weight" for n in g.linears)
            if any(self.fake_quant(c, block.get_submodule(n).weight[:1].clone()) is None
                   for c, n in zip(canon, g.linears)):
                continue   # a linear of the group is not quantized (kept float16): nothing to protect
            if self.token_weight is not None or weights is None:
                weights = [self._weights(g.name, b, r) for b, r in zip(batches, ref)]
            a = self._act_mean(block, g, batches)
            res = self._search(block, g, canon, a, batches, ref, weights)
            if res is None:
                continue
            s, r, loss, loss0 = res
            changed = tuple(f"{path}.{n}" for n in fold(block, g, s))
            out.append(Folded(g.name, canon, r, loss, loss0, changed))
        return out

    # ---- pieces ------------------------------------------------------------------------------
    def _weights(self, group: str, b, ref: torch.Tensor) -> torch.Tensor:
        """Loss weight per token [B, T] float32: the padding mask times the caller's weights."""
        w = torch.ones(ref.shape[:-1])
        if b.mask is not None and tuple(b.mask.shape) == tuple(w.shape):
            w = w * b.mask.to(torch.float32)
        if self.token_weight is not None:
            extra = self.token_weight(group, b)
            if extra is not None:
                if tuple(extra.shape) != tuple(w.shape):
                    raise ValueError(f"[ScaleSearch] token weights for {group} must have shape {list(w.shape)}, "
                                     f"got {list(extra.shape)}")
                w = w * extra.to(torch.float32)
        return w

    @staticmethod
    def _act_mean(block: nn.Module, g: ScaleGroup, batches: Sequence) -> torch.Tensor:
        """a_c = mean over real tokens of |x_c| at the group's input, float64 [C]."""
        acc: dict[str, torch.Tensor | float] = {"sum": 0.0, "n": 0.0}
        mask: dict[str, torch.Tensor | None] = {"m": None}

        def hook(mod: nn.Module, args: tuple) -> None:
            x = args[0].detach().to(torch.float64)                   # [B, T, C] (or [B*T, C])
            m = mask["m"]
            if m is not None and tuple(m.shape) == tuple(x.shape[:-1]):
                xm = x.abs() * m.to(torch.float64)[..., None]
                n = float(m.sum())
            else:
                xm, n = x.abs(), float(x[..., 0].numel())
            acc["sum"] = acc["sum"] + xm.reshape(-1, x.shape[-1]).sum(0)
            acc["n"] = acc["n"] + n

        h = block.get_submodule(g.linears[0]).register_forward_pre_hook(hook)
        try:
            for b in batches:
                mask["m"] = b.mask
                call_block(block, b.hidden, b.args, b.kwargs)
        finally:
            h.remove()
        return acc["sum"] / max(acc["n"], 1.0)

    def _search(self, block, g: ScaleGroup, canon, a, batches, ref, weights):
        """Grid over r; returns (s float32 [C], r, loss, loss at r = 0) or None if r = 0 wins."""
        mods = [block.get_submodule(n) for n in g.linears]
        orig = [m.weight.data.clone() for m in mods]                  # float32 [N_i, C]
        a = a.clamp(min=1e-8)
        best = None
        try:
            for i in range(self.n_grid):
                r = i / self.n_grid                                   # 0, 1/n, ..., (n-1)/n as AWQ
                s = a.pow(r).clamp(min=1e-4)
                s = (s / (s.max() * s.min()).sqrt()).to(torch.float32)
                for m, w0, c in zip(mods, orig, canon):
                    m.weight.data = self.fake_quant(c, w0 * s[None, :]) / s[None, :]
                loss = self._loss(block, batches, ref, weights)
                if best is None or loss < best[2]:
                    best = (s, r, loss)
                if i == 0:
                    loss0 = loss
        finally:
            for m, w0 in zip(mods, orig):
                m.weight.data = w0
        if best is None or best[1] == 0.0:
            return None
        return best[0], best[1], best[2], loss0

    @staticmethod
    def _loss(block, batches, ref, weights) -> float:
        """Σ_bt w_bt ||y_bt - ref_bt||² / Σ_bt w_bt over all batches (float64)."""
        num = den = 0.0
        for b, y0, w in zip(batches, ref, weights):
            y = call_block(block, b.hidden, b.args, b.kwargs)
            e = (y - y0).double().square().sum(-1)                    # [B, T]
            num += float((e * w.double()).sum())
            den += float(w.double().sum())
        return num / max(den, 1e-30)


__all__ = ["LAYOUTS", "Folded", "Layout", "Prev", "ScaleGroup", "ScaleSearch", "fold", "foldable", "layout_for"]
