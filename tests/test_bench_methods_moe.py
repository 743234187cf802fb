"""benchmarks/trained_models.py + bench_speedq.pretrain for the MoE model (trained-moe): the
pretraining moves the LM (routers, experts, attention) and the mergers but not the vision
blocks, its batches mask exactly the padding and image tokens, the held-out prompts are the
training prompt's prefix, and router_stats agrees with transformers' own router logits; plus
methods_report's per-input paired deltas and head_bits keys.  Tiny Qwen3-VL-MoE from
tests/hf_tiny_qwen3vlmoe.py."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_speedq  # noqa: E402
import methods_report as mr  # noqa: E402
import trained_models as tm  # noqa: E402

pytestmark = pytest.mark.torch

SMALL = {"hidden": 64, "layers": 2, "steps": 4, "experts": 4, "top_k": 2}


@pytest.fixture(autouse=True)
def _one_thread(torch_one_thread):
    yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(trained folder, its untrained twin) at :data:`SMALL`'s size."""
    root = tmp_path_factory.mktemp("moe")
    saved = dict(tm.TRAINED["trained-moe"])
    tm.TRAINED["trained-moe"] = SMALL
    try:
        src = tm.build_trained("trained-moe", root)
        fresh = tm._make("trained-moe", root / "fresh")
    finally:
        tm.TRAINED["trained-moe"] = saved
    return src, fresh


def _weights(folder: Path) -> dict:
    from safetensors.numpy import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_pretrain_moves_lm_routers_and_mergers_not_vision_blocks(trained):
    src, fresh = trained
    assert src.name == "trained-moe-h64x2-e4k2-s4" and not src.with_name(src.name + ".part").exists()
    got, init = _weights(src), _weights(fresh)
    assert got.keys() == init.keys()
    moved = {k for k in got if not np.array_equal(got[k], init[k])}
    # AdamW moves every trained weight by ~lr per step; the frozen vision blocks stay bit-identical
    for part in ("mlp.gate.weight", "mlp.experts", "self_attn.q_proj", "visual.merger", "lm_head"):
        assert any(part in k for k in moved), part
    assert not any("visual.blocks" in k or "visual.patch_embed" in k for k in moved)


def test_batches_mask_padding_and_image_tokens(trained):
    from edgevlm.export.calib_data import load_calib

    import json

    src, _ = trained
    cfg = json.loads((src / "config.json").read_text())
    image_id = cfg["image_token_id"]
    calib = load_calib(None, n_images=5, n_texts=3, seed=0)
    batches = bench_speedq.qwen3vlmoe_batches(src, calib, batch_size=4)
    assert [len(b["input_ids"]) for b in batches] == [4, 1, 3]
    merge = cfg["vision_config"]["spatial_merge_size"]
    for b in batches:
        ids, am, lab = b["input_ids"], b["attention_mask"], b["labels"]
        masked = (am == 0) | (ids == image_id)
        assert torch.equal(lab == -100, masked) and torch.equal(lab[~masked], ids[~masked])
        if "pixel_values" in b:   # one image-token run per row, as long as its grid's merged tokens
            assert b["pixel_values"].shape[0] == int(b["image_grid_thw"].prod(-1).sum())
            assert (ids == image_id).sum(1).tolist() == (b["image_grid_thw"].prod(-1) // merge ** 2).tolist()
            assert torch.equal(b["mm_token_type_ids"], (ids == image_id).long())


def test_heldout_prompts_are_the_training_prefix(trained):
    from edgevlm.export.calib_data import load_calib

    src, _ = trained
    calib = load_calib(None, n_images=1, n_texts=1, seed=0)
    train = bench_speedq.qwen3vlmoe_batches(src, calib)[0]["input_ids"][0].tolist()
    image_id = tm._processor(src).image_token_id

    def squeeze(ids):   # image-token runs as one token: held-out views have other grids
        return [t for i, t in enumerate(ids) if t != image_id or i == 0 or ids[i - 1] != image_id]

    inputs = tm.trained_inputs(src, 4, 32, (0, 1, 2))
    for enc in inputs[:2]:
        ids = squeeze(enc["input_ids"][0].tolist())
        assert squeeze(train)[:len(ids)] == ids and image_id in ids
    assert all("pixel_values" not in enc for enc in inputs[2:])


def test_router_stats_match_transformers_router_logits(trained):
    import transformers

    src, _ = trained
    model = transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(str(src), dtype=torch.float32).eval()
    inputs = tm.trained_inputs(src, 4, 32, (0, 1, 2))
    with torch.no_grad():   # a uniform router in layer 1: every token's softmax is 1/E
        model.model.language_model.layers[1].mlp.gate.weight.zero_()
    stats = tm.router_stats(model, inputs, model.config.image_token_id)
    e, k = SMALL["experts"], SMALL["top_k"]
    assert [s["layer"] for s in stats] == [0, 1]
    n_tok = sum(enc["input_ids"].shape[1] for enc in inputs)
    with torch.no_grad():
        ref = [model(**enc, output_router_logits=True, use_cache=False).router_logits for enc in inputs]
    logits0 = torch.cat([r[0].reshape(-1, e) for r in ref]).double()
    image = torch.cat([enc["input_ids"][0] == model.config.image_token_id for enc in inputs])
    top = torch.topk(logits0, k, -1).indices
    want = np.stack([np.bincount(top[~image].ravel(), minlength=e), np.bincount(top[image].ravel(), minlength=e)], 1)
    assert np.array_equal(np.asarray(stats[0]["tokens_text_image"]), want)
    assert np.asarray(stats[0]["tokens_text_image"]).sum() == n_tok * k
    p = torch.softmax(logits0, -1)
    assert stats[0]["top1"] == pytest.approx(float(p.max(-1).values.mean()), rel=1e-9)
    assert 0.0 < stats[0]["token_entropy"] < 1.0 and 0.0 <= stats[0]["modality_tv"] <= 1.0
    # the uniform layer: entropy exactly log E (ratio 1 up to float rounding of the softmax), top-1 1/E
    assert stats[1]["token_entropy"] == pytest.approx(1.0, abs=1e-6)
    assert stats[1]["top1"] == pytest.approx(1.0 / e, abs=1e-7)
    assert len(tm.router_lines("m", stats)) == 2


def test_input_deltas_and_head_keys():
    def row(method, seed, head, le):
        return {"model": "m", "method": method, "bits": 3, "seed": seed, "head_bits": head,
                "layer_err": float(np.mean(le)), "logit_kl": 1.0, "token_agreement": 0.5, "cosine": None,
                "export_s": 1.0, "per_input": {"layer_err": le, "logit_kl": [1.0, 1.0, 1.0],
                                               "token_agreement": [0.5, 0.5, 0.5]}}

    rows = [row("awq", 0, 16, [1.0, 1.0, 1.0]), row("qig", 0, 16, [0.7, 0.8, 0.9]),
            row("awq", 0, None, [1.0, 1.0, 1.0]), row("qig", 0, None, [1.0, 1.0, 1.0])]
    assert len(mr.summarise(rows)) == 4   # the head width is part of the key
    lines = mr.input_deltas(rows)
    # head 16: d = -30, -20, -10 % of awq's mean 1.0 -> mean -20, SE = 10 / sqrt(3), 2 SE = 11.55: resolved
    le16 = next(ln for ln in lines if ln.startswith("- m (head 16) W3 layer_err"))
    assert "seed 0 -20.00 ± 11.55*" in le16 and "3 inputs" in le16
    assert any(ln.startswith("- m W3 layer_err") and "seed 0 +0.00 ± 0.00;" in ln for ln in lines)
    bar = [ln for ln in mr.bars(rows) if "(head 16) W3 layer_err" in ln]
    assert len(bar) == 1 and "PASS" in bar[0]
    # mixed inputs: a sub-line per kind, relative to that kind's baseline mean (image: -30 / 1.0,
    # one input -> no SE; text: d = -20, -10 of mean 1.0 -> -15, sd 7.07, 2 SE = 2 * 7.07 / sqrt(2) = 10)
    for r in rows:
        r["input_kinds"] = ["image", "text", "text"]
    lines = mr.input_deltas(rows)
    i = next(i for i, ln in enumerate(lines) if ln.startswith("- m (head 16) W3 layer_err"))
    assert lines[i + 1] == "  - image prompts (1): seed 0 -30.00 ± 0.00*; mean over seeds -30.00"
    assert lines[i + 2] == "  - text inputs (2): seed 0 -15.00 ± 10.00*; mean over seeds -15.00"
    assert not any(ln.startswith("  -") for ln in lines if "token_agreement" in ln)
