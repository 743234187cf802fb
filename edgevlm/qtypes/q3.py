"""3-bit asymmetric codes: the numpy twin of ``csrc/qtypes/q3.h``.

Each code is split into its low 2 bits and its high bit. A row of K codes is cut into
units of 128 codes (48 bytes); the last unit may hold U = 32, 64 or 96 codes (3U/8 bytes).
In a unit of U codes, with S = U/4 and H = U/8::

    bytes [0, S)      low planes: the q2 layout of (q & 3)
    bytes [S, S + H)  high plane: bit i of byte j = q[j + i*H] >> 2      (i = 0..7)

The low planes unpack like q2; the high bits of codes 32c..32c+31 of a full unit are
bits (2c, 2c+1) of its 16 high bytes (broadcast to both AVX2 lanes, shift, and 1).
"""

from __future__ import annotations

import numpy as np

from . import q2

BITS = 3
UNIT = 128


def _pack_units(q: np.ndarray, unit: int) -> np.ndarray:
    n, k = q.shape
    nu = k // unit
    lo = q2._pack_units(q & 3, unit).reshape(n, nu, unit // 4)
    h = (q >> 2).reshape(n, nu, 8, unit // 8).astype(np.uint8)
    hi = np.zeros((n, nu, unit // 8), np.uint8)
    for i in range(8):
        hi |= h[:, :, i] << i
    return np.concatenate([lo, hi], axis=2).reshape(n, nu * unit * 3 // 8)


def _unpack_units(qs: np.ndarray, unit: int) -> np.ndarray:
    n, nb = qs.shape
    ub = unit * 3 // 8
    nu = nb // ub
    b = qs.reshape(n, nu, ub)
    lo = q2._unpack_units(np.ascontiguousarray(b[:, :, : unit // 4]).reshape(n, -1), unit).reshape(n, nu, unit)
    hb = b[:, :, unit // 4:].reshape(n, nu, 1, unit // 8)
    hi = np.concatenate([(hb >> i) & 1 for i in range(8)], axis=2).reshape(n, nu, unit)
    return (lo | (hi << 2)).reshape(n, nu * unit)


def pack_codes(q: np.ndarray) -> np.ndarray:
    """q: uint8 [N, K] codes in [0, 7] -> uint8 [N, 3K/8]."""
    k = q.shape[1]
    full = k - k % UNIT
    parts = [_pack_units(q[:, :full], UNIT)]
    if k % UNIT:
        parts.append(_pack_units(q[:, full:], k % UNIT))
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.uint8)


def unpack_codes(qs: np.ndarray, k: int) -> np.ndarray:
    """qs: uint8 [N, 3K/8] -> codes uint8 [N, K]."""
    full = k - k % UNIT
    parts = [_unpack_units(qs[:, : full * 3 // 8], UNIT)]
    if k % UNIT:
        parts.append(_unpack_units(qs[:, full * 3 // 8:], k % UNIT))
    return np.concatenate(parts, axis=1).astype(np.uint8)
