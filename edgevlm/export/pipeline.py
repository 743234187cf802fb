"""The export pipeline: plan every tensor's precision, calibrate, select (SHQ), write.

    open_source -> resolve (tensor_map) -> plan -> [SHQ budget check] -> calibrate block by
    block (recipes) storing packed tensors in a spool file -> SHQ selection -> format.write

Packed tensors go to a spool file next to the output as they are produced, so memory does not
grow with the model; format.write streams them into the final file (atomically) and the spool
is deleted whatever happens.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from .. import format as fmt
from .. import qtypes
from .awq import ScaleSearch
from .calib_data import load_calib
from .calibrate import Calibrator, tune_malloc
from .config import ExportConfig, Method
from .config import Format
from .lazy import LazyModel
from .quantize import Hessian, QuantResult, gptq, output_error, refit, rtn
from .recipes import RECIPES
from .source import Source, open_source
from .tensor_map import Kind, Mapped, resolve

_QTYPE = {2: "q2", 3: "q3", 4: "q4", 8: "q8"}


@dataclass(frozen=True)
class Target:
    """Where one tensor ends up: a qtype + group, or a raw float type."""

    qtype: str          # q2/q3/q4/q8, or f16/f32
    bits: int
    group: int          # 0 for raw
    note: str = ""      # why it differs from what the config asked, if it does

    def nbytes(self, shape: tuple[int, ...]) -> int:
        if self.qtype in ("f16", "f32"):
            return int(np.prod(shape, dtype=np.int64)) * (2 if self.qtype == "f16" else 4)
        n, k = shape
        return qtypes.get(self.qtype).packed_size(n, k, self.group)


@dataclass
class LayerRow:
    key: str
    tower: str
    kind: str
    shape: tuple[int, ...]
    target: Target
    method: str
    error: float | None = None          # relative output error on the calibration set (or weight error)
    sensitivity: float | None = None    # SHQ: the low-bit relative output error
    kept: bool = False                  # SHQ: promoted to keep_bits


@dataclass
class ExportReport:
    path: Path
    file_bytes: int
    n_params: int
    bits_per_param: float
    rows: list[LayerRow]
    seconds: float
    calib_peak_rss_mb: float
    fake_quant: dict[str, np.ndarray] = field(default_factory=dict)  # only with keep_fake_quant=True


# ------------------------------------------------------------------------------------------------
class _Spool:
    """Append-only temp file of packed blobs; blobs are read back as read-only memmaps."""

    def __init__(self, out: Path) -> None:
        self.path = out.with_name(f".{out.name}.{os.getpid()}.spool")
        self._f = open(self.path, "w+b")  # noqa: SIM115 - closed in close()
        self._end = 0

    def add(self, data: np.ndarray) -> tuple[int, int, np.dtype, tuple[int, ...]]:
        shape = np.shape(data)  # before ascontiguousarray, which makes 0-d arrays 1-d
        data = np.ascontiguousarray(data)
        self._f.write(data.tobytes())
        ref = (self._end, data.nbytes, data.dtype, shape)
        self._end += data.nbytes
        return ref

    def view(self, ref) -> np.ndarray:
        off, nbytes, dtype, shape = ref
        self._f.flush()
        if nbytes == 0:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=off, shape=shape)

    def close(self) -> None:
        self._f.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


# ------------------------------------------------------------------------------------------------
def _group_for(k: int, want: int) -> int | None:
    for g in sorted({want, *qtypes.GROUP_SIZES}, reverse=True):
        if g <= want and k % g == 0:
            return g
    return None


def plan_target(m: Mapped, cfg: ExportConfig) -> Target:
    e = m.entry
    if cfg.method is Method.SPEEDQ:   # SPEED-Q's fixed layout (q2b LM, 4-bit head, fp16 projector)
        from .speedq import plan_target as plan_speedq

        return plan_speedq(m, cfg)
    if e.kind is Kind.VECTOR:
        return Target("f32", 32, 0)
    if e.kind is Kind.DENSE:
        return Target("f16", 16, 0)
    tower_bits = cfg.effective_text_bits if e.tower == "text" else cfg.bits
    bits = max(tower_bits, e.min_bits)
    if e.kind is Kind.EMBED:   # lookup tables: ExportConfig.embed_bits (never below the entry's minimum)
        bits = max(cfg.embed_width(tower_bits), e.min_bits)
    if e.key == "lm_head.weight" and cfg.head_bits is not None:   # the user's choice beats min_bits
        bits = cfg.head_bits
    if bits >= 16:
        return Target("f16", 16, 0)
    k = m.shape[1]
    g = _group_for(k, cfg.group)
    if g is None:
        return Target("f16", 16, 0, f"in-features {k} is not a multiple of 32: kept float16")
    note = f"group {g}: in-features {k} is not a multiple of {cfg.group}" if g != cfg.group else ""
    if bits != tower_bits:
        note = (note + "; " if note else "") + f"{bits}-bit minimum for this tensor"
    return Target(_QTYPE[bits], bits, g, note)


def _without_redundant_ties(mapped: list[Mapped], cfg: ExportConfig) -> list[Mapped]:
    """Drop a tied row (a tied LM head) when it would be stored no narrower than the tensor it
    shares (fp16 or 8-bit exports): the runtime then uses the embedding table as the head."""
    by_ckpt = {m.ckpt: m for m in mapped if m.entry.tied_from is None}
    keep = []
    for m in mapped:
        t = by_ckpt.get(m.ckpt) if m.entry.tied_from is not None else None
        if t is not None and plan_target(m, cfg).bits >= plan_target(t, cfg).bits:
            continue
        keep.append(m)
    return keep


def _tied_embed_bits(mapped: list[Mapped], cfg: ExportConfig) -> ExportConfig:
    """cfg with embed_bits resolved for a token table that a tied LM head shares: max(8, head
    width) when the default would be wider, so the table is stored once and read as the head (a
    16-bit table would add the head's own copy).  Unchanged with an explicit embed_bits."""
    if cfg.embed_bits is not None or cfg.method is Method.SPEEDQ:
        return cfg
    tables = {m.ckpt: plan_target(m, cfg).bits for m in mapped if m.entry.kind is Kind.EMBED}
    heads = [plan_target(m, cfg).bits for m in mapped if m.entry.tied_from is not None and m.ckpt in tables]
    if heads and max(8, min(heads)) < max(tables.values()):
        return dataclasses.replace(cfg, embed_bits=max(8, min(heads)))
    return cfg


def _shq_candidate(m: Mapped, cfg: ExportConfig, low: Target) -> Target | None:
    """SHQ may keep a vision linear layer at keep_bits instead of its low width."""
    if cfg.method is not Method.SHQ or m.entry.kind is not Kind.LINEAR or m.entry.tower != "vision":
        return None
    if low.qtype in ("f16", "f32") or low.bits >= cfg.keep_bits:
        return None
    return Target("f16", 16, 0) if cfg.keep_bits == 16 else Target("q8", 8, low.group)


# ------------------------------------------------------------------------------------------------
class _ExportQuantizer:
    """Implements calibrate.Quantizer: quantizes, spools, records."""

    def __init__(self, cfg: ExportConfig, mapped: list[Mapped], spool: _Spool, keep_fake_quant: bool) -> None:
        self.cfg, self.spool = cfg, spool
        self.by_canon = {m.canonical: m for m in mapped}
        self.targets = {m.key: plan_target(m, cfg) for m in mapped}
        self.cands = {m.key: c for m in mapped if (c := _shq_candidate(m, cfg, self.targets[m.key])) is not None}
        self.done: dict[str, tuple[Target, Any, dict]] = {}      # key -> (target, spool ref, extra)
        self.alt: dict[str, tuple[Target, Any, dict]] = {}         # SHQ keep_bits candidates
        self.rows: dict[str, LayerRow] = {}
        self.block_errors: list[tuple[str, int, float]] = []
        self.fake: dict[str, np.ndarray] | None = {} if keep_fake_quant else None
        self.awq: dict[str, dict] = {}                              # canonical linear -> its fold
        # speedq: key -> (method label, QuantResult | BilevelResult) chosen by training (speedq.py),
        # stored as is by _store_matrix instead of quantizing the weight it is given
        self.preset: dict[str, tuple[str, Any]] = {}
        # block_refine: the current block's low-bit linears (result, W, H, label, extra), kept
        # until blockrecon re-stores them with tuned params; emptied at every block_done.
        self.pending: dict[str, tuple[QuantResult, torch.Tensor, torch.Tensor | None, str, dict]] = {}

    # -- calibrate.Quantizer ------------------------------------------------------------------------
    def wants_hessian(self, canonical: str) -> bool:
        m = self.by_canon.get(canonical)
        return m is not None and m.entry.kind is Kind.LINEAR and self.targets[m.key].qtype.startswith("q")

    def linear(self, canonical: str, w: torch.Tensor, hessian: Hessian | None) -> torch.Tensor:
        m = self._mapped(canonical)
        if m.entry.kind is not Kind.LINEAR:
            raise RuntimeError(f"internal error: {canonical} is a {m.entry.kind.value}, not a linear weight")
        return self._store_matrix(m, w.detach().to(torch.float32), hessian)

    def stored(self, canonical: str, t: torch.Tensor) -> torch.Tensor:
        m = self.by_canon.get(canonical)
        if m is None:  # parameters outside the table (e.g. unused heads) are never in the file
            return t.to(torch.float32)
        if m.entry.kind is Kind.LINEAR:
            return t.to(torch.float32)
        if m.key in self.done:
            return torch.from_numpy(self._fake_value(m))
        return self._store_matrix(m, t.to(torch.float32), None)

    def block_done(self, tower: str, index: int, rel_err: float) -> None:
        self.block_errors.append((tower, index, rel_err))
        self.pending.clear()

    # -- blockrecon.RefineQuantizer -------------------------------------------------------------------
    def quant_result(self, canonical: str) -> QuantResult | None:
        p = self.pending.get(canonical)
        return p[0] if p is not None else None

    def requantized(self, canonical: str, res: QuantResult, info: dict) -> torch.Tensor:
        m = self._mapped(canonical)
        old, w, H, label, extra = self.pending.pop(canonical)
        if res.qtype != old.qtype or (not self.cfg.block_refine_codes and not np.array_equal(res.codes, old.codes)):
            raise RuntimeError(f"internal error: block refinement of {canonical} changed its codes")
        sens = self.rows[m.key].sensitivity
        self._put(m, self.targets[m.key], res.pack(), {**extra, "block_refine": info}, label + "+br",
                  self._error(w, res.deq, H), res.deq)
        self.rows[m.key].sensitivity = sens   # SHQ ranks layers by their GPTQ error, as without refinement
        return res.deq

    def wants_refine(self, canonical: str) -> bool:
        m = self.by_canon.get(canonical)
        return m is not None and m.entry.kind is Kind.VECTOR and m.key in self.done

    def fake_quant(self, canonical: str, w: torch.Tensor) -> torch.Tensor | None:
        m = self.by_canon.get(canonical)
        if m is None or m.entry.kind is not Kind.LINEAR:
            return None
        tgt = self.targets[m.key]
        if not tgt.qtype.startswith("q"):
            return None
        return rtn(w.detach().to(torch.float32), tgt.qtype, tgt.group).deq

    def clip_fake_quant(self, canonical: str, w: torch.Tensor, h_diag: torch.Tensor) -> torch.Tensor | None:
        """awq.ClipQuant: what _store_matrix's "rtn+clip" would store for w with Hessian diagonal h_diag."""
        m = self.by_canon.get(canonical)
        if self.fake_quant(canonical, w[:1]) is None:
            return None
        tgt = self.targets[m.key]
        return rtn(w.detach().to(torch.float32), tgt.qtype, tgt.group, clip_search=True,
                   h_diag=h_diag.to(torch.float64), int_zero=self._int_zero(m)).deq

    def restore(self, canonical: str, t: torch.Tensor) -> torch.Tensor:
        m = self._mapped(canonical)
        if m.entry.kind is Kind.LINEAR:
            raise RuntimeError(f"internal error: restore() of the linear weight {canonical}")
        self.done.pop(m.key, None)   # the old blob stays in the spool, unreferenced (a few floats)
        return self._store_matrix(m, t.to(torch.float32), None)

    def scaled(self, folded: list) -> None:
        for f in folded:
            for c in f.linears:
                self.awq[c] = {"group": f.group, "ratio": f.ratio, "loss_ratio": f.loss / max(f.loss_plain, 1e-30)}
                if f.clip is not None:   # the scale search scored the clip search too (awq.ClipQuant)
                    self.awq[c]["clip"] = f.clip

    # -- storage --------------------------------------------------------------------------------------
    def _mapped(self, canonical: str) -> Mapped:
        m = self.by_canon.get(canonical)
        if m is None:
            raise RuntimeError(f"internal error: {canonical} is not in the tensor table")
        return m

    def _store_matrix(self, m: Mapped, w: torch.Tensor, hessian: Hessian | None) -> torch.Tensor:
        tgt = self.targets[m.key]
        w = w.reshape(m.shape)
        extra = {"src": m.ckpt, "kind": m.entry.kind.value, "tower": m.entry.tower}
        if m.entry.tied_from is not None and m.canonical != m.entry.tied_from:
            extra["param"] = m.canonical  # src is the shared (tied) tensor; this is the parameter
        if tgt.note:
            extra["note"] = tgt.note
        H = hessian.matrix() if hessian is not None and hessian.n_tokens > 0 else None
        if tgt.qtype in ("f16", "f32"):
            dt = np.float16 if tgt.qtype == "f16" else np.float32
            arr = w.numpy().astype(dt)
            deq = torch.from_numpy(arr.astype(np.float32))
            self._put(m, tgt, arr, extra, "none", None, deq)
            return deq
        method = self._method(m, H)
        if m.key in self.preset:
            res = self.preset.pop(m.key)[1]
        else:
            res = self._quantize(w, tgt, method, H, int_zero=self._int_zero(m))
        label = method + ("+refit" if self.cfg.refit and method.startswith("gptq") and tgt.qtype != "q8" else "")
        if m.canonical in self.awq:   # the weight was scaled by the activation-aware search
            label = (self.cfg.method.value if self.cfg.method in (Method.QIG, Method.VEQ_ME) else "awq") + "+" + label
            extra["awq"] = self.awq[m.canonical]
        err = self._error(w, res.deq, H)
        self._put(m, tgt, res.pack(), extra, label, err, res.deq)
        if self.cfg.block_refine and m.entry.kind is Kind.LINEAR and method.startswith("gptq"):
            self.pending[m.canonical] = (res, w, H, label, extra)
        cand = self.cands.get(m.key)
        if cand is not None:
            self.rows[m.key].sensitivity = err
            if cand.qtype == "f16":
                arr = w.numpy().astype(np.float16)
                alt_deq, alt_blob = torch.from_numpy(arr.astype(np.float32)), arr
            else:
                alt = self._quantize(w, cand, method, H)
                alt_deq, alt_blob = alt.deq, alt.pack()
            aerr = self._error(w, alt_deq, H)
            self.alt[m.key] = (cand, self.spool.add(alt_blob), {**extra, "method": label, "error": aerr})
            if self.fake is not None:
                self.fake[m.key + "#keep"] = alt_deq.numpy()
        return res.deq

    def _method(self, m: Mapped, H: torch.Tensor | None) -> str:
        if m.key in self.preset:
            return self.preset[m.key][0]
        if m.entry.kind is Kind.EMBED or H is None or self.cfg.method in (Method.RTN, Method.AWQ) \
                or self.cfg.method is Method.VEQ_ME or (self.cfg.method is Method.QIG and not self.cfg.qig_hessian):
            if self.awq.get(m.canonical, {}).get("clip") is False:   # plain RTN scored better (awq.py)
                return "rtn"
            return "rtn+clip" if self.cfg.effective_clip_search and m.entry.kind is Kind.LINEAR else "rtn"
        return "gptq+clip" if self.cfg.effective_clip_search else "gptq"

    def _int_zero(self, m: Mapped) -> int | None:
        """The lowest integer zero point of a tensor the Hugging Face format packs (None: float
        mins): --format compressed-tensors / gptq store the language model's linears with integer
        zero points (edgevlm/interop/hf_quantized.py)."""
        if self.cfg.format is Format.EVLM:
            return None
        from ..interop.hf_quantized import int_zero_for

        return int_zero_for(self.cfg.format, m.entry.kind.value, m.entry.tower, m.key)

    def _quantize(self, w: torch.Tensor, tgt: Target, method: str, H: torch.Tensor | None,
                  int_zero: int | None = None) -> QuantResult:
        if method.startswith("gptq"):
            kw = dict(damp=self.cfg.damp, act_order=self.cfg.act_order)
            res = gptq(w, H, tgt.qtype, tgt.group, clip_search=self.cfg.effective_clip_search, int_zero=int_zero,
                       **kw)
            for r in range(self.cfg.refit):
                if r:   # codes for the refitted params, then params for those codes
                    res = gptq(w, H, tgt.qtype, tgt.group, params=(res.scales, res.mins), **kw)
                res = refit(res, w, H)
            return res
        h_diag = torch.diagonal(H).clone() if H is not None else None
        return rtn(w, tgt.qtype, tgt.group, clip_search=method == "rtn+clip", h_diag=h_diag, int_zero=int_zero)

    @staticmethod
    def _error(w: torch.Tensor, deq: torch.Tensor, H: torch.Tensor | None) -> float:
        if H is not None:
            err, energy = output_error(w, deq, H)
            return float(err / energy) if energy > 0 else 0.0
        den = float((w.double() ** 2).sum())
        return float(((w.double() - deq.double()) ** 2).sum()) / den if den > 0 else 0.0

    def _put(self, m: Mapped, tgt: Target, blob: np.ndarray, extra: dict, method: str, err: float | None,
             deq: torch.Tensor) -> None:
        if method != "none":
            extra = {**extra, "method": method, "error": err}
        self.done[m.key] = (tgt, self.spool.add(blob), extra)
        self.rows[m.key] = LayerRow(m.key, m.entry.tower, m.entry.kind.value, m.shape, tgt, method, err)
        if self.fake is not None:
            self.fake[m.key] = deq.numpy().reshape(m.shape)

    def _fake_value(self, m: Mapped) -> np.ndarray:
        """What the file holds for an already stored tensor (a module loaded a second time)."""
        if self.fake is not None:
            return self.fake[m.key]
        tgt, ref, _ = self.done[m.key]
        blob = np.asarray(self.spool.view(ref))
        if tgt.qtype in ("f16", "f32"):
            return blob.astype(np.float32).reshape(m.shape)
        return qtypes.get(tgt.qtype).dequantize(blob.reshape(-1), *m.shape, tgt.group)


# ------------------------------------------------------------------------------------------------
def _shq_select(q: _ExportQuantizer, mapped: list[Mapped], cfg: ExportConfig, budget: int | None) -> list[str]:
    """Promote the most sensitive vision layers to keep_bits: all that fit in ``budget`` bytes,
    or the top keep_frac of them when there is no budget.  Returns the promoted keys."""
    cands = sorted(q.alt, key=lambda k: -(q.rows[k].sensitivity or 0.0))
    if budget is None:
        n = math.ceil(cfg.keep_frac * len(cands)) if cfg.keep_frac > 0 else 0
        return cands[:n]
    shapes = {m.key: m.shape for m in mapped}
    total = sum(q.targets[m.key].nbytes(m.shape) for m in mapped)
    chosen = []
    for k in cands:
        extra = q.alt[k][0].nbytes(shapes[k]) - q.targets[k].nbytes(shapes[k])
        if total + extra <= budget:
            total += extra
            chosen.append(k)
    return chosen


def _budget_bytes(cfg: ExportConfig, n_params: int) -> int | None:
    if cfg.budget_bits is not None:
        return int(cfg.budget_bits * n_params / 8)
    if cfg.budget_mb is not None:
        return int(cfg.budget_mb * 1e6)
    return None


def _check_out(out: Path, src: Path) -> Path:
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"output {out} is a directory; give a file name such as {out / 'model.evlm'}")
    if out.resolve().is_relative_to(src.resolve()) and out.suffix != ".evlm":
        raise ValueError(f"output {out} would write into the source model folder; give a name ending in .evlm")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _metadata(source: Source, cfg: ExportConfig, calib, q: _ExportQuantizer, dropped: dict[str, str],
              promoted: list[str], n_params: int, total: int) -> dict[str, Any]:
    fam = source.family
    tok = None
    if source.tokenizer_json is not None:
        tok = {"tensor": "tokenizer.json", "config": source.tokenizer_config, "special_tokens": source.special_tokens,
               "chat_template": source.chat_template}
    return {
        "producer": f"edgevlm {__version__}",
        "architecture": fam.architecture,
        "family": fam.name,
        "model_type": source.config.get("model_type"),
        "config": source.config,
        "preprocess": source.preprocessor,
        "tokenizer": tok,
        "generation_config": source.generation_config,
        **({"extra": source.extra_files} if source.extra_files else {}),
        "quantization": {**cfg.to_json(), "calibration": {"images": len(calib.images), "texts": len(calib.texts),
                                                          "source": calib.source},
                         "shq_kept": promoted, "n_params": n_params, "weight_bytes": total,
                         "bits_per_param": 8 * total / max(n_params, 1),
                         "block_errors": [{"tower": t, "block": i, "rel_err": e} for t, i, e in q.block_errors]},
        "dropped": dropped,
    }


def run_export(src, out, cfg: ExportConfig, *, keep_fake_quant: bool = False, log=None,
               evlm_only: bool = False) -> ExportReport:
    """See :func:`edgevlm.export.export`.  ``keep_fake_quant`` returns every tensor's
    dequantized value (what the file holds) in the report, for tests.  With a Hugging Face
    ``cfg.format``, ``out`` is a folder (interop/hf_quantized.export_hf) unless ``evlm_only``
    (export_hf's first stage: just the .evlm, with the format's integer zero points)."""
    if cfg.format is not Format.EVLM and not evlm_only:
        from ..interop.hf_quantized import export_hf

        return export_hf(src, out, cfg, keep_fake_quant=keep_fake_quant, log=log)
    t0 = time.perf_counter()
    tune_malloc()
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    source = open_source(src)
    out = _check_out(Path(out), source.path)
    mapped, dropped = resolve(source.family, source.shapes())
    cfg = _tied_embed_bits(mapped, cfg)
    mapped = _without_redundant_ties(mapped, cfg)
    n_params = sum(int(np.prod(m.shape, dtype=np.int64)) for m in mapped)
    budget = _budget_bytes(cfg, n_params)
    min_bytes = sum(plan_target(m, cfg).nbytes(m.shape) for m in mapped)  # every vision layer low
    if budget is not None and min_bytes > budget:
        raise ValueError(f"size budget cannot be met: with every vision layer at {cfg.bits} bits and the text tower "
                         f"at {cfg.effective_text_bits} bits the weights take {min_bytes / 1e6:.3f} MB = "
                         f"{8 * min_bytes / n_params:.3f} bits/param, over the budget of {budget / 1e6:.3f} MB = "
                         f"{8 * budget / n_params:.3f} bits/param; raise --budget-bits/--budget-mb or lower "
                         "--bits/--text-bits")
    log(f"edgevlm export: {source.family.architecture} from {source.path} ({n_params / 1e6:.2f} M parameters, "
        f"{len(mapped)} tensors, {len(dropped)} dropped), method {cfg.method.value}, {cfg.bits}-bit "
        f"(text {cfg.effective_text_bits}-bit), group {cfg.group}")
    calib = load_calib(cfg.calib, n_images=cfg.n_calib, n_texts=cfg.n_calib, seed=cfg.seed)
    spool = _Spool(out)
    try:
        q = _ExportQuantizer(cfg, mapped, spool, keep_fake_quant)
        torch.manual_seed(cfg.seed)
        lm = LazyModel(source)
        search = ScaleSearch(q.fake_quant, n_grid=cfg.awq_grid) if cfg.effective_awq else None
        if cfg.method is Method.QIG:   # AWQ's search with integrated-gradient token weights
            from .qig import make_search

            search = make_search(cfg, q.fake_quant)
        if search is not None and cfg.effective_clip_search and (cfg.method in (Method.RTN, Method.AWQ, Method.VEQ_ME)
                                                                  or (cfg.method is Method.QIG and not cfg.qig_hessian)):
            search.clip_quant = q.clip_fake_quant   # the scaled linears are stored by "rtn+clip": score it too
        cal = Calibrator(lm, q, cfg.batch_size, progress=cfg.progress, sequential=cfg.true_sequential,
                         scale_search=search)
        from . import veq   # VEQ-MA expert-Hessian / VEQ-ME expert-importance hooks (no-ops otherwise)

        veq_me = veq.configure(cfg, cal, search, source.family.dims.get("tE"))
        if cfg.block_refine:
            from .blockrecon import BlockRefiner, RefineSettings

            cal.block_refine = BlockRefiner(q, RefineSettings(cfg.block_refine_steps, cfg.block_refine_lr,
                                                              cfg.block_refine_vectors, seed=cfg.seed,
                                                              codes_steps=cfg.block_refine_codes),
                                            progress=cfg.progress)
        with torch.no_grad():
            if cfg.method is Method.SPEEDQ:   # staged QAT: trains the whole model, then stores every tensor
                from .speedq import run as run_speedq

                run_speedq(cal, source, calib)
            else:
                RECIPES[source.family.name](cal, source, calib)
            for m in mapped:  # tensors no block touched: final norms, projections, heads, scalars
                if m.key not in q.done:
                    q._store_matrix(m, torch.from_numpy(source.read(m.ckpt)), None)
        moe_stats = veq.stats_json(getattr(cal, "moe_stats", None) or [], veq_me,
                                   source.family.towers.get("text", {}).get("blocks", ""))
        del lm, cal
        calib_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        promoted = _shq_select(q, mapped, cfg, budget) if q.alt else []
        for k in promoted:
            q.done[k] = q.alt[k]
            row = q.rows[k]
            row.target, row.kept, row.error = q.alt[k][0], True, q.alt[k][2]["error"]
            if q.fake is not None:
                q.fake[k] = q.fake[k + "#keep"]
        if q.fake is not None:
            for k in list(q.fake):
                if k.endswith("#keep"):
                    del q.fake[k]
        blobs = []
        for m in mapped:
            tgt, ref, extra = q.done[m.key]
            if m.key in q.alt:
                extra = {**extra, "sensitivity": q.rows[m.key].sensitivity, "shq_kept": m.key in promoted}
            blobs.append(fmt.TensorBlob(m.key, tgt.qtype, tgt.bits, tgt.group, m.shape, spool.view(ref), extra))
        total = sum(b.data.nbytes for b in blobs)
        if source.tokenizer_json is not None:
            tj = np.frombuffer(source.tokenizer_json, dtype=np.uint8)
            blobs.append(fmt.TensorBlob("tokenizer.json", "u8", 8, 0, tj.shape, tj, {"kind": "tokenizer"}))
        meta = _metadata(source, cfg, calib, q, dropped, promoted, n_params, total)
        if moe_stats:   # routing per MoE layer and expert: (text, image) token counts and routing-weight sums
            meta["quantization"]["moe_stats"] = moe_stats
        fmt.write(out, meta, blobs)
    finally:
        spool.close()
    rows = [q.rows[m.key] for m in mapped]
    report = ExportReport(out, out.stat().st_size, n_params, 8 * total / n_params, rows,
                          time.perf_counter() - t0, calib_peak, q.fake or {})
    log(format_table(report, cfg))
    return report


def format_table(rep: ExportReport, cfg: ExportConfig) -> str:
    """The per-layer precision table (quantizable tensors) and the totals."""
    lines = [f"{'tensor':<42} {'shape':>13} {'type':>5} {'group':>5} {'method':>8} {'rel.err':>9} {'sens.':>9}"]
    for r in rep.rows:
        if r.kind not in ("linear", "embed"):
            continue
        sens = f"{r.sensitivity:.2e}" if r.sensitivity is not None else "-"
        err = f"{r.error:.2e}" if r.error is not None else "-"
        mark = " kept" if r.kept else ""
        lines.append(f"{r.key:<42} {'x'.join(map(str, r.shape)):>13} {r.target.qtype:>5} "
                     f"{r.target.group or '-':>5} {r.method:>8} {err:>9} {sens:>9}{mark}")
    lines.append(f"wrote {rep.path}: {rep.file_bytes / 1e6:.3f} MB, {rep.n_params / 1e6:.3f} M params, "
                 f"{rep.bits_per_param:.3f} bits/param, {rep.seconds:.1f} s, calibration peak RSS "
                 f"{rep.calib_peak_rss_mb:.0f} MB")
    return "\n".join(lines)
