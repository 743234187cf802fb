"""The runtime must never import torch/transformers/triton: checked in a fresh subprocess
(in-process, an earlier test's import would hide a violation), with those modules made
unimportable so even a lazy import inside the runtime would fail loudly."""

from __future__ import annotations

import platform

from no_torch import run_without_torch

PROBE = """
import edgevlm, edgevlm.runtime, edgevlm.format, edgevlm.qtypes, edgevlm._core
import edgevlm.runtime.vlm, edgevlm.runtime.decoder, edgevlm.runtime.llava, edgevlm.runtime.chat, edgevlm.runtime.dual
import edgevlm.runtime.qwen2vl, edgevlm.runtime.idefics3
import numpy as np
from edgevlm import qtypes
from edgevlm.runtime import QuantLinear
w = np.ones((8, 64), np.float32)
y = QuantLinear(qtypes.get('q4').pack(w, 32), 'q4', 8, 64, 32)(np.ones((1, 64), np.float32))
assert abs(float(y[0, 0]) - 64.0) < 1.0, y
bad = sorted(m for m in sys.modules if m.split('.')[0] in FORBIDDEN)
print('LOADED', bad)
"""


def test_runtime_does_not_import_torch():
    out = run_without_torch(PROBE)
    assert out.returncode == 0, out.stderr
    assert "LOADED []" in out.stdout, out.stdout


def test_simd_isa_is_compiled_where_the_cpu_has_it():
    # A build that silently lost its SIMD kernels would still pass every other test.
    from edgevlm import _core

    feats = _core.cpu_features()
    if platform.machine() in ("x86_64", "AMD64") and feats["avx2"] and feats["fma"] and feats["f16c"]:
        assert "avx2" in _core.supported_isas()
        assert _core.default_isa() in ("avx2", "avxvnni", "avx512vnni") or __import__("os").environ.get("EDGEVLM_ISA")
    if platform.machine() in ("aarch64", "arm64"):
        assert "neon" in _core.supported_isas()
