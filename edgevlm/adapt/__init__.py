"""Test-time adaptation for CLIP-style zero-shot classification (numpy only, never torch).

- :mod:`edgevlm.adapt.qtta`: LQA's Q-TTA, TDA's positive/negative cache adapter with INT8 keys
  and 1-bit negative masks in a fixed, preallocated memory budget (a C++ step when the
  extension is built, its numpy twin otherwise); :mod:`edgevlm.adapt.streams`: per-stream states.
- :mod:`edgevlm.adapt.corruptions`: ImageNet-C-style corruptions (numpy + Pillow) to build
  shifted test streams. Imported lazily so this package does not need Pillow.
"""

from edgevlm.adapt.qtta import QTTA, QTTABackend, QTTAConfig, quantize_int8
from edgevlm.adapt.streams import StreamStates

__all__ = ["QTTA", "QTTABackend", "QTTAConfig", "StreamStates", "quantize_int8", "corrupt", "CORRUPTIONS"]


def __getattr__(name: str):
    if name in ("corrupt", "CORRUPTIONS"):
        from edgevlm.adapt import corruptions

        return getattr(corruptions, name)
    raise AttributeError(f"module 'edgevlm.adapt' has no attribute {name!r}")
