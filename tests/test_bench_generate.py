"""bench_generate.py end to end on the tiny LLaVA (the real models take minutes; see RESULTS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgevlm import _core

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]
KEYS = {"model", "impl", "bits", "threads", "encode_ms", "prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_mb",
        "file_mb", "kv_mb"}


def test_bench_generate_writes_rows_and_results(tmp_path):
    res = tmp_path / "RESULTS.md"
    res.write_text("# Results\n\n## Other section\n\nkept\n")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_generate.py"), "--models", "tiny-llava",
                        "--bits", "4", "--new-tokens", "4", "--threads", "1", "--workdir", str(tmp_path / "w"),
                        "--json", str(tmp_path / "g.json"), "--results", str(res)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "g.json").read_text())
    assert {(x["impl"], x["bits"]) for x in rows} == {("edgevlm", 4), ("transformers", 32)}
    for x in rows:
        assert KEYS <= set(x) and x["decode_tok_s"] > 0 and x["prefill_tok_s"] > 0 and x["new_tokens"] == 4
    e = next(x for x in rows if x["impl"] == "edgevlm")
    # the per-token weight stream is the decoder linears + head: below the file, and GB/s consistent
    assert 0 < e["lm_mb"] < e["file_mb"] and e["isa"] in _core.compiled_isas()
    assert abs(e["decode_gb_s"] - e["lm_mb"] * 2**20 * e["decode_tok_s"] / 1e9) < 1e-6 * (1 + e["decode_gb_s"])
    text = res.read_text()
    assert "## Other section\n\nkept" in text and "## Generation benchmark (bench_generate.py)" in text
    assert "decode q4" in text
