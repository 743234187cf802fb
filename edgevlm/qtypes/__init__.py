"""Weight quant types, numpy reference: the Python mirror of ``csrc/qtypes/``.

A packed weight W[N, K] is one uint8 blob of three planes (see ``csrc/qtypes/qtype.h``)::

    [ qs     : N x row_bytes(K)   packed codes, layout per q2.py / q3.py / q4.py / q8.py ]
    [ scales : N x G  float16     G = K / group                                         ]
    [ mins   : N x G  float16     (q2/q3/q4 only)                                       ]

    q2/q3/q4 (asymmetric):  w = scale * q + min,  q in [0, 2^bits - 1]
    q8       (symmetric):   w = scale * q,        q in [-127, 127]

q2b (2-bit codes, bilevel scales: SPEED-Q) has its own planes and a group size fixed by the
type (16, recorded as the tensor's ``group_size``); see ``q2b.py``. Each type lists the group
sizes it accepts in ``QType.group_sizes``; ``GROUP_SIZES`` are those of q2/q3/q4/q8 (and the
exporter's ``--group`` choices).

``pack`` (round-to-nearest), ``pack_parts`` (codes from any quantizer, e.g. GPTQ),
``unpack`` and ``dequantize`` are the reference the C++ kernels are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import NamedTuple

import numpy as np

from . import _rtn, q2, q2b, q3, q4, q8

GROUP_SIZES = (32, 64, 128)


class Unpacked(NamedTuple):
    codes: np.ndarray   # [N, K] uint8 (q2/q3/q4) or int8 (q8)
    scales: np.ndarray  # [N, G] float16
    mins: np.ndarray | None  # [N, G] float16, None for q8


@dataclass(frozen=True)
class QType:
    """One weight quant type. ``impl`` is the module with pack_codes / unpack_codes."""

    name: str
    bits: int
    symmetric: bool
    impl: ModuleType
    group_sizes: tuple[int, ...] = GROUP_SIZES

    # ---- sizes -------------------------------------------------------------------------
    def row_bytes(self, k: int) -> int:
        return k * self.bits // 8

    def packed_size(self, n: int, k: int, group: int) -> int:
        self._check_shape(n, k, group, "packed_size")
        planes = 1 if self.symmetric else 2
        return n * self.row_bytes(k) + n * (k // group) * 2 * planes

    def bits_per_weight(self, group: int) -> float:
        """Effective storage cost per weight, codes plus fp16 scale (and min) per group."""
        return self.bits + (16 if self.symmetric else 32) / group

    # ---- quantize / pack -----------------------------------------------------------------
    def quantize(self, w: np.ndarray, group: int) -> Unpacked:
        """Round-to-nearest min-max (asymmetric) or absmax (q8) quantization of float W[N, K]."""
        w = _rtn.check_weights(w, group, f"{self.name}.quantize")
        if self.symmetric:
            codes, scales = _rtn.rtn_sym8(w, group)
            return Unpacked(codes, scales, None)
        return Unpacked(*_rtn.rtn_asym(w, group, self.bits))

    def pack(self, w: np.ndarray, group: int) -> np.ndarray:
        """RTN-quantize float W[N, K] and pack it: uint8 [packed_size(N, K, group)]."""
        return self.pack_parts(*self.quantize(w, group))

    def pack_parts(self, codes: np.ndarray, scales: np.ndarray, mins: np.ndarray | None) -> np.ndarray:
        """Pack codes [N, K] with float16 scales/mins [N, G] (from any quantizer) into a blob."""
        codes = np.asarray(codes)
        n, k = codes.shape
        scales = np.asarray(scales)
        if scales.ndim != 2 or scales.shape[0] != n or scales.shape[1] == 0 or k % scales.shape[1]:
            raise ValueError(f"[{self.name}.pack_parts] expected scales [N={n}, G] with G dividing K={k}, "
                             f"got {scales.shape}")
        group = k // scales.shape[1]
        self._check_shape(n, k, group, "pack_parts")
        if self.symmetric:
            if mins is not None:
                raise ValueError(f"[{self.name}.pack_parts] symmetric type takes mins=None")
            if codes.dtype != np.int8 or (codes == -128).any():
                raise ValueError(f"[{self.name}.pack_parts] expected int8 codes in [-127, 127]")
        else:
            qmax = (1 << self.bits) - 1
            if codes.dtype != np.uint8 or int(codes.max(initial=0)) > qmax:
                raise ValueError(f"[{self.name}.pack_parts] expected uint8 codes in [0, {qmax}], "
                                 f"got dtype {codes.dtype} max {codes.max(initial=0)}")
            if mins is None or np.shape(mins) != scales.shape:
                raise ValueError(f"[{self.name}.pack_parts] expected mins of shape {scales.shape}")
        planes = [self.impl.pack_codes(codes).reshape(-1), scales.astype("<f2").reshape(-1).view(np.uint8)]
        if not self.symmetric:
            planes.append(np.asarray(mins).astype("<f2").reshape(-1).view(np.uint8))
        return np.concatenate(planes)

    # ---- unpack / dequantize ---------------------------------------------------------------
    def unpack(self, blob: np.ndarray, n: int, k: int, group: int) -> Unpacked:
        """Split a blob into codes [N, K], scales [N, G] and mins [N, G] (views where possible)."""
        size = self.packed_size(n, k, group)
        blob = np.asarray(blob)
        if blob.dtype != np.uint8 or blob.ndim != 1 or blob.size != size:
            raise ValueError(f"[{self.name}.unpack] expected a 1-D uint8 blob of {size} bytes for N={n} K={k} "
                             f"group={group}, got dtype {blob.dtype} shape {blob.shape}")
        g = k // group
        qs_end = n * self.row_bytes(k)
        codes = self.impl.unpack_codes(blob[:qs_end].reshape(n, self.row_bytes(k)), k)
        scales = blob[qs_end:qs_end + 2 * n * g].view("<f2").reshape(n, g)
        mins = None if self.symmetric else blob[qs_end + 2 * n * g:].view("<f2").reshape(n, g)
        return Unpacked(codes, scales, mins)

    def dequantize(self, blob: np.ndarray, n: int, k: int, group: int) -> np.ndarray:
        """Packed blob -> float32 W[N, K], computed exactly as the C++ reference does."""
        codes, scales, mins = self.unpack(blob, n, k, group)
        s = np.repeat(scales.astype(np.float32), group, axis=1)
        w = s * codes.astype(np.float32)
        if mins is not None:
            w = w + np.repeat(mins.astype(np.float32), group, axis=1)
        return w

    def max_err(self, blob: np.ndarray, n: int, k: int, group: int) -> np.ndarray:
        """Per-element RTN error bound scale/2, float32 [N, K]."""
        scales = self.unpack(blob, n, k, group).scales.astype(np.float32)
        return np.repeat(scales / 2, group, axis=1)

    def _check_shape(self, n: int, k: int, group: int, op: str) -> None:
        if group not in self.group_sizes:
            raise ValueError(f"[{self.name}.{op}] expected group size one of {self.group_sizes}, got {group}")
        if n <= 0 or k <= 0 or k % group:
            raise ValueError(f"[{self.name}.{op}] expected N > 0 and K a positive multiple of {group}, "
                             f"got N={n} K={k}")


@dataclass(frozen=True)
class BilevelQType(QType):
    """q2b: 2-bit codes, 4-bit scale codes + 2-bit zeros per group of 16, fp32 level-2 scale and
    zero per (16-row block, group). ``group`` must be 16 (``group_sizes``); ``unpack`` returns
    ``q2b.Parts`` and ``pack_parts`` takes its five fields (see q2b.py)."""

    def packed_size(self, n: int, k: int, group: int) -> int:
        self._check_shape(n, k, group, "packed_size")
        return self.impl.packed_size(n, k)

    def bits_per_weight(self, group: int = 16, n: int = 16) -> float:
        """2 + 4/16 + 2/16 + 64/(16 * 16) = 2.625 for N % 16 == 0 (K % 64 == 0)."""
        return 8 * self.impl.packed_size(n, 64) / (n * 64)

    def quantize(self, w: np.ndarray, group: int = 16) -> q2b.Parts:
        """SPEED-Q's bilevel min-max quantizer (float32); see q2b.quantize."""
        w = np.asarray(w)
        if w.ndim == 2:
            self._check_shape(*w.shape, group, "quantize")
        return self.impl.quantize(w)

    def pack(self, w: np.ndarray, group: int = 16) -> np.ndarray:
        return self.pack_parts(*self.quantize(w, group))

    def pack_parts(self, codes, zeros, scale_codes=None, d=None, m=None) -> np.ndarray:  # type: ignore[override]
        return self.impl.pack_parts(codes, zeros, scale_codes, d, m)

    def unpack(self, blob: np.ndarray, n: int, k: int, group: int = 16) -> q2b.Parts:  # type: ignore[override]
        self._check_shape(n, k, group, "unpack")
        return self.impl.unpack(blob, n, k)

    def dequantize(self, blob: np.ndarray, n: int, k: int, group: int = 16) -> np.ndarray:
        self._check_shape(n, k, group, "dequantize")
        return self.impl.dequantize(blob, n, k)

    def max_err(self, blob: np.ndarray, n: int, k: int, group: int = 16) -> np.ndarray:
        """Per-element bound of the level-1 rounding, |S|/2 per group, float32 [N, K]. (Holds
        where the group's range fits the 4 codes: always unless level-2 rounding shrank S.)"""
        p = self.unpack(blob, n, k, group)
        S = np.abs(q2b.group_scales(p.scale_codes, p.d, p.m))
        return np.repeat(S / 2, 16, axis=1)

    def _check_shape(self, n: int, k: int, group: int, op: str) -> None:
        if group not in self.group_sizes:
            raise ValueError(f"[{self.name}.{op}] expected group size 16 (fixed by the q2b type), got {group}")
        if n <= 0 or k <= 0 or k % 32:
            raise ValueError(f"[{self.name}.{op}] expected N > 0 and K a positive multiple of 32, got N={n} K={k}")


REGISTRY: dict[str, QType] = {
    t.name: t
    for t in (
        QType("q2", 2, False, q2),
        QType("q3", 3, False, q3),
        QType("q4", 4, False, q4),
        QType("q8", 8, True, q8),
        BilevelQType("q2b", 2, False, q2b, group_sizes=(16,)),
    )
}


def get(name: str) -> QType:
    """The quant type called ``name`` (q2, q3, q4, q8, q2b)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown qtype {name!r}; expected one of {sorted(REGISTRY)}") from None


__all__ = ["GROUP_SIZES", "BilevelQType", "QType", "REGISTRY", "Unpacked", "get"]
