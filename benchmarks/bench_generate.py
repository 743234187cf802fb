#!/usr/bin/env python3
"""Generation benchmark: edgevlm q4/q3/q2 vs transformers fp32, same machine, same threads.

    python benchmarks/bench_generate.py --json build/bench_generate.json --results benchmarks/RESULTS.md
    python benchmarks/bench_generate.py --models tiny-llava --bits 4 --new-tokens 8 --json /tmp/g.json  # smoke

Models are random-weight models built from real configurations (no hub here): a SmolVLM-256M-like
(SigLIP-93M vision at 512 px, pixel-shuffle connector, SmolLM2-135M-like Llama text) and a
Qwen2-VL-2B-like (675M ViT with 2x2 merge, Qwen2-1.5B-like text, tied embeddings).  Speed does not
depend on the weights' values, so the exports use RTN (GPTQ files have the same qtypes and
layout).  Each measurement runs in a fresh subprocess so peak RSS (VmHWM) is its own:

encode_ms       image preprocessing + vision tower + connector (edgevlm: ``Runtime.prepare``;
                transformers: ``get_image_features``)
prefill_tok_s   prompt tokens / time of the prompt pass (vision excluded)
decode_tok_s    (new tokens - 1) / time after the first token (eos ignored: exactly N tokens)
ttft_ms         encode + prefill (time to the first generated token)
peak_rss_mb     the process's VmHWM at the end; file_mb the .evlm size (transformers: safetensors
                fp32 size); kv_mb the KV cache for prompt + new tokens
A warm-up generation (2 tokens) precedes every timed one.  Batch-1 decode is bound by memory
bandwidth: bytes streamed per token (the LM's packed weights + the LM head) / read bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
SECTION = "## Generation benchmark (bench_generate.py)"
COLS = ["model", "impl", "bits", "head_bits", "kv_cache", "threads", "encode_ms", "prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_mb",
        "file_mb", "kv_mb", "prompt_tokens", "new_tokens", "base_rss_mb", "isa", "lm_mb", "decode_gb_s"]


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmHWM: peak RSS, VmRSS: current RSS) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return _status_mb("VmHWM")


def bench_image():
    """A real photo that ships offline (scikit-image's astronaut, 512x512 RGB), read with PIL
    from skimage's data folder: ``skimage.data.astronaut()`` imports scipy & co, +24..37 MiB of
    RSS in the measured process that the runtime never needs (same pixels, checked)."""
    import importlib.util

    from PIL import Image

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the benchmark image is scikit-image's astronaut.png: pip install scikit-image")
    return Image.open(os.path.join(spec.submodule_search_locations[0], "data", "astronaut.png")).convert("RGB")


# ------------------------------------------------------------------------------------------------
# Model folders (random weights, real shapes)

def build_model(name: str, out: Path) -> Path:
    """Write the HF folder of benchmark model ``name`` (skipped when already complete)."""
    if (out / ".complete").exists():
        return out
    import torch

    torch.manual_seed(0)
    if name == "tiny-llava":
        import hf_tiny

        d = hf_tiny.make_llava(out, vision="clip", text="llama")
        (out / ".complete").write_text("ok")
        return d
    if name in BUILDERS:
        return BUILDERS[name](out)
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def _import_builder(module: str, fn: str):
    def build(out: Path) -> Path:
        import importlib

        return getattr(importlib.import_module(module), fn)(out)
    return build


#: benchmark models beyond tiny-llava: builders that write a random-weight HF folder
BUILDERS = {
    "smolvlm-256m": _import_builder("bench_models", "smolvlm_256m"),
    "qwen2vl-2b": _import_builder("bench_models", "qwen2vl_2b"),
}
MODELS = ["tiny-llava", *BUILDERS]


# ------------------------------------------------------------------------------------------------
# Workers (each in its own process)

def worker_edgevlm(a) -> dict:
    import PIL.Image  # noqa: F401  (imported before the baseline: the runtime needs it for images)

    from edgevlm.runtime.vlm import Runtime

    base = _status_mb("VmRSS")  # interpreter + numpy + tokenizers + Pillow + the extension, before the model
    rt = Runtime.load(a.evlm, threads=a.threads, kv_dtype=a.kv_cache)
    img = bench_image()
    text = rt.format("Describe this image in detail.", 1)
    rt.prepare(text, [img])                                   # warm-up: page in the vision weights
    t0 = time.perf_counter()
    p = rt.prepare(text, [img])
    encode_ms = 1e3 * (time.perf_counter() - t0)
    if a.ids_out:
        np.save(a.ids_out, p.input_ids)
    t = p.input_ids.size
    rt.set_ctx(t + a.new_tokens + 1)
    rt.generate_ids(p, 2, ignore_eos=True)                    # warm-up: page in the LM
    tm: dict = {}
    out = rt.generate_ids(p, a.new_tokens, timings=tm, ignore_eos=True)
    prefill_ms, decode_ms = tm["prefill_ms"], tm["decode_ms"]
    decode_tok_s = (len(out) - 1) / (decode_ms / 1e3)
    lm = lm_bytes_per_token(rt)
    from edgevlm import _core

    return {"encode_ms": encode_ms, "prefill_tok_s": t / (prefill_ms / 1e3),
            "decode_tok_s": decode_tok_s, "ttft_ms": encode_ms + prefill_ms,
            "peak_rss_mb": peak_rss_mb(), "file_mb": os.path.getsize(a.evlm) / 2**20,
            "kv_mb": rt.kv_bytes / 2**20, "prompt_tokens": t, "new_tokens": len(out), "base_rss_mb": base,
            "isa": _core.default_isa(), "lm_mb": lm / 2**20, "decode_gb_s": lm * decode_tok_s / 1e9}


def lm_bytes_per_token(rt) -> int:
    """Bytes of weights one decode step streams: every decoder-layer linear and the LM head
    (the physical floor of batch-1 decode is this over the memory bandwidth)."""
    dec = rt.decoder
    lins = [getattr(L, n) for L in dec.layers for n in ("q", "k", "v", "o", "gate", "up", "down") if hasattr(L, n)]
    lins.append(dec.head)
    return sum(int(x.quant.blob.nbytes) if x.quant is not None else int(x.wt.nbytes) for x in lins)


def _torch_inputs(family: str, model_dir: Path, img, ids: np.ndarray):
    import torch

    from edgevlm.export.source import pil_image_processor

    cfg = json.loads((model_dir / "config.json").read_text())
    vtype = (cfg.get("vision_config") or {}).get("model_type", "")
    proc = pil_image_processor(model_dir, vtype)
    if family in ("idefics3", "smolvlm"):
        enc = proc(images=[[img]], return_tensors="pt")
        vis = {"pixel_values": enc["pixel_values"], "pixel_attention_mask": enc["pixel_attention_mask"]}
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        enc = proc(images=[img], return_tensors="pt")
        vis = {"pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"]}
    else:
        vis = {"pixel_values": proc(images=[img], return_tensors="pt")["pixel_values"]}
    input_ids = torch.from_numpy(ids.astype(np.int64))[None]
    extra = {}
    if family in ("qwen2_vl", "qwen2_5_vl"):
        extra["mm_token_type_ids"] = (input_ids == cfg["image_token_id"]).long()
    return input_ids, vis, extra


def worker_torch(a) -> dict:
    import torch
    import transformers

    torch.set_num_threads(a.threads)
    model_dir = Path(a.model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cls = getattr(transformers, cfg["architectures"][0])
    model = cls.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    img = bench_image()
    ids = np.load(a.ids)
    with torch.no_grad():
        def run(new: int):
            t0 = time.perf_counter()
            input_ids, vis, extra = _torch_inputs(a.family, model_dir, img, ids)
            t1 = time.perf_counter()
            model.get_image_features(**vis)
            t2 = time.perf_counter()
            am = torch.ones_like(input_ids)
            model(input_ids=input_ids, attention_mask=am, **vis, **extra)
            t3 = time.perf_counter()
            out = model.generate(input_ids=input_ids, attention_mask=am, **vis, **extra, do_sample=False,
                                 max_new_tokens=new, min_new_tokens=new)
            t4 = time.perf_counter()
            return t0, t1, t2, t3, t4, out.shape[1] - input_ids.shape[1]
        run(2)
        t0, t1, t2, t3, t4, n = run(a.new_tokens)
    encode_ms = 1e3 * (t2 - t0)                   # preprocessing + vision tower + connector
    forward_ms = 1e3 * (t3 - t2)                  # vision again + the prompt pass
    prefill_ms = forward_ms - 1e3 * (t2 - t1)
    decode_ms = 1e3 * (t4 - t3) - forward_ms      # generate = one prompt pass + (n - 1) steps
    st = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    kv = 2 * model.config.get_text_config().num_hidden_layers * ids.size
    tc = model.config.get_text_config()
    hd = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    kv_mb = kv * (tc.num_key_value_heads or tc.num_attention_heads) * hd * 4 / 2**20
    return {"encode_ms": encode_ms, "prefill_tok_s": ids.size / (prefill_ms / 1e3),
            "decode_tok_s": (n - 1) / (decode_ms / 1e3), "ttft_ms": encode_ms + prefill_ms,
            "peak_rss_mb": peak_rss_mb(), "file_mb": st / 2**20, "kv_mb": kv_mb,
            "prompt_tokens": int(ids.size), "new_tokens": int(n)}


def _spawn(args: list[str], log) -> dict:
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"worker {args[:2]} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
def export_bits(model_dir: Path, bits: int, work: Path, log, head_bits: int | None = None) -> Path:
    """The cached RTN export at ``bits`` (LM head at ``head_bits``; None = the exporter's default)."""
    import contextlib
    import io

    from edgevlm.export import ExportConfig, export

    out = work / (f"{model_dir.name}-q{bits}.evlm" if head_bits is None else f"{model_dir.name}-q{bits}-h{head_bits}.evlm")
    if not out.exists():
        log(f"  exporting {model_dir.name} at {bits} bits (rtn, head {head_bits or 'default'}) ...")
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            export(model_dir, out, ExportConfig(method="rtn", bits=bits, head_bits=head_bits, n_calib=2))
        log(f"  exported {out.name}: {out.stat().st_size / 2**20:.1f} MiB in {time.perf_counter() - t0:.0f} s")
    return out


def family_of(model_dir: Path) -> str:
    from edgevlm.export.tensor_map import family_for

    return family_for(json.loads((model_dir / "config.json").read_text())).name


def run(a, log) -> list[dict]:
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in a.models:
        log(f"{name}: building the random-weight HF folder ...")
        d = build_model(name, work / name)
        fam = family_of(d)
        ids_path = work / f"{name}.ids.npy"
        for bits, head_bits in a.bits:
            f = export_bits(d, bits, work, log, head_bits)
            log(f"  edgevlm q{bits} (head {head_bits or 'default'}), {a.threads} threads ...")
            r = _spawn(["--_worker", "edgevlm", "--evlm", str(f), "--threads", str(a.threads), "--new-tokens",
                        str(a.new_tokens), "--ids-out", str(ids_path), "--kv-cache", a.kv_cache], log)
            rows.append({"model": name, "impl": "edgevlm", "bits": bits, "head_bits": head_bits,
                         "kv_cache": a.kv_cache, "threads": a.threads, **r})
            log("   " + _fmt(rows[-1]))
        if not a.skip_torch:
            log(f"  transformers fp32, {a.threads} threads ...")
            r = _spawn(["--_worker", "torch", "--model-dir", str(d), "--family", fam, "--ids", str(ids_path),
                        "--threads", str(a.threads), "--new-tokens", str(a.new_tokens)], log)
            rows.append({"model": name, "impl": "transformers", "bits": 32, "threads": a.threads, **r})
            log("   " + _fmt(rows[-1]))
    return rows


def _fmt(r: dict) -> str:
    return (f"encode {r['encode_ms']:.0f} ms, prefill {r['prefill_tok_s']:.1f} tok/s, decode "
            f"{r['decode_tok_s']:.2f} tok/s, ttft {r['ttft_ms']:.0f} ms, peak RSS {r['peak_rss_mb']:.0f} MiB, "
            f"file {r['file_mb']:.0f} MiB, KV {r['kv_mb']:.1f} MiB")


def bars(rows: list[dict]) -> list[str]:
    """Bar lines, per KV-cache type of the edgevlm rows (transformers rows count for each)."""
    kinds = sorted({r.get("kv_cache") or "f32" for r in rows if r["impl"] == "edgevlm"}) or ["f32"]
    out = []
    for kv in kinds:
        sel = [r for r in rows if r["impl"] != "edgevlm" or (r.get("kv_cache") or "f32") == kv]
        tag = "" if len(kinds) == 1 else f"[{kv} KV cache] "
        out += [f"- {tag}{line[2:]}" for line in _bars(sel)]
    return out


def _bars(rows: list[dict]) -> list[str]:
    out = []
    # Repeated rows of one configuration (e.g. --bits 4,2,4,2) count by their median decode speed.
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["impl"], r["bits"], r.get("head_bits")), []).append(r)
    med = {k: dict(v[0], decode_tok_s=float(np.median([x["decode_tok_s"] for x in v])), runs=len(v))
           for k, v in groups.items()}
    by = {k[:3]: r for k, r in med.items() if k[3] is None}
    h2 = {k[0]: r for k, r in med.items() if k[2] == 2 and k[3] == 2}
    for m in sorted({r["model"] for r in rows}):
        t, q4, q2 = by.get((m, "transformers", 32)), by.get((m, "edgevlm", 4)), by.get((m, "edgevlm", 2))
        if any(r["runs"] > 1 for r in (t, q4, q2, h2.get(m)) if r):
            out.append(f"- {m}: decode speeds below are medians of repeated runs "
                       f"(q4 x{q4['runs'] if q4 else 0}, q2 x{q2['runs'] if q2 else 0}"
                       f"{', q2 with a 2-bit head x' + str(h2[m]['runs']) if m in h2 else ''})")
        if t and q4:
            x = q4["decode_tok_s"] / t["decode_tok_s"]
            out.append(f"- {m}: decode q4 {q4['decode_tok_s']:.2f} tok/s vs transformers fp32 "
                       f"{t['decode_tok_s']:.2f} tok/s = {x:.2f}x ({'PASS' if x >= 4 else 'MISS'} bar >= 4x)")
        if q4 and q2:
            x = q2["decode_tok_s"] / q4["decode_tok_s"]
            out.append(f"- {m}: decode q2/q4 = {x:.2f}x ({'PASS' if x >= 1.6 else 'MISS'} bar >= 1.6x; "
                       f"both with the default 4-bit LM head)")
        if q4 and m in h2:
            x = h2[m]["decode_tok_s"] / q4["decode_tok_s"]
            out.append(f"- {m}: decode q2 with a 2-bit head (--head-bits 2) / q4 = {x:.2f}x "
                       f"({'PASS' if x >= 1.6 else 'MISS'} bar >= 1.6x)")
        for r in rows:
            if r["model"] == m and r["impl"] == "edgevlm":
                lim = 1.2 * r["file_mb"] + r["kv_mb"]
                base = r.get("base_rss_mb", float("nan"))
                hb = "" if r.get("head_bits") is None else f" (head q{r['head_bits']})"
                out.append(f"- {m}: q{r['bits']}{hb} peak RSS {r['peak_rss_mb']:.0f} MiB vs 1.2 x file + KV = "
                           f"{lim:.0f} MiB ({'PASS' if r['peak_rss_mb'] <= lim else 'MISS'}; the process "
                           f"before loading the model: {base:.0f} MiB)")
    return out


def table_md(rows: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(COLS) + " |", "|" + "---|" * len(COLS)]
    for r in rows:
        cells = [f"{r[c]:.1f}" if isinstance(r.get(c), float) else "-" if r.get(c) is None else str(r[c])
                 for c in COLS]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smolvlm-256m,qwen2vl-2b", help=f"comma-separated: {', '.join(MODELS)}")
    p.add_argument("--bits", default="4,3,2",
                   help="widths to run; 'BhH' = width B with an H-bit LM head (e.g. 2h2), else the default head")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--workdir", default=str(ROOT / "build" / "bench_generate"), help="model folders and exports")
    p.add_argument("--json", help="write the rows here (required)")
    p.add_argument("--results", default=None, help=f"replace/append the section '{SECTION}' of this markdown file")
    p.add_argument("--skip-torch", action="store_true", help="edgevlm rows only")
    p.add_argument("--kv-cache", choices=("f32", "f16"), default="f32", help="the edgevlm rows' KV-cache type")
    p.add_argument("--render-only", action="store_true",
                   help="measure nothing: print (and with --results write) the table and bars of the --json rows")
    # worker mode (internal)
    p.add_argument("--_worker", choices=["edgevlm", "torch"], help=argparse.SUPPRESS)
    for x in ("--evlm", "--ids-out", "--model-dir", "--family", "--ids"):
        p.add_argument(x, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.models = [m for m in a.models.split(",") if m]
    a.bits = [tuple(int(x) for x in b.split("h")) if "h" in b else (int(b), None) for b in a.bits.split(",") if b]
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a._worker:
        r = worker_edgevlm(a) if a._worker == "edgevlm" else worker_torch(a)
        print(json.dumps(r))
        return 0
    if not a.json:
        raise SystemExit("--json PATH is required (where the result rows are written)")
    for m in a.models:
        if m not in MODELS:
            raise SystemExit(f"unknown model {m!r}; choose from {', '.join(MODELS)}")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.time()
    if a.render_only:
        rows = json.loads(Path(a.json).read_text())
    else:
        rows = run(a, log)
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(rows, indent=1))
    bar_lines = bars(rows)
    print("\n".join(table_md(rows) + [""] + bar_lines))
    if a.results:
        from bench_quality import machine_info, write_section
        info = machine_info()
        cmd = "python benchmarks/bench_generate.py " + " ".join(argv if argv is not None else sys.argv[1:])
        lines = [SECTION, "", f"Machine: {info['cpu']}, {info['logical_cpus']} logical CPUs; load average at the end "
                 f"{info['loadavg']}; versions {info['versions']}."
                 + ("" if a.render_only else f" Run took {time.time() - t0:.0f} s."), "",
                 "```", cmd, "```", "", *table_md(rows), "", "Bars:", "", *bar_lines, ""]
        write_section(a.results, lines, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
