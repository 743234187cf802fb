"""Weight quantizers of the exporter: round-to-nearest (with an optional clipping search) and
GPTQ, plus the streaming calibration Hessian they share.  Pure functions, no model knowledge.

Every quantizer returns a :class:`QuantResult` whose ``deq`` is *bit for bit* what the packed
file dequantizes to (``edgevlm.qtypes.get(qtype).dequantize``): GPTQ feeds the error of that
exact value forward, and the calibration loop reruns blocks with it, so the exporter measures
the model the device will run.  The group parameters follow the numpy reference
(``edgevlm/qtypes/_rtn.py``) operation for operation in float32; plain :func:`rtn` *is* that
reference.

Shapes: a weight is W[N, K] (N out-features = rows, K in-features), groups are ``group``
consecutive columns of one row, G = K / group, H is [K, K] over the in-features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import qtypes
from ..qtypes._rtn import FP16_MAX, fp16_ceil, fp16_floor
from .int_zero import int_zero_params


# ---- result --------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)   # eq on numpy/torch fields would be ambiguous
class QuantResult:
    """One quantized weight matrix, as the file stores it."""

    qtype: str                 # "q2" | "q3" | "q4" | "q8"
    group: int                 # 32 | 64 | 128
    codes: np.ndarray          # uint8 [N, K] in [0, 2^bits-1] (asym) or int8 [N, K] in [-127, 127] (q8)
    scales: np.ndarray         # float16 [N, G]
    mins: np.ndarray | None    # float16 [N, G], None for q8
    deq: torch.Tensor          # float32 [N, K]: exactly qtypes.get(qtype).dequantize(self.pack(), N, K, group)

    def pack(self) -> np.ndarray:
        """The packed blob, uint8 [qtypes.get(qtype).packed_size(N, K, group)]."""
        return qtypes.get(self.qtype).pack_parts(self.codes, self.scales, self.mins)


@dataclass(frozen=True, eq=False)
class BilevelResult:
    """One q2b weight matrix (SPEED-Q's bilevel 2-bit type, group 16; see qtypes/q2b.py)."""

    parts: qtypes.q2b.Parts    # codes [N, K], zeros / scale codes [N, G] uint8, d / m [NB, G] float32
    deq: torch.Tensor          # float32 [N, K]: exactly qtypes.get("q2b").dequantize(self.pack(), N, K)
    qtype: str = "q2b"
    group: int = qtypes.q2b.GROUP

    def pack(self) -> np.ndarray:
        """The packed blob, uint8 [qtypes.q2b.packed_size(N, K)]."""
        return qtypes.q2b.pack_parts(*self.parts)


def bilevel(w: torch.Tensor) -> BilevelResult:
    """q2b min-max quantization of W[N, K] (K % 32 == 0): SPEED-Q's bilevel quantizer in
    float32 (qtypes.q2b.quantize) with ``deq`` its exact dequantization."""
    if not isinstance(w, torch.Tensor) or w.ndim != 2:
        got = list(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"[bilevel] expected W as a 2-D torch.Tensor [N, K], got {got}")
    n, k = w.shape
    qtypes.q2b.check_shape(n, k, "bilevel")
    parts = qtypes.q2b.quantize(w.detach().to("cpu", torch.float32).numpy())
    return BilevelResult(parts, torch.from_numpy(qtypes.q2b.dequantize_parts(parts)))


# ---- validation ----------------------------------------------------------------------------
def _check(op: str, w: torch.Tensor, qtype: str, group: int) -> tuple[qtypes.QType, np.ndarray]:
    """Validate qtype / group / W; returns the QType and W as C-contiguous float32 numpy [N, K]."""
    if qtype not in qtypes.REGISTRY:
        raise ValueError(f"[{op}] expected qtype one of {sorted(qtypes.REGISTRY)}, got {qtype!r}")
    if group not in qtypes.GROUP_SIZES:
        raise ValueError(f"[{op}] expected group one of {qtypes.GROUP_SIZES}, got {group!r}")
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"[{op}] expected W as a torch.Tensor [N, K], got {type(w).__name__}")
    if w.ndim != 2 or w.shape[0] == 0:
        raise ValueError(f"[{op}] expected a 2-D weight [N, K] with N > 0, got shape {list(w.shape)}")
    n, k = w.shape
    if k == 0 or k % group:
        raise ValueError(f"[{op}] expected K a positive multiple of group = {group}, got W of shape [{n}, {k}]")
    wn = np.ascontiguousarray(w.detach().to("cpu", torch.float32).numpy())
    bad = ~(np.abs(wn) <= FP16_MAX)
    if bad.any():
        idx = np.unravel_index(int(np.argmax(bad)), wn.shape)
        raise ValueError(f"[{op}] expected finite weights with |w| <= {FP16_MAX} (fp16 group params), "
                         f"got {wn[idx]} at {tuple(int(i) for i in idx)} of W [{n}, {k}]")
    return qtypes.get(qtype), wn


def _check_h(op: str, H: torch.Tensor, k: int) -> torch.Tensor:
    """Validate a Hessian [K, K]; returns it as float64 CPU."""
    if not isinstance(H, torch.Tensor) or tuple(H.shape) != (k, k):
        got = list(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__
        raise ValueError(f"[{op}] expected H of shape [K, K] = [{k}, {k}], got {got}")
    H = H.detach().to("cpu", torch.float64)
    if not torch.isfinite(H).all():
        raise ValueError(f"[{op}] expected a finite H [{k}, {k}], got non-finite entries")
    return H


# ---- group parameters (numpy, float32, mirrors qtypes/_rtn.py) -----------------------------
def _stats(qt: qtypes.QType, wg: np.ndarray) -> tuple[np.ndarray, ...]:
    """Range statistics of groups wg float32 [..., group]: (absmax,) for q8, (min, max) else."""
    return (np.abs(wg).max(axis=-1),) if qt.symmetric else (wg.min(axis=-1), wg.max(axis=-1))


def _params(qt: qtypes.QType, stats: tuple[np.ndarray, ...], t: np.float32 = np.float32(0),
            int_zero: int | None = None):
    """Group params from _stats with the range shrunk by the fraction t (0 = full min-max
    range, exactly the RTN reference).  Returns (scales float16 [...], mins float16 [...] | None).
    ``int_zero`` (asymmetric types): mins = -scale * z with an integer z >= int_zero, see
    :func:`int_zero_params`."""
    if qt.symmetric:
        (amax,) = stats
        # t == 0 must reproduce rtn_sym8 bit for bit: (1 - 0) * amax == amax exactly.
        return fp16_ceil((np.float32(1) - t) * amax / np.float32(127)), None
    mn, mx = stats
    qmax = np.float32((1 << qt.bits) - 1)
    # Shrink both ends toward the centre by t * half-range; written as mn + 0 / mx - 0 at t == 0
    # so the unshrunk candidate is exactly rtn_asym's params (p = 1 is always a candidate).
    cut = t * ((mx - mn) / np.float32(2))
    if int_zero is not None:
        return int_zero_params(qt.bits, mn + cut, mx - cut, int_zero)
    mins = fp16_floor(mn + cut)
    scales = fp16_ceil(np.maximum(mx - cut - mins.astype(np.float32), np.float32(0)) / qmax)
    return scales, mins


def _codes(qt: qtypes.QType, wg: np.ndarray, scales: np.ndarray, mins: np.ndarray | None) -> np.ndarray:
    """RTN codes of wg float32 [..., group] under params [...]: float32 [..., group] (integers)."""
    fs = scales.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.rint(wg / fs) if mins is None else np.rint((wg - mins.astype(np.float32)[..., None]) / fs)
    r = np.where(fs > 0, r, np.float32(0))
    lo, hi = (-127, 127) if qt.symmetric else (0, (1 << qt.bits) - 1)
    return np.clip(r, lo, hi).astype(np.float32)


def _dequant(codes: np.ndarray, scales: np.ndarray, mins: np.ndarray | None) -> np.ndarray:
    """scale * code (+ min) in float32, the file's dequantization; params broadcast over the last axis."""
    w = scales.astype(np.float32)[..., None] * codes
    return w if mins is None else w + mins.astype(np.float32)[..., None]


def _sq_err(qt: qtypes.QType, wt: torch.Tensor, scales: np.ndarray, mins: np.ndarray | None,
            ht: torch.Tensor | None) -> np.ndarray:
    """Σ_j h_j (w_j - deq_j)^2 per group, float64 [R, G], for wt float32 [R, G, group].  The
    same float32 ops as _codes / _dequant (so deq is exact), in torch for threads and in-place."""
    sf = torch.from_numpy(scales.astype(np.float32)).unsqueeze(-1)          # [R, G, 1]
    mf = None if mins is None else torch.from_numpy(mins.astype(np.float32)).unsqueeze(-1)
    q = wt / sf if mf is None else (wt - mf).div_(sf)
    q.round_().masked_fill_(sf <= 0, 0.0)                                   # s == 0 -> code 0
    q.clamp_(*((-127.0, 127.0) if qt.symmetric else (0.0, float((1 << qt.bits) - 1))))
    q.mul_(sf)
    if mf is not None:
        q.add_(mf)                                                          # q is now deq
    d = (wt - q).double().square_()
    if ht is not None:
        d.mul_(ht)
    return d.sum(-1).numpy()


def _fit(qt: qtypes.QType, wg: np.ndarray, h: np.ndarray | None, clip_search: bool,
         clip_grid: int, clip_max_shrink: float, int_zero: int | None = None):
    """Best params per group of wg float32 [R, G, group] (R rows).  Without the search: min-max.
    With it: the shrink t in linspace(0, clip_max_shrink, clip_grid) minimising
    Σ h_k (w_k - deq_k)^2 per group (h float64 [G, group] or None = unweighted); t = 0 comes
    first and ties keep the earlier candidate, so the error is never above plain RTN's."""
    stats = _stats(qt, wg)
    scales, mins = _params(qt, stats, int_zero=int_zero)
    if not clip_search or clip_grid < 2 or clip_max_shrink == 0:
        return scales, mins
    wt = torch.from_numpy(np.ascontiguousarray(wg))
    ht = None if h is None else torch.from_numpy(np.ascontiguousarray(h, np.float64))
    best = _sq_err(qt, wt, scales, mins, ht)
    for t in np.linspace(0.0, clip_max_shrink, clip_grid, dtype=np.float64)[1:].astype(np.float32):
        s, m = _params(qt, stats, t, int_zero)
        err = _sq_err(qt, wt, s, m, ht)
        better = err < best
        best = np.where(better, err, best)
        scales = np.where(better, s, scales)
        if m is not None:
            mins = np.where(better, m, mins)
    return scales, mins


def _check_clip(op: str, clip_grid: int, clip_max_shrink: float) -> None:
    if not (isinstance(clip_grid, int) and clip_grid >= 1):
        raise ValueError(f"[{op}] expected clip_grid a positive integer, got {clip_grid!r}")
    if not (0.0 <= clip_max_shrink < 1.0):
        raise ValueError(f"[{op}] expected clip_max_shrink in [0, 1), got {clip_max_shrink!r}")


def _result(qt: qtypes.QType, group: int, codes: np.ndarray, scales: np.ndarray,
            mins: np.ndarray | None) -> QuantResult:
    """Assemble a QuantResult from codes float32/int [N, K] and params float16 [N, G]."""
    n, k = codes.shape
    cg = codes.reshape(n, k // group, group).astype(np.float32)
    deq = _dequant(cg, scales, mins).reshape(n, k)
    dtype = np.int8 if qt.symmetric else np.uint8
    return QuantResult(qt.name, group, np.ascontiguousarray(codes.astype(dtype)),
                       np.ascontiguousarray(scales, np.float16),
                       None if mins is None else np.ascontiguousarray(mins, np.float16),
                       torch.from_numpy(np.ascontiguousarray(deq, np.float32)))


# ---- RTN -----------------------------------------------------------------------------------
def rtn(w: torch.Tensor, qtype: str, group: int, *, clip_search: bool = False, clip_grid: int = 20,
        clip_max_shrink: float = 0.3, h_diag: torch.Tensor | None = None,
        int_zero: int | None = None) -> QuantResult:
    """Round-to-nearest quantization of W[N, K].

    Without ``clip_search`` this is ``qtypes.get(qtype).quantize`` bit for bit.  With it, each
    group's range is shrunk toward its centre by t in linspace(0, clip_max_shrink, clip_grid)
    (t = 0 is plain RTN) and the t with the least Σ_k h_k (w - deq)^2 is kept; ``h_diag`` [K]
    (the Hessian diagonal) weights the columns so the error approximates the output error.
    ``int_zero`` (q2/q3/q4): integer zero points z >= int_zero (:func:`int_zero_params`)."""
    qt, wn = _check("rtn", w, qtype, group)
    _check_clip("rtn", clip_grid, clip_max_shrink)
    n, k = wn.shape
    if not clip_search and int_zero is None:
        codes, scales, mins = qt.quantize(wn, group)
        return _result(qt, group, codes, scales, mins)
    h = None
    if h_diag is not None:
        if not isinstance(h_diag, torch.Tensor) or tuple(h_diag.shape) != (k,):
            got = list(h_diag.shape) if isinstance(h_diag, torch.Tensor) else type(h_diag).__name__
            raise ValueError(f"[rtn] expected h_diag of shape [K] = [{k}], got {got}")
        h = h_diag.detach().to("cpu", torch.float64).numpy().reshape(k // group, group)
        if not (np.isfinite(h).all() and (h >= 0).all()):
            raise ValueError("[rtn] expected a finite, non-negative h_diag")
    wg = wn.reshape(n, k // group, group)
    # Row chunks of ~1M weights bound the search's float64 temporaries (an LM head is 100M+).
    rows = max(1, (1 << 20) // k)
    parts = [_fit(qt, wg[r:r + rows], h, clip_search, clip_grid, clip_max_shrink, int_zero)
             for r in range(0, n, rows)]
    scales = np.concatenate([p[0] for p in parts])
    mins = None if qt.symmetric else np.concatenate([p[1] for p in parts])
    return _result(qt, group, _codes(qt, wg, scales, mins).reshape(n, k), scales, mins)


# ---- calibration Hessian -------------------------------------------------------------------
class Hessian:
    """Streaming H = (2 / Σ_t c_t) Σ_t c_t x_t x_tᵀ over calibration tokens (c_t = 1 unweighted).

    The per-token weights c_t are the hook QIG / VEQ-style methods use (H̃ = 2XᵀCX); padding
    masks pass as 0/1 weights.  Each batch's XᵀCX is formed in float32 (BLAS speed) and summed
    into a float64 accumulator so many batches do not lose precision."""

    def __init__(self, k: int):
        if not (isinstance(k, int) and k > 0):
            raise ValueError(f"[Hessian] expected a positive in-feature count K, got {k!r}")
        self.k = k
        self._sum = torch.zeros(k, k, dtype=torch.float64)   # Σ c_t x_t x_tᵀ, [K, K]
        self._weight = 0.0                                   # Σ c_t (float64 in Python)
        self.n_tokens = 0                                    # tokens with weight > 0 seen

    @property
    def total_weight(self) -> float:
        return self._weight

    def add(self, x: torch.Tensor, token_weight: torch.Tensor | None = None) -> None:
        """Add activations x [..., K] (leading dims = tokens), optional weights [...] >= 0."""
        if x.shape[-1:] != (self.k,):
            raise ValueError(f"[Hessian.add] expected x of shape [..., K] with K = {self.k}, got {list(x.shape)}")
        xt = x.detach().to("cpu", torch.float32).reshape(-1, self.k)        # [T, K]
        if token_weight is not None:
            if tuple(token_weight.shape) != tuple(x.shape[:-1]):
                raise ValueError(f"[Hessian.add] expected token_weight of shape {list(x.shape[:-1])} "
                                 f"(x's leading dims), got {list(token_weight.shape)}")
            c = token_weight.detach().to("cpu", torch.float32).reshape(-1)  # [T]
            if not (torch.isfinite(c).all() and (c >= 0).all()):
                raise ValueError("[Hessian.add] expected finite, non-negative token weights")
            keep = c > 0                       # drop zero-weight (padding) tokens before the matmul
            xt, c = xt[keep], c[keep]
            xs = xt * c.sqrt()[:, None]        # sqrt(c) x: (sqrt(C)X)ᵀ(sqrt(C)X) = XᵀCX
            w = float(c.double().sum())
        else:
            xs, w = xt, float(xt.shape[0])
        self.n_tokens += int(xs.shape[0])
        if xs.shape[0] == 0:
            return
        part = xs.T @ xs                                                    # [K, K] float32
        if not torch.isfinite(part).all():
            raise ValueError(f"[Hessian.add] expected finite activations, got non-finite XᵀX (K = {self.k})")
        self._sum += part.double()
        self._weight += w

    def matrix(self) -> torch.Tensor:
        """H [K, K] float32, symmetric; all zeros if no token had positive weight."""
        if self._weight <= 0:
            return torch.zeros(self.k, self.k)
        h = self._sum * (2.0 / self._weight)
        return ((h + h.T) * 0.5).float()


# ---- GPTQ ----------------------------------------------------------------------------------
def _inverse_cholesky(H: torch.Tensor, damp: float, shape: tuple[int, int]) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)^-1, λ = damp · mean(diag H), float64 [K, K].  Retries
    with 10x the damping when H is not positive definite enough."""
    mean_diag = float(torch.diagonal(H).mean())
    for attempt in range(5):
        lam = damp * (10.0 ** attempt) * mean_diag
        Hd = H.clone()
        Hd.diagonal().add_(lam)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and torch.isfinite(torch.diagonal(U)).all():
                return U
    raise ValueError(f"[gptq] Cholesky of the damped Hessian failed for W of shape [{shape[0]}, {shape[1]}] "
                     f"even with damping {damp * 10.0 ** 4:g} x mean(diag H); H may be degenerate or non-finite")


def gptq(w: torch.Tensor, H: torch.Tensor, qtype: str, group: int, *, damp: float = 0.01,
         act_order: bool = False, block_size: int = 128, clip_search: bool = False,
         clip_grid: int = 20, clip_max_shrink: float = 0.3,
         params: tuple[np.ndarray, np.ndarray | None] | None = None,
         int_zero: int | None = None) -> QuantResult:
    """GPTQ (Frantar et al. 2023) of W[N, K] against the calibration Hessian H [K, K].

    Columns are quantized one at a time (in order, or by descending diag H with ``act_order``)
    and each column's rounding error, scaled by the inverse-Hessian Cholesky factor, is pushed
    onto the columns not yet quantized; updates beyond the current block of ``block_size``
    columns are applied lazily, once per block.  Group params (one per row and contiguous group
    of ``group`` columns, as the format needs) come from the error-updated weights when a
    group's first column is reached, or with ``act_order`` from the original W up front
    (GPTQ's static groups) so every column keeps its own contiguous group's params.  With
    ``clip_search`` the params come from the diag(H)-weighted clipping search of :func:`rtn`.
    ``params`` = (scales, mins) float16 [N, G] fixes every group's params up front (static
    groups; e.g. the :func:`refit` of an earlier pass), whatever the column order.
    ``int_zero`` (q2/q3/q4): integer zero points z >= int_zero (:func:`int_zero_params`)."""
    op = "gptq"
    qt, wn = _check(op, w, qtype, group)
    n, k = wn.shape
    H = _check_h(op, H, k)
    if not (isinstance(damp, (int, float)) and damp > 0):
        raise ValueError(f"[{op}] expected damp > 0, got {damp!r}")
    if not (isinstance(block_size, int) and block_size > 0):
        raise ValueError(f"[{op}] expected block_size a positive integer, got {block_size!r}")
    _check_clip(op, clip_grid, clip_max_shrink)
    # Blocks hold whole groups, so a group's current weights are all inside the block buffer.
    bs = max(group, block_size // group * group)
    G = k // group

    H = H.clone()
    diag = torch.diagonal(H)
    hdiag = diag.clone()                       # undamped diag [K] float64, weights the clip search
    dead = diag == 0                           # zero activations: any weight gives the same output
    diag[dead] = 1.0                           # (in place: diagonal is a view) keeps H invertible

    W = torch.from_numpy(wn.copy())            # float32 [N, K], error-updated as we go
    # Group params as float32 [G, N] (row g = group g, contiguous per group) plus the fp16 originals.
    scales16 = np.zeros((n, G), np.float16)
    mins16 = None if qt.symmetric else np.zeros((n, G), np.float16)
    S = torch.zeros(G, n)
    M = torch.zeros(G, n)
    hd_np = hdiag.numpy().reshape(G, group)

    def set_params(g: int, wg: np.ndarray) -> None:
        """Params of group g from its current weights wg float32 [N, group]."""
        s, m = _fit(qt, wg[:, None, :], hd_np[g:g + 1], clip_search, clip_grid, clip_max_shrink, int_zero)
        scales16[:, g] = s[:, 0]
        S[g] = torch.from_numpy(s[:, 0].astype(np.float32))
        if m is not None:
            mins16[:, g] = m[:, 0]
            M[g] = torch.from_numpy(m[:, 0].astype(np.float32))

    if params is not None:
        ps, pm = params
        if np.shape(ps) != (n, G) or (not qt.symmetric and np.shape(pm) != (n, G)):
            raise ValueError(f"[{op}] expected params (scales, mins) of shape [{n}, {G}]")
        scales16[:] = ps
        S[:] = torch.from_numpy(np.asarray(ps, np.float16).astype(np.float32).T.copy())
        if not qt.symmetric:
            mins16[:] = pm
            M[:] = torch.from_numpy(np.asarray(pm, np.float16).astype(np.float32).T.copy())
    if act_order:
        # Static groups from the original W, then permute columns by descending diag(H)
        # (dead columns, diag 0, go last).  gidx[j]: contiguous group of permuted column j.
        for g in range(G if params is None else 0):
            set_params(g, wn[:, g * group:(g + 1) * group])
        perm = torch.argsort(hdiag, descending=True, stable=True)
        W = W[:, perm].contiguous()
        H = H[perm][:, perm]
        gidx = (perm // group).tolist()
    else:
        perm = None
        gidx = [j // group for j in range(k)]

    Hinv = _inverse_cholesky(H, float(damp), (n, k)).float()   # upper, [K, K] float32
    codes = torch.zeros(n, k)                                  # float32 integer codes, permuted order
    lo, hi = (-127.0, 127.0) if qt.symmetric else (0.0, float((1 << qt.bits) - 1))

    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        W1 = W[:, i1:i2].clone()               # [N, B] block being quantized
        Err1 = torch.zeros_like(W1)            # [N, B] scaled errors for the lazy update
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if not act_order and params is None and j % group == 0:
                set_params(j // group, W1[:, i:i + group].numpy())
            g = gidx[j]
            s, m = S[g], M[g]                  # float32 [N]
            col = W1[:, i]
            # Same ops as _codes / the reference: rint((w - m) / s), s == 0 -> 0, clamp.
            q = torch.round(col / s) if qt.symmetric else torch.round((col - m) / s)
            q = torch.where(s > 0, q, torch.zeros_like(q)).clamp_(lo, hi)
            dq = s * q if qt.symmetric else s * q + m   # the file's float32 dequantization
            codes[:, j] = q
            err = (col - dq) / Hinv1[i, i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)   # feed the error to later columns
            Err1[:, i] = err
        if i2 < k:
            W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1.0)

    if perm is not None:
        unperm = torch.empty_like(codes)
        unperm[:, perm] = codes
        codes = unperm
    return _result(qt, group, codes.numpy(), scales16, mins16)


# ---- group-parameter refit -----------------------------------------------------------------
def refit(res: QuantResult, w: torch.Tensor, H: torch.Tensor, *, ridge: float = 1e-6) -> QuantResult:
    """Re-fit every group's (scale, min) of an asymmetric result to its final codes, keeping the
    codes: per row n, the 2G params θ = (s_0..s_G-1, m_0..m_G-1) minimising
    (w_n - A_n θ)ᵀ H (w_n - A_n θ), A_n [K, 2G] holding the row's codes (s columns) and group
    indicators (m columns), i.e. the normal equations (A_nᵀ H A_n) θ = A_nᵀ H w_n.  GPTQ picks
    a group's params before its codes (from min-max / the clip search of the weights at that
    time); once the codes are fixed, the output-optimal params differ.  2G unknowns per row
    against many calibration tokens: unlike GPTQ's K-dimensional updates this cannot overfit a
    small calibration set.  Params are rounded to float16 as the file stores them, and a row
    keeps its old params unless the new ones (as stored) lower its error tr-form.  q8
    (symmetric, no mins) is returned unchanged."""
    qt = qtypes.get(res.qtype)
    if qt.symmetric:
        return res
    n, k = res.codes.shape
    Hd = _check_h("refit", H, k)                                     # float64 [K, K]
    W = w.detach().to("cpu", torch.float64).reshape(n, k)
    if tuple(W.shape) != (n, k):
        raise ValueError(f"[refit] expected W of the result's shape [{n}, {k}], got {list(w.shape)}")
    # Row chunks bound the [rows, K, G] float64 temporaries (~128 MB), whatever the layer size.
    rows = max(1, (1 << 24) // (k * (k // res.group)))
    parts = [_refit_rows(res.codes[r:r + rows], res.scales[r:r + rows], res.mins[r:r + rows], W[r:r + rows], Hd,
                         res.group, ridge) for r in range(0, n, rows)]
    s16 = np.concatenate([p[0] for p in parts])
    m16 = np.concatenate([p[1] for p in parts])
    return _result(qt, res.group, res.codes, s16, m16)


def _refit_rows(codes: np.ndarray, scales: np.ndarray, mins: np.ndarray, W: torch.Tensor, Hd: torch.Tensor,
                gs: int, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`refit` for rows codes [n, K] (old params float16 [n, G], W float64 [n, K]);
    returns the kept params (float16 [n, G] each)."""
    n, k = codes.shape
    G = k // gs
    C = torch.from_numpy(codes.astype(np.float64))                   # [n, K]
    Hg = Hd.reshape(k, G, gs)                                        # H[k, (h, j)]
    R = Hg.sum(-1)                                                   # [K, G]: Σ_{l in h} H_kl
    Q = torch.einsum("khj,nhj->nkh", Hg, C.reshape(n, G, gs))        # [N, K, G]: Σ_{l in h} H_kl c_nl
    Cg = C.reshape(n, G, gs)
    SS = torch.einsum("ngj,ngjh->ngh", Cg, Q.reshape(n, G, gs, G))   # c_gᵀ H_gh c_h
    SM = torch.einsum("ngj,gjh->ngh", Cg, R.reshape(G, gs, G))       # c_gᵀ H_gh 1
    MM = R.reshape(G, gs, G).sum(1)                                  # 1ᵀ H_gh 1
    M = torch.cat([torch.cat([SS, SM], 2), torch.cat([SM.transpose(1, 2), MM.expand(n, G, G)], 2)], 1)
    HW = (W @ Hd).reshape(n, G, gs)                                  # (H w_n) by group
    rhs = torch.cat([(Cg * HW).sum(-1), HW.sum(-1)], 1)              # [N, 2G]
    tr = torch.diagonal(M, dim1=1, dim2=2).mean(1).clamp(min=1e-30)
    M = M + (ridge * tr)[:, None, None] * torch.eye(2 * G, dtype=torch.float64)
    theta, info = torch.linalg.solve_ex(M, rhs.unsqueeze(-1))
    theta = theta.squeeze(-1).numpy()                                # [N, 2G]
    with np.errstate(over="ignore", invalid="ignore"):
        s16 = theta[:, :G].astype(np.float16)
        m16 = theta[:, G:].astype(np.float16)
    ok = (info.numpy() == 0) & np.isfinite(s16).all(1) & np.isfinite(m16).all(1) & (s16 >= 0).all(1)
    s16 = np.where(ok[:, None], s16, scales)
    m16 = np.where(ok[:, None], m16, mins)
    cg = codes.reshape(n, G, gs).astype(np.float32)

    def row_err(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
        D = W - torch.from_numpy(_dequant(cg, sc, mn).reshape(n, k)).double()   # the file's deq
        return ((D @ Hd) * D).sum(1).numpy()                        # [n]

    better = row_err(s16, m16) < row_err(scales, mins)
    return np.where(better[:, None], s16, scales), np.where(better[:, None], m16, mins)


# ---- error measure -------------------------------------------------------------------------
def output_error(w: torch.Tensor, deq: torch.Tensor, H: torch.Tensor) -> tuple[float, float]:
    """(err, energy): err = tr((W-Q) H (W-Q)ᵀ), energy = tr(W H Wᵀ) with the UNDAMPED H;
    err / energy is the relative layer-output error on the calibration set (H = 2XᵀX/n makes
    them 2 x the mean squared output error / output energy per token)."""
    if w.ndim != 2 or tuple(deq.shape) != tuple(w.shape):
        raise ValueError(f"[output_error] expected W [N, K] and deq of the same shape, "
                         f"got {list(w.shape)} and {list(deq.shape)}")
    Hf = _check_h("output_error", H, w.shape[1]).float()
    W = w.detach().to("cpu", torch.float64)
    D = W - deq.detach().to("cpu", torch.float64)
    # The [N, K] x [K, K] products run in float32 (sgemm; float64 made this the slowest step of
    # an RTN export: 2 N K^2 flops per layer, ~20 TFLOP for a 1.5B LM); H is PSD, so the sums
    # have no cancellation and float32 products keep ~1e-6 relative accuracy.
    Df, Wf = D.float(), W.float()
    return float(((Df @ Hf).double() * D).sum()), float(((Wf @ Hf).double() * W).sum())


__all__ = ["BilevelResult", "Hessian", "QuantResult", "bilevel", "gptq", "output_error", "refit", "rtn"]
