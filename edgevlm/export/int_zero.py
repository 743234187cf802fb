"""Group params with integer zero points, for the Hugging Face checkpoint formats
(``edgevlm export --format compressed-tensors|gptq``, edgevlm/interop/hf_quantized.py).

Those formats dequantize w = s * (q - z) with an integer z; the ``.evlm`` stores w = s * q + min
with float16 s and min.  :func:`int_zero_params` picks (s, z) with min = -s * z exactly, so both
files hold the same weights bit for bit.  Pure numpy; ``quantize._params`` calls it.
"""

from __future__ import annotations

import numpy as np

_ADMISSIBLE: dict[int, np.ndarray] = {}


def _admissible_scales(z: int) -> np.ndarray:
    """Sorted float64 [M]: the non-negative finite float16 s whose product s * z is a finite
    float16 too (exactly).  Formats with integer zero points dequantize s * (q - z); the file
    stores min = -s * z in float16, so only these s make the two agree bit for bit.  For z <=
    15 the gaps between them stay below qmax / 1024 relative (s * z needs <= 11 significant
    bits, leaving >= 7 for s)."""
    if z not in _ADMISSIBLE:
        s = np.arange(0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)   # 0 .. 65504
        p = s * z                                                                    # exact in float64
        with np.errstate(over="ignore"):
            ok = np.isfinite(p.astype(np.float16)) & (p.astype(np.float16).astype(np.float64) == p)
        _ADMISSIBLE[z] = s[ok]
    return _ADMISSIBLE[z]


def int_zero_params(bits: int, mn: np.ndarray, mx: np.ndarray, zmin: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric group params with an integer zero point, as GPTQ / compressed-tensors store
    them: for groups of range [mn, mx] (float32 [...]) returns (scales float16 [...], mins
    float16 [...]) with mins == -scales * z *exactly* for an integer z in [zmin, 2^bits - 1]
    (GPTQ's v1 checkpoints cannot store z = 0: pass zmin = 1), so the file's s * q + min equals
    the target format's s * (q - z) bit for bit.

    The range is widened to include 0 (an integer zero point puts 0 on the grid).  Of the two
    zero points next to -lo / ((hi - lo) / qmax), the one whose smallest covering scale
    max(-lo / z, hi / (qmax - z)), rounded up to an admissible float16 (_admissible_scales),
    is smaller wins; the grid then covers [lo, hi], so plain rounding errs by at most scale / 2.
    An all-zero group gets scale 0, min 0."""
    qmax = (1 << bits) - 1
    if not (isinstance(zmin, int) and 0 <= zmin < qmax):
        raise ValueError(f"[int_zero_params] expected zmin an integer in [0, {qmax - 1}], got {zmin!r}")
    lo = np.minimum(np.asarray(mn, np.float64), 0.0)
    hi = np.maximum(np.asarray(mx, np.float64), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        z0 = np.where(hi > lo, -lo / ((hi - lo) / qmax), 0.0)
    best_s = np.full(lo.shape, np.inf)
    best_z = np.full(lo.shape, zmin, np.int64)
    for zc in (np.floor(z0), np.ceil(z0)):
        zc = np.clip(zc, zmin, qmax).astype(np.int64)
        with np.errstate(divide="ignore", invalid="ignore"):
            need = np.maximum(np.where(lo < 0, -lo / zc, 0.0), np.where(hi > 0, hi / (qmax - zc), 0.0))
        for z in np.unique(zc):
            sel = zc == z
            adm = _admissible_scales(int(z))
            i = np.searchsorted(adm, need[sel], side="left")
            s = np.where(i < adm.size, adm[np.minimum(i, adm.size - 1)], np.inf)
            better = s < best_s[sel]
            best_s[sel] = np.where(better, s, best_s[sel])
            best_z[sel] = np.where(better, z, best_z[sel])
    if not np.isfinite(best_s).all():
        raise ValueError(f"[int_zero_params] a group range does not fit {bits}-bit codes with float16 "
                         f"scale and min (|w| up to {float(np.max(np.abs([lo.min(), hi.max()]))):g})")
    scales = best_s.astype(np.float16)
    mins = (-(best_s * best_z)).astype(np.float16)              # exact by construction
    return scales, mins


__all__ = ["int_zero_params"]
