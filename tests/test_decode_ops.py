"""The decoder's per-token glue in C++ (csrc/ops/decode_ops.h) against its numpy twin.

Tolerances: every op is float32 arithmetic on O(1) values; the C++ and numpy sums differ only
in association order (and the C++ RMS sum runs in double), so results agree to a few float32
ulps: rtol 1e-5 / atol 1e-6 (attention outputs are convex combinations of the values).
"""

from __future__ import annotations

import numpy as np
import pytest

from edgevlm import _core
from edgevlm.runtime.layers import rms_norm, silu

F32 = np.float32


def _rope_np(x, cos, sin):
    """x [H, hd]: rotate_half RoPE on the first len(cos) dims (decoder._rope's math)."""
    r, h = cos.size, cos.size // 2
    xr = x[:, :r]
    out = xr * cos + np.concatenate([-xr[:, h:], xr[:, :h]], axis=-1) * sin
    return np.concatenate([out, x[:, r:]], axis=-1)


def _attend_np(q, k, v, kc, vc, pos, cos, sin, qn, kn, eps, scale):
    hkv, _, hd = kc.shape
    hq = q.size // hd
    q, k = q.reshape(hq, hd), k.reshape(hkv, hd)
    if qn is not None:
        q = rms_norm(q, qn, eps)
    if kn is not None:
        k = rms_norm(k, kn, eps)
    q, k = _rope_np(q, cos, sin), _rope_np(k, cos, sin)
    kc[:, pos], vc[:, pos] = k, v.reshape(hkv, hd)
    qg = q.reshape(hkv, hq // hkv, hd)
    s = qg @ kc[:, :pos + 1].transpose(0, 2, 1) * scale
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    return (s @ vc[:, :pos + 1]).reshape(hq * hd)


@pytest.mark.parametrize("d", [1, 7, 576, 1537])
def test_rms_norm_and_residual(rng, d):
    x = rng.standard_normal((3, d)).astype(F32) * 3
    w = rng.standard_normal(d).astype(F32)
    np.testing.assert_allclose(_core.rms_norm(x, w, 1e-6), rms_norm(x, w, 1e-6), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_core.rms_norm(x, None, 1e-5), rms_norm(x, None, 1e-5), rtol=1e-5, atol=1e-6)
    y = rng.standard_normal((3, d)).astype(F32)
    x2 = x.copy()
    h = _core.add_rms_norm(x2, y, w, 1e-6)
    np.testing.assert_array_equal(x2, x + y)  # the residual is updated in place, exactly
    np.testing.assert_allclose(h, rms_norm(x + y, w, 1e-6), rtol=1e-5, atol=1e-6)


def test_silu_mul(rng):
    g = (rng.standard_normal((2, 333)) * 20).astype(F32)  # large |g|: no overflow in exp
    u = rng.standard_normal((2, 333)).astype(F32)
    # both evaluate g * 0.5 * (1 + tanh(g / 2)): for g << 0 the sum cancels, so the error is
    # absolute, ~|g| * |u| * eps32 (<= 20 * 4 * 1.2e-7 here), whichever tanh is used
    np.testing.assert_allclose(_core.silu_mul(g, u), silu(g) * u, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hq,hkv,hd,rot,norms,pos", [(12, 2, 128, 128, False, 0), (12, 2, 128, 128, False, 37),
                                                     (6, 2, 24, 16, True, 5), (3, 3, 8, 8, True, 60),
                                                     (4, 1, 40, 40, False, 299), (18, 1, 64, 64, False, 130),
                                                     (14, 2, 128, 64, True, 401)])
def test_attend_decode_matches_numpy(rng, hq, hkv, hd, rot, norms, pos):
    ctx = pos + 3
    kc = rng.standard_normal((hkv, ctx, hd)).astype(F32)
    vc = rng.standard_normal((hkv, ctx, hd)).astype(F32)
    q, k, v = (rng.standard_normal(n * hd).astype(F32) for n in (hq, hkv, hkv))
    ang = (pos * 10000.0 ** (-np.arange(0, rot, 2) / rot)).astype(F32)
    cos, sin = np.cos(np.r_[ang, ang]).astype(F32), np.sin(np.r_[ang, ang]).astype(F32)
    qn = kn = None
    if norms:
        qn, kn = rng.standard_normal(hd).astype(F32), rng.standard_normal(hd).astype(F32)
    kc2, vc2 = kc.copy(), vc.copy()
    scale = float(F32(hd ** -0.5))
    want = _attend_np(q, k, v, kc2, vc2, pos, cos, sin, qn, kn, 1e-6, scale)
    # Work items are runs of query heads of one KV group, split to give every thread one (18
    # heads on one group: more than one item holds, so the group is split even on one thread);
    # the cache is walked in blocks of rows (several blocks from ~32 positions): each head's
    # arithmetic is fixed, so any thread count gives the same bits.
    first = None
    for threads in (1, 2, 3, 4):
        kc1, vc1 = kc.copy(), vc.copy()
        got = _core.attend_decode(q, k, v, kc1, vc1, pos, cos, sin, qn, kn, 1e-6, scale, threads)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        if first is None:
            first = got
        np.testing.assert_array_equal(got, first)
        np.testing.assert_allclose(kc1, kc2, rtol=1e-5, atol=1e-6)  # the rotated key is cached
        np.testing.assert_array_equal(vc1, vc2)
        np.testing.assert_array_equal(kc1[:, pos + 1:], kc[:, pos + 1:])  # later slots untouched


def test_attend_decode_rejects_bad_arguments(rng):
    kc = np.zeros((2, 8, 16), F32)
    q, k = np.zeros(4 * 16, F32), np.zeros(2 * 16, F32)
    cs = np.ones(16, F32)
    with pytest.raises(ValueError, match=r"\[attend_decode\] expected 0 <= pos < ctx=8, got pos=8"):
        _core.attend_decode(q, k, k, kc, kc.copy(), 8, cs, cs)
    ro = kc.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        _core.attend_decode(q, k, k, ro, kc.copy(), 0, cs, cs)
    with pytest.raises(ValueError, match="dtype float32"):
        _core.attend_decode(q.astype(np.float64), k, k, kc, kc.copy(), 0, cs, cs)
    with pytest.raises(ValueError, match="multiple of Hkv=2"):
        _core.attend_decode(np.zeros(3 * 16, F32), k, k, kc, kc.copy(), 0, cs, cs)
    with pytest.raises(ValueError, match="even length"):
        _core.attend_decode(q, k, k, kc, kc.copy(), 0, np.ones(5, F32), np.ones(5, F32))
    with pytest.raises(ValueError, match=r"\[rms_norm\] expected w with 7 elements"):
        _core.rms_norm(np.zeros((2, 7), F32), np.zeros(6, F32), 1e-6)
