"""4-bit asymmetric codes: the numpy twin of ``csrc/qtypes/q4.h``.

A row of K codes is cut into units of 64 codes (32 bytes); when K % 64 == 32 the last
unit holds 32 codes (16 bytes). In a unit of U codes, byte j holds two codes::

           bit 7 ... 4        bit 3 ... 0
    byte j [ q[j + U/2] ]     [ q[j] ]          j = 0 .. U/2-1

One 32-byte AVX2 load yields codes 0..31 as ``v & 0xF`` and 32..63 as ``v >> 4`` in
natural order (no shuffles, activations used as they are).
"""

from __future__ import annotations

import numpy as np

BITS = 4
UNIT = 64


def pack_codes(q: np.ndarray) -> np.ndarray:
    """q: uint8 [N, K] codes in [0, 15] -> uint8 [N, K/2]."""
    n, k = q.shape
    full = k - k % UNIT
    u = q[:, :full].reshape(n, full // UNIT, 2, UNIT // 2)
    parts = [(u[:, :, 0] | (u[:, :, 1] << 4)).reshape(n, full // 2)]
    if k % UNIT:  # 32-code tail unit
        t = q[:, full:].reshape(n, 2, 16)
        parts.append(t[:, 0] | (t[:, 1] << 4))
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.uint8)


def unpack_codes(qs: np.ndarray, k: int) -> np.ndarray:
    """qs: uint8 [N, K/2] -> codes uint8 [N, K]."""
    n = qs.shape[0]
    full = k - k % UNIT
    b = qs[:, : full // 2].reshape(n, full // UNIT, 1, UNIT // 2)
    parts = [np.concatenate([b & 0xF, b >> 4], axis=2).reshape(n, full)]
    if k % UNIT:
        t = qs[:, full // 2:]
        parts.append(np.concatenate([t & 0xF, t >> 4], axis=1))
    return np.concatenate(parts, axis=1).astype(np.uint8)
