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
    QIG   AWQ's search with per-token weights from integrated gradients of each block's
          quantization discrepancy (export/qig.py); RTN with the clipping search, or GPTQ on
          IG-weighted Hessians with ``qig_hessian``.
    VEQ_MA  VEQ's modality-affinity-aware GPTQ (export/veq.py): each expert's Hessian
          H̃ = 2XᵀCX from its routed tokens, C = routing weight x modality weight.  ``veq`` is
          this variant (the paper's headline).  On a model without MoE layers: plain GPTQ.
    VEQ_ME  VEQ's modality-expert-aware AWQ: the experts' shared scale searched on the
          per-expert output errors weighted by each expert's modality-aware importance S_i.
    SPEEDQ  SPEED-Q's staged QAT (export/speedq.py): AdaRound vision tower, projector alignment,
          then language-model QAT with the bilevel quantizer and self-distillation from the fp
          model; 2-bit (q2b) or 4-bit.  Trains the whole model in memory (``speedq_device``).
    """

    RTN = "rtn"
    GPTQ = "gptq"
    SHQ = "shq"
    AWQ = "awq"
    QIG = "qig"
    VEQ = "veq"
    VEQ_MA = "veq-ma"
    VEQ_ME = "veq-me"
    SPEEDQ = "speedq"


class QigBaseline(str, enum.Enum):
    """QIG's integrated-gradient path start x': zeros, or the input as the W4A8 kernels quantize it."""

    ZERO = "zero"
    QUANTIZED = "quantized"


class SpeedQInit(str, enum.Enum):
    """Where SPEED-Q's stage-3 QAT starts (export/speedq_gptq.py).

    GPTQ  GPTQ on the recipe's own grid (clip-searched bilevel params), then QAT on that frozen
          grid from GPTQ's weights: the distillation starts at the best PTQ point.
    RTN   the paper's: asymmetric clip init, min-max bilevel params recomputed every forward.
    """

    GPTQ = "gptq"
    RTN = "rtn"


#: methods whose scales come from the activation-aware search (awq.py) by default
SCALED_METHODS = (Method.AWQ, Method.QIG, Method.VEQ_ME)
#: methods whose expert Hessians are VEQ-MA's C-weighted ones
VEQ_MA_METHODS = (Method.VEQ, Method.VEQ_MA)


class Format(str, enum.Enum):
    """What ``edgevlm export`` writes.

    EVLM                one ``.evlm`` file (edgevlm's runtime).
    COMPRESSED_TENSORS  a Hugging Face folder whose language-model linears are compressed-tensors
                        "pack-quantized" (transformers, vLLM), plus the ``.evlm`` of the same
                        weights (edgevlm/interop/hf_quantized.py).
    GPTQ                the same with the GPTQ (v1) checkpoint layout.
    Both Hugging Face formats store integer zero points: the language model is quantized with
    them (export/int_zero.py), so the two files hold the same weights bit for bit.
    """

    EVLM = "evlm"
    COMPRESSED_TENSORS = "compressed-tensors"
    GPTQ = "gptq"


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
    embed_bits  width of token-embedding tables (8 or 16; lookups, never a matmul, and the runtime
                pages in only the rows it reads).  None = 16 in 8-bit and float16 exports (``bits``
                and the table's tower both >= 8: tiny-CLIP GPTQ-8 text cosine vs fp32 is 0.99988
                with a q8 table, 0.99994 with float16, the issue's parity bar 0.9999), else the
                tower's width, at least 8 (SHQ's 8-bit text under 4-bit vision keeps a q8 table).
                A table that a tied LM head shares stays at max(8, head width) by default, so that
                it is stored once: at 16 bits the narrower head would need its own copy
                (export.pipeline._without_redundant_ties).
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
    block_refine  after GPTQ fixes a block's codes, tune its group (scale, min) params with Adam
                on the block-output error against the full-precision model (export/blockrecon.py);
                gptq / shq only.  A block keeps its GPTQ params unless the tuned ones, rounded to
                float16, lower its calibration error.
    block_refine_steps  Adam steps per block (one calibration batch each).
    block_refine_lr     Adam learning rate, relative to each parameter's size.
    block_refine_vectors  also tune the block's float32 norm weights/biases and linear biases.
    block_refine_codes  steps per block, before block_refine_steps, in which the codes move too
                (export/signround.py: each code may move one step from GPTQ's, by SignRound's
                signed-gradient update on a rounding offset, jointly with the params; the
                forward pass always runs the hard codes).  0 = codes frozen.
    qig_steps   qig: Riemann steps of the integrated-gradient path (32 as the paper).
    qig_baseline  qig: path start, zero or quantized (the int8-quantized input); None = zero,
                or quantized with qig_act8 (the paper's choices).
    qig_hessian qig: GPTQ on Hessians weighted by the same token importances (else RTN + clip).
    qig_act8    qig: calibrate for int8 activations (W4A8 runtime: the kernels quantize
                activations per token and group): the discrepancy and the scale search see
                fake-quantized activations; no IQR clipping (as the paper's W4A8 code).
    veq_text_weight  veq*: modality weight of text tokens (image tokens 1); None = the
                token-count ratio image/text of the calibration set, clipped to [1, 10].
    format      evlm (one .evlm file) or a Hugging Face checkpoint folder for scale-out serving
                (compressed-tensors, gptq); see :class:`Format`.
    speedq_steps  speedq: stage-3 QAT optimiser steps (the paper: ~10K at batch 64).
    speedq_stage2_steps  speedq: stage-2 projector-alignment steps.
    speedq_adaround_iters  speedq: stage-1 AdaRound iterations per vision block (BRECQ: 20000).
    speedq_lr   speedq: AdamW learning rate of stages 2-3 (cosine; the paper's 8e-6 is for 10K steps).
    speedq_device  speedq: torch device of the training ("cpu", "cuda", "cuda:1", ...).
    speedq_init  speedq: stage-3 start, gptq (GPTQ on the q2b/q4 grid, then QAT on that grid) or
                rtn (the paper's clip init + min-max); see :class:`SpeedQInit`.
    speedq_val  speedq: fraction of the calibration samples held out of stages 2-3; the stage-3
                weights kept are those with the lowest KL(fp || q) on them (0: no hold-out, the
                last step's weights).
    speedq_eval_every  speedq: stage-3 steps between two held-out evaluations.
    speedq_gen  speedq: teacher-sampled continuations per training prompt added to the stage-3
                data (self-distillation; 0: the calibration samples only).
    batch_size  calibration samples run through a block at once (memory vs speed); speedq's
                training batch.
    seed        calibration sampling / augmentation seed.
    """

    method: Method = Method.SHQ
    bits: int = 4
    text_bits: int | None = None
    head_bits: int | None = None
    embed_bits: int | None = None
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
    block_refine: bool = False
    block_refine_steps: int = 200
    block_refine_lr: float = 3e-3
    block_refine_vectors: bool = False
    block_refine_codes: int = 0
    qig_steps: int = 32
    qig_baseline: QigBaseline | None = None
    qig_hessian: bool = False
    qig_act8: bool = False
    veq_text_weight: float | None = None
    speedq_steps: int = 100
    speedq_stage2_steps: int = 30
    speedq_adaround_iters: int = 200
    speedq_lr: float = 1e-4
    speedq_device: str = "cpu"
    speedq_init: SpeedQInit = SpeedQInit.GPTQ
    speedq_val: float = 0.125
    speedq_eval_every: int = 25
    speedq_gen: int = 1
    format: Format = Format.EVLM
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
        if self.embed_bits is not None:
            _check_choice("embed_bits", self.embed_bits, (8, 16))
            if self.method is Method.SPEEDQ:
                raise ValueError(f"method=speedq fixes the embedding table's width (4-bit, frozen): embed_bits "
                                 f"must be unset, got {self.embed_bits!r}")
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
        if self.method in SCALED_METHODS and self.awq is False:
            raise ValueError(f"method={self.method.value} is an activation-aware scale search: awq=False "
                             "contradicts it (use method=rtn or gptq without scales)")
        if isinstance(self.qig_steps, bool) or not (isinstance(self.qig_steps, int) and 2 <= self.qig_steps <= 512):
            raise ValueError(f"qig_steps must be an integer in [2, 512], got {self.qig_steps!r}")
        if self.qig_baseline is not None:
            try:
                object.__setattr__(self, "qig_baseline", QigBaseline(self.qig_baseline))
            except ValueError:
                raise ValueError(f"qig_baseline must be one of {', '.join(b.value for b in QigBaseline)}, "
                                 f"got {self.qig_baseline!r}") from None
        qig_set = [n for n in ("qig_hessian", "qig_act8") if getattr(self, n) is not False] + \
            (["qig_baseline"] if self.qig_baseline is not None else [])
        if qig_set and self.method is not Method.QIG:
            raise ValueError(f"{', '.join(qig_set)} configure method=qig, got method={self.method.value}; "
                             "add --method qig or drop them")
        for n in ("qig_hessian", "qig_act8"):
            if not isinstance(getattr(self, n), bool):
                raise ValueError(f"{n} must be True or False, got {getattr(self, n)!r}")
        v = self.veq_text_weight
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                  and v > 0):
            raise ValueError(f"veq_text_weight must be a positive number (image tokens weigh 1), got {v!r}")
        if v is not None and self.method not in (*VEQ_MA_METHODS, Method.VEQ_ME):
            raise ValueError(f"veq_text_weight configures method=veq/veq-ma/veq-me, got method={self.method.value}")
        if isinstance(self.awq_grid, bool) or not (isinstance(self.awq_grid, int) and 2 <= self.awq_grid <= 100):
            raise ValueError(f"awq_grid must be an integer in [2, 100], got {self.awq_grid!r}")
        if isinstance(self.refit, bool) or not (isinstance(self.refit, int) and 0 <= self.refit <= 10):
            raise ValueError(f"refit must be an integer in [0, 10] (rounds), got {self.refit!r}")
        self._check_block_refine()
        self._check_speedq()
        self._check_format()
        if not (isinstance(self.damp, (int, float)) and 0.0 < self.damp < 1.0):
            raise ValueError(f"damp must be in (0, 1) (a fraction of the mean Hessian diagonal), got {self.damp!r}")

    def _check_block_refine(self) -> None:
        for name in ("block_refine", "block_refine_vectors"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.block_refine and self.method not in (Method.GPTQ, Method.SHQ):
            raise ValueError(f"block_refine tunes the group params of GPTQ codes and needs method=gptq or shq, "
                             f"got method={self.method.value}")
        tuned = [f for f in ("block_refine_steps", "block_refine_lr", "block_refine_vectors", "block_refine_codes")
                 if getattr(self, f) != self.__dataclass_fields__[f].default]
        if tuned and not self.block_refine:
            raise ValueError(f"{', '.join(tuned)} only apply with block_refine=True (--block-refine), which is off")
        steps = self.block_refine_steps
        if isinstance(steps, bool) or not (isinstance(steps, int) and 1 <= steps <= 100_000):
            raise ValueError(f"block_refine_steps must be an integer in [1, 100000] (Adam steps per block), "
                             f"got {steps!r}")
        lr = self.block_refine_lr
        if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and math.isfinite(lr) and 0.0 < lr <= 0.1):
            raise ValueError(f"block_refine_lr must be in (0, 0.1] (relative change per Adam step), got {lr!r}")
        codes = self.block_refine_codes
        if isinstance(codes, bool) or not (isinstance(codes, int) and 0 <= codes <= 100_000):
            raise ValueError(f"block_refine_codes must be an integer in [0, 100000] (soft-rounding steps per block; "
                             f"0 = codes frozen), got {codes!r}")

    def _check_format(self) -> None:
        try:
            object.__setattr__(self, "format", Format(self.format))
        except ValueError:
            raise ValueError(f"format must be one of {', '.join(f.value for f in Format)}, "
                             f"got {self.format!r}") from None
        if self.format is not Format.EVLM and (self.refit or self.block_refine):
            raise ValueError(f"format={self.format.value} stores integer zero points, which refit / block_refine "
                             "(float least-squares group params) would break; leave them off for this format")

    def _check_speedq(self) -> None:
        if self.method is Method.SPEEDQ:
            if self.bits not in (2, 4):
                raise ValueError(f"method=speedq has a 2-bit and a 4-bit recipe: bits must be 2 or 4, got "
                                 f"{self.bits!r}; use method=gptq or rtn for other widths")
            if self.text_bits not in (None, self.bits):
                raise ValueError(f"method=speedq quantizes the language model at bits={self.bits}: text_bits must "
                                 f"be unset or {self.bits}, got {self.text_bits!r}")
        for name in ("speedq_steps", "speedq_stage2_steps", "speedq_adaround_iters"):
            v = getattr(self, name)
            if isinstance(v, bool) or not (isinstance(v, int) and 0 <= v <= 10_000_000):
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        try:
            object.__setattr__(self, "speedq_init", SpeedQInit(self.speedq_init))
        except ValueError:
            raise ValueError(f"speedq_init must be one of {', '.join(i.value for i in SpeedQInit)}, "
                             f"got {self.speedq_init!r}") from None
        v = self.speedq_val
        if isinstance(v, bool) or not (isinstance(v, (int, float)) and 0 <= v <= 0.5):
            raise ValueError(f"speedq_val must be a fraction in [0, 0.5] of the calibration samples (0 = no "
                             f"held-out early stopping), got {v!r}")
        for name, lo in (("speedq_eval_every", 1), ("speedq_gen", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not (isinstance(v, int) and lo <= v <= 1_000_000):
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        lr = self.speedq_lr
        if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and math.isfinite(lr) and 0.0 < lr <= 1.0):
            raise ValueError(f"speedq_lr must be in (0, 1], got {lr!r}")
        if not (isinstance(self.speedq_device, str) and self.speedq_device):
            raise ValueError(f"speedq_device must be a torch device string such as 'cpu' or 'cuda', "
                             f"got {self.speedq_device!r}")

    @property
    def effective_clip_search(self) -> bool:
        if self.clip_search is not None:
            return bool(self.clip_search)
        return self.method is not Method.RTN

    @property
    def effective_awq(self) -> bool:
        if self.awq is not None:
            return bool(self.awq)
        return self.method in SCALED_METHODS

    @property
    def effective_qig_baseline(self) -> QigBaseline:
        if self.qig_baseline is not None:
            return self.qig_baseline
        return QigBaseline.QUANTIZED if self.qig_act8 else QigBaseline.ZERO

    @property
    def effective_text_bits(self) -> int:
        if self.text_bits is not None:
            return self.text_bits
        return 8 if self.method is Method.SHQ and self.bits < 8 else self.bits

    def embed_width(self, tower_bits: int) -> int:
        """Width of a token-embedding table whose tower is exported at ``tower_bits`` (see
        ``embed_bits``; a tied LM head's table is resolved by export.pipeline before this)."""
        if self.embed_bits is not None:
            return self.embed_bits
        return 16 if min(self.bits, tower_bits) >= 8 else max(tower_bits, 8)

    def to_json(self) -> dict:
        """The settings as recorded in the file's metadata."""
        return {"method": self.method.value, "bits": self.bits, "text_bits": self.effective_text_bits,
                **({"embed_bits": self.embed_width(self.effective_text_bits)}
                   if self.method is not Method.SPEEDQ else {}),
                "group": self.group, "calib": self.calib or "built-in", "n_calib": self.n_calib,
                "budget_bits": self.budget_bits, "budget_mb": self.budget_mb, "keep_frac": self.keep_frac,
                "keep_bits": self.keep_bits, "clip_search": self.effective_clip_search, "act_order": self.act_order,
                "true_sequential": self.true_sequential,
                "awq": self.effective_awq, "awq_grid": self.awq_grid, "refit": self.refit,
                "damp": self.damp, "seed": self.seed,
                **({"block_refine": {"steps": self.block_refine_steps, "lr": self.block_refine_lr,
                                     "vectors": self.block_refine_vectors,
                                     **({"codes_steps": self.block_refine_codes} if self.block_refine_codes else {})}}
                   if self.block_refine else {}),
                **({"qig_steps": self.qig_steps, "qig_baseline": self.effective_qig_baseline.value,
                    "qig_hessian": self.qig_hessian, "qig_act8": self.qig_act8} if self.method is Method.QIG else {}),
                **({"veq_text_weight": self.veq_text_weight}
                   if self.method in (*VEQ_MA_METHODS, Method.VEQ_ME) else {}),
                **({"speedq": {"steps": self.speedq_steps, "stage2_steps": self.speedq_stage2_steps,
                               "adaround_iters": self.speedq_adaround_iters, "lr": self.speedq_lr,
                               "init": self.speedq_init.value, "val": self.speedq_val,
                               "eval_every": self.speedq_eval_every, "gen": self.speedq_gen}}
                   if self.method is Method.SPEEDQ else {}),
                **({"format": self.format.value} if self.format is not Format.EVLM else {})}
