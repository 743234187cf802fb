"""The runtime must never import torch/transformers/triton: checked in a fresh subprocess
(in-process, an earlier test's import would hide a violation), with those modules made
unimportable so even a lazy import inside the runtime would fail loudly."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

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


_BLAS = """
import json, os, sys
import numpy as np
from threadpoolctl import threadpool_info
from edgevlm.runtime.blas import limit_numpy_blas
before = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
ret = limit_numpy_blas()
after = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
print(json.dumps({"before": before, "after": after, "ret": ret}))
"""


@pytest.mark.parametrize("env,want", [(None, 1), ("2", 2), ("0", None)])
def test_model_load_limits_numpy_blas_threads(env, want):
    """runtime/blas.py: loading a model caps numpy's BLAS pool (its spinning threads would sit on
    the kernels' cores); EDGEVLM_BLAS_THREADS sets the cap, 0 leaves BLAS alone."""
    pytest.importorskip("threadpoolctl")
    e = {k: v for k, v in os.environ.items() if k not in ("EDGEVLM_BLAS_THREADS", "OPENBLAS_NUM_THREADS",
                                                            "OMP_NUM_THREADS")}
    if env is not None:
        e["EDGEVLM_BLAS_THREADS"] = env
    r = subprocess.run([sys.executable, "-c", _BLAS], capture_output=True, text=True, env=e)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if not out["before"]:
        pytest.skip("numpy has no BLAS library threadpoolctl can see")
    assert out["ret"] == want
    assert out["after"] == (out["before"] if want is None else [want] * len(out["before"]))


def test_blas_threads_env_is_validated(monkeypatch):
    from edgevlm.runtime.blas import limit_numpy_blas

    monkeypatch.setenv("EDGEVLM_BLAS_THREADS", "two")
    with pytest.raises(ValueError, match="EDGEVLM_BLAS_THREADS must be a whole number"):
        limit_numpy_blas()
