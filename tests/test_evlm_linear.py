"""End to end through the container: packed weights written to an .evlm file, mapped back
zero-copy, multiplied by the kernels; and the `edgevlm info|verify|kernels` commands."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from conftest import weights
from edgevlm import format as fmt
from edgevlm import qtypes
from edgevlm.runtime import QuantLinear


def _write_model(path, rng):
    blobs, ref = [], {}
    for name, qt, n, k, g in [("vision.fc1", "q4", 96, 160, 32), ("vision.fc2", "q3", 160, 96, 32),
                              ("text.lm_head", "q2", 64, 256, 128), ("text.keep8", "q8", 40, 128, 64)]:
        t = qtypes.get(qt)
        w = weights(rng, n, k, g)
        blob = t.pack(w, g)
        ref[name] = (qt, n, k, g, t.dequantize(blob, n, k, g))
        blobs.append(fmt.TensorBlob(name=name, qtype=qt, bits=t.bits, group_size=g, shape=(n, k), data=blob,
                                    extra={"error": float(np.abs(w - ref[name][4]).max())}))
    bias = rng.standard_normal(96).astype(np.float32)
    blobs.append(fmt.TensorBlob(name="vision.fc1.bias", qtype="f32", bits=32, group_size=0, shape=(96,), data=bias))
    fmt.write(path, {"architecture": "test"}, blobs)
    return ref, bias


def test_linear_on_mapped_weights(tmp_path, rng):
    path = tmp_path / "m.evlm"
    ref, bias = _write_model(path, rng)
    with fmt.open(path, verify=True) as f:
        for name, (qt, n, k, g, deq) in ref.items():
            view = f[name]
            assert not view.flags.writeable and view.__array_interface__["data"][0] % 64 == 0
            b = f["vision.fc1.bias"] if name == "vision.fc1" else None
            layer = QuantLinear(view, qt, n, k, g, bias=b)
            assert layer.blob is view  # zero-copy: the kernel reads the mapping itself
            x = rng.standard_normal((3, k)).astype(np.float32)
            want = x.astype(np.float64) @ deq.T.astype(np.float64) + (0 if b is None else bias)
            got = layer(x, isa="ref")
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_cli_info_verify_kernels(tmp_path, rng):
    path = tmp_path / "m.evlm"
    _write_model(path, rng)
    run = lambda *a: subprocess.run([sys.executable, "-m", "edgevlm.cli", *a], capture_output=True, text=True)
    info = run("info", str(path))
    assert info.returncode == 0, info.stderr
    assert "vision.fc1" in info.stdout and "q4" in info.stdout and "bits per parameter" in info.stdout
    assert run("verify", str(path)).returncode == 0
    kern = run("kernels")
    assert kern.returncode == 0 and "default_isa" in kern.stdout
    # corrupt one data byte: verify must fail with exit 1 and name the tensor
    raw = bytearray(path.read_bytes())
    raw[-70] ^= 0xFF
    path.write_bytes(bytes(raw))
    bad = run("verify", str(path))
    assert bad.returncode == 1 and "checksum" in bad.stderr.lower()
    missing = run("info", str(tmp_path / "nope.evlm"))
    assert missing.returncode == 2 and "nope.evlm" in missing.stderr
