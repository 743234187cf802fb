"""Learned rounding around GPTQ's codes for block reconstruction (blockrecon.py): signed gradient
descent through round-to-nearest (SignRound / AutoRound, Cheng et al. 2023), started from a GPTQ
solution instead of from round-to-nearest.

Each weight's code is clamp(round(c + V), 0, qmax), c GPTQ's code, with a straight-through
gradient (d code / dV = 1).  V starts at x - c, x = (w - min) / scale the full-precision weight
on the group's grid, clipped into GPTQ's rounding cell (|V| <= 0.5 - START_MARGIN): the codes
start as GPTQ's exactly, and the weights whose full-precision value lies near or beyond GPTQ's
rounding threshold need the fewest steps to flip.  Each step moves V by lr * sign(dL/dV) and
keeps it in [-1, 1]: a code moves at most one step from GPTQ's.  The forward pass always sees the
hard codes, so what is optimised is what the file stores (unlike AdaRound's soft codes, which
need thousands of annealing steps to agree with their rounding: on MiniLM W3 with 200 steps per
block, AdaRound started from GPTQ lowered block 0's calibration error 1.055e-2 -> 7.52e-3,
this 1.055e-2 -> 7.24e-3, codes frozen 9.52e-3).

edgevlm/export/speedq_adaround.py is AdaRound from round-to-nearest on RTN params (SPEED-Q's
stage 1); here the caller's (GPTQ) params stay tunable alongside (blockrecon's a, b).
"""

from __future__ import annotations

import torch

START_MARGIN = 0.05   # V starts at most 0.5 - START_MARGIN from GPTQ's code: its rounding holds


class SignCodes:
    """The movable codes of one weight matrix, in the caller's group view [N, G, group] float32.

    codes: GPTQ's integer codes (float32); x: the full-precision weight on the group grid
    (w - m) / s, same shape (nan/inf where s == 0: V starts at 0 there); qmax = 2^bits - 1."""

    def __init__(self, codes: torch.Tensor, x: torch.Tensor, qmax: int) -> None:
        if codes.shape != x.shape:
            raise ValueError(f"[SignCodes] expected codes and x of the same shape, got {list(codes.shape)} "
                             f"and {list(x.shape)}")
        if not (isinstance(qmax, int) and qmax >= 1):
            raise ValueError(f"[SignCodes] expected qmax a positive integer, got {qmax!r}")
        self.c0, self.qmax = codes, qmax
        lim = 0.5 - START_MARGIN
        self.v = (x - codes).nan_to_num(0.0, 0.0, 0.0).clamp(-lim, lim).requires_grad_(True)
        if not torch.equal(self.hard(), codes):
            raise RuntimeError("internal error: SignCodes does not start at the given codes")

    def codes(self) -> torch.Tensor:
        """The hard codes in the forward pass, with the identity gradient to V (straight-through)."""
        u = self.c0 + self.v
        return (u + (torch.round(u) - u).detach()).clamp(0, self.qmax)

    def hard(self) -> torch.Tensor:
        """The codes as the file stores them (float32 integers in [0, qmax])."""
        return torch.round(self.c0 + self.v.detach()).clamp(0, self.qmax)

    def step(self, lr: float) -> None:
        """V -= lr sign(dL/dV), kept in [-1, 1]; clears the gradient."""
        with torch.no_grad():
            if self.v.grad is not None:
                self.v.sub_(lr * torch.sign(self.v.grad)).clamp_(-1.0, 1.0)
                self.v.grad = None
