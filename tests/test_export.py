"""Exporter: HF folders of every supported family -> .evlm, methods x widths, SHQ budgets,
layer-by-layer calibration, bad input.  Tiny random models are built in the tests (hf_tiny)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import hf_tiny  # noqa: E402

from edgevlm import format as fmt  # noqa: E402
from edgevlm.cli import main as cli_main  # noqa: E402
from edgevlm.export import ExportConfig  # noqa: E402
from edgevlm.export.evaluate import load_into_model, record_f32  # noqa: E402
from edgevlm.export.golden import write_golden  # noqa: E402
from edgevlm.export.pipeline import run_export  # noqa: E402

pytestmark = pytest.mark.torch
QUIET = dict(progress=False)


@pytest.fixture(autouse=True)
def _one_thread(torch_one_thread):
    yield


def _export(src, out, **kw):
    kw = {"n_calib": 8, **QUIET, **kw}
    return run_export(src, out, ExportConfig(**kw), keep_fake_quant=True, log=lambda s: None)


def _build(kind: str, d: Path, **kw) -> Path:
    if kind == "clip":
        return hf_tiny.make_clip(d, **kw)
    if kind == "siglip":
        return hf_tiny.make_siglip(d, **kw)
    if kind == "bert":
        return hf_tiny.make_bert(d, **kw)
    vision, text = kind.split("-")
    return hf_tiny.make_llava(d, vision=vision, text=text, **kw)


def _cos(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _outputs(kind: str, model, g) -> dict[str, np.ndarray]:
    """Run a (reloaded) transformers model on a golden file's inputs."""
    with torch.no_grad():
        if kind in ("clip", "siglip"):
            kw = {"input_ids": torch.from_numpy(g["input_ids"]), "pixel_values": torch.from_numpy(g["pixel_values"])}
            if "attention_mask" in g:
                kw["attention_mask"] = torch.from_numpy(g["attention_mask"])
            o = model(**kw)
            return {"image_embeds": o.image_embeds.numpy(), "text_embeds": o.text_embeds.numpy()}
        if kind == "bert":
            kw = {k: torch.from_numpy(g[k]) for k in ("input_ids", "attention_mask", "token_type_ids") if k in g}
            return {"last_hidden_state": model(**kw).last_hidden_state.numpy()}
        out = {}
        for i in range(int(g["num_pairs"])):
            o = model(input_ids=torch.from_numpy(g[f"input_ids_{i}"]), pixel_values=torch.from_numpy(g[f"pixel_values_{i}"]))
            out[f"logits_{i}"] = o.logits[0].numpy()
        return out


FAMILIES = ["clip", "siglip", "bert", "clip-llama", "siglip-qwen2", "clip-qwen2", "siglip-llama"]


@pytest.mark.parametrize("kind", FAMILIES)
def test_family_round_trip_fp16(kind, tmp_path):
    """bits=16 (everything float16): the file's weights, loaded back into transformers, reproduce
    the golden fp32 outputs; the metadata carries config, preprocessing, tokenizer, template."""
    src = _build(kind, tmp_path / "m")
    golden = write_golden(src, tmp_path / "golden.npz")
    rep = _export(src, tmp_path / "m.evlm", method="rtn", bits=16)
    with fmt.open(rep.path, verify=True) as f:
        md = f.metadata
        assert md["config"] == json.loads((src / "config.json").read_text())
        assert bytes(f["tokenizer.json"]) == (src / "tokenizer.json").read_bytes()
        if kind != "bert":
            assert md["preprocess"] == json.loads((src / "preprocessor_config.json").read_text())
        if "-" in kind:
            assert md["tokenizer"]["chat_template"] and "<image>" in md["tokenizer"]["chat_template"]
        assert {r.qtype for r in f.records.values()} <= {"f16", "f32", "u8"}
        for name, r in f.records.items():
            assert name == "tokenizer.json" or r.extra["src"]
    g = np.load(golden)
    model = load_into_model(rep.path, src)
    got = _outputs(kind, model, g)
    for k, v in got.items():
        ref = g[k] if k in g else None
        assert ref is not None, k
        assert _cos(v, ref) >= 0.9999, (k, _cos(v, ref))


@pytest.mark.parametrize("method", ["rtn", "gptq", "shq"])
@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_file_holds_the_methods_fake_quant_weights(method, bits, tmp_path, clip_dir):
    rep = _export(clip_dir, tmp_path / "m.evlm", method=method, bits=bits)
    qts = set()
    with fmt.open(rep.path) as f:
        for name, rec in f.records.items():
            if name == "tokenizer.json":
                continue
            if rec.quantized:
                qts.add(rec.qtype)
            assert np.array_equal(record_f32(f, name), rep.fake_quant[name]), name
    want = {8: "q8", 4: "q4", 3: "q3", 2: "q2"}[bits]
    assert want in qts
    if method == "shq" and bits < 8:  # text tower at 8 bits, vision at `bits`, some kept
        assert rep.rows and any(r.kept for r in rep.rows)
        for r in rep.rows:
            if r.kind == "linear" and r.tower == "text":
                assert r.target.qtype == "q8"


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return hf_tiny.make_clip(tmp_path_factory.mktemp("clip") / "m", layers=3, hidden=128, intermediate=256)


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_gptq_output_error_below_rtn(bits, tmp_path, clip_dir):
    """GPTQ minimises the layer-output error on the calibration inputs: on block 0 (identical
    inputs for both methods) every linear beats RTN, and the mean over all layers is lower."""
    r = {m: _export(clip_dir, tmp_path / f"{m}.evlm", method=m, bits=bits, text_bits=bits, n_calib=16)
         for m in ("rtn", "gptq")}
    rows = {m: {x.key: x.error for x in rep.rows if x.kind == "linear"} for m, rep in r.items()}
    for key, e in rows["gptq"].items():
        if ".blocks.0." in key:
            assert e < rows["rtn"][key], (key, e, rows["rtn"][key])
    assert np.mean(list(rows["gptq"].values())) < np.mean(list(rows["rtn"].values()))


def test_clip_search_not_worse_than_plain_rtn(tmp_path, clip_dir):
    plain = _export(clip_dir, tmp_path / "a.evlm", method="rtn", bits=3)
    clip = _export(clip_dir, tmp_path / "b.evlm", method="rtn", bits=3, clip_search=True)
    e0 = {x.key: x.error for x in plain.rows if x.kind == "linear" and ".blocks.0." in x.key}
    e1 = {x.key: x.error for x in clip.rows if x.kind == "linear" and ".blocks.0." in x.key}
    assert all(x.method == "rtn+clip" for x in clip.rows if x.kind == "linear")
    assert np.mean(list(e1.values())) <= np.mean(list(e0.values()))


# ------------------------------------------------------------------------------------------------
def test_shq_budget(tmp_path, clip_dir):
    base = _export(clip_dir, tmp_path / "base.evlm", method="shq", bits=4, keep_frac=0.0)
    assert not any(r.kept for r in base.rows)
    default = _export(clip_dir, tmp_path / "def.evlm", method="shq", bits=4)  # keep_frac 0.1
    n_vision = sum(r.kind == "linear" and r.tower == "vision" for r in default.rows)
    kept = [r for r in default.rows if r.kept]
    assert len(kept) == int(np.ceil(0.1 * n_vision))
    # kept layers are the most sensitive ones
    sens = sorted((r.sensitivity for r in default.rows if r.sensitivity is not None), reverse=True)
    assert sorted(r.sensitivity for r in kept) == sorted(sens[:len(kept)])
    lo = base.bits_per_param
    budgets = [lo + 0.05, lo + 0.4, lo + 5]
    reps = [_export(clip_dir, tmp_path / f"b{i}.evlm", method="shq", bits=4, budget_bits=b)
            for i, b in enumerate(budgets)]
    n_kept = [sum(r.kept for r in rep.rows) for rep in reps]
    for rep, b in zip(reps, budgets):
        assert rep.bits_per_param <= b
    assert n_kept[0] <= n_kept[1] <= n_kept[2] == n_vision and n_kept[1] > 0
    mb = _export(clip_dir, tmp_path / "mb.evlm", method="shq", bits=4, budget_mb=reps[1].bits_per_param
                 * reps[1].n_params / 8 / 1e6)
    assert sum(r.kept for r in mb.rows) == n_kept[1]
    with fmt.open(reps[1].path) as f:
        kept_keys = f.metadata["quantization"]["shq_kept"]
        assert len(kept_keys) == n_kept[1]
        assert all(f.records[k].qtype == "q8" for k in kept_keys)


def test_shq_budget_that_cannot_be_met(tmp_path, clip_dir):
    out = tmp_path / "x.evlm"
    with pytest.raises(ValueError, match="budget cannot be met.*raise --budget-bits"):
        _export(clip_dir, out, method="shq", bits=4, budget_bits=2.0)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
def test_llava_hub_layout_and_tied_head(tmp_path):
    a = _export(hf_tiny.make_llava(tmp_path / "a", vision="clip", text="llama"), tmp_path / "a.evlm",
                method="gptq", bits=4)
    b = _export(hf_tiny.make_llava(tmp_path / "b", vision="clip", text="llama", hub_layout=True),
                tmp_path / "b.evlm", method="gptq", bits=4)
    assert a.fake_quant.keys() == b.fake_quant.keys()
    for k in a.fake_quant:
        assert np.array_equal(a.fake_quant[k], b.fake_quant[k]), k
    with fmt.open(a.path) as f:
        assert "lm_head.weight" in f and f.records["lm_head.weight"].qtype == "q4"
        assert f.records["projector.fc1.weight"].qtype == "q4"
        assert f.records["text.embed.tok"].qtype == "q8"
        dropped = f.metadata["dropped"]
        # CLIP vision_feature_layer=-2 of 2 layers: block 1 and post_layernorm are never read
        assert any("encoder.layers.1." in k for k in dropped) and "vision.blocks.1.attn.q.weight" not in f
    t = _export(hf_tiny.make_llava(tmp_path / "t", vision="siglip", text="qwen2", tie=True), tmp_path / "t.evlm",
                method="rtn", bits=4)
    with fmt.open(t.path) as f:  # tied: the head is packed apart from the 8-bit table, from its tensor
        assert "text.blocks.0.attn.q.bias" in f
        head, tok = f.records["lm_head.weight"], f.records["text.embed.tok"]
        assert (head.qtype, tok.qtype) == ("q4", "q8") and head.extra["src"] == tok.extra["src"]
        assert head.extra["param"] == "lm_head.weight" and "lm_head.weight" not in f.metadata["dropped"]
    t8 = _export(hf_tiny.make_llava(tmp_path / "t", vision="siglip", text="qwen2", tie=True), tmp_path / "t8.evlm",
                 method="rtn", bits=8)
    with fmt.open(t8.path) as f:  # not narrower than the table: the runtime uses the table as the head
        assert "lm_head.weight" not in f and f.records["text.embed.tok"].qtype == "q8"


def test_embed_bits_default_and_override(tmp_path, clip_dir, capsys):
    """Token tables: float16 by default in 8-bit exports (a lookup; its 8-bit rounding alone costs
    tiny-CLIP text the 0.9999 parity bar), q8 below 8 bits and with --embed-bits 8; a table a tied
    LM head shares stays q8 at 8 bits (stored once and read as the head, as the tied-head test
    above checks) unless asked for 16, which stores the 8-bit head apart."""
    def tok(path):
        with fmt.open(path) as f:
            return f.records["text.embed.tok"].qtype, f.metadata["quantization"]["embed_bits"]

    assert tok(_export(clip_dir, tmp_path / "d8.evlm", method="rtn", bits=8).path) == ("f16", 16)
    assert tok(_export(clip_dir, tmp_path / "d4.evlm", method="rtn", bits=4).path) == ("q8", 8)
    assert tok(_export(clip_dir, tmp_path / "s4.evlm", method="shq", bits=4, n_calib=4).path) == ("q8", 8)
    out = tmp_path / "e8.evlm"
    assert cli_main(["export", str(clip_dir), "-o", str(out), "--method", "rtn", "--bits", "8", "--embed-bits", "8",
                     "--n-calib", "4", "--quiet"]) == 0
    assert tok(out) == ("q8", 8)
    capsys.readouterr()
    t = _export(hf_tiny.make_llava(tmp_path / "t", vision="siglip", text="qwen2", tie=True), tmp_path / "t16.evlm",
                method="rtn", bits=8, embed_bits=16)
    with fmt.open(t.path) as f:
        head, table = f.records["lm_head.weight"], f.records["text.embed.tok"]
        assert (head.qtype, table.qtype) == ("q8", "f16") and head.extra["src"] == table.extra["src"]
        assert f.metadata["quantization"]["embed_bits"] == 16
    with pytest.raises(ValueError, match="embed_bits must be one of 8, 16, got 4"):
        ExportConfig(embed_bits=4)
    with pytest.raises(ValueError, match="speedq fixes the embedding table"):
        ExportConfig(method="speedq", bits=2, embed_bits=8)


def test_cli_export_and_info(tmp_path, clip_dir, capsys):
    out = tmp_path / "c.evlm"
    rc = cli_main(["export", str(clip_dir), "-o", str(out), "--method", "gptq", "--bits", "3", "--n-calib", "4",
                   "--quiet"])
    assert rc == 0 and out.is_file()
    err = capsys.readouterr().err
    assert "vision.blocks.0.attn.q.weight" in err and "bits/param" in err
    assert cli_main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "q3" in info and "CLIPModel" in info


# ------------------------------------------------------------------------------------------------
def _bad(tmp_path, src, match, **kw):
    out = tmp_path / "out" / "x.evlm"
    with pytest.raises(ValueError, match=match):
        _export(src, out, **kw)
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_bad_inputs(tmp_path, clip_dir):
    _bad(tmp_path, tmp_path / "nope", "no such file or directory")
    (tmp_path / "empty").mkdir()
    _bad(tmp_path, tmp_path / "empty", "no config.json")
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    _bad(tmp_path, d, "unsupported architecture GPT2LMHeadModel.*supports CLIPModel")
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text((clip_dir / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"x")
    _bad(tmp_path, d, "no \\*.safetensors.*pytorch_model.bin.*never unpickles")
    (d / "config.json").write_text("{not json")
    _bad(tmp_path, d, "config.json is not valid JSON")


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        if p.is_file():
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_checkpoint_that_does_not_match_the_table(tmp_path, clip_dir):
    from safetensors.numpy import load_file, save_file

    sd = load_file(clip_dir / "model.safetensors")
    d = _copy_model(clip_dir, tmp_path / "extra")
    save_file({**sd, "vision_model.surprise.weight": np.zeros((4, 4), np.float32)}, d / "model.safetensors")
    _bad(tmp_path, d, "does not map: vision_model.surprise.weight")
    d = _copy_model(clip_dir, tmp_path / "missing")
    save_file({k: v for k, v in sd.items() if k != "text_projection.weight"}, d / "model.safetensors")
    _bad(tmp_path, d, "missing from the checkpoint: text_projection.weight")
    d = _copy_model(clip_dir, tmp_path / "shape")
    save_file({**sd, "visual_projection.weight": np.zeros((3, 3), np.float32)}, d / "model.safetensors")
    _bad(tmp_path, d, "shape mismatch.*visual_projection.weight: expected")
    d = _copy_model(clip_dir, tmp_path / "nopre")
    (d / "preprocessor_config.json").unlink()
    _bad(tmp_path, d, "no preprocessor_config.json")
    d = _copy_model(clip_dir, tmp_path / "trunc")
    (d / "model.safetensors").write_bytes((clip_dir / "model.safetensors").read_bytes()[:5000])
    _bad(tmp_path, d, "truncated")


def test_bad_config_values():
    with pytest.raises(ValueError, match="bits must be one of 2, 3, 4, 8, 16, got 5"):
        ExportConfig(bits=5)
    with pytest.raises(ValueError, match="group must be one of 32, 64, 128, got 100"):
        ExportConfig(group=100)
    with pytest.raises(ValueError, match="method must be one of rtn, gptq, shq, awq, qig, .*, got 'magic'"):
        ExportConfig(method="magic")
    with pytest.raises(ValueError, match="needs method=shq"):
        ExportConfig(method="gptq", budget_bits=4)
    with pytest.raises(ValueError, match="not both"):
        ExportConfig(budget_bits=4, budget_mb=1)


def test_cli_bad_flags(tmp_path, clip_dir, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["export", str(clip_dir), "-o", str(tmp_path / "x.evlm"), "--bits", "5"])
    assert e.value.code == 2 and "invalid choice: 5" in capsys.readouterr().err
    assert cli_main(["export", str(tmp_path / "nope"), "-o", str(tmp_path / "x.evlm"), "-q"]) == 2
    assert "no such file or directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
_PEAK = """
import sys, torch
torch.set_num_threads(1)
from edgevlm.export import ExportConfig
from edgevlm.export.pipeline import run_export
rep = run_export(sys.argv[1], sys.argv[2], ExportConfig(method="rtn", bits=4, n_calib=8, progress=False),
                 log=lambda s: None)
print(rep.calib_peak_rss_mb)
"""


@pytest.mark.slow
def test_calibration_memory_does_not_grow_with_layers(tmp_path):
    """Doubling the layer count of a model whose weights are large next to the calibration
    activations leaves the calibration peak RSS flat (one block in memory at a time)."""
    peaks, weights_mb = [], []
    for layers in (4, 8):
        src = hf_tiny.make_bert(tmp_path / f"b{layers}", layers=layers, hidden=768, heads=12, intermediate=3072)
        weights_mb.append((src / "model.safetensors").stat().st_size / 2**20)
        r = subprocess.run([sys.executable, "-c", _PEAK, str(src), str(tmp_path / f"b{layers}.evlm")],
                           capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True)
        peaks.append(float(r.stdout.strip().splitlines()[-1]))
    added = weights_mb[1] - weights_mb[0]  # ~113 MB of extra fp32 weights
    assert added > 100
    assert peaks[1] - peaks[0] < 0.25 * added, (peaks, weights_mb)
