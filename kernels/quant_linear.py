"""The CUDA twin of the runtime's QuantLinear (``--device cuda``; edgevlm/runtime/cuda_linear.py
switches to it): each packed blob uploaded once, float32 numpy activations in and out per call.
This module imports torch (and, through the kernels, triton); the CPU runtime never imports it.
"""

from __future__ import annotations

import numpy as np
import torch

from ..runtime.cuda_linear import CUDA_HINT, CudaUnavailableError
from . import api as ek_api
from .layout import PackedWeight


def require_gpu() -> None:
    """Raise CudaUnavailableError unless torch sees a CUDA GPU."""
    if not torch.cuda.is_available():
        raise CudaUnavailableError(f"device='cuda' needs a CUDA GPU, but torch {torch.__version__} sees none "
                                   f"(torch.cuda.is_available() is False); {CUDA_HINT}")


class CudaQuantLinear:
    """Drop-in for QuantLinear on a CUDA device: ``y = x @ dequant(W).T (+ b)``.

    blob: uint8 [packed_size(N, K, group)] (edgevlm.qtypes layout), uploaded once
    bias: float32 [N] or None
    device: a torch CUDA device; "cpu" only when the kernels run under TRITON_INTERPRET=1 (tests)
    """

    def __init__(self, blob: np.ndarray, qtype: str, n: int, k: int, group: int, bias: np.ndarray | None = None,
                 *, device: str = "cuda"):
        dev = torch.device(device)
        if dev.type != "cuda" and not ek_api.INTERPRETED:
            raise ValueError(f"[CudaQuantLinear] expected a CUDA device, got {device!r} (a CPU device works only "
                             f"with TRITON_INTERPRET=1, for tests)")
        if dev.type == "cuda":
            require_gpu()
        self.qtype, self.n, self.k, self.group = qtype, int(n), int(k), int(group)
        self.weight = PackedWeight.from_blob(np.asarray(blob), qtype, n, k, group, device=dev)
        self.bias = None
        if bias is not None:
            b = np.ascontiguousarray(bias, dtype=np.float32)
            if b.shape != (self.n,):
                raise ValueError(f"[CudaQuantLinear] expected bias of shape ({self.n},), got {b.shape}")
            self.bias = torch.from_numpy(b).to(dev)

    @classmethod
    def from_quant(cls, q, *, device: str = "cuda") -> CudaQuantLinear:
        """The CUDA twin of a CPU QuantLinear (same blob, type, shape and bias)."""
        return cls(q.blob, q.qtype.name, q.n, q.k, q.group, q.bias, device=device)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + (4 * self.n if self.bias is not None else 0)

    def __call__(self, x: np.ndarray, *, isa: str | None = None, threads: int = 0) -> np.ndarray:
        """x: float32 [..., K] (numpy) -> float32 [..., N] (numpy). ``isa``/``threads`` are the CPU
        kernels' knobs, accepted for QuantLinear's signature and ignored."""
        x = np.asarray(x)
        if x.shape[-1:] != (self.k,):
            raise ValueError(f"[CudaQuantLinear] expected input [..., {self.k}], got {x.shape}")
        lead = x.shape[:-1]
        xt = torch.from_numpy(np.ascontiguousarray(x.reshape(-1, self.k), dtype=np.float32))
        y = ek_api.matmul(xt.to(self.weight.blob.device), self.weight, bias=self.bias, out_dtype=torch.float32)
        return y.cpu().numpy().reshape(*lead, self.n)

    def __repr__(self) -> str:
        return (f"CudaQuantLinear({self.qtype}, group={self.group}, out={self.n}, in={self.k}, "
                f"bias={self.bias is not None}, device={self.weight.blob.device})")
