"""benchmarks/bench_tta_memory.py + benchmarks/tpt_baseline.py on a tiny random CLIP (2 images).

Checks that the TPT baseline is real (its text path reproduces CLIPModel's EOS-pooled text
features, and one step backpropagates into the context vectors), and that the benchmark's
subprocess workers return the documented rows, ratio lines and markdown section.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import hf_tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # bench_quality (the shared section writer)
CLASSES = ["cat", "dog", "house"]


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod          # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return hf_tiny.make_clip(tmp_path_factory.mktemp("tta_mem") / "clip")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8), np.array([0, 1])


def _tpt(tiny, pad="max_length", **kw):
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    tb = _load("tpt_baseline")
    model = CLIPModel.from_pretrained(tiny)
    tok = AutoTokenizer.from_pretrained(tiny)
    return tb, model, tok, tb.TPT(model, tok, CLIPImageProcessorPil.from_pretrained(tiny), CLASSES,
                                   tb.TPTConfig(pad=pad, **kw))


@pytest.mark.parametrize("pad", ["max_length", "longest"])
def test_tpt_text_path_matches_clip(tiny, pad):
    # with ctx = the init tokens' embeddings, the injected path must be CLIP's own text features
    # (same EOS row pooled), whatever the padding
    _, model, tok, tpt = _tpt(tiny, pad)
    # one context vector per token of "a photo of a" (4 with CLIP's BPE; more with the tiny vocab)
    assert tpt.n_ctx == len(tok("a photo of a", add_special_tokens=False)["input_ids"]) >= 4
    assert tpt.ctx.requires_grad
    with torch.no_grad():
        ref = model.get_text_features(**tok([f"a photo of a {c}" for c in CLASSES], padding=True,
                                             return_tensors="pt"))
        ref = ref.pooler_output if hasattr(ref, "pooler_output") else ref
        ref = ref / ref.norm(dim=-1, keepdim=True)
        got = tpt.text_features()
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-5)
    if pad == "max_length":
        assert tpt.ids.shape[1] == model.config.text_config.max_position_embeddings


def test_tpt_step_backpropagates_and_resets(tiny, images):
    _, model, _, tpt = _tpt(tiny, n_views=8)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    feats = tpt.image_features(tpt.views(images[0][0]))
    assert feats.shape == (8, model.config.projection_dim)
    logits = tpt.step(feats)
    assert logits.shape == (8, len(CLASSES))
    assert tpt.ctx.grad is not None and float(tpt.ctx.grad.abs().max()) > 0
    assert float((tpt.ctx.detach() - tpt.ctx_init).abs().max()) > 1e-4      # AdamW moved ctx
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters())  # CLIP stays frozen
    tpt.reset()
    assert torch.equal(tpt.ctx.detach(), tpt.ctx_init) and not tpt.opt.state


def test_avg_entropy_and_selection():
    tb = _load("tpt_baseline")
    logits = torch.tensor([[10.0, 0.0], [0.0, 0.0], [0.0, 10.0]])
    assert tb.select_confident(logits, 0.34).tolist() in ([0], [2])
    # mean of one-hot-ish predictions for different classes: entropy of (0.5, 0.5) = ln 2
    assert abs(float(tb.avg_entropy(logits[[0, 2]])) - np.log(2)) < 1e-3
    assert float(tb.avg_entropy(logits[[0]])) < 1e-3


def test_bench_rows_ratios_and_section(tiny, images, tmp_path):
    from edgevlm.export import ExportConfig, export

    bm = _load("bench_tta_memory")
    # RTN keeps the test fast; the benchmark itself exports with SHQ (same runtime, same layout)
    evlm = tmp_path / "tiny.evlm"
    export(tiny, evlm, ExportConfig(method="rtn", bits=4))
    npz = tmp_path / "images.npz"
    np.savez(npz, images=images[0], labels=images[1])
    args = bm.parse_args(["--threads", "1", "--pad", "longest", "--views", "16"])
    rows = bm.bench_model("tiny", tiny, evlm, npz, CLASSES, args)
    assert [r["method"] for r in rows] == ["edgevlm-q4+qtta", "tpt-fp32"]
    for r in rows:
        assert set(bm.FIELDS) <= set(r)
        assert r["model"] == "tiny" and r["n_images"] == 2 and r["classes"] == len(CLASSES)
        assert r["peak_rss_mb"] >= r["base_rss_mb"] > 0 and r["ms_per_image"] > 0 and r["adapt_state_bytes"] > 0
    q, t = rows
    from edgevlm.adapt import QTTA

    assert q["adapt_state_bytes"] == QTTA.bytes_for(len(CLASSES), 64)   # projection_dim of make_clip
    assert t["ctx_delta"] > 0                                           # the worker's TPT really stepped
    assert t["saved_activation_bytes"] > 0 and t["n_views"] == 16 and t["n_ctx"] >= 4
    ratios = bm.ratio_lines(rows)
    assert {r["verdict"] for r in ratios} <= {"PASS", "MISS"}
    head = ratios[0]
    assert head["ratio"] == pytest.approx(t["peak_rss_mb"] / q["peak_rss_mb"])
    assert head["verdict"] == ("PASS" if head["ratio"] >= bm.BAR else "MISS")
    # the section writer replaces only its own section
    md = tmp_path / "R.md"
    md.write_text("# R\n\n## Other\n\nkeep me\n")
    res = {"rows": rows, "ratios": ratios, "machine": bm.machine(), "args": vars(args), "command": "cmd",
           "seconds": 1.0}
    from bench_quality import write_section  # the shared section writer the script uses

    write_section(md, bm.section_lines(res), bm.SECTION)
    write_section(md, bm.section_lines(res), bm.SECTION)
    text = md.read_text()
    assert text.count(bm.SECTION) == 1 and "keep me" in text and "| tiny | tpt-fp32 |" in text
    json.dumps(res)
