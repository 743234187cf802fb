"""SPEED-Q vs GPTQ vs RTN at 2 bits on a small LLaVA whose language model has been trained.

A random-weight model has near-uniform next-token distributions, on which every quantizer
looks alike; so the tiny LLaVA of tests/hf_tiny.py (or a wider one, --hidden/--layers) first
has its language model and projector trained for --pretrain-steps on the built-in calibration
captions + sentences (next-token CE, image prompts included).  Each method then exports it at
2 bits; the file's dequantized weights are loaded into transformers (evaluate.load_into_model)
and compared with the fp32 model on held-out sentences (sentences.txt lines the export's
calibration sample did not draw) and held-out image prompts (augmented views): mean per-token
KL(p_fp || p_q) and teacher-forced greedy-token agreement (argmax equal).

    .venv/bin/python benchmarks/bench_speedq.py                   # hidden 64, 2 layers (~10 min on 2 idle cores)
    .venv/bin/python benchmarks/bench_speedq.py --hidden 256 --layers 4 --device cuda   # ~2 min with a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
SECTION = "## SPEED-Q vs GPTQ / RTN at 2 bits (bench_speedq.py)"


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
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for s in range(steps):
        b = batches[s % len(batches)]
        lg = ad.logits(b, feats[b.images] if b.images else None)
        loss = torch.nn.functional.cross_entropy(lg[:, :-1].flatten(0, 1), b.labels[:, 1:].flatten(),
                                                 ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(src)


def heldout(n_calib: int, n_texts: int = 48, n_images: int = 8, seed: int = 123):
    """Held-out batches: sentences the exports' calibration sample (n_calib, seed 0) does not
    contain, and augmented views (other crops / flips, another seed) of the 18 built-in photos."""
    from edgevlm.export.calib_data import CalibSet, builtin_dir, load_calib

    used = set(load_calib(None, n_images=n_calib, n_texts=n_calib, seed=0).texts)
    lines = [ln.strip() for ln in (builtin_dir() / "sentences.txt").read_text().splitlines() if ln.strip()]
    texts = tuple([t for t in lines if t not in used][-n_texts:])
    views = load_calib(None, n_images=n_images + 18, n_texts=1, seed=seed)
    return CalibSet(views.images[18:], views.captions[18:], texts, "held-out")


def fidelity(path, src, calib) -> tuple[float, float]:
    """(mean KL(p_fp || p_q) per label token, greedy agreement) of the file's model vs fp32."""
    import torch
    import torch.nn.functional as F
    import transformers

    from edgevlm.export.evaluate import load_into_model
    from edgevlm.export.source import open_source
    from edgevlm.export.speedq_llava import adapter_for

    source = open_source(src)
    fp = adapter_for(transformers.LlavaForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval(),
                     source)
    qm = adapter_for(load_into_model(path, src).eval(), source)
    kl = agree = count = 0.0
    with torch.no_grad():
        pv = fp.pixels(calib)
        f_fp, f_q = fp.features(pv), qm.features(pv)
        for b in fp.batches(calib, 8):
            sel = (lambda f: f[b.images] if b.images else None)
            lt = F.log_softmax(fp.logits(b, sel(f_fp))[:, :-1], -1)
            lq = F.log_softmax(qm.logits(b, sel(f_q))[:, :-1], -1)
            m = b.labels[:, 1:] != -100
            kl += float((lt.exp() * (lt - lq)).sum(-1)[m].sum())
            agree += float((lt.argmax(-1) == lq.argmax(-1))[m].sum())
            count += float(m.sum())
    return kl / count, agree / count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--speedq-steps", type=int, default=800)
    ap.add_argument("--speedq-lr", type=float, default=1e-4)
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    import hf_tiny
    from bench_quality import write_section

    from edgevlm.export import ExportConfig
    from edgevlm.export.pipeline import run_export

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = hf_tiny.make_llava(tmp / "hf", vision="clip", text="qwen2", hidden=args.hidden,
                                 intermediate=2 * args.hidden, text_layers=args.layers,
                                 heads=max(4, args.hidden // 32), kv_heads=max(2, args.hidden // 64))
        t0 = time.perf_counter()
        pretrain_llava(src, args.pretrain_steps)
        print(f"pretrained the LM for {args.pretrain_steps} steps in {time.perf_counter() - t0:.1f} s", flush=True)
        calib = heldout(args.n_calib)
        base = dict(bits=2, n_calib=args.n_calib, progress=False)
        runs = [("rtn g32", dict(method="rtn", group=32)), ("rtn g32 + clip search", dict(method="rtn", group=32,
                                                                                       clip_search=True)),
                ("gptq g32", dict(method="gptq", group=32)),
                ("speedq (q2b LM)", dict(method="speedq", speedq_steps=args.speedq_steps, speedq_lr=args.speedq_lr,
                                         speedq_device=args.device))]
        rows = []
        for name, kw in runs:
            t0 = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()):
                rep = run_export(src, tmp / f"{len(rows)}.evlm", ExportConfig(**{**base, **kw}))
            secs = time.perf_counter() - t0
            kl, agree = fidelity(rep.path, src, calib)
            rows.append((name, kl, agree, rep.bits_per_param, secs))
            print(f"{name:<24} KL {kl:.4f}  greedy agreement {agree:.3f}  {rep.bits_per_param:.2f} bits/param  "
                  f"export {secs:.1f} s", flush=True)
    cmd = " ".join(["benchmarks/bench_speedq.py", *sys.argv[1:]])
    lines = [SECTION, "",
             f"`.venv/bin/python {cmd}`: tiny LLaVA (CLIP 2x64 vision, Qwen2 text hidden {args.hidden}, "
             f"{args.layers} layers, vocab 320) whose LM + projector were trained {args.pretrain_steps} steps on the "
             "built-in captions/sentences; 2-bit exports compared with the fp32 model (file weights in transformers) "
             f"on {len(calib.texts)} held-out sentences + {len(calib.images)} held-out image views.",
             "",
             "| method (2-bit LM, 2-bit vision) | KL(fp ‖ q) per token | greedy agreement | bits/param | export s |",
             "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {n} | {kl:.4f} | {a:.3f} | {b:.2f} | {s:.1f} |" for n, kl, a, b, s in rows]
    lines += ["", "bits/param is over the whole file: speedq keeps the projector fp16 and the embeddings/head at "
              "4 bits (SPEED-Q's layout); rtn/gptq put the projector and head at 4 bits and the embeddings at 8."]
    print("\n".join(lines))
    if not args.no_write:
        write_section(args.results, lines, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
