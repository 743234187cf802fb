"""Peak memory of LQA's Q-TTA (edgevlm, 4-bit SHQ export) vs TPT (gradient-based TTA, torch fp32).

Issue 4's bar: "Q-TTA's peak memory is >= 19.9x smaller than the gradient-based baseline's".

    .venv/bin/python benchmarks/bench_tta_memory.py --json build/tta_memory.json --results benchmarks/RESULTS.md
    .venv/bin/python benchmarks/bench_tta_memory.py --models demo-clip --n 4      # quick

Per model (same HF CLIPModel folder, same images, same label set), each method in its own fresh
subprocess, so VmHWM (peak resident set, /proc/self/status) is that method's alone:

- ``qtta``: the SHQ export (4-bit vision, 8-bit text) on the edgevlm runtime (numpy + C++
  kernels, no torch), class features from the runtime's text tower, then a stream of N images
  at batch 1, one view each: ``encode_image`` -> ``QTTA`` (int8 caches, TDA's default
  hyperparameters).  adapt_state_bytes = ``QTTA.nbytes`` (caches + its classifier copy).
- ``tpt``: benchmarks/tpt_baseline.py on the fp32 ``CLIPModel`` in torch: 64 views per image,
  one AdamW step on 4 context tokens through the text encoder, reset per image.
  adapt_state_bytes = activations autograd saved for the step's backward (unique storages via
  ``saved_tensors_hooks``, model weights excluded) + ctx + its grad + AdamW moments.
  step_peak_delta_mb = VmHWM during the first step (reset with /proc/self/clear_refs = 5)
  minus VmRSS just before it: everything the step allocates, temporaries included.

Models: ``demo-clip`` (models/demo-clip, 10 digit classes, images = corrupted held-out digits)
and ``vit-b16`` (a random-weight CLIP ViT-B/16-sized model built here: vision 768 x 12, patch 16,
224 px; text 512 x 12, vocab 49408, 77 positions; tests/hf_tiny.py's tokenizer padded to 49408;
the same digit images, resized by the processor; accuracy is meaningless there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BAR = 19.9
SECTION = "## Q-TTA vs TPT memory (bench_tta_memory.py)"
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FIELDS = ["model", "method", "peak_rss_mb", "base_rss_mb", "adapt_state_bytes", "ms_per_image", "n_images", "classes"]


# ---------------------------------------------------------------------------------- /proc memory
def _status(key: str) -> float:
    """VmHWM / VmRSS of this process in MB (1 MB = 2^20 bytes here, as the kernel's kB / 1024)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {key}: peak memory needs Linux")


class Peak:
    """Whole-process peak RSS that survives resets of VmHWM (resets let one phase be measured)."""

    def __init__(self) -> None:
        self.max = _status("VmHWM")

    def reset(self) -> bool:
        self.max = max(self.max, _status("VmHWM"))
        try:  # "5" resets the peak RSS counter (Linux >= 4.0); not writable in some sandboxes
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def whole(self) -> float:
        return max(self.max, _status("VmHWM"))


# ----------------------------------------------------------------------------------- the workers
def worker_qtta(spec: dict) -> dict:
    from edgevlm.adapt import QTTA, QTTAConfig
    from edgevlm.runtime import load_dual, set_num_threads

    set_num_threads(spec["threads"])
    data = np.load(spec["images"])
    imgs, labels = data["images"], data["labels"]
    enc = load_dual(spec["evlm"])
    text = enc.encode_text([f"{spec['ctx_init']} {c}" for c in spec["classnames"]])   # [C, E]
    adapter = QTTA(text, QTTAConfig(logit_scale=float(np.exp(enc.logit_scale))))
    base = _status("VmRSS")
    zs, preds, secs = [], [], 0.0
    for im in imgs:
        t0 = time.perf_counter()
        f = enc.encode_image(im)[0]                       # [E], one view, L2-normalised
        z = adapter(f)                                    # cache update + adapted logits [C]
        secs += time.perf_counter() - t0
        zs.append(int(np.argmax(text @ f)))
        preds.append(int(np.argmax(z)))
    return {"peak_rss_mb": _status("VmHWM"), "base_rss_mb": base, "adapt_state_bytes": int(adapter.nbytes),
            "ms_per_image": 1000 * secs / len(imgs), "acc_zeroshot": float(np.mean(np.asarray(zs) == labels)),
            "acc": float(np.mean(np.asarray(preds) == labels)), "file_mb": os.path.getsize(spec["evlm"]) / 1e6}


def worker_tpt(spec: dict) -> dict:
    import torch
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from tpt_baseline import TPT, TPTConfig

    torch.set_num_threads(spec["threads"])
    peak = Peak()
    data = np.load(spec["images"])
    imgs, labels = data["images"], data["labels"]
    d = spec["model_dir"]
    model = CLIPModel.from_pretrained(d, dtype=torch.float32)
    tpt = TPT(model, AutoTokenizer.from_pretrained(d), CLIPImageProcessorPil.from_pretrained(d),
              spec["classnames"], TPTConfig(ctx_init=spec["ctx_init"], pad=spec["pad"], n_views=spec.get("views", 64)))
    base = _status("VmRSS")
    # storages that are not activations: frozen weights (saved for d(input)) and ctx itself
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), tpt.ctx]}
    saved: dict[int, int] = {}
    probe: dict = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            saved[s.data_ptr()] = s.nbytes()
        return t

    @contextlib.contextmanager
    def first_step():
        probe["rss_before"] = _status("VmRSS")
        probe["hwm_reset"] = peak.reset()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        probe["hwm_after"] = _status("VmHWM")

    zs, preds, secs, t_views, t_tune = [], [], 0.0, 0.0, 0.0
    for i, im in enumerate(imgs):
        t0 = time.perf_counter()
        z, p, tm = tpt.predict(im, step_context=first_step if i == 0 else None)
        secs += time.perf_counter() - t0
        t_views, t_tune = t_views + tm["views_s"], t_tune + tm["tune_s"]
        if i == 0:   # TPT really backpropagated: ctx moved away from its init
            ctx_delta = float((tpt.ctx.detach() - tpt.ctx_init).abs().max())
            grad_bytes = sum(g.numel() * g.element_size() for g in [tpt.ctx.grad] if g is not None)
            opt_bytes = sum(v.numel() * v.element_size() for st in tpt.opt.state.values()
                            for v in st.values() if torch.is_tensor(v))
        zs.append(z)
        preds.append(p)
    act = sum(saved.values())
    param = tpt.ctx.numel() * tpt.ctx.element_size()
    n = len(imgs)
    return {"peak_rss_mb": peak.whole(), "base_rss_mb": base, "adapt_state_bytes": act + param + grad_bytes + opt_bytes,
            "saved_activation_bytes": act, "ctx_grad_opt_bytes": param + grad_bytes + opt_bytes,
            "step_peak_delta_mb": (probe["hwm_after"] - probe["rss_before"]) if probe["hwm_reset"] else None,
            "ms_per_image": 1000 * secs / n, "ms_views": 1000 * t_views / n, "ms_tune": 1000 * t_tune / n,
            "acc_zeroshot": float(np.mean(np.asarray(zs) == labels)), "acc": float(np.mean(np.asarray(preds) == labels)),
            "ctx_delta": ctx_delta, "n_ctx": tpt.n_ctx, "seq_len": int(tpt.ids.shape[1]), "n_views": tpt.cfg.n_views,
            "file_mb": sum(f.stat().st_size for f in Path(d).glob("*.safetensors")) / 1e6}


def run_worker(method: str, spec: dict, threads: int) -> dict:
    """One method in a fresh interpreter (its VmHWM is its own); returns its result dict."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads),
           "OPENBLAS_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", method, "--spec", json.dumps(spec)],
                       capture_output=True, text=True, env=env, cwd=str(ROOT))
    if r.returncode != 0:
        raise RuntimeError(f"{method} worker failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------- models and data
def build_vit_b16(out: Path, seed: int = 0) -> Path:
    """Random-weight CLIP with ViT-B/16's shapes (150 M parameters, ~600 MB fp32), built once."""
    if (out / "config.json").exists() and list(out.glob("*.safetensors")):
        return out
    import torch
    from transformers import CLIPConfig, CLIPModel

    sys.path.insert(0, str(ROOT / "tests"))
    import hf_tiny

    tok = hf_tiny.tokenizer(add_bos=True, add_eos=True, vocab_size=49408, model_max_length=77)
    ids = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, projection_dim=512, **ids),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=16, projection_dim=512),
        projection_dim=512)
    torch.manual_seed(seed)
    return hf_tiny._save(CLIPModel(cfg).eval(), tok, out, hf_tiny.clip_image_processor(224))


def classnames(n: int) -> list[str]:
    if n < 2:
        raise ValueError(f"need >= 2 classes, got {n}")
    return (DIGITS + [f"object {i}" for i in range(n - len(DIGITS))])[:n]


def digit_images(n: int, corruption: str, severity: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n held-out demo digits [n, 32, 32, 3] uint8 (corrupted) and their labels [n]."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import demo_shift

    from edgevlm.adapt import corruptions as C

    imgs, labels, _ = demo_shift.test_stream(n)
    if corruption != "none":
        imgs = np.stack([C.corrupt(im, corruption, severity, seed=seed + i) for i, im in enumerate(imgs)])
    return imgs, np.asarray(labels)


def export_shq(src: Path, out: Path, bits: int, n_calib: int) -> Path:
    if not out.exists() or out.stat().st_mtime < max(f.stat().st_mtime for f in src.iterdir()):
        r = subprocess.run([sys.executable, "-m", "edgevlm.cli", "export", str(src), "-o", str(out), "--method",
                            "shq", "--bits", str(bits), "--n-calib", str(n_calib), "--quiet"], capture_output=True,
                           text=True, cwd=str(ROOT), env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if r.returncode != 0:
            raise RuntimeError(f"export of {src} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return out


def bench_model(name: str, model_dir: Path, evlm: Path, images: Path, classes: list[str], args) -> list[dict]:
    spec = {"model_dir": str(model_dir), "evlm": str(evlm), "images": str(images), "classnames": classes,
            "ctx_init": args.ctx_init, "pad": args.pad, "threads": args.threads, "views": args.views}
    n = len(np.load(images)["labels"])
    rows = []
    for method, label in (("qtta", f"edgevlm-q{args.bits}+qtta"), ("tpt", "tpt-fp32")):
        t0 = time.perf_counter()
        r = run_worker(method, spec, args.threads)
        log(f"  {name} {label}: peak {r['peak_rss_mb']:.0f} MB, {r['ms_per_image']:.0f} ms/image "
            f"({time.perf_counter() - t0:.0f} s)")
        rows.append({"model": name, "method": label, **{k: r[k] for k in FIELDS[2:6]}, "n_images": n,
                     "classes": len(classes), **{k: v for k, v in r.items() if k not in FIELDS}})
    return rows


# ------------------------------------------------------------------------------------- reporting
def ratio_lines(rows: list[dict]) -> list[dict]:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        q = next(r for r in rows if r["model"] == model and r["method"].endswith("qtta"))
        t = next(r for r in rows if r["model"] == model and r["method"] == "tpt-fp32")
        for what, num, den, unit in (
                ("whole-process peak RSS (VmHWM), TPT / Q-TTA", t["peak_rss_mb"], q["peak_rss_mb"], "MB"),
                ("adaptation-specific: TPT step (saved activations + ctx, grad, AdamW) / Q-TTA state (nbytes)",
                 t["adapt_state_bytes"] / 2**20, q["adapt_state_bytes"] / 2**20, "MiB")):
            ratio = num / den
            out.append({"model": model, "memory": what, "tpt": num, "qtta": den, "unit": unit, "ratio": ratio,
                        "verdict": "PASS" if ratio >= BAR else "MISS"})
        num, den = t["peak_rss_mb"] - t["base_rss_mb"], q["peak_rss_mb"] - q["base_rss_mb"]
        out.append({"model": model, "memory": "peak RSS above the loaded model (peak - base), TPT / Q-TTA",
                    "tpt": num, "qtta": den, "unit": "MB", "ratio": num / max(den, 1e-9),
                    "verdict": "PASS" if num / max(den, 1e-9) >= BAR else "MISS"})
        if t.get("step_peak_delta_mb") is not None:
            ratio = t["step_peak_delta_mb"] / (q["adapt_state_bytes"] / 2**20)
            out.append({"model": model, "memory": "adaptation-specific (RSS): TPT first step's VmHWM rise / "
                        "Q-TTA state (nbytes)", "tpt": t["step_peak_delta_mb"], "qtta": q["adapt_state_bytes"] / 2**20,
                        "unit": "MiB", "ratio": ratio, "verdict": "PASS" if ratio >= BAR else "MISS"})
    return out


def _fmt(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"


def table_md(rows: list[dict]) -> list[str]:
    lines = ["| model | method | classes | n_images | peak_rss_mb | base_rss_mb | adapt_state_bytes | "
             "TPT step RSS rise (MB) | ms_per_image | acc zero-shot -> adapted |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['classes']} | {r['n_images']} | {r['peak_rss_mb']:.1f} | "
                     f"{r['base_rss_mb']:.1f} | {r['adapt_state_bytes']:,} | {_fmt(r.get('step_peak_delta_mb'))} | "
                     f"{r['ms_per_image']:.0f} | {100 * r['acc_zeroshot']:.0f}% -> {100 * r['acc']:.0f}% |")
    return lines


def bar_md(ratios: list[dict]) -> list[str]:
    return [f"- {r['model']}: {r['memory']}: {r['tpt']:.2f} / {r['qtta']:.3f} {r['unit']} = **{r['ratio']:.1f}x** "
            f"-> {r['verdict']} (bar >= {BAR}x)" for r in ratios]


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import torch
    import transformers

    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "versions": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__}}


def section_lines(res: dict) -> list[str]:
    a, m = {"views": 64, **res["args"]}, res["machine"]
    v = ", ".join(f"{k} {x}" for k, x in m["versions"].items())
    n_ctx = next((r["n_ctx"] for r in res["rows"] if r["method"] == "tpt-fp32"), "?")
    return [
        SECTION, "",
        f"Written by `benchmarks/bench_tta_memory.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
        f"in {res['seconds']:.0f} s.", "",
        "### Machine", "",
        f"- CPU: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['mem_total_gb']} GiB RAM, {a['threads']} threads "
        f"for both methods; load average at start {m['loadavg']} (shared machine: times are indicative)",
        f"- versions: {v}", "",
        "### Command", "", "```", res["command"], "```", "",
        "### Method", "",
        "- Each method runs in its own fresh Python process on the same model folder, the same images and the "
        "same label set; peak_rss_mb = VmHWM of that process at the end (whole process: interpreter, libraries, "
        "weights, activations), base_rss_mb = VmRSS after loading the model and preparing the classes, before "
        "the first image. MB = 2^20 bytes.",
        f"- edgevlm-q{a['bits']}+qtta: SHQ export ({a['bits']}-bit vision, 8-bit text), edgevlm runtime (no torch), "
        "one view per image at batch 1, `QTTA` with TDA's defaults (int8 keys, 3 positive + 2 negative per class). "
        "adapt_state_bytes = `QTTA.nbytes` (caches + float32 classifier copy).",
        f"- tpt-fp32: `benchmarks/tpt_baseline.py`, torch fp32 `CLIPModel`: {a['views']} views (original + "
        f"{a['views'] - 1} random resized crops/flips), {n_ctx} context tokens from \"{a['ctx_init']}\", prompts "
        f"padded {'to max_position_embeddings (as clip.tokenize)' if a['pad'] == 'max_length' else 'to the longest'}, "
        f"one AdamW step (lr 5e-3) on the entropy of the {max(1, int(a['views'] * 0.1))} most confident views' mean "
        "prediction, predict with the "
        "tuned prompt, reset per image. adapt_state_bytes = activations saved for backward (unique storages "
        "from `saved_tensors_hooks`, frozen weights excluded) + ctx + grad + AdamW moments; \"TPT step RSS rise\" "
        "= VmHWM during the first step (reset via /proc/self/clear_refs) minus VmRSS before it.",
        f"- Images: the first n held-out demo digits, {a['corruption']} severity {a['severity']}; on vit-b16 (random "
        "weights) they are resized to 224 px by the processor and accuracy means nothing.", "",
        "### Results", "", *table_md(res["rows"]), "",
        "### Bars", "",
        f"Bar: Q-TTA's peak memory >= {BAR}x smaller than the gradient-based baseline's (issue 4). The headline is "
        "whole-process peak RSS; the adaptation-specific lines compare only what each method adds for adapting.", "",
        *bar_md(res["ratios"]), "",
    ]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write rows, ratios and machine info here")
    p.add_argument("--results", help="markdown file whose section this run (re)writes, e.g. benchmarks/RESULTS.md")
    p.add_argument("--models", default="demo-clip,vit-b16", help="comma list of demo-clip, vit-b16, or HF folders")
    p.add_argument("--n", type=int, default=16, help="images per stream on demo-clip (and on HF folders)")
    p.add_argument("--n-large", type=int, default=3, help="images per stream on vit-b16 (TPT takes ~10 s+ each)")
    p.add_argument("--classes", type=int, default=10, help="label set size on demo-clip (<= 10: the digits)")
    p.add_argument("--classes-large", type=int, default=100, help="label set size on vit-b16")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--n-calib", type=int, default=16, help="SHQ calibration images/texts for the export")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx-init", default="a photo of a", help="TPT's context init; also Q-TTA's prompt prefix")
    p.add_argument("--views", type=int, default=64, help="TPT views per image (original + random crops)")
    p.add_argument("--pad", default="max_length", choices=["max_length", "longest"], help="TPT prompt padding")
    p.add_argument("--corruption", default="gaussian_noise")
    p.add_argument("--severity", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=str(ROOT / "build" / "tta_memory"))
    p.add_argument("--from-json", help="comma list of earlier runs' --json files: merge their rows and rewrite "
                   "the report (--json/--results) without measuring")
    p.add_argument("--worker", choices=["qtta", "tpt"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        res = (worker_qtta if args.worker == "qtta" else worker_tpt)(json.loads(args.spec))
        print(json.dumps(res))
        return 0
    if args.from_json:
        return report_from_json([Path(x) for x in args.from_json.split(",")], args)
    t_start = time.perf_counter()
    info = machine()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name == "demo-clip":
            src, n, C = ROOT / "models" / "demo-clip", args.n, args.classes
            if C > len(DIGITS):
                raise SystemExit(f"demo-clip knows only the {len(DIGITS)} digit words; --classes {C} is too many")
        elif name == "vit-b16":
            log(f"[{name}] build the random-weight CLIP ViT-B/16 under {work}")
            src, n, C = build_vit_b16(work / "vit-b16-random"), args.n_large, args.classes_large
        elif Path(name).is_dir():
            src, n, C = Path(name), args.n, args.classes
            name = src.name
        else:
            raise SystemExit(f"unknown model {name!r}: use demo-clip, vit-b16 or a Hugging Face CLIP folder")
        log(f"[{name}] SHQ {args.bits}-bit export")
        evlm = export_shq(src, work / f"{name}-shq{args.bits}.evlm", args.bits, args.n_calib)
        imgs, labels = digit_images(n, args.corruption, args.severity, args.seed)
        npz = work / f"{name}-images.npz"
        np.savez(npz, images=imgs, labels=labels)
        rows += bench_model(name, src, evlm, npz, classnames(C), args)
    return report(rows, info, args, _command(argv), time.perf_counter() - t_start)


def _command(argv) -> str:
    return " ".join(shlex.quote(x) for x in [".venv/bin/python", "benchmarks/bench_tta_memory.py",
                                            *(sys.argv[1:] if argv is None else argv)])


def report_from_json(paths: list[Path], args) -> int:
    """Merge earlier runs (same machine, same settings) into one report; the commands are listed."""
    runs = [json.loads(p.read_text()) for p in paths]
    rows = [r for run in runs for r in run["rows"]]
    a = argparse.Namespace(**{**runs[0]["args"], "json": args.json, "results": args.results})
    return report(rows, runs[0]["machine"], a, "\n".join(run["command"] for run in runs),
                  sum(run["seconds"] for run in runs))


def report(rows: list[dict], info: dict, args, command: str, seconds: float) -> int:
    ratios = ratio_lines(rows)
    res = {"rows": rows, "ratios": ratios, "machine": info,
           "args": vars(args) | {"worker": None, "spec": None, "from_json": None}, "command": command,
           "seconds": seconds}
    print("\n".join(table_md(rows)))
    print("\n".join(bar_md(ratios)))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))
    if args.results:
        from bench_quality import write_section

        write_section(args.results, section_lines(res), SECTION)
        log(f"wrote section '{SECTION}' of {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
