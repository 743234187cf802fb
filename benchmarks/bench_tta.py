"""Q-TTA over several stream orders vs 4-bit / fp32 zero-shot and a gradient TTA baseline (TPT);
adapter memory over a 100k-image stream; ViT-B/16-sized image encode (issue 4's TTA benchmark).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_tta.py --json build/bench_tta.json --results benchmarks/RESULTS.md
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_tta.py --json /tmp/q.json --quick --no-encode    # ~30 s

Streams: demo_shift.py's (`make demo`): the 597 held-out digits of models/demo-clip, clean and
under 11 corruptions x severities 3 and 5, corrupted once (noise seed 0, as the demo).  A seed
is a stream order: every stream's images in a permutation drawn from default_rng(seed) (seed 0
is exactly the demo's order) and the shifted streams in a permuted corruption order.  Per seed:

- zero-shot 4-bit and 4-bit + Q-TTA (edgevlm runtime, SHQ export, one QTTA per stream as in the
  demo, the demo's cache weights), in one fresh subprocess: ms/image at batch 1 and that
  process's peak RSS (VmHWM).  A second QTTA, never reset, rides along untimed over the shifted
  streams in the seed's corruption order ("continual": there the corruption order matters);
- TPT (benchmarks/tpt_baseline.py via bench_tta_memory's worker: torch fp32 CLIPModel, 64 views,
  one AdamW step on the context tokens of the demo prompt, reset per image) on a subsample,
  --tpt-per-stream random positions of every shifted stream, in its own subprocess (VmHWM).
  The other methods' accuracy is reported on the same images (their predictions made in the
  full stream).
Zero-shot fp32 (transformers, subprocess) runs once: a batch-1 zero-shot prediction does not
depend on the order, so its accuracy is the same for every seed (std 0 by construction).

Adapter memory: --stream-features synthetic unit features (noisy class directions) through one
QTTA in a fresh subprocess; QTTA.nbytes, VmRSS and the count of live Python objects after the
2,000-feature warm-up and at the end.  Encode: benchmarks/bench_encode.run() (its own rules;
skipped with --no-encode).
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
import bench_tta_memory as btm  # noqa: E402  (the TPT worker, machine info)
import demo_shift as demo  # noqa: E402  (streams, fp32 and edgevlm runs of `make demo`)
from tta_workers import WARMUP  # noqa: E402  (the measured edgevlm / stream / baseline processes)

SECTION = "## Q-TTA over stream orders, TPT, encode (bench_tta.py)"
KEYS = ["clean_fp32_acc", "clean_q4_acc", "shifted_zs_q4_acc", "shifted_qtta_q4_acc", "ms_per_image_zs",
        "ms_per_image_qtta", "peak_mb_qtta", "peak_mb_grad_tta", "encode_ms_edgevlm_q4", "encode_ms_torch_fp32"]
GAIN_BAR, TIME_BAR, MEM_BAR, ENCODE_BAR, CLEAN_BAR = 4.5, 20.0, btm.BAR, 2.0, 1.0


# ------------------------------------------------------------------------------------- workers
def run_worker(kind: str, spec: dict, threads: int) -> dict:
    """One tta_workers.py worker in a fresh interpreter (its VmHWM is its own); returns its JSON."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tta_workers.py"), kind, json.dumps(spec)],
                       capture_output=True, text=True, env=env, cwd=str(ROOT))
    if r.returncode != 0:
        raise RuntimeError(f"{kind} worker failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------- one seed
def acc(pred, y) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(y)))


def run_seed(seed: int, base: dict, fp32_by_img: dict, evlm: Path, prompts: list[str], classes: list[str],
             ctx_init: str, a, work: Path) -> dict:
    """All methods on one stream order; fp32_by_img[key][i] = fp32 prediction of original image i."""
    order = demo.stream_orders(base, seed)                     # seed 0: the demo's order
    shifted = [k for k in base if k != "clean/0"]
    shifted = [shifted[i] for i in np.random.default_rng([seed, 1]).permutation(len(shifted))]
    keys = ["clean/0", *shifted]
    npz = work / f"streams-seed{seed}.npz"
    np.savez(npz, **{k.replace("/", "__"): base[k][0][order[k]] for k in keys})
    ys = {k: base[k][1][order[k]] for k in keys}
    btm.log(f"[seed {seed}] edgevlm q{a.bits} zero-shot + Q-TTA over {len(keys)} streams")
    q = run_worker("edgevlm", {"npz": str(npz), "keys": [k.replace("/", "__") for k in keys], "evlm": str(evlm),
                               "prompts": prompts, "qtta": demo.QTTA_WEIGHTS, "threads": a.threads}, a.threads)
    P = {k: {"fp32": np.asarray(fp32_by_img[k])[order[k]], **{m: np.asarray(v) for m, v in
             q["preds"][k.replace("/", "__")].items()}} for k in keys}
    for k in shifted:
        P[k]["q_tta_cont"] = np.asarray(q["continual"][k.replace("/", "__")])
    streams = {k: {m: acc(p, ys[k]) for m, p in P[k].items()} for k in keys}
    # the TPT subsample: --tpt-per-stream random positions of each shifted stream
    rng = np.random.default_rng([seed, 2])
    pos = {k: np.sort(rng.choice(len(ys[k]), a.tpt_per_stream, replace=False)) for k in shifted}
    sub_imgs = np.concatenate([base[k][0][order[k]][pos[k]] for k in shifted])
    sub_y = np.concatenate([ys[k][pos[k]] for k in shifted])
    sub_npz = work / f"tpt-subsample-seed{seed}.npz"
    np.savez(sub_npz, images=sub_imgs, labels=sub_y)
    btm.log(f"[seed {seed}] TPT on {len(sub_y)} images ({a.tpt_per_stream} per shifted stream)")
    t = btm.run_worker("tpt", {"model_dir": str(demo.MODEL), "images": str(sub_npz), "classnames": classes,
                               "ctx_init": ctx_init, "pad": "max_length", "threads": a.threads,
                               "views": a.tpt_views}, a.threads)
    base_proc = run_worker("baseline", {}, a.threads)          # python + numpy, the common floor
    sub = {m: acc(np.concatenate([P[k][m][pos[k]] for k in shifted]), sub_y) for m in ("fp32", "q", "q_tta")}
    sub.update(tpt=t["acc"], tpt_zeroshot=t["acc_zeroshot"])
    mean = {m: float(np.mean([streams[k][m] for k in shifted])) for m in ("fp32", "q", "q_tta", "q_tta_cont")}
    return {"seed": seed, "corruption_order": shifted, "streams": streams, "shifted_mean": mean,
            "clean": streams["clean/0"], "subsample": sub, "subsample_n": int(len(sub_y)),
            "ms": {"q4": q["ms"]["q"], "q4_qtta": q["ms"]["q_tta"], "tpt": t["ms_per_image"]},
            "peak_mb": {"q4_qtta": q["peak_rss_mb"], "tpt": t["peak_rss_mb"], "baseline": base_proc["peak_rss_mb"]},
            "base_mb": {"q4_qtta": q["base_rss_mb"], "tpt": t["base_rss_mb"]},
            "adapt_bytes": {"qtta": q["qtta_state_bytes"], "tpt": t["adapt_state_bytes"]},
            "tpt_n_ctx": t["n_ctx"], "text": q["text"], "logit_scale": q["logit_scale"]}


# ------------------------------------------------------------------------------------ summary
def ms(vals: list[float]) -> dict:
    """mean and sample std (0 for one value) of a list."""
    return {"mean": float(np.mean(vals)), "std": float(statistics.stdev(vals)) if len(vals) > 1 else 0.0}


def bar(name: str, value: float | None, op: str, threshold: float, unit: str, how: str) -> dict:
    ok = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
    return {"name": name, "value": value, "op": op, "threshold": threshold, "unit": unit, "how": how,
            "verdict": "not run" if ok is None else ("PASS" if ok else "MISS")}


def summarize(seeds: list[dict], fp32: dict, const: dict, enc: dict | None, vit: dict | None) -> dict:
    S = lambda f: ms([f(s) for s in seeds])  # noqa: E731
    out = {
        "clean_fp32_acc": S(lambda s: s["clean"]["fp32"]), "clean_q4_acc": S(lambda s: s["clean"]["q"]),
        "shifted_fp32_acc": S(lambda s: s["shifted_mean"]["fp32"]),
        "shifted_zs_q4_acc": S(lambda s: s["shifted_mean"]["q"]),
        "shifted_qtta_q4_acc": S(lambda s: s["shifted_mean"]["q_tta"]),
        "shifted_qtta_q4_continual_acc": S(lambda s: s["shifted_mean"]["q_tta_cont"]),
        "ms_per_image_zs": S(lambda s: s["ms"]["q4"]), "ms_per_image_qtta": S(lambda s: s["ms"]["q4_qtta"]),
        "ms_per_image_grad_tta": S(lambda s: s["ms"]["tpt"]),
        "peak_mb_qtta": S(lambda s: s["peak_mb"]["q4_qtta"]), "peak_mb_grad_tta": S(lambda s: s["peak_mb"]["tpt"]),
        "peak_mb_baseline": S(lambda s: s["peak_mb"]["baseline"]),
        "peak_above_baseline_mb_qtta": S(lambda s: s["peak_mb"]["q4_qtta"] - s["peak_mb"]["baseline"]),
        "peak_above_baseline_mb_grad_tta": S(lambda s: s["peak_mb"]["tpt"] - s["peak_mb"]["baseline"]),
        "adapt_bytes_qtta": S(lambda s: s["adapt_bytes"]["qtta"]),
        "adapt_bytes_grad_tta": S(lambda s: s["adapt_bytes"]["tpt"]),
        **{f"subsample_{m}_acc": S(lambda s, m=m: s["subsample"][m])
           for m in ("fp32", "q", "q_tta", "tpt", "tpt_zeroshot")},
    }
    flat = {k: v["mean"] for k, v in out.items()}
    flat.update(ms_per_image_fp32=fp32["ms"], peak_mb_fp32=fp32["peak_rss_mb"],
                encode_ms_edgevlm_q4=enc and enc.get("encode_ms_edgevlm_q4"),
                encode_ms_edgevlm_q8=enc and enc.get("encode_ms_edgevlm_q8"),
                encode_ms_torch_fp32=enc and enc.get("encode_ms_torch_fp32"))
    gain = 100 * (flat["shifted_qtta_q4_acc"] - flat["shifted_zs_q4_acc"])
    grow_rss = 2**20 * (const["end"]["rss_mb"] - const["start"]["rss_mb"])
    n_const = const["end"]["images"] - const["start"]["images"]
    bars = [
        bar("Q-TTA gain over 4-bit zero-shot, shifted streams (mean over seeds)", gain, ">=", GAIN_BAR, "points",
            "shifted_qtta_q4_acc - shifted_zs_q4_acc"),
        bar("Q-TTA extra time per image", 100 * (flat["ms_per_image_qtta"] / flat["ms_per_image_zs"] - 1), "<=",
            TIME_BAR, "%", "100 * (ms_per_image_qtta / ms_per_image_zs - 1)"),
        bar("peak memory, the bar's measure: peak above a python + numpy baseline process, TPT / 4-bit + Q-TTA, "
            "demo CLIP",
            flat["peak_above_baseline_mb_grad_tta"] / flat["peak_above_baseline_mb_qtta"], ">=", MEM_BAR, "x",
            "peak_above_baseline_mb_grad_tta / peak_above_baseline_mb_qtta"),
        bar("peak memory, whole process (VmHWM; reported, not the bar's measure), TPT / 4-bit + Q-TTA, demo CLIP",
            flat["peak_mb_grad_tta"] / flat["peak_mb_qtta"], ">=", MEM_BAR, "x", "peak_mb_grad_tta / peak_mb_qtta"),
        bar("adaptation memory, TPT step (saved activations + ctx, grad, AdamW) / QTTA.nbytes, demo CLIP",
            flat["adapt_bytes_grad_tta"] / flat["adapt_bytes_qtta"], ">=", MEM_BAR, "x",
            "adapt_bytes_grad_tta / adapt_bytes_qtta"),
    ]
    if vit is not None:
        bars.append(bar("peak memory, whole process (VmHWM; reported), TPT / 4-bit + Q-TTA, ViT-B/16 size (cited)",
                        vit["ratio"], ">=", MEM_BAR, "x", vit["source"]))
    growth = bar(f"adapter memory growth over {n_const:,} streamed features (RSS, bytes per feature)",
                 grow_rss / n_const, "<=", 1.0, "bytes/feature",
                 f"nbytes {const['start']['nbytes']} -> {const['end']['nbytes']}; "
                 f"(VmRSS at the end - VmRSS after {const['start']['images']:,}) / features; any per-feature "
                 "state would be >= 1 byte")
    if const["end"]["nbytes"] != const["start"]["nbytes"]:
        growth["verdict"] = "MISS"        # the state is preallocated: nbytes must not move at all
    bars += [
        growth,
        bar("ViT-B/16 encode, transformers fp32 / edgevlm 4-bit, 2 threads (best of interleaved rounds)",
            enc["encode_ms_torch_fp32_best"] / enc["encode_ms_edgevlm_q4_best"] if enc else None, ">=", ENCODE_BAR,
            "x", "bench_encode.run(): encode_ms_torch_fp32_best / encode_ms_edgevlm_q4_best"),
        bar("clean accuracy, |4-bit - fp32| zero-shot", 100 * abs(flat["clean_q4_acc"] - flat["clean_fp32_acc"]),
            "<=", CLEAN_BAR, "points", "|clean_q4_acc - clean_fp32_acc|"),
    ]
    return {**flat, "std": {k: v["std"] for k, v in out.items()}, "bars": bars}


def cite_vit(path: Path) -> dict | None:
    """The ViT-B/16-sized whole-process row of a bench_tta_memory.py --json run, if one exists."""
    if not path.exists():
        return None
    r = json.loads(path.read_text())
    row = next((x for x in r.get("ratios", []) if x["model"] == "vit-b16" and x["memory"].startswith("whole")), None)
    return None if row is None else {"ratio": row["ratio"], "tpt_mb": row["tpt"], "qtta_mb": row["qtta"],
                                     "source": f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: "
                                     f"`{r['command']}`"}


# ---------------------------------------------------------------------------------- reporting
def pm(d: dict, key: str, scale: float = 1.0, nd: int = 1) -> str:
    v, s = d[key], d["std"].get(key)
    return f"{scale * v:.{nd}f}" + ("" if s is None else f" ± {scale * s:.{nd}f}")


def report_lines(res: dict) -> list[str]:
    a, seeds = res["args"], res["seeds"]
    keys = res["stream_keys"]                                   # clean, then corruption x severity
    mean = lambda k, m: 100 * float(np.mean([s["streams"][k][m] for s in seeds]))  # noqa: E731
    L = ["```", f"{'stream (mean over seeds)':<26} {'fp32':>7} {'4-bit':>7} {'+Q-TTA':>7} {'continual':>9}",
         "-" * 60]
    for k in keys:
        c = f"{mean(k, 'q_tta_cont'):>8.1f}%" if k != "clean/0" else f"{'-':>9}"
        L.append(f"{k:<26} {mean(k, 'fp32'):>6.1f}% {mean(k, 'q'):>6.1f}% {mean(k, 'q_tta'):>6.1f}% {c}")
    r = res
    L += ["-" * 60,
          f"shifted mean, % (mean ± std over {len(seeds)} seed(s)): fp32 {pm(r, 'shifted_fp32_acc', 100)}, "
          f"4-bit {pm(r, 'shifted_zs_q4_acc', 100)}, 4-bit + Q-TTA {pm(r, 'shifted_qtta_q4_acc', 100)}, "
          f"continual {pm(r, 'shifted_qtta_q4_continual_acc', 100)}",
          f"clean, %: fp32 {pm(r, 'clean_fp32_acc', 100)}, 4-bit {pm(r, 'clean_q4_acc', 100)}",
          f"ms / image (batch 1, {a['threads']} thread(s)): fp32 {r['ms_per_image_fp32']:.2f} (one run), 4-bit "
          f"{pm(r, 'ms_per_image_zs', nd=2)}, 4-bit + Q-TTA {pm(r, 'ms_per_image_qtta', nd=2)}, "
          f"TPT {pm(r, 'ms_per_image_grad_tta', nd=0)}",
          f"TPT subsample ({seeds[0]['subsample_n']} images per seed = {a['tpt_per_stream']} random positions of "
          f"every shifted stream), %: fp32 {pm(r, 'subsample_fp32_acc', 100)}, 4-bit {pm(r, 'subsample_q_acc', 100)}, "
          f"4-bit + Q-TTA {pm(r, 'subsample_q_tta_acc', 100)}, TPT {pm(r, 'subsample_tpt_acc', 100)} (TPT's own "
          f"zero-shot {pm(r, 'subsample_tpt_zeroshot_acc', 100)})",
          f"peak RSS (VmHWM of each method's own process), MB: fp32 zero-shot {r['peak_mb_fp32']:.0f} (one run), "
          f"4-bit + Q-TTA {pm(r, 'peak_mb_qtta')}, TPT {pm(r, 'peak_mb_grad_tta')}; baseline process (python + "
          f"numpy imported) {pm(r, 'peak_mb_baseline')}; above that baseline: 4-bit + Q-TTA "
          f"{pm(r, 'peak_above_baseline_mb_qtta')}, TPT {pm(r, 'peak_above_baseline_mb_grad_tta')}",
          f"adaptation state, bytes: QTTA.nbytes {r['adapt_bytes_qtta']:,.0f}, TPT step (saved activations + ctx, "
          f"grad, AdamW moments) {r['adapt_bytes_grad_tta']:,.0f}"]
    c = res["constant_memory"]
    L.append(f"adapter over {c['end']['images']:,} synthetic features: nbytes {c['start']['nbytes']} -> "
             f"{c['end']['nbytes']}, VmRSS {c['start']['rss_mb']:.2f} -> {c['end']['rss_mb']:.2f} MB "
             f"(after {c['start']['images']:,} -> "
             f"end), live Python objects {c['start']['objects']} -> {c['end']['objects']}, caches filled "
             f"{c['pos_filled']} pos / {c['neg_filled']} neg, {c['us_per_feature']:.0f} us/feature")
    if res.get("encode"):
        import bench_encode

        e = res["encode"]
        L.append("ViT-B/16 encode (bench_encode.run, median / best ms): " + ", ".join(
            f"{row['impl']} {'fp32' if row['impl'] == 'torch' else 'q%d' % row['bits']} {row['threads']}t "
            f"{row['median_ms']:.0f} / {row['best_ms']:.0f}" for row in e["rows"]))
        L.append("  speedup vs transformers fp32 at the same thread count (best / median): " + ", ".join(
            f"q{x['bits']} {x['threads']}t {x['x_best']:.2f}x / {x['x_median']:.2f}x"
            for x in bench_encode.speedups(e)))
    L += ["```", "", "Bars (issue 4):", ""]
    for b in res["bars"]:
        v = "-" if b["value"] is None else f"{b['value']:.2f}"
        L.append(f"- {b['name']}: {v} {b['unit']} (bar {b['op']} {b['threshold']}) -> **{b['verdict']}** "
                 f"[{b['how']}]")
    return L


def section_lines(res: dict) -> list[str]:
    m, a = res["machine"], res["args"]
    v = ", ".join(f"{k} {x}" for k, x in m["versions"].items())
    return [
        SECTION, "",
        f"Written by `benchmarks/bench_tta.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} in "
        f"{res['seconds']:.0f} s. CPU: {m['cpu']}, {m['logical_cpus']} logical CPUs, load average at start "
        f"{m['loadavg']}, at the end {res['loadavg_end']} (a shared machine: times are indicative; on a machine "
        f"this loaded, torch at 2 threads can be slower than at 1); {v}.", "",
        "```", res["command"], "```", "",
        f"Protocol: `make demo`'s streams ({a['n'] or 597} held-out digits per stream, clean + "
        f"{len(res['seeds'][0]['corruption_order'])} corruption x severity streams, corrupted once with noise seed "
        f"{a['noise_seed']}); seeds {a['seeds']} = stream orders (images permuted per stream, seed 0 = the demo's "
        "order; shifted streams in a permuted corruption order, which only the never-reset \"continual\" Q-TTA "
        "sees). Each method runs in its own fresh process; peak = that process's VmHWM (/proc/self/status, whole "
        "process: interpreter, libraries, weights, activations), MB = 2^20 bytes. The edgevlm processes "
        "(benchmarks/tta_workers.py) import only numpy, the runtime and the adapter, not the benchmark's harness. "
        "Baseline = a fresh process that imports numpy and nothing else, with the same environment (thread "
        "variables), measured the same way: the floor every method's process holds. The memory bar uses peak "
        "above that baseline (what each method adds to a numpy program); whole-process peaks and their ratio "
        "are reported next to it. 4-bit = SHQ export (4-bit "
        f"vision, 8-bit text); Q-TTA = demo cache weights {res['qtta']}, one QTTA per stream (TDA's protocol). "
        f"TPT = benchmarks/tpt_baseline.py, fp32 torch, {a['tpt_views']} views, {res['seeds'][0]['tpt_n_ctx']} "
        "context tokens of the demo prompt, one AdamW step, reset per image, on a random subsample (TPT takes "
        f"{res['ms_per_image_grad_tta']:.0f} ms per image here); the other methods are scored on the same images, "
        "their predictions made in the full stream. fp32 zero-shot runs once (its batch-1 "
        "predictions do not depend on the order: std 0 by construction).", "",
        *report_lines(res), "",
    ]


# ---------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write the summary keys, per-seed results, bars and machine info here")
    p.add_argument("--results", help="markdown file whose section this run (re)writes, e.g. benchmarks/RESULTS.md")
    p.add_argument("--seeds", help="comma list of stream-order seeds (default 0,1,2)")
    p.add_argument("--no-encode", action="store_true", help="skip the ViT-B/16 encode benchmark (bench_encode.run)")
    p.add_argument("--quick", action="store_true", help="seed 0, 40 images x 3 corruptions at severity 5, "
                   "1 TPT image per stream, 3,000 streamed features")
    p.add_argument("--n", type=int, help="images per stream (default: all 597 held-out digits)")
    p.add_argument("--corruptions", default=None, help="comma list (default: all of edgevlm.adapt.corruptions)")
    p.add_argument("--severities", help="comma list (default 3,5)")
    p.add_argument("--noise-seed", type=int, default=0, help="corruption noise seed (the demo's: 0)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="threads of every method (batch-1 streaming, as the demo)")
    p.add_argument("--tpt-per-stream", type=int, help="TPT subsample: images per shifted stream and seed (default 2)")
    p.add_argument("--tpt-views", type=int, default=64)
    p.add_argument("--stream-features", type=int, help="length of the constant-memory stream (default 100000)")
    p.add_argument("--encode-repeats", type=int, default=5, help="interleaved rounds of bench_encode.run")
    p.add_argument("--evlm", help="use this export of models/demo-clip instead of exporting (SHQ, cached)")
    p.add_argument("--vit-memory-json", default=str(ROOT / "build" / "tta_memory" / "vit.json"),
                   help="a bench_tta_memory.py --models vit-b16 --json run to cite as the ViT-B/16 memory row")
    p.add_argument("--workdir", default=str(ROOT / "build" / "bench_tta"))
    a = p.parse_args(argv)
    # options left unset take the full run's value, or --quick's
    full = {"seeds": "0,1,2", "n": None, "corruptions": None, "severities": "3,5", "tpt_per_stream": 2,
            "stream_features": 100_000}
    quick = {"seeds": "0", "n": 40, "corruptions": "gaussian_noise,defocus_blur,contrast", "severities": "5",
             "tpt_per_stream": 1, "stream_features": WARMUP + 1000}
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    for name in ("threads", "tpt_per_stream", "tpt_views", "encode_repeats"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.stream_features < WARMUP + 1000:
        raise ValueError(f"--stream-features must be >= {WARMUP + 1000} ({WARMUP:,} warm-up + at least 1,000 "
                         f"measured), got {a.stream_features}")
    if a.n is not None and not a.tpt_per_stream <= a.n:
        raise ValueError(f"--tpt-per-stream must be <= --n (positions drawn without replacement), got "
                         f"{a.tpt_per_stream} > {a.n}")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    t_start = time.perf_counter()
    info = btm.machine()
    seeds = [int(s) for s in a.seeds.split(",")]
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    evlm = Path(a.evlm) if a.evlm else work / f"demo-clip-shq{a.bits}.evlm"
    if a.evlm and not evlm.is_file():
        raise ValueError(f"--evlm expects an existing .evlm export of models/demo-clip, got {a.evlm!r} (no such "
                         "file); leave it out to export one")
    stale = not evlm.exists() or evlm.stat().st_mtime < max(f.stat().st_mtime for f in demo.MODEL.iterdir())
    if not a.evlm and stale:
        btm.log(f"export {demo.MODEL.name} with SHQ ({a.bits}-bit vision) -> {evlm}")
        demo.export_demo(evlm, a.bits)
    from edgevlm.adapt import corruptions as C

    imgs, labels, split = demo.test_stream(a.n)
    template = split["prompt"]
    if not template.endswith("{}"):
        raise ValueError(f"TPT tunes the tokens before the class name: the demo prompt must end with '{{}}', got "
                         f"{template!r}")
    prompts, classes = [template.format(w) for w in split["labels"]], list(split["labels"])
    names = a.corruptions.split(",") if a.corruptions else list(C.CORRUPTIONS)
    base = demo.corrupt_streams(imgs, labels, names, [int(s) for s in a.severities.split(",")], a.noise_seed)
    btm.log(f"fp32 zero-shot (transformers) over {len(base)} streams x {len(labels)} images, once")
    fp32 = demo.run_fp32(demo.save_streams(base, work / "streams-unordered.npz"), prompts, a.threads)
    fp32_by_img = {k: fp32["preds"][k.replace("/", "__")] for k in base}
    per_seed = [run_seed(s, base, fp32_by_img, evlm, prompts, classes, template[:-2].strip(), a, work) for s in seeds]
    btm.log(f"adapter memory over {a.stream_features:,} synthetic features")
    const = run_worker("stream", {"text": per_seed[0]["text"], "qtta": demo.QTTA_WEIGHTS,
                                  "logit_scale": per_seed[0]["logit_scale"],
                                  "n": a.stream_features, "mix": 0.3, "seed": 0}, a.threads)
    enc = None
    if not a.no_encode:
        import bench_encode
        from edgevlm import _core

        enc = bench_encode.run(threads=(1, 2), bits=(4, 8), repeats=a.encode_repeats, isas=[_core.default_isa()],
                               log=btm.log)
    vit = cite_vit(Path(a.vit_memory_json))
    for s in per_seed:
        del s["text"], s["logit_scale"]
    res = {**summarize(per_seed, fp32, const, enc, vit), "seeds": per_seed, "stream_keys": list(base),
           "constant_memory": const, "encode": enc, "vit_b16_memory": vit, "qtta": demo.QTTA_WEIGHTS,
           "fp32": {"ms": fp32["ms"], "peak_rss_mb": fp32["peak_rss_mb"]}, "evlm": str(evlm), "machine": info,
           "args": vars(a),
           "command": " ".join(["HF_HUB_OFFLINE=1", *(shlex.quote(x) for x in [
               ".venv/bin/python", "benchmarks/bench_tta.py", *(sys.argv[1:] if argv is None else argv)])]),
           "seconds": time.perf_counter() - t_start, "loadavg_end": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    print("\n".join(report_lines(res)))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1))
    if a.results:
        from bench_quality import write_section

        write_section(a.results, section_lines(res), SECTION)
        btm.log(f"wrote section '{SECTION}' of {a.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
