"""The C++ Q-TTA step (edgevlm._core.QttaState, csrc/ops/qtta_ops.cc) against its numpy twin
(QTTA._step, QTTABackend.NUMPY): the same decisions and cache contents on streams, logits within
float64 rounding."""

from __future__ import annotations

import math

import numpy as np
import pytest

from test_adapt import shifted_stream, unit

from edgevlm import _core
from edgevlm.adapt import QTTA, QTTABackend, QTTAConfig, StreamStates, quantize_int8

if not hasattr(_core, "QttaState"):  # pragma: no cover
    pytest.skip("edgevlm._core was built without the Q-TTA op (make setup)", allow_module_level=True)

DEMO = QTTAConfig(alpha_p=5.0, beta_p=8.0, alpha_n=0.3)  # benchmarks/demo_shift.py's weights


def _pair(T, cfg):
    return QTTA(T, cfg, backend=QTTABackend.NUMPY), QTTA(T, cfg, backend=QTTABackend.NATIVE)


def _logit_tol(cfg: QTTAConfig, C: int, D: int, z: np.ndarray) -> np.ndarray:
    """|z_native - z_numpy| bound. Both evaluate the same float64 expression, in other summation
    orders and with other exp implementations (each within an ulp), so each is within
    n·2^-52·M of the exact value: n = D + C·cap + 8 (the longest sum) and M bounds the terms,
    M = logit_scale + α_p·k_p·e^{β_p·g} + α_n·C·k_n·e^{β_n·g}, where a cache weight
    e^{−β(1−f̂·k̂)} <= e^{β·g}, g = (1+ε)² − 1, ε = √D/254 bounding ||x̂|| − 1 for an int8 code of a
    unit vector (|x − x̂| <= s/2 <= 1/254 per element). Both then round to float32: + 1 ulp of |z|."""
    n = D + C * max(cfg.pos_capacity, cfg.neg_capacity) + 8
    g = (1 + math.sqrt(D) / 254) ** 2 - 1
    M = cfg.logit_scale + cfg.alpha_p * cfg.pos_capacity * math.exp(cfg.beta_p * g) \
        + cfg.alpha_n * C * cfg.neg_capacity * math.exp(cfg.beta_n * g)
    return 2 * n * 2.0**-52 * M + np.spacing(np.abs(z).astype(np.float32)).astype(np.float64)


@pytest.mark.parametrize("C,D,cfg", [(10, 128, DEMO), (20, 32, QTTAConfig()), (100, 128, QTTAConfig()),
                                     (7, 33, QTTAConfig(pos_capacity=5, neg_capacity=4, neg_entropy=(0.05, 0.9)))])
def test_native_step_makes_the_same_decisions_and_caches(C, D, cfg):
    T, F, _ = shifted_stream(C, C=C, D=D, n=1500)
    a, b = _pair(T, cfg)
    assert (a.backend, b.backend) == (QTTABackend.NUMPY, QTTABackend.NATIVE)
    for i in range(0, len(F), 100):  # single features, then batches: the same stream in order
        za = np.concatenate([np.stack([a(f) for f in F[i:i + 50]]), a(F[i + 50:i + 100])])
        zb = np.concatenate([np.stack([b(f) for f in F[i:i + 50]]), b(F[i + 50:i + 100])])
        assert zb.dtype == np.float32 and zb.shape == za.shape
        np.testing.assert_array_equal(za.argmax(1), zb.argmax(1))
        assert np.all(np.abs(za.astype(np.float64) - zb) <= _logit_tol(cfg, C, D, za))
        sa, sb = a.state_dict(), b.state_dict()
        for k in sa:  # int8 keys, fp16 scales, float32 entropies, masks, counts: identical
            np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
    pos, neg = b.cache_sizes()
    assert pos == C * cfg.pos_capacity and neg > 0  # the stream filled, replaced and gated
    # reading without adapting and zero-shot
    np.testing.assert_array_equal(a(F[:20], adapt=False).argmax(1), b(F[:20], adapt=False).argmax(1))
    assert np.all(np.abs(a.zero_shot(F[:20]) - b.zero_shot(F[:20])) <= _logit_tol(cfg, C, D, a.zero_shot(F[:20])))
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(v, b.state_dict()[k])


def test_native_state_is_the_numpy_arrays():
    # reset / load_state_dict write into the arrays the C++ step reads: a loaded native adapter
    # continues exactly as the numpy adapter it was saved from.
    T, F, _ = shifted_stream(2, n=400)
    a, b = _pair(T, QTTAConfig())
    a(F[:200])
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a(F[200:]).argmax(1), b(F[200:]).argmax(1))
    b.reset()
    np.testing.assert_array_equal(b(F[:30], adapt=False), b.zero_shot(F[:30]))


def test_native_rejects_bad_features_before_any_update():
    T, F, _ = shifted_stream(3, n=10)
    q = QTTA(T, backend=QTTABackend.NATIVE)
    bad = F.copy()
    bad[5] *= 2.0  # row 5 not unit: nothing of the batch may be inserted
    for x in (bad, np.full(T.shape[1], np.nan), F[0][:-1], F[0].astype(np.int32), F[None]):
        with pytest.raises(ValueError):
            q(x)
    assert q.cache_sizes() == (0, 0)
    q(F[0].tolist())  # a list is converted, as on the numpy path
    q(np.asfortranarray(F[:3]))
    assert q.cache_sizes()[0] == 4
    with pytest.raises(ValueError, match="int8_keys"):
        QTTA(T, QTTAConfig(int8_keys=False), backend=QTTABackend.NATIVE)
    with pytest.raises(ValueError, match="QTTABackend"):
        QTTA(T, backend="native")
    assert QTTA(T, QTTAConfig(int8_keys=False)).backend is QTTABackend.NUMPY
    assert StreamStates(T).get("cam").backend is QTTABackend.NATIVE


def test_native_quantizer_is_the_numpy_one():
    rng = np.random.default_rng(0)
    xs = [unit(rng.standard_normal(d)) for d in (1, 7, 128, 512)]
    xs += [np.zeros(5), np.eye(1, 9)[0], np.array([1e-7, -3e-8, 0.0]),  # subnormal fp16 scales
           np.array([127.5, -0.5, 1.5, 2.5]) / 127.5 * 0.7,               # ties: rint is half-to-even
           unit(rng.standard_normal(64)) * 1.004]
    for x in xs:
        q, h = _core.qtta_quantize_int8(x)
        qr, sr = quantize_int8(x)
        np.testing.assert_array_equal(q, qr)
        assert h == int(np.asarray(sr).view(np.uint16))
