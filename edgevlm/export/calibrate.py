"""Layer-by-layer calibration: capture a tower's block-0 inputs, then for each block
(1) run it in full precision with hooks that accumulate each linear's Hessian H = 2XᵀX/n,
(2) hand every linear weight + H to the quantizer, (3) rerun the block with the quantized
weights and feed *those* outputs to the next block (errors of earlier blocks are seen by later
ones, as in GPTQ).  One block is in memory at a time (:mod:`.lazy`), plus the calibration
activations.  This module decides nothing about bits: :class:`Quantizer` does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from .awq import ScaleSearch
from .lazy import LazyModel, call_block, capture_block_inputs
from .quantize import Hessian


class Quantizer(Protocol):
    """What the calibration loop needs from the export pipeline (pipeline.py implements it)."""

    def wants_hessian(self, canonical: str) -> bool:
        """True if the weight ``canonical`` is quantized with calibration statistics."""

    def linear(self, canonical: str, w: torch.Tensor, hessian: Hessian | None) -> torch.Tensor:
        """Quantize/store one linear weight [N, K]; return what the file holds (float32)."""

    def stored(self, canonical: str, t: torch.Tensor) -> torch.Tensor:
        """Store a non-linear tensor (embedding table, norm, bias, ...) as the table says and
        return what the file holds; linear weights are returned unchanged (quantized later)."""

    def block_done(self, tower: str, index: int, rel_err: float) -> None:
        """Progress report: relative output error of block ``index`` after quantization."""

    # Needed only with a ScaleSearch (awq.py):
    def fake_quant(self, canonical: str, w: torch.Tensor) -> torch.Tensor | None:
        """The plain-RTN value of W [N, K] at the width planned for ``canonical`` (float32), or
        None if that weight is not quantized.  The scale search's proxy quantizer."""

    def restore(self, canonical: str, t: torch.Tensor) -> torch.Tensor:
        """Replace an already stored non-linear tensor (a norm or bias changed by a fold);
        returns what the file now holds."""

    def scaled(self, folded: list) -> None:
        """Record the folds applied to a block (awq.Folded list), for the file's records."""


@dataclass
class Batch:
    hidden: torch.Tensor        # [B, T, D] block input
    args: tuple                 # other positional args the block was called with
    kwargs: dict[str, Any]      # masks, position embeddings, ... as the model's forward built them
    mask: torch.Tensor | None   # [B, T] 1 = real token, 0 = padding (excluded from Hessians)
    # [B, T] >= 0 per-token Hessian weights for the current block (QIG --qig-hessian), replacing
    # the padding mask in the Hessians; set by the block's scale search, None = the mask.
    token_weight: torch.Tensor | None = None


def chunks(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


class Calibrator:
    def __init__(self, lm: LazyModel, quantizer: Quantizer, batch_size: int, progress: bool = True,
                 token_weight: Callable[[str, torch.Tensor], torch.Tensor | None] | None = None,
                 sequential: bool = True, scale_search: ScaleSearch | None = None) -> None:
        """``token_weight(canonical, x)`` may return per-token weights [B, T] for the Hessian of
        the linear ``canonical`` given its input x [B, T, K] (the hook later methods such as QIG
        and VEQ use to reweight H̃ = 2XᵀCX); padding stays excluded either way.
        ``scale_search`` (awq.py): activation-aware scales searched and folded into each block
        before its linears are quantized (the Hessians then come from the scaled block)."""
        self.lm, self.q, self.batch_size, self.progress = lm, quantizer, batch_size, progress
        self.token_weight = token_weight
        self.sequential = sequential
        self.scale_search = scale_search
        # VEQ-MA's per-token expert-Hessian weights (calibrate_moe.MoeCalibrator reads it), set by
        # the pipeline: expert_weight(canonical, x [n, K], affinity [n], image [n], counts) -> [n].
        self.expert_weight = None
        # blockrecon.BlockRefiner or None, set by the pipeline: tunes each block's group params
        # (codes frozen) on the block-output error after its linears are quantized.
        self.block_refine = None
        tune_malloc()

    # ---- loading helpers ----------------------------------------------------------------------
    def load(self, path: str) -> nn.Module:
        """Materialise ``path`` with every tensor as the file will hold it (quantized embedding
        tables, float16 dense matrices); linear weights stay full precision until calibrated."""
        mod = self.lm.module(path)
        override = {}
        for name, _ in mod.named_parameters():
            full = f"{path}.{name}" if path else name
            override[full] = self.q.stored(full, torch.from_numpy(self.lm.read(full)))
        return self.lm.load(path, override=override)

    def capture(self, blocks_path: str, runs: list[tuple[Callable[[], Any], torch.Tensor | None]]) -> list[Batch]:
        first = self.lm.module(blocks_path)[0]
        out = []
        for run, mask in runs:
            h, a, kw = capture_block_inputs(run, first)
            out.append(Batch(h, a, kw, mask))
        return out

    # ---- the loop -----------------------------------------------------------------------------
    def run_tower(self, tower: str, blocks_path: str, n: int, batches: list[Batch],
                  keep: frozenset[int] = frozenset()) -> tuple[list[Batch], dict[int, list[torch.Tensor]]]:
        """Quantize blocks 0..n-1 of ``blocks_path`` in order.  Returns the batches with the last
        block's (quantized) outputs as ``hidden``, and the outputs of the blocks listed in ``keep``
        (index i = output of block i-1, 0 = the tower input) for towers that read hidden states."""
        kept: dict[int, list[torch.Tensor]] = {}
        if 0 in keep:
            kept[0] = [b.hidden for b in batches]
        bar = _bar(range(n), f"calibrate {tower}", self.progress)
        for i in bar:
            path = f"{blocks_path}.{i}"
            block = self.load(path)
            if self.scale_search is not None:
                self._fold_scales(path, block, batches)
            refine = self.block_refine
            targets = refine.before(i, block, batches) if refine is not None else None
            outs_fp = self._collect_and_quantize(path, block, batches)
            if refine is not None:
                refine.after(path, block, batches, targets)
            err_num = err_den = 0.0
            for b, fp in zip(batches, outs_fp):
                b.hidden = call_block(block, b.hidden, b.args, b.kwargs)
                err_num += float(((b.hidden - fp) ** 2).sum())
                err_den += float((fp ** 2).sum())
            del outs_fp
            rel = float(np.sqrt(err_num / max(err_den, 1e-30)))
            self.q.block_done(tower, i, rel)
            if hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str(f"block {i} rel. output error {rel:.2e}")
            if i + 1 in keep:
                kept[i + 1] = [b.hidden for b in batches]
            self.lm.release(path)
            _trim_heap()
        return batches, kept

    def _fold_scales(self, path: str, block: nn.Module, batches: list[Batch]) -> None:
        """Search + fold the block's scales; re-store the norm / bias vectors the folds changed
        (load() stored their unscaled values) and keep the block on what the file holds."""
        folded = self.scale_search.run(path, block, batches)
        for f in folded:
            for canon in f.changed:
                rel = canon[len(path) + 1:]
                held = self.q.restore(canon, block.get_parameter(rel).data.clone())
                self.lm.set_param(canon, held)
        self.q.scaled(folded)

    def _collect_and_quantize(self, path: str, block: nn.Module, batches: list[Batch]) -> list[torch.Tensor]:
        """Quantize every linear of the block; returns the block's full-precision outputs.

        With ``sequential`` (GPTQ's "true sequential"), linears are quantized group by group in
        the order the forward pass reaches them (q/k/v, then o, then fc1 / gate+up, then fc2 /
        down; consecutive linears reading one input tensor form a group), and each later group's
        Hessian comes from a pass in which the earlier groups are already quantized, so it sees
        the inputs it will get at run time.  One extra block pass per group."""
        linears = {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
        todo = list(linears)
        outs_fp: list[torch.Tensor] | None = None
        while todo:
            hess: dict[str, Hessian] = {}
            order: list[tuple[str, bool]] = []  # (linear, same input as the previous call), first batch
            hooks = []
            current: dict[str, Any] = {"mask": None, "first": True, "prev": None}
            for name in todo:
                m = linears[name]
                canon = _weight_name(path, name)
                if self.q.wants_hessian(canon):
                    hess[name] = Hessian(m.in_features)
                hooks.append(m.register_forward_pre_hook(self._hook(hess.get(name), canon, current, name, order)))
            outs = []
            try:
                for b in batches:
                    current["mask"] = b.mask
                    if b.token_weight is not None:   # QIG-weighted Hessians (zero on padding)
                        current["mask"] = b.token_weight
                    outs.append(call_block(block, b.hidden, b.args, b.kwargs))
                    current["first"], current["prev"] = False, None
            finally:
                for h in hooks:
                    h.remove()
            if outs_fp is None:
                outs_fp = outs
            if self.sequential and order:
                group = [order[0][0]]  # the first linear reached, plus the run of calls on its input
                for name, same in order[1:]:
                    if not same:
                        break
                    group.append(name)
            else:
                group = list(todo)
            for name in group:
                m = linears[name]
                deq = self.q.linear(_weight_name(path, name), m.weight.data, hess.pop(name, None))
                m.weight = nn.Parameter(deq, requires_grad=False)
            todo = [n for n in todo if n not in group]
            if not any(n in {o for o, _ in order} for n in todo):
                group = list(todo)  # linears the forward never calls: no statistics to wait for
                for name in group:
                    m = linears[name]
                    m.weight = nn.Parameter(self.q.linear(_weight_name(path, name), m.weight.data, None),
                                            requires_grad=False)
                todo = []
        return outs_fp or []

    def _hook(self, h: Hessian | None, canon: str, current: dict, name: str, order: list) -> Callable:
        def hook(mod: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            if current["first"]:
                # "Same input" = same storage as the previous linear's input, which is still
                # referenced here, so its address cannot have been reused by a newer tensor
                # (comparing addresses of freed tensors made the grouping allocator-dependent).
                prev = current["prev"]
                order.append((name, prev is not None and prev.data_ptr() == x.data_ptr()
                              and prev.shape == x.shape))
                current["prev"] = x
            if h is None:
                return
            w = _token_mask(current["mask"], x)
            if self.token_weight is not None:
                extra = self.token_weight(canon, x)
                if extra is not None:
                    w = extra if w is None else w * extra
            h.add(x, w)
        return hook

    def quantize_module(self, tower: str, path: str, inputs: list[torch.Tensor],
                        masks: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """Calibrate a module that is not a transformer block (a projector, a norm + LM head):
        ``inputs`` are its positional inputs per batch; returns its quantized outputs."""
        mod = self.load(path)
        batches = [Batch(x, (), {}, m) for x, m in zip(inputs, masks)]
        fp = self._collect_and_quantize(path, mod, batches)
        outs = []
        num = den = 0.0
        with torch.no_grad():
            for b, f in zip(batches, fp):
                y = mod(b.hidden)
                outs.append(y)
                num += float(((y - f) ** 2).sum())
                den += float((f ** 2).sum())
        self.q.block_done(tower, 0, float(np.sqrt(num / max(den, 1e-30))))
        self.lm.release(path)
        return outs


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
            _LIBC.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
            _LIBC = False
    return _LIBC


_LIBC = None
_M_MMAP_THRESHOLD = -3  # glibc <malloc.h>


def tune_malloc() -> None:
    """Serve allocations >= 1 MiB (weights, Hessians, activations) with mmap, so that freeing
    them returns the memory at once.  glibc's default raises this threshold dynamically after
    the first large free, after which big blocks come from the heap and the resident set
    depends on fragmentation: measured on a 768-wide BERT, peak RSS 840-1016 MB run to run
    instead of a steady 560 MB."""
    if lib := _libc():
        lib.mallopt(_M_MMAP_THRESHOLD, 1 << 20)


def _trim_heap() -> None:
    """Return freed heap pages to the OS after each block, so small-object fragmentation
    does not accumulate over the layers."""
    if lib := _libc():
        lib.malloc_trim(0)


def _weight_name(path: str, name: str) -> str:
    """Canonical weight name of the linear ``name`` inside the module at ``path`` ("" = itself)."""
    return f"{path}.{name}.weight" if name else f"{path}.weight"


def _token_mask(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """Padding mask [B, T] as Hessian token weights when it lines up with x [B, T, K]."""
    if mask is None or tuple(mask.shape) != tuple(x.shape[:-1]):
        return None
    return mask.to(x.dtype)


def _bar(it, desc: str, enabled: bool):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, unit="block", leave=True, dynamic_ncols=True)
