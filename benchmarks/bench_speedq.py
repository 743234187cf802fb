"""SPEED-Q vs GPTQ vs RTN at 2 bits on a small LLaVA whose language model has been trained.

A random-weight model has near-uniform next-token distributions, on which every quantizer
looks alike; so the tiny LLaVA of tests/hf_tiny.py (or a wider one, --hidden/--layers) first
has its language model and projector trained for --pretrain-steps on the built-in calibration
captions + sentences (next-token CE, image prompts included).  Each method then exports it at
2 bits; the file's dequantized weights are loaded into transformers (evaluate.load_into_model)
and compared with the fp32 model on held-out sentences (sentences.txt lines the export's
calibration sample did not draw) and held-out image prompts (augmented views): mean per-token
KL(p_fp || p_q) and teacher-forced greedy-token agreement (argmax equal).

Rows: rtn / gptq at g32 (3 LM bits per weight) and g64 (2.5), and speedq (q2b, 2.625) with 0
QAT steps (its GPTQ start), with the paper's init, and with the defaults; every method at each
export seed (--seeds: calibration sample and training).

    .venv/bin/python benchmarks/bench_speedq.py --hidden 128 --layers 4 --speedq-steps 400 --speedq-lr 1e-3
        # ~6 min of one core (15 min wall on a shared 2-core box)
    .venv/bin/python benchmarks/bench_speedq.py --hidden 256 --layers 4 --device cuda   # the training on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
SECTION = "## SPEED-Q vs GPTQ / RTN at 2 bits (bench_speedq.py)"


def _fit(model, params: list, loss_at, steps: int, lr: float) -> None:
    """AdamW (no weight decay) over ``params`` for ``steps`` steps of ``loss_at(step)`` (a scalar
    loss tensor of the step's batch); the training loop every pretrain_* shares."""
    import torch

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for s in range(steps):
        loss = loss_at(s)
        opt.zero_grad()
        loss.backward()
        opt.step()


def pretrain(src, steps: int, lr: float = 3e-3, seed: int = 0, n: int = 64) -> None:
    """Train the language model + projector of the VLM folder ``src`` in place on the built-in
    calibration image prompts and texts (next-token CE), by its architecture: LLaVA
    (:func:`pretrain_llava`) or Qwen3-VL-MoE (:func:`pretrain_qwen3vlmoe`)."""
    import json

    arch = json.loads((Path(src) / "config.json").read_text())["architectures"][0]
    fns = {"LlavaForConditionalGeneration": pretrain_llava, "Qwen3VLMoeForConditionalGeneration": pretrain_qwen3vlmoe}
    if arch not in fns:
        raise ValueError(f"pretrain supports {', '.join(fns)}; got {arch} in {src}")
    fns[arch](src, steps, lr=lr, seed=seed, n=n)


def pretrain_llava(src, steps: int, lr: float = 3e-3, seed: int = 0, n: int = 64) -> None:
    """Train the LM + projector of the LLaVA folder ``src`` in place (next-token CE on the
    built-in calibration image prompts and texts), so its predictions are peaked."""
    import torch
    import transformers

    from edgevlm.export.calib_data import load_calib
    from edgevlm.export.source import open_source
    from edgevlm.export.speedq_llava import adapter_for

    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
    ad = adapter_for(model, open_source(src))
    calib = load_calib(None, n_images=n, n_texts=4 * n, seed=seed + 1000)
    batches = ad.batches(calib, 8)
    with torch.no_grad():
        feats = ad.features(ad.pixels(calib))
    for p in ad.vision_tower.parameters():
        p.requires_grad_(False)

    def loss_at(s):
        b = batches[s % len(batches)]
        lg = ad.logits(b, feats[b.images] if b.images else None)
        return torch.nn.functional.cross_entropy(lg[:, :-1].flatten(0, 1), b.labels[:, 1:].flatten(),
                                                 ignore_index=-100)

    _fit(model, [p for p in model.parameters() if p.requires_grad], loss_at, steps, lr)
    model.save_pretrained(src)


def qwen3vlmoe_batches(src, calib, batch_size: int = 8) -> list[dict]:
    """Qwen3-VL-MoE training batches (HF forward kwargs with ``labels``): the calibration
    recipe's chat prompts (image + "Describe the image." + caption, recipe_qwen2vl._prompts, the
    image placeholder expanded to each image's merged-token count), ``batch_size`` images a
    batch, then the texts as plain LM samples.  Right-padded; labels -100 on padding and image
    tokens."""
    import numpy as np
    import torch

    from edgevlm.export.recipe_qwen2vl import _prompts
    from edgevlm.export.recipes import image_processor, pad_batch, tokenizer
    from edgevlm.export.source import open_source

    source = open_source(src)
    tok, image_id = tokenizer(source), int(source.config["image_token_id"])
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    merge = source.config["vision_config"]["spatial_merge_size"]
    out = image_processor(source)(images=list(calib.images), return_tensors="np")
    pv = torch.from_numpy(np.ascontiguousarray(out["pixel_values"], dtype=np.float32))   # [ΣN, C*Tp*P*P]
    grid = torch.from_numpy(np.asarray(out["image_grid_thw"], dtype=np.int64))            # [n_images, 3]
    rows = np.concatenate([[0], np.cumsum(grid.prod(-1).numpy())])
    prompts = _prompts(source, tok, calib, image_id, (grid.prod(-1) // merge ** 2).tolist())

    def batch(group: list[list[int]], **extra) -> dict:
        ids, am = pad_batch(group, pad)
        labels = ids.masked_fill((am == 0) | (ids == image_id), -100)
        return dict(input_ids=ids, attention_mask=am, labels=labels, **extra)

    batches = [batch(prompts[i:i + batch_size], pixel_values=pv[rows[i]:rows[min(i + batch_size, len(prompts))]],
                     image_grid_thw=grid[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]
    for b in batches:   # transformers 5 builds the mrope positions from it: 1 = image token
        b["mm_token_type_ids"] = (b["input_ids"] == image_id).long()
    texts = [t for t in (tok(t)["input_ids"][:256] for t in calib.texts) if len(t) >= 2]
    return batches + [batch(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]


def pretrain_qwen3vlmoe(src, steps: int, lr: float = 3e-3, seed: int = 0, n: int = 64) -> None:
    """Train the language model (attention, routers, experts) and the mergers (projector) of the
    Qwen3-VL-MoE folder ``src`` in place, the vision blocks frozen: transformers' own loss
    (next-token CE + the router load-balancing term at the config's router_aux_loss_coef, as MoE
    models are trained) on :func:`qwen3vlmoe_batches` of the built-in set, so routing follows the
    data."""
    import torch
    import transformers

    from edgevlm.export.calib_data import load_calib

    torch.manual_seed(seed)
    model = transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
    batches = qwen3vlmoe_batches(src, load_calib(None, n_images=n, n_texts=4 * n, seed=seed + 1000))
    vis = model.model.visual
    for name, p in vis.named_parameters():   # the projector = merger + DeepStack mergers stays trainable
        p.requires_grad_(name.startswith(("merger.", "deepstack_merger_list.")))
    _fit(model, [p for p in model.parameters() if p.requires_grad],
         lambda s: model(**batches[s % len(batches)], output_router_logits=True, use_cache=False).loss, steps, lr)
    model.save_pretrained(src)


def heldout(n_calib: int, seeds, n_texts: int = 64, n_images: int = 16, seed: int = 123):
    """Held-out batches: sentences that no export's calibration sample (n_calib, one per seed)
    contains, and augmented views (other crops / flips, another seed) of the 18 built-in photos."""
    from edgevlm.export.calib_data import CalibSet, builtin_dir, load_calib

    used = set()
    for s in seeds:
        used |= set(load_calib(None, n_images=n_calib, n_texts=n_calib, seed=s).texts)
    lines = [ln.strip() for ln in (builtin_dir() / "sentences.txt").read_text().splitlines() if ln.strip()]
    texts = tuple([t for t in lines if t not in used][-n_texts:])
    views = load_calib(None, n_images=n_images + 18, n_texts=1, seed=seed)
    return CalibSet(views.images[18:], views.captions[18:], texts, "held-out")


def fidelity(path, src, calib) -> tuple[float, float]:
    """(mean KL(p_fp || p_q) per label token, greedy agreement) of the file's model vs fp32."""
    import torch
    import transformers

    from edgevlm.export.evaluate import load_into_model
    from edgevlm.export.source import open_source
    from edgevlm.export.speedq import fidelity as kl_agreement
    from edgevlm.export.speedq_llava import adapter_for

    source = open_source(src)
    fp = adapter_for(transformers.LlavaForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval(),
                     source)
    qm = adapter_for(load_into_model(path, src).eval(), source)
    with torch.no_grad():
        pv = fp.pixels(calib)
        return kl_agreement(qm, fp, fp.batches(calib, 8), qm.features(pv), fp.features(pv))


#: (row name, LM linear bits per weight, ExportConfig overrides); speedq_* budgets filled in by main()
RUNS = [
    ("rtn g32", 3.0, dict(method="rtn", group=32)),
    ("gptq g32", 3.0, dict(method="gptq", group=32)),
    ("gptq g64", 2.5, dict(method="gptq", group=64)),
    ("speedq, 0 QAT steps (= GPTQ on the q2b grid)", 2.625, dict(method="speedq", speedq_steps=0)),
    ("speedq, paper init (clip + min-max), no hold-out/samples", 2.625,
     dict(method="speedq", speedq_init="rtn", speedq_val=0.0, speedq_gen=0)),
    ("speedq (GPTQ init, hold-out early stop, teacher samples)", 2.625, dict(method="speedq")),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--speedq-steps", type=int, default=300)
    ap.add_argument("--speedq-lr", type=float, default=1e-4)
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--seeds", default="0,1", help="export seeds (calibration sample + training), comma-separated")
    ap.add_argument("--only", default="", help="comma-separated row numbers (0-based) of RUNS to run")
    ap.add_argument("--model-dir", default=None,
                    help="keep the pretrained model here and reuse it when present (same --hidden/--layers)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = [r for i, r in enumerate(RUNS) if not args.only or str(i) in args.only.split(",")]

    import torch

    torch.set_num_threads(1)   # tiny matrices: a second thread only spins on a shared 2-core box
    import hf_tiny
    from bench_quality import write_section

    from edgevlm.export import ExportConfig
    from edgevlm.export.pipeline import run_export

    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = Path(args.model_dir) if args.model_dir else tmp / "hf"
        if not (src / "config.json").exists():
            src = hf_tiny.make_llava(src, vision="clip", text="qwen2", hidden=args.hidden,
                                     intermediate=2 * args.hidden, text_layers=args.layers,
                                     heads=max(4, args.hidden // 32), kv_heads=max(2, args.hidden // 64))
            t0 = time.perf_counter()
            pretrain_llava(src, args.pretrain_steps)
            print(f"pretrained the LM for {args.pretrain_steps} steps in {time.perf_counter() - t0:.1f} s",
                  flush=True)
        calib = heldout(args.n_calib, seeds)
        base = dict(bits=2, n_calib=args.n_calib, progress=True)   # progress: speedq's log lines
        sq = dict(speedq_steps=args.speedq_steps, speedq_lr=args.speedq_lr, speedq_device=args.device)
        rows = []
        for name, lm_bits, kw in runs:
            per = []
            for seed in seeds:
                cfg = {**base, **({**sq, **kw} if kw["method"] == "speedq" else kw), "seed": seed}
                torch.manual_seed(seed)
                t0 = time.perf_counter()
                err = io.StringIO()
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    rep = run_export(src, tmp / f"{len(rows)}_{seed}.evlm", ExportConfig(**cfg))
                secs = time.perf_counter() - t0
                for ln in err.getvalue().splitlines():   # speedq's summary lines (kept step, init errors)
                    if ln.startswith("speedq stage") and "%|" not in ln:
                        print("   ", ln, flush=True)
                kl, agree = fidelity(rep.path, src, calib)
                per.append((kl, agree, secs))
                print(f"{name:<58} seed {seed}: KL {kl:.4f}  greedy agreement {agree:.3f}  "
                      f"{rep.bits_per_param:.2f} bits/param  export {secs:.1f} s", flush=True)
            rows.append((name, lm_bits, rep.bits_per_param, per))
    ref = next((r[3] for r in rows if r[0] == "gptq g32"), None)
    cmd = " ".join(["benchmarks/bench_speedq.py", *sys.argv[1:]])
    lines = [SECTION, "",
             f"`.venv/bin/python {cmd}` ({time.perf_counter() - t_all:.0f} s): tiny LLaVA (CLIP 2x64 vision, Qwen2 "
             f"text hidden {args.hidden}, {args.layers} layers, vocab 320) whose LM + projector were trained "
             f"{args.pretrain_steps} steps on the built-in captions/sentences; 2-bit exports (n_calib "
             f"{args.n_calib}, export seeds {args.seeds}: calibration sample and training) compared with the fp32 "
             f"model (file weights in transformers) on {len(calib.texts)} held-out sentences (in no seed's "
             f"calibration sample) + {len(calib.images)} held-out image views; speedq: {args.speedq_steps} QAT steps "
             f"at lr {args.speedq_lr:g}.",
             "",
             f"Machine: {platform.machine()} {platform.processor() or ''} ({os.cpu_count()} cores), torch "
             f"{torch.__version__} on {args.device} ({torch.get_num_threads()} thread(s)), transformers "
             f"{importlib.metadata.version('transformers')}.",
             "",
             "| method (2-bit) | LM bits/weight | file bits/param | " +
             " | ".join(f"KL seed {s}" for s in seeds) + " | " +
             " | ".join(f"agreement seed {s}" for s in seeds) + " | KL / gptq g32 | export s |",
             "| --- | ---: | ---: | " + " | ".join(["---:"] * (2 * len(seeds))) + " | ---: | ---: |"]
    for name, lm_bits, bpp, per in rows:
        ratio = (" / ".join(f"{p[0] / r[0]:.2f}" for p, r in zip(per, ref)) if ref else "-")
        lines.append(f"| {name} | {lm_bits:g} | {bpp:.2f} | " + " | ".join(f"{p[0]:.5f}" for p in per) + " | " +
                     " | ".join(f"{p[1]:.3f}" for p in per) + f" | {ratio} | "
                     + " / ".join(f"{p[2]:.0f}" for p in per) + " |")
    lines += ["", "LM bits/weight: the language model's linears (q2 g32: 2 + 32/32; q2 g64: 2 + 32/64; q2b: "
              "2 + (2-bit zero + 4-bit scale code)/16 + 64-bit level-2 params per 16x16 block). file bits/param is "
              "over the whole file: speedq keeps the projector fp16 and the embeddings/head at 4 bits (SPEED-Q's "
              "layout); rtn/gptq put the projector and head at 4 bits and the embeddings at 8. Vision tower: q2 "
              "g32 in every row (speedq: AdaRound codes; gptq rows: GPTQ; rtn: RTN)."]
    print("\n".join(lines))
    if not args.no_write:
        write_section(args.results, lines, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
