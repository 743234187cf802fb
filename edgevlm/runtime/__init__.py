"""The on-device runtime: numpy + the edgevlm._core extension only, never torch.

tests/test_runtime_imports.py proves in a fresh subprocess that importing this package
pulls in neither torch, transformers nor triton.
"""

from __future__ import annotations

from .linear import QuantLinear


def __getattr__(name: str):
    # The dual encoder, preprocessing and tokenizer load lazily: `import edgevlm.runtime` stays
    # numpy + the extension only (tokenizers / Pillow are imported when first used).
    if name in ("DualEncoder", "load_dual"):
        from . import dual

        return getattr(dual, name)
    if name == "ImagePreprocessor":
        from .preprocess import ImagePreprocessor

        return ImagePreprocessor
    if name == "Tokenizer":
        from .tokenizer import Tokenizer

        return Tokenizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def kernel_info() -> dict:
    """Compiled and supported ISAs, the default one, CPU features and the thread count."""
    from .linear import _core

    if _core is None:
        return {"extension": False}
    return {
        "extension": True,
        "compiled_isas": _core.compiled_isas(),
        "supported_isas": _core.supported_isas(),
        "default_isa": _core.default_isa(),
        "cpu_features": _core.cpu_features(),
        "threads": _core.get_num_threads(),
    }


def set_num_threads(n: int) -> None:
    """Threads the kernels use (both cores by default)."""
    from .linear import _core

    if _core is not None:
        _core.set_num_threads(int(n))


__all__ = ["DualEncoder", "ImagePreprocessor", "QuantLinear", "Tokenizer", "kernel_info", "load_dual",
           "set_num_threads"]
