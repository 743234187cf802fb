"""Tiled GEMM for prefill: Y[M, N] = X[M, K] @ dequant(W)[N, K]^T (+ bias), M >= 2.

Each CTA owns a BLOCK_M x BLOCK_N tile of Y and walks K in blocks of BLOCK_K codes. Per block it
loads W's 16-byte chunks once, and per code plane dequantizes them in registers (float32, then the
dot dtype) and multiplies with the matching columns of X on the tensor cores. The planes of a
chunk are not in natural k order, so X is loaded at the same permuted column indices instead of
reordering W: tl.dot only needs both operands to agree on the order of the reduction axis.

Dot inputs: float16 for float16 and float32 X (the runtime's activations; the dequantized weights
round to fp16 too); for bfloat16 X, float32 operands (tf32 on the tensor cores: bf16 values are
exact in tf32, the weights round to 10 mantissa bits, not bf16's 7). Accumulation is float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import GEMM_CONFIGS, GemmConfig
from .layout import PackedWeight
from .unpack import dequant_values, group_params, load_chunks, plane_codes, plane_codes_f16, tail_codes


@triton.jit
def _gemm_kernel(x_ptr, out_ptr, bias_ptr, qs_ptr, sc_ptr, mn_ptr, c_ptr, z_ptr, N, K, KF, KFB, G, RB, ZB,
                 M, stride_xm, stride_om, M_BUCKET,
                 QT: tl.constexpr, UNIT: tl.constexpr, UB: tl.constexpr, P: tl.constexpr,
                 GROUP: tl.constexpr, HAS_TAIL: tl.constexpr, HAS_BIAS: tl.constexpr, X_BF16: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # M_BUCKET only keys the autotuner (prefill lengths share a config per power of two).
    DT: tl.constexpr = tl.float32 if X_BF16 else tl.float16
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    T: tl.constexpr = 2 * BLOCK_K // UNIT
    BB: tl.constexpr = BLOCK_K // UNIT * UB
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    xr = tl.minimum(offs_m, M - 1)               # clamped rows: loads need no row mask
    rows = tl.minimum(offs_n, N - 1)
    r3 = rows[:, None, None]
    x3 = xr[:, None, None] * stride_xm
    t3 = tl.arange(0, T)[None, :, None]
    u3 = t3 // 2
    h3 = t3 % 2
    jj = tl.arange(0, 16)[None, None, :]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for b in range(0, tl.cdiv(KF, BLOCK_K)):
        k0 = b * BLOCK_K
        valid = (k0 + u3 * UNIT) < KF                                          # [1, T, 1]
        lo, hi = load_chunks(qs_ptr + r3 * RB + b * BB, u3, h3, jj, valid, QT, UB)
        for p in tl.static_range(P):
            kstart = k0 + u3 * UNIT + p * 32 + h3 * 16                         # [1, T, 1]
            gi = tl.minimum(kstart // GROUP, G - 1)
            s, off = group_params(sc_ptr, mn_ptr, c_ptr, z_ptr, r3, gi, G, ZB, QT)  # [BN, T, 1]
            if X_BF16:
                w = dequant_values(plane_codes(lo, hi, h3, p, QT), s, off, QT)         # float32
            else:  # fp16 all the way: exact codes, one multiply-add (q2b: subtract, multiply)
                q = plane_codes_f16(lo, hi, h3, p, QT)                         # [BN, T, 16]
                w = dequant_values(q, s.to(DT), off.to(DT), QT)
            w = tl.reshape(w, [BLOCK_N, T * 16])
            xv = tl.load(x_ptr + x3 + kstart + jj, mask=valid, other=0.0)      # [BM, T, 16]
            xv = tl.reshape(xv.to(DT), [BLOCK_M, T * 16])
            acc = tl.dot(xv, tl.trans(w), acc)
    if HAS_TAIL:
        TW: tl.constexpr = UNIT
        i = tl.arange(0, TW)[None, :]
        r2 = rows[:, None]
        q = tail_codes(qs_ptr + r2 * RB + KFB, i, K - KF, QT)                   # [BN, TW]
        gi = tl.minimum((KF + i) // GROUP, G - 1)
        s, off = group_params(sc_ptr, mn_ptr, c_ptr, z_ptr, r2, gi, G, ZB, QT)
        w = dequant_values(q, s, off, QT).to(DT)
        xv = tl.load(x_ptr + xr[:, None] * stride_xm + KF + i, mask=i < K - KF, other=0.0).to(DT)
        acc = tl.dot(xv, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows)[None, :].to(tl.float32)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


_gemm_tuned = triton.autotune(configs=[c.triton() for c in GEMM_CONFIGS],
                              key=["N", "K", "M_BUCKET", "QT", "GROUP", "HAS_BIAS", "X_BF16"])(_gemm_kernel)


def gemm(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None, out: torch.Tensor,
         config: GemmConfig | None) -> torch.Tensor:
    """x: [M, K] (rows contiguous) -> out [M, N]; bias float32 [N] or None. ``config=None``
    autotunes over configs.GEMM_CONFIGS (key: N, K, M rounded up to a power of two, type, group)."""
    m = x.shape[0]
    args = (x, out, bias if bias is not None else out, *w.kernel_args(), m, x.stride(0), out.stride(0),
            triton.next_power_of_2(m))
    consts = dict(w.kernel_constexprs(), HAS_BIAS=bias is not None, X_BF16=x.dtype == torch.bfloat16)
    if config is None:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(w.n, meta["BLOCK_N"]))  # noqa: E731
        _gemm_tuned[grid](*args, **consts)
    else:
        grid = (triton.cdiv(m, config.block_m), triton.cdiv(w.n, config.block_n))
        _gemm_kernel[grid](*args, **consts, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                           BLOCK_K=config.block_k, num_warps=config.num_warps, num_stages=config.num_stages)
    return out
