"""Offline exporter: a Hugging Face model folder -> one quantized ``.evlm`` file.

Runs on a workstation with the ``export`` extra (torch, transformers, safetensors, tokenizers,
tqdm).  Importing this package is cheap: torch is imported only inside :func:`export`.

    from edgevlm.export import export, ExportConfig, Method
    report = export("path/to/hf-model", "model.evlm", ExportConfig(method=Method.SHQ, bits=4))
"""

from __future__ import annotations

from .config import ExportConfig, Method


def export(src, out, config: ExportConfig | None = None):
    """Quantize the Hugging Face model folder ``src`` and write ``out`` (.evlm).

    Returns an :class:`edgevlm.export.pipeline.ExportReport` (per-tensor precision and error,
    file size).  Nothing is written under ``out`` unless the export completes.
    """
    from .pipeline import run_export

    return run_export(src, out, config or ExportConfig())


__all__ = ["ExportConfig", "Method", "export"]
