"""Qwen3-VL-MoE: tensor table (fused experts split per expert, both checkpoint layouts), export,
expert-aware calibration, preprocessing, prompt preparation, vision tower with DeepStack, and
generation against transformers (tiny random model, tests/hf_tiny_qwen3vlmoe.py: 3 decoder layers,
two MoE (8 experts, top-2) and one dense, DeepStack into layers 0 and 1).

Measured on this model (fp32 transformers as the reference unless said otherwise):
- preprocessing: pixel_values / image_grid_thw identical to the HF image processor (max |diff| 0.0);
  prompt ids, mrope positions [3, T] and rope_delta identical to the processor + get_rope_index;
  the position-table interpolation taps identical to transformers', weights within 1e-7.
- vision (f16 export, reference kernels): merged and DeepStack features per-token cosine >= 0.99999.
- logits: f16 export max |diff| 3.4e-4 (bound 2e-3; logit range ~0.6); greedy generation of 20
  tokens token-for-token equal on one-image, two-image and text-only prompts.  8-bit (rtn) with
  reference kernels against transformers on the file's own dequantized weights: max |diff|
  3.6e-7 (bound 1e-5), greedy equal.  Against fp32, default kernels: 8-bit rtn cosine >= 0.99983
  (max |diff| 1.4e-2; bound 0.999), 4-bit gptq cosine >= 0.9917 (bound 0.99).
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
skdata = pytest.importorskip("skimage.data")

import hf_tiny_qwen3vlmoe as h3  # noqa: E402
from no_torch import generate_without_torch  # noqa: E402
from edgevlm import format as fmt  # noqa: E402
from edgevlm.export import ExportConfig, export  # noqa: E402
from edgevlm.export.tensor_map import Kind, family_for, resolve  # noqa: E402
from edgevlm.runtime import qwen3vl as r3  # noqa: E402
from edgevlm.runtime.qwen2vl_preprocess import QwenImagePreprocessor  # noqa: E402
from edgevlm.runtime.tokenizer import Tokenizer  # noqa: E402
from edgevlm.runtime.vlm import Runtime  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("quiet_torch_one_thread")]

N_NEW = 20


def _photos():
    return [skdata.astronaut(), skdata.chelsea(), skdata.coffee()]


def _cases():
    """(messages, images): one image, two images with text around them, text only."""
    p = _photos()
    one = [{"type": "image"}, {"type": "text", "text": "What is shown in this image?"}]
    two = [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": "and"},
           {"type": "image"}, {"type": "text", "text": "please."}]
    return [([{"role": "user", "content": one}], p[:1]), ([{"role": "user", "content": two}], p[1:]),
            ([{"role": "user", "content": "hello world"}], [])]


def _export(src, out, **cfg):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        export(src, out, ExportConfig(**{"n_calib": 4, "progress": False, **cfg}))
    return out


def _cos(a, b):
    a, b = a.astype(np.float64).reshape(len(a), -1), b.astype(np.float64).reshape(len(b), -1)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def _shapes(src):
    from safetensors import safe_open

    with safe_open(str(src / "model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


@pytest.fixture(scope="module")
def q3(tmp_path_factory):
    """(HF folder, fp32 HF model, processor, work dir, {bits: export path})."""
    d = tmp_path_factory.mktemp("qwen3vlmoe")
    src = h3.make_qwen3vlmoe(d / "hf", mlp_only_layers=(2,))
    model = transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(str(src), dtype=torch.float32).eval()
    exports = {16: _export(src, d / "f16.evlm", method="rtn", bits=16),
               8: _export(src, d / "q8.evlm", method="rtn", bits=8),
               4: _export(src, d / "q4.evlm", method="gptq", bits=4)}
    return src, model, h3.processor(src), d, exports


def _hf(model, proc, msgs, images):
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return text, proc(text=[text], images=images or None, return_tensors="pt")


# ------------------------------------------------------------------------------------- table
def test_table_maps_every_checkpoint_tensor(q3):
    src, model, *_ = q3
    fam = family_for(json.loads((src / "config.json").read_text()))
    assert fam.name == "qwen3_vl_moe"
    shapes = _shapes(src)
    mapped, dropped = resolve(fam, shapes)
    assert dropped == {}
    params = dict(model.named_parameters())
    fused = set()
    for m in mapped:  # canonical names: model parameters, or one expert's slice of a fused parameter
        if m.canonical in params:
            assert tuple(params[m.canonical].shape) == m.shape
        else:
            parent = m.canonical.rsplit(".", 2 if m.canonical.endswith((".gate", ".up")) else 1)[0]
            assert parent in params, m.canonical
            fused.add(parent)
    assert fused | {m.canonical for m in mapped} >= set(params)  # every parameter is in the file
    keys = {m.key: m for m in mapped}
    assert len([k for k in keys if ".moe.experts." in k]) == 2 * 8 * 3  # 2 MoE layers x 8 experts x 3
    assert keys["text.blocks.1.moe.experts.7.gate.weight"].shape == (96, 64)
    assert keys["text.blocks.1.moe.experts.7.down.weight"].shape == (64, 96)
    assert keys["text.blocks.0.moe.router.weight"].entry.kind is Kind.DENSE
    assert keys["text.blocks.0.moe.router.weight"].entry.min_bits == 16  # the router is never quantized
    assert "text.blocks.2.mlp.gate.weight" in keys and "text.blocks.2.moe.router.weight" not in keys
    assert {"vision.embed.pos", "projector.deepstack.1.fc2.weight", "text.blocks.0.attn.q_norm.weight",
            "lm_head.weight"} <= set(keys)
    # the hub layout (experts transposed: [E, D, 2 Fe] and [E, Fe, D]) resolves to the same table
    hub = {k: (s[0], s[2], s[1]) if ".mlp.experts." in k else s for k, s in shapes.items()}
    assert [(m.key, m.shape) for m in resolve(fam, hub)[0]] == [(m.key, m.shape) for m in mapped]
    with pytest.raises(ValueError, match="does not map"):
        resolve(fam, {**shapes, "model.language_model.layers.0.mlp.shared_expert.weight": (64, 64)})
    with pytest.raises(ValueError, match="shape mismatch"):
        resolve(fam, {**shapes, "model.language_model.layers.0.mlp.experts.down_proj": (8, 64, 64)})
    with pytest.raises(ValueError, match="missing"):
        resolve(fam, {k: s for k, s in shapes.items() if "layers.1.mlp.experts.down_proj" not in k})


def test_hub_layout_checkpoint_exports_the_same_file(q3, tmp_path):
    """Experts stored transposed (as the Qwen hub does) give a bit-identical f16 export."""
    import shutil

    from safetensors.numpy import load_file, save_file

    src, _, _, _, exports = q3
    hub = tmp_path / "hub"
    shutil.copytree(src, hub)
    sd = load_file(str(src / "model.safetensors"))
    sd = {k: np.ascontiguousarray(v.transpose(0, 2, 1)) if ".mlp.experts." in k else v for k, v in sd.items()}
    save_file(sd, str(hub / "model.safetensors"), metadata={"format": "pt"})
    out = _export(hub, tmp_path / "hub.evlm", method="rtn", bits=16)
    with fmt.open(out) as a, fmt.open(exports[16]) as b:
        assert set(a.records) == set(b.records)
        for k in a.records:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


# ---------------------------------------------------------------------------- calibration
def test_expert_calibration_statistics_and_rare_experts(q3, monkeypatch):
    """Routing statistics count every real token top_k times; with every expert "rare" (the
    shrunk Hessian path) a 4-bit export is still close to fp32."""
    from edgevlm.export import calibrate_moe
    from edgevlm.export.quantize import Hessian

    # the shrinkage: (n H_routed + n0 H_all) / (n + n0)
    g = torch.Generator().manual_seed(0)
    x_all = torch.randn(50, 8, generator=g)
    routed = x_all[:5]
    mc = calibrate_moe.MoeCalibrator.__new__(calibrate_moe.MoeCalibrator)
    mc.min_tokens, mc.expert_weight = 20, None
    mc.cal = type("C", (), {"q": type("Q", (), {"wants_hessian": lambda self, c: True})()})()
    h = mc._hessian("w", routed, torch.ones(5), torch.zeros(5, dtype=torch.bool), x_all).matrix()
    hr, ha = Hessian(8), Hessian(8)
    hr.add(routed)
    ha.add(x_all)
    torch.testing.assert_close(h, (5 * hr.matrix() + 20 * ha.matrix()) / 25, rtol=1e-5, atol=1e-6)

    src, model, proc, d, _ = q3
    seen = {}
    real = calibrate_moe.MoeCalibrator.run_tower

    def spy(self, tt, batches, image_masks, deepstack=None):
        seen["tokens"] = sum(int(b.mask.sum()) for b in batches)
        seen["image"] = sum(int(m.sum()) for m in image_masks)
        out = real(self, tt, batches, image_masks, deepstack)
        seen["stats"] = self.stats
        return out

    monkeypatch.setattr(calibrate_moe.MoeCalibrator, "run_tower", spy)
    monkeypatch.setattr(calibrate_moe, "MIN_TOKENS", 10 ** 6)
    path = _export(src, d / "rare.evlm", method="gptq", bits=4)
    assert [s.layer for s in seen["stats"]] == [0, 1]
    for s in seen["stats"]:
        assert s.tokens.sum() == 2 * seen["tokens"] and s.tokens[:, 1].sum() == 2 * seen["image"]
        np.testing.assert_allclose(s.affinity.sum(), seen["tokens"], rtol=1e-5)  # weights sum to 1 per token
    rt = Runtime.load(path)
    msgs, images = _cases()[0]
    text, enc = _hf(model, proc, msgs, images)
    with torch.no_grad():
        want = model(**enc).logits[0].numpy()
    assert _cos(rt.logits(rt.prepare(text, images)).reshape(1, -1), want.reshape(1, -1))[0] >= 0.99


# --------------------------------------------------------------------------- preprocessing
def test_preprocessing_and_prepare_match_processor_and_get_rope_index(q3):
    src, model, proc, d, exports = q3
    ours = QwenImagePreprocessor.from_config(json.loads((src / "preprocessor_config.json").read_text()))
    photos = _photos() + [np.full((5, 300, 3), 200, np.uint8)]
    want = proc.image_processor(images=photos, return_tensors="np")
    pv, grid = ours(photos)
    np.testing.assert_array_equal(grid, want["image_grid_thw"])
    assert np.abs(pv - want["pixel_values"]).max() == 0.0
    with fmt.open(exports[16]) as f:
        vis = r3.Qwen3VLVision(f, f.metadata["config"])
        tok = Tokenizer.from_evlm(f)
        for msgs, images in _cases():
            text, enc = _hf(model, proc, msgs, images)
            p = vis.prepare(text, images, tok)
            np.testing.assert_array_equal(p.input_ids, enc["input_ids"][0].numpy())
            if images:
                pos, delta = model.model.get_rope_index(enc["input_ids"], mm_token_type_ids=enc["mm_token_type_ids"],
                                                        image_grid_thw=enc["image_grid_thw"],
                                                        attention_mask=enc["attention_mask"])
                np.testing.assert_array_equal(np.asarray(p.positions), pos[:, 0].numpy())
                assert p.rope_delta == int(delta[0, 0])
                ds = p.deepstack
                assert ds.mask.sum() == len(p.image_features) and len(ds.features) == 2
            else:
                assert p.image_features is None and p.deepstack is None
        with pytest.raises(ValueError, match="placeholder"):
            vis.prepare(_hf(model, proc, *_cases()[2])[0], _photos()[:1], tok)


@pytest.mark.parametrize("grid", [[[1, 12, 12]], [[1, 4, 10], [1, 8, 8]], [[2, 6, 4]]])
def test_position_interpolation_matches_transformers(grid):
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    want_i, want_w = get_vision_interpolation_indices_and_weights(torch.tensor(grid), num_grid_per_side=4,
                                                                  mode="bilinear", align_corners=True,
                                                                  spatial_merge_size=2)
    idx, wts = r3.interpolation_taps(np.array(grid), 4, 2)
    np.testing.assert_array_equal(idx, want_i.numpy())
    np.testing.assert_allclose(wts, want_w.numpy(), atol=1e-7, rtol=0)


# ---------------------------------------------------------------------------------- vision
def test_vision_and_deepstack_features_match_transformers(q3):
    src, model, proc, d, exports = q3
    photos = _photos()
    enc = proc.image_processor(images=photos, return_tensors="pt")
    with torch.no_grad():
        out = model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"])
    ref = torch.cat(out.pooler_output).numpy()
    ref_deep = [torch.cat(x).numpy() for x in out.deepstack_features]
    with fmt.open(exports[16]) as f:
        vis = r3.Qwen3VLVision(f, f.metadata["config"], isa="ref")
        feats, deep = vis.image_features(photos)
    assert _cos(np.concatenate(feats), ref).min() >= 0.9999
    assert len(deep) == len(ref_deep) == 2
    for ours, want in zip(deep, ref_deep):
        assert _cos(np.concatenate(ours), want).min() >= 0.9999


# ------------------------------------------------------------------------------ generation
def _same_weights_model(path, src):
    """transformers with every parameter replaced by what the file holds (experts fused back)."""
    from edgevlm.export.evaluate import dequantized_state_dict
    from edgevlm.export.tm_qwen3vlmoe import fuse_experts

    sd = fuse_experts(dequantized_state_dict(path))
    model = transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(str(src), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(sd[name]).reshape(p.shape))
    return model


def test_logits_and_greedy_generation_match_transformers(q3):
    src, model, proc, d, exports = q3
    same = _same_weights_model(exports[8], src)
    for bits, isa, ref, tol in ((16, None, model, 2e-3), (8, "ref", same, 1e-5)):
        rt = Runtime.load(exports[bits], isa=isa)
        for msgs, images in _cases():
            text, enc = _hf(ref, proc, msgs, images)
            assert rt.format(msgs, len(images)) == text
            with torch.no_grad():
                want = ref(**enc).logits[0].numpy()
                gen = ref.generate(**enc, do_sample=False, max_new_tokens=N_NEW)[0, enc["input_ids"].shape[1]:]
            p = rt.prepare(text, images)
            assert np.abs(rt.logits(p) - want).max() < tol, (bits, len(images))
            assert rt.generate_ids(p, max_tokens=N_NEW) == gen.tolist(), (bits, len(images))


@pytest.mark.parametrize("bits,min_cos", [(8, 0.999), (4, 0.99)])
def test_quantized_logits_stay_within_documented_bounds(q3, bits, min_cos):
    src, model, proc, d, exports = q3
    rt = Runtime.load(exports[bits])
    with fmt.open(exports[bits]) as f:
        r = f.records
        assert r["text.blocks.0.moe.experts.3.down.weight"].qtype == f"q{bits}"
        assert r["text.blocks.0.moe.router.weight"].qtype == "f16"
    for msgs, images in _cases()[:2]:
        text, enc = _hf(model, proc, msgs, images)
        with torch.no_grad():
            want = model(**enc).logits[0].numpy()
        got = rt.logits(rt.prepare(text, images))
        assert _cos(got.reshape(1, -1), want.reshape(1, -1))[0] >= min_cos


def test_runtime_generates_without_torch_and_cli_runs(q3, capsys):
    from PIL import Image

    from edgevlm.cli import main

    src, model, proc, d, exports = q3
    img = d / "img.png"
    Image.fromarray(_photos()[1]).save(img)
    r = generate_without_torch(exports[8], img)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr
    assert main(["run", str(exports[16]), "--image", str(img), "--prompt", "Describe it.", "--max-tokens", "5",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["usage"]["completion_tokens"] <= 5 and out["finish_reason"] in ("length", "stop")
    assert out["text"] == Runtime.load(exports[16]).generate("Describe it.", images=[str(img)], max_tokens=5).text


def test_all_moe_layers_and_tied_head(tmp_path):
    """Every layer sparse (the Qwen3-VL-30B-A3B layout: per-layer "{i}" table rows) and a tied
    LM head: the table, the export and the logits."""
    src = h3.make_qwen3vlmoe(tmp_path / "hf", tie=True, layers=2, seed=1)
    fam = family_for(json.loads((src / "config.json").read_text()))
    mapped, dropped = resolve(fam, _shapes(src))
    keys = {m.key for m in mapped}
    assert {f"text.blocks.{i}.moe.router.weight" for i in range(2)} <= keys
    assert not any(".mlp." in k for k in keys if k.startswith("text."))
    path = _export(src, tmp_path / "f16.evlm", method="rtn", bits=16)
    model = transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(str(src), dtype=torch.float32).eval()
    proc = h3.processor(src)
    rt = Runtime.load(path)
    msgs, images = _cases()[0]
    text, enc = _hf(model, proc, msgs, images)
    with torch.no_grad():
        want = model(**enc).logits[0].numpy()
    assert np.abs(rt.logits(rt.prepare(text, images)) - want).max() < 2e-3
