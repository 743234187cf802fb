"""``matmul``: Y = X @ dequant(W)^T on a packed weight, GEMV for one row and GEMM otherwise."""

from __future__ import annotations

import os

import torch

from .configs import INTERPRET_GEMM, INTERPRET_GEMV, GemmConfig, GemvConfig
from .dequant import dequantize as _dequantize
from .gemm import gemm
from .gemv import gemv
from .layout import PackedWeight

# Decided when triton.jit wrapped the kernels (at import): the interpreter runs them in numpy on
# CPU tensors, so the autotuner (which times launches) is replaced by the fixed INTERPRET_* configs.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def as_packed(w, qtype: str | None = None, n: int | None = None, k: int | None = None,
              group: int | None = None, device=None) -> PackedWeight:
    """A PackedWeight as is (the other arguments, where given, must match it), or a raw uint8 blob
    (numpy or torch) with its qtype, N, K and group, moved to ``device``."""
    if isinstance(w, PackedWeight):
        given = {"qtype": qtype, "n": n, "k": k, "group": group}
        bad = {a: v for a, v in given.items() if v is not None and v != getattr(w, a)}
        if bad:
            raise ValueError(f"[edgevlm.kernels] arguments {bad} contradict the PackedWeight "
                             f"({w.qtype} N={w.n} K={w.k} group={w.group})")
        return w
    if None in (qtype, n, k, group):
        raise ValueError("[edgevlm.kernels] a raw blob needs qtype, n, k and group")
    return PackedWeight.from_blob(w, qtype, n, k, group, device=device)


def matmul(x: torch.Tensor, w, qtype: str | None = None, n: int | None = None, k: int | None = None,
           group: int | None = None, *, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
           config: GemvConfig | GemmConfig | None = None) -> torch.Tensor:
    """x: [..., K] float16/bfloat16/float32 on the weight's device -> [..., N] in ``out_dtype``
    (default x.dtype). w: a PackedWeight, or a raw blob with qtype/n/k/group. bias: [N] or None.

    One row (M = 1) runs the split-K GEMV (float32 math throughout), more rows the tiled GEMM (dot
    inputs in x's dtype, float16 for float32 x; float32 accumulation). ``config`` fixes the launch
    (GemvConfig for M = 1, GemmConfig otherwise) instead of autotuning."""
    w = as_packed(w, qtype, n, k, group, device=x.device)
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOATS or x.shape[-1:] != (w.k,):
        raise ValueError(f"[matmul] expected x a float16/bfloat16/float32 tensor [..., {w.k}], got "
                         f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
    if x.device != w.blob.device:
        raise ValueError(f"[matmul] x is on {x.device} but the weight on {w.blob.device}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if bias is not None:
        bias = bias.to(device=x.device, dtype=torch.float32).contiguous()
        if bias.shape != (w.n,):
            raise ValueError(f"[matmul] expected bias [{w.n}], got {tuple(bias.shape)}")
    out = torch.empty((m, w.n), dtype=out_dtype or x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*lead, w.n)
    if m == 1:
        if config is not None and not isinstance(config, GemvConfig):
            raise ValueError(f"[matmul] one row runs the GEMV: expected a GemvConfig, got {config!r}")
        gemv(x2[0].contiguous(), w, bias, out[0], config or (INTERPRET_GEMV if INTERPRETED else None))
    else:
        if config is not None and not isinstance(config, GemmConfig):
            raise ValueError(f"[matmul] {m} rows run the GEMM: expected a GemmConfig, got {config!r}")
        gemm(x2, w, bias, out, config or (INTERPRET_GEMM if INTERPRETED else None))
    return out.reshape(*lead, w.n)


def dequantize(w, qtype: str | None = None, n: int | None = None, k: int | None = None,
               group: int | None = None, *, device=None) -> torch.Tensor:
    """float32 W[N, K], bit for bit ``edgevlm.qtypes.get(qtype).dequantize`` (see dequant.py)."""
    return _dequantize(as_packed(w, qtype, n, k, group, device=device))
