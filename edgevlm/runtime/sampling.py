"""Next-token selection: greedy, temperature, top-k, top-p, repetition penalty, seeded.

The order is transformers' ``generate``: repetition penalty on the raw logits, then
temperature, top-k, top-p, then a draw from the softmax.  ``temperature == 0`` (the default)
is greedy (argmax, first index on ties, as torch.argmax).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Sampler", "SamplingConfig"]


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0          # 0: greedy
    top_k: int = 0                    # 0: off
    top_p: float = 1.0                # 1: off
    repetition_penalty: float = 1.0   # 1: off (CTRL-style: logit / p if > 0 else logit * p)
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.repetition_penalty, (int, float)) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    def __init__(self, cfg: SamplingConfig) -> None:
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)

    def __call__(self, logits: np.ndarray, seen: np.ndarray | None = None) -> int:
        """logits float32 [V]; ``seen`` int token ids so far (prompt + generated) for the penalty."""
        c = self.cfg
        x = np.array(logits, dtype=np.float64)
        if c.repetition_penalty != 1.0 and seen is not None and len(seen):
            idx = np.unique(np.asarray(seen, dtype=np.int64))
            v = x[idx]
            x[idx] = np.where(v > 0, v / c.repetition_penalty, v * c.repetition_penalty)
        if c.greedy:
            return int(np.argmax(x))
        x /= c.temperature
        if c.top_k and c.top_k < x.size:
            kth = np.partition(x, -c.top_k)[-c.top_k]
            x[x < kth] = -np.inf
        if c.top_p < 1.0:
            order = np.argsort(-x, kind="stable")
            p = np.exp(x[order] - x[order[0]])
            p /= p.sum()
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            cut = int(np.searchsorted(np.cumsum(p), c.top_p) + 1)
            x[order[cut:]] = -np.inf
        p = np.exp(x - x.max())
        p /= p.sum()
        return int(self.rng.choice(x.size, p=p))
