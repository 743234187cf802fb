"""Launch configurations: the small sets the autotuner picks from on a GPU, and the fixed ones the
interpreter (TRITON_INTERPRET=1, tests on CPU) uses instead of timing.

GEMV (M = 1) is memory-bound: what matters is enough bytes in flight. BLOCK_K codes per row and
step make each thread's load one 16-byte chunk; SPLIT_K > 1 cuts K among CTAs when N alone gives
too few (e.g. N = 4096, K = 14336 on 132 SMs), the last CTA of a row block adding the partials.
GEMM (prefill) is the usual tiled tensor-core loop with dequantization in registers.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton

MAX_SPLIT_K = 16  # rows of the split-K partials buffer


def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


@dataclass(frozen=True)
class GemvConfig:
    block_n: int      # rows per CTA
    block_k: int      # codes per row per loop step: a power of two >= 128 (whole units of every type)
    split_k: int      # CTAs sharing one row block's K range, 1..MAX_SPLIT_K
    num_warps: int = 4
    prefetch: bool = False  # load block b + 1 into registers while block b is computed (not q3)

    def __post_init__(self):
        if not (_pow2(self.block_n) and _pow2(self.block_k) and self.block_k >= 128):
            raise ValueError(f"[GemvConfig] expected power-of-two block_n and block_k >= 128, got {self}")
        if not 1 <= self.split_k <= MAX_SPLIT_K:
            raise ValueError(f"[GemvConfig] expected 1 <= split_k <= {MAX_SPLIT_K}, got {self.split_k}")

    def triton(self) -> triton.Config:
        return triton.Config({"BLOCK_N": self.block_n, "BLOCK_K": self.block_k, "SPLIT_K": self.split_k,
                              "PREFETCH": self.prefetch}, num_warps=self.num_warps, num_stages=1)


@dataclass(frozen=True)
class GemmConfig:
    block_m: int      # rows of X per CTA (>= 16: tensor-core tile)
    block_n: int      # rows of W per CTA (>= 16)
    block_k: int      # codes per step, power of two >= 128
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        if not (_pow2(self.block_m) and _pow2(self.block_n) and _pow2(self.block_k)) or \
                min(self.block_m, self.block_n) < 16 or self.block_k < 128:
            raise ValueError(f"[GemmConfig] expected powers of two, block_m/block_n >= 16 and block_k >= 128, "
                             f"got {self}")

    def triton(self) -> triton.Config:
        return triton.Config({"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k},
                             num_warps=self.num_warps, num_stages=self.num_stages)


GEMV_CONFIGS = (
    GemvConfig(16, 256, 1, 4), GemvConfig(16, 512, 1, 4), GemvConfig(16, 1024, 1, 4),
    GemvConfig(32, 512, 1, 4), GemvConfig(64, 256, 1, 4), GemvConfig(32, 1024, 1, 8),
    GemvConfig(16, 512, 2, 4), GemvConfig(32, 512, 2, 4), GemvConfig(16, 1024, 4, 4),
    GemvConfig(32, 512, 4, 4), GemvConfig(64, 256, 4, 8), GemvConfig(16, 512, 8, 4),
)
# The word-PTX path (gemv.default_fast: q2/q4 with groups >= 128 on a GPU) is no longer bound by the
# unpack: more rows per thread (x and its sums are shared by a thread's rows), BLOCK_K = 128 so a
# g128 block is one group (one scale load per row and block), and split-K up to 16 so N = 4096
# still gives >= 256 CTAs. (Register prefetch of uint8 chunks costs ~30% more instructions on
# sm_90: the loop-carried bytes are repacked with PRMT; one config keeps it for comparison.)
GEMV_FAST_CONFIGS = (
    GemvConfig(128, 128, 4, 4), GemvConfig(128, 128, 8, 4), GemvConfig(128, 128, 16, 4),
    GemvConfig(64, 128, 4, 4), GemvConfig(64, 128, 8, 4), GemvConfig(128, 256, 4, 8),
    GemvConfig(64, 128, 4, 4, True), GemvConfig(16, 1024, 4, 4),
)
GEMM_CONFIGS = (
    GemmConfig(16, 64, 256, 4, 2), GemmConfig(16, 32, 256, 4, 2), GemmConfig(32, 64, 256, 4, 2),
    GemmConfig(64, 64, 128, 4, 2), GemmConfig(64, 128, 128, 8, 2), GemmConfig(128, 64, 128, 8, 2),
    GemmConfig(128, 128, 128, 8, 2), GemmConfig(64, 128, 256, 8, 2),
)
# The interpreter runs every program in numpy: small tiles, and a split GEMV so the fix-up runs.
INTERPRET_GEMV = GemvConfig(8, 128, 2, 1, True)
INTERPRET_GEMM = GemmConfig(16, 16, 128, 1, 1)
