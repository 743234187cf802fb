"""Evaluate an export with the reference implementation: the weights an ``.evlm`` file holds,
dequantized to float32 and loaded back into the transformers model.

This is "fake quantization" read from the real file: it measures exactly what the packed
weights lose, independently of the edgevlm runtime's kernels (which add only activation
rounding).  Export-side: imports torch / transformers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import format as fmt
from .. import qtypes
from .tensor_map import family_for


def record_f32(f, name: str) -> np.ndarray:
    """Record ``name`` of the open .evlm ``f`` as a float32 array of its shape: packed records
    dequantized by their quant type (numpy twin), float records converted (a copy either way:
    the mmap view is read-only)."""
    rec = f.records[name]
    a = f[name]
    if rec.quantized:
        if len(rec.shape) != 2:
            raise ValueError(f"quantized record {name!r} has shape {rec.shape}, not [N, K]")
        n, k = rec.shape
        a = qtypes.get(rec.qtype).dequantize(np.asarray(a).reshape(-1), n, k, rec.group_size)
    return np.array(a, dtype=np.float32).reshape(rec.shape)


def dequantized_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """{module parameter name: float32 array} for every weight in the file.

    Names come from each record's ``extra["src"]`` (checkpoint name), canonicalised by the
    family table.  Only the tokenizer blob is skipped; any other record without a source name,
    or two records mapping to one parameter, is a ValueError.  Families whose checkpoint fuses
    matrices the file stores apart (Qwen3-VL-MoE's experts: one [N, K] record per expert) get
    them fused back into the module parameters ([E, N, K]), so the dict loads into the model."""
    out = {}
    with fmt.open(path) as f:
        fam = family_for(f.metadata["config"])
        for name, rec in f.records.items():
            extra = rec.extra if isinstance(rec.extra, dict) else {}
            if name == "tokenizer.json" or extra.get("kind") == "tokenizer":
                continue
            src = extra.get("src")
            if not src:
                raise ValueError(f"{path}: record {name!r} ({rec.qtype}) has no extra['src'] source name")
            key = extra.get("param") or fam.canonical(src)  # "param": a tied head quantized from src
            if key in out:
                raise ValueError(f"{path}: two records map to parameter {key!r}")
            try:
                out[key] = record_f32(f, name)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
    if fam.fused:
        from .tm_qwen3vlmoe import fuse_experts   # the only family with fused rows

        out = fuse_experts(out)
    return out


def load_into_model(path: str | Path, model_dir: str | Path):
    """The transformers model of ``model_dir`` with every parameter replaced by the file's
    dequantized value.  Raises ValueError if the file lacks a parameter the model uses."""
    import torch
    import transformers

    sd = dequantized_state_dict(path)
    with fmt.open(path) as f:
        arch = f.metadata["architecture"]
        dropped = f.metadata.get("dropped", {})
        fam = family_for(f.metadata["config"])
    # dropped tensors (unused layers) keep the checkpoint's values: the forward never reads them
    model = getattr(transformers, arch).from_pretrained(model_dir, dtype=torch.float32).eval()
    dropped_canon = {fam.canonical(k) for k in dropped}
    missing = []
    with torch.no_grad():
        if "lm_head.weight" in sd and _tied(model, "lm_head.weight"):
            # the file holds the head quantized apart from the 8-bit table: untie, or one copy_
            # would overwrite the other
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        params = dict(model.named_parameters())
        for name, p in params.items():
            if name in sd:
                p.copy_(torch.from_numpy(sd[name]).reshape(p.shape))
            elif name not in dropped_canon and not _tied(model, name):
                missing.append(name)
    if missing:
        raise ValueError(f"{path}: no value for {len(missing)} parameter(s) of {arch}: {', '.join(missing[:6])}")
    return model


def _tied(model, name: str) -> bool:
    """lm_head.weight shared with the input embeddings (tie_word_embeddings)."""
    if name != "lm_head.weight":
        return False
    emb = model.get_input_embeddings()
    return emb is not None and model.lm_head.weight is emb.weight
