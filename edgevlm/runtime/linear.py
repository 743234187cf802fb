"""QuantLinear: ``y = x @ dequant(W).T (+ b)`` over a packed weight blob.

The blob is usually a zero-copy view into a memory-mapped .evlm file, so constructing a
QuantLinear reads nothing. The product runs in ``edgevlm._core`` (SIMD kernels chosen at
import; ``EDGEVLM_ISA=ref|avx2|avxvnni|avx512vnni|neon|neondot`` overrides). If the extension could
not be built, a numpy fallback dequantizes per call, so results stay correct, only slow.
"""

from __future__ import annotations

import numpy as np

from .. import qtypes

try:
    from .. import _core
except ImportError:  # pragma: no cover - exercised only on machines without a compiler
    _core = None


class QuantLinear:
    """A linear layer with packed weights W[N, K] (qtype q2/q3/q4/q8 at group 32/64/128, or q2b at 16).

    blob:  uint8 [qtype.packed_size(N, K, group)]  (edgevlm.qtypes layout)
    bias:  float32 [N] or None
    """

    def __init__(self, blob: np.ndarray, qtype: str, n: int, k: int, group: int, bias: np.ndarray | None = None):
        self.qtype = qtypes.get(qtype)
        self.n, self.k, self.group = int(n), int(k), int(group)
        size = self.qtype.packed_size(self.n, self.k, self.group)
        blob = np.asarray(blob)
        if blob.dtype != np.uint8 or blob.ndim != 1 or blob.size != size or not blob.flags.c_contiguous:
            raise ValueError(f"[QuantLinear] expected a contiguous 1-D uint8 blob of {size} bytes for {qtype} "
                             f"N={n} K={k} group={group}, got dtype {blob.dtype} shape {blob.shape}")
        self.blob = blob
        if bias is not None:
            bias = np.ascontiguousarray(bias, dtype=np.float32)
            if bias.shape != (self.n,):
                raise ValueError(f"[QuantLinear] expected bias of shape ({self.n},), got {bias.shape}")
        self.bias = bias

    @property
    def nbytes(self) -> int:
        return self.blob.nbytes + (self.bias.nbytes if self.bias is not None else 0)

    def __call__(self, x: np.ndarray, *, isa: str | None = None, threads: int = 0) -> np.ndarray:
        """x: float32 [..., K] -> float32 [..., N]."""
        x = np.asarray(x)
        if x.shape[-1:] != (self.k,):
            raise ValueError(f"[QuantLinear] expected input [..., {self.k}], got {x.shape}")
        lead = x.shape[:-1]
        x2 = np.ascontiguousarray(x.reshape(-1, self.k), dtype=np.float32)
        if _core is None:
            y = x2 @ self.qtype.dequantize(self.blob, self.n, self.k, self.group).T
            if self.bias is not None:
                y += self.bias
        else:
            y = _core.linear(x2, self.blob, self.qtype.name, self.group, self.n,
                             bias=self.bias, isa=isa, threads=threads)
        return y.reshape(*lead, self.n)

    def __repr__(self) -> str:
        return (f"QuantLinear({self.qtype.name}, group={self.group}, out={self.n}, in={self.k}, "
                f"bias={self.bias is not None})")
