"""Host side of the Triton kernels: which bytes of a packed blob are which plane.

A packed weight W[N, K] is the same uint8 blob the CPU runtime reads (edgevlm/qtypes/__init__.py,
csrc/qtypes/qtype.h). ``PackedWeight`` uploads it once and keeps typed, zero-copy views of its
planes for the kernels; ``Geometry`` holds the per-type constants the kernels take as
``tl.constexpr`` (so one kernel body serves every type, each specialisation compiled apart).

Imports torch (never triton) and the numpy twins; it does not launch anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch

from edgevlm import qtypes


class QKind(IntEnum):
    """Type codes, the same numbers as ``enum class QType`` in csrc/qtypes/qtype.h."""

    Q2 = 0
    Q3 = 1
    Q4 = 2
    Q8 = 3
    Q2B = 4


@dataclass(frozen=True)
class Geometry:
    """How a type's code stream is cut (see the diagrams in csrc/qtypes/q*.h).

    unit:       codes per full unit (q4 64, q8 32, q2/q3/q2b 128); a row may end in a shorter
                tail unit (q4: 32 codes; q2/q3/q2b: 32, 64 or 96), read by the kernels' tail path
    unit_bytes: bytes per full unit (q3: 32 low-plane bytes + 16 high-bit bytes)
    planes:     code planes per byte (q4 2 nibbles, q2 4 crumbs, q8 1); plane p of a full unit
                holds codes [32p, 32p + 32) of that unit, so every 16-byte chunk of a plane is
                16 consecutive codes of one group
    """

    kind: QKind
    unit: int
    unit_bytes: int
    planes: int


GEOMETRY = {
    "q2": Geometry(QKind.Q2, 128, 32, 4),
    "q3": Geometry(QKind.Q3, 128, 48, 4),
    "q4": Geometry(QKind.Q4, 64, 32, 2),
    "q8": Geometry(QKind.Q8, 32, 32, 1),
    "q2b": Geometry(QKind.Q2B, 128, 32, 4),
}

# Byte offsets inside one blob are int32 in the kernels (cheaper address arithmetic).
MAX_BLOB_BYTES = 2**31 - 1


@dataclass(frozen=True)
class PackedWeight:
    """A packed W[N, K] on a torch device, split into typed views of its planes (no copies).

    qs: uint8 [N * row_bytes]     codes
    sc: float16 [N * G]           scales (q2/q3/q4/q8); q2b: float32 [NB * G] level-2 scales d
    mn: float16 [N * G]           mins (q2/q3/q4); q2b: float32 [NB * G] level-2 zeros m; q8: = sc
    c:  uint8 [N * G/2]           q2b 4-bit scale codes; other types: = qs (unused)
    z:  uint8 [N * ceil(G/4)]     q2b 2-bit zeros; other types: = qs (unused)
    """

    qtype: str
    n: int
    k: int
    group: int
    blob: torch.Tensor
    qs: torch.Tensor
    sc: torch.Tensor
    mn: torch.Tensor
    c: torch.Tensor
    z: torch.Tensor

    @classmethod
    def from_blob(cls, blob, qtype: str, n: int, k: int, group: int, device=None) -> PackedWeight:
        """blob: uint8 [qtypes.get(qtype).packed_size(n, k, group)], numpy or torch. It is copied to
        ``device`` once (no copy when it is already a torch tensor there)."""
        qt = qtypes.get(qtype)
        if qtype not in GEOMETRY:
            raise ValueError(f"[edgevlm.kernels] expected qtype one of {sorted(GEOMETRY)}, got {qtype!r}")
        n, k, group = int(n), int(k), int(group)
        size = qt.packed_size(n, k, group)  # validates group and K (ValueError with the rule)
        if size > MAX_BLOB_BYTES:
            raise ValueError(f"[edgevlm.kernels] a packed weight of {size} bytes exceeds the kernels' int32 "
                             f"offsets ({MAX_BLOB_BYTES}); split the matrix along N")
        if isinstance(blob, np.ndarray):
            if blob.dtype != np.uint8 or blob.ndim != 1:
                raise ValueError(f"[edgevlm.kernels] expected a 1-D uint8 blob, got {blob.dtype} {blob.shape}")
            blob = torch.from_numpy(np.ascontiguousarray(blob))
        if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8 or blob.dim() != 1:
            raise ValueError(f"[edgevlm.kernels] expected a 1-D uint8 blob (numpy or torch), got {type(blob)}")
        if blob.numel() != size:
            raise ValueError(f"[edgevlm.kernels] expected {size} bytes for {qtype} N={n} K={k} group={group}, "
                             f"got {blob.numel()}")
        blob = blob.to(device if device is not None else blob.device).contiguous()
        rb = qt.row_bytes(k)
        g = k // group
        o = n * rb
        qs = blob[:o]
        if qtype == "q2b":
            nbg = ((n + 15) // 16) * g
            sc = blob[o:o + 4 * nbg].view(torch.float32)
            mn = blob[o + 4 * nbg:o + 8 * nbg].view(torch.float32)
            o += 8 * nbg
            c = blob[o:o + n * (g // 2)]
            z = blob[o + n * (g // 2):]
        else:
            sc = blob[o:o + 2 * n * g].view(torch.float16)
            mn = sc if qt.symmetric else blob[o + 2 * n * g:].view(torch.float16)
            c = z = qs
        return cls(qtype, n, k, group, blob, qs, sc, mn, c, z)

    # ---- the scalars every kernel takes ----------------------------------------------------
    @property
    def geometry(self) -> Geometry:
        return GEOMETRY[self.qtype]

    @property
    def row_bytes(self) -> int:
        return qtypes.get(self.qtype).row_bytes(self.k)

    @property
    def groups(self) -> int:
        """G: groups per row (K / group)."""
        return self.k // self.group

    @property
    def k_full(self) -> int:
        """KF: codes covered by full units; [KF, K) is the tail unit."""
        return self.k - self.k % self.geometry.unit

    @property
    def k_full_bytes(self) -> int:
        """Byte offset of the tail unit inside a row."""
        return self.k_full // self.geometry.unit * self.geometry.unit_bytes

    @property
    def zero_row_bytes(self) -> int:
        """q2b: bytes per row of the 2-bit zeros plane (ceil(G/4)); 0 for other types."""
        return (self.groups + 3) // 4 if self.qtype == "q2b" else 0

    @property
    def nbytes(self) -> int:
        return self.blob.numel()

    def kernel_args(self) -> tuple:
        """(qs, sc, mn, c, z, N, K, KF, KFB, G, RB, ZB) in the kernels' argument order."""
        return (self.qs, self.sc, self.mn, self.c, self.z, self.n, self.k, self.k_full, self.k_full_bytes,
                self.groups, self.row_bytes, self.zero_row_bytes)

    def kernel_constexprs(self) -> dict:
        g = self.geometry
        return dict(QT=int(g.kind), UNIT=g.unit, UB=g.unit_bytes, P=g.planes, GROUP=self.group,
                    HAS_TAIL=self.k_full != self.k)
