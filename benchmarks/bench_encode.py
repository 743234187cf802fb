"""Batch-1 image encode speed: edgevlm q4 / q8 vs transformers fp32 on a ViT-B/16-sized CLIP.

Issue 4's bar: "ViT-B/16-sized image encode at 4-bit >= 2x faster than transformers fp32 on 2 threads".

    .venv/bin/python benchmarks/bench_encode.py --json build/bench_encode.json --results benchmarks/RESULTS.md
    .venv/bin/python benchmarks/bench_encode.py --threads 2 --bits 4 --repeats 3      # quick

Model: the random-weight CLIP ViT-B/16 of bench_tta_memory.build_vit_b16 (vision 768 x 12 layers,
MLP 3072, 12 heads, patch 16, 224 px = 197 tokens, quick_gelu), built once under --workdir and
exported with rtn at each --bits (cached .evlm files; rtn and gptq run the same kernels, so speed
does not depend on the method).  Input: one fixed random pixel_values [1, 3, 224, 224].

Timed: the vision tower up to the projected image features (edgevlm ``DualEncoder.vision``,
transformers ``visual_projection(vision_model(px).pooler_output)`` under ``inference_mode``),
no preprocessing.  Each (impl, bits, ISA, threads) is one persistent worker process (its own
thread settings: torch.set_num_threads / edgevlm set_num_threads + EDGEVLM_ISA, BLAS env vars),
warmed up twice; then ``repeats`` rounds, each asking every worker for one encode in a rotated
order, so all configurations sample the same machine state.  Reported: median and best (min)
per configuration; the bar verdict uses the best of the interleaved rounds (a shared machine
only ever adds time), the medians are shown next to it.  cos_vs_fp32: cosine of the image
features with transformers fp32 on the same input.

``run()`` is the importable entry (bench_tta.py uses it): returns the rows and flat keys
``encode_ms_{edgevlm_q4,edgevlm_q8,torch_fp32}`` (median, default ISA, the largest thread count)
plus ``..._best`` and ``..._t{threads}`` variants.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
SECTION = "## Image encode speed, ViT-B/16 (bench_encode.py)"
BAR = 2.0
IMAGE = 224


# ------------------------------------------------------------------------------- model and files
def prepare(work: Path, bits: tuple[int, ...]) -> tuple[Path, dict[int, Path]]:
    """The HF folder (built once) and one rtn export per bit width (rebuilt when older than it)."""
    from bench_tta_memory import build_vit_b16

    src = build_vit_b16(work / "vit-b16-random")
    files = {}
    for b in bits:
        out = work / f"vit-b16-rtn{b}.evlm"
        if not out.exists() or out.stat().st_mtime < max(f.stat().st_mtime for f in src.iterdir()):
            r = subprocess.run([sys.executable, "-m", "edgevlm.cli", "export", str(src), "-o", str(out), "--method",
                                "rtn", "--bits", str(b), "--quiet"], capture_output=True, text=True, cwd=str(ROOT),
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if r.returncode != 0:
                raise RuntimeError(f"rtn {b}-bit export of {src} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
        files[b] = out
    return src, files


def pixels(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, IMAGE, IMAGE)).astype(np.float32)


# -------------------------------------------------------------------------------------- workers
def _worker(spec: dict) -> None:
    """Loads one configuration, prints {"emb": [...]} after two warm-up encodes, then answers each
    stdin line with {"ms": one encode's milliseconds}; exits on EOF."""
    px = pixels()
    if spec["impl"] == "torch":
        import torch
        from transformers import CLIPModel

        torch.set_num_threads(spec["threads"])
        model = CLIPModel.from_pretrained(spec["path"]).eval()
        pt = torch.from_numpy(px)

        def encode() -> np.ndarray:
            with torch.inference_mode():
                return model.visual_projection(model.vision_model(pixel_values=pt).pooler_output).numpy()
    else:
        from edgevlm.runtime import layers, load_dual

        isa, _, glue = spec["isa"].partition("+")
        layers.USE_CORE_OPS = glue != "np"  # "<isa>+np": the numpy encoder glue (before the C++ ops)
        model = load_dual(spec["path"], threads=spec["threads"], isa=isa)

        def encode() -> np.ndarray:
            return model.vision(px)
    emb = encode()
    encode()
    print(json.dumps({"emb": np.asarray(emb, np.float64).reshape(-1).tolist()}), flush=True)
    for _ in sys.stdin:
        c0, t0 = time.process_time(), time.perf_counter()
        encode()
        t1, c1 = time.perf_counter(), time.process_time()
        print(json.dumps({"ms": 1e3 * (t1 - t0), "cpu_ms": 1e3 * (c1 - c0)}), flush=True)


class Worker:
    def __init__(self, spec: dict) -> None:
        self.spec = spec
        t = str(spec["threads"])
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": t, "OPENBLAS_NUM_THREADS": t,
               "MKL_NUM_THREADS": t}
        if spec.get("isa"):
            env["EDGEVLM_ISA"] = spec["isa"].partition("+")[0]
        self.p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
        self.emb = np.asarray(self._read()["emb"])
        self.ms: list[float] = []
        self.cpu_ms: list[float] = []

    def _read(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.spec} exited with {self.p.wait()} (its stderr is above)")
        return json.loads(line)

    def encode(self) -> float:
        self.p.stdin.write("go\n")
        self.p.stdin.flush()
        r = self._read()
        self.ms.append(r["ms"])
        self.cpu_ms.append(r["cpu_ms"])
        return self.ms[-1]

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=60)


# -------------------------------------------------------------------------------------- the run
def run(threads=(1, 2), bits=(4, 8), repeats: int = 5, isas=None, work: str | os.PathLike | None = None,
        log=None) -> dict:
    """Times every configuration (see the module docstring) and returns
    {"rows": [...], "encode_ms_edgevlm_q4": ..., ...}.  isas: edgevlm ISAs (None: every supported
    SIMD ISA, the default first)."""
    from edgevlm import _core

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    threads, bits = tuple(int(t) for t in threads), tuple(int(b) for b in bits)
    if repeats < 1 or not threads or min(threads) < 1 or any(b not in (2, 3, 4, 8) for b in bits):
        raise ValueError(f"expected repeats >= 1, threads >= 1 and bits in 2/3/4/8, got repeats={repeats} "
                         f"threads={threads} bits={bits}")
    default = _core.default_isa()
    if isas is None:
        isas = [default] + [i for i in _core.supported_isas() if i not in ("ref", default)]
    work = Path(work or ROOT / "build" / "bench_encode")
    work.mkdir(parents=True, exist_ok=True)
    log(f"[bench_encode] model + rtn exports under {work}")
    src, files = prepare(work, bits)
    specs = [{"impl": "torch", "bits": 32, "isa": None, "threads": t, "path": str(src)} for t in threads]
    specs += [{"impl": "edgevlm", "bits": b, "isa": i, "threads": t, "path": str(files[b])}
              for b in bits for i in isas for t in threads]
    workers = []
    try:
        for s in specs:
            log(f"[bench_encode] start {s['impl']} {s['bits']}-bit {s['isa'] or ''} {s['threads']} thread(s)")
            workers.append(Worker(s))
        for r in range(repeats):  # interleaved rounds, start rotated per round
            for j in range(len(workers)):
                workers[(r + j) % len(workers)].encode()
            log(f"[bench_encode] round {r + 1}/{repeats}: " + ", ".join(f"{w.ms[-1]:.0f}" for w in workers))
    finally:
        for w in workers:
            w.close()
    ref = {w.spec["threads"]: w.emb for w in workers if w.spec["impl"] == "torch"}
    rows = []
    for w in workers:
        s, e0 = w.spec, ref[w.spec["threads"]]
        cos = float(w.emb @ e0 / (np.linalg.norm(w.emb) * np.linalg.norm(e0) + 1e-30))
        rows.append({"impl": s["impl"], "bits": s["bits"], "isa": s["isa"] or "-", "threads": s["threads"],
                     "median_ms": statistics.median(w.ms), "best_ms": min(w.ms), "runs": len(w.ms),
                     "best_cpu_ms": min(w.cpu_ms),
                     "cos_vs_fp32": cos})
    res = {"rows": rows, "default_isa": default, "threads": list(threads), "bits": list(bits), "repeats": repeats}
    tmax = max(threads)
    for r in rows:
        if r["impl"] == "torch":
            key = "encode_ms_torch_fp32"
        elif r["isa"] == default:
            key = f"encode_ms_edgevlm_q{r['bits']}"
        else:
            continue
        res[f"{key}_t{r['threads']}"] = r["median_ms"]
        res[f"{key}_best_t{r['threads']}"] = r["best_ms"]
        if r["threads"] == tmax:
            res[key], res[f"{key}_best"] = r["median_ms"], r["best_ms"]
    return res


def speedups(res: dict) -> list[dict]:
    """Per edgevlm row: transformers fp32 time / edgevlm time at the same thread count."""
    torch_rows = {r["threads"]: r for r in res["rows"] if r["impl"] == "torch"}
    out = []
    for r in res["rows"]:
        if r["impl"] != "edgevlm":
            continue
        t = torch_rows[r["threads"]]
        out.append({**r, "x_best": t["best_ms"] / r["best_ms"], "x_median": t["median_ms"] / r["median_ms"]})
    return out


def table_md(res: dict) -> list[str]:
    sp = {(r["bits"], r["isa"], r["threads"]): r for r in speedups(res)}
    lines = ["| impl | bits | ISA | threads | median ms | best ms | speedup vs fp32 (best / median) | best CPU ms "
             "| 1-thread CPU-time speedup | cos vs fp32 |", "|---|---|---|---|---|---|---|---|---|---|"]
    cpu_ref = {r["threads"]: r["best_cpu_ms"] for r in res["rows"] if r["impl"] == "torch"}
    for r in sorted(res["rows"], key=lambda r: (r["threads"], r["impl"] != "torch", r["bits"])):
        s = sp.get((r["bits"], r["isa"], r["threads"]))
        x = f"{s['x_best']:.2f}x / {s['x_median']:.2f}x" if s else "1"
        xc = f"{cpu_ref[1] / r['best_cpu_ms']:.2f}x" if r["threads"] == 1 else "-"
        lines.append(f"| {'transformers' if r['impl'] == 'torch' else 'edgevlm'} | {r['bits']} | {r['isa']} | "
                     f"{r['threads']} | {r['median_ms']:.1f} | {r['best_ms']:.1f} | {x} | {r['best_cpu_ms']:.1f} | {xc} "
                     f"| {r['cos_vs_fp32']:.5f} |")
    return lines


def bar_lines(res: dict) -> list[str]:
    """The bar at 2 threads (wall time, best of rounds), and the 1-thread wall and CPU-time ratios: on a
    loaded machine a 2-thread run's wall time depends on how the scheduler treats each runtime's
    thread pool (OpenMP barriers suffer most), one thread's CPU time hardly at all."""
    out = []
    cpu1 = {r["threads"]: r["best_cpu_ms"] for r in res["rows"] if r["impl"] == "torch"}.get(1)
    for s in speedups(res):
        if s["bits"] == 4 and s["threads"] == 2:
            verdict = "PASS" if s["x_best"] >= BAR else "MISS"
            out.append(f"- q4, {s['isa']}, 2 threads: {s['x_best']:.2f}x (best of rounds; median {s['x_median']:.2f}x) "
                       f"-> **{verdict}** (bar >= {BAR}x)")
        elif s["bits"] == 4 and s["threads"] == 1 and cpu1:
            out.append(f"- q4, {s['isa']}, 1 thread (not the bar; less load-sensitive): {s['x_best']:.2f}x wall "
                       f"(best of rounds), {cpu1 / s['best_cpu_ms']:.2f}x CPU time")
    return out or ["- (no q4 run at 2 threads: the bar was not measured)"]


# Optimisation steps (session 4): what each was predicted to give and what it gave. Kernel times:
# `_core.linear` / the ops on random data at the ViT-B/16 shapes, 1 thread, best process time of 15
# calls (contended 2-vCPU box, load average 7-12 throughout; process time is the least disturbed).
NOTES: list[str] = [
    "- Start (session 3, quiet box): q4 333 ms vs transformers fp32 175 ms at 2 threads (0.52x); 228 ms "
    "in `_core.linear` (~147 GFLOP/s), 40 ms numpy sigmoid, 33 ms numpy attention.",
    "- 1. `avx512vnni` GEMM (csrc/kernels/avx512vnni/gemm.cc: 16 weight rows x 4 codes per zmm vpdpbusd, one "
    "int32 lane per output, 4 x 3 register tile). Predicted 2.5-3x the ymm GEMM at M = 197 (4x the MACs per "
    "instruction; the per-group float work drops from 1 per 4 dots to 1 per 32). Measured q4 197x768x768 "
    "0.58 ms (402 GFLOP/s) vs avxvnni 1.56 ms (149): 2.7x; 197x3072x768 (fc1) 3.06 vs 6.25 ms; 197x768x3072 "
    "(fc2) 2.45 vs 6.07 ms.",
    "- 2. Blocking: W block 96 -> 48 rows and K chunk 1024 -> 768 codes, so the transposed W block (36 KiB) "
    "stays in L1 across the 50 X tiles. Predicted fc1 (the one shape below 400 GFLOP/s) to ~400. Measured "
    "(C++ harness, 1 thread, best of 9): fc1 3.13 -> 2.20 ms (297 -> 423 GFLOP/s); 768x768 and fc2 unchanged "
    "within noise.",
    "- 3. Encoder glue in C++ (csrc/ops/encode_ops.h: GELUs, LayerNorm, attention; vectorised, threaded). "
    "Predicted: the ~75 ms of numpy glue to < 10 ms. Measured per layer: attention 1.44 ms, quick_gelu "
    "(197 x 3072) 0.19 ms, LayerNorm 0.04 ms; in the table, 1 thread, avxvnni with the C++ glue vs "
    "avxvnni+np: 261 vs 318 ms CPU per q4 encode; at 2 threads the numpy path's BLAS threads suffer most "
    "from the load (the +np rows).",
    "- 4. Activation quantization split over the pool rows-wise above 2^18 values (fc2's 197 x 3072 input, "
    "0.26 ms on one core; 197 x 768 is 0.06 ms and stays on one thread, as does LayerNorm below 2^18): "
    "predicted ~1.5 ms per 2-thread encode; too small to resolve on this box.",
    "- Where a 1-thread q4 encode's ~124 ms CPU goes now (per-op times above x 12 layers): GEMMs ~80 ms, "
    "attention ~17 ms, activation quantization ~7 ms, GELU + LayerNorm ~3 ms, the rest numpy residual adds, "
    "patch embedding and Python. Next steps if needed: attention at ~80 GFLOP/s is the largest non-GEMM "
    "item; q/k/v share one input and could share one activation quantization (one GEMM, N = 2304).",
    "- Reading the bar (run of 2026-11-24 23:08, load average ~5 on 2 vCPUs): transformers' 2-thread run is "
    "the most load-sensitive number (best 914 ms vs 175 ms on session 3's quiet box; 613 ms CPU for 322 ms "
    "of 1-thread work), so the measured 2-thread ratio (3.51x) overstates the quiet-box one. The 1-thread "
    "rows (2.29x wall, 2.60x CPU time, q4 avx512vnni) are the load-robust evidence; they suggest, but do "
    "not prove, >= 2x at 2 threads on a quiet box (not measured quietly this session). With the ymm GEMM "
    "only (avxvnni / avx2) it is 1.23x / 1.13x CPU time at 1 thread: no 2x without AVX-512 VNNI on this "
    "AVX-512 CPU, where torch uses AVX-512 too.",
]


def section_lines(res: dict, command: str) -> list[str]:
    from bench_tta_memory import machine

    m = res.get("machine") or machine()
    v = ", ".join(f"{k} {x}" for k, x in m["versions"].items())
    return [
        SECTION, "",
        f"Written by `benchmarks/bench_encode.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
        f"- CPU: {m['cpu']}, {m['logical_cpus']} logical CPUs; load average at start {m['loadavg']} (a shared "
        "machine: other jobs ran; the verdict uses the best of interleaved rounds)",
        f"- versions: {v}; edgevlm default ISA {res['default_isa']}", "",
        "```", command, "```", "",
        f"Random-weight CLIP ViT-B/16 (12 x 768, MLP 3072, 224 px, 197 tokens, quick_gelu), rtn exports, batch 1, "
        f"vision tower to projected features; {res['repeats']} interleaved rounds per configuration, each "
        "configuration a persistent process with its own thread settings.", "",
        *table_md(res), "",
        f"Bar (issue 4): ViT-B/16 encode at 4-bit >= {BAR}x transformers fp32 on 2 threads.", "",
        *bar_lines(res), "",
        *(["### Optimisation notes", "", *NOTES, ""] if NOTES else []),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write the rows and flat keys here")
    p.add_argument("--results", help="markdown file whose section this run (re)writes, e.g. benchmarks/RESULTS.md")
    p.add_argument("--threads", default="1,2", help="comma list of thread counts")
    p.add_argument("--bits", default="4,8", help="comma list of edgevlm bit widths")
    p.add_argument("--isas", help="comma list of edgevlm ISAs (default: every supported SIMD ISA, default first); "
                   "ISA+np runs that ISA with the numpy encoder glue instead of the C++ ops")
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds (one encode per configuration each)")
    p.add_argument("--workdir", default=str(ROOT / "build" / "bench_encode"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(json.loads(args.worker))
        return 0
    from bench_tta_memory import machine

    info = machine()
    res = run(threads=[int(x) for x in args.threads.split(",")], bits=[int(x) for x in args.bits.split(",")],
              repeats=args.repeats, isas=args.isas.split(",") if args.isas else None, work=args.workdir)
    res["machine"] = info
    command = " ".join(shlex.quote(x) for x in [".venv/bin/python", "benchmarks/bench_encode.py",
                                                *(sys.argv[1:] if argv is None else argv)])
    res["command"] = command
    print("\n".join(table_md(res)))
    print("\n".join(bar_lines(res)))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))
    if args.results:
        from bench_quality import write_section

        write_section(args.results, section_lines(res, command), SECTION)
        print(f"wrote section '{SECTION}' of {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
