"""Quant types: exact pack/unpack round trips, the RTN error bound, numpy == C++ bit for
bit, sizes and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import weights
from edgevlm import _core, qtypes

QTYPES = ["q2", "q3", "q4", "q8"]
# K values that stress every tail: 32-code units (q4 tail), 96/160/224 (q2/q3 tails of
# 96/32/96 codes) and several full units.
KS = [32, 64, 96, 128, 160, 224, 384, 4096]


def _cases():
    for name in QTYPES:
        for g in qtypes.GROUP_SIZES:
            for k in KS:
                if k % g == 0:
                    yield name, g, k


@pytest.mark.parametrize("name", QTYPES)
@pytest.mark.parametrize("k", KS)
def test_codes_round_trip_exact(rng, name, k):
    t = qtypes.get(name)
    if t.symmetric:
        codes = rng.integers(-127, 128, size=(5, k), dtype=np.int8)
    else:
        codes = rng.integers(0, 1 << t.bits, size=(5, k), dtype=np.uint8)
    packed = t.impl.pack_codes(codes)
    assert packed.shape == (5, t.row_bytes(k))
    np.testing.assert_array_equal(t.impl.unpack_codes(packed, k), codes)


def test_q4_layout_is_the_documented_one():
    # byte j of a 64-code unit: low nibble = q[j], high nibble = q[j + 32]; tail unit of 32: q[j], q[j+16]
    q = (np.arange(96) % 16).astype(np.uint8)[None]
    b = qtypes.get("q4").impl.pack_codes(q)[0]
    assert b[0] == (q[0, 0] | q[0, 32] << 4) and b[31] == (q[0, 31] | q[0, 63] << 4)
    assert b[32] == (q[0, 64] | q[0, 80] << 4) and b[47] == (q[0, 79] | q[0, 95] << 4)


def test_q3_layout_is_the_documented_one():
    q = np.zeros((1, 128), np.uint8)
    q[0, 16 * 5 + 3] = 4  # high bit of code j + i*H with j=3, i=5 -> bit 5 of high byte 3
    q[0, 32 * 2 + 7] = 2  # low bits of code j + i*S with j=7, i=2 -> bits 4-5 of low byte 7
    b = qtypes.get("q3").impl.pack_codes(q)[0]
    assert b.size == 48 and b[32 + 3] == 1 << 5 and b[7] == 2 << 4
    assert np.count_nonzero(b) == 2


@pytest.mark.parametrize("name,group,k", list(_cases()))
def test_rtn_error_bound_and_cpp_agreement(rng, name, group, k):
    t = qtypes.get(name)
    n = 6
    w = weights(rng, n, k, group)
    blob = t.pack(w, group)
    assert blob.dtype == np.uint8 and blob.size == t.packed_size(n, k, group) == _core.packed_size(name, n, k, group)
    # numpy and C++ writers produce the same bytes, and dequantize identically
    np.testing.assert_array_equal(blob, _core.quantize(w, name, group))
    deq = t.dequantize(blob, n, k, group)
    np.testing.assert_array_equal(deq, _core.dequantize(blob, name, group, n, k))
    # |w - deq| <= scale/2, plus fp32 rounding of scale*q + min (a few ulp of |w|)
    bound = t.max_err(blob, n, k, group) + 4 * np.finfo(np.float32).eps * (np.abs(w) + np.abs(deq))
    assert np.all(np.abs(w - deq) <= bound)
    # zero groups are exact; constant groups are exact up to the fp16 rounding of the min
    assert np.all(deq[0, :group] == 0)
    if not t.symmetric:
        assert np.allclose(deq[1, :group], 0.75, rtol=0, atol=np.float32(0.75) * 2**-10)
    # pack_parts(unpack(blob)) is the identity on blobs
    np.testing.assert_array_equal(t.pack_parts(*t.unpack(blob, n, k, group)), blob)


@pytest.mark.parametrize("name", QTYPES)
def test_bits_per_weight_measured(name):
    t = qtypes.get(name)
    n, k = 64, 4096
    for g in qtypes.GROUP_SIZES:
        measured = 8 * t.packed_size(n, k, g) / (n * k)
        assert measured == pytest.approx(t.bits_per_weight(g))
    assert t.bits_per_weight(128) == {"q2": 2.25, "q3": 3.25, "q4": 4.25, "q8": 8.125}[name]


@pytest.mark.parametrize("name", QTYPES)
def test_bad_input_raises_value_error(name):
    t = qtypes.get(name)
    with pytest.raises(ValueError, match="multiple of the group size 128"):
        t.pack(np.zeros((2, 96), np.float32), 128)
    with pytest.raises(ValueError, match="group size"):
        t.pack(np.zeros((2, 96), np.float32), 48)
    with pytest.raises(ValueError, match="fp16"):
        t.pack(np.full((1, 32), np.inf, np.float32), 32)
    with pytest.raises(ValueError, match="2-D"):
        t.pack(np.zeros(64, np.float32), 32)
    with pytest.raises(ValueError, match="blob of"):
        t.unpack(np.zeros(10, np.uint8), 1, 32, 32)
    with pytest.raises(ValueError, match="unknown qtype"):
        qtypes.get("q5")
    with pytest.raises(ValueError, match=r"\[quantize\] expected K to be a positive multiple"):
        _core.quantize(np.zeros((2, 96), np.float32), name, 128)
    with pytest.raises(ValueError, match=r"\[quantize\] expected w.dtype float32, got float64"):
        _core.quantize(np.zeros((2, 64)), name, 32)


# ---- q2b: 2-bit codes with bilevel scales (SPEED-Q), fixed group 16 ----------------------

Q2B_SHAPES = [(1, 32), (7, 96), (16, 160), (17, 224), (33, 384), (48, 4096)]


def _speedq_fake_quant_torch(w: np.ndarray) -> np.ndarray:
    """SPEED-Q's int2-bilevel fake quantization (b=2, g=16, 4-bit asymmetric scales in runs of
    16, unrounded float level-2 zero, 2-bit rounded zeros), written independently from
    design.md Part 2 §4 in torch float32, including SPEED-Q's (group, row) regrouping."""
    import torch

    n, k = w.shape
    x = torch.from_numpy(w).reshape(n, k // 16, 16).permute(1, 0, 2).reshape(-1, 16)

    def minmax(v, qmax):
        lo, hi = v.min(1).values, v.max(1).values
        same = lo == hi
        lo = torch.where(same, torch.tensor(-1.0), lo)
        hi = torch.where(same, torch.tensor(1.0), hi)
        s = ((hi - lo) / qmax).clamp_min(1e-5)
        return s, -lo / s

    s, z = minmax(x, 3)
    z = torch.round(z).clamp(0, 3)
    s2, z2 = minmax(s.reshape(-1, 16), 15)
    c = torch.clamp(torch.round(s.reshape(-1, 16) / s2[:, None].clamp_min(1e-9) + z2[:, None]), 0, 15)
    S = (s2[:, None] * (c - z2[:, None])).reshape(-1)
    q = torch.clamp(torch.round(x / S[:, None].clamp_min(1e-9) + z[:, None]), 0, 3)
    deq = S[:, None] * (q - z[:, None])
    return deq.reshape(k // 16, n, 16).permute(1, 0, 2).reshape(n, k).numpy()


@pytest.mark.parametrize("n,k", Q2B_SHAPES)
def test_q2b_round_trip_and_cpp_agreement(rng, n, k):
    t = qtypes.get("q2b")
    w = weights(rng, n, k, 16) * np.float32(0.05)
    blob = t.pack(w, 16)
    assert blob.size == t.packed_size(n, k, 16) == _core.packed_size("q2b", n, k, 16)
    np.testing.assert_array_equal(blob, _core.quantize(w, "q2b", 16))  # numpy == C++ writer, bit for bit
    deq = t.dequantize(blob, n, k, 16)
    np.testing.assert_array_equal(deq, _core.dequantize(blob, "q2b", 16, n, k))
    parts = t.unpack(blob, n, k, 16)
    np.testing.assert_array_equal(t.pack_parts(*parts), blob)
    codes = rng.integers(0, 4, size=(n, k), dtype=np.uint8)
    np.testing.assert_array_equal(t.impl.unpack_codes(t.impl.pack_codes(codes), k), codes)
    assert np.all(deq[0, :16] == 0)  # an all-zero group stays exact
    # the level-1 rounding bound where the level-2 scale still covers the group's range
    S = np.repeat(np.abs(t.impl.group_scales(parts.scale_codes, parts.d, parts.m)), 16, axis=1)
    inside = (w >= deq.min() - 1) & (np.abs(w - deq) <= 3 * S)
    assert inside.mean() > 0.9


@pytest.mark.parametrize("n,k", [(16, 32), (32, 160), (48, 4096)])
def test_q2b_is_speedq_fake_quant_bit_for_bit(rng, n, k):
    pytest.importorskip("torch")
    t = qtypes.get("q2b")
    w = rng.standard_normal((n, k)).astype(np.float32) * np.float32(0.02)
    w[0, :16] = 0.0
    w[1:16, 16:32] = w[0:1, 16:32] * 3  # rows with equal level-1 scales (level-2 lo == hi)
    w[3, :16] = 0.1  # a constant group
    np.testing.assert_array_equal(t.dequantize(t.pack(w, 16), n, k, 16), _speedq_fake_quant_torch(w))


def test_q2b_from_speedq_ordering(rng):
    t = qtypes.get("q2b")
    n, k = 32, 96
    g, nb = k // 16, n // 16
    p = t.quantize(rng.standard_normal((n, k)).astype(np.float32), 16)
    # SPEED-Q's tensors: per-group values in (group, row) order, level-2 in (group, block) order
    sq = dict(quant_weights=p.codes.reshape(-1, 16).astype(np.int8), quant_scale=p.scale_codes.T.reshape(-1, 16),
              zeros=p.zeros.T.reshape(-1, 1).astype(np.float32), qq_scale=p.d.T.reshape(-1, 1), qq_zero=p.m.T.reshape(-1, 1))
    back = t.impl.from_speedq(**sq, n=n, k=k)
    for a, b in zip(back, p):
        np.testing.assert_array_equal(a, b)
    assert back.d.shape == (nb, g)
    with pytest.raises(ValueError, match="N % 16 == 0"):
        t.impl.from_speedq(**sq, n=24, k=k)


def test_q2b_sizes_and_group_record():
    t = qtypes.get("q2b")
    assert t.group_sizes == (16,) and t.bits == 2
    assert t.bits_per_weight() == 2.625
    assert 8 * t.packed_size(64, 4096, 16) / (64 * 4096) == 2.625
    # short last row block and a K % 64 == 32 row (half-used zero byte) are counted exactly
    assert t.packed_size(17, 32, 16) == 17 * 8 + 2 * 2 * 4 * 2 + 17 * 1 + 17 * 1
    for name in QTYPES:
        assert qtypes.get(name).group_sizes == qtypes.GROUP_SIZES


def test_q2b_bad_input_raises_value_error():
    t = qtypes.get("q2b")
    with pytest.raises(ValueError, match=r"expected group size 16 \(fixed by the q2b type\), got 32"):
        t.pack(np.zeros((2, 64), np.float32), 32)
    with pytest.raises(ValueError, match="multiple of 32"):
        t.pack(np.zeros((2, 48), np.float32), 16)
    with pytest.raises(ValueError, match="finite"):
        t.pack(np.full((1, 32), np.nan, np.float32), 16)
    with pytest.raises(ValueError, match="blob of"):
        t.unpack(np.zeros(10, np.uint8), 1, 32, 16)
    with pytest.raises(ValueError, match=r"expected codes uint8"):
        t.pack_parts(np.full((1, 32), 4, np.uint8), np.zeros((1, 2), np.uint8), np.zeros((1, 2), np.uint8),
                     np.zeros((1, 2), np.float32), np.zeros((1, 2), np.float32))
    with pytest.raises(ValueError, match=r"\[quantize\] expected group size 16 for q2b"):
        _core.quantize(np.zeros((2, 64), np.float32), "q2b", 32)
