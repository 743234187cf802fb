"""Export configuration: one frozen dataclass, validated with ValueError, one field per CLI flag.

``edgevlm export SRC -o OUT --method M --bits B ...`` fills :class:`ExportConfig` field by field
(same names, same defaults).  No torch here: the CLI validates flags before importing torch.
"""

from __future__ import annotations

import enum
import math
import os
from dataclasses import dataclass

from ..qtypes import GROUP_SIZES


class Method(str, enum.Enum):
    """How the low-bit weights are chosen.

    RTN   round-to-nearest min-max per group (optionally with a clipping search).
    GPTQ  Hessian-based rounding with error feedback on the calibration inputs.
    SHQ   LQA's Selective Hybrid Quantization: GPTQ vision tower at ``bits``, text tower at
          ``text_bits`` (8 by default), the most sensitive vision layers kept at ``keep_bits``
          within a size budget.
    AWQ   activation-aware per-input-channel scales (export/awq.py) folded into the model, then
          RTN with the clipping search.  ``awq=True`` adds the same scales to gptq / shq.
    """

    RTN = "rtn"
    GPTQ = "gptq"
    SHQ = "shq"
    AWQ = "awq"


#: Widths a quantizable tensor can get.  16 means "not quantized, stored float16".
BITS = (2, 3, 4, 8, 16)


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")


@dataclass(frozen=True)
class ExportConfig:
    """Everything that decides what an export writes.  See ``edgevlm export --help``.

    bits        width of the quantized linear layers (vision tower, projector, language model).
    text_bits   width of the text tower / language model; None = ``bits`` (rtn, gptq) or 8 (shq).
    head_bits   width of a generative model's LM head (tied or not); None = max(text width, 4).
                A 2/3-bit head saves its share of every decode step's weight reads (0.12 of a
                2-bit Qwen2-VL-2B's) at a quality cost the 4-bit default avoids.
    group       quantization group size along the input features (32, 64, 128).  A tensor whose
                in-features are not a multiple of ``group`` uses the largest group that divides
                them, or stays float16 when none does (both recorded in the file).
    calib       calibration data: a folder of images (+ captions.jsonl / sentences.txt), a .jsonl
                or a .txt file; None = the images and sentences that ship with edgevlm.
    n_calib     calibration images (vision) and texts (text tower / language model).
    budget_bits SHQ size budget as average bits per parameter over the whole file.
    budget_mb   SHQ size budget as tensor megabytes (10^6 bytes) of the whole file.
    keep_frac   SHQ without a budget: fraction of vision linear layers kept at ``keep_bits``.
    keep_bits   precision of the layers SHQ keeps (8 or 16).
    clip_search per-group range shrink search minimising the (diag-H weighted) reconstruction
                error; None = on for gptq / shq (MiniLM W3: cosine 0.932 -> 0.952), off for rtn
                (plain min-max, the baseline).
    act_order   GPTQ column order by descending Hessian diagonal.
    true_sequential  quantize a block's linears group by group in forward order, each group's
                Hessian taken with the earlier groups already quantized (GPTQ's option).
    damp        GPTQ damping as a fraction of the mean Hessian diagonal.
    awq         activation-aware scale search (awq.py) before quantizing each block; None = on
                for method awq only.  Folds only where exact (per block layout; on post-LN BERT
                that is v -> attention output only).
    awq_grid    grid points r in [0, 1) of the scale search s = mean|x|^r.
    refit       rounds of group-param refitting after GPTQ (quantize.refit): each round re-fits
                every group's (scale, min) to its codes by least squares on the layer-output
                error; a further round reruns GPTQ with those params fixed, then refits again.
                0 = off.
    batch_size  calibration samples run through a block at once (memory vs speed).
    seed        calibration sampling / augmentation seed.
    """

    method: Method = Method.SHQ
    bits: int = 4
    text_bits: int | None = None
    head_bits: int | None = None
    group: int = 128
    calib: str | None = None
    n_calib: int = 32
    budget_bits: float | None = None
    budget_mb: float | None = None
    keep_frac: float = 0.1
    keep_bits: int = 8
    clip_search: bool | None = None
    act_order: bool = True
    true_sequential: bool = True
    damp: float = 0.01
    awq: bool | None = None
    awq_grid: int = 20
    refit: int = 0
    batch_size: int = 8
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "method", Method(self.method))
        except ValueError:
            raise ValueError(f"method must be one of {', '.join(m.value for m in Method)}, "
                             f"got {self.method!r}") from None
        _check_choice("bits", self.bits, BITS)
        if self.text_bits is not None:
            _check_choice("text_bits", self.text_bits, BITS)
        if self.head_bits is not None:
            _check_choice("head_bits", self.head_bits, BITS)
        _check_choice("group", self.group, GROUP_SIZES)
        _check_choice("keep_bits", self.keep_bits, (8, 16))
        if self.calib is not None:
            object.__setattr__(self, "calib", os.fspath(self.calib))
        if not (isinstance(self.n_calib, int) and self.n_calib >= 1):
            raise ValueError(f"n_calib must be a positive integer, got {self.n_calib!r}")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.budget_bits is not None and self.budget_mb is not None:
            raise ValueError("give one size budget: budget_bits (average bits per parameter) or "
                             "budget_mb (megabytes), not both")
        for name in ("budget_bits", "budget_mb"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if (self.budget_bits is not None or self.budget_mb is not None) and self.method is not Method.SHQ:
            raise ValueError(f"a size budget (budget_bits / budget_mb) selects per-layer precision and "
                             f"needs method=shq, got method={self.method.value}")
        if not (0.0 <= self.keep_frac <= 1.0):
            raise ValueError(f"keep_frac must be in [0, 1], got {self.keep_frac!r}")
        if self.awq is not None and not isinstance(self.awq, bool):
            raise ValueError(f"awq must be True, False or None, got {self.awq!r}")
        if self.method is Method.AWQ and self.awq is False:
            raise ValueError("method=awq is the activation-aware scale search: awq=False contradicts it "
                             "(use method=rtn for RTN without scales)")
        if isinstance(self.awq_grid, bool) or not (isinstance(self.awq_grid, int) and 2 <= self.awq_grid <= 100):
            raise ValueError(f"awq_grid must be an integer in [2, 100], got {self.awq_grid!r}")
        if isinstance(self.refit, bool) or not (isinstance(self.refit, int) and 0 <= self.refit <= 10):
            raise ValueError(f"refit must be an integer in [0, 10] (rounds), got {self.refit!r}")
        if not (isinstance(self.damp, (int, float)) and 0.0 < self.damp < 1.0):
            raise ValueError(f"damp must be in (0, 1) (a fraction of the mean Hessian diagonal), got {self.damp!r}")

    @property
    def effective_clip_search(self) -> bool:
        if self.clip_search is not None:
            return bool(self.clip_search)
        return self.method is not Method.RTN

    @property
    def effective_awq(self) -> bool:
        if self.awq is not None:
            return bool(self.awq)
        return self.method is Method.AWQ

    @property
    def effective_text_bits(self) -> int:
        if self.text_bits is not None:
            return self.text_bits
        return 8 if self.method is Method.SHQ and self.bits < 8 else self.bits

    def to_json(self) -> dict:
        """The settings as recorded in the file's metadata."""
        return {"method": self.method.value, "bits": self.bits, "text_bits": self.effective_text_bits,
                "group": self.group, "calib": self.calib or "built-in", "n_calib": self.n_calib,
                "budget_bits": self.budget_bits, "budget_mb": self.budget_mb, "keep_frac": self.keep_frac,
                "keep_bits": self.keep_bits, "clip_search": self.effective_clip_search, "act_order": self.act_order,
                "true_sequential": self.true_sequential,
                "awq": self.effective_awq, "awq_grid": self.awq_grid, "refit": self.refit,
                "damp": self.damp, "seed": self.seed}
