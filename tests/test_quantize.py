"""Exporter quantizers (edgevlm/export/quantize.py): RTN == the qtypes reference bit for bit,
every result's ``deq`` is exactly what the packed file dequantizes to, the clipping search
never loses to RTN, GPTQ beats RTN on the layer-output error, the streaming Hessian, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import weights
from edgevlm import qtypes
from edgevlm.export.quantize import Hessian, QuantResult, gptq, output_error, rtn

QTYPES = ["q2", "q3", "q4", "q8"]
ASYM = ["q2", "q3", "q4"]


def _acts(rng: np.random.Generator, t: int, k: int, dead: tuple[int, ...] = ()) -> torch.Tensor:
    """Correlated calibration activations X [T, K] = Z @ A with a few outlier channels, and
    the columns in ``dead`` all zero (no signal reaches those inputs)."""
    z = rng.standard_normal((t, k)).astype(np.float32)
    a = (np.eye(k) + rng.standard_normal((k, k)) / np.sqrt(k) * 1.5).astype(np.float32)
    x = z @ a
    x[:, rng.choice(k, size=max(1, k // 32), replace=False)] *= 8.0   # outlier channels
    x[:, list(dead)] = 0.0
    return torch.from_numpy(x)


def _hessian(x: torch.Tensor) -> torch.Tensor:
    h = Hessian(x.shape[-1])
    h.add(x)
    return h.matrix()


def _check_exact(r: QuantResult, n: int, k: int) -> None:
    """deq is the file's dequantization bit for bit; codes, params have the file's dtypes/ranges."""
    qt = qtypes.get(r.qtype)
    g = k // r.group
    assert r.deq.dtype == torch.float32 and tuple(r.deq.shape) == (n, k)
    assert r.scales.dtype == np.float16 and r.scales.shape == (n, g)
    if qt.symmetric:
        assert r.codes.dtype == np.int8 and r.mins is None
        assert r.codes.min() >= -127 and r.codes.max() <= 127
    else:
        assert r.codes.dtype == np.uint8 and r.mins.dtype == np.float16 and r.mins.shape == (n, g)
        assert r.codes.max() <= (1 << qt.bits) - 1
    assert np.array_equal(r.deq.numpy(), qt.dequantize(r.pack(), n, k, r.group))
    assert torch.isfinite(r.deq).all()


def _group_err(w: torch.Tensor, deq: torch.Tensor, group: int, h: torch.Tensor | None = None) -> np.ndarray:
    """Per-group Σ h_k (w - deq)^2, float64 [N, G]."""
    d = (w - deq).double() ** 2
    if h is not None:
        d = d * h.double()[None, :]
    n, k = w.shape
    return d.reshape(n, k // group, group).sum(-1).numpy()


# ---- RTN -----------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("group", qtypes.GROUP_SIZES)
def test_rtn_matches_qtypes_reference(rng, qtype, group):
    n, k = 7, 2 * group * 3
    w = weights(rng, n, k, group)
    ref = qtypes.get(qtype).quantize(w, group)
    r = rtn(torch.from_numpy(w), qtype, group)
    assert np.array_equal(r.codes, ref.codes) and r.codes.dtype == ref.codes.dtype
    assert np.array_equal(r.scales.view(np.uint16), ref.scales.view(np.uint16))
    if ref.mins is None:
        assert r.mins is None
    else:
        assert np.array_equal(r.mins.view(np.uint16), ref.mins.view(np.uint16))
    assert np.array_equal(r.pack(), qtypes.get(qtype).pack(w, group))
    _check_exact(r, n, k)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_rtn_clip_search_exact_and_never_worse(rng, qtype, weighted):
    n, k, group = 9, 256, 32
    w = torch.from_numpy(weights(rng, n, k, group))
    w[5, 64:96] = torch.from_numpy(rng.standard_t(2, 32).astype(np.float32))   # heavy tails: clipping pays
    h = torch.from_numpy(rng.uniform(0.0, 4.0, k)) if weighted else None
    plain = rtn(w, qtype, group)
    clip = rtn(w, qtype, group, clip_search=True, h_diag=h)
    _check_exact(clip, n, k)
    e_plain, e_clip = _group_err(w, plain.deq, group, h), _group_err(w, clip.deq, group, h)
    assert (e_clip <= e_plain * (1 + 1e-9) + 1e-30).all()
    if qtype != "q8":                            # (q8's 255 levels rarely gain from clipping)
        assert e_clip.sum() < e_plain.sum()      # and it does find better ranges somewhere
    # A one-point grid or no shrink is plain RTN.
    for kw in ({"clip_grid": 1}, {"clip_max_shrink": 0.0}):
        assert np.array_equal(rtn(w, qtype, group, clip_search=True, **kw).deq.numpy(), plain.deq.numpy())


# ---- GPTQ ----------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("clip_search", [False, True])
def test_gptq_deq_is_file_dequantization(rng, qtype, act_order, clip_search):
    n, k, group = 11, 256, 64
    w = torch.from_numpy(weights(rng, n, k, group))   # zero / constant / outlier groups
    H = _hessian(_acts(rng, 512, k))
    r = gptq(w, H, qtype, group, act_order=act_order, clip_search=clip_search, block_size=64)
    _check_exact(r, n, k)
    assert r.qtype == qtype and r.group == group


@pytest.mark.parametrize("qtype", QTYPES)
def test_gptq_with_diagonal_hessian_is_rtn(rng, qtype):
    # H = c·I: no error feedback, and the params come from the untouched weights -> plain RTN,
    # which checks GPTQ's column quantizer against the reference op for op.
    n, k, group = 5, 256, 32
    w = torch.from_numpy(weights(rng, n, k, group))
    r = gptq(w, 3.0 * torch.eye(k), qtype, group)
    ref = rtn(w, qtype, group)
    assert np.array_equal(r.codes, ref.codes)
    assert np.array_equal(r.deq.numpy(), ref.deq.numpy())


@pytest.mark.parametrize("qtype", ASYM)
def test_gptq_beats_rtn_on_output_error(rng, qtype):
    n, k, group = 64, 256, 64
    w = torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32) * 0.05)
    x = _acts(rng, 2048, k)
    H = _hessian(x)
    e_rtn, energy = output_error(w, rtn(w, qtype, group).deq, H)
    for act_order in (False, True):
        for clip_search in (False, True):
            r = gptq(w, H, qtype, group, act_order=act_order, clip_search=clip_search)
            e_gptq, energy2 = output_error(w, r.deq, H)
            assert energy2 == energy
            # Plain GPTQ at 2 bits gains least (its min-max params see the error-inflated ranges);
            # static groups (act_order) or the clipping search recover several-fold gains.
            limit = 0.97 if (qtype == "q2" and not act_order and not clip_search) else 0.75
            assert e_gptq < limit * e_rtn, (act_order, clip_search, e_gptq / energy, e_rtn / energy)


def test_output_error_is_calibration_output_error(rng):
    n, k = 8, 64
    x = _acts(rng, 300, k).double()
    w = torch.from_numpy(rng.standard_normal((n, k)))
    q = w + 0.01 * torch.from_numpy(rng.standard_normal((n, k)))
    err, energy = output_error(w.float(), q.float(), _hessian(x.float()))
    wf, qf = w.float().double(), q.float().double()   # what output_error sees
    y, yq = x @ wf.T, x @ qf.T
    np.testing.assert_allclose(err, 2 * ((y - yq) ** 2).sum().item() / 300, rtol=1e-4)
    np.testing.assert_allclose(energy, 2 * (y ** 2).sum().item() / 300, rtol=1e-4)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("qtype", ["q2", "q8"])
def test_gptq_dead_columns(rng, act_order, qtype):
    n, k, group = 6, 128, 32
    dead = (0, 5, 33, 34, 127)
    w = torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32))
    H = _hessian(_acts(rng, 256, k, dead=dead))
    assert (torch.diagonal(H)[list(dead)] == 0).all()
    r = gptq(w, H, qtype, group, act_order=act_order, clip_search=True)
    _check_exact(r, n, k)
    err, energy = output_error(w, r.deq, H)
    assert np.isfinite(err) and 0 <= err < energy
    # No activations at all: H = 0 must not break the Cholesky either.
    _check_exact(gptq(w, torch.zeros(k, k), qtype, group, act_order=act_order), n, k)


def test_gptq_block_size_not_multiple_of_group(rng):
    n, k = 4, 256
    w = torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32))
    H = _hessian(_acts(rng, 256, k))
    for bs in (1, 100, 1000):
        _check_exact(gptq(w, H, "q3", 64, block_size=bs), n, k)


# ---- Hessian -------------------------------------------------------------------------------
def test_hessian_weights_and_leading_dims(rng):
    k = 48
    x = torch.from_numpy(rng.standard_normal((3, 10, k)).astype(np.float32))
    flat = x.reshape(-1, k).double()

    plain = Hessian(k)
    plain.add(x)
    assert plain.n_tokens == 30
    ref = 2 * flat.T @ flat / 30
    assert plain.matrix().dtype == torch.float32
    np.testing.assert_allclose(plain.matrix().numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)

    ones = Hessian(k)
    ones.add(x, torch.ones(3, 10))
    np.testing.assert_allclose(ones.matrix().numpy(), plain.matrix().numpy(), rtol=1e-6, atol=1e-6)

    c = torch.from_numpy(rng.uniform(0.0, 3.0, (3, 10)).astype(np.float32))
    c[0, :4] = 0.0                                      # padding tokens
    weighted = Hessian(k)
    weighted.add(x[:2], c[:2])                          # streaming: two calls == one
    weighted.add(x[2:], c[2:])
    cf = c.reshape(-1).double()
    ref_w = 2 * flat.T @ (cf[:, None] * flat) / cf.sum()
    np.testing.assert_allclose(weighted.matrix().numpy(), ref_w.numpy(), rtol=1e-5, atol=1e-5)
    assert torch.equal(weighted.matrix(), weighted.matrix().T)
    assert weighted.n_tokens == 26                      # zero-weight (padding) tokens not counted
    assert weighted.total_weight == pytest.approx(float(cf.sum()))

    empty = Hessian(k)
    empty.add(x, torch.zeros(3, 10))
    assert torch.equal(empty.matrix(), torch.zeros(k, k))

    bf = Hessian(k)
    bf.add(x.to(torch.bfloat16))                         # model dtype activations are fine
    assert bf.matrix().dtype == torch.float32 and bf.n_tokens == 30


def test_hessian_bad_input():
    h = Hessian(16)
    with pytest.raises(ValueError, match=r"\[Hessian.add\].*K = 16"):
        h.add(torch.zeros(4, 8))
    with pytest.raises(ValueError, match=r"\[Hessian.add\].*token_weight"):
        h.add(torch.zeros(2, 3, 16), torch.ones(6))
    with pytest.raises(ValueError, match=r"\[Hessian.add\].*non-negative"):
        h.add(torch.zeros(2, 16), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match=r"\[Hessian.add\].*finite"):
        h.add(torch.full((2, 16), float("nan")))
    with pytest.raises(ValueError, match=r"\[Hessian\]"):
        Hessian(0)


# ---- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["rtn", "gptq"])
def test_bad_input_names_the_op(op):
    w = torch.zeros(4, 256)

    def call(w=w, qtype="q4", group=64, H=None, **kw):
        if op == "rtn":
            return rtn(w, qtype, group, **kw)
        return gptq(w, torch.eye(w.shape[1]) if H is None else H, qtype, group, **kw)

    with pytest.raises(ValueError, match=rf"\[{op}\].*qtype.*'q5'"):
        call(qtype="q5")
    with pytest.raises(ValueError, match=rf"\[{op}\].*group.*48"):
        call(group=48)
    with pytest.raises(ValueError, match=rf"\[{op}\].*multiple of group = 128.*\[4, 192\]"):
        call(w=torch.zeros(4, 192), group=128, H=torch.eye(192))
    with pytest.raises(ValueError, match=rf"\[{op}\].*2-D"):
        call(w=torch.zeros(256), H=torch.eye(256))
    bad = w.clone()
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match=rf"\[{op}\].*finite.*\(1, 2\)"):
        call(w=bad)
    if op == "gptq":
        with pytest.raises(ValueError, match=r"\[gptq\] expected H of shape \[K, K\] = \[256, 256\], got \[128, 128\]"):
            call(H=torch.eye(128))
        with pytest.raises(ValueError, match=r"\[gptq\].*damp"):
            call(damp=0.0)
        with pytest.raises(ValueError, match=r"\[gptq\] Cholesky .*\[4, 256\]"):
            call(H=-torch.eye(256))                      # not positive definite at any damping
    else:
        with pytest.raises(ValueError, match=r"\[rtn\] expected h_diag of shape \[K\] = \[256\]"):
            call(clip_search=True, h_diag=torch.ones(128))
        with pytest.raises(ValueError, match=r"\[rtn\].*clip_max_shrink"):
            call(clip_search=True, clip_max_shrink=1.0)


def test_output_error_bad_shapes():
    with pytest.raises(ValueError, match=r"\[output_error\]"):
        output_error(torch.zeros(4, 64), torch.zeros(4, 32), torch.eye(64))
    with pytest.raises(ValueError, match=r"\[output_error\] expected H of shape \[K, K\] = \[64, 64\]"):
        output_error(torch.zeros(4, 64), torch.zeros(4, 64), torch.eye(32))


@pytest.mark.parametrize("qtype", QTYPES)
def test_refit_exact_and_never_worse_per_row(rng, qtype):
    """refit keeps the codes, its deq is the file's dequantization, and no row's output error
    rises (rows only take the new params when they help); on GPTQ and RTN results of correlated
    activations it lowers the total error (q8 is symmetric: returned unchanged)."""
    from edgevlm.export.quantize import refit

    n, k, group = 16, 256, 64
    w = torch.from_numpy(weights(rng, n, k, group))   # zero / constant / outlier groups
    H = _hessian(_acts(rng, 1024, k))
    for r in (gptq(w, H, qtype, group, act_order=True, clip_search=True), rtn(w, qtype, group)):
        f = refit(r, w, H)
        if qtype == "q8":
            assert f is r
            continue
        _check_exact(f, n, k)
        assert np.array_equal(f.codes, r.codes)
        d0, d1 = (w - r.deq).double(), (w - f.deq).double()
        e0 = ((d0 @ H.double()) * d0).sum(1)
        e1 = ((d1 @ H.double()) * d1).sum(1)
        assert (e1 <= e0).all()
        assert e1.sum() < 0.995 * e0.sum(), (e1.sum() / e0.sum())


def test_gptq_fixed_params(rng):
    """gptq(params=...) uses exactly the given group params, in either column order."""
    n, k, group = 8, 256, 64
    w = torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32))
    H = _hessian(_acts(rng, 512, k))
    ref = gptq(w, H, "q3", group, clip_search=True)
    for act_order in (False, True):
        r = gptq(w, H, "q3", group, act_order=act_order, params=(ref.scales, ref.mins))
        _check_exact(r, n, k)
        assert np.array_equal(r.scales, ref.scales) and np.array_equal(r.mins, ref.mins)
    with pytest.raises(ValueError, match="params"):
        gptq(w, H, "q3", group, params=(ref.scales[:, :1], ref.mins))
