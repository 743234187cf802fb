"""edgevlm: quantized vision-language models on edge hardware.

The package root imports numpy only. The native kernels live in ``edgevlm._core``
(compiled from csrc/); the torch-based exporter in ``edgevlm.export`` is imported
lazily and never by the runtime.
"""

__version__ = "0.1.0"
