"""edgevlm.kernels: Triton dequant-matmul kernels for CUDA boards (Jetson Orin, desktop GPUs).

They read the same packed bytes as the CPU kernels (q2/q3/q4/q8 and q2b; layouts in
csrc/qtypes/*.h and edgevlm/qtypes/) and compute ``X @ dequant(W)^T`` in fp16/bf16/fp32:

    from edgevlm.kernels import PackedWeight, matmul, dequantize
    w = PackedWeight.from_blob(blob, "q4", n, k, group, device="cuda")   # upload once
    y = matmul(x, w)                  # x [..., K] -> [..., N]: split-K GEMV for 1 row, tiled GEMM else
    W = dequantize(w)                 # float32 [N, K], bit-exact with the numpy twin

Installed from the repository's ``kernels/`` folder into the edgevlm namespace (pyproject.toml
``wheel.packages``), never as a top-level ``kernels`` package. torch and triton load on first use
of an attribute, so ``import edgevlm.kernels`` itself is cheap (the CPU runtime never does it);
without them that first use raises ImportError with the fix.
Set TRITON_INTERPRET=1 before the first use to run the kernels on CPU tensors (tests).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "matmul": "api", "dequantize": "api", "as_packed": "api", "INTERPRETED": "api",
    "PackedWeight": "layout", "Geometry": "layout", "GEOMETRY": "layout", "QKind": "layout",
    "GemvConfig": "configs", "GemmConfig": "configs", "GEMV_CONFIGS": "configs", "GEMM_CONFIGS": "configs",
    "GEMV_FAST_CONFIGS": "configs",
}


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        m = importlib.import_module(f".{mod}", __name__)
    except ImportError as e:
        if e.name in ("torch", "triton") or str(e.name).startswith(("torch.", "triton.")):
            raise ImportError(f"edgevlm.kernels needs torch and triton ({e.name} is missing): "
                              f"pip install 'edgevlm[cuda]'") from e
        raise
    return getattr(m, name)


__all__ = sorted(_EXPORTS)
