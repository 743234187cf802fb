"""``--device cuda`` for the runtime's packed linears: device parsing, the early availability
check, and the switch to ``edgevlm.kernels.quant_linear.CudaQuantLinear`` (the Triton kernels of
``edgevlm.kernels`` on the same packed bytes as the CPU kernels).

This module never imports torch or triton (the CPU runtime stays torch-free; see
tests/test_runtime_imports.py): the CUDA side lives in ``edgevlm.kernels`` and is loaded by name
(importlib) only when a CUDA linear is built or CUDA is checked. What runs on the GPU is
only the quantized linears: each weight blob is uploaded once at load, and per call the float32
activations go to the GPU and the float32 outputs come back. Everything else of the forward pass
(norms, attention, RoPE, KV cache, sampling) stays numpy on the CPU for now; on a Jetson the
memory is unified, so the copies are cheap there.

The device reaches the linears through the ``isa`` argument the loaders already thread to every
``Linear``: ``kernel_target("cuda", None)`` returns ``CUDA_TARGET``, and ``Linear`` swaps its
QuantLinear for :func:`to_cuda`'s ``CudaQuantLinear`` when it sees it.
"""

from __future__ import annotations

import importlib
from enum import Enum
from typing import Any

CUDA_TARGET = "cuda"  # the value of Linear's ``isa`` that selects this backend


class Device(str, Enum):
    CPU = "cpu"
    CUDA = "cuda"


class CudaUnavailableError(ValueError):
    """device='cuda' was asked for but torch, triton, edgevlm.kernels or a CUDA GPU is missing."""


CUDA_HINT = "install the extra with `pip install 'edgevlm[cuda]'` on a machine with an NVIDIA GPU, or use device='cpu'"


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
            raise CudaUnavailableError(f"device='cuda' needs {mod}, which cannot be imported ({e}); {CUDA_HINT}") from e
    importlib.import_module("edgevlm.kernels.quant_linear").require_gpu()


def to_cuda(quant: Any) -> Any:
    """The CUDA twin (edgevlm.kernels.quant_linear.CudaQuantLinear) of a CPU QuantLinear."""
    return importlib.import_module("edgevlm.kernels.quant_linear").CudaQuantLinear.from_quant(quant)


def kernel_target(device: str | Device, isa: str | None) -> str | None:
    """The ``isa`` value the loaders pass to every Linear: ``isa`` itself for the CPU, CUDA_TARGET
    for CUDA (after checking that CUDA is usable, so a load fails early and clearly)."""
    if parse_device(device) is Device.CPU:
        return isa
    if isa is not None:
        raise ValueError(f"isa={isa!r} picks a CPU kernel; with device='cuda' leave isa unset")
    require_cuda()
    return CUDA_TARGET
