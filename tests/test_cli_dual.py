"""edgevlm classify / embed on the bundled demo model (exported with SHQ 4-bit)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

from edgevlm.cli import main as cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LABELS = "zero,one,two,three,four,five,six,seven,eight,nine"
PROMPT = "a photo of the digit {}"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(demo .evlm, folder of 10 rendered held-out digits named <i>_<label>.png)."""
    import torch
    from sklearn.datasets import load_digits

    from edgevlm.export import ExportConfig
    from edgevlm.export.pipeline import run_export

    d = tmp_path_factory.mktemp("demo")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_export(ROOT / "models" / "demo-clip", d / "demo.evlm",
                   ExportConfig(method="shq", bits=4, n_calib=8, progress=False), log=lambda s: None)
    finally:
        torch.set_num_threads(n)
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from train_demo_clip import render
    finally:
        sys.path.pop(0)
    split = json.loads((ROOT / "models" / "demo-clip" / "demo_split.json").read_text())
    digits = load_digits()
    imgs = d / "imgs"
    imgs.mkdir()
    for i in split["test_indices"][:10]:
        render(digits.images[i]).save(imgs / f"{i:04d}_{digits.target[i]}.png")
    return d / "demo.evlm", imgs


@pytest.mark.parametrize("adapt", [False, True])
def test_classify_stream(demo, adapt, capsys):
    model, imgs = demo
    args = ["classify", str(model), str(imgs), "--labels", LABELS, "--prompt", PROMPT, "--json"]
    assert cli(args + (["--adapt"] if adapt else [])) == 0
    out = json.loads(capsys.readouterr().out)
    preds = out["predictions"]
    assert [Path(p["image"]).name for p in preds] == sorted(p.name for p in imgs.iterdir())
    words = LABELS.split(",")
    correct = sum(p["label"] == words[int(Path(p["image"]).stem.split("_")[1])] for p in preds)
    assert correct >= 8  # the demo model is ~99% accurate on clean held-out digits
    assert sum(out["summary"]["counts"].values()) == 10
    assert ("adapter_bytes" in out["summary"]) == adapt


def test_classify_plain_output_and_glob(demo, capsys):
    model, imgs = demo
    assert cli(["classify", str(model), str(imgs / "*.png"), "--labels", LABELS, "--prompt", PROMPT]) == 0
    cap = capsys.readouterr()
    lines = cap.out.strip().splitlines()
    assert len(lines) == 10 and all(len(x.split("\t")) == 3 for x in lines)
    assert "10 image(s)" in cap.err and "ms/image" in cap.err


def test_embed_formats(demo, tmp_path):
    model, imgs = demo
    first = sorted(imgs.iterdir())[0]
    assert cli(["embed", str(model), "--image", str(first), "-o", str(tmp_path / "i.npy")]) == 0
    e = np.load(tmp_path / "i.npy")
    assert e.shape == (1, 128) and abs(float(np.linalg.norm(e)) - 1) < 1e-5
    assert cli(["embed", str(model), "--image", str(imgs), "--text", "a photo of the digit one", "-o",
                str(tmp_path / "b.npz")]) == 0
    z = np.load(tmp_path / "b.npz")
    assert z["image"].shape == (10, 128) and z["text"].shape == (1, 128)
    assert cli(["embed", str(model), "--text", "a", "b", "-o", str(tmp_path / "t.json")]) == 0
    assert np.asarray(json.loads((tmp_path / "t.json").read_text())["text"]).shape == (2, 128)


def test_bad_cli_input(demo, tmp_path, capsys):
    model, imgs = demo
    cases = [
        (["classify", str(model), str(imgs), "--labels", "one"], "at least two"),
        (["classify", str(model), str(imgs), "--labels", "a,b", "--prompt", "no slot"], "must contain {}"),
        (["classify", str(model), str(tmp_path / "none"), "--labels", "a,b"], "no such file"),
        (["embed", str(model), "-o", str(tmp_path / "x.npy")], "--image PATH"),
        (["embed", str(model), "--text", "a", "-o", str(tmp_path / "x.txt")], "must end in .npy"),
        (["embed", str(model), "--text", "a", "--image", str(imgs), "-o", str(tmp_path / "x.npy")], "one array"),
    ]
    (tmp_path / "empty").mkdir()
    cases.append((["classify", str(model), str(tmp_path / "empty"), "--labels", "a,b"], "no images"))
    for args, msg in cases:
        assert cli(args) == 2, args
        assert msg in capsys.readouterr().err, args
