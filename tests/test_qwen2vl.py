"""Qwen2-VL and Qwen2.5-VL: tensor table, export, calibration inputs, preprocessing, prompt
preparation, vision tower and generation against transformers (tiny random models,
tests/hf_tiny_qwen2vl.py; every test runs for both versions unless it is version-free).

Measured on these models (fp32 transformers as the reference unless said otherwise):
- preprocessing: pixel_values and image_grid_thw identical to Qwen2VLImageProcessorPil (max |diff| 0.0).
- prompt ids, mrope positions [3, T] and rope_delta identical to Qwen2VLProcessor + get_rope_index.
- calibration: with an identity quantizer the recipe's image features equal
  ``get_image_features`` (max |diff| 0.0) and its decoder inputs give HF's logits (<= 1e-7).
- vision features (per-token cosine): f16 export min 0.9999998 (bound 0.9999); 8-bit rtn, reference
  kernels min 0.99990 / mean 0.99995 (bounds 0.9998 / 0.9999), default kernels (int8 activations)
  min 0.99979 (bound 0.9995); 4-bit gptq min 0.992 (bound 0.98); on the export's own dequantized
  weights the runtime is within 1e-5 of transformers (float32 rounding only).
- logits: f16 export max |diff| <= 3.1e-4 (bound 2e-3, logit range ~1.3); 8-bit on the same
  weights <= 4e-7 (bound 1e-5); greedy generation token-for-token equal in both cases.  Against
  fp32: 8-bit rtn cosine 0.99989 (bound 0.999), 4-bit gptq 0.9964 (bound 0.99), default kernels.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
skdata = pytest.importorskip("skimage.data")

import hf_tiny_qwen2vl as hq  # noqa: E402
from no_torch import generate_without_torch  # noqa: E402
from edgevlm import format as fmt  # noqa: E402
from edgevlm.export import ExportConfig, export  # noqa: E402
from edgevlm.export.tensor_map import family_for, resolve  # noqa: E402
from edgevlm.runtime import qwen2vl as rq  # noqa: E402
from edgevlm.runtime.qwen2vl_preprocess import QwenImagePreprocessor, smart_resize  # noqa: E402
from edgevlm.runtime.tokenizer import Tokenizer  # noqa: E402
from edgevlm.runtime.vlm import Runtime  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("quiet_torch_one_thread")]

N_NEW = 20
ARCH = {"2": "Qwen2VLForConditionalGeneration", "2.5": "Qwen2_5_VLForConditionalGeneration"}


def _photos():
    return [skdata.astronaut(), skdata.chelsea(), skdata.coffee()]


def _conversations():
    """(messages, number of images): one image, two images with text around them."""
    one = [{"type": "image"}, {"type": "text", "text": "What is shown in this image?"}]
    return [([{"role": "user", "content": one}], 1),
            ([{"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"},
                                           {"type": "text", "text": "and"}, {"type": "image"},
                                           {"type": "text", "text": "please."}]}], 2)]


def _export(src, out, **cfg):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        export(src, out, ExportConfig(**{"n_calib": 4, "progress": False, **cfg}))
    return out


def _cos_rows(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def fmt_json(path):
    import json

    return json.loads(path.read_text())


@pytest.fixture(scope="module", params=["2", "2.5"], ids=["qwen2vl", "qwen2.5vl"])
def qwen(request, tmp_path_factory):
    """(version, HF folder, fp32 HF model, processor, work dir, {bits: export path})."""
    d = tmp_path_factory.mktemp(f"qwen{request.param}")
    src = hq.make_qwen2vl(d / "hf", version=request.param)
    model = getattr(transformers, ARCH[request.param]).from_pretrained(str(src), dtype=torch.float32).eval()
    exports = {16: _export(src, d / "f16.evlm", method="rtn", bits=16),
               8: _export(src, d / "q8.evlm", method="rtn", bits=8),
               4: _export(src, d / "q4.evlm", method="gptq", bits=4)}
    return request.param, src, model, hq.processor(src), d, exports


def _hf_features(model, proc, images):
    enc = proc.image_processor(images=images, return_tensors="pt")
    with torch.no_grad():
        out = model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"]).pooler_output
    return torch.cat(out).numpy()


# ------------------------------------------------------------------------------------- table
def test_table_maps_every_checkpoint_tensor_onto_module_names(qwen):
    version, src, model, *_ = qwen
    cfg = fmt_json(src / "config.json")
    fam = family_for(cfg)
    assert fam.name == {"2": "qwen2_vl", "2.5": "qwen2_5_vl"}[version]
    from safetensors import safe_open

    with safe_open(str(src / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    mapped, dropped = resolve(fam, shapes)
    assert dropped == {} and len(mapped) == len(shapes)
    params = dict(model.named_parameters())
    for m in mapped:  # canonical names are the model's own parameter names, shapes agree
        assert m.canonical in params, m.canonical
        assert tuple(params[m.canonical].shape) == m.shape
    keys = {m.key: m for m in mapped}
    assert keys["vision.embed.patch.weight"].entry.kind.value == "dense"
    assert keys["vision.blocks.1.attn.qkv.weight"].shape == (192, 64)
    mlp = ("gate", "up", "down") if version == "2.5" else ("fc1", "fc2")
    assert all(f"vision.blocks.0.mlp.{n}.weight" in keys for n in mlp)
    assert ("vision.blocks.0.norm1.bias" in keys) == (version == "2")
    assert {"text.embed.tok", "text.norm.weight", "lm_head.weight", "text.blocks.1.attn.q.bias",
            "projector.fc1.weight", "projector.fc2.bias"} <= set(keys)
    # checkpoints saved with the module names map onto themselves
    for name in ("model.language_model.layers.0.mlp.up_proj.weight", "model.visual.blocks.0.attn.qkv.weight"):
        assert fam.canonical(name) == name
    # a hub-style config (text settings at the top level, no text_config) gives the same table
    flat = {**{k: v for k, v in cfg.items() if k != "text_config"}, **cfg["text_config"]}
    assert family_for(flat).dims == fam.dims


def test_tied_head_reuses_the_embeddings_and_generation_still_matches(tmp_path):
    src = hq.make_qwen2vl(tmp_path / "hf", version="2", tie=True)
    fam = family_for(fmt_json(src / "config.json"))
    from safetensors import safe_open

    with safe_open(str(src / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    mapped, dropped = resolve(fam, shapes)
    head = next(m for m in mapped if m.key == "lm_head.weight")
    assert fam.canonical(head.ckpt) == "model.language_model.embed_tokens.weight" and head.canonical == "lm_head.weight"
    assert "lm_head.weight" not in shapes and "lm_head.weight" not in dropped
    rt = Runtime.load(_export(src, tmp_path / "t.evlm", method="rtn", bits=16))
    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(str(src)).eval()
    proc = hq.processor(src)
    msgs, n = _conversations()[0]
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    enc = proc(text=[text], images=_photos()[:n], return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).logits[0].numpy()
    assert np.abs(rt.logits(rt.prepare(text, _photos()[:n])) - ref).max() < 2e-3


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Qwen2.5-VL folder with a hub-style config.json (flat text settings, rope_scaling type
    "mrope", in_chans), its fp32 model, processor and f16 export."""
    d = tmp_path_factory.mktemp("hub")
    src = hq.make_qwen2vl(d / "hf", version="2.5", hub_config=True)
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(str(src)).eval()
    return src, model, hq.processor(src), _export(src, d / "f16.evlm", method="rtn", bits=16)


def _one_image_case(proc):
    msgs, n = _conversations()[0]
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    images = _photos()[:n]
    return text, images, proc(text=[text], images=images, return_tensors="pt")


def test_hub_config_exports_and_encodes(hub):
    src, model, proc, path = hub
    assert "text_config" not in fmt_json(src / "config.json")
    with fmt.open(path) as f:
        vis = rq.Qwen2VLVision(f, f.metadata["config"])
        text, images, enc = _one_image_case(proc)
        p = vis.prepare(text, images, Tokenizer.from_evlm(f))
    np.testing.assert_array_equal(p.input_ids, enc["input_ids"][0].numpy())
    assert _cos_rows(p.image_features, _hf_features(model, proc, images)).min() >= 0.9999


def test_hub_config_generates(hub):
    src, model, proc, path = hub
    rt = Runtime.load(path)
    text, images, enc = _one_image_case(proc)
    with torch.no_grad():
        want = model(**enc).logits[0].numpy()
    assert np.abs(rt.logits(rt.prepare(text, images)) - want).max() < 2e-3


# ------------------------------------------------------------------------------------ export
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_cli_export_4bit(qwen, method):
    from edgevlm.cli import main as cli_main

    version, src, _, _, d, _ = qwen
    out = d / f"cli-{method}.evlm"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = cli_main(["export", str(src), "-o", str(out), "--method", method, "--bits", "4", "--n-calib", "3",
                       "-q"])
    assert rc == 0
    with fmt.open(out) as f:
        r = f.records
        assert r["vision.blocks.0.attn.qkv.weight"].qtype == "q4"
        assert r["projector.fc1.weight"].qtype == "q4" and r["text.blocks.1.mlp.down.weight"].qtype == "q4"
        assert r["text.embed.tok"].qtype == "q8"
        patch = r["vision.embed.patch.weight"]
        assert patch.qtype == "f16" and patch.shape == (64, 3, 2, 4, 4)
        q = f.metadata["quantization"]
        towers = {e["tower"] for e in q["block_errors"]}
        assert towers == {"vision", "projector", "text", "lm_head"}
        assert all(np.isfinite(e["rel_err"]) and e["rel_err"] < 0.5 for e in q["block_errors"])
        assert f.metadata["family"] == {"2": "qwen2_vl", "2.5": "qwen2_5_vl"}[version]


class _Identity:
    """A Quantizer that stores nothing and changes nothing: the calibration pass is then the
    plain fp32 forward, so its inputs can be compared with transformers'."""

    def wants_hessian(self, canonical):
        return False

    def linear(self, canonical, w, hessian):
        return w

    def stored(self, canonical, t):
        return t.to(torch.float32)

    def block_done(self, tower, index, rel_err):
        pass


def test_calibration_feeds_blocks_what_transformers_feeds_them(qwen):
    from edgevlm.export import recipe_qwen2vl as rec
    from edgevlm.export.calib_data import load_calib
    from edgevlm.export.calibrate import Calibrator
    from edgevlm.export.lazy import LazyModel
    from edgevlm.export.source import open_source

    version, src, model, proc, *_ = qwen
    source = open_source(src)
    calib = load_calib(None, n_images=3, n_texts=3, seed=0)
    cal = Calibrator(LazyModel(source), _Identity(), batch_size=2, progress=False)
    feats, grid = rec._image_features(cal, source, calib)  # windowed + full blocks (2.5), two batches
    enc = proc.image_processor(images=list(calib.images), return_tensors="pt")
    assert torch.equal(grid, enc["image_grid_thw"])
    ref = _hf_features(model, proc, list(calib.images))
    np.testing.assert_allclose(torch.cat(feats).numpy(), ref, atol=1e-5, rtol=0)
    batches, prompts = rec._text_batches(cal, source, calib, feats, grid)
    tt = source.family.towers["text"]
    batches, _ = cal.run_tower("text", tt["blocks"], tt["n"], batches)
    norm, head = cal.load("model.language_model.norm"), cal.load("lm_head")
    rows = np.concatenate([[0], np.cumsum(enc["image_grid_thw"].prod(-1).numpy())])
    j = 0
    for b in batches:
        with torch.no_grad():
            logits = head(norm(b.hidden))
        for r in range(b.hidden.shape[0]):
            ids = torch.tensor([prompts[j]])
            with torch.no_grad():
                want = model(input_ids=ids, pixel_values=enc["pixel_values"][rows[j]:rows[j + 1]],
                             image_grid_thw=enc["image_grid_thw"][j:j + 1], attention_mask=torch.ones_like(ids),
                             mm_token_type_ids=(ids == source.config["image_token_id"]).int()).logits[0]
            np.testing.assert_allclose(logits[r, :ids.shape[1]].numpy(), want.numpy(), atol=1e-5, rtol=0)
            j += 1


# ---------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("kw", [{}, {"patch_size": 14, "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280}],
                         ids=["tiny", "qwen-default"])
def test_preprocessing_matches_hf_image_processor(kw):
    hf = hq.image_processor(**kw)
    ours = QwenImagePreprocessor.from_config(hf.to_dict())
    images = _photos() + [np.full((5, 300, 3), 200, np.uint8)]  # a thin strip: scaled up to min_pixels
    want = hf(images=images, return_tensors="np")
    pv, grid = ours(images)
    np.testing.assert_array_equal(grid, want["image_grid_thw"])
    assert pv.dtype == np.float32 and np.abs(pv - want["pixel_values"]).max() == 0.0


def test_preprocessing_config_spellings_and_errors():
    # hub preprocessor_config.json files give min_pixels / max_pixels instead of size
    p = QwenImagePreprocessor.from_config({"min_pixels": 1000, "max_pixels": 5000, "patch_size": 14})
    assert (p.min_pixels, p.max_pixels, p.factor) == (1000, 5000, 28)
    assert smart_resize(500, 300, 28, 56 * 56, 28 * 28 * 1280) == (504, 308)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 400, 28, 56 * 56, 28 * 28 * 1280)
    with pytest.raises(ValueError, match="shortest_edge"):
        QwenImagePreprocessor.from_config({"size": {"height": 10, "width": 10}})


# ------------------------------------------------------------------------- index helpers
@pytest.mark.parametrize("grid", [[[1, 12, 12]], [[1, 8, 14], [1, 4, 4], [1, 16, 6]], [[2, 6, 10]]])
def test_window_and_position_indices_match_transformers(grid):
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

    g = torch.tensor(grid)
    np.testing.assert_array_equal(rq.vision_positions(np.array(grid), 2), get_vision_position_ids(g, 2).numpy())
    np.testing.assert_array_equal(rq.cu_seqlens(np.array(grid)), get_vision_cu_seqlens(g).numpy())
    for window in (16, 32, 8):
        idx, cu = rq.window_index(np.array(grid), 2, window, 4)
        want_idx, want_cu = get_vision_window_index(g, spatial_merge_size=2, window_size=window, patch_size=4)
        np.testing.assert_array_equal(idx, want_idx.numpy())
        np.testing.assert_array_equal(cu, want_cu.numpy())
    with pytest.raises(ValueError, match="window_size"):
        rq.window_index(np.array(grid), 2, 4, 4)


def test_segment_attention_chunks_long_spans_identically(monkeypatch):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((40, 32)).astype(np.float32) for _ in range(3))
    cu = np.array([0, 16, 32, 40])
    whole = rq.segment_attention(q, k, v, cu, 4)
    monkeypatch.setattr(rq, "SCORE_BYTES", 1)  # one query row at a time
    np.testing.assert_allclose(rq.segment_attention(q, k, v, cu, 4), whole, atol=1e-6, rtol=0)
    from edgevlm.runtime.layers import attention

    np.testing.assert_allclose(whole[16:32], attention(q[None, 16:32], k[None, 16:32], v[None, 16:32], 4)[0],
                               atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------- prepare
def test_prepare_matches_processor_and_get_rope_index(qwen):
    version, src, model, proc, d, exports = qwen
    with fmt.open(exports[16]) as f:
        vis = rq.Qwen2VLVision(f, f.metadata["config"])
        tok = Tokenizer.from_evlm(f)
        photos = _photos()
        cases = [(m, photos[:n] if n == 1 else photos[1:]) for m, n in _conversations()]
        cases.append(([{"role": "user", "content": "hello world"}], []))
        for msgs, images in cases:
            text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            assert text.count(vis.image_placeholder) == len(images)
            p = vis.prepare(text, images, tok)
            enc = proc(text=[text], images=images or None, return_tensors="pt")
            np.testing.assert_array_equal(p.input_ids, enc["input_ids"][0].numpy())
            if images:
                pos, delta = model.model.get_rope_index(enc["input_ids"], mm_token_type_ids=enc["mm_token_type_ids"],
                                                        image_grid_thw=enc["image_grid_thw"],
                                                        attention_mask=enc["attention_mask"])
                np.testing.assert_array_equal(p.positions, pos[:, 0].numpy())
                assert p.rope_delta == int(delta[0, 0]) and p.rope_delta < 0
                assert p.image_features.shape == (int((p.input_ids == vis.image_token_id).sum()), 64)
            else:  # text only: 0..T-1 in all three sections, as HF without image_grid_thw
                np.testing.assert_array_equal(p.positions, np.tile(np.arange(p.input_ids.size), (3, 1)))
                assert p.rope_delta == 0 and p.image_features is None
        plain = proc.apply_chat_template(cases[-1][0], tokenize=False, add_generation_prompt=True)
        with pytest.raises(ValueError, match="placeholder"):
            vis.prepare(plain, photos[:1], tok)  # a text-only prompt with an image
        two = proc.apply_chat_template(_conversations()[1][0], tokenize=False, add_generation_prompt=True)
        with pytest.raises(ValueError, match="placeholder"):
            vis.prepare(two, photos[:1], tok)


def test_rope_index_needs_text_between_images():
    grid = np.array([[1, 4, 4], [1, 4, 4]])
    ids = np.array([5, 9, 9, 9, 9, 9, 9, 9, 9, 6])  # two 4-token images with nothing between them
    with pytest.raises(ValueError, match="between them"):
        rq.rope_index(ids, grid, 9, 2)


# ----------------------------------------------------------------------------------- vision
def test_vision_features_match_transformers(qwen):
    from edgevlm.export.evaluate import load_into_model

    version, src, model, proc, d, exports = qwen
    photos = _photos()
    ref = _hf_features(model, proc, photos)
    bounds = {(16, "ref"): 0.9999, (8, "ref"): 0.9998, (8, None): 0.9995, (4, "ref"): 0.98}
    for (bits, isa), bound in bounds.items():
        path = exports[bits]
        with fmt.open(path) as f:
            vis = rq.Qwen2VLVision(f, f.metadata["config"], isa=isa)
            ours = np.concatenate(vis.image_features(photos))
        assert ours.shape == ref.shape
        cos = _cos_rows(ours, ref)
        assert cos.min() >= bound, (bits, isa, cos.min())
        if (bits, isa) == (8, "ref"):
            assert cos.mean() >= 0.9999, cos.mean()
        if isa is None:
            continue
        if bits != 4:  # the runtime computes what transformers computes on the file's weights
            same = _hf_features(load_into_model(path, src).eval(), proc, photos)
            np.testing.assert_allclose(ours, same, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------- generation
def test_logits_and_greedy_generation_match_transformers(qwen):
    from edgevlm.export.evaluate import load_into_model

    version, src, model, proc, d, exports = qwen
    photos = _photos()
    same_weights = load_into_model(exports[8], src).eval()
    for bits, isa, ref_model, tol in ((16, None, model, 2e-3), (8, "ref", same_weights, 1e-5)):
        rt = Runtime.load(exports[bits], isa=isa)
        for msgs, n in _conversations():
            images = photos[:n] if n == 1 else photos[1:]
            text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            assert rt.format(msgs, n) == text
            enc = proc(text=[text], images=images, return_tensors="pt")
            with torch.no_grad():
                want = ref_model(**enc).logits[0].numpy()
                gen = ref_model.generate(**enc, do_sample=False, max_new_tokens=N_NEW)[0, enc["input_ids"].shape[1]:]
            p = rt.prepare(text, images)
            assert np.abs(rt.logits(p) - want).max() < tol
            assert rt.generate_ids(p, max_tokens=N_NEW) == gen.tolist()


@pytest.mark.parametrize("bits,min_cos", [(8, 0.999), (4, 0.99)])
def test_quantized_logits_stay_within_documented_bounds(qwen, bits, min_cos):
    version, src, model, proc, d, exports = qwen
    rt = Runtime.load(exports[bits])
    photos = _photos()
    for msgs, n in _conversations():
        images = photos[:n] if n == 1 else photos[1:]
        text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        with torch.no_grad():
            want = model(**proc(text=[text], images=images, return_tensors="pt")).logits[0].numpy()
        got = rt.logits(rt.prepare(text, images))
        assert _cos_rows(got.reshape(1, -1), want.reshape(1, -1))[0] >= min_cos


def test_runtime_generates_without_torch(qwen):
    version, src, model, proc, d, exports = qwen
    img = d / "img.png"
    from PIL import Image

    Image.fromarray(_photos()[1]).save(img)
    r = generate_without_torch(exports[8], img)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr
