"""CUDA backend for the runtime's packed linears (``--device cuda``): the Triton kernels of
``edgevlm.kernels`` on the same packed bytes as the CPU kernels.

Importing this module imports neither torch nor triton (the CPU runtime stays torch-free; see
tests/test_runtime_imports.py): they load when a CUDA linear is built. What runs on the GPU is
only the quantized linears: each weight blob is uploaded once at load, and per call the float32
activations go to the GPU and the float32 outputs come back. Everything else of the forward pass
(norms, attention, RoPE, KV cache, sampling) stays numpy on the CPU for now; on a Jetson the
memory is unified, so the copies are cheap there.

The device reaches the linears through the ``isa`` argument the loaders already thread to every
``Linear``: ``kernel_target("cuda", None)`` returns ``CUDA_TARGET``, and ``Linear`` swaps its
QuantLinear for a ``CudaQuantLinear`` when it sees it.
"""

from __future__ import annotations

import importlib
from enum import Enum

import numpy as np

CUDA_TARGET = "cuda"  # the value of Linear's ``isa`` that selects this backend


class Device(str, Enum):
    CPU = "cpu"
    CUDA = "cuda"


class CudaUnavailableError(ValueError):
    """device='cuda' was asked for but torch, triton, edgevlm.kernels or a CUDA GPU is missing."""


_HINT = "install the extra with `pip install 'edgevlm[cuda]'` on a machine with an NVIDIA GPU, or use device='cpu'"


def parse_device(device: str | Device) -> Device:
    try:
        return Device(device)
    except ValueError:
        raise ValueError(f"expected device 'cpu' or 'cuda', got {device!r}") from None


def require_cuda() -> None:
    """Raise CudaUnavailableError naming what is missing (torch, triton, the kernels, a GPU)."""
    for mod in ("torch", "triton", "edgevlm.kernels"):
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise CudaUnavailableError(f"device='cuda' needs {mod}, which cannot be imported ({e}); {_HINT}") from e
    import torch

    if not torch.cuda.is_available():
        raise CudaUnavailableError(f"device='cuda' needs a CUDA GPU, but torch {torch.__version__} sees none "
                                   f"(torch.cuda.is_available() is False); {_HINT}")


def kernel_target(device: str | Device, isa: str | None) -> str | None:
    """The ``isa`` value the loaders pass to every Linear: ``isa`` itself for the CPU, CUDA_TARGET
    for CUDA (after checking that CUDA is usable, so a load fails early and clearly)."""
    if parse_device(device) is Device.CPU:
        return isa
    if isa is not None:
        raise ValueError(f"isa={isa!r} picks a CPU kernel; with device='cuda' leave isa unset")
    require_cuda()
    return CUDA_TARGET


class CudaQuantLinear:
    """Drop-in for QuantLinear on a CUDA device: ``y = x @ dequant(W).T (+ b)``.

    blob: uint8 [packed_size(N, K, group)] (edgevlm.qtypes layout), uploaded once
    bias: float32 [N] or None
    device: a torch CUDA device; "cpu" only when the kernels run under TRITON_INTERPRET=1 (tests)
    """

    def __init__(self, blob: np.ndarray, qtype: str, n: int, k: int, group: int, bias: np.ndarray | None = None,
                 *, device: str = "cuda"):
        import torch

        from .. import kernels as ek

        dev = torch.device(device)
        if dev.type != "cuda" and not ek.INTERPRETED:
            raise ValueError(f"[CudaQuantLinear] expected a CUDA device, got {device!r} (a CPU device works only "
                             f"with TRITON_INTERPRET=1, for tests)")
        if dev.type == "cuda":
            require_cuda()
        self._torch, self._ek = torch, ek
        self.qtype, self.n, self.k, self.group = qtype, int(n), int(k), int(group)
        self.weight = ek.PackedWeight.from_blob(np.asarray(blob), qtype, n, k, group, device=dev)
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
        xt = self._torch.from_numpy(np.ascontiguousarray(x.reshape(-1, self.k), dtype=np.float32))
        y = self._ek.matmul(xt.to(self.weight.blob.device), self.weight, bias=self.bias,
                            out_dtype=self._torch.float32)
        return y.cpu().numpy().reshape(*lead, self.n)

    def __repr__(self) -> str:
        return (f"CudaQuantLinear({self.qtype}, group={self.group}, out={self.n}, in={self.k}, "
                f"bias={self.bias is not None}, device={self.weight.blob.device})")
