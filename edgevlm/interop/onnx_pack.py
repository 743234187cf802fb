"""edgevlm packed weights -> ONNX Runtime ``com.microsoft.MatMulNBits`` initializers.

MatMulNBits computes ``Y = A @ W^T`` for ``W[N, K]`` quantized in blocks of ``block`` along K
(the contrib-op spec; low bits first)::

    B            uint8 [N, n_blocks, block*bits/8]   code i of a block = bits [i*bits, (i+1)*bits)
    scales       float32 [N * n_blocks]
    zero_points  uint8 [N * ceil(n_blocks*bits/8)]   zp of block j = bits [j*bits, (j+1)*bits) of the row
    W[n, k]      = (code - zp) * scale

ORT 1.32's CPU kernel accepts bits 2, 4 and 8 (measured: 3, 5, 6, 7 are rejected at session
creation). Each edgevlm quant type maps onto it exactly: the MatMulNBits weight (plus the min term
below) equals ``edgevlm.qtypes`` dequantization bit for bit, checked through ORT itself in
tests/test_export_onnx.py::

    q8   int8 q, fp16 s:    bits 8, code = q + 128, zp = 128        (q + 128 - 128) * s = q * s
    q4   w = s*q + m:       bits 4, codes q, zp 0, + min term
    q3   w = s*q + m:       bits 4, codes q (0..7 in 4-bit slots)   widened: 1 more bit/weight, no error
    q2   w = s*q + m:       bits 2, codes q, zp 0, + min term
    q2b  w = S*(q - z):     bits 2, block 16, scale S = d*(c - m) (float32), zp z (2-bit integers)

q2/q3/q4 store a float16 *min* per group, not an integer zero point: m / s is rarely an integer, so
no uint8 zp reproduces them. The min is split off as a small dense product::

    Y = MatMulNBits(A; codes, s, zp = 0) + blocksum(A) @ mins_t      (PackedLinear.mins_t)

where blocksum sums A over each block of K ([.., n_blocks]) and mins_t = m^T [n_blocks, N]: 1/block
of the main product's multiply-adds, and ORT keeps its pre-packed integer-zp kernels.

Rejected: ORT's float zero points (``W = code*s + fl(-s*zp)``, 4-bit only on its CPU kernel). Not
exact: for some fp16 pairs (s, m) no float32 zp rounds ``-s*zp`` to m (consecutive zp move the
product by s*ulp(zp), which can exceed ulp(m); found in every RTN-quantized N(0,1) test matrix), and
a float zp turns off ORT's weight pre-packing, so B is dequantized on every run: measured 2.3x
slower than integer zp on a 197x768x768 product (5.0 vs 2.2 ms, one thread).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import qtypes

__all__ = ["IR_VERSION", "OPSET_CONTRIB", "OPSET_ONNX", "ORT_BITS", "NBitsWeights", "PackedLinear",
           "dequant_rows", "dequantize", "external_tensor", "from_qtype", "matmulnbits_node", "ort_bits", "pack_codes",
           "pack_zero_points", "unpack_bits"]

OPSET_CONTRIB = 1
OPSET_ONNX = 21   # Gelu (opset 20) and LayerNormalization (17) are standard ops at this opset
IR_VERSION = 10
#: MatMulNBits bit widths ORT 1.32's CPU kernel runs (benchmarks/_ort_matmulnbits.probe_bits)
ORT_BITS = (2, 4, 8)


@dataclass(frozen=True)
class NBitsWeights:
    """One MatMulNBits weight: B, scales and zero points for W[N, K] (the layout above)."""

    n: int
    k: int
    bits: int
    block: int
    b: np.ndarray       # uint8 [N, n_blocks, blob]
    scales: np.ndarray  # float32 [N * n_blocks]
    zp: np.ndarray      # uint8 [N * zp_row_bytes]

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.k / self.block)

    @property
    def nbytes(self) -> int:
        """Bytes the op reads for its weight: B + scales + zero points."""
        return self.b.nbytes + self.scales.nbytes + self.zp.nbytes


@dataclass(frozen=True)
class PackedLinear:
    """An edgevlm packed linear as MatMulNBits inputs, plus the min term of q2/q3/q4.

    mins_t: float32 [n_blocks, N] or None (q8, q2b): Y += blocksum(A) @ mins_t.
    """

    weights: NBitsWeights
    mins_t: np.ndarray | None
    qtype: str  # the source edgevlm qtype


def ort_bits(qtype: str) -> int:
    """The MatMulNBits width an edgevlm qtype is stored at (see the table above)."""
    qt = qtypes.get(qtype)
    return qt.bits if qt.bits in ORT_BITS else 4


# ------------------------------------------------------------------------------------ bit packing

def pack_codes(codes: np.ndarray, bits: int, block: int) -> np.ndarray:
    """codes uint8 [N, K] (< 2^bits), K % block == 0 -> B uint8 [N, K/block, block*bits/8], low bits first."""
    n, k = codes.shape
    if bits not in ORT_BITS or k % block or (block * bits) % 8:
        raise ValueError(f"[pack_codes] expected bits in {ORT_BITS} and K a multiple of the block, got bits={bits} "
                         f"K={k} block={block}")
    c = codes.astype(np.uint8).reshape(n, k // block, block)
    planes = (c[..., None] >> np.arange(bits, dtype=np.uint8)) & 1        # [N, nb, block, bits]
    return np.packbits(planes.reshape(n, k // block, block * bits), axis=-1, bitorder="little")


def pack_zero_points(zp: np.ndarray, bits: int) -> np.ndarray:
    """Integer zero points [N, n_blocks] (< 2^bits) -> uint8 [N * ceil(n_blocks*bits/8)], each row
    padded to whole bytes (the spec's per-row packing)."""
    n, nb = zp.shape
    planes = (zp.astype(np.uint8)[..., None] >> np.arange(bits, dtype=np.uint8)) & 1  # [N, nb, bits]
    flat = planes.reshape(n, nb * bits)
    flat = np.concatenate([flat, np.zeros((n, (-flat.shape[1]) % 8), np.uint8)], axis=1)
    return np.packbits(flat, axis=-1, bitorder="little").reshape(-1)


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Low-first bit stream along the last axis -> integer codes int32 [..., count]."""
    flat = np.unpackbits(packed, axis=-1, bitorder="little")[..., : count * bits]
    flat = flat.reshape(*packed.shape[:-1], count, bits).astype(np.int32)
    return (flat << np.arange(bits, dtype=np.int32)).sum(axis=-1)


def dequant_rows(w: NBitsWeights, rows: int | None = None) -> np.ndarray:
    """Float32 W[:rows, :K] = (code - zp) * scale, the spec's dequantisation (all rows by default)."""
    rows = w.n if rows is None else rows
    nb = w.n_blocks
    codes = unpack_bits(w.b[:rows], w.bits, w.block)                        # [rows, nb, block]
    zps = unpack_bits(w.zp.reshape(w.n, -1)[:rows], w.bits, nb)              # [rows, nb]
    sc = w.scales.reshape(w.n, nb)[:rows]
    deq = (codes - zps[:, :, None]).astype(np.float32) * sc[:, :, None]
    return deq.reshape(rows, nb * w.block)[:, : w.k]


# ---------------------------------------------------------------------------- edgevlm qtypes

def from_qtype(blob: np.ndarray, qtype: str, n: int, k: int, group: int) -> PackedLinear:
    """An edgevlm packed W[N, K] (``blob`` uint8 as stored in the .evlm) -> MatMulNBits inputs."""
    qt = qtypes.get(qtype)
    if qtype == "q2b":
        p = qt.unpack(blob, n, k, group)
        s = qtypes.q2b.group_scales(p.scale_codes, p.d, p.m)                  # [N, G] float32
        w = NBitsWeights(n, k, 2, 16, pack_codes(p.codes, 2, 16), np.ascontiguousarray(s.reshape(-1), np.float32),
                         pack_zero_points(p.zeros, 2))
        return PackedLinear(w, None, qtype)
    codes, scales, mins = qt.unpack(blob, n, k, group)
    g = k // group
    sc = np.ascontiguousarray(scales.reshape(-1), np.float32)                # fp16 -> fp32: exact
    if qt.symmetric:  # q8: int8 codes in [-127, 127]
        u = (codes.astype(np.int16) + 128).astype(np.uint8)
        return PackedLinear(NBitsWeights(n, k, 8, group, pack_codes(u, 8, group), sc, np.full(n * g, 128, np.uint8)),
                            None, qtype)
    bits = ort_bits(qtype)
    w = NBitsWeights(n, k, bits, group, pack_codes(codes, bits, group), sc,
                     pack_zero_points(np.zeros((n, g), np.uint8), bits))
    return PackedLinear(w, np.ascontiguousarray(mins.astype(np.float32).T), qtype)


def dequantize(p: PackedLinear) -> np.ndarray:
    """Float32 W[N, K] the ONNX graph multiplies by: MatMulNBits' weight plus the min term."""
    w = dequant_rows(p.weights)
    if p.mins_t is not None:
        w = w + np.repeat(p.mins_t.T, p.weights.block, axis=1)
    return w


# ----------------------------------------------------------------------------------- graph pieces

def external_tensor(name: str, arr: np.ndarray, dtype: int):
    """TensorProto marked EXTERNAL: its bytes come from SessionOptions.add_external_initializers."""
    from onnx import TensorProto

    t = TensorProto(name=name, data_type=dtype, dims=arr.shape, data_location=TensorProto.EXTERNAL)
    for key, val in (("location", "in-memory"), ("offset", "0"), ("length", str(arr.nbytes))):
        t.external_data.add(key=key, value=val)
    return t


def matmulnbits_node(a: str, w: NBitsWeights, names: tuple[str, str, str], out: str, *,
                     accuracy_level: int, name: str | None = None):
    """``out = MatMulNBits(a, B, scales, zero_points)``; names = (B, scales, zero_points).

    accuracy_level 0: float32 activations; 4: activations quantized to int8 per block (ORT's fast
    CPU path, like edgevlm's SIMD kernels)."""
    from onnx import helper

    return helper.make_node("MatMulNBits", [a, *names], [out], domain="com.microsoft", name=name or out,
                            K=w.k, N=w.n, bits=w.bits, block_size=w.block, accuracy_level=accuracy_level)
