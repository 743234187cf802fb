"""``edgevlm export --format compressed-tensors|gptq``: Hugging Face checkpoints of the language model.

- compressed-tensors (tiny random LLaVA-Llama and Qwen2-VL, 4 and 8 bits): transformers loads the
  folder (compressed-tensors 0.20) and holds exactly the .evlm's dequantized weights (max |diff|
  0.0, every parameter); its first-step logits equal edgevlm's runtime (reference kernels) on the
  .evlm within 1e-4 and greedy tokens are identical.  Same weights, so the bound is only float32
  op order (test_generate.py's 8-bit same-weights bound).  Asymmetric (4-bit) checkpoints load with
  ``CompressedTensorsConfig(dequantize=True)``: transformers 5.24's compressed route with
  compressed-tensors 0.20 allocates the zero point unpacked ([N, G]) and rejects the packed
  [N b / 32, G] tensor that compressed-tensors itself writes (and vLLM reads).
- GPTQ: transformers' loader needs gptqmodel, which does not install here (it pulls torch 2.15
  + CUDA 13 wheels over the pinned torch 2.13), so the folder is read back by an unpacker written
  from the GPTQ v1 spec (bit extraction via np.unpackbits, not pack_int32's shifts) and must give
  the .evlm's weights exactly.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings

import numpy as np
import pytest

import hf_tiny
import hf_tiny_qwen2vl as hq

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ct = pytest.importorskip("compressed_tensors")

from edgevlm.export import ExportConfig, export  # noqa: E402
from edgevlm.export.config import Format  # noqa: E402
from edgevlm.export.evaluate import dequantized_state_dict  # noqa: E402
from edgevlm.export.golden import synthetic_images  # noqa: E402
from edgevlm.export.int_zero import int_zero_params  # noqa: E402
from edgevlm.export.quantize import rtn  # noqa: E402
from edgevlm.export.tensor_map import family_for  # noqa: E402
from edgevlm.interop.hf_quantized import convert, export_hf, pack_int32  # noqa: E402
from edgevlm.runtime.vlm import Runtime  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("quiet_torch_one_thread")]

N_NEW = 8
ARCH = {"llava": "LlavaForConditionalGeneration", "qwen2vl": "Qwen2VLForConditionalGeneration"}


def _quiet(fn, *a, **kw):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*a, **kw)


def _cfg(bits: int, f: str, **kw) -> ExportConfig:
    return ExportConfig(**{"method": "gptq", "bits": bits, "group": 32, "n_calib": 4, "progress": False,
                           "format": f, **kw})


@pytest.fixture(scope="module", params=sorted(ARCH))
def family(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    src = (hf_tiny.make_llava(d / "hf") if request.param == "llava" else hq.make_qwen2vl(d / "hf"))
    return request.param, src, d


def _load(name: str, folder, bits: int):
    """transformers' model of the folder in float32 (asymmetric 4-bit: dequantize at load)."""
    qc = transformers.CompressedTensorsConfig(dequantize=True) if bits < 8 else None
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # "the checkpoint's quantization_config is used" (it is)
        return getattr(transformers, ARCH[name]).from_pretrained(str(folder), dtype=torch.float32,
                                                                 quantization_config=qc).eval()


def _hf_inputs(name: str, src, rt: Runtime, text: str, image) -> dict:
    if name == "llava":
        p = rt.prepare(text, [image])
        ids = torch.from_numpy(p.input_ids)[None]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "pixel_values": torch.from_numpy(rt.vision.preprocessor([image]))}
    return dict(hq.processor(src)(text=[text], images=[image], return_tensors="pt"))


@pytest.mark.parametrize("bits", [4, 8])
def test_compressed_tensors_loads_in_transformers_with_the_evlm_weights(family, bits):
    name, src, d = family
    out = d / f"ct{bits}"
    _quiet(export, src, out, _cfg(bits, "compressed-tensors"))   # the entry point dispatches on format
    cfg = json.loads((out / "config.json").read_text())
    qc = ct.quantization.QuantizationConfig.model_validate(cfg["quantization_config"])   # the package's schema
    (scheme,) = qc.config_groups.values()
    assert (scheme.weights.num_bits, scheme.weights.group_size, scheme.weights.symmetric) == (bits, 32, bits == 8)
    model = _load(name, out, bits)
    image, msgs = synthetic_images()[0], [{"role": "user", "content": [{"type": "image"},
                                                                        {"type": "text", "text": "What is this?"}]}]
    rt = Runtime.load(out / "model.evlm", isa="ref")
    text = rt.format(msgs, 1)
    enc = _hf_inputs(name, src, rt, text, image)
    with torch.no_grad():
        want = model(**enc).logits[0].numpy()   # (the compressed 8-bit route decompresses here)
        gen = model.generate(**enc, do_sample=False, max_new_tokens=N_NEW)[0, enc["input_ids"].shape[1]:].tolist()
    # every parameter the .evlm holds, bit for bit: LM linears from the packed integers, the rest dense
    sd = dequantized_state_dict(out / "model.evlm")
    params = dict(model.named_parameters())
    lm = [k for k in sd if ".layers." in k and "language_model" in k and k.endswith("_proj.weight")]
    assert len(lm) == 14 and all(k in params for k in sd)
    for k, v in sd.items():
        assert np.array_equal(params[k].detach().numpy(), v), k
    p = rt.prepare(text, [image])
    assert np.abs(rt.logits(p) - want).max() < 1e-4
    assert rt.generate_ids(p, max_tokens=N_NEW) == gen


# ---- GPTQ ---------------------------------------------------------------------------------------
def _unpack_spec(words: np.ndarray, bits: int, axis: int, n: int) -> np.ndarray:
    """GPTQ v1 spec: each int32 holds bits-wide fields, LSB first, consecutive along ``axis``; a
    3-bit field may cross into the next word (every 32 fields fill exactly 3 words)."""
    w = np.ascontiguousarray(np.moveaxis(words, axis, -1), "<i4")
    bitstream = np.unpackbits(w.view(np.uint8), axis=-1, bitorder="little")   # [..., 32 * words]
    fields = bitstream[..., : n * bits].reshape(*w.shape[:-1], n, bits)
    vals = (fields.astype(np.int64) << np.arange(bits)).sum(-1)
    return np.moveaxis(vals, -1, axis)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_gptq_layout_unpacks_to_the_evlm_weights(family, bits):
    from safetensors.numpy import load_file

    name, src, d = family
    out = d / f"gptq{bits}"
    _quiet(export_hf, src, out, _cfg(bits, "gptq"))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == {**qc, "quant_method": "gptq", "bits": bits, "group_size": 32, "desc_act": False,
                  "sym": bits == 8, "checkpoint_format": "gptq"}
    assert json.loads((out / "quantize_config.json").read_text())["bits"] == bits
    st = load_file(str(out / "model.safetensors"))
    fam = family_for(json.loads((src / "config.json").read_text()))
    sd = dequantized_state_dict(out / "model.evlm")
    n_lin = 0
    for key in st:
        if not key.endswith(".qweight"):
            continue
        base = key[: -len(".qweight")]
        scales = st[f"{base}.scales"].astype(np.float32)                      # [G, N]
        g, n = scales.shape
        k = st[key].shape[0] * 32 // bits
        q = _unpack_spec(st[key], bits, 0, k)                                 # [K, N]
        zeros = _unpack_spec(st[f"{base}.qzeros"], bits, 1, n) + 1            # [G, N], v1: stored zero - 1
        g_idx = st[f"{base}.g_idx"]
        assert np.array_equal(g_idx, np.arange(k) // 32) and zeros.min() >= 1
        w = (scales[g_idx] * (q - zeros[g_idx]).astype(np.float32)).T         # [N, K]
        assert np.array_equal(w, sd[fam.canonical(base + ".weight")]), base
        n_lin += 1
    assert n_lin == 14


# ---- pieces -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("length", [32, 40, 96, 7])
def test_pack_int32_is_compressed_tensors_bit_stream(bits, length, rng):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    v = rng.integers(0, 1 << bits, (5, length))
    ours = pack_int32(v, bits, 1)
    theirs = pack_to_int32(torch.from_numpy(v - (1 << (bits - 1))).to(torch.int8), bits).numpy()
    assert np.array_equal(ours, theirs)
    assert np.array_equal(pack_int32(v.T, bits, 0), theirs.T)   # packing along axis 0


@pytest.mark.parametrize("qtype,bits", [("q2", 2), ("q3", 3), ("q4", 4)])
@pytest.mark.parametrize("zmin", [0, 1])
def test_int_zero_params_are_exact_and_keep_the_rtn_bound(qtype, bits, zmin, rng):
    from conftest import weights

    w = weights(rng, 16, 128, 32)
    w[4, :32] = -np.abs(w[4, :32]) - 1.0            # an all-negative group
    res = rtn(torch.from_numpy(w), qtype, 32, int_zero=zmin)
    s, m = res.scales.astype(np.float64), res.mins.astype(np.float64)
    z = np.where(s > 0, np.rint(-m / np.where(s > 0, s, 1)), zmin)
    assert (m == -s * z).all() and (z >= zmin).all() and (z <= (1 << bits) - 1).all()
    # the grid covers each group's range widened to 0, so round-to-nearest errs by at most scale / 2
    err = np.abs(res.deq.numpy() - w).reshape(16, 4, 32).max(-1)
    assert (err <= s / 2 * (1 + 1e-6) + 1e-30).all()
    assert np.array_equal(res.deq.numpy().reshape(16, 4, 32),
                          (s[..., None] * (res.codes.reshape(16, 4, 32) - z[..., None])).astype(np.float32))
    # scale vs min-max's s0 = (hi - lo) / qmax: the better of the two zero points next to -lo / s0
    # covers with at most s0 (1 + 1 / (qmax - 1)) (worst at -lo / s0 = qmax / 2), and the admissible
    # float16 scales (s * z float16 too, z <= qmax) are at most qmax / 1024 apart (relative)
    qmax = (1 << bits) - 1
    lo, hi = np.minimum(w.reshape(16, 4, 32).min(-1), 0), np.maximum(w.reshape(16, 4, 32).max(-1), 0)
    s0 = (hi - lo).astype(np.float64) / qmax
    assert (s <= s0 * (1 + 1 / (qmax - 1)) * (1 + qmax / 1024)).all()
    assert int_zero_params(bits, np.zeros(3, np.float32), np.zeros(3, np.float32), zmin)[0].max() == 0


# ---- errors -------------------------------------------------------------------------------------
def test_errors_name_the_fix(tmp_path):
    src = hf_tiny.make_llava(tmp_path / "hf")
    plain = tmp_path / "plain.evlm"
    _quiet(export, src, plain, ExportConfig(method="rtn", bits=4, group=32, progress=False))
    with pytest.raises(ValueError, match="integer zero point"):
        convert(plain, src, tmp_path / "c", "compressed-tensors")
    assert not (tmp_path / "c").exists()
    with pytest.raises(ValueError, match="packs the language model at 2/4/8 bits"):
        export_hf(src, tmp_path / "x", _cfg(3, "compressed-tensors"))
    with pytest.raises(ValueError, match="refit"):
        _cfg(4, "gptq", refit=1)
    with pytest.raises(ValueError, match="format must be one of"):
        _cfg(4, "awq-gemm")
    clip = hf_tiny.make_clip(tmp_path / "clip")
    with pytest.raises(ValueError, match="CLIPModel is not supported"):
        export_hf(clip, tmp_path / "y", _cfg(4, "gptq"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a").write_text("x")
    with pytest.raises(ValueError, match="not an empty folder"):
        export_hf(src, tmp_path / "full", _cfg(4, "gptq"))
    assert Format("gptq") is Format.GPTQ


def test_cli_export_then_convert_to_sharded_compressed_tensors(tmp_path, monkeypatch):
    """A GPTQ export's .evlm (zero points >= 1) converts to compressed-tensors too; small shards
    make the writer split the folder, which transformers loads through the index."""
    from edgevlm.cli import main
    from edgevlm.interop import hf_quantized

    src = hf_tiny.make_llava(tmp_path / "hf")
    assert _quiet(main, ["export", str(src), "-o", str(tmp_path / "g"), "--method", "rtn", "--bits", "8",
                         "--group", "32", "--format", "gptq", "-q"]) == 0
    assert json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]["bits"] == 8
    monkeypatch.setattr(hf_quantized, "MAX_SHARD_BYTES", 64 << 10)
    argv = ["convert", str(tmp_path / "g" / "model.evlm"), "--src", str(src), "-o", str(tmp_path / "ct"),
            "--format", "compressed-tensors"]
    assert _quiet(main, argv) == 0
    index = json.loads((tmp_path / "ct" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and (tmp_path / "ct" / "tokenizer.json").is_file()
    assert not (tmp_path / "ct" / "model.evlm").exists() and not list((tmp_path / "ct").glob(".*"))
    model = _load("llava", tmp_path / "ct", 8)
    with torch.no_grad():   # the compressed route decompresses on the first forward
        model(input_ids=torch.tensor([[1, 5, 6]]))
    params = dict(model.named_parameters())
    for k, v in dequantized_state_dict(tmp_path / "g" / "model.evlm").items():
        assert np.array_equal(params[k].detach().numpy(), v), k
    assert _quiet(main, argv) == 2   # the folder exists and is not empty: refused
