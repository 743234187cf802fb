"""8-bit symmetric codes: the numpy twin of ``csrc/qtypes/q8.h``.

Codes are int8 in [-127, 127], one per byte in natural order (-128 is never produced, so
|q|*|x| pair sums fit int16 in the SIMD kernels). Per group one fp16 scale, no min::

    byte j [ q[j] as int8 ]     j = 0 .. K-1
"""

from __future__ import annotations

import numpy as np

BITS = 8
UNIT = 32


def pack_codes(q: np.ndarray) -> np.ndarray:
    """q: int8 [N, K] -> uint8 [N, K] (the same bytes)."""
    return np.ascontiguousarray(q, dtype=np.int8).view(np.uint8)


def unpack_codes(qs: np.ndarray, k: int) -> np.ndarray:
    """qs: uint8 [N, K] -> codes int8 [N, K]."""
    return np.ascontiguousarray(qs[:, :k]).view(np.int8)
