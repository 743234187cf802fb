"""LQA's Q-TTA: TDA's training-free cache adapter with INT8 keys, in a fixed memory budget.

This is TDA (design.md Part 2 §1, the released ``kdiAAA/TDA`` code) with every stored tensor
in low precision (§2.2 Stage B). For each test feature f (L2-normalised) of a stream:

1. zero-shot logits  z0 = logit_scale · W f,  p = softmax(z0),  ŷ = argmax z0,
   H = −Σ p ln p (nats) and the gating entropy h = H / log2(C)  (TDA's nats/bits quirk, kept so
   TDA's thresholds mean the same thing);
2. positive cache: insert (f, H) under ŷ. A class list holds at most ``pos_capacity`` entries,
   sorted by ascending H; when full, the new entry replaces the worst (largest-H) one only if
   its H is strictly smaller. No entropy gate;
3. negative cache: only if ``neg_entropy[0] < h < neg_entropy[1]``, insert (f, H, mask) under ŷ
   with the same policy and ``neg_capacity``; mask[c] = 1 iff ``neg_mask[0] < p_c < neg_mask[1]``;
4. z = z0 + z_p − z_n with
   z_p[c] = α_p Σ_{keys k of class c} exp(−β_p (1 − f·k)),
   z_n[c] = α_n Σ_{all negative keys k} exp(−β_n (1 − f·k)) · mask_k[c].
   The current sample is already in the caches when its own logits are computed (TDA's order).

Storage (all preallocated at construction; a stream of any length never allocates state):

- positive cache: keys ``[C, k_p, D]`` int8, per-key scale ``[C, k_p]`` float16, entropy
  ``[C, k_p]`` float32, fill count ``[C]`` int32;
- negative cache: keys ``[C, k_n, D]`` int8, scale float16, entropy float32, class masks packed
  1 bit per class ``[C, k_n, ceil(C/8)]`` uint8 (``np.packbits``), fill count ``[C]`` int32;
- the float32 classifier ``[C, D]`` when the adapter holds its own copy (a :class:`StreamStates`
  shares one copy between all its streams and accounts for it once).

INT8 keys use a symmetric per-vector quantizer: s = max|f|/127 rounded *up* to float16 (so
|f − s·q| ≤ s/2 elementwise holds with the stored scale), q = round(f/s) ∈ [−127, 127]. The query
is quantized the same way and affinities are ``(q_f · q_k)`` accumulated in int32, times s_f·s_k.
With ``int8_keys=False`` keys are float32 and there are no scales: that is the TDA baseline.

Entropies are stored (and compared) as float32. Zero-shot logits, entropies and cache logits
are computed in float64 from the stored float32 classifier; returned logits are float32.

Only numpy is imported here (never torch): this runs on the device next to the runtime.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
from dataclasses import dataclass

import numpy as np

try:  # the C++ step (csrc/ops/qtta_ops.h); the numpy step below is its twin and the fallback
    from edgevlm import _core
except ImportError:  # pragma: no cover - extension not built
    _core = None

__all__ = ["QTTAConfig", "QTTA", "QTTABackend", "quantize_int8"]

_NORM_TOL = 1e-2  # how far from unit norm a classifier row / feature may be
_NATIVE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True)
class QTTAConfig:
    """Q-TTA hyperparameters. Defaults are TDA's (design.md §1.4, ImageNet row).

    pos_capacity / neg_capacity: entries per class (0 disables that cache).
    alpha_p, beta_p / alpha_n, beta_n: cache-logit weight and affinity sharpness.
    neg_entropy: open interval of normalized entropy h = H/log2(C) admitting a negative entry.
    neg_mask: open interval of p_c that sets class c in a negative entry's mask.
    logit_scale: CLIP's logit scale (100).
    int8_keys: INT8 keys + float16 scales (LQA) rather than float32 keys (TDA).
    memory_budget_bytes: if set, construction fails unless ``QTTA.bytes_for`` fits in it.
    """

    pos_capacity: int = 3
    neg_capacity: int = 2
    alpha_p: float = 2.0
    beta_p: float = 5.0
    alpha_n: float = 0.117
    beta_n: float = 1.0
    neg_entropy: tuple[float, float] = (0.2, 0.5)
    neg_mask: tuple[float, float] = (0.03, 1.0)
    logit_scale: float = 100.0
    int8_keys: bool = True
    memory_budget_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("pos_capacity", "neg_capacity"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
            object.__setattr__(self, name, int(v))
        for name in ("alpha_p", "beta_p", "alpha_n", "beta_n", "logit_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise ValueError(f"{name} must be a number, got {v!r}")
            v = float(v)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {v!r}")
            object.__setattr__(self, name, v)
        if self.logit_scale <= 0:
            raise ValueError(f"logit_scale must be > 0, got {self.logit_scale!r}")
        for name in ("neg_entropy", "neg_mask"):
            v = getattr(self, name)
            try:
                lo, hi = (float(x) for x in v)
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be a pair (lower, upper), got {v!r}") from None
            if not (math.isfinite(lo) and math.isfinite(hi)) or not (0.0 <= lo < hi):
                raise ValueError(f"{name} must satisfy 0 <= lower < upper (finite), got {v!r}")
            object.__setattr__(self, name, (lo, hi))
        if not isinstance(self.int8_keys, (bool, np.bool_)):
            raise ValueError(f"int8_keys must be a bool, got {self.int8_keys!r}")
        object.__setattr__(self, "int8_keys", bool(self.int8_keys))
        b = self.memory_budget_bytes
        if b is not None:
            if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b <= 0:
                raise ValueError(f"memory_budget_bytes must be a positive integer or None, got {b!r}")
            object.__setattr__(self, "memory_budget_bytes", int(b))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> QTTAConfig:
        d = json.loads(s)
        for k in ("neg_entropy", "neg_mask"):
            d[k] = tuple(d[k])
        return cls(**d)


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.float16]:
    """Symmetric per-vector INT8: returns (q int8 [D], scale float16) with |x − scale·q| ≤ scale/2.

    scale = max|x|/127 rounded up to the next float16, so the bound holds for the stored scale;
    an all-zero vector gets scale 1 and q = 0.
    """
    x = np.asarray(x, dtype=np.float64)
    m = float(np.max(np.abs(x))) if x.size else 0.0
    if m == 0.0:
        return np.zeros(x.shape, np.int8), np.float16(1.0)
    s = m / 127.0
    s16 = np.float16(s)
    if float(s16) < s:  # also lifts an underflow to 0 to the smallest subnormal
        s16 = np.nextafter(s16, np.float16(np.inf))
    q = np.clip(np.rint(x / float(s16)), -127, 127).astype(np.int8)
    return q, s16


class QTTABackend(enum.Enum):
    """Which implementation runs a step. Both compute the same thing (tests/test_adapt.py):

    NUMPY: ``QTTA._step`` below, the definition (and the only one for float32 keys);
    NATIVE: ``edgevlm._core.QttaState`` (csrc/ops/qtta_ops.cc), one C++ call per feature or
    batch; int8 keys only; the same predictions and cache contents, logits within float64
    rounding of the numpy step's;
    AUTO: NATIVE when the extension has it and ``int8_keys``, else NUMPY.
    """

    AUTO = "auto"
    NATIVE = "native"
    NUMPY = "numpy"


def _native_available() -> bool:
    return _core is not None and hasattr(_core, "QttaState")


def _mask_bytes(num_classes: int) -> int:
    return (num_classes + 7) // 8


class QTTA:
    """Q-TTA cache adapter for one stream (a camera, a session) over a fixed label set.

    ``text_classifier``: [C, D] L2-normalised class embeddings (rows). The adapter keeps a float32
    copy unless ``copy_classifier=False`` and the array already is float32 C-contiguous, in which
    case it is shared (and not counted in :attr:`nbytes`).
    """

    def __init__(
        self,
        text_classifier: np.ndarray,
        config: QTTAConfig = QTTAConfig(),
        *,
        copy_classifier: bool = True,
        backend: QTTABackend = QTTABackend.AUTO,
    ) -> None:
        if not isinstance(config, QTTAConfig):
            raise TypeError(f"config must be a QTTAConfig, got {type(config).__name__}")
        if not isinstance(backend, QTTABackend):
            raise ValueError(f"backend must be a QTTABackend, got {backend!r} (use QTTABackend.AUTO)")
        if backend is QTTABackend.NATIVE and not config.int8_keys:
            raise ValueError("backend=QTTABackend.NATIVE needs int8_keys=True (float32 keys run on NUMPY); "
                             "use QTTABackend.AUTO")
        if backend is QTTABackend.NATIVE and not _native_available():
            raise ValueError("backend=QTTABackend.NATIVE needs edgevlm._core with QttaState (rebuild the "
                             "extension: make setup); use QTTABackend.AUTO to fall back to numpy")
        w = np.asarray(text_classifier)
        if w.ndim != 2 or w.shape[0] < 2 or w.shape[1] < 1:
            raise ValueError(f"text_classifier must be [C >= 2, D >= 1], got shape {w.shape}")
        if not np.issubdtype(w.dtype, np.floating):
            raise ValueError(f"text_classifier must be floating point, got {w.dtype}")
        if not np.all(np.isfinite(w)):
            raise ValueError("text_classifier has non-finite values")
        norms = np.linalg.norm(w.astype(np.float64), axis=1)
        if np.any(np.abs(norms - 1.0) > _NORM_TOL):
            raise ValueError(
                "text_classifier rows must be L2-normalised (norms in "
                f"[{norms.min():.4f}, {norms.max():.4f}])"
            )
        shared = (not copy_classifier) and w.dtype == np.float32 and w.flags.c_contiguous
        self._owns_classifier = not shared
        self._W = w if shared else np.ascontiguousarray(w, dtype=np.float32).copy()
        if self._owns_classifier:
            self._W.flags.writeable = False
        self.config = config
        C, D = self._W.shape
        self.num_classes, self.dim = C, D

        need = self.bytes_for(C, D, config, include_classifier=self._owns_classifier)
        if config.memory_budget_bytes is not None and need > config.memory_budget_bytes:
            raise ValueError(self._budget_message(C, D, config, self._owns_classifier, need))

        key_dtype = np.int8 if config.int8_keys else np.float32
        kp, kn = config.pos_capacity, config.neg_capacity
        self._pos_keys = np.zeros((C, kp, D), key_dtype)
        self._pos_ent = np.zeros((C, kp), np.float32)
        self._pos_count = np.zeros(C, np.int32)
        self._neg_keys = np.zeros((C, kn, D), key_dtype)
        self._neg_ent = np.zeros((C, kn), np.float32)
        self._neg_masks = np.zeros((C, kn, _mask_bytes(C)), np.uint8)
        self._neg_count = np.zeros(C, np.int32)
        if config.int8_keys:
            self._pos_scale = np.zeros((C, kp), np.float16)
            self._neg_scale = np.zeros((C, kn), np.float16)
        else:
            self._pos_scale = None
            self._neg_scale = None
        self._log2c = math.log2(C)
        self._slot = (np.arange(kp), np.arange(kn))
        self._sha256: str | None = None  # of the classifier, computed when state is first saved / loaded
        # The C++ step works on these very arrays (scales as their binary16 bits), in place.
        use_native = config.int8_keys and backend is not QTTABackend.NUMPY and _native_available()
        self.backend = QTTABackend.NATIVE if use_native else QTTABackend.NUMPY
        self._native = None
        if use_native:
            self._native = _core.QttaState(
                self._W, self._pos_keys, self._pos_scale.view(np.uint16), self._pos_ent, self._pos_count,
                self._neg_keys, self._neg_scale.view(np.uint16), self._neg_ent, self._neg_masks, self._neg_count,
                config.logit_scale, config.alpha_p, config.beta_p, config.alpha_n, config.beta_n,
                *config.neg_entropy, *config.neg_mask)

    # ------------------------------------------------------------------ memory accounting
    @staticmethod
    def bytes_for(
        num_classes: int, dim: int, config: QTTAConfig = QTTAConfig(), *, include_classifier: bool = True
    ) -> int:
        """Bytes of state a QTTA over C classes of dimension D holds (exact, and an upper bound:
        it is all preallocated). ``include_classifier``: count a float32 [C, D] classifier copy."""
        C, D = int(num_classes), int(dim)
        kp, kn = config.pos_capacity, config.neg_capacity
        key = 1 if config.int8_keys else 4
        scale = 2 if config.int8_keys else 0
        per_pos = D * key + scale + 4  # key + scale + float32 entropy
        per_neg = D * key + scale + 4 + _mask_bytes(C)  # + packed mask
        total = C * (kp * per_pos + kn * per_neg) + 2 * C * 4  # + two int32 fill counts
        if include_classifier:
            total += C * D * 4
        return total

    @staticmethod
    def _budget_message(C: int, D: int, config: QTTAConfig, include_classifier: bool, need: int) -> str:
        budget = config.memory_budget_bytes
        hints = []
        if not config.int8_keys:
            alt = dataclasses.replace(config, int8_keys=True, memory_budget_bytes=None)
            n = QTTA.bytes_for(C, D, alt, include_classifier=include_classifier)
            if n <= budget:
                hints.append(f"int8_keys=True needs {n} bytes and fits")
        fits = None
        pairs = [(kp, kn) for kp in range(config.pos_capacity + 1) for kn in range(config.neg_capacity + 1)]
        for kp, kn in sorted(pairs, key=lambda t: (t[0] + t[1], t[0]), reverse=True):
            alt = dataclasses.replace(config, pos_capacity=kp, neg_capacity=kn, memory_budget_bytes=None)
            if QTTA.bytes_for(C, D, alt, include_classifier=include_classifier) <= budget:
                fits = (kp, kn)
                break
        if fits is not None:
            hints.append(f"reduce capacities, e.g. pos_capacity={fits[0]}, neg_capacity={fits[1]} fits")
        else:
            base = QTTA.bytes_for(C, D, dataclasses.replace(config, pos_capacity=0, neg_capacity=0,
                                                          memory_budget_bytes=None),
                                  include_classifier=include_classifier)
            hints.append(f"even empty caches need {base} bytes (classifier and counters)")
        per_class = need // C
        return (
            f"Q-TTA state for C={C}, D={D} (pos_capacity={config.pos_capacity}, "
            f"neg_capacity={config.neg_capacity}, int8_keys={config.int8_keys}) needs {need} bytes "
            f"(~{per_class} per class) > memory_budget_bytes={budget}; " + "; ".join(hints or ["reduce C or D"])
        )

    @property
    def nbytes(self) -> int:
        """Bytes of all state held: keys, scales, entropies, masks, counts, classifier copy if owned."""
        n = sum(a.nbytes for a in self._state_arrays().values())
        if self._owns_classifier:
            n += self._W.nbytes
        return n

    @property
    def classifier(self) -> np.ndarray:
        return self._W

    @property
    def _digest(self) -> str:
        """SHA-256 of the float32 classifier. Lazy: hashlib loads OpenSSL (~4 MB resident), which a
        stream that never saves or loads its state does not need."""
        if self._sha256 is None:
            import hashlib

            self._sha256 = hashlib.sha256(np.ascontiguousarray(self._W, np.float32).tobytes()).hexdigest()
        return self._sha256

    def _state_arrays(self) -> dict[str, np.ndarray]:
        d = {
            "pos_keys": self._pos_keys,
            "pos_entropy": self._pos_ent,
            "pos_count": self._pos_count,
            "neg_keys": self._neg_keys,
            "neg_entropy": self._neg_ent,
            "neg_masks": self._neg_masks,
            "neg_count": self._neg_count,
        }
        if self._pos_scale is not None:
            d["pos_scale"] = self._pos_scale
            d["neg_scale"] = self._neg_scale
        return d

    # ------------------------------------------------------------------ state management
    def reset(self) -> None:
        """Forget everything learned from the stream (outputs become zero-shot again)."""
        for a in self._state_arrays().values():
            a.fill(0)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the cache arrays plus ``config`` (JSON) and ``classifier_sha256`` (both 0-d
        unicode arrays, so ``np.load(..., allow_pickle=False)`` reads them)."""
        d = {k: v.copy() for k, v in self._state_arrays().items()}
        d["config"] = np.array(self.config.to_json())
        d["classifier_sha256"] = np.array(self._digest)
        return d

    def load_state_dict(self, state: dict[str, np.ndarray], *, strict: bool = True) -> None:
        """Restore a :meth:`state_dict` in place (into the preallocated arrays).

        The configuration must match (``memory_budget_bytes`` aside); with ``strict`` the
        classifier must be the same one too (by SHA-256 of its float32 bytes).
        """
        if "config" in state:
            other = QTTAConfig.from_json(str(np.asarray(state["config"])[()]))
            mine = dataclasses.replace(self.config, memory_budget_bytes=None)
            if dataclasses.replace(other, memory_budget_bytes=None) != mine:
                raise ValueError(f"state was saved with a different config: {other} != {self.config}")
        elif strict:
            raise ValueError("state has no 'config' entry")
        if strict:
            digest = str(np.asarray(state["classifier_sha256"]).item()) if "classifier_sha256" in state else ""
            if digest != self._digest:
                raise ValueError("state was saved for a different text classifier (sha256 mismatch)")
        arrays = self._state_arrays()
        missing = sorted(set(arrays) - set(state))
        if missing:
            raise ValueError(f"state is missing {missing}")
        for k, dst in arrays.items():
            src = np.asarray(state[k])
            if src.shape != dst.shape or src.dtype != dst.dtype:
                raise ValueError(f"state[{k!r}] is {src.dtype}{list(src.shape)}, expected {dst.dtype}{list(dst.shape)}")
        for name, count, cap in (("pos_count", "pos_count", self.config.pos_capacity),
                                 ("neg_count", "neg_count", self.config.neg_capacity)):
            c = np.asarray(state[count])
            if np.any(c < 0) or np.any(c > cap):
                raise ValueError(f"state[{name!r}] out of range [0, {cap}]")
        for k, dst in arrays.items():
            np.copyto(dst, state[k])

    def save(self, path: str | os.PathLike) -> None:
        """Write the state as an uncompressed .npz (no pickled objects)."""
        with open(path, "wb") as fh:
            np.savez(fh, **self.state_dict())

    def load(self, path: str | os.PathLike, *, strict: bool = True) -> None:
        with np.load(path, allow_pickle=False) as z:
            self.load_state_dict({k: z[k] for k in z.files}, strict=strict)

    # ------------------------------------------------------------------ inference
    def _check_features(self, feature: np.ndarray) -> tuple[np.ndarray, bool]:
        f = np.asarray(feature)
        single = f.ndim == 1
        if f.ndim not in (1, 2) or f.shape[-1] != self.dim:
            raise ValueError(f"feature must be [D] or [B, D] with D={self.dim}, got shape {f.shape}")
        if not np.issubdtype(f.dtype, np.floating):
            raise ValueError(f"feature must be floating point, got {f.dtype}")
        f = np.atleast_2d(f).astype(np.float64, copy=False)
        if not np.all(np.isfinite(f)):
            raise ValueError("feature has non-finite values")
        norms = np.linalg.norm(f, axis=1)
        if np.any(np.abs(norms - 1.0) > _NORM_TOL):
            raise ValueError(f"features must be L2-normalised (norms in [{norms.min():.4f}, {norms.max():.4f}])")
        return f, single

    def _zero_shot64(self, f: np.ndarray) -> np.ndarray:
        # einsum in float64 avoids materialising a float64 copy of W (and is faster than W @ f64).
        return self.config.logit_scale * np.einsum("cd,d->c", self._W, f, dtype=np.float64)

    def zero_shot(self, feature: np.ndarray) -> np.ndarray:
        """Zero-shot logits logit_scale · W f, float32 [C] or [B, C]; no cache, no update."""
        if self._native is not None and (f := self._native_input(feature)) is not None:
            return self._native.step(f, 0, _NORM_TOL)
        f, single = self._check_features(feature)
        z = self.config.logit_scale * np.einsum("cd,bd->bc", self._W, f, dtype=np.float64)
        z = z.astype(np.float32)
        return z[0] if single else z

    def __call__(self, feature: np.ndarray, *, adapt: bool = True) -> np.ndarray:
        """Adapted logits for one feature [D] or a batch [B, D] (float32 [C] / [B, C]).

        With ``adapt`` (default) rows are processed in order as a stream: each row first updates
        the caches, then gets its logits from them (TDA's order). ``adapt=False`` reads the caches
        without changing them.
        """
        if self._native is not None and (f := self._native_input(feature)) is not None:
            return self._native.step(f, 2 if adapt else 1, _NORM_TOL)
        f, single = self._check_features(feature)
        out = np.empty((f.shape[0], self.num_classes), np.float32)
        for i in range(f.shape[0]):
            out[i] = self._step(f[i], adapt)
        return out[0] if single else out

    @staticmethod
    def _native_input(feature) -> np.ndarray | None:
        """feature as the C++ step takes it (a C-contiguous float32/float64 ndarray, checked there:
        shape, finiteness, unit norm), or None to go through the numpy checks and step."""
        if type(feature) is np.ndarray and feature.dtype in _NATIVE_DTYPES and feature.flags.c_contiguous:
            return feature
        f = np.asarray(feature)
        if f.dtype.kind == "f" and f.ndim in (1, 2):
            return np.ascontiguousarray(f, np.float64 if f.dtype.itemsize > 4 else np.float32)
        return None

    def _step(self, f: np.ndarray, adapt: bool) -> np.ndarray:
        cfg = self.config
        z0 = self._zero_shot64(f)
        if cfg.int8_keys:
            qf, sf = quantize_int8(f)
            key, scale = qf, sf
        else:
            qf, sf = None, None
            key, scale = f.astype(np.float32), None
        if adapt:
            zs = z0 - z0.max()
            ez = np.exp(zs)
            tot = ez.sum()
            p = ez / tot
            logp = zs - math.log(tot)
            H = float(-(p * logp).sum())
            pred = int(np.argmax(z0))
            h = H / self._log2c
            if cfg.pos_capacity:
                self._insert(self._pos_keys, self._pos_scale, self._pos_ent, self._pos_count, None,
                             pred, key, scale, H, None)
            if cfg.neg_capacity and cfg.neg_entropy[0] < h < cfg.neg_entropy[1]:
                lo, hi = cfg.neg_mask
                mask = np.packbits((p > lo) & (p < hi))
                self._insert(self._neg_keys, self._neg_scale, self._neg_ent, self._neg_count, self._neg_masks,
                             pred, key, scale, H, mask)
        z = z0
        if cfg.pos_capacity:
            w = self._cache_weights(f, qf, sf, self._pos_keys, self._pos_scale, self._pos_count,
                                    self._slot[0], cfg.beta_p)
            z = z + cfg.alpha_p * w.sum(axis=1)
        if cfg.neg_capacity and self._neg_count.any():
            w = self._cache_weights(f, qf, sf, self._neg_keys, self._neg_scale, self._neg_count,
                                    self._slot[1], cfg.beta_n)
            cls, slot = np.nonzero(w)
            if cls.size:
                bits = np.unpackbits(self._neg_masks[cls, slot], axis=1, count=self.num_classes)
                zn = np.einsum("e,ec->c", w[cls, slot], bits, dtype=np.float64)
                z = z - cfg.alpha_n * zn
        return z

    def _cache_weights(self, f, qf, sf, keys, scales, count, slots, beta) -> np.ndarray:
        """exp(−β(1 − f·k)) per slot [C, k], zero for empty slots."""
        if keys.shape[1] == 0:
            return np.zeros(keys.shape[:2])
        if qf is not None:
            dots = np.einsum("ckd,d->ck", keys, qf, dtype=np.int32)
            aff = dots * (scales.astype(np.float64) * float(sf))
        else:
            aff = np.einsum("ckd,d->ck", keys, f, dtype=np.float64)
        w = np.exp(-beta * (1.0 - aff))
        w[slots[None, :] >= count[:, None]] = 0.0
        return w

    @staticmethod
    def _insert(keys, scales, ents, count, masks, cls, key, scale, H, mask) -> None:
        """TDA's update_cache on preallocated arrays: keep the class list sorted by ascending
        entropy (ties: the newcomer goes after equal entries, as Python's stable sort does);
        append while below capacity, else replace the worst entry only if H is strictly smaller."""
        cap = keys.shape[1]
        n = int(count[cls])
        H32 = np.float32(H)
        if n == cap:
            if not H32 < ents[cls, n - 1]:
                return
            n -= 1  # drop the worst entry
        pos = int(np.searchsorted(ents[cls, :n], H32, side="right"))
        if pos < n:  # shift [pos, n) one slot right
            keys[cls, pos + 1:n + 1] = keys[cls, pos:n].copy()
            ents[cls, pos + 1:n + 1] = ents[cls, pos:n].copy()
            if scales is not None:
                scales[cls, pos + 1:n + 1] = scales[cls, pos:n].copy()
            if masks is not None:
                masks[cls, pos + 1:n + 1] = masks[cls, pos:n].copy()
        keys[cls, pos] = key
        ents[cls, pos] = H32
        if scales is not None:
            scales[cls, pos] = scale
        if masks is not None:
            masks[cls, pos] = mask
        count[cls] = n + 1

    # ------------------------------------------------------------------ introspection
    def cache_sizes(self) -> tuple[int, int]:
        """(positive entries, negative entries) currently held."""
        return int(self._pos_count.sum()), int(self._neg_count.sum())

    def __repr__(self) -> str:
        p, n = self.cache_sizes()
        return (f"QTTA(C={self.num_classes}, D={self.dim}, int8_keys={self.config.int8_keys}, "
                f"pos={p}/{self.num_classes * self.config.pos_capacity}, "
                f"neg={n}/{self.num_classes * self.config.neg_capacity}, nbytes={self.nbytes})")
