"""The Triton kernels (edgevlm.kernels) on CPU tensors under TRITON_INTERPRET=1: the dequant kernel
equals the numpy twin bit for bit, the GEMV (M = 1) and GEMM (M = 3, 17) match a float64 product
within bounds derived from their arithmetic, for every qtype and group on odd N and K with tail
units; plus the CUDA runtime hook's checks that run without a GPU.

Bounds. B = |x| @ (|s||q| + |m|)^T (q2b: |S|(|q| + |z|)) bounds every partial sum. GEMV: exact
codes and fp16 inputs, float32 products and sums of at most K + 32 terms: |err| <= (K + 32) u32 B.
GEMM (fp16 or tf32 dot): each weight is s*q + m rounded to 10 mantissa bits twice at most (2 u16,
u16 = 2^-11), float32 accumulation as above. u32 = 2^-24.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede triton's import: kernels are wrapped then
pytest.importorskip("triton", reason="triton is not installed (pip install 'edgevlm[cuda]' or triton==3.9.0)")
torch = pytest.importorskip("torch", reason="torch is not installed")

from edgevlm import qtypes  # noqa: E402

ek = pytest.importorskip("edgevlm.kernels")
if not ek.INTERPRETED:
    pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set", allow_module_level=True)

U32, U16 = 2.0**-24, 2.0**-11

# (qtype, group, N, K): odd N; K with a tail unit where the type has one (q4: K % 64 == 32;
# q2/q3/q2b: K % 128 in {32, 64, 96}), and whole units.
CASES = [
    ("q4", 32, 5, 96), ("q4", 64, 7, 192), ("q4", 128, 3, 256), ("q4", 32, 9, 544),
    ("q2", 32, 3, 224), ("q2", 64, 5, 192), ("q2", 128, 3, 384),
    ("q3", 32, 5, 160), ("q3", 64, 3, 320), ("q3", 128, 7, 256), ("q3", 32, 3, 96),
    ("q8", 32, 3, 96), ("q8", 64, 5, 192), ("q8", 128, 3, 128),
    ("q2b", 16, 19, 160), ("q2b", 16, 33, 224), ("q2b", 16, 5, 128),
]
IDS = [f"{q}-g{g}-{n}x{k}" for q, g, n, k in CASES]


def _weights(qtype: str, group: int, n: int, k: int, seed: int = 0):
    """Packed blob of random weights (one all-zero row and one constant group: zero ranges) and its
    float32 dequantization by the numpy twin."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[n // 2] = 0.0
    w[0, :group] = 0.25
    qt = qtypes.get(qtype)
    blob = qt.pack(w, group)
    return blob, qt.dequantize(blob, n, k, group)


def _bound_terms(qtype: str, blob: np.ndarray, n: int, k: int, group: int) -> np.ndarray:
    """|s||q| + |m| per weight (q2b: |S|(|q| + |z|)), float64 [N, K]."""
    qt = qtypes.get(qtype)
    if qtype == "q2b":
        from edgevlm.qtypes import q2b

        p = qt.unpack(blob, n, k, group)
        S = np.abs(q2b.group_scales(p.scale_codes, p.d, p.m)).astype(np.float64)
        return np.repeat(S, 16, 1) * (p.codes + np.repeat(p.zeros, 16, 1))
    codes, scales, mins = qt.unpack(blob, n, k, group)
    t = np.repeat(np.abs(scales.astype(np.float64)), group, 1) * np.abs(codes.astype(np.float64))
    return t if mins is None else t + np.repeat(np.abs(mins.astype(np.float64)), group, 1)


def _check(y, x, W, bias, terms, rel):
    x64 = x.float().numpy().astype(np.float64)
    ref = x64 @ W.astype(np.float64).T + bias
    bound = rel * (np.abs(x64) @ terms.T + np.abs(bias)) + 1e-30
    err = np.abs(y.float().numpy().astype(np.float64) - ref)
    assert (err <= bound).all(), f"max err {err.max():.3e}, its bound {bound.flat[np.argmax(err - bound)]:.3e}"


@pytest.mark.parametrize("qtype,group,n,k", CASES, ids=IDS)
def test_dequant_kernel_is_bit_exact(qtype, group, n, k):
    blob, ref = _weights(qtype, group, n, k)
    out = ek.dequantize(blob, qtype, n, k, group).numpy()
    assert out.dtype == np.float32 and out.shape == (n, k)
    np.testing.assert_array_equal(out.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("qtype,group,n,k", CASES, ids=IDS)
def test_matmul_matches_float64(qtype, group, n, k):
    blob, W = _weights(qtype, group, n, k)
    terms = _bound_terms(qtype, blob, n, k, group)
    w = ek.PackedWeight.from_blob(blob, qtype, n, k, group)
    rng = np.random.default_rng(1)
    bias = rng.standard_normal(n).astype(np.float32)
    for m in (1, 3, 17):
        x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float16))
        y = ek.matmul(x, w, bias=torch.from_numpy(bias), out_dtype=torch.float32)
        assert y.shape == (m, n) and y.dtype == torch.float32
        rel = (k + 32) * U32 if m == 1 else 2 * U16 + (k + 32) * U32
        _check(y, x, W, bias, terms, rel)


@pytest.mark.parametrize("config", [ek.GemvConfig(8, 128, 1, 1), ek.GemvConfig(4, 128, 3, 1),
                                    ek.GemvConfig(16, 256, 2, 1), ek.GemvConfig(8, 512, 8, 1),
                                    ek.GemvConfig(8, 128, 3, 1, True), ek.GemvConfig(4, 256, 16, 1, True)],
                         ids=str)
def test_gemv_configs_split_k(config):
    """Split-K slices of uneven length, empty slices (split 8 over 4 blocks), blocks past the full
    units, and repeated launches (the fix-up counters must come back to zero)."""
    qtype, group, n, k = "q4", 32, 9, 544
    blob, W = _weights(qtype, group, n, k)
    terms = _bound_terms(qtype, blob, n, k, group)
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((1, k)).astype(np.float16))
    for _ in range(2):
        y = ek.matmul(x, blob, qtype, n, k, group, config=config, out_dtype=torch.float32)
        _check(y, x, W, np.zeros(n), terms, (k + 32) * U32)


@pytest.mark.parametrize("bits,signed", [(2, False), (4, False), (8, True)])
def test_word_plane_ptx_constants_give_exact_codes(bits, signed):
    """The word-PTX unpack (unpack.word_plane_asm, GPU only: the interpreter cannot run PTX), emulated
    in numpy for every 32-bit word pattern of each byte: (src & mask) | 0x4B000000 read as float32,
    then one fma (exact here: float64 holds the product and sum exactly, and the result is an integer
    below 2^16, so float32 rounding of the fma is the identity) must give plane p's code of byte j
    (q8: the int8 value)."""
    from edgevlm.kernels.unpack import word_plane_asm, word_plane_terms

    b = np.arange(256, dtype=np.uint32)
    for p in range(8 // bits):
        asm = word_plane_asm(bits, p, signed)
        assert asm.count("lop3.b32") == 4 and asm.count("fma.rn.f32") == 4
        for j, (src, mask, scale, addend) in enumerate(word_plane_terms(bits, p, signed)):
            word = (b << (8 * j)) ^ (np.uint32(0x80808080) if signed else np.uint32(0))
            v = (word >> 16) if src else word
            f = ((v & np.uint32(mask)) | np.uint32(0x4B000000)).view(np.float32).astype(np.float64)
            s, a = (np.array([x], np.uint32).view(np.float32)[0] for x in (scale, addend))
            code = f * float(s) + float(a)
            want = b.astype(np.uint8).view(np.int8).astype(np.float64) if signed else ((b >> (bits * p)) & (2**bits - 1)).astype(np.float64)
            np.testing.assert_array_equal(code, want)
            assert np.all(code.astype(np.float32) == code)


@pytest.mark.parametrize("config", [ek.GemmConfig(16, 16, 128, 1, 1), ek.GemmConfig(32, 16, 256, 1, 1)], ids=str)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_gemm_configs_and_dtypes(config, dtype):
    """fp16 X (fp16 dot), bf16 X (tf32 dot: weights rounded to 10 mantissa bits once) and float32 X
    (the runtime's activations: rounded to fp16 in the kernel, one more 2^-11 relative term); fp16
    output (one more rounding)."""
    qtype, group, n, k = "q3", 32, 21, 416
    blob, W = _weights(qtype, group, n, k)
    terms = _bound_terms(qtype, blob, n, k, group)
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((5, k)).astype(np.float32)).to(getattr(torch, dtype))
    y = ek.matmul(x, blob, qtype, n, k, group, config=config, out_dtype=torch.float32)
    _check(y, x, W, np.zeros(n), terms, (3 if dtype == "float32" else 2) * U16 + (k + 32) * U32)
    y16 = ek.matmul(x, blob, qtype, n, k, group, config=config, out_dtype=torch.float16)
    ref = y.numpy()
    assert np.all(np.abs(y16.float().numpy() - ref) <= U16 * np.abs(ref) + 2.0**-24)


def test_matmul_rejects_bad_arguments():
    blob, _ = _weights("q4", 32, 5, 96)
    w = ek.PackedWeight.from_blob(blob, "q4", 5, 96, 32)
    with pytest.raises(ValueError, match=r"\[matmul\] expected x"):
        ek.matmul(torch.zeros(1, 64, dtype=torch.float16), w)
    with pytest.raises(ValueError, match="expected 1 bytes|expected .* bytes"):
        ek.PackedWeight.from_blob(blob[:-1], "q4", 5, 96, 32)
    with pytest.raises(ValueError, match="group size"):
        ek.PackedWeight.from_blob(blob, "q4", 5, 96, 48)
    with pytest.raises(ValueError, match="contradict"):
        ek.matmul(torch.zeros(1, 96, dtype=torch.float16), w, "q8")
    with pytest.raises(ValueError, match="GemvConfig"):
        ek.matmul(torch.zeros(1, 96, dtype=torch.float16), w, config=ek.GemmConfig(16, 16, 128))
    with pytest.raises(ValueError, match="split_k"):
        ek.GemvConfig(8, 128, 17)
    with pytest.raises(ValueError, match="block_k"):
        ek.GemmConfig(16, 16, 96)


def test_cuda_quant_linear_matches_cpu_quant_linear():
    """The runtime's CUDA linear (here on CPU tensors, interpreted) against the CPU QuantLinear's
    portable reference: float32 activations in and out, bias applied, any leading shape."""
    from edgevlm.runtime import QuantLinear
    from edgevlm.kernels.quant_linear import CudaQuantLinear

    qtype, group, n, k = "q2b", 16, 19, 160
    blob, W = _weights(qtype, group, n, k)
    terms = _bound_terms(qtype, blob, n, k, group)
    bias = np.random.default_rng(4).standard_normal(n).astype(np.float32)
    cpu = QuantLinear(blob, qtype, n, k, group, bias)
    gpu = CudaQuantLinear.from_quant(cpu, device="cpu")
    assert gpu.nbytes == cpu.nbytes
    x = np.random.default_rng(5).standard_normal((2, 3, k)).astype(np.float32)
    for xs, rel in ((x[:1, :1], (k + 32) * U32), (x, 3 * U16 + (k + 32) * U32)):  # GEMV, GEMM (fp16 dot)
        y = gpu(xs)
        assert y.dtype == np.float32 and y.shape == xs.shape[:-1] + (n,)
        ref = xs.reshape(-1, k).astype(np.float64) @ W.astype(np.float64).T + bias
        bound = rel * (np.abs(xs.reshape(-1, k)).astype(np.float64) @ terms.T + np.abs(bias))
        assert (np.abs(y.reshape(-1, n) - ref) <= bound).all()
        np.testing.assert_allclose(y, cpu(xs, isa="ref"), rtol=0, atol=float(bound.max()) + 1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: device='cuda' loads there")
def test_device_cuda_fails_early_and_clearly_without_a_gpu(tmp_path, capsys):
    from edgevlm.cli import main
    from edgevlm.runtime.cuda_linear import CudaUnavailableError, kernel_target
    from edgevlm.runtime.dual import DualEncoder
    from edgevlm.runtime.layers import Linear
    from edgevlm.runtime import QuantLinear
    from edgevlm.runtime.vlm import Runtime

    missing = tmp_path / "never-opened.evlm"  # the device is checked before the file is opened
    for load in (Runtime.load, DualEncoder.load):
        with pytest.raises(CudaUnavailableError, match=r"CUDA GPU.*pip install 'edgevlm\[cuda\]'"):
            load(missing, device="cuda")
    blob, _ = _weights("q4", 32, 5, 96)
    with pytest.raises(CudaUnavailableError, match="CUDA GPU"):
        Linear(quant=QuantLinear(blob, "q4", 5, 96, 32), isa="cuda")
    assert main(["run", str(missing), "--prompt", "hi", "--device", "cuda"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert kernel_target("cpu", "ref") == "ref"
    with pytest.raises(ValueError, match="expected device 'cpu' or 'cuda'"):
        kernel_target("tpu", None)
    with pytest.raises(ValueError, match="leave isa unset"):
        kernel_target("cuda", "avx2")


def test_device_cuda_without_torch_names_the_missing_package():
    """In a process where torch/triton cannot be imported (the CPU runtime's world), asking for
    CUDA says what is missing; the CPU path imports neither."""
    from no_torch import run_without_torch

    out = run_without_torch(
        "from edgevlm.runtime.cuda_linear import CudaUnavailableError, kernel_target\n"
        "assert kernel_target('cpu', None) is None\n"
        "try:\n    kernel_target('cuda', None)\nexcept CudaUnavailableError as e:\n    print('ERR', e)\n"
        "print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in FORBIDDEN))\n")
    assert out.returncode == 0, out.stderr
    assert "ERR device='cuda' needs torch" in out.stdout and "pip install 'edgevlm[cuda]'" in out.stdout
    assert "LOADED []" in out.stdout
