"""``edgevlm export-onnx``: MatMulNBits packing, and ONNX Runtime against the edgevlm runtime.

Packing (no model): every edgevlm quant type's weight, as ONNX Runtime itself dequantizes it
(MatMulNBits on an identity input at accuracy level 0, plus the q2/q3/q4 min term), equals
``edgevlm.qtypes`` dequantization bit for bit.

Models (tiny random CLIP / SigLIP / LLaVA from tests/hf_tiny.py, RTN exports at 16/8/4/3/2 bits):

* accuracy level 0 (float32 activations) vs the runtime's reference kernels (``isa="ref"``, exact
  float32 activations): the same weights and the same operations, only summed in other orders
  (ORT's GEMM/conv blocking vs numpy/BLAS). Bound: cosine >= 0.99999 and max |diff| <= 2e-5 x
  max |runtime| (measured: cosine >= 0.9999999, max relative diff <= 1.7e-6 at every width).
* accuracy level 4 (ORT quantizes activations to int8 per block) vs the runtime's default kernels
  (int8 activations per group on SIMD ISAs, their own rounding): two different activation
  quantizers on a random 2-layer model. Bound: cosine >= 0.995 (measured >= 0.9990 on these
  inputs, >= 0.9986 on other texts).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

import hf_tiny  # noqa: E402
from conftest import weights  # noqa: E402

from edgevlm import format as fmt  # noqa: E402
from edgevlm import qtypes  # noqa: E402
from edgevlm.cli import main as cli  # noqa: E402
from edgevlm.interop import onnx_pack as P  # noqa: E402
from edgevlm.interop.onnx_export import OnnxExportConfig, export_onnx  # noqa: E402
from edgevlm.runtime import load_dual  # noqa: E402

BITS = (16, 8, 4, 3, 2)
# level 0 vs isa="ref" (module docstring): same math, other summation orders
COS0, REL0 = 0.99999, 2e-5
# level 4 vs the default kernels: two int8 activation quantizers
COS4 = 0.995


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).min())


def _session(path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run(path, feeds: dict) -> dict[str, np.ndarray]:
    s = _session(path)
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds), strict=True))


# ------------------------------------------------------------------------------------ packing

def test_ort_accepts_exactly_the_mapped_widths():
    """ORT_BITS is what this onnxruntime's CPU MatMulNBits runs: 3 bits (our q3) is refused."""
    for bits in (2, 3, 4, 8):
        w = P.NBitsWeights(16, 32, bits, 32, np.zeros((16, 1, 4 * bits), np.uint8), np.ones(16, np.float32),
                           np.zeros(16, np.uint8))
        if bits in P.ORT_BITS:
            _session_bytes(_single_node(w, level=0))
        else:
            with pytest.raises(Exception, match="2b, 4b and 8b"):
                _session_bytes(_single_node(w, level=0))


def _single_node(w: P.NBitsWeights, level: int):
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(w.b, "B"), numpy_helper.from_array(w.scales, "S"),
             numpy_helper.from_array(w.zp, "Z")]
    node = P.matmulnbits_node("A", w, ("B", "S", "Z"), "Y", accuracy_level=level)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", w.k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", w.n])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", P.OPSET_ONNX),
                                            helper.make_opsetid("com.microsoft", P.OPSET_CONTRIB)])
    m.ir_version = P.IR_VERSION
    return m.SerializeToString()


def _session_bytes(model: bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 4
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("qt,group", [("q8", 32), ("q8", 128), ("q4", 32), ("q4", 64), ("q3", 32), ("q3", 128),
                                      ("q2", 32), ("q2", 64), ("q2b", 16)])
def test_packing_is_exact_through_ort(rng, qt, group):
    # K = 384: a q4 row ends in a 64-code unit; N = 40: q2b's last 16-row block is short
    n, k = 40, 384
    t = qtypes.get(qt)
    blob = t.pack(weights(rng, n, k, 32) * 0.1, group)
    ref = t.dequantize(blob, n, k, group)                              # float32 [N, K]
    p = P.from_qtype(blob, qt, n, k, group)
    assert p.weights.bits == P.ort_bits(qt) and (p.mins_t is None) == (qt in ("q8", "q2b"))
    np.testing.assert_array_equal(P.dequantize(p), ref)                # the spec's arithmetic, in numpy
    # ORT's own dequantization: Y = I @ W^T = W^T exactly at level 0 (one nonzero product per sum)
    y = _session_bytes(_single_node(p.weights, level=0)).run(None, {"A": np.eye(k, dtype=np.float32)})[0].T
    if p.mins_t is not None:
        y = y + np.repeat(p.mins_t.T, group, axis=1)                   # the graph's blocksum(I) @ m^T
    np.testing.assert_array_equal(y, ref)


def test_pack_codes_round_trip(rng):
    for bits in P.ORT_BITS:
        codes = rng.integers(0, 1 << bits, (5, 96), dtype=np.uint8)
        b = P.pack_codes(codes, bits, 32)
        assert b.shape == (5, 3, 32 * bits // 8)
        np.testing.assert_array_equal(P.unpack_bits(b, bits, 32).reshape(5, 96), codes)
        zp = rng.integers(0, 1 << bits, (5, 3), dtype=np.uint8)
        np.testing.assert_array_equal(P.unpack_bits(P.pack_zero_points(zp, bits).reshape(5, -1), bits, 3), zp)
    with pytest.raises(ValueError, match="bits in"):
        P.pack_codes(np.zeros((2, 32), np.uint8), 3, 32)


# ------------------------------------------------------------------------------------- models

@pytest.fixture(scope="module")
def exports(tmp_path_factory, quiet_torch_one_thread):
    """{(family, bits): .evlm path} for tiny CLIP and SigLIP, RTN at every width."""
    from edgevlm.export import ExportConfig
    from edgevlm.export.pipeline import run_export

    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for fam in ("clip", "siglip"):
        src = getattr(hf_tiny, f"make_{fam}")(root / fam)
        for bits in BITS:
            p = root / f"{fam}_{bits}.evlm"
            run_export(src, p, ExportConfig(method="rtn", bits=bits, n_calib=4, progress=False), log=lambda s: None)
            out[(fam, bits)] = p
    return out


def _inputs(enc, n_img: int = 3):
    px = np.random.default_rng(7).standard_normal((n_img, 3, enc.vision.image_size, enc.vision.image_size))
    ids, mask = enc.tokenize(["a photo of a cat", "a dog", "two people are walking along the beach at sunset"])
    feeds = {"pixel_values": px.astype(np.float32), "input_ids": ids.astype(np.int64)}
    if enc.family == "clip":
        feeds["attention_mask"] = mask.astype(np.int64)
    return feeds, (mask if enc.family == "clip" else None)


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("bits", BITS)
def test_ort_matches_runtime(exports, tmp_path, family, bits):
    evlm = exports[(family, bits)]
    for level in (0, 4):
        rep = export_onnx(evlm, tmp_path / f"m{level}.onnx", OnnxExportConfig(accuracy_level=level))
        n_lin = sum(rep.widths.values())
        assert rep.matmulnbits == n_lin and (n_lin == 0) == (bits == 16)
        if bits < 16:
            assert {k.split(" block")[0] for k in rep.widths} == {f"q{bits} -> {P.ort_bits(f'q{bits}')}-bit"}
        with load_dual(evlm, isa="ref" if level == 0 else None) as enc:
            feeds, mask = _inputs(enc)
            out = _run(rep.path, feeds)
            img = enc.encode_pixels(feeds["pixel_values"], normalize=False)
            txt = enc.encode_tokens(feeds["input_ids"], mask, normalize=False)
            logits = enc.logits(enc.encode_pixels(feeds["pixel_values"]), enc.encode_tokens(feeds["input_ids"], mask))
        for got, ref in ((out["image_features"], img), (out["text_features"], txt)):
            assert got.shape == ref.shape
            if level == 0:
                assert _cos(got, ref) >= COS0
                assert np.abs(got - ref).max() <= REL0 * np.abs(ref).max()
            else:
                assert _cos(got, ref) >= COS4
        np.testing.assert_allclose(np.linalg.norm(out["image_embeds"], axis=-1), 1.0, atol=1e-6)
        if level == 0:  # logits: exp(logit_scale) * cos (+ bias), cos off by <= 1e-5
            assert np.abs(out["logits_per_image"] - logits).max() <= 2e-5 * np.exp(enc.logit_scale) + 1e-6


def test_towers_and_dynamic_batch(exports, tmp_path):
    evlm = exports[("clip", 4)]
    with load_dual(evlm) as enc:
        feeds3, _ = _inputs(enc)
        feeds, _ = _inputs(enc, n_img=1)  # another image batch size
    both = _run(export_onnx(evlm, tmp_path / "both.onnx", OnnxExportConfig(accuracy_level=0)).path, feeds3)
    v = export_onnx(evlm, tmp_path / "v.onnx", OnnxExportConfig(tower="vision", accuracy_level=0))
    t = export_onnx(evlm, tmp_path / "t.onnx", OnnxExportConfig(tower="text", accuracy_level=0))
    assert v.inputs == ("pixel_values",) and v.outputs == ("image_features", "image_embeds")
    assert t.inputs == ("input_ids", "attention_mask") and t.outputs == ("text_features", "text_embeds")
    one = _run(v.path, {"pixel_values": feeds["pixel_values"]})["image_features"]
    np.testing.assert_allclose(one[0], both["image_features"][0], rtol=0, atol=1e-5)
    txt = _run(t.path, {k: feeds[k] for k in ("input_ids", "attention_mask")})["text_features"]
    np.testing.assert_allclose(txt, both["text_features"], rtol=0, atol=1e-5)
    meta = {p.key: p.value for p in onnx.load(str(v.path)).metadata_props}
    with fmt.open(evlm) as f:
        assert json.loads(meta["edgevlm.preprocess"]) == f.metadata["preprocess"]


def test_external_data_gives_the_same_model(exports, tmp_path):
    evlm = exports[("siglip", 8)]
    a = export_onnx(evlm, tmp_path / "a.onnx", OnnxExportConfig(accuracy_level=0))
    b = export_onnx(evlm, tmp_path / "sub" / "b.onnx", OnnxExportConfig(accuracy_level=0, external_data=True))
    assert a.data_path is None and b.data_path == tmp_path / "sub" / "b.onnx.data"
    assert b.file_bytes < 0.2 * a.file_bytes < b.data_path.stat().st_size
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["b.onnx", "b.onnx.data"]  # no temp left
    with load_dual(evlm) as enc:
        feeds, _ = _inputs(enc)
    ra, rb = _run(a.path, feeds), _run(b.path, feeds)
    for k in ra:
        np.testing.assert_array_equal(ra[k], rb[k])


def test_external_data_is_automatic_past_the_threshold(exports, tmp_path, monkeypatch):
    from edgevlm.interop import onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_AUTO_BYTES", 10_000)  # stands in for 1.75 GiB
    said = []
    rep = export_onnx(exports[("clip", 4)], tmp_path / "m.onnx", log=said.append)
    assert rep.data_path == tmp_path / "m.onnx.data" and "m.onnx.data" in said[0]
    assert any("weights in m.onnx.data" in ln for ln in rep.lines())


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_llava_vision_tower(tmp_path, quiet_torch_one_thread, vision):
    from edgevlm.export import ExportConfig
    from edgevlm.export.pipeline import run_export
    from edgevlm.runtime.llava import LlavaVision

    src = hf_tiny.make_llava(tmp_path / "src", vision=vision)
    evlm = tmp_path / "llava.evlm"
    run_export(src, evlm, ExportConfig(method="rtn", bits=4, n_calib=4, progress=False), log=lambda s: None)
    rep = export_onnx(evlm, tmp_path / "llava.onnx", OnnxExportConfig(accuracy_level=0))
    assert rep.inputs == ("pixel_values",) and rep.outputs == ("image_features",) and rep.matmulnbits > 0
    px = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    got = _run(rep.path, {"pixel_values": px})["image_features"]
    with fmt.open(evlm) as f:
        ref = LlavaVision(f, f.metadata["config"], isa="ref").encode(px)   # [B, n_tokens, D_text]
    assert got.shape == ref.shape == (2, hf_tiny.num_image_tokens(vision), 64)
    assert _cos(got.reshape(-1, 64), ref.reshape(-1, 64)) >= COS0
    assert np.abs(got - ref).max() <= REL0 * np.abs(ref).max()
    with pytest.raises(ValueError, match="vision tower \\+ projector"):
        export_onnx(evlm, tmp_path / "x.onnx", OnnxExportConfig(tower="text"))


# ------------------------------------------------------------------------------------- errors

def test_unsupported_family_and_bad_arguments(tmp_path, capsys):
    bad = tmp_path / "qwen.evlm"
    fmt.write(bad, {"family": "qwen2_vl", "architecture": "Qwen2VLForConditionalGeneration"},
              [fmt.TensorBlob("x", "f32", 32, 0, (1,), np.zeros(1, np.float32))])
    with pytest.raises(ValueError, match="supports CLIPModel and SiglipModel .* LlavaForConditionalGeneration"):
        export_onnx(bad, tmp_path / "q.onnx")
    assert cli(["export-onnx", str(bad), "-o", str(tmp_path / "q.onnx")]) == 2
    assert "Qwen2-VL" in capsys.readouterr().err
    assert not (tmp_path / "q.onnx").exists() and [p.name for p in tmp_path.iterdir()] == ["qwen.evlm"]
    with pytest.raises(ValueError, match="is a directory"):
        export_onnx(bad, tmp_path)
    with pytest.raises(ValueError, match="is the input file"):
        export_onnx(bad, bad)
    with pytest.raises(ValueError, match="tower must be one of"):
        OnnxExportConfig(tower="audio")
    with pytest.raises(ValueError, match="accuracy_level must be 0"):
        OnnxExportConfig(accuracy_level=2)


def test_cli_summary(exports, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert cli(["export-onnx", str(exports[("clip", 3)]), "-o", str(out), "--tower", "vision"]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "MatMulNBits" in text and "q3 -> 4-bit" in text and "widened" in text
    assert cli(["export-onnx", str(exports[("clip", 3)]), "-o", str(out), "--tower", "vision"]) == 0  # overwrites
