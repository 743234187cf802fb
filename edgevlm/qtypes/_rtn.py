"""Round-to-nearest quantization shared by the quant types, and the fp16 helpers it needs.

Mirrors ``csrc/qtypes/qtype.h`` (``asym_params``) and ``quantize_row`` in
``csrc/kernels/ref/linear_ref.cc`` operation for operation in float32, so numpy and C++
produce the same bits (tests/test_qtypes.py checks it). Asymmetric groups store
``min = fp16_floor(min w)`` and ``scale = fp16_ceil((max w - min) / qmax)``: the stored
pair covers the whole group, so the error of every element is at most ``scale / 2``.
"""

from __future__ import annotations

import numpy as np

FP16_MAX = 65504.0


def fp16_ceil(x: np.ndarray) -> np.ndarray:
    """Smallest float16 >= x (x float32, finite, |x| <= 65504)."""
    h = np.asarray(x, np.float32).astype(np.float16)
    low = h.astype(np.float32) < x
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    return h


def fp16_floor(x: np.ndarray) -> np.ndarray:
    """Largest float16 <= x (x float32, finite, |x| <= 65504)."""
    h = np.asarray(x, np.float32).astype(np.float16)
    high = h.astype(np.float32) > x
    h[high] = np.nextafter(h[high], np.float16(-np.inf))
    return h


def check_weights(w: np.ndarray, group: int, op: str) -> np.ndarray:
    """Validate a weight matrix for packing; returns it as C-contiguous float32 [N, K]."""
    if group not in (32, 64, 128):
        raise ValueError(f"[{op}] expected group size 32, 64 or 128, got {group}")
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"[{op}] expected a 2-D weight [N, K], got shape {w.shape}")
    if w.shape[1] == 0 or w.shape[1] % group:
        raise ValueError(f"[{op}] expected K (= {w.shape[1]}) to be a positive multiple of the group size {group}; "
                         "pad the in-features or choose a group that divides K")
    w = np.ascontiguousarray(w, dtype=np.float32)
    bad = ~(np.abs(w) <= FP16_MAX)
    if bad.any():
        idx = np.unravel_index(int(np.argmax(bad)), w.shape)
        raise ValueError(f"[{op}] expected finite weights with |w| <= {FP16_MAX} (fp16 scales), got {w[idx]} at {idx}")
    return w


def rtn_asym(w: np.ndarray, group: int, bits: int):
    """Asymmetric min-max RTN. w: float32 [N, K] ->
    codes uint8 [N, K] in [0, 2^bits-1], scales float16 [N, G], mins float16 [N, G]."""
    n, k = w.shape
    qmax = np.float32((1 << bits) - 1)
    wg = w.reshape(n, k // group, group)
    mins = fp16_floor(wg.min(axis=-1))
    fmin = mins.astype(np.float32)
    scales = fp16_ceil((wg.max(axis=-1) - fmin) / qmax)
    fs = scales.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.rint((wg - fmin[..., None]) / fs[..., None])
    r = np.where(fs[..., None] > 0, r, 0)
    codes = np.clip(r, 0, qmax).astype(np.uint8).reshape(n, k)
    return codes, scales, mins


def rtn_sym8(w: np.ndarray, group: int):
    """Symmetric absmax RTN to int8 [-127, 127]. w: float32 [N, K] ->
    codes int8 [N, K], scales float16 [N, G]."""
    n, k = w.shape
    wg = w.reshape(n, k // group, group)
    scales = fp16_ceil(np.abs(wg).max(axis=-1) / np.float32(127))
    fs = scales.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.rint(wg / fs[..., None])
    r = np.where(fs[..., None] > 0, r, 0)
    codes = np.clip(r, -127, 127).astype(np.int8).reshape(n, k)
    return codes, scales
