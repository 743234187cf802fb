"""Split-K GEMV for batch 1: y[N] = dequant(W)[N, K] @ x[K] (+ bias), reading the packed bytes once.

Per loop step a CTA loads BLOCK_N rows x one block of BLOCK_K codes as 16-byte chunks (one vector
load per thread and chunk), and instead of dequantizing every weight it uses, per 16-code chunk
of one group,  sum_k (s q_k + m) x_k = s * sum_k q_k x_k + m * sum_k x_k  (q2b: S (sum q x - z sum x)),
i.e. one multiply-add per code on integer codes converted in registers. Accumulation is float32.

SPLIT_K > 1: CTA (i, j) covers the j-th slice of the K blocks of row block i and writes its float32
partial to ``part[j, rows]``; a per-row-block counter counts finished slices and the CTA that
finishes last adds the SPLIT_K partials in a fixed order (deterministic), writes y and resets the
counter to 0, so the counters stay zeroed between launches and no memset kernel is needed. The
counters are per device; launches on one stream are ordered, so they never overlap.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .configs import GEMV_CONFIGS, GEMV_FAST_CONFIGS, MAX_SPLIT_K, GemvConfig
from .layout import PackedWeight
from .unpack import dequant_values, group_params, load_chunks, plane_codes_fast, tail_codes


@triton.jit
def _block_part(x_ptr, lo, hi, b, r2, valid, u3, h3, jj, u2, h2, sc_ptr, mn_ptr, c_ptr, z_ptr, G, ZB,
                QT: tl.constexpr, UNIT: tl.constexpr, P: tl.constexpr, GROUP: tl.constexpr,
                BLOCK_K: tl.constexpr, FAST: tl.constexpr):
    """One block's contribution [BN, T] (summed over T after the loop) from its chunk bytes lo/hi."""
    k0 = b * BLOCK_K
    if GROUP % BLOCK_K == 0:
        # The block lies in one group: sum q x and x over every plane first, then one (s, off)
        # load per row and block instead of one per row, chunk and plane.
        sqx = tl.zeros([lo.shape[0], lo.shape[1]], dtype=tl.float32)
        sx = tl.zeros([1, lo.shape[1]], dtype=tl.float32)
        for p in tl.static_range(P):
            q = plane_codes_fast(lo, hi, h3, p, QT, FAST)                           # [BN, T, 16]
            xv = tl.load(x_ptr + k0 + u3 * UNIT + p * 32 + h3 * 16 + jj, mask=valid, other=0.0)
            xv = xv.to(tl.float32)                                                 # [1, T, 16]
            sqx += tl.sum(q * xv, axis=2)
            if QT != 3:
                sx += tl.sum(xv, axis=2)
        gi = tl.minimum(k0 // GROUP, G - 1)
        s, off = group_params(sc_ptr, mn_ptr, c_ptr, z_ptr, r2, gi, G, ZB, QT)        # [BN, 1]
        if QT == 3:
            part = s * sqx
        elif QT == 4:
            part = s * (sqx - off * sx)
        else:
            part = s * sqx + off * sx
    else:
        part = tl.zeros([lo.shape[0], lo.shape[1]], dtype=tl.float32)
        for p in tl.static_range(P):
            q = plane_codes_fast(lo, hi, h3, p, QT, FAST)                           # [BN, T, 16]
            xv = tl.load(x_ptr + k0 + u3 * UNIT + p * 32 + h3 * 16 + jj, mask=valid, other=0.0)
            xv = xv.to(tl.float32)                                                 # [1, T, 16]
            sqx = tl.sum(q * xv, axis=2)                                           # [BN, T]
            gi = tl.minimum((k0 + u2 * UNIT + p * 32 + h2 * 16) // GROUP, G - 1)  # [1, T]
            s, off = group_params(sc_ptr, mn_ptr, c_ptr, z_ptr, r2, gi, G, ZB, QT)
            if QT == 3:
                part += s * sqx
            else:
                sx = tl.sum(xv, axis=2)                                            # [1, T]
                if QT == 4:
                    part += s * (sqx - off * sx)
                else:
                    part += s * sqx + off * sx
    return part


@triton.jit
def _gemv_kernel(x_ptr, out_ptr, part_ptr, cnt_ptr, bias_ptr,
                 qs_ptr, sc_ptr, mn_ptr, c_ptr, z_ptr, N, K, KF, KFB, G, RB, ZB,
                 QT: tl.constexpr, UNIT: tl.constexpr, UB: tl.constexpr, P: tl.constexpr,
                 GROUP: tl.constexpr, HAS_TAIL: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                 FAST: tl.constexpr, PREFETCH: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    T: tl.constexpr = 2 * BLOCK_K // UNIT        # 16-byte chunks per row and block
    BB: tl.constexpr = BLOCK_K // UNIT * UB      # bytes per row and block
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = tl.minimum(offs_n, N - 1)             # clamped: the loads need no row mask
    r3 = rows[:, None, None]
    r2 = rows[:, None]
    t3 = tl.arange(0, T)[None, :, None]
    u3 = t3 // 2
    h3 = t3 % 2
    t2 = tl.arange(0, T)[None, :]
    u2 = t2 // 2
    h2 = t2 % 2
    jj = tl.arange(0, 16)[None, None, :]

    nblk = tl.cdiv(KF, BLOCK_K)
    per = tl.cdiv(nblk, SPLIT_K)
    b_lo = pid_k * per
    b_hi = tl.minimum(b_lo + per, nblk)
    acc2 = tl.zeros([BLOCK_N, T], dtype=tl.float32)  # reduced over T once, after the loop
    if PREFETCH:
        # Registers double-buffer the chunk bytes: block b + 1 is in flight while block b is
        # computed (q3's high-bit plane is not prefetched: PREFETCH needs QT != 1).
        k_end = tl.minimum(KF, b_hi * BLOCK_K)  # the slice's end: no load past it or past KF
        nxt = tl.load(qs_ptr + r3 * RB + b_lo * BB + u3 * UB + h3 * 16 + jj,
                      mask=(b_lo * BLOCK_K + u3 * UNIT) < k_end, other=0)
        for b in range(b_lo, b_hi):
            cur = nxt
            valid = (b * BLOCK_K + u3 * UNIT) < KF                                 # [1, T, 1]
            nxt = tl.load(qs_ptr + r3 * RB + (b + 1) * BB + u3 * UB + h3 * 16 + jj,
                          mask=((b + 1) * BLOCK_K + u3 * UNIT) < k_end, other=0)
            acc2 += _block_part(x_ptr, cur, cur, b, r2, valid, u3, h3, jj, u2, h2, sc_ptr, mn_ptr, c_ptr,
                                z_ptr, G, ZB, QT, UNIT, P, GROUP, BLOCK_K, FAST)
    else:
        for b in range(b_lo, b_hi):
            valid = (b * BLOCK_K + u3 * UNIT) < KF                                 # [1, T, 1]
            lo, hi = load_chunks(qs_ptr + r3 * RB + b * BB, u3, h3, jj, valid, QT, UB)
            acc2 += _block_part(x_ptr, lo, hi, b, r2, valid, u3, h3, jj, u2, h2, sc_ptr, mn_ptr, c_ptr,
                                z_ptr, G, ZB, QT, UNIT, P, GROUP, BLOCK_K, FAST)
    acc = tl.sum(acc2, axis=1)                                                 # [BN]
    if HAS_TAIL:
        if pid_k == SPLIT_K - 1:
            i = tl.arange(0, UNIT)[None, :]                                    # [1, TW]
            q = tail_codes(qs_ptr + r2 * RB + KFB, i, K - KF, QT)               # [BN, TW]
            gi = tl.minimum((KF + i) // GROUP, G - 1)
            s, off = group_params(sc_ptr, mn_ptr, c_ptr, z_ptr, r2, gi, G, ZB, QT)
            xv = tl.load(x_ptr + KF + i, mask=i < K - KF, other=0.0).to(tl.float32)
            acc += tl.sum(dequant_values(q, s, off, QT) * xv, axis=1)

    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows).to(tl.float32)
        tl.store(out_ptr + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)
    else:
        tl.store(part_ptr + pid_k * N + offs_n, acc, mask=n_ok)
        tl.debug_barrier()  # every thread's partial is issued before the counter moves
        done = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if done == SPLIT_K - 1:  # the last slice of this row block: add the partials in order
            y = tl.zeros([BLOCK_N], dtype=tl.float32)
            for j in tl.static_range(SPLIT_K):
                y += tl.load(part_ptr + j * N + offs_n, mask=n_ok, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                y += tl.load(bias_ptr + rows).to(tl.float32)
            tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_ok)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)


_gemv_tuned = triton.autotune(configs=[c.triton() for c in GEMV_CONFIGS],
                              key=["N", "K", "QT", "GROUP", "HAS_BIAS", "FAST"])(_gemv_kernel)
_gemv_fast_tuned = triton.autotune(configs=[c.triton() for c in GEMV_FAST_CONFIGS],
                                   key=["N", "K", "QT", "GROUP", "HAS_BIAS", "FAST"])(_gemv_kernel)

# Decided when triton.jit wrapped the kernels: the interpreter cannot run inline PTX.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

_buffers: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _split_buffers(device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(partials float32 [MAX_SPLIT_K * >= n], counters int32 zeros [>= n]) kept per device and grown
    on demand; the kernel leaves the counters zero. Shared by every launch on the device, so
    launches must be ordered (one stream), as the runtime's are."""
    bufs = _buffers.get(device)
    if bufs is None or bufs[1].numel() < n:
        size = max(n, 16384)
        bufs = (torch.empty(MAX_SPLIT_K * size, dtype=torch.float32, device=device),
                torch.zeros(size, dtype=torch.int32, device=device))
        _buffers[device] = bufs
    return bufs


def default_fast(w: PackedWeight) -> bool:
    """Whether the GEMV takes the word-PTX unpack by default: where it measured faster on the H100
    (kernels/NOTES.md: q4 and q2 with groups of >= 128, whose 128-code blocks lie in one group).
    q4 g32 and q8 ran slower with it (per-chunk scales, and a layout that reduces across threads),
    q3 has no PTX planes, and the interpreter cannot run PTX."""
    return not INTERPRETED and w.qtype in ("q2", "q4") and w.group % 128 == 0


def gemv(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None, out: torch.Tensor,
         config: GemvConfig | None, fast: bool | None = None) -> torch.Tensor:
    """x: [K] (fp16/bf16/fp32, contiguous) -> out [N] (any float dtype); bias float32 [N] or None.
    ``config=None`` autotunes (key: N, K, type, group) over configs.GEMV_FAST_CONFIGS on the word-PTX
    path, else configs.GEMV_CONFIGS. ``fast``: the word-PTX unpack (default: ``default_fast``; True
    forces it for any type but q3 on a GPU, False forces the pure-Triton unpack, e.g. to compare)."""
    can_fast = w.qtype != "q3" and not INTERPRETED
    if fast is None:
        fast = default_fast(w)
    elif fast and not can_fast:
        raise ValueError(f"[gemv] fast=True needs a GPU and a qtype other than q3, got {w.qtype} "
                         f"(interpreted: {INTERPRETED}); pass fast=None")
    part, cnt = _split_buffers(x.device, w.n)  # counters: >= ceil(N / BLOCK_N) for every BLOCK_N
    args = (x, out, part, cnt, bias if bias is not None else out, *w.kernel_args())
    consts = dict(w.kernel_constexprs(), HAS_BIAS=bias is not None, FAST=fast)
    if config is None:
        grid = lambda meta: (triton.cdiv(w.n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
        (_gemv_fast_tuned if fast else _gemv_tuned)[grid](*args, **consts)
    else:
        grid = (triton.cdiv(w.n, config.block_n), config.split_k)
        _gemv_kernel[grid](*args, **consts, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                           SPLIT_K=config.split_k, PREFETCH=config.prefetch and w.qtype != "q3",
                           num_warps=config.num_warps, num_stages=1)
    return out
