"""Activation-aware per-input-channel weight scaling (AWQ, Lin et al. 2024), searched block by block.

For a *scale group* - linears that read one input x [T, C] produced by one op (a norm, or the
rows of a previous linear) - the search takes a_c = mean_t |x_tc| over real tokens and, for r on
a grid in [0, 1), s = a^r / sqrt(max(a^r) min(a^r)).  Each candidate replaces the group's
weights by Q(W diag(s)) diag(s)^-1 (the model is otherwise full precision) and measures the
token-weighted squared error of the *block output* against the full-precision block; r = 0
(s = 1, plain quantization) comes first and ties keep it, so the chosen s never raises that loss.
With ``clip_quant`` (the exporter's RTN + clipping search, which stores the weights of the RTN
methods) every r is also scored with that quantizer and the pair (r, clip) with the least loss
wins, reported as :attr:`Folded.clip`: the clip search's criterion (diag(H)-weighted weight error
per group) ignores how the errors add up downstream (through act(gate) * up and down a shrunk
range shrinks every unit's output together), so unchecked it can raise the very loss the scale
was searched on (trained-moe W3: expert-output error x2).
The winner is folded in exactly: W <- W diag(s) for the group's linears and the producing op's
output channels are divided by s (norm weight and bias, or the previous linear's rows and bias).
The quantizer (RTN or GPTQ) then sees the scaled weights; the file holds scaled weights and
folded vectors, so neither the format nor the runtime changes.

Which folds are exact is data (:data:`LAYOUTS`), per block layout, like AutoAWQ's per-model
scaling groups; sparse-MoE layers (:data:`MOE_LAYOUTS`) search one scale for all experts' gate/up
on the experts' own outputs.  Token weights (``token_weight(group, batch)`` or
``group_weight(path, block, group, batches)`` -> [B, T]) weight the loss: QIG (qig.py) is this
engine with integrated-gradient token importances; per-expert weights (``expert_weight``) are
VEQ-ME's importances (veq.py).  Not here: choosing bits, Hessians, packing (calibrate.py /
pipeline.py do that).
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
    """Linears (module names relative to the block) reading the output of ``prev``.

    MoE groups: ``fused`` names 3-D expert parameters [E, N, C] that read the same input (scaled
    on their last axis, quantized per expert as the named row chunks, e.g. gate_up_proj's
    ("gate", "up") halves), ``router`` the router whose weight [E, C] reads it too (scaled
    exactly, never quantized), ``inspect`` the module whose first input is the group's input
    (default: the first linear)."""

    name: str
    prev: str
    prev_kind: Prev
    linears: tuple[str, ...]
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()
    router: str = ""
    inspect: str = ""

    @property
    def input_module(self) -> str:
        return self.inspect or self.linears[0]


@dataclass(frozen=True)
class Layout:
    """The exact folds of one block layout, plus the linears that get none and why."""

    families: tuple[str, ...]
    groups: tuple[ScaleGroup, ...]
    not_folded: tuple[tuple[str, str], ...] = ()

    def modules(self) -> set[str]:
        return {m for g in self.groups
                for m in (g.prev, *g.linears, *(f.rsplit(".", 1)[0] for f, _ in g.fused),
                          *([g.router] if g.router else []))}


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

#: Sparse-MoE decoder layers (Qwen3-VL-MoE): RMSNorm -> q/k/v, v -> o as Llama; the post-attention
#: RMSNorm feeds the router and every expert's gate/up, so one scale vector is searched for all
#: experts (through their outputs, weighted per expert: VEQ-ME's S_i, uniform for plain AWQ) and
#: folded into the norm, the router's columns (exact: router(x / s) with W_r diag(s)) and every
#: expert's gate/up columns.  Each expert's down reads act(gate x) * up x: not folded.
MOE_LAYOUTS: tuple[Layout, ...] = (
    Layout(("qwen3_vl_moe",),
           (ScaleGroup("qkv", "input_layernorm", _N, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ScaleGroup("o", "self_attn.v_proj", _L, ("self_attn.o_proj",)),
            ScaleGroup("experts", "post_attention_layernorm", _N, (),
                       fused=(("mlp.experts.gate_up_proj", ("gate", "up")),), router="mlp.gate", inspect="mlp")),
           (("mlp.experts.down_proj", "its input is act(gate x) * up x, per expert"),)),
)
LAYOUTS = MOE_LAYOUTS + LAYOUTS


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
    if g.fused:
        ws = [block.get_parameter(f) for f, _ in g.fused]
        r = block.get_submodule(g.router).weight if g.router else None
        c = int(ws[0].shape[-1])
        if any(w.ndim != 3 or int(w.shape[-1]) != c for w in ws) or (r is not None and int(r.shape[-1]) != c):
            return False
        return _prev_fits(block, g, c)
    lin = [block.get_submodule(n) for n in g.linears]
    if not all(isinstance(m, nn.Linear) for m in lin) or len({m.in_features for m in lin}) != 1:
        return False
    return _prev_fits(block, g, lin[0].in_features)


def _prev_fits(block: nn.Module, g: ScaleGroup, c: int) -> bool:
    """``g.prev`` produces exactly c channels."""
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
        for f, _ in g.fused:
            block.get_parameter(f).mul_(s)                       # [E, N, C] * [C]
        if g.router:
            block.get_submodule(g.router).weight.mul_(s[None, :])
            changed.append(f"{g.router}.weight")
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
    clip: bool | None = None      # with clip_quant: store with the clip search (True) or plain RTN


# fake_quant(canonical weight name, W [N, K] float32) -> what the file would hold, or None if
# that weight is not quantized (then the group is left alone).
FakeQuant = Callable[[str, torch.Tensor], "torch.Tensor | None"]
# token_weight(group name, batch) -> [B, T] >= 0 loss weights (multiplied with the padding mask).
TokenWeight = Callable[[str, object], "torch.Tensor | None"]
# group_weight(block path, block, group, batches) -> one [B, T] >= 0 weight tensor per batch (QIG's
# integrated-gradient importances need the block and the group, not just the batch).
GroupWeight = Callable[[str, nn.Module, ScaleGroup, Sequence], "list[torch.Tensor] | None"]
# expert_weight(block path, top-k ids [n, k] long, routing weights [n, k], image [n] bool | None)
# -> per-expert loss weights [E] >= 0 (VEQ-ME's S_i), or None for uniform.
ExpertWeight = Callable[[str, torch.Tensor, torch.Tensor, "torch.Tensor | None"], "torch.Tensor | None"]
# act_quant(x [..., K]) -> x as the kernels quantize it (W4A8: int8 per token and group), float32.
ActQuant = Callable[[torch.Tensor], torch.Tensor]
# clip_quant(canonical name, W [N, K] float32, h_diag [K] float64 = mean x^2 of W's input) -> the
# weight as the exporter stores it with the clipping search (quantize.rtn(clip_search=True)), or None.
ClipQuant = Callable[[str, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


class ScaleSearch:
    """The per-block search; :meth:`run` is called by the calibration loop before quantizing.

    ``act_quant``: the candidates are scored with the group's input activations quantized too,
    as y = A(x / s) Q(W s)ᵀ (the W4A8 runtime), instead of x (Q(W s) / s)ᵀ.  ``image_masks`` (set
    by the MoE calibrator, one bool [B, T] per batch) tell ``expert_weight`` each token's modality.
    ``clip_quant``: also score every r with the clip-searched quantizer (module docstring); then
    every searched group is reported (ratio 0 = not scaled) so the caller knows its clip choice."""

    def __init__(self, fake_quant: FakeQuant, *, n_grid: int = 20, token_weight: TokenWeight | None = None,
                 group_weight: GroupWeight | None = None, expert_weight: ExpertWeight | None = None,
                 act_quant: ActQuant | None = None, clip_quant: ClipQuant | None = None) -> None:
        if not (isinstance(n_grid, int) and n_grid >= 2):
            raise ValueError(f"[ScaleSearch] expected n_grid an integer >= 2, got {n_grid!r}")
        self.fake_quant, self.n_grid, self.token_weight = fake_quant, n_grid, token_weight
        self.group_weight, self.expert_weight, self.act_quant = group_weight, expert_weight, act_quant
        self.clip_quant = clip_quant
        self.image_masks: list[torch.Tensor] | None = None

    def run(self, path: str, block: nn.Module, batches: Sequence) -> list[Folded]:
        """Search and fold every foldable group of ``block`` (module ``path``) in forward order,
        each with the earlier groups' scales already folded.  ``batches``: calibrate.Batch list."""
        for b in batches:   # per-block Hessian weights (QIG) never carry over to the next block
            if getattr(b, "token_weight", None) is not None:
                b.token_weight = None
        lay = layout_for(block)
        if lay is None:
            return []
        ref = [call_block(block, b.hidden, b.args, b.kwargs) for b in batches]   # fp outputs [B, T, D]
        weights = None
        out = []
        for g in lay.groups:
            if not foldable(block, g):
                continue
            canon = self._canonical(path, block, g)
            if any(self.fake_quant(c, w[:1].clone()) is None for c, w in self._weights_of(block, g, canon)):
                continue   # a linear of the group is not quantized (kept float16): nothing to protect
            a, h = self._act_stats(block, g, batches)
            if g.fused:
                res = self._search_experts(path, block, g, canon, a, batches)
            else:
                if self.token_weight is not None or self.group_weight is not None or weights is None:
                    weights = [self._weights(g.name, b, r) for b, r in zip(batches, ref)]
                    extra = self.group_weight(path, block, g, batches) if self.group_weight is not None else None
                    if extra is not None:
                        weights = [w * e.to(torch.float32) for w, e in zip(weights, extra)]
                res = self._search(block, g, canon, a, h, batches, ref, weights)
            if res is None:
                continue
            s, r, loss, loss0, clip = res
            changed = tuple(f"{path}.{n}" for n in fold(block, g, s)) if r > 0 else ()
            out.append(Folded(g.name, canon, r, loss, loss0, changed, clip))
        return out

    # ---- pieces ------------------------------------------------------------------------------
    @staticmethod
    def _canonical(path: str, block: nn.Module, g: ScaleGroup) -> tuple[str, ...]:
        """Canonical names of the group's quantized matrices: ``{path}.{linear}.weight``, and per
        expert ``{path}.{fused}.{e}.{chunk}`` (tensor_map's names for split fused experts)."""
        out = [f"{path}.{n}.weight" for n in g.linears]
        for f, parts in g.fused:
            for e in range(int(block.get_parameter(f).shape[0])):
                out += [f"{path}.{f}.{e}.{p}" for p in parts] if parts else [f"{path}.{f}.{e}"]
        return tuple(out)

    @staticmethod
    def _weights_of(block: nn.Module, g: ScaleGroup, canon: Sequence[str]) -> list[tuple[str, torch.Tensor]]:
        """(canonical name, current weight [N, C]) of every quantized matrix of the group."""
        ws = [block.get_submodule(n).weight.data for n in g.linears]
        for f, parts in g.fused:
            for we in block.get_parameter(f).data:                    # [N, C] per expert
                ws += list(we.chunk(len(parts))) if parts else [we]
        return list(zip(canon, ws))

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
    def _act_stats(block: nn.Module, g: ScaleGroup, batches: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_c = mean |x_c|, h_c = mean x_c^2) over real tokens at the group's input, float64 [C]."""
        acc: dict[str, torch.Tensor | float] = {"sum": 0.0, "sq": 0.0, "n": 0.0}
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
            acc["sq"] = acc["sq"] + (xm * x.abs()).reshape(-1, x.shape[-1]).sum(0)
            acc["n"] = acc["n"] + n

        h = block.get_submodule(g.input_module).register_forward_pre_hook(hook)
        try:
            for b in batches:
                mask["m"] = b.mask
                call_block(block, b.hidden, b.args, b.kwargs)
        finally:
            h.remove()
        return acc["sum"] / max(acc["n"], 1.0), acc["sq"] / max(acc["n"], 1.0)

    def _grid(self, a: torch.Tensor):
        """(i, r, s float32 [C]) for r = 0, 1/n, ..., (n-1)/n as AWQ: s = a^r / sqrt(max min)."""
        a = a.clamp(min=1e-8)
        for i in range(self.n_grid):
            r = i / self.n_grid
            s = a.pow(r).clamp(min=1e-4)
            yield i, r, (s / (s.max() * s.min()).sqrt()).to(torch.float32)

    def _quantizers(self):
        """The candidate quantizers, plain RTN first (it wins ties): [(clip flag, quant(name, W, h))]."""
        plain = (False if self.clip_quant is not None else None, lambda c, w, h: self.fake_quant(c, w))
        return [plain] + ([(True, self.clip_quant)] if self.clip_quant is not None else [])

    def _pick(self, best, loss0):
        """(s, r, loss, loss at r = 0 plain, clip) of the best candidate; None if plain r = 0 wins
        and no clip choice is to be reported."""
        s, r, loss, clip = best
        if r == 0.0 and not clip and self.clip_quant is None:
            return None
        return s, r, loss, loss0, clip

    def _search(self, block, g: ScaleGroup, canon, a, h, batches, ref, weights):
        """Grid over r (and the quantizers); returns :meth:`_pick`'s tuple or None.  ``h`` float64
        [C]: mean x^2 at the group's input (the clip search's weights; x / s has h / s^2)."""
        mods = [block.get_submodule(n) for n in g.linears]
        orig = [m.weight.data.clone() for m in mods]                  # float32 [N_i, C]
        best = None
        cur: dict[str, torch.Tensor] = {}
        aq = self.act_quant
        hooks = [m.register_forward_pre_hook(lambda mod, args: (aq(args[0] / cur["s"]), *args[1:]))
                 for m in mods] if aq is not None else []
        try:
            for i, r, s in self._grid(a):
                cur["s"] = s
                hs = h / s.double().square()
                for clip, quant in self._quantizers():
                    for m, w0, c in zip(mods, orig, canon):
                        q = quant(c, w0 * s[None, :], hs)
                        m.weight.data = q if aq is not None else q / s[None, :]
                    loss = self._loss(block, batches, ref, weights)
                    if best is None or loss < best[2]:
                        best = (s, r, loss, clip)
                    if i == 0 and not clip:
                        loss0 = loss
        finally:
            for hk in hooks:
                hk.remove()
            for m, w0 in zip(mods, orig):
                m.weight.data = w0
        return self._pick(best, loss0)

    def _search_experts(self, path: str, block, g: ScaleGroup, canon, a, batches):
        """The MoE group's grid over :meth:`expert_objective` (and the quantizers); returns
        :meth:`_pick`'s tuple, or None (also if no expert has a routed token with positive weight)."""
        loss_at = self.expert_objective(path, block, g, batches)
        if loss_at is None:
            return None
        best = None
        for i, r, s in self._grid(a):
            for clip, _ in self._quantizers():
                loss = loss_at(s, bool(clip))
                if best is None or loss < best[2]:
                    best = (s, r, loss, clip)
                if i == 0 and not clip:
                    loss0 = loss
        return self._pick(best, loss0)

    def expert_objective(self, path: str, block, g: ScaleGroup, batches):
        """loss(s float32 [C], clip=False) = Σ_e S_e ||Y_e - Ŷ_e(s)||² / Σ_e S_e n_e over each expert's routed
        real tokens: Y_e its full-precision output [n_e, D], Ŷ_e with gate/up quantized at scale s
        (Q(W s) / s; with ``act_quant`` A(x / s) Q(W s)ᵀ), down full precision; S_e from
        ``expert_weight`` (VEQ-ME's importance; 1 = plain AWQ); ``clip``: gate/up quantized by
        ``clip_quant`` with h = mean x^2 / s^2 over the expert's routed tokens (what its Hessian
        diagonal is when the exporter stores it).  None if Σ_e S_e n_e = 0."""
        x, idx, w, image = route_capture(block, batches, self.image_masks, g.input_module, g.router)
        (fused, parts), = g.fused
        experts = block.get_submodule(fused.rsplit(".", 1)[0])
        gu = block.get_parameter(fused).data                              # [E, 2 Fe, D]
        down = experts.down_proj.data                                     # [E, D, Fe]
        n_exp = int(gu.shape[0])
        S = self.expert_weight(path, idx, w, image) if self.expert_weight is not None else None
        S = torch.ones(n_exp, dtype=torch.float64) if S is None else S.to(torch.float64)
        rows = [torch.nonzero((idx == e).any(-1)).flatten() for e in range(n_exp)]
        den = sum(float(S[e]) * len(rows[e]) for e in range(n_exp))
        if den <= 0:
            return None

        def out(e: int, wgu: torch.Tensor, xe: torch.Tensor) -> torch.Tensor:
            gate, up = (xe @ wgu.T).chunk(2, dim=-1)
            return (experts.act_fn(gate) * up) @ down[e].T               # [n_e, D]

        ref = {e: out(e, gu[e], x[rows[e]]) for e in range(n_exp) if len(rows[e]) and S[e] > 0}
        h = {e: x[rows[e]].double().square().mean(0) for e in ref}          # [C] per expert

        def loss_at(s: torch.Tensor, clip: bool = False) -> float:
            num = 0.0
            for e, y0 in ref.items():
                ws = (gu[e] * s[None, :]).chunk(len(parts))
                names = [f"{path}.{fused}.{e}.{p}" for p in parts]
                hs = h[e] / s.double().square()
                q = torch.cat([self.clip_quant(c, we, hs) if clip else self.fake_quant(c, we)
                               for c, we in zip(names, ws)])
                xe = x[rows[e]]
                y = out(e, q, self.act_quant(xe / s)) if self.act_quant is not None else out(e, q / s[None, :], xe)
                num += float(S[e]) * float((y - y0).double().square().sum())
            return num / den

        return loss_at

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


def route_capture(block: nn.Module, batches: Sequence, image_masks: Sequence | None = None,
                  moe: str = "mlp", router: str = "mlp.gate"):
    """Run a sparse-MoE block over the batches with hooks on the MoE module's input and the
    router's output (logits, top-k weights, top-k ids; transformers' TopKRouter contract).
    Returns, for the real (non-padding) tokens of all batches in order: x float32 [n, D] (the
    MoE input), top-k ids long [n, k], routing weights float32 [n, k] (renormalised, what scales
    the expert outputs) and image bool [n] (None without ``image_masks``)."""
    got: dict[str, list] = {"x": [], "idx": [], "w": []}

    def on_input(mod, args) -> None:                           # [B, T, D]
        got["x"].append(args[0].detach().reshape(-1, args[0].shape[-1]))

    def on_route(mod, args, out) -> None:
        got["w"].append(out[1].detach().float())
        got["idx"].append(out[2].detach())

    h1 = block.get_submodule(moe).register_forward_pre_hook(on_input)
    h2 = block.get_submodule(router).register_forward_hook(on_route)
    keep, image = [], []
    try:
        for j, b in enumerate(batches):
            call_block(block, b.hidden, b.args, b.kwargs)
            n = b.hidden.shape[0] * b.hidden.shape[1]
            keep.append(b.mask.reshape(-1).bool() if b.mask is not None else torch.ones(n, dtype=torch.bool))
            if image_masks is not None:
                image.append(image_masks[j].reshape(-1).bool())
    finally:
        h1.remove()
        h2.remove()
    real = torch.cat(keep)
    return (torch.cat(got["x"])[real].float(), torch.cat(got["idx"])[real], torch.cat(got["w"])[real],
            torch.cat(image)[real] if image_masks is not None else None)


__all__ = ["LAYOUTS", "MOE_LAYOUTS", "ClipQuant", "Folded", "Layout", "Prev", "ScaleGroup", "ScaleSearch", "fold", "foldable",
           "layout_for", "route_capture"]
