"""Transformer building blocks in plain numpy (float32), for the on-device runtime.

Everything here is numpy + :class:`edgevlm.runtime.linear.QuantLinear` (the C++ kernels) only;
never torch.  Shapes in the comments: ``B`` batch, ``T`` tokens, ``D`` width, ``H`` heads,
``hd`` head width, ``N``/``K`` a linear layer's out/in features, ``V`` vocabulary.

Weights come from an open :class:`edgevlm.format.EvlmFile`: quantized blobs (q2/q3/q4/q8) stay
zero-copy views of the mmap and run through ``QuantLinear``; raw f16/f32 matrices (small dense
tensors: patch conv, projections, heads) are cast to float32 once at load.  Embedding tables
are never dequantized whole: :class:`Embedding` dequantizes only the looked-up rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import qtypes
from .linear import QuantLinear, _core

__all__ = ["ACTIVATIONS", "ENCODER_ROWS", "Embedding", "Linear", "activate_", "attention", "attention_fast",
           "encoder_layer_", "erf", "gelu",
           "gelu_tanh", "get_activation", "layer_norm", "layer_norm_fast", "quick_gelu", "raw_tensor", "rms_norm", "sigmoid",
           "silu", "silu_", "softmax", "to_f32", "vector"]

F32 = np.float32


# ------------------------------------------------------------------------------------ norms

def layer_norm(x: np.ndarray, weight: np.ndarray | None, bias: np.ndarray | None, eps: float) -> np.ndarray:
    """x [..., D] -> [..., D]: (x - mean) / sqrt(var + eps) * weight + bias (biased variance, as torch)."""
    x = np.asarray(x, dtype=F32)
    mu = x.mean(-1, keepdims=True)                  # [..., 1]
    xc = x - mu                                     # [..., D]
    var = np.mean(xc * xc, axis=-1, keepdims=True)  # [..., 1]
    y = xc * (F32(1.0) / np.sqrt(var + F32(eps)))
    if weight is not None:
        y *= weight
    if bias is not None:
        y += bias
    return y


def rms_norm(x: np.ndarray, weight: np.ndarray | None, eps: float) -> np.ndarray:
    """x [..., D] -> [..., D]: x / sqrt(mean(x^2) + eps) * weight (Llama / Qwen2 RMSNorm)."""
    x = np.asarray(x, dtype=F32)
    ms = np.mean(x * x, axis=-1, keepdims=True)     # [..., 1]
    y = x * (F32(1.0) / np.sqrt(ms + F32(eps)))
    return y * weight if weight is not None else y


# ------------------------------------------------------------------------------ activations

# erf(x) = x * P(x^2) / Q(x^2) on [-4, 4] (clamped outside; |erf(4) - 1| < 1.6e-8): the rational
# approximation of Eigen's / XLA's float erf.  Evaluated in float64 its absolute error against
# math.erf is < 7e-8 over the whole real line (tests/test_dual_runtime.py checks < 1e-7), i.e.
# below half a float32 ulp near |erf| = 1.
_ERF_P = np.array([-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
                   -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02], dtype=np.float64)
_ERF_Q = np.array([-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
                   -1.42647390514189e-02], dtype=np.float64)


def _polyval(c: np.ndarray, x: np.ndarray) -> np.ndarray:
    y = np.full_like(x, c[0])
    for a in c[1:]:
        y *= x
        y += a
    return y


def _erf64(x: np.ndarray) -> np.ndarray:
    x = np.clip(np.asarray(x, dtype=np.float64), -4.0, 4.0)
    x2 = x * x
    return x * _polyval(_ERF_P, x2) / _polyval(_ERF_Q, x2)


def erf(x: np.ndarray) -> np.ndarray:
    """Vectorised error function, float32 out (any shape); |error| < 1e-7 (computed in float64)."""
    return _erf64(x).astype(F32)


# erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z/2), z >= 0 (Numerical Recipes "erfcc",
# Chebyshev fit): relative error < 1.2e-7 everywhere, so the negative GELU tail keeps its
# relative accuracy where 1 + erf(x) would cancel.
_ERFC_T = np.array([0.17087277, -0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806, 0.09678418,
                    0.37409196, 1.00002368, -1.26551223], dtype=np.float64)


def _erfc64_pos(z: np.ndarray) -> np.ndarray:
    t = 1.0 / (1.0 + 0.5 * z)
    return t * np.exp(-z * z + _polyval(_ERFC_T, t))


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU (hidden_act "gelu"): 0.5 x (1 + erf(x / sqrt 2)) = 0.5 x erfc(-x / sqrt 2),
    float64 inside, float32 out; |error| <= 1e-7 + 1e-7 |gelu(x)|.  [...] -> [...]"""
    xd = np.asarray(x, dtype=np.float64)
    z = xd * (1.0 / math.sqrt(2.0))
    with np.errstate(over="ignore", under="ignore"):
        neg = _erfc64_pos(np.abs(z))  # used where z < 0: erfc(-z) with -z > 0
    return (0.5 * xd * np.where(z < 0, neg, 1.0 + _erf64(z))).astype(F32)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """tanh GELU ("gelu_pytorch_tanh", "gelu_new"; SigLIP): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    x = np.asarray(x, dtype=F32)
    inner = F32(math.sqrt(2.0 / math.pi)) * (x + F32(0.044715) * x * x * x)
    return F32(0.5) * x * (F32(1.0) + np.tanh(inner))


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function without overflow warnings: 0.5 (1 + tanh(x / 2)).  [...] -> [...]"""
    x = np.asarray(x, dtype=F32)
    return F32(0.5) * (F32(1.0) + np.tanh(F32(0.5) * x))


def quick_gelu(x: np.ndarray) -> np.ndarray:
    """QuickGELU ("quick_gelu"; OpenAI CLIP): x * sigmoid(1.702 x).  [...] -> [...]"""
    x = np.asarray(x, dtype=F32)
    return x * sigmoid(F32(1.702) * x)


def silu(x: np.ndarray) -> np.ndarray:
    """SiLU / swish: x * sigmoid(x).  [...] -> [...]"""
    x = np.asarray(x, dtype=F32)
    return x * sigmoid(x)


def silu_(x: np.ndarray) -> np.ndarray:
    """:func:`silu` in place on a writable float32 array (returned), with one temporary instead of
    three and the same operations, so bitwise the same result."""
    s = F32(0.5) * x
    np.tanh(s, out=s)
    s += F32(1.0)
    s *= F32(0.5)                                   # sigmoid(x)
    x *= s
    return x


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(np.asarray(x, dtype=F32), F32(0.0))


#: transformers ``hidden_act`` name -> function
ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "gelu": gelu,
    "gelu_python": gelu,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_new": gelu_tanh,
    "gelu_fast": gelu_tanh,  # same function, a different float evaluation order in transformers
    "quick_gelu": quick_gelu,
    "silu": silu,
    "swish": silu,
    "relu": _relu,
}


def get_activation(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """The activation called ``name`` in a transformers config (``hidden_act``)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported hidden_act {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}") from None


# ------------------------------------------------------------------------------- attention

def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax along ``axis``, float32.  [...] -> [...]"""
    x = np.asarray(x, dtype=F32)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, n_heads: int, *, causal: bool = False,
              key_mask: np.ndarray | None = None, q_pos: np.ndarray | None = None,
              scale: float | None = None) -> np.ndarray:
    """Multi-head scaled dot-product attention (projections are the caller's).

    q [B, Tq, D], k and v [B, Tk, D] -> [B, Tq, D]; D = n_heads * hd, scale = hd ** -0.5 unless given.
    ``key_mask`` [B, Tk] (nonzero = attend) masks padding keys.  ``causal``: query i attends to
    keys j <= position(i), where position is ``q_pos`` [B, Tq] (int) when given (queries that
    are a subset of the sequence), else ``Tk - Tq + i``.  Masked scores are set to float32's
    lowest value (not -inf, as transformers does), so a fully masked row gives a uniform
    distribution instead of NaN.
    """
    q, k, v = (np.asarray(a, dtype=F32) for a in (q, k, v))
    b, tq, d = q.shape
    tk = k.shape[1]
    if d % n_heads:
        raise ValueError(f"width {d} is not divisible by {n_heads} heads")
    hd = d // n_heads
    qh = q.reshape(b, tq, n_heads, hd).transpose(0, 2, 1, 3)            # [B, H, Tq, hd]
    kh = k.reshape(b, tk, n_heads, hd).transpose(0, 2, 3, 1)            # [B, H, hd, Tk]
    vh = v.reshape(b, tk, n_heads, hd).transpose(0, 2, 1, 3)            # [B, H, Tk, hd]
    allow = None                                                        # [B, 1, Tq, Tk] bool
    if causal:
        pos = (np.arange(tq) + (tk - tq))[None, :] if q_pos is None else np.asarray(q_pos).reshape(b, tq)
        allow = (np.arange(tk)[None, None, :] <= pos[:, :, None])[:, None]  # [B|1, 1, Tq, Tk]
    if key_mask is not None:
        km = (np.asarray(key_mask) != 0).reshape(b, 1, 1, tk)
        allow = km if allow is None else allow & km
    sc = F32(hd ** -0.5 if scale is None else scale)
    o = np.empty((b, n_heads, tq, hd), dtype=F32)                       # [B, H, Tq, hd]
    # Scores for a few heads at a time: B*H*Tq*Tk float32 can be hundreds of MB for a 1024-token
    # image (and softmax needs a temporary of the same size), so the peak stays <= _SCORE_BYTES.
    step = max(1, min(n_heads, _SCORE_BYTES // max(1, 4 * b * tq * tk)))
    for h0 in range(0, n_heads, step):
        hs = slice(h0, h0 + step)
        s = np.matmul(qh[:, hs], kh[:, hs])                             # [B, h, Tq, Tk]
        s *= sc
        if allow is not None:
            np.copyto(s, np.finfo(np.float32).min, where=~allow)
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        np.matmul(s, vh[:, hs], out=o[:, hs])
    return o.transpose(0, 2, 1, 3).reshape(b, tq, d)


#: the most bytes of attention scores :func:`attention` holds at once (a few heads at a time)
_SCORE_BYTES = 16 << 20


# --------------------------------------------------------------- C++ fast paths (encoder glue)
# edgevlm._core's encoder glue (csrc/ops/encode_ops.h): the functions above (their numpy twins,
# tests/test_encode_ops.py checks the pairs), vectorised and split over the kernel threads.  The
# numpy versions run when the extension is missing or predates the ops, or USE_CORE_OPS is False.

#: False: the numpy glue only (e.g. to time it against the C++ ops; benchmarks/bench_encode.py)
USE_CORE_OPS = True
_GELU_KIND: dict[Callable, str] = {gelu: "erf", gelu_tanh: "tanh", quick_gelu: "quick"}


def _core_op(name: str):
    return getattr(_core, name, None) if USE_CORE_OPS and _core is not None else None


def _f32_vec(a: np.ndarray | None, d: int) -> np.ndarray | None | bool:
    """A [D] float32 contiguous view of a LayerNorm weight/bias, None for None, False if it is not [D]."""
    if a is None:
        return None
    a = np.ascontiguousarray(a, dtype=F32)
    return a.reshape(d) if a.size == d else False


def layer_norm_fast(x: np.ndarray, weight: np.ndarray | None, bias: np.ndarray | None, eps: float) -> np.ndarray:
    """:func:`layer_norm` through the C++ op when available (x [..., D], weight/bias [D] or None)."""
    op = _core_op("layer_norm")
    x = np.asarray(x, dtype=F32)
    if op is None or x.ndim == 0 or x.shape[-1] == 0:
        return layer_norm(x, weight, bias, eps)
    w, b = _f32_vec(weight, x.shape[-1]), _f32_vec(bias, x.shape[-1])
    if w is False or b is False:  # broadcasting shapes: leave them to numpy
        return layer_norm(x, weight, bias, eps)
    return op(np.ascontiguousarray(x), w, b, float(eps))


def activate_(act: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    """``act(x)`` for an array the caller owns and no longer needs: computed in place by the C++
    GELUs when ``act`` is :func:`quick_gelu`, :func:`gelu_tanh` or :func:`gelu` and x is a
    writable C-contiguous float32 array, else ``act(x)`` (a new array)."""
    kind, op = _GELU_KIND.get(act), _core_op("gelu_inplace")
    if kind is None or op is None or x.dtype != F32 or not (x.flags.c_contiguous and x.flags.writeable):
        return act(x)
    op(x, kind)
    return x


def attention_fast(q: np.ndarray, k: np.ndarray, v: np.ndarray, n_heads: int, *, causal: bool = False,
                   key_mask: np.ndarray | None = None, q_pos: np.ndarray | None = None,
                   scale: float | None = None) -> np.ndarray:
    """:func:`attention` (same arguments and result) through the C++ op when available."""
    op = _core_op("attend_encode")
    if op is None:
        return attention(q, k, v, n_heads, causal=causal, key_mask=key_mask, q_pos=q_pos, scale=scale)
    q, k, v = (np.ascontiguousarray(a, dtype=F32) for a in (q, k, v))
    b, tq, d = q.shape
    if d % n_heads:
        raise ValueError(f"width {d} is not divisible by {n_heads} heads")
    km = None if key_mask is None else np.ascontiguousarray(np.asarray(key_mask).reshape(b, k.shape[1]) != 0)
    qp = None if q_pos is None else np.ascontiguousarray(np.asarray(q_pos, dtype=np.int64).reshape(b, tq))
    return op(q, k, v, n_heads, scale=None if scale is None else float(scale), causal=causal, key_mask=km, q_pos=qp)


#: MLP rows per block in :func:`encoder_layer_`.  SigLIP at 1024 patches: the [rows, 3072]
#: intermediate is 6 MiB instead of 12.  Smaller blocks cost speed: the quantized GEMM unpacks
#: each weight block once per call, amortised over fewer rows (256 rows: ~+10% CPU time in fc1,
#: measured with the avx512vnni kernels; 512: a SmolVLM-256M frame's encode within the noise of
#: the unblocked layer).  Attention is not split by query rows for the same reason: the C++ op
#: repacks K and V per call (256-row blocks: +45% CPU time in attention).
ENCODER_ROWS = 512


def encoder_layer_(layer: Any, x: np.ndarray, *, key_mask: np.ndarray | None = None,
                   rows: int = ENCODER_ROWS) -> np.ndarray:
    """One pre-LN encoder layer (CLIP / SigLIP: ``x += o(attn(n1 x)); x += fc2(act(fc1(n2 x)))``)
    computed in place on x float32 [B, T, D] (C-contiguous, writable; returned), holding as few
    [B, T, *] temporaries at once as the math allows: attention peaks at x + 4 x [B, T, D]
    (LN1 output, then q, k, v; attention output), the MLP runs ``rows`` rows of the flattened
    [B*T, D] at a time (its [rows, 4D] intermediate is the largest temporary).  Every row's
    arithmetic is the unblocked layer's (row-wise ops), so results equal
    :class:`edgevlm.runtime.dual._Block`'s up to the GEMM kernels' choice of path by row count.
    ``layer``: the fields of ``_Block`` (n1w, n1b, q, k, v, o, n2w, n2b, fc1, fc2, heads, eps,
    act); ``key_mask`` [B, T] nonzero = attend (padding keys)."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    if x.dtype != F32 or x.ndim != 3 or not (x.flags.c_contiguous and x.flags.writeable):
        raise ValueError(f"encoder_layer_ updates x in place: expected a writable C-contiguous float32 [B, T, D], "
                         f"got {x.dtype} {x.shape}")
    b, t, d = x.shape
    h = layer_norm_fast(x, layer.n1w, layer.n1b, layer.eps)              # [B, T, D]
    q, k, v = layer.q(h), layer.k(h), layer.v(h)                         # [B, T, D] each
    del h
    a = attention_fast(q, k, v, layer.heads, key_mask=key_mask)          # [B, T, D]
    del q, k, v
    x += layer.o(a)
    del a
    flat = x.reshape(b * t, d)
    for r0 in range(0, b * t, rows):
        xr = flat[r0:r0 + rows]                                          # [rows, D] view of x
        xr += layer.fc2(activate_(layer.act, layer.fc1(layer_norm_fast(xr, layer.n2w, layer.n2b, layer.eps))))
    return x


# ---------------------------------------------------------------------- weights from a file

def to_f32(a: np.ndarray, qtype: str) -> np.ndarray:
    """A raw f32/f16/bf16 array (bf16 as its uint16 bits, as edgevlm.format returns it) -> float32 copy."""
    if qtype == "bf16":
        return (np.asarray(a).astype(np.uint32) << 16).view(F32)
    if qtype not in ("f32", "f16"):
        raise ValueError(f"expected a raw float tensor (f32/f16/bf16), found qtype {qtype}")
    return np.array(a, dtype=F32)


def raw_tensor(f: Any, key: str) -> tuple[np.ndarray, str]:
    """(the file's view of tensor ``key``, its qtype): no copy; :func:`to_f32` casts raw ones."""
    rec = f.records.get(key)
    if rec is None:
        raise ValueError(f"{getattr(f, 'path', 'file')}: missing tensor {key!r}")
    return f[key], rec.qtype


def vector(f: Any, key: str) -> np.ndarray:
    """A raw f32/f16/bf16 tensor of an EvlmFile as a float32 array (copied out of the mmap)."""
    return to_f32(*raw_tensor(f, key))


class Linear:
    """``y = x @ W.T + b`` with W [N, K] either packed (QuantLinear over the mmap view) or dense
    float32 (from an f16/f32 record, cast once).  x [..., K] -> [..., N] float32.

    ``isa`` picks the QuantLinear kernel (None: the default for this CPU; "ref": the portable
    reference, exact fp32 activations; the SIMD kernels quantize activations to int8 per group).
    """

    def __init__(self, *, quant: QuantLinear | None = None, weight: np.ndarray | None = None,
                 bias: np.ndarray | None = None, isa: str | None = None) -> None:
        if (quant is None) == (weight is None):
            raise ValueError("Linear needs exactly one of quant= (QuantLinear) or weight= (dense [N, K])")
        if quant is not None and isa == "cuda":  # device='cuda': the same blob on the GPU (cuda_linear.py)
            from .cuda_linear import to_cuda

            quant, isa = to_cuda(quant), None
        self.quant = quant
        self.isa = isa
        if weight is not None:
            w = np.asarray(weight, dtype=F32)
            if w.ndim != 2:
                raise ValueError(f"dense Linear weight must be [N, K], got shape {w.shape}")
            self.n, self.k = w.shape
            self.wt = np.ascontiguousarray(w.T)  # [K, N]: x @ wt is one GEMM with no transpose
        else:
            self.n, self.k = quant.n, quant.k
            self.wt = None
        self.bias = None if bias is None else np.ascontiguousarray(bias, dtype=F32).reshape(self.n)

    @classmethod
    def from_file(cls, f: Any, prefix: str, *, bias: bool | None = None, isa: str | None = None) -> Linear:
        """Build from ``{prefix}.weight`` (+ ``{prefix}.bias`` when present, or required if bias=True)."""
        wkey, bkey = f"{prefix}.weight", f"{prefix}.bias"
        rec = f.records.get(wkey)
        if rec is None:
            raise ValueError(f"{getattr(f, 'path', 'file')}: missing tensor {wkey!r}")
        if bias is True and bkey not in f.records:
            raise ValueError(f"{getattr(f, 'path', 'file')}: missing tensor {bkey!r}")
        b = vector(f, bkey) if bias is not False and bkey in f.records else None
        if rec.quantized:
            if len(rec.shape) != 2:
                raise ValueError(f"{wkey}: quantized weight must be 2-D, got shape {rec.shape}")
            n, k = rec.shape
            return cls(quant=QuantLinear(f[wkey], rec.qtype, n, k, rec.group_size, b), isa=isa)
        w = vector(f, wkey)
        return cls(weight=w.reshape(w.shape[0], -1), bias=b)

    @property
    def quantized(self) -> bool:
        return self.quant is not None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=F32)
        if x.shape[-1] != self.k:
            raise ValueError(f"Linear expects input [..., {self.k}], got {x.shape}")
        if self.quant is not None:
            return self.quant(x, isa=self.isa)  # bias applied inside the kernel
        y = x @ self.wt
        if self.bias is not None:
            y += self.bias
        return y

    def __repr__(self) -> str:
        kind = repr(self.quant) if self.quant is not None else "dense f32"
        return f"Linear({self.n}x{self.k}, {kind}, bias={self.bias is not None})"


class Embedding:
    """Row lookup in a [V, D] table that stays in the file: ids [...] int -> [..., D] float32.

    Quantized tables (q8 for text token embeddings; q2/q3/q4 work too) dequantize only the
    selected rows from the planar blob (codes N x row_bytes, then scales N x G f16, then mins
    N x G f16 for the asymmetric types); raw f16/f32 tables are indexed and cast per lookup.
    """

    def __init__(self, table: np.ndarray, qtype: str, shape: tuple[int, int], group: int = 0) -> None:
        self.v, self.d = (int(s) for s in shape)
        self.qtype = qtype
        self.group = int(group)
        if qtype in ("f16", "f32", "bf16"):
            self.table = np.asarray(table).reshape(self.v, self.d)  # [V, D] view, not copied
            self.qt = None
            return
        qt = qtypes.get(qtype)
        blob = np.asarray(table)
        size = qt.packed_size(self.v, self.d, self.group)
        if blob.dtype != np.uint8 or blob.ndim != 1 or blob.size != size:
            raise ValueError(f"Embedding: expected a 1-D uint8 {qtype} blob of {size} bytes for [{self.v}, {self.d}] "
                             f"group {self.group}, got {blob.dtype} {blob.shape}")
        self.qt = qt
        g = self.d // self.group
        rb = qt.row_bytes(self.d)
        qs_end = self.v * rb
        self.qs = blob[:qs_end].reshape(self.v, rb)                                   # [V, row_bytes] u8
        self.scales = blob[qs_end:qs_end + 2 * self.v * g].view("<f2").reshape(self.v, g)  # [V, G] f16
        self.mins = None if qt.symmetric else blob[qs_end + 2 * self.v * g:].view("<f2").reshape(self.v, g)

    @classmethod
    def from_file(cls, f: Any, key: str) -> Embedding:
        rec = f.records.get(key)
        if rec is None:
            raise ValueError(f"{getattr(f, 'path', 'file')}: missing tensor {key!r}")
        if len(rec.shape) != 2:
            raise ValueError(f"{key}: embedding table must be 2-D, got shape {rec.shape}")
        return cls(f[key], rec.qtype, rec.shape, rec.group_size)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"token ids must be integers, got {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.v):
            raise ValueError(f"token id out of range [0, {self.v}): min {ids.min()}, max {ids.max()}")
        flat = ids.reshape(-1)
        if self.qt is None:
            rows = to_f32(self.table[flat], self.qtype)                               # [n, D]
        else:
            g = self.d // self.group
            codes = self.qt.impl.unpack_codes(self.qs[flat], self.d)                 # [n, D] u8 / i8
            w = codes.astype(F32).reshape(-1, g, self.group)                          # [n, G, group]
            w *= self.scales[flat].astype(F32)[:, :, None]
            if self.mins is not None:
                w += self.mins[flat].astype(F32)[:, :, None]
            rows = w.reshape(-1, self.d)
        return rows.reshape(*ids.shape, self.d)

    def __repr__(self) -> str:
        return f"Embedding({self.v}x{self.d}, {self.qtype}" + (f", group={self.group})" if self.group else ")")
