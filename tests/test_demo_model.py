"""The bundled demo model (models/demo-clip, trained by tools/train_demo_clip.py).

It must load as an ordinary Hugging Face CLIP folder, stay small, classify held-out digits
zero-shot from the text prompt, and export like any hub model.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "demo-clip"
MAX_BYTES = 5_500_000        # whole folder
MIN_ACCURACY = 0.93          # measured 0.980 on these 200 digits (0.988 on all 597 held-out ones)
N_EVAL = 200

pytest.importorskip("transformers")
pytest.importorskip("sklearn")


def _trainer():
    spec = importlib.util.spec_from_file_location("train_demo_clip", ROOT / "tools" / "train_demo_clip.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def loaded():
    import torch
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    torch.set_num_threads(2)
    model = CLIPModel.from_pretrained(MODEL, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(MODEL), CLIPImageProcessorPil.from_pretrained(MODEL)


def test_folder_is_a_small_hf_clip_folder():
    names = {p.name for p in MODEL.iterdir()}
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "preprocessor_config.json", "demo_split.json", "README.md"):
        assert f in names, f
    size = sum(p.stat().st_size for p in MODEL.iterdir() if p.is_file())
    assert size <= MAX_BYTES, size
    cfg = json.loads((MODEL / "config.json").read_text())
    assert cfg["architectures"] == ["CLIPModel"]
    assert cfg["text_config"]["eos_token_id"] != 2  # 2 would select transformers' legacy argmax pooling
    for tower in ("text_config", "vision_config"):
        c = cfg[tower]
        assert c["hidden_size"] % 32 == 0 and c["intermediate_size"] % 32 == 0, tower


def test_tokenizer_and_processor_match_the_model(loaded):
    model, tok, proc = loaded
    cfg = model.config.text_config
    ids = tok("a photo of the digit seven")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id == cfg.eos_token_id
    assert tok.unk_token_id not in ids
    assert len(tok) == cfg.vocab_size
    assert proc.crop_size["height"] == proc.crop_size["width"] == model.config.vision_config.image_size


def test_zero_shot_accuracy_on_held_out_digits(loaded):
    import torch
    from sklearn.datasets import load_digits

    model, tok, proc = loaded
    tr = _trainer()
    split = json.loads((MODEL / "demo_split.json").read_text())
    test = np.asarray(split["test_indices"][:N_EVAL])
    digits = load_digits()
    assert len(set(split["test_indices"])) == split["n_test"] == 1797 - split["n_train"]
    images = [tr.render(digits.images[i]) for i in test]
    pv = torch.from_numpy(proc(images=images, return_tensors="np")["pixel_values"])
    prompts = [split["prompt"].format(w) for w in split["labels"]]
    with torch.no_grad():
        enc = tok(prompts, padding=True, return_tensors="pt")
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pv)
    pred = out.logits_per_image.argmax(1).numpy()
    acc = float((pred == digits.target[test]).mean())
    assert acc >= MIN_ACCURACY, acc


def test_exports_like_a_hub_model(tmp_path):
    from edgevlm.export import ExportConfig
    from edgevlm.export.pipeline import run_export

    out = tmp_path / "x.evlm"
    rep = run_export(MODEL, out, ExportConfig(method="shq", bits=4, n_calib=8, progress=False), log=lambda s: None)
    assert out.is_file() and out.stat().st_size == rep.file_bytes
    assert rep.file_bytes < MODEL.joinpath("model.safetensors").stat().st_size / 2
