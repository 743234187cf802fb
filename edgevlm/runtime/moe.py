"""Sparse mixture-of-experts MLP (Qwen3-MoE / Qwen3-VL-MoE) on the edgevlm kernels (numpy; never torch).

What runs is transformers' ``Qwen3VLMoeTextSparseMoeBlock``:

    p = softmax(x Wrᵀ)              router, float32 [T, E] (Wr kept float16/32 in the file)
    (w, idx) = top-k of p           [T, k]; w /= Σ w when ``norm_topk_prob`` (always in Qwen3-VL-MoE)
    y = Σ_j w_j · down_e(act(gate_e x) * up_e x)   over the k experts e = idx_j of each token
    (+ shared expert · sigmoid(shared_gate x), when the file has one: Qwen2-MoE style)

Every expert's gate/up/down is an ordinary packed linear [N, K] (``{p}.experts.{e}.gate.weight``
...), so the existing kernels run them.  Prefill groups the tokens per expert and runs one GEMM
per expert hit (M = the tokens routed to it); decode (T = 1) is k GEMVs.  Contributions are
added in ascending expert order, as transformers' ``index_add_`` loop does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .layers import Linear, get_activation, softmax, vector

__all__ = ["MoE"]

F32 = np.float32


class MoE:
    """One sparse MoE MLP: x [T, D] -> [T, D]."""

    def __init__(self, router: np.ndarray, experts: list[tuple[Linear, Linear, Linear]], top_k: int, *,
                 norm_topk: bool = True, act: Any = None,
                 shared: tuple[Linear, Linear, Linear] | None = None, shared_gate: np.ndarray | None = None) -> None:
        self.router = np.ascontiguousarray(np.asarray(router, dtype=F32).T)  # [D, E]: x @ router is one GEMM
        self.n_experts = self.router.shape[1]
        if len(experts) != self.n_experts:
            raise ValueError(f"the router scores {self.n_experts} experts but {len(experts)} were given")
        if not 1 <= top_k <= self.n_experts:
            raise ValueError(f"num_experts_per_tok must be in 1..{self.n_experts}, got {top_k}")
        self.experts, self.top_k, self.norm_topk = experts, int(top_k), bool(norm_topk)
        self.act = act or get_activation("silu")
        self.shared = shared
        self.shared_gate = None if shared_gate is None else np.asarray(shared_gate, dtype=F32).reshape(-1)

    @classmethod
    def from_file(cls, f: Any, prefix: str, config: dict, *, isa: str | None = None) -> MoE:
        """``{prefix}.router.weight`` [E, D] + ``{prefix}.experts.{e}.{gate,up,down}.weight`` (+
        ``{prefix}.shared.*`` and ``{prefix}.shared_gate.weight`` when present)."""
        router = vector(f, f"{prefix}.router.weight")
        if router.ndim != 2:
            raise ValueError(f"{prefix}.router.weight must be [E, D], got shape {router.shape}")
        experts = []
        for e in range(router.shape[0]):
            p = f"{prefix}.experts.{e}"
            if f"{p}.gate.weight" not in f.records:
                raise ValueError(f"{getattr(f, 'path', 'file')}: the router of {prefix} scores {router.shape[0]} "
                                 f"experts but {p}.gate.weight is missing; re-export the model")
            experts.append(tuple(Linear.from_file(f, f"{p}.{x}", isa=isa) for x in ("gate", "up", "down")))
        shared = None
        if f"{prefix}.shared.gate.weight" in f.records:
            shared = tuple(Linear.from_file(f, f"{prefix}.shared.{x}", isa=isa) for x in ("gate", "up", "down"))
        sg = f"{prefix}.shared_gate.weight"
        top_k = config.get("num_experts_per_tok")
        if top_k is None:
            raise ValueError("text config lacks 'num_experts_per_tok'; is this a complete MoE export?")
        return cls(router, experts, int(top_k), norm_topk=bool(config.get("norm_topk_prob", True)),
                   act=get_activation(config.get("hidden_act", "silu")), shared=shared,
                   shared_gate=vector(f, sg) if sg in f.records else None)

    def route(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x [T, D] -> (expert ids int64 [T, k] by descending probability, weights float32 [T, k])."""
        p = softmax(x @ self.router)                                        # [T, E] float32
        # stable sort of -p: among equal probabilities the lower expert id first, as torch.topk on CPU
        idx = np.argsort(-p, axis=-1, kind="stable")[:, :self.top_k]
        w = np.take_along_axis(p, idx, axis=-1)
        if self.norm_topk:
            w = w / w.sum(-1, keepdims=True)
        return idx, w.astype(F32, copy=False)

    def expert(self, e: int, x: np.ndarray) -> np.ndarray:
        """Expert e's SwiGLU on x [M, D] -> [M, D] (one GEMM per projection; a GEMV when M = 1)."""
        gate, up, down = self.experts[e]
        return down(self.act(gate(x)) * up(x))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=F32)
        idx, w = self.route(x)
        out = np.zeros_like(x)
        for e in np.unique(idx).tolist():                                   # ascending: HF's order
            rows, slot = np.nonzero(idx == e)                               # a token picks e at most once
            out[rows] += self.expert(e, x[rows]) * w[rows, slot, None]
        if self.shared is not None:
            gate, up, down = self.shared
            s = down(self.act(gate(x)) * up(x))
            if self.shared_gate is not None:
                s = s * (F32(1.0) / (F32(1.0) + np.exp(-(x @ self.shared_gate))))[:, None]
            out += s
        return out
