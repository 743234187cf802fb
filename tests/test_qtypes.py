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
