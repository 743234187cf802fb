"""Layer-by-layer calibration of a decoder with sparse MoE blocks (Qwen3-VL-MoE), expert-aware.

:class:`.calibrate.Calibrator` hooks ``nn.Linear`` modules; transformers 5 keeps a layer's experts
in two fused 3-D parameters (``experts.gate_up_proj`` [E, 2 Fe, D], ``experts.down_proj``
[E, D, Fe]) that are no ``nn.Linear``.  Per decoder layer this module

1. loads the block, with the experts read in the module layout (the hub stores them transposed;
   ``LazyModel`` would only reshape them);
2. quantizes the attention (and dense-MLP) linears with the Calibrator's own sequential GPTQ pass,
   which also gives the block's full-precision outputs;
3. runs the block once more (attention now quantized, as at run time) with hooks on the MoE block
   input and the router: every real (non-padding) token's input x [D], its top-k experts and
   routing weights (renormalised, the values that scale the expert outputs), its modality;
4. per expert e: the gate/up Hessian from the tokens routed to e only, GPTQ of gate and up, then
   the down Hessian from act(gate_q x) * up_q x on the same tokens (GPTQ's true-sequential
   order inside the expert), GPTQ of down; the quantized slices go back into the fused
   parameters;
5. reruns the block with everything quantized and adds the layer's DeepStack features at the
   image rows (Qwen3-VL adds them between layers, outside the block), which feeds the next layer.

Rarely hit experts: with n_e < ``min_tokens`` routed tokens, the Hessian is shrunk towards the
layer's all-token Hessian (what the expert would see if every token were routed to it):
H̃ = (n_e H_routed + n0 H_all) / (n_e + n0), n0 = ``min_tokens`` (design.md §5.4 "merge with a
uniform prior"); an expert no calibration token reaches gets H_all.  GPTQ then never runs on a
near-singular Hessian, and no expert silently falls back to plain RTN.

VEQ hooks (design.md §5): ``expert_weight(canonical, x [n, K], affinity [n], image [n], counts) ->
weights [n] | None`` reweights each routed token in the expert Hessians (H̃ = 2XᵀCX, VEQ-MA;
``counts`` = (text, image) real tokens of the whole calibration set, for the modality weights);
by default the Calibrator's ``expert_weight`` attribute (set by the pipeline for veq-ma);
:attr:`MoeCalibrator.stats` records per layer and expert the routed token counts and routing
weight sums split by modality (text / image), the inputs of VEQ-ME's importance S_i.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .awq import route_capture
from .calibrate import Batch, Calibrator, _trim_heap
from .lazy import call_block
from .quantize import Hessian
from .tm_qwen3vlmoe import expert_slices

#: routed tokens below which an expert's Hessian is shrunk towards the layer's all-token Hessian
MIN_TOKENS = 128


@dataclass
class ExpertStats:
    """Routing statistics of one MoE layer over the calibration tokens (padding excluded)."""

    layer: int
    tokens: np.ndarray     # int64 [E, 2]: tokens routed to each expert, (text, image)
    affinity: np.ndarray   # float64 [E, 2]: Σ routing weight of those tokens, (text, image)

    def to_json(self) -> dict:
        """The file's record (metadata ``quantization.moe_stats``): plain lists."""
        return {"layer": int(self.layer), "tokens_text_image": self.tokens.tolist(),
                "affinity_text_image": [[round(float(v), 6) for v in r] for r in self.affinity]}


class MoeCalibrator:
    """Drives one decoder tower through ``cal``, quantizing routed experts per expert."""

    def __init__(self, cal: Calibrator, *, min_tokens: int | None = None,
                 expert_weight: Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]],
                                         torch.Tensor | None]
                 | None = None) -> None:
        min_tokens = MIN_TOKENS if min_tokens is None else min_tokens  # read at call time (tests lower it)
        if min_tokens < 1:
            raise ValueError(f"min_tokens must be >= 1, got {min_tokens}")
        if expert_weight is None:
            expert_weight = getattr(cal, "expert_weight", None)
        self.cal, self.min_tokens, self.expert_weight = cal, int(min_tokens), expert_weight
        self.stats: list[ExpertStats] = []
        self.counts = (0, 0)   # (text, image) real calibration tokens, set by run_tower

    # ---------------------------------------------------------------------------------------------
    def run_tower(self, tt: dict, batches: list[Batch], image_masks: list[torch.Tensor],
                  deepstack: list[list[torch.Tensor]] | None = None) -> list[Batch]:
        """Quantize decoder layers 0..n-1 (``tt``: the family's text tower facts, with ``moe``: the
        MoE layer indices).  ``image_masks[b]`` bool [B, T]: image tokens of batch b;
        ``deepstack[l][b]`` [n_b, D]: features added after layer l at those rows.  Returns the
        batches with the last layer's (quantized) outputs as ``hidden``."""
        cal, moe = self.cal, set(tt["moe"])
        n_img = sum(int((m & b.mask.bool()).sum()) if b.mask is not None else int(m.sum())
                    for m, b in zip(image_masks, batches))
        n_all = sum(int(b.mask.sum()) if b.mask is not None else int(m.numel())
                    for m, b in zip(image_masks, batches))
        self.counts = (n_all - n_img, n_img)
        if cal.scale_search is not None:  # VEQ-ME's expert importances need each token's modality
            cal.scale_search.image_masks = image_masks
        for i in range(tt["n"]):
            path = f"{tt['blocks']}.{i}"
            block = cal.load(path)
            if i in moe:
                self._load_experts(path, block)
            if cal.scale_search is not None:  # AWQ / QIG / VEQ-ME scales (awq.MOE_LAYOUTS), folded
                cal._fold_scales(path, block, batches)
            outs_fp = cal._collect_and_quantize(path, block, batches)  # attention (+ dense MLP) linears
            if i in moe:
                self._quantize_experts(i, path, block, batches, image_masks)
            num = den = 0.0
            for j, (b, fp) in enumerate(zip(batches, outs_fp)):
                b.hidden = call_block(block, b.hidden, b.args, b.kwargs)
                num += float(((b.hidden - fp) ** 2).sum())
                den += float((fp ** 2).sum())
                if deepstack is not None and i < len(deepstack):
                    b.hidden = b.hidden.clone()
                    b.hidden[image_masks[j]] += deepstack[i][j].to(b.hidden.dtype)
            del outs_fp
            cal.q.block_done("text", i, float(np.sqrt(num / max(den, 1e-30))))
            cal.lm.release(path)
            _trim_heap()
        return batches

    # ---------------------------------------------------------------------------------------------
    def _load_experts(self, path: str, block: torch.nn.Module) -> None:
        """The fused expert parameters in the module layout (LazyModel only reshapes)."""
        ex = block.mlp.experts
        for name in ("gate_up_proj", "down_proj"):
            p = getattr(ex, name)
            a = expert_slices(self.cal.lm.read(f"{path}.mlp.experts.{name}"), p.shape[1], p.shape[2])
            self.cal.lm.set_param(f"{path}.mlp.experts.{name}", torch.from_numpy(np.ascontiguousarray(a)))

    def _hessian(self, canon: str, x_routed: torch.Tensor, aff: torch.Tensor, img: torch.Tensor,
                 x_all: torch.Tensor | None) -> Hessian | None:
        """The Hessian of one expert linear: routed tokens (VEQ-reweighted if a hook is set),
        shrunk towards all tokens when fewer than min_tokens are routed."""
        if not self.cal.q.wants_hessian(canon):
            return None
        h = Hessian(int(x_routed.shape[-1]))
        n = int(x_routed.shape[0])
        if n:
            c = self.expert_weight(canon, x_routed, aff, img, self.counts) if self.expert_weight is not None else None
            h.add(x_routed, c)
        if n < self.min_tokens and x_all is not None and len(x_all):
            # total prior weight n0 = min_tokens, spread over all tokens: matrix() divides by n + n0
            prior = self.min_tokens if n else 1.0
            h.add(x_all, torch.full((len(x_all),), prior / len(x_all)))
        return h

    def _quantize_experts(self, layer: int, path: str, block: torch.nn.Module, batches: list[Batch],
                          image_masks: list[torch.Tensor]) -> None:
        q = self.cal.q
        ex = block.mlp.experts
        # every real token's MoE input [n, D], top-k ids / routing weights [n, k], image flag [n]
        x, idx, w, img = route_capture(block, batches, image_masks)
        n_exp, fe = ex.gate_up_proj.shape[0], ex.gate_up_proj.shape[1] // 2
        tokens, affinity = np.zeros((n_exp, 2), np.int64), np.zeros((n_exp, 2), np.float64)
        gate_up, down = ex.gate_up_proj.data.clone(), ex.down_proj.data.clone()
        base = f"{path}.mlp.experts"
        with torch.no_grad():
            for e in range(n_exp):
                rows, slot = torch.nonzero(idx == e, as_tuple=True)
                xe, ae, ie = x[rows], w[rows, slot], img[rows]
                for m in (0, 1):
                    sel = ie == bool(m)
                    tokens[e, m], affinity[e, m] = int(sel.sum()), float(ae[sel].double().sum())
                rare = len(rows) < self.min_tokens
                hg = self._hessian(f"{base}.gate_up_proj.{e}.gate", xe, ae, ie, x if rare else None)
                wg = q.linear(f"{base}.gate_up_proj.{e}.gate", gate_up[e, :fe], hg)
                wu = q.linear(f"{base}.gate_up_proj.{e}.up", gate_up[e, fe:], hg)
                z = ex.act_fn(xe @ wg.T) * (xe @ wu.T)                          # down's inputs [n_e, Fe]
                z_all = ex.act_fn(x @ wg.T) * (x @ wu.T) if rare else None
                hd = self._hessian(f"{base}.down_proj.{e}", z, ae, ie, z_all)
                wd = q.linear(f"{base}.down_proj.{e}", down[e], hd)
                gate_up[e, :fe], gate_up[e, fe:], down[e] = wg, wu, wd
        self.cal.lm.set_param(f"{base}.gate_up_proj", gate_up)
        self.cal.lm.set_param(f"{base}.down_proj", down)
        self.stats.append(ExpertStats(layer, tokens, affinity))
