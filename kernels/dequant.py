"""Dequant kernel: packed W[N, K] -> float32 W[N, K], through the same unpack helpers as the
matmuls (unpack.py). It is what proves the Triton unpack bit-exact against the numpy twins
(edgevlm.qtypes.get(t).dequantize), and a way to check an export on a GPU.

Grid: (ceil(N / BLOCK_N), full-unit blocks + 1 tail block when K % UNIT != 0). Each program
writes BLOCK_N rows x BLOCK_K codes (or the tail unit).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import PackedWeight
from .unpack import dequant_values, group_params, load_chunks, plane_codes, tail_codes


@triton.jit
def _dequant_kernel(out_ptr, qs_ptr, sc_ptr, mn_ptr, c_ptr, z_ptr, N, K, KF, KFB, G, RB, ZB,
                    QT: tl.constexpr, UNIT: tl.constexpr, UB: tl.constexpr, P: tl.constexpr,
                    GROUP: tl.constexpr, HAS_TAIL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    T: tl.constexpr = 2 * BLOCK_K // UNIT        # 16-byte chunks per block
    BB: tl.constexpr = BLOCK_K // UNIT * UB      # bytes per block and row
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1)             # clamped: loads need no row mask
    n_ok = offs_n < N
    nblk = tl.cdiv(KF, BLOCK_K)
    if pid_k < nblk:
        k0 = pid_k * BLOCK_K
        t = tl.arange(0, T)[None, :, None]
        u = t // 2
        h = t % 2
        jj = tl.arange(0, 16)[None, None, :]
        r3 = rows[:, None, None]
        valid = (k0 + u * UNIT) < KF             # [1, T, 1]: chunks past the full units
        lo, hi = load_chunks(qs_ptr + r3 * RB + pid_k * BB, u, h, jj, valid, QT, UB)
        for p in tl.static_range(P):
            q = plane_codes(lo, hi, h, p, QT)                                  # [BN, T, 16]
            kstart = k0 + u * UNIT + p * 32 + h * 16                           # [1, T, 1]
            gi = tl.minimum(kstart // GROUP, G - 1)
            s, off = group_params(sc_ptr, mn_ptr, c_ptr, z_ptr, r3, gi, G, ZB, QT)
            w = dequant_values(q, s, off, QT)
            tl.store(out_ptr + r3 * K + kstart + jj, w, mask=valid & n_ok[:, None, None])
    if HAS_TAIL:
        if pid_k == nblk:
            TW: tl.constexpr = UNIT
            i = tl.arange(0, TW)[None, :]
            r2 = rows[:, None]
            q = tail_codes(qs_ptr + r2 * RB + KFB, i, K - KF, QT)               # [BN, TW]
            gi = tl.minimum((KF + i) // GROUP, G - 1)
            s, off = group_params(sc_ptr, mn_ptr, c_ptr, z_ptr, r2, gi, G, ZB, QT)
            w = dequant_values(q, s, off, QT)
            tl.store(out_ptr + r2 * K + KF + i, w, mask=(i < K - KF) & n_ok[:, None])


def dequantize(w: PackedWeight, *, block_n: int = 16, block_k: int = 256) -> torch.Tensor:
    """float32 [N, K] on w's device, equal bit for bit to ``edgevlm.qtypes.get(w.qtype).dequantize``."""
    if block_k % 128 or block_k & (block_k - 1) or block_n & (block_n - 1):
        raise ValueError(f"[dequantize] expected power-of-two block_n and block_k a power of two >= 128, "
                         f"got block_n={block_n} block_k={block_k}")
    out = torch.empty((w.n, w.k), dtype=torch.float32, device=w.blob.device)
    c = w.kernel_constexprs()
    grid = (triton.cdiv(w.n, block_n), triton.cdiv(w.k_full, block_k) + int(c["HAS_TAIL"]))
    # enable_fp_fusion=False: scale * q + min must round twice, as numpy and the C++ reference do.
    _dequant_kernel[grid](out, *w.kernel_args(), **c, BLOCK_N=block_n, BLOCK_K=block_k,
                          enable_fp_fusion=False)
    return out
