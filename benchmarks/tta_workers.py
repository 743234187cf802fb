"""The measured processes of bench_tta.py, each run in a fresh interpreter:

    .venv/bin/python benchmarks/tta_workers.py KIND SPEC_JSON      # prints one JSON line

This module imports only numpy and json at the top (and each worker what it uses),
so a worker's VmHWM is what a program doing the same work holds: python, numpy, the edgevlm
runtime and adapter, its data, and nothing of the benchmark's harness (argparse, subprocess,
bench_tta_memory, ... are ~3 MB resident together).  Kinds:

- ``baseline``: python + numpy (+ json, ~0.1 MB), nothing else; the common floor subtracted by the
  "peak above baseline" lines (every method's process holds at least python + numpy);
- ``edgevlm``: 4-bit zero-shot + Q-TTA over streams (``worker_edgevlm``);
- ``stream``: synthetic features through one QTTA, memory over a long stream (``worker_stream``).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

# bench_tta.py's folder, for demo_shift (imported by the workers that use it, not by the baseline)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

WARMUP = 2000  # streamed features before the constant-memory measurement starts (worker_stream)


def worker_baseline(spec: dict) -> dict:
    """python + numpy imported (what every method's process holds at least): VmHWM read exactly as
    demo_shift.proc_status_mb reads it, without importing anything more."""
    with open("/proc/self/status") as f:
        kb = {line.split(":")[0]: int(line.split()[1]) for line in f if line.startswith(("VmHWM:", "VmRSS:"))}
    return {"peak_rss_mb": kb["VmHWM"] / 1024, "rss_mb": kb["VmRSS"] / 1024}


def worker_edgevlm(spec: dict) -> dict:
    """4-bit zero-shot + Q-TTA over the npz streams in spec["keys"] order (bench_tta.py's docstring)."""
    import demo_shift
    from demo_shift import proc_status_mb as status
    from edgevlm.adapt import QTTA, QTTAConfig
    from edgevlm.runtime import load_dual, set_num_threads

    set_num_threads(spec["threads"])
    data = np.load(spec["npz"])                               # lazy: one stream in memory at a time
    enc = load_dual(spec["evlm"])
    text = enc.encode_text(spec["prompts"])                   # [C, E] L2-normalised
    cfg = QTTAConfig(**spec["qtta"], logit_scale=float(np.exp(enc.logit_scale)))
    base = status("VmRSS")
    cont, cont_preds = QTTA(text, cfg), {}

    def continual(key, f):                                    # shifted streams only, never reset
        if key != "clean__0":
            cont_preds.setdefault(key, []).append(int(np.argmax(cont(f))))

    r = demo_shift.run_edgevlm(enc, text, ((k, data[k]) for k in spec["keys"]), cfg, on_feature=continual)
    return {**r, "continual": cont_preds, "peak_rss_mb": status("VmHWM"), "base_rss_mb": base,
            "text": text.tolist(), "logit_scale": cfg.logit_scale}


def worker_stream(spec: dict) -> dict:
    """spec["n"] synthetic features through one QTTA: is its memory constant over the stream?

    Feature = normalise(m * t_c + (1 - m) * u): t_c a random class's text feature, u a random unit
    vector, m ~ U(0, spec["mix"]) so the zero-shot entropy spans confident to uncertain and both
    caches keep inserting and replacing.  Generated and fed in chunks of 1,000 (a stream at batch
    1: QTTA processes the rows in order).  The first WARMUP features are not measured: the caches
    fill, and the allocator settles (this generator alone, with no adapter, raises VmRSS by 128 KB
    at its second chunk: glibc's heap serving its 1 MB temporaries after the first ones were freed)."""
    import gc
    import time

    from demo_shift import proc_status_mb as status
    from edgevlm.adapt import QTTA, QTTAConfig

    text = np.asarray(spec["text"], np.float32)               # [C, E]
    C, D = text.shape
    q = QTTA(text, QTTAConfig(**spec["qtta"], logit_scale=spec["logit_scale"]))
    rng = np.random.default_rng(spec["seed"])

    def chunk(n: int) -> np.ndarray:                          # [n, D] float32, unit rows
        m = rng.uniform(0.0, spec["mix"], (n, 1))
        u = rng.standard_normal((n, D))
        f = m * text[rng.integers(0, C, n)] + (1 - m) * u / np.linalg.norm(u, axis=1, keepdims=True)
        return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)

    step, n = 1000, int(spec["n"])
    for _ in range(WARMUP // step):                           # caches fill, lazy allocations happen
        q(chunk(step))
    done = WARMUP
    gc.collect()
    start = {"nbytes": q.nbytes, "rss_mb": status("VmRSS"), "objects": len(gc.get_objects()), "images": done}
    t0 = time.perf_counter()
    while done < n:
        k = min(step, n - done)
        q(chunk(k))
        done += k
    secs = time.perf_counter() - t0
    gc.collect()
    end = {"nbytes": q.nbytes, "rss_mb": status("VmRSS"), "objects": len(gc.get_objects()), "images": done}
    counts = q.state_dict()
    return {"start": start, "end": end, "peak_rss_mb": status("VmHWM"),
            "us_per_feature": 1e6 * secs / max(done - start["images"], 1),
            "pos_filled": int(counts["pos_count"].sum()), "neg_filled": int(counts["neg_count"].sum()),
            "bytes_for": int(QTTA.bytes_for(C, D, q.config))}


WORKERS = {"baseline": worker_baseline, "edgevlm": worker_edgevlm, "stream": worker_stream}

if __name__ == "__main__":
    kind, spec = sys.argv[1], json.loads(sys.argv[2])
    if kind not in WORKERS:
        raise SystemExit(f"unknown worker {kind!r}: expected one of {sorted(WORKERS)}")
    print(json.dumps(WORKERS[kind](spec)))
