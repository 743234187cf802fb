"""ONNX Runtime on an ``edgevlm export-onnx`` graph vs the edgevlm runtime, same .evlm, batch 1.

    .venv/bin/python benchmarks/bench_onnx.py --results benchmarks/RESULTS.md
    .venv/bin/python benchmarks/bench_onnx.py --evlm model.evlm --threads 2 --runs 100

The .evlm (default: build/demo/demo-clip-shq4.evlm, which ``make demo`` writes: models/demo-clip,
SHQ 4-bit vision / 8-bit text) is exported to ONNX per tower and accuracy level; each image /
text is one call at batch 1 (pixel_values already preprocessed: random normal values, speed does
not depend on them; one tokenized prompt). Reported: median (and min) ms per call over --runs after 10
warm-up calls (engines interleaved call by call, so load from other processes hits all alike), for the edgevlm runtime (``encode_pixels`` / ``encode_tokens``, default kernels) and
ORT (CPU provider, intra-op threads = --threads, all graph optimizations), plus each ORT
output's cosine to the runtime's and the file sizes.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## ONNX export (bench_onnx.py)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--evlm", default=str(ROOT / "build" / "demo" / "demo-clip-shq4.evlm"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--results", default=None, help="markdown file to write this script's section into")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))  # numpy's BLAS (the runtime's dense parts)
    import numpy as np
    import onnxruntime as ort

    from edgevlm.interop.onnx_export import OnnxExportConfig, export_onnx
    from edgevlm.runtime import load_dual, set_num_threads

    evlm = Path(a.evlm)
    if not evlm.exists():
        raise SystemExit(f"{evlm} not found: run `make demo` (it exports models/demo-clip) or pass --evlm")
    set_num_threads(a.threads)
    enc = load_dual(evlm)
    s = enc.vision.image_size
    px = np.random.default_rng(0).standard_normal((1, 3, s, s)).astype(np.float32)
    ids, mask = enc.tokenize(["a photo of the digit seven"])
    feeds = {"vision": {"pixel_values": px}, "text": {"input_ids": ids.astype(np.int64)}}
    if enc.family == "clip":
        feeds["text"]["attention_mask"] = mask.astype(np.int64)
    ref = {"vision": lambda: enc.encode_pixels(px, normalize=False),
           "text": lambda: enc.encode_tokens(ids, mask if enc.family == "clip" else None, normalize=False)}

    def timed(fns: list) -> list[tuple[float, float]]:
        """(median, min) ms per call of each fn, the calls interleaved (fn 0, fn 1, ..., fn 0, ...) so that
        load from other processes falls on every engine alike."""
        for _ in range(10):
            for fn in fns:
                fn()
        ts = np.zeros((a.runs, len(fns)))
        for r in range(a.runs):
            for i, fn in enumerate(fns):
                t = time.perf_counter()
                fn()
                ts[r, i] = time.perf_counter() - t
        return [(1e3 * float(m), 1e3 * float(b)) for m, b in zip(np.median(ts, axis=0), ts.min(axis=0), strict=True)]

    rows = []
    with tempfile.TemporaryDirectory() as td:
        for tower in ("vision", "text"):
            want = ref[tower]()
            found = [(tower, "edgevlm runtime", "-", ref[tower], 1.0, evlm.stat().st_size)]
            for level in (4, 0):
                rep = export_onnx(evlm, Path(td) / f"{tower}{level}.onnx", OnnxExportConfig(tower=tower,
                                                                                            accuracy_level=level))
                so = ort.SessionOptions()
                so.intra_op_num_threads = a.threads
                so.inter_op_num_threads = 1
                so.log_severity_level = 3
                sess = ort.InferenceSession(str(rep.path), so, providers=["CPUExecutionProvider"])
                out = f"{'image' if tower == 'vision' else 'text'}_features"
                got = sess.run([out], feeds[tower])[0]
                cos = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
                found.append((tower, "onnxruntime", str(level), lambda s_=sess, o=out, f=feeds[tower]: s_.run([o], f),
                              cos, rep.file_bytes))
            ms = timed([r[3] for r in found])
            rows += [(t, e, lv, m, c, b) for (t, e, lv, _, c, b), m in zip(found, ms, strict=True)]
    lines = [SECTION, "",
             f"Written by `benchmarks/bench_onnx.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
             f"{a.threads} thread(s) for both; load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
             "(shared machine: times are indicative)",
             f"- versions: python {platform.python_version()}, numpy {np.__version__}, onnxruntime {ort.__version__}",
             f"- model: `{evlm.relative_to(ROOT) if evlm.is_relative_to(ROOT) else evlm}` ({enc.family}, "
             f"{enc.vision.image_size} px); batch 1, median of {a.runs} calls after 10 warm-up calls, engines interleaved call by call; pixel_values "
             "random normal (preprocessing not timed), one tokenized prompt",
             "- command: `.venv/bin/python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]) + "`", "",
             "| tower | engine | MatMulNBits accuracy_level | median ms per call | min ms | cosine to runtime | "
             "file bytes |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {t} | {e} | {lv} | {ms[0]:.3f} | {ms[1]:.3f} | {c:.6f} | {b:,} |" for t, e, lv, ms, c, b in rows]
    lines += ["", "The ONNX file holds one tower; the .evlm both. accuracy_level 4 = int8 activations per block "
              "(ORT's fast CPU path), 0 = float32."]
    print("\n".join(lines))
    if a.results:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_quality import write_section

        write_section(a.results, lines, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
