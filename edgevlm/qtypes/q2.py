"""2-bit asymmetric codes: the numpy twin of ``csrc/qtypes/q2.h``.

A row of K codes is cut into units of 128 codes (32 bytes); the last unit may hold
U = 32, 64 or 96 codes (U/4 bytes). In a unit of U codes with S = U/4, byte j holds::

           bits 7-6        5-4            3-2          1-0
    byte j [ q[j + 3S] ] [ q[j + 2S] ]  [ q[j + S] ] [ q[j] ]        j = 0 .. S-1

One 32-byte AVX2 load + four (shift, and 3) yields codes 0..31, 32..63, 64..95, 96..127
in natural order.
"""

from __future__ import annotations

import numpy as np

BITS = 2
UNIT = 128


def _pack_units(q: np.ndarray, unit: int) -> np.ndarray:
    """q: [N, n_units * unit] -> [N, n_units * unit/4], layout above with U = unit."""
    n, k = q.shape
    u = q.reshape(n, k // unit, 4, unit // 4).astype(np.uint8)
    b = u[:, :, 0] | (u[:, :, 1] << 2) | (u[:, :, 2] << 4) | (u[:, :, 3] << 6)
    return b.reshape(n, k // 4)


def _unpack_units(qs: np.ndarray, unit: int) -> np.ndarray:
    n, nb = qs.shape
    b = qs.reshape(n, nb // (unit // 4), 1, unit // 4)
    return np.concatenate([(b >> (2 * i)) & 3 for i in range(4)], axis=2).reshape(n, nb * 4)


def pack_codes(q: np.ndarray) -> np.ndarray:
    """q: uint8 [N, K] codes in [0, 3] -> uint8 [N, K/4]."""
    k = q.shape[1]
    full = k - k % UNIT
    parts = [_pack_units(q[:, :full], UNIT)]
    if k % UNIT:
        parts.append(_pack_units(q[:, full:], k % UNIT))
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.uint8)


def unpack_codes(qs: np.ndarray, k: int) -> np.ndarray:
    """qs: uint8 [N, K/4] -> codes uint8 [N, K]."""
    full = k - k % UNIT
    parts = [_unpack_units(qs[:, : full // 4], UNIT)]
    if k % UNIT:
        parts.append(_unpack_units(qs[:, full // 4:], k % UNIT))
    return np.concatenate(parts, axis=1).astype(np.uint8)
