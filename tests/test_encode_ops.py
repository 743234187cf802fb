"""The encoder glue in C++ (csrc/ops/encode_ops.h: GELUs, LayerNorm, encoder attention) against
float64 references and the numpy twins in edgevlm.runtime.layers, at odd sizes, with bounds
derived from each op's float32 evaluation; plus every build (portable / AVX2 / AVX-512, chosen by
the default ISA) in a subprocess, thread-count invariance and the argument checks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import supported_isas
from edgevlm import _core
from edgevlm.runtime import layers as L

EPS = float(np.finfo(np.float32).eps)
EXP_REL = 1.3e-7  # relative error of the C++ exp polynomial (degree-6 Taylor on |r| <= ln2/2)


# ------------------------------------------------------------------------ float64 references
def gelu64(x: np.ndarray, kind: str) -> np.ndarray:
    xd = x.astype(np.float64)
    if kind == "quick":
        return xd / (1.0 + np.exp(np.minimum(-1.702 * xd, 700)))
    if kind == "tanh":
        u = math.sqrt(2 / math.pi) * (xd + 0.044715 * xd ** 3)  # 0.5 x (1 + tanh u) = x / (1 + e^-2u),
        return xd / (1.0 + np.exp(np.minimum(-2 * u, 700)))     # no cancellation for x << 0
    return np.array([0.5 * v * math.erfc(-v / math.sqrt(2)) for v in xd.ravel()]).reshape(x.shape)


def gelu_bound(x: np.ndarray, kind: str, ref: np.ndarray) -> np.ndarray:
    """|C++ - float64| bound per element.  quick / tanh are x / (1 + e^-a): relative error of e
    (EXP_REL + the float32 rounding of its argument a, ~|a| eps) passes at most 1:1 to the
    quotient, plus ~4 roundings.  erf: z >= 0 the rational erf is within 1e-7 absolute (+ ~12
    roundings of P/Q) times |x|/2; z < 0 erfc's fit 1.2e-7 relative + its exponent z^2 rounded
    (~2 (z^2 + 2) eps).  A floor of 1e-37 covers results that underflow to 0 in float64 but
    are ~1e-38 from the clamped exp."""
    xd = np.abs(x.astype(np.float64))
    if kind == "quick":
        rel = 4 * EPS + EXP_REL + 1.702 * xd * EPS
    elif kind == "tanh":
        rel = 4 * EPS + EXP_REL + 2 * 0.8 * (xd + 0.045 * xd ** 3) * 3 * EPS
    else:
        z2 = xd * xd / 2
        rel = np.where(x < 0, 1.2e-7 + 6 * EPS + 2 * (z2 + 2) * EPS, 0.0)
        return rel * np.abs(ref) + np.where(x >= 0, 0.5 * xd * (1e-7 + 12 * EPS), 0.0) + 1e-37
    return rel * np.abs(ref) + 1e-37


def layer_norm64(x, w, b, eps):
    xd = x.astype(np.float64)
    mu = xd.mean(-1, keepdims=True)
    var = ((xd - mu) ** 2).mean(-1, keepdims=True)
    return (xd - mu) / np.sqrt(var + eps) * w + b, mu, var


def attention64(q, k, v, heads, causal=False, key_mask=None, q_pos=None):
    """float64 attention [B, Tq, D] and the per-(b, h, i) weighted sums sum_j p |v_j| [B, Tq, D],
    and the score bound hd * eps * scale * max_j sum_d |q_d k_jd| [B, H, Tq]."""
    b, tq, d = q.shape
    tk, hd = k.shape[1], d // heads
    qh = q.astype(np.float64).reshape(b, tq, heads, hd).transpose(0, 2, 1, 3)
    kh = k.astype(np.float64).reshape(b, tk, heads, hd).transpose(0, 2, 1, 3)
    vh = v.astype(np.float64).reshape(b, tk, heads, hd).transpose(0, 2, 1, 3)
    sc = hd ** -0.5
    s = qh @ kh.transpose(0, 1, 3, 2) * sc                                    # [B, H, Tq, Tk]
    allow = np.ones((b, 1, tq, tk), bool)
    if causal:
        pos = (np.arange(tq) + tk - tq)[None].repeat(b, 0) if q_pos is None else q_pos.reshape(b, tq)
        allow &= (np.arange(tk)[None, None, :] <= pos[:, :, None])[:, None]
    if key_mask is not None:
        allow &= (key_mask != 0).reshape(b, 1, 1, tk)
    s = np.where(allow, s, np.finfo(np.float32).min)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = (p @ vh).transpose(0, 2, 1, 3).reshape(b, tq, d)
    pv = (p @ np.abs(vh)).transpose(0, 2, 1, 3).reshape(b, tq, d)
    ds = hd * EPS * sc * (np.abs(qh) @ np.abs(kh).transpose(0, 1, 3, 2)).max(-1)  # [B, H, Tq]
    return o, pv, ds


def attention_bound(pv, ds, heads, tk):
    """|o - o64| <= sum_j p_j |v_j| * (2 max|ds| + EXP_REL + (Tk + 4) eps): a score error ds moves
    each softmax weight by a factor e^(+-2 ds); exp, the sum over keys and the final scaling round."""
    b, tq, d = pv.shape
    dsh = np.repeat(ds.transpose(0, 2, 1), d // heads, axis=-1)             # [B, Tq, D]
    return pv * (2 * dsh + EXP_REL + (tk + 4) * EPS) + 1e-30


# ---------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("kind", ["quick", "tanh", "erf"])
def test_gelu_inplace_matches_float64_and_numpy_twin(rng, kind):
    twin = {"quick": L.quick_gelu, "tanh": L.gelu_tanh, "erf": L.gelu}[kind]
    for n in [1, 7, 17, 1000, 40_003]:  # tails of 8/16-lane vectors; > 2^15 elements: threaded
        x = (rng.standard_normal(n) * 4).astype(np.float32)
        x[: min(n, 6)] = np.array([0.0, -0.0, 30.0, -30.0, 3e-20, -95.0], np.float32)[: min(n, 6)]
        ref = gelu64(x, kind)
        y = x.copy()
        _core.gelu_inplace(y, kind, threads=2)
        err = np.abs(y.astype(np.float64) - ref)
        bound = gelu_bound(x, kind, ref)
        assert np.all(err <= bound), f"{kind} n={n}: worst x={x[np.argmax(err - bound)]}"
        y1 = x.copy()
        _core.gelu_inplace(y1, kind, threads=1)
        np.testing.assert_array_equal(y, y1)
        # the numpy twin agrees to its own float32 evaluation (1 + tanh cancels for x << 0)
        np.testing.assert_allclose(y, twin(x), rtol=2e-6, atol=2e-7 * (1 + np.abs(x).max()))


def test_layer_norm_matches_float64_and_twin(rng):
    for rows, d in [(1, 1), (3, 7), (5, 33), (197, 768), (70, 1030)]:
        x = (rng.standard_normal((rows, d)) * 3 + 5).astype(np.float32)  # an offset: mean matters
        w = rng.standard_normal(d).astype(np.float32)
        b = rng.standard_normal(d).astype(np.float32)
        eps = 1e-5
        ref, mu, var = layer_norm64(x, w, b, eps)
        y = _core.layer_norm(x, w, b, eps, threads=2)
        # float32 sums of d terms over >= 8 lanes: relative error <= (d/8 + 8) eps of sum|terms|;
        # the mean's error dmu shifts x - mu, the variance's relative error dv scales x_hat by
        # dv/2; then ~4 roundings of the output.
        c = (d / 8 + 8) * EPS
        dmu = c * np.abs(x.astype(np.float64)).mean(-1, keepdims=True)
        sd = np.sqrt(var + eps)
        dv = c + 2 * dmu * np.abs(x - mu).mean(-1, keepdims=True) / (var + eps)
        xhat = np.abs(x - mu) / sd
        bound = np.abs(w) * (dmu / sd + xhat * dv / 2) + 4 * EPS * (np.abs(w) * xhat + np.abs(b)) + 1e-30
        assert np.all(np.abs(y - ref) <= bound), (rows, d)
        np.testing.assert_array_equal(y, _core.layer_norm(x, w, b, eps, threads=1))
        assert np.all(np.abs(L.layer_norm(x, w, b, eps) - ref) <= 2 * bound + 1e-6 * np.abs(ref))
    out = np.empty_like(x)
    assert _core.layer_norm(x, None, None, 1e-6, out=out) is not None
    np.testing.assert_allclose(out, L.layer_norm(x, None, None, 1e-6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["plain", "masked_causal", "kept_rows"])
def test_attend_encode_matches_float64(rng, case):
    for b, tq, tk, heads, hd in [(1, 1, 1, 1, 8), (2, 5, 13, 3, 24), (1, 197, 197, 12, 64), (2, 9, 33, 2, 72)]:
        d = heads * hd
        if case == "kept_rows":
            tq = min(tq, 2)
        q = rng.standard_normal((b, tq, d)).astype(np.float32)
        k = (rng.standard_normal((b, tk, d)) * 2).astype(np.float32)
        v = rng.standard_normal((b, tk, d)).astype(np.float32)
        kw = {}
        if case == "masked_causal":
            km = (rng.random((b, tk)) > 0.3).astype(np.uint8)
            km[0] = 0  # a fully masked row: uniform weights, not NaN
            kw = dict(causal=True, key_mask=km)
        elif case == "kept_rows":
            kw = dict(causal=True, q_pos=rng.integers(0, tk, (b, tq)).astype(np.int64))
        o = _core.attend_encode(q, k, v, heads, threads=2, **kw)
        o64, pv, ds = attention64(q, k, v, heads, **kw)
        bound = attention_bound(pv, ds, heads, tk)
        assert np.all(np.abs(o - o64) <= bound), (case, b, tq, tk, heads, hd)
        np.testing.assert_array_equal(o, _core.attend_encode(q, k, v, heads, threads=1, **kw))
        twin = L.attention(q, k, v, heads, **kw)
        assert np.all(np.abs(twin - o64) <= 2 * bound + 1e-6 * pv)
        np.testing.assert_allclose(L.attention_fast(q, k, v, heads, **kw), o, rtol=0, atol=0)


_PROBE = r"""
import json, sys, numpy as np
from edgevlm import _core
rng = np.random.default_rng(7)
x = (rng.standard_normal(1003) * 4).astype(np.float32)
out = {}
for kind in ("quick", "tanh", "erf"):
    y = x.copy(); _core.gelu_inplace(y, kind); out[kind] = y.tolist()
a = (rng.standard_normal((3, 77)) + 2).astype(np.float32)
out["ln"] = _core.layer_norm(a, None, None, 1e-5).tolist()
q, k, v = (rng.standard_normal((1, 11, 96)).astype(np.float32) for _ in range(3))
out["attn"] = _core.attend_encode(q, k, v, 3, causal=True).tolist()
print(json.dumps({"isa": _core.default_isa(), **out}))
"""


def test_every_build_agrees():
    """EDGEVLM_ISA picks the build of the glue too (ref: portable, avx2/avxvnni: AVX2+FMA,
    avx512vnni: AVX-512): every supported one within the float bounds of the others."""
    res = {}
    for isa in supported_isas():
        env = {**os.environ, "EDGEVLM_ISA": isa}
        r = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
        res[isa] = json.loads(r.stdout)
        assert res[isa]["isa"] == isa
    base = res["ref"]
    x = (np.random.default_rng(7).standard_normal(1003) * 4).astype(np.float32)  # the probe's x
    for isa, r in res.items():
        for key in ("quick", "tanh", "erf"):
            ref = gelu64(x, key)
            assert np.all(np.abs(np.asarray(r[key]) - ref) <= gelu_bound(x, key, ref)), f"{isa} {key}"
        np.testing.assert_allclose(r["ln"], base["ln"], rtol=0, atol=2e-5, err_msg=isa)
        np.testing.assert_allclose(r["attn"], base["attn"], rtol=0, atol=2e-5, err_msg=isa)


def test_bad_arguments_raise_value_error(rng):
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    cases = [
        (lambda: _core.gelu_inplace(x.astype(np.float64), "quick"), r"\[gelu_inplace\] expected x.dtype float32"),
        (lambda: _core.gelu_inplace(x, "relu"), "expected kind one of quick|tanh|erf, got 'relu'"),
        (lambda: _core.gelu_inplace(x[:, :, ::2], "erf"), "C-contiguous"),
        (lambda: _core.layer_norm(x, np.ones(7, np.float32), None, 1e-5), r"expected w of shape \[8\]"),
        (lambda: _core.layer_norm(x, None, None, float("nan")), "finite eps"),
        (lambda: _core.attend_encode(x, x, x, 3), "expected heads > 0 dividing D=8, got 3"),
        (lambda: _core.attend_encode(x, x[:, :2], x, 2), r"expected k and v of shape \[2, Tk, 8\]"),
        (lambda: _core.attend_encode(x[0], x, x, 2), r"expected q of shape \[B, T, D\]"),
        (lambda: _core.attend_encode(x, x, x, 2, key_mask=np.ones((2, 4), np.uint8)), "key_mask of shape"),
        (lambda: _core.attend_encode(x, x, x, 2, q_pos=np.zeros((2, 3), np.int32)), "q_pos.dtype int64"),
    ]
    for call, msg in cases:
        with pytest.raises(ValueError, match=msg):
            call()
    ro = x.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        _core.gelu_inplace(ro, "quick")


def test_numpy_fallback_is_used_when_disabled(rng, monkeypatch):
    """USE_CORE_OPS=False: the fast-path helpers return the numpy twins' results exactly."""
    monkeypatch.setattr(L, "USE_CORE_OPS", False)
    x = rng.standard_normal((2, 5, 12)).astype(np.float32)
    np.testing.assert_array_equal(L.layer_norm_fast(x, None, None, 1e-5), L.layer_norm(x, None, None, 1e-5))
    np.testing.assert_array_equal(L.attention_fast(x, x, x, 3), L.attention(x, x, x, 3))
    y = x.copy()
    np.testing.assert_array_equal(L.activate_(L.quick_gelu, y), L.quick_gelu(x))
