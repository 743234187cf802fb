"""Kernels: every qtype x group x compiled ISA against the C++ reference and a float64
numpy reference, at odd sizes, with tolerances derived from the math.

Bounds used (per output y[m, n]):
- reference (exact fp32 activations, double accumulation): one fp32 rounding of the
  result, |y_ref - y64| <= eps32 * |y64| + eps32 * 1e-3 * sum_k |x||w|.
- SIMD kernels quantize activations to int8 per (row, group) with d = max|x_g| / 127 and
  round-to-nearest, so |x - d*q| <= d/2 per element and
      |y_isa - y_ref| <= sum_g (d[m,g]/2) * sum_{k in g} |w[n,k]|          (activation rounding)
                        + (K/g + 8) * eps32 * sum_k |x||w|                (fp32 accumulation of
                                                                           K/g group terms)
- q8 weights: linear.cc adds a second pass over the residual r = x - d q (exact in float32),
  itself int8-quantized with d2 = max|r_g| / 127, so the activation term is
      sum_g (d2[m,g]/2) * sum_{k in g} |w[n,k]|  (+ eps32 * sum_k |x||w| for the one fp32
  addition of the two passes); d2 <= d/254, a ~250x tighter bound than one pass.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import supported_isas, weights
from edgevlm import _core, qtypes
from edgevlm.runtime import QuantLinear

EPS32 = float(np.finfo(np.float32).eps)
QTYPES = ["q2", "q3", "q4", "q8"]  # q2b (fixed group 16) has its own tests below
MS = [1, 3, 16, 197]
NS = [1, 7, 64, 100]
KS = [32, 96, 160, 384, 1024]


def _residual(x: np.ndarray, group: int, isa: str) -> np.ndarray:
    """What linear.cc's second pass quantizes for q8 weights: r = x - d q from the ISA's own int8
    activations -> [M, K] float32.  Exact in float64 (d*q has <= 31 bits) and a float32 value
    (linear.cc's residual() explains why), so the cast does not round."""
    q, d, _ = _core.quantize_acts(x, group, isa=isa)
    return (x.astype(np.float64) - np.repeat(d.astype(np.float64), group, axis=1) * q).astype(np.float32)


def _act_bound(x: np.ndarray, deq: np.ndarray, group: int, name: str, isa: str) -> np.ndarray:
    """Activation-rounding term of |y_isa - y_ref| -> [M, N] float64: one pass (q2/q3/q4/q2b)
    sum_g (d[m,g]/2) * sum_{k in g} |w[n,k]|; q8 (two passes) the residual's
    sum_g (d2[m,g]/2) * sum_{k in g} |w[n,k]| + eps32 * sum_k |x||w|
    (d2 = max|r_g| / 127; the last term: the fp32 sum of the two passes' outputs)."""
    m, k = x.shape
    wsum = np.abs(deq.reshape(deq.shape[0], k // group, group)).sum(-1).astype(np.float64)
    if name != "q8":
        d = np.abs(x.reshape(m, k // group, group)).max(-1).astype(np.float64) / 127.0
        return (d / 2) @ wsum.T
    amax = np.abs(_residual(x, group, isa).reshape(m, k // group, group)).max(-1).astype(np.float64)
    per_elem = amax / 127.0 / 2 * (1 + 1e-6)  # 1e-6: d2 and 1/d2 rounded to fp32
    return per_elem @ wsum.T + EPS32 * (np.abs(x).astype(np.float64) @ np.abs(deq).T)


def _shapes(group: int):
    for k in KS:
        if k % group:
            continue
        for m in MS:
            for n in NS:
                if m * n * k > 4_000_000:  # keep the scalar reference quick
                    continue
                yield m, n, k


@pytest.mark.parametrize("isa", supported_isas())
@pytest.mark.parametrize("name", QTYPES)
@pytest.mark.parametrize("group", qtypes.GROUP_SIZES)
def test_linear_matches_references(rng, isa, name, group):
    t = qtypes.get(name)
    checked = 0
    for m, n, k in _shapes(group):
        w = weights(rng, n, k, group)
        blob = t.pack(w, group)
        deq = t.dequantize(blob, n, k, group).astype(np.float64)
        x = rng.standard_normal((m, k)).astype(np.float32)
        x[0, :group] = 0.0  # an all-zero activation group (d = 0)
        bias = rng.standard_normal(n).astype(np.float32) if (m + n) % 2 else None
        y64 = x.astype(np.float64) @ deq.T + (0 if bias is None else bias)
        mag = np.abs(x).astype(np.float64) @ np.abs(deq).T

        y_ref = _core.linear(x, blob, name, group, n, bias=bias, isa="ref")
        assert np.all(np.abs(y_ref - y64) <= EPS32 * np.abs(y64) + EPS32 * 1e-3 * mag + 1e-30), (m, n, k)

        y = _core.linear(x, blob, name, group, n, bias=bias, isa=isa, threads=2)
        tol = (k // group + 8) * EPS32 * mag + 1e-30
        if isa != "ref":
            tol = tol + _act_bound(x, deq, group, name, isa)
        err = np.abs(y.astype(np.float64) - y_ref)
        assert np.all(err <= tol), f"{isa} {name} g{group} M={m} N={n} K={k}: max excess {(err - tol).max()}"
        # the split of N over threads must not change a single bit
        y1 = _core.linear(x, blob, name, group, n, bias=bias, isa=isa, threads=1)
        np.testing.assert_array_equal(y, y1)
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("isa", supported_isas())
def test_large_shape_and_1d_input(rng, isa):
    n, k, g = 300, 4096, 128
    w = weights(rng, n, k, g)
    for name in QTYPES:
        t = qtypes.get(name)
        blob = t.pack(w, g)
        x = rng.standard_normal(k).astype(np.float32)
        deq = t.dequantize(blob, n, k, g).astype(np.float64)
        y = _core.linear(x, blob, name, g, n, isa=isa, threads=2)
        assert y.shape == (n,)
        y64 = deq @ x.astype(np.float64)
        mag = np.abs(deq) @ np.abs(x).astype(np.float64)
        tol = (k // g + 8) * EPS32 * mag + (_act_bound(x[None], deq, g, name, isa)[0] if isa != "ref" else 0)
        assert np.all(np.abs(y - y64) <= tol + EPS32 * np.abs(y64))
        # q8's two-pass GEMV walks L2-sized sub-chunks (56 rows at K = 4096) of each thread's slice
        np.testing.assert_array_equal(y, _core.linear(x, blob, name, g, n, isa=isa, threads=1))


@pytest.mark.parametrize("isa", [i for i in supported_isas() if i != "ref"])
def test_activation_quantizer_matches_reference(rng, isa):
    for group in qtypes.GROUP_SIZES:
        x = rng.standard_normal((5, 384)).astype(np.float32) * np.float32(3.0)
        x[1, :group] = 0.0
        x[2, :] = np.round(x[2, :])  # exact values, many ties after scaling
        q_ref, d_ref, s_ref = _core.quantize_acts(x, group, isa="ref")
        q, d, s = _core.quantize_acts(x, group, isa=isa)
        np.testing.assert_array_equal(d, d_ref)
        np.testing.assert_array_equal(q, q_ref)
        np.testing.assert_allclose(s, s_ref, rtol=0, atol=0)
        assert np.all(np.abs(x - q * np.repeat(d, group, axis=1)) <= np.repeat(d, group, axis=1) / 2 * (1 + 1e-6))


def test_out_argument_and_quantlinear(rng):
    n, k, g = 48, 256, 64
    w = weights(rng, n, k, g)
    t = qtypes.get("q4")
    blob = t.pack(w, g)
    x = rng.standard_normal((4, k)).astype(np.float32)
    out = np.empty((4, n), np.float32)
    res = _core.linear(x, blob, "q4", g, n, out=out)
    assert res is out or np.shares_memory(res, out)
    bias = rng.standard_normal(n).astype(np.float32)
    layer = QuantLinear(blob, "q4", n, k, g, bias=bias)
    y = layer(x.reshape(2, 2, k))
    assert y.shape == (2, 2, n)
    np.testing.assert_allclose(y.reshape(4, n), out + bias, rtol=0, atol=1e-5 * (np.abs(out).max() + 1))


def test_bad_input_raises_value_error(rng):
    n, k, g = 16, 128, 64
    blob = qtypes.get("q4").pack(rng.standard_normal((n, k)).astype(np.float32), g)
    x = rng.standard_normal((2, k)).astype(np.float32)
    cases = [
        (dict(x=x.astype(np.float64)), r"\[linear\] expected x.dtype float32, got float64"),
        (dict(x=np.asfortranarray(rng.standard_normal((3, k)).astype(np.float32))), "C-contiguous"),
        (dict(x=x[:, :96].copy()), r"expected K to be a positive multiple of the group size 64, got K=96"),
        (dict(x=x[:, :64].copy()), r"expected w of \d+ bytes .* got \d+"),
        (dict(n=n + 1), r"expected w of \d+ bytes"),
        (dict(qtype="q5"), "expected qtype one of q2|q3|q4|q8|q2b, got 'q5'"),
        (dict(group=48), "expected group size 32, 64 or 128, got 48"),
        (dict(bias=np.zeros(n + 1, np.float32)), r"expected bias of shape \[16\]"),
        (dict(bias=np.zeros(n, np.float64)), "expected bias.dtype float32"),
        (dict(out=np.zeros((2, n + 1), np.float32)), "expected out of shape"),
        (dict(isa="sse9"), "expected isa one of"),
        (dict(w=blob.astype(np.int8)), "expected w.dtype uint8"),
        (dict(x=np.zeros((2, 2, k), np.float32)), "expected x of shape"),
    ]
    for over, msg in cases:
        args = dict(x=x, w=blob, qtype="q4", group=g, n=n)
        args.update(over)
        with pytest.raises(ValueError, match=msg):
            _core.linear(args["x"], args["w"], args["qtype"], args["group"], args["n"],
                         bias=args.get("bias"), out=args.get("out"), isa=args.get("isa"))
    missing = {"x86_64": "neon", "aarch64": "avx2"}.get(__import__("platform").machine())
    if missing:
        with pytest.raises(ValueError, match="not compiled into this build|not supported by this CPU"):
            _core.linear(x, blob, "q4", g, n, isa=missing)
    with pytest.raises(ValueError, match=r"\[QuantLinear\] expected input \[..., 128\]"):
        QuantLinear(blob, "q4", n, k, g)(np.zeros((1, 64), np.float32))
    with pytest.raises(ValueError, match="set_num_threads"):
        _core.set_num_threads(0)


def test_isa_env_override_in_subprocess():
    import subprocess
    import sys

    code = "import edgevlm._core as c; print(c.default_isa())"
    out = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "EDGEVLM_ISA": "ref"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ref"
    bad = subprocess.run([sys.executable, "-c", "import numpy as np, edgevlm._core as c;"
                          "c.linear(np.zeros((1,32),np.float32), np.zeros(c.packed_size('q4',1,32,32),np.uint8),'q4',32,1)"],
                         env={**__import__("os").environ, "EDGEVLM_ISA": "bogus"}, capture_output=True, text=True)
    assert bad.returncode != 0 and "EDGEVLM_ISA" in bad.stderr and "bogus" in bad.stderr


# ---- q2b (bilevel scales, fixed group 16): activations are int8 per group of 16 ----------
Q2B_NS = [1, 7, 16, 17, 33, 100]
Q2B_KS = [32, 96, 160, 256, 384, 1024]  # tails of 32/96/32 codes, whole units, several units


@pytest.mark.parametrize("isa", supported_isas())
def test_q2b_linear_matches_references(rng, isa):
    t = qtypes.get("q2b")
    checked = 0
    for k in Q2B_KS:
        for n in Q2B_NS:
            for m in [1, 2, 5, 16, 197]:
                if m * n * k > 4_000_000 or (m == 197 and n not in (17, 33)):
                    continue
                w = weights(rng, n, k, 16)
                blob = t.pack(w, 16)
                deq = t.dequantize(blob, n, k, 16).astype(np.float64)
                x = rng.standard_normal((m, k)).astype(np.float32)
                x[0, :16] = 0.0  # an all-zero activation group (d = 0)
                bias = rng.standard_normal(n).astype(np.float32) if (m + n) % 2 else None
                y64 = x.astype(np.float64) @ deq.T + (0 if bias is None else bias)
                mag = np.abs(x).astype(np.float64) @ np.abs(deq).T
                y_ref = _core.linear(x, blob, "q2b", 16, n, bias=bias, isa="ref")
                assert np.all(np.abs(y_ref - y64) <= EPS32 * np.abs(y64) + EPS32 * 1e-3 * mag + 1e-30), (m, n, k)
                y = _core.linear(x, blob, "q2b", 16, n, bias=bias, isa=isa, threads=2)
                tol = (k // 16 + 8) * EPS32 * mag + 1e-30
                if isa != "ref":
                    tol = tol + _act_bound(x, deq, 16, "q2b", isa)
                err = np.abs(y.astype(np.float64) - y_ref)
                assert np.all(err <= tol), f"{isa} q2b M={m} N={n} K={k}: max excess {(err - tol).max()}"
                np.testing.assert_array_equal(y, _core.linear(x, blob, "q2b", 16, n, bias=bias, isa=isa, threads=1))
                if m == 1:  # 1-D input and QuantLinear take the same path
                    np.testing.assert_array_equal(QuantLinear(blob, "q2b", n, k, 16, bias=bias)(x[0], isa=isa), y[0])
                checked += 1
    assert checked > 50


@pytest.mark.parametrize("isa", [i for i in supported_isas() if i != "ref"])
def test_q2b_activation_groups_of_16_match_reference(rng, isa):
    x = rng.standard_normal((5, 384)).astype(np.float32) * np.float32(3.0)
    x[1, :16] = 0.0
    x[2, :] = np.round(x[2, :])
    q_ref, d_ref, s_ref = _core.quantize_acts(x, 16, isa="ref")
    q, d, s = _core.quantize_acts(x, 16, isa=isa)
    np.testing.assert_array_equal(d, d_ref)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(s, s_ref)
    assert d.shape == (5, 24)


def test_q2b_bad_input_raises_value_error(rng):
    n, k = 16, 128
    blob = qtypes.get("q2b").pack(rng.standard_normal((n, k)).astype(np.float32), 16)
    x = rng.standard_normal((2, k)).astype(np.float32)
    with pytest.raises(ValueError, match=r"\[linear\] expected group size 16 for q2b \(fixed by the type\), got 32"):
        _core.linear(x, blob, "q2b", 32, n)
    with pytest.raises(ValueError, match=r"\[linear\] expected K to be a positive multiple of 32 for q2b, got K=48"):
        _core.linear(np.zeros((1, 48), np.float32), blob, "q2b", 16, n)
    with pytest.raises(ValueError, match=r"\[linear\] expected w of \d+ bytes for q2b N=17"):
        _core.linear(x, blob, "q2b", 16, n + 1)
    with pytest.raises(ValueError, match="expected group size 32, 64 or 128, got 16"):
        _core.linear(x, qtypes.get("q4").pack(np.zeros((n, k), np.float32), 32), "q4", 16, n)
    with pytest.raises(ValueError, match=r"\[q2b.packed_size\] expected group size 16"):
        QuantLinear(blob, "q2b", n, k, 32)


# ---- avxvnni: the AVX2 loops with vpdpbusd; exact integer dots, so bit-identical to avx2 --
_VNNI = {"avx2", "avxvnni"} <= set(supported_isas())
_VNNI_SKIP = "needs a CPU with AVX2 and AVX-VNNI and a build with both (cmake: -mavxvnni)"


@pytest.mark.skipif(not _VNNI, reason=_VNNI_SKIP)
@pytest.mark.parametrize("name", QTYPES + ["q2b"])
def test_avxvnni_is_bit_identical_to_avx2(rng, name):
    """Both ISAs quantize the activations alike and sum the same u8 x s8 products exactly in
    int32 lanes (maddubs + madd vs vpdpbusd), then scale identically: equal outputs bit for
    bit, GEMV (M = 1, the 1- and 2-row passes) and GEMM (ragged tiles, K chunks), q8's sign
    trick and the extreme codes included."""
    t = qtypes.get(name)
    groups = [16] if name == "q2b" else [32, 64, 128]
    checked = 0
    for group in groups:
        for k in [32, 96, 160, 384, 1024, 4224]:  # tails, whole units, 2 K chunks + a tail
            if k % group or (name == "q2b" and k % 32):
                continue
            for n, m in [(1, 1), (37, 1), (9, 2), (33, 7), (17, 197)]:
                w = weights(rng, n, k, group)
                if n > 2:  # saturate the codes: full-scale groups of both signs
                    w[2, :group] = np.where(np.arange(group) % 2, 1.0, -1.0)
                blob = t.pack(w, group)
                x = rng.standard_normal((m, k)).astype(np.float32)
                x[:, :group] = np.where(np.arange(group) % 3, 4.0, -4.0)  # |q| = 127 activations
                bias = rng.standard_normal(n).astype(np.float32) if (n + m) % 2 else None
                for threads in (1, 2):
                    y2 = _core.linear(x, blob, name, group, n, bias=bias, isa="avx2", threads=threads)
                    yv = _core.linear(x, blob, name, group, n, bias=bias, isa="avxvnni", threads=threads)
                    np.testing.assert_array_equal(yv, y2, err_msg=f"{name} g{group} M={m} N={n} K={k} t={threads}")
                checked += 1
    assert checked >= 25


def test_default_isa_prefers_avxvnni_and_env_forces_avx2():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "EDGEVLM_ISA"}
    code = ("import numpy as np, edgevlm._core as c; "
            "y = c.linear(np.ones((1, 64), np.float32), np.zeros(c.packed_size('q4', 8, 64, 32), np.uint8), 'q4', 32, 8); "
            "print(c.default_isa(), ' '.join(c.supported_isas()))")
    run = lambda e: subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, check=True)
    default, *isas = run(env).stdout.split()
    best = next((i for i in ("avx512vnni", "avxvnni", "avx2", "neondot", "neon") if i in isas), "ref")
    assert default == best, (default, isas)
    if "avx2" in isas:
        assert run({**env, "EDGEVLM_ISA": "avx2"}).stdout.split()[0] == "avx2"
    if "avxvnni" not in isas:  # unsupported here: forcing it must fail with the reason, not crash
        bad = subprocess.run([sys.executable, "-c", code], env={**env, "EDGEVLM_ISA": "avxvnni"},
                             capture_output=True, text=True)
        assert bad.returncode != 0 and "avxvnni" in bad.stderr and "not" in bad.stderr


# ---- avx512vnni: zmm GEMM, one int32 lane per output; the same exact integer group dots as avx2 --
_AVX512 = "avx512vnni" in supported_isas()
_AVX512_SKIP = "needs a CPU with AVX-512 F/BW/VL + VNNI and a build with -mavx512vnni"


def _exact_from_int8(blob, name, n, k, group, q, d, s):
    """y[m, n] in float64 from the int8 activations the kernels use (q, d, s of quantize_acts) and the
    packed codes: sum_g scale d idot_g + min s  (idot exact in int64), and sum_g of |each term|."""
    t = qtypes.get(name)
    u = t.unpack(blob, n, k, group)
    g = k // group
    idot = np.einsum("ngc,mgc->mng", u.codes.astype(np.int64).reshape(n, g, group),
                     q.astype(np.int64).reshape(-1, g, group))                                   # [M, N, G]
    term = idot * u.scales.astype(np.float64)[None] * d.astype(np.float64)[:, None, :]
    mag = np.abs(term)
    if u.mins is not None:
        mt = u.mins.astype(np.float64)[None] * s.astype(np.float64)[:, None, :]
        term, mag = term + mt, mag + np.abs(mt)
    return term.sum(-1), mag.sum(-1)


@pytest.mark.skipif(not _AVX512, reason=_AVX512_SKIP)
@pytest.mark.parametrize("name", QTYPES)
def test_avx512vnni_gemm_is_exact_up_to_fp32_summation(rng, name):
    """The zmm GEMM (N in lanes, 16 x 4-code vpdpbusd; q8 as w + 128 with an exact int32
    correction) sums the same integer group dots as avx2 from the same int8 activations; only the
    fp32 summation of the K/group terms (plus one product and the bias) differs, so each output is
    within (2 K/group + 4) eps * sum_g |term| of the float64 sum of those terms (avx2 splits each
    group into 8 lane partials, so its bound is in lane terms; test_linear_matches_references
    bounds both against the reference). q8: the terms of both passes (x's int8 codes, then those
    of its residual, _residual), each pass summed in fp32 and the two outputs added: one more
    rounding, (2 K/group + 5) eps.
    Ragged M / N tiles, K chunks (K > 1024) and tails, threads 1 and 2 (bit-identical); GEMV rows
    (M = 1) are avxvnni's or avx2's kernels, bit for bit."""
    t = qtypes.get(name)
    checked = 0
    for group in qtypes.GROUP_SIZES:
        for k in [32, 96, 160, 1024, 1184]:
            if k % group:
                continue
            for n, m in [(1, 2), (17, 5), (49, 3), (100, 197), (7, 1)]:
                w = weights(rng, n, k, group)
                if n > 2:  # full-scale groups of both signs: extreme codes
                    w[2, :group] = np.where(np.arange(group) % 2, 1.0, -1.0)
                blob = t.pack(w, group)
                x = rng.standard_normal((m, k)).astype(np.float32)
                x[:, :group] = np.where(np.arange(group) % 3, 4.0, -4.0)  # |q| = 127 activations
                bias = rng.standard_normal(n).astype(np.float32) if (n + m) % 2 else None
                q, d, s = _core.quantize_acts(x, group, isa="avx2")
                exact, mag = _exact_from_int8(blob, name, n, k, group, q, d, s)
                if name == "q8":  # the residual's pass (linear.cc)
                    q2, d2, s2 = _core.quantize_acts(_residual(x, group, "avx2"), group, isa="avx2")
                    exact2, mag2 = _exact_from_int8(blob, name, n, k, group, q2, d2, s2)
                    exact, mag = exact + exact2, mag + mag2
                if bias is not None:
                    exact, mag = exact + bias, mag + np.abs(bias)
                tol = (2 * (k // group) + (5 if name == "q8" else 4)) * EPS32 * mag + 1e-30
                y = _core.linear(x, blob, name, group, n, bias=bias, isa="avx512vnni", threads=2)
                y1 = _core.linear(x, blob, name, group, n, bias=bias, isa="avx512vnni", threads=1)
                np.testing.assert_array_equal(y, y1)
                err = np.abs(y.astype(np.float64) - exact)
                assert np.all(err <= tol), f"{name} g{group} M={m} N={n} K={k}: max excess {(err - tol).max()}"
                if m == 1:
                    gemv_isa = "avxvnni" if "avxvnni" in supported_isas() else "avx2"
                    np.testing.assert_array_equal(y, _core.linear(x, blob, name, group, n, bias=bias, isa=gemv_isa))
                checked += 1
    assert checked >= 30
