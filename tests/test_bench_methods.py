"""benchmarks/bench_methods.py: the trained-llava model (built once, cached, pretrained) and its
held-out inputs (the training prompt format; texts outside every calibration draw), and the
bench's method variants (valid ExportConfig options).  Tiny LLaVA from tests/hf_tiny.py."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_methods as bm  # noqa: E402
import hf_tiny  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture(autouse=True)
def _one_thread(torch_one_thread):
    yield


def _weights(folder: Path) -> dict:
    from safetensors.numpy import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_build_trained_pretrains_once_and_reuses(tmp_path, monkeypatch):
    monkeypatch.setitem(bm.TRAINED, "trained-llava", {"hidden": 64, "layers": 1, "steps": 3})
    stale = tmp_path / "trained-llava-h64x1-s3.part"   # an interrupted earlier build: not a cached model
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    src = bm.build("trained-llava", tmp_path)
    assert src.name == "trained-llava-h64x1-s3" and not stale.exists()
    fresh = hf_tiny.make_llava(tmp_path / "fresh", vision="clip", text="qwen2", hidden=64, intermediate=128,
                               text_layers=1, heads=4, kv_heads=2)
    got, init = _weights(src), _weights(fresh)
    assert got.keys() == init.keys()
    # pretraining moved the LM (AdamW: every step moves each trained weight by ~lr) but not the
    # frozen vision tower
    moved = [k for k in got if not np.array_equal(got[k], init[k])]
    assert any("language_model" in k for k in moved) and not any("vision_tower" in k for k in moved)
    stamp = [(f.name, f.stat().st_mtime_ns) for f in sorted(src.iterdir())]
    assert bm.build("trained-llava", tmp_path) == src
    assert [(f.name, f.stat().st_mtime_ns) for f in sorted(src.iterdir())] == stamp   # reused, not rebuilt


def test_trained_inputs_match_training_prompts_and_avoid_calibration(tmp_path):
    from edgevlm.export.calib_data import builtin_dir, load_calib
    from edgevlm.export.recipes import _llava_prompts, tokenizer
    from edgevlm.export.source import open_source

    src = hf_tiny.make_llava(tmp_path / "m", vision="clip", text="qwen2")
    n_calib, seeds = 32, (0, 1, 2)
    inputs = bm.trained_inputs(src, 6, n_calib, seeds)
    assert len(inputs) == 6
    images, texts = inputs[:3], inputs[3:]
    # image prompts: the exact token prefix of the recipe's calibration/training prompt (image
    # tokens expanded), up to the assistant turn
    source = open_source(src)
    tok = tokenizer(source)
    cal = load_calib(None, n_images=1, n_texts=1, seed=0)
    train = _llava_prompts(source, tok, cal, source.config["image_token_index"], source.config["image_seq_length"])[0]
    for enc in images:
        ids = enc["input_ids"][0].tolist()
        assert enc["pixel_values"].shape[0] == 1 and train[:len(ids)] == ids and len(train) > len(ids)
    # text prompts: half (at least 4 tokens) of a sentences.txt line that no seed's draw holds
    used = set().union(*(load_calib(None, n_images=n_calib, n_texts=n_calib, seed=s).texts for s in seeds))
    lines = [ln.strip() for ln in (builtin_dir() / "sentences.txt").read_text().splitlines() if ln.strip()]
    for enc in texts:
        ids = enc["input_ids"][0].tolist()
        src_lines = [t for t in lines if tok(t)["input_ids"][:len(ids)] == ids]
        assert src_lines and any(t not in used for t in src_lines)
        assert len(ids) == max(4, len(tok(src_lines[0])["input_ids"]) // 2)
        assert enc["attention_mask"].shape == enc["input_ids"].shape


def test_variants_are_valid_export_options():
    from edgevlm.export import ExportConfig

    for label, (method, extra) in bm.VARIANTS.items():
        cfg = ExportConfig(method=method, bits=4, **extra)
        assert cfg.method.value == method and label in bm.DENSE_METHODS and label in bm.MOE_METHODS
