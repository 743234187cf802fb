"""VEQ (Qin et al. 2026; design.md Part 2 section 5): modality-adaptive quantization of MoE VLMs,
as hooks into the expert-aware calibration (calibrate_moe.py) and the scale search (awq.py).

Modality weights.  The paper's text/vision sensitivity ratio γ needs a backward pass of the LM
loss; we take the recommended token-count form instead (design.md 5.4): image tokens weigh
μ(img) = 1 and text tokens μ(txt) = clip(T_img / T_txt, 1, 10) over the calibration set's real
tokens (``text_weight`` overrides).  Where image tokens outnumber text tokens (the paper's
setting: 200+ vs 6) each modality then carries about the same total weight; the lower bound 1
keeps the direction of the paper's finding (γ ≈ 22: a text token matters more than an image
token) where text tokens outnumber image tokens - without it a text-heavy calibration set
(tiny-moe in benchmarks/bench_methods.py: 2.9 text tokens per image token) gave text 0.35 and
VEQ-MA measured worse than GPTQ on every seed at W3.

- VEQ-MA (``veq-ma``, ``veq``): each expert's GPTQ Hessian H̃_i = 2 X_iᵀ C_i X_i / ΣC over the
  tokens routed to it, c_j = a_ji μ(m_j) with a_ji the renormalised top-k routing weight (the
  factor on the expert's output).  c is rescaled to mean 1 over the routed tokens, so the rare-
  expert shrinkage towards the layer Hessian (calibrate_moe.MIN_TOKENS) keeps its strength;
  GPTQ itself is invariant to the overall scale of H, the per-token reweighting is what counts.
- VEQ-ME (``veq-me``): the importance S_i = Σ_{j routed to i} μ(m_j) (= μ(txt) N_i^txt +
  N_i^img), normalised to mean 1, weights each expert's output error in the search of the
  scale shared by all experts' gate/up (awq._search_experts); then RTN with the clip search.

Attention (and dense-MLP) linears keep the plain Hessians.  The routing statistics of every MoE
layer are saved in the file (metadata ``quantization.moe_stats``) whatever the method.
"""

from __future__ import annotations

import torch

from .awq import ScaleSearch

#: bounds of the token-count modality ratio (design.md 5.4: a raw ratio of ~30 would let text
#: dominate the Hessians; below 1 it would contradict the paper's γ > 1, see the module docstring)
RATIO_CLIP = (1.0, 10.0)


def modality_weights(counts: tuple[int, int], text_weight: float | None = None) -> tuple[float, float]:
    """(μ(text), μ(image)) from the real calibration tokens (text, image); image weighs 1."""
    if text_weight is not None:
        return float(text_weight), 1.0
    n_txt, n_img = counts
    if n_txt <= 0 or n_img <= 0:
        return 1.0, 1.0
    return float(min(max(n_img / n_txt, RATIO_CLIP[0]), RATIO_CLIP[1])), 1.0


def _counts(image: torch.Tensor) -> tuple[int, int]:
    n_img = int(image.sum())
    return int(image.numel()) - n_img, n_img


class VeqMA:
    """calibrate_moe's ``expert_weight``: c = routing weight x modality weight, mean 1."""

    def __init__(self, text_weight: float | None = None) -> None:
        self.text_weight = text_weight

    def __call__(self, canonical: str, x: torch.Tensor, affinity: torch.Tensor, image: torch.Tensor,
                 counts: tuple[int, int]) -> torch.Tensor:
        mu_t, mu_i = modality_weights(counts, self.text_weight)
        c = affinity.to(torch.float64) * torch.where(image.bool(), mu_i, mu_t).to(torch.float64)   # [n]
        mean = float(c.mean()) if c.numel() else 0.0
        return (c / mean if mean > 0 else torch.ones_like(c)).float()


class VeqME:
    """awq.ScaleSearch's ``expert_weight``: S_i [E] from the routing of the layer's real tokens.
    ``importance`` records S per block path (the file keeps it next to the routing stats)."""

    def __init__(self, text_weight: float | None = None, n_experts: int | None = None) -> None:
        self.text_weight, self.n_experts = text_weight, n_experts   # n_experts None: from the ids seen
        self.importance: dict[str, list[float]] = {}

    def __call__(self, path: str, idx: torch.Tensor, w: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
        n_exp = int(self.n_experts) if self.n_experts is not None else int(idx.max()) + 1
        img = image if image is not None else torch.zeros(idx.shape[0], dtype=torch.bool)
        mu_t, mu_i = modality_weights(_counts(img), self.text_weight)
        mu = torch.where(img, mu_i, mu_t).to(torch.float64)                      # [n]
        S = torch.zeros(n_exp, dtype=torch.float64)
        S.index_add_(0, idx.reshape(-1).long(), mu[:, None].expand_as(idx).reshape(-1))
        S = S / S.mean() if float(S.mean()) > 0 else torch.ones(n_exp, dtype=torch.float64)
        self.importance[path] = [round(float(v), 6) for v in S]
        return S


def configure(cfg, cal, search: ScaleSearch | None, n_experts: int | None) -> VeqME | None:
    """Install the VEQ hooks of ``cfg.method`` on the Calibrator ``cal`` and the scale search.
    Returns the VEQ-ME hook (its importances go into the file), or None."""
    from .config import VEQ_MA_METHODS, Method

    if cfg.method in VEQ_MA_METHODS:
        cal.expert_weight = VeqMA(cfg.veq_text_weight)
    if search is not None and cfg.method is Method.VEQ_ME:
        me = VeqME(cfg.veq_text_weight, n_experts)
        search.expert_weight = me
        return me
    return None


def stats_json(stats, me: VeqME | None, blocks: str) -> list[dict]:
    """calibrate_moe.ExpertStats per MoE layer -> the file's ``moe_stats`` rows (with VEQ-ME's S_i)."""
    out = []
    for s in stats:
        row = s.to_json()
        if me is not None and f"{blocks}.{s.layer}" in me.importance:
            row["veq_me_importance"] = me.importance[f"{blocks}.{s.layer}"]
        out.append(row)
    return out


__all__ = ["RATIO_CLIP", "VeqMA", "VeqME", "configure", "modality_weights", "stats_json"]
