"""2-bit codes with bilevel scales (SPEED-Q's "int2-bilevel"): the numpy twin of
``csrc/qtypes/q2b.h``, which holds the full layout diagram.

Weights W[N, K] (K % 32 == 0), G = K/16 groups of 16 per row, NB = ceil(N/16) row blocks:

* per (row n, group j): 2-bit codes q, a 2-bit integer zero z, a 4-bit scale code c;
* per (row block b = n // 16, group j): float32 level-2 scale d and level-2 zero m.

SPEED-Q quantizes the level-1 scales in runs of 16 consecutive scales of its regrouped
(group-major, then output row) order, i.e. 16 *rows* at one column group, hence the row
blocks. Dequantization, in float32 and in this order (no fused multiply-add)::

    S[n, j] = d[n // 16, j] * (float(c[n, j]) - m[n // 16, j])
    w[n, k] = S[n, j] * float(q[n, k] - z[n, j])                 j = k // 16

Blob planes: ``qs`` (N x K/4, the q2 code layout) | ``d`` (NB x G f32) | ``m`` (NB x G f32)
| ``sc4`` (N x G/2: c[2i] | c[2i+1] << 4) | ``zp2`` (N x ceil(G/4): 4 zeros per byte, low
bits first). 2.625 bits per weight when N % 16 == 0 and K % 64 == 0.

Mapping SPEED-Q onto it (``from_speedq``): its ``quantize`` codes are q, its rounded
zero-points (``round_zero=True``, 2-bit) are z, ``quant_scale`` is c, and the second-level
quantizer's ``scale`` / ``zero`` are d / m. With those values the formula above is SPEED-Q's
``scale2 * (c - zero2)`` then ``scale * (q - zero)`` evaluated in float32, so a file
dequantizes bit for bit to SPEED-Q's fake-quant weights computed in float32 (run SPEED-Q's
quantizer on float32 weights for that; its bf16 training run rounds each of the three
operations to bf16 instead, which this type does not reproduce: the file's values are then
within bf16 rounding, relative 2^-8 per operation, of the bf16 fake-quant weights).
``quantize`` below *is* SPEED-Q's min-max quantizer at both levels in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import q2

BITS = 2
GROUP = 16      # level-1 group (SPEED-Q g16); fixed by the type
ROW_BLOCK = 16  # rows per level-2 group (SPEED-Q qq_group_size 16)
QMAX = 3
CMAX = 15
pack_codes = q2.pack_codes
unpack_codes = q2.unpack_codes


class Parts(NamedTuple):
    codes: np.ndarray        # [N, K] uint8 in [0, 3]
    zeros: np.ndarray        # [N, G] uint8 in [0, 3]
    scale_codes: np.ndarray  # [N, G] uint8 in [0, 15]
    d: np.ndarray            # [NB, G] float32 level-2 scales
    m: np.ndarray            # [NB, G] float32 level-2 zeros


def row_blocks(n: int) -> int:
    return (n + ROW_BLOCK - 1) // ROW_BLOCK


def plane_bytes(n: int, k: int) -> tuple[int, int, int, int, int]:
    """Sizes of the planes qs, d, m, sc4, zp2 in bytes."""
    g = k // GROUP
    nbg = row_blocks(n) * g
    return n * k // 4, 4 * nbg, 4 * nbg, n * (g // 2), n * ((g + 3) // 4)


def packed_size(n: int, k: int) -> int:
    return sum(plane_bytes(n, k))


def check_shape(n: int, k: int, op: str) -> None:
    if n <= 0 or k <= 0 or k % 32:
        raise ValueError(f"[q2b.{op}] expected N > 0 and K a positive multiple of 32 (q2b groups of 16 pair "
                         f"up into the q2 code stream's 32-code granules), got N={n} K={k}")


def _block_rows(n: int) -> np.ndarray:
    """Row index -> row block, [N]."""
    return np.arange(n) // ROW_BLOCK


def group_scales(scale_codes: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """S[n, j] = d[b, j] * (c[n, j] - m[b, j]) in float32, [N, G]."""
    b = _block_rows(scale_codes.shape[0])
    return d[b] * (scale_codes.astype(np.float32) - m[b])


def _minmax_params(x: np.ndarray, qmax: int):
    """SPEED-Q's asymmetric min-max over the last axis, float32: (scale, -min/scale).
    Equal min and max are replaced by -1 / +1; the scale is clamped to >= 1e-5."""
    lo = x.min(axis=-1)
    hi = x.max(axis=-1)
    same = lo == hi
    lo = np.where(same, np.float32(-1), lo).astype(np.float32)
    hi = np.where(same, np.float32(1), hi).astype(np.float32)
    s = np.maximum((hi - lo) / np.float32(qmax), np.float32(1e-5)).astype(np.float32)
    return s, (-lo / s).astype(np.float32)


def quantize(w: np.ndarray) -> Parts:
    """SPEED-Q's bilevel min-max quantizer (float32, operation for operation as
    ``quantize_q2b`` in q2b.h): w float32 [N, K] -> Parts."""
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"[q2b.quantize] expected a 2-D weight [N, K], got shape {w.shape}")
    n, k = w.shape
    check_shape(n, k, "quantize")
    w = np.ascontiguousarray(w, dtype=np.float32)
    if not np.isfinite(w).all():
        idx = np.unravel_index(int(np.argmax(~np.isfinite(w))), w.shape)
        raise ValueError(f"[q2b.quantize] expected finite weights, got {w[idx]} at {idx}")
    g = k // GROUP
    wg = w.reshape(n, g, GROUP)
    # level 1, per (row, group)
    s1, zr = _minmax_params(wg, QMAX)
    zeros = np.clip(np.rint(zr), 0, QMAX).astype(np.uint8)
    # level 2, per (row block, group) over the block's rows (the last block may be short)
    nb = row_blocks(n)
    d = np.empty((nb, g), np.float32)
    m = np.empty((nb, g), np.float32)
    for b in range(nb):
        blk = s1[b * ROW_BLOCK:(b + 1) * ROW_BLOCK].T  # [G, rows]
        d[b], m[b] = _minmax_params(blk, CMAX)
    rb = _block_rows(n)
    div2 = np.maximum(d, np.float32(1e-9))[rb]
    c = np.clip(np.rint(s1 / div2 + m[rb]), 0, CMAX).astype(np.uint8)
    S = d[rb] * (c.astype(np.float32) - m[rb])
    div = np.maximum(S, np.float32(1e-9))[..., None]
    q = np.clip(np.rint(wg / div + zeros[..., None].astype(np.float32)), 0, QMAX).astype(np.uint8)
    return Parts(q.reshape(n, k), zeros, c, d, m)


def pack_parts(codes, zeros, scale_codes, d, m) -> np.ndarray:
    """Parts (from any quantizer, e.g. SPEED-Q via from_speedq) -> blob uint8 [packed_size]."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"[q2b.pack_parts] expected codes [N, K], got shape {codes.shape}")
    n, k = codes.shape
    check_shape(n, k, "pack_parts")
    g, nb = k // GROUP, row_blocks(n)
    want = {"zeros": ((n, g), QMAX), "scale_codes": ((n, g), CMAX), "codes": ((n, k), QMAX)}
    for name, arr in (("codes", codes), ("zeros", zeros), ("scale_codes", scale_codes)):
        arr = np.asarray(arr)
        shape, top = want[name]
        if arr.shape != shape or arr.dtype != np.uint8 or int(arr.max(initial=0)) > top:
            raise ValueError(f"[q2b.pack_parts] expected {name} uint8 {shape} in [0, {top}], got dtype {arr.dtype} "
                             f"shape {arr.shape} max {arr.max(initial=0) if arr.size else None}")
    for name, arr in (("d", d), ("m", m)):
        if np.shape(arr) != (nb, g):
            raise ValueError(f"[q2b.pack_parts] expected {name} of shape (NB={nb}, G={g}), got {np.shape(arr)}")
    z = np.asarray(zeros)
    zpad = np.zeros((n, ((g + 3) // 4) * 4), np.uint8)
    zpad[:, :g] = z
    zq = zpad.reshape(n, -1, 4)
    zp2 = zq[..., 0] | (zq[..., 1] << 2) | (zq[..., 2] << 4) | (zq[..., 3] << 6)
    c = np.asarray(scale_codes).reshape(n, g // 2, 2)
    sc4 = c[..., 0] | (c[..., 1] << 4)
    return np.concatenate([
        pack_codes(codes).reshape(-1),
        np.asarray(d, np.float32).astype("<f4").reshape(-1).view(np.uint8),
        np.asarray(m, np.float32).astype("<f4").reshape(-1).view(np.uint8),
        sc4.astype(np.uint8).reshape(-1),
        zp2.astype(np.uint8).reshape(-1),
    ])


def unpack(blob: np.ndarray, n: int, k: int) -> Parts:
    check_shape(n, k, "unpack")
    size = packed_size(n, k)
    blob = np.asarray(blob)
    if blob.dtype != np.uint8 or blob.ndim != 1 or blob.size != size:
        raise ValueError(f"[q2b.unpack] expected a 1-D uint8 blob of {size} bytes for N={n} K={k}, "
                         f"got dtype {blob.dtype} shape {blob.shape}")
    g, nb = k // GROUP, row_blocks(n)
    o = np.cumsum((0,) + plane_bytes(n, k))
    codes = unpack_codes(blob[o[0]:o[1]].reshape(n, k // 4), k)
    d = blob[o[1]:o[2]].view("<f4").reshape(nb, g).astype(np.float32)
    m = blob[o[2]:o[3]].view("<f4").reshape(nb, g).astype(np.float32)
    sc4 = blob[o[3]:o[4]].reshape(n, g // 2)
    c = np.stack([sc4 & 15, sc4 >> 4], axis=-1).reshape(n, g).astype(np.uint8)
    zp2 = blob[o[4]:o[5]].reshape(n, -1)
    z = np.stack([(zp2 >> (2 * i)) & 3 for i in range(4)], axis=-1).reshape(n, -1)[:, :g].astype(np.uint8)
    return Parts(codes, z, c, d, m)


def dequantize_parts(p: Parts) -> np.ndarray:
    """float32 [N, K], the spec above (== dequant_rows_q2b in C++ bit for bit)."""
    n, k = p.codes.shape
    S = group_scales(p.scale_codes, p.d, p.m)
    qz = p.codes.reshape(n, k // GROUP, GROUP).astype(np.int32) - p.zeros[..., None].astype(np.int32)
    return (S[..., None] * qz.astype(np.float32)).reshape(n, k)


def dequantize(blob: np.ndarray, n: int, k: int) -> np.ndarray:
    return dequantize_parts(unpack(blob, n, k))


def from_speedq(quant_weights, quant_scale, zeros, qq_scale, qq_zero, n: int, k: int) -> Parts:
    """SPEED-Q's INT pack of one linear (``save_fake_quant.py``: ``quant_weights``,
    ``quant_layer_scale``, ``quant_layer_zeros``, ``quant_layer_scale_qq_scale``,
    ``quant_layer_scale_qq_zero``) -> Parts. Requires N % 16 == 0 (SPEED-Q's level-2 runs
    of 16 scales then never straddle two column groups).

    quant_weights: N*K codes in natural [out, in] order; quant_scale / zeros: N*G values in
    SPEED-Q's regrouped order (index j*N + n for column group j, row n); qq_scale / qq_zero:
    N*G/16 values, index j*(N/16) + b for row block b. Any array-likes (numpy or torch.cpu()
    .numpy()); scales are taken as float32 (exact for SPEED-Q's bf16 / fp32 tensors).
    """
    if n % ROW_BLOCK:
        raise ValueError(f"[q2b.from_speedq] expected N % 16 == 0 (SPEED-Q level-2 runs of 16), got N={n}")
    check_shape(n, k, "from_speedq")
    g, nb = k // GROUP, n // ROW_BLOCK
    q = np.asarray(quant_weights).reshape(n, k)
    c = np.asarray(quant_scale).reshape(g, n).T
    z = np.asarray(zeros).reshape(g, n).T
    d = np.asarray(qq_scale, dtype=np.float32).reshape(g, nb).T
    m = np.asarray(qq_zero, dtype=np.float32).reshape(g, nb).T
    def u8(a, top, name):
        a = np.asarray(a)
        if np.any(a != np.round(a)) or a.min(initial=0) < 0 or a.max(initial=0) > top:
            raise ValueError(f"[q2b.from_speedq] expected integer {name} in [0, {top}]")
        return np.ascontiguousarray(a.astype(np.uint8))
    return Parts(u8(q, QMAX, "codes"), u8(z, QMAX, "zeros"), u8(c, CMAX, "scale codes"),
                 np.ascontiguousarray(d), np.ascontiguousarray(m))
