"""The ``edgevlm`` command line.

    edgevlm info MODEL.evlm       per-tensor table: qtype, bits, group, shape, bytes, bits/weight
    edgevlm verify MODEL.evlm     check every tensor checksum (exit 1 on corruption)
    edgevlm kernels               compiled / supported ISAs, the default one, CPU features
    edgevlm export SRC -o OUT     quantize a Hugging Face model folder into an .evlm file
    edgevlm classify MODEL IMGS   zero-shot classification of an image stream (CLIP/SigLIP), --adapt for Q-TTA
    edgevlm embed MODEL           image / text embeddings to .npy or .json
    edgevlm run MODEL --prompt P  generate text about images (LLaVA, Qwen2-VL, Idefics3/SmolVLM .evlm)
    edgevlm serve MODEL...        OpenAI-compatible HTTP server (chat, embeddings, classify; the server extra)
    edgevlm export-onnx MODEL -o OUT  ONNX graph with MatMulNBits weights (CLIP/SigLIP towers, LLaVA vision)
    edgevlm convert MODEL --src SRC -o DIR --format F   Hugging Face compressed-tensors / GPTQ folder of an .evlm

Each subcommand parses its flags and calls one function; errors print a one-line message
and exit with status 2 (bad input) or 1 (corrupt file) instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.1f} GiB"


def cmd_info(path: str) -> int:
    from . import format as fmt

    with fmt.open(path) as f:
        recs = list(f.records.values())
        # the tokenizer blob is not a parameter: leave it out of the bits/parameter average
        weights = [r for r in recs if not (isinstance(r.extra, dict) and r.extra.get("kind") == "tokenizer")]
        total = sum(r.nbytes for r in weights)
        n_weights = sum(int(np.prod(r.shape)) for r in weights)
        print(f"{path}: format v{f.version}, {len(recs)} tensors, {_human(sum(r.nbytes for r in recs))} of tensor data")
        arch = f.metadata.get("architecture") or f.metadata.get("model_type")
        if arch:
            print(f"architecture: {arch}")
        q = f.metadata.get("quantization")
        if isinstance(q, dict) and "method" in q:
            print(f"quantization: {q['method']}, {q.get('bits')}-bit (text {q.get('text_bits')}-bit), group "
                  f"{q.get('group')}, calibration {q.get('calibration', {}).get('source', '-')}")
        rows = [("tensor", "qtype", "group", "shape", "bytes", "bits/w", "method", "export err")]
        for r in recs:
            numel = int(np.prod(r.shape)) or 1
            err = r.extra.get("error") if isinstance(r.extra, dict) else None
            method = r.extra.get("method", "-") if isinstance(r.extra, dict) else "-"
            rows.append((r.name, r.qtype, str(r.group_size or "-"), "x".join(map(str, r.shape)) or "scalar",
                         _human(r.nbytes), f"{8 * r.nbytes / numel:.2f}", method,
                         f"{err:.3g}" if isinstance(err, (int, float)) else "-"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if n_weights:
            print(f"average: {8 * total / n_weights:.3f} bits per parameter")
    return 0


def cmd_verify(path: str) -> int:
    from . import format as fmt

    fmt.verify(path)
    with fmt.open(path) as f:
        print(f"{path}: OK ({len(f.records)} tensors, every checksum matches)")
    return 0


def cmd_kernels() -> int:
    from .runtime import kernel_info

    print(json.dumps(kernel_info(), indent=2))
    return 0


def _export_parser(sub) -> None:
    from .export.config import BITS, ExportConfig, Format, Method
    from .export.config import SpeedQInit

    d = ExportConfig()
    s = sub.add_parser("export", help="quantize a Hugging Face model folder into an .evlm file",
                       description="Quantize a Hugging Face model folder (config.json, *.safetensors, tokenizer, "
                                   "preprocessor_config.json) into one .evlm file. Supported: CLIPModel, SiglipModel, "
                                   "LlavaForConditionalGeneration (CLIP/SigLIP + Llama/Qwen2), BertModel.")
    s.add_argument("src", help="Hugging Face model folder")
    s.add_argument("-o", "--out", required=True, help="output .evlm file (written atomically)")
    s.add_argument("--method", choices=[m.value for m in Method], default=d.method.value,
                   help="rtn: round to nearest; gptq: Hessian-based; shq: LQA selective hybrid (default); "
                        "awq: activation-aware scales + rtn with clip search")
    s.add_argument("--bits", type=int, choices=BITS, default=d.bits, help="width of the quantized layers (16 = float16)")
    s.add_argument("--text-bits", type=int, choices=BITS, default=None,
                   help="width of the text tower / language model (default: --bits; 8 for shq)")
    s.add_argument("--head-bits", type=int, choices=BITS, default=None,
                   help="width of a generative model's LM head, tied or not (default: the language model's "
                        "width, at least 4)")
    s.add_argument("--embed-bits", type=int, choices=(8, 16), default=None,
                   help="width of token-embedding tables, lookups only (default: 16 in 8-bit and float16 "
                        "exports, else the text width, at least 8; a table a tied LM head shares stays at "
                        "the head's width, at least 8, so it is stored once)")
    s.add_argument("--group", type=int, choices=(32, 64, 128), default=d.group, help="quantization group size")
    s.add_argument("--calib", default=None,
                   help="calibration data: folder of images (+ captions.jsonl, sentences.txt), .jsonl or .txt "
                        "(default: the images and sentences that ship with edgevlm)")
    s.add_argument("--n-calib", type=int, default=d.n_calib, help="calibration images and texts")
    b = s.add_mutually_exclusive_group()
    b.add_argument("--budget-bits", type=float, default=None, help="shq: size budget, average bits per parameter")
    b.add_argument("--budget-mb", type=float, default=None, help="shq: size budget, megabytes of weights")
    s.add_argument("--keep-frac", type=float, default=d.keep_frac,
                   help="shq without a budget: fraction of vision layers kept at --keep-bits")
    s.add_argument("--keep-bits", type=int, choices=(8, 16), default=d.keep_bits, help="shq: width of kept layers")
    c = s.add_mutually_exclusive_group()
    c.add_argument("--clip-search", dest="clip_search", action="store_true", default=None,
                   help="per-group range shrink search (default: on for gptq/shq, off for rtn)")
    c.add_argument("--no-clip-search", dest="clip_search", action="store_false",
                   help="plain min-max group ranges")
    s.add_argument("--no-act-order", dest="act_order", action="store_false",
                   help="gptq: quantize columns in their natural order instead of by descending Hessian diagonal")
    s.add_argument("--no-true-sequential", dest="true_sequential", action="store_false",
                   help="gptq: take every Hessian of a block from one full-precision pass")
    s.add_argument("--damp", type=float, default=d.damp, help="gptq damping, fraction of the mean Hessian diagonal")
    a = s.add_mutually_exclusive_group()
    a.add_argument("--awq", dest="awq", action="store_true", default=None,
                   help="activation-aware per-channel scales folded in before quantizing (default: on for "
                        "--method awq only; with gptq/shq: GPTQ on the scaled weights)")
    a.add_argument("--no-awq", dest="awq", action="store_false", help="no activation-aware scales")
    s.add_argument("--awq-grid", type=int, default=d.awq_grid, help="awq: grid points of the scale search")
    s.add_argument("--refit", type=int, default=d.refit,
                   help="gptq/shq: rounds of least-squares refitting of each group's (scale, min) to its codes "
                        "(0 = off; 1 measured best on MiniLM)")
    s.add_argument("--block-refine", action="store_true",
                   help="gptq/shq: after each block's codes are fixed, tune its group scales/mins with Adam on the "
                        "block-output error against the full-precision model (export/blockrecon.py)")
    s.add_argument("--block-refine-steps", type=int, default=d.block_refine_steps,
                   help="--block-refine: Adam steps per block (one calibration batch each)")
    s.add_argument("--block-refine-lr", type=float, default=d.block_refine_lr,
                   help="--block-refine: learning rate, relative to each parameter's size")
    s.add_argument("--block-refine-vectors", action="store_true",
                   help="--block-refine: also tune the block's float32 norm weights/biases and linear biases")
    s.add_argument("--block-refine-codes", type=int, default=d.block_refine_codes,
                   help="--block-refine: Adam steps per block, before the params-only steps, in which the codes "
                        "move too (SignRound: each code may move one step from GPTQ's; 0 = codes frozen)")
    # QIG / VEQ (export/qig.py, export/veq.py); README "Methods" says when to use which
    s.add_argument("--qig-steps", type=int, default=d.qig_steps,
                   help="qig: Riemann steps of the integrated-gradient path (token weights of the scale search)")
    s.add_argument("--qig-baseline", choices=("zero", "quantized"), default=None,
                   help="qig: path start x' (default: zero; quantized with --qig-act8)")
    s.add_argument("--qig-hessian", action="store_true",
                   help="qig: GPTQ on Hessians weighted by the same token importances (default: rtn + clip search)")
    s.add_argument("--qig-act8", action="store_true",
                   help="qig: calibrate for int8 activations (W4A8: the kernels' per-token, per-group int8 "
                        "activations are in the discrepancy and the scale search)")
    s.add_argument("--veq-text-weight", type=float, default=None,
                   help="veq/veq-ma/veq-me: modality weight of text tokens, image tokens 1 (default: image/text "
                        "token-count ratio of the calibration set, clipped to [1, 10])")
    # SPEED-Q (export/speedq.py): training budgets of its three stages
    s.add_argument("--speedq-steps", type=int, default=d.speedq_steps,
                   help="speedq: stage-3 QAT steps (language model, bilevel quantizer + distillation)")
    s.add_argument("--speedq-stage2-steps", type=int, default=d.speedq_stage2_steps,
                   help="speedq: stage-2 projector-alignment steps")
    s.add_argument("--speedq-adaround-iters", type=int, default=d.speedq_adaround_iters,
                   help="speedq: stage-1 AdaRound iterations per vision block (BRECQ uses 20000)")
    s.add_argument("--speedq-lr", type=float, default=d.speedq_lr, help="speedq: AdamW learning rate of stages 2-3")
    s.add_argument("--speedq-device", default=d.speedq_device, help="speedq: torch device of the training (cpu, cuda)")
    s.add_argument("--speedq-init", choices=[i.value for i in SpeedQInit], default=d.speedq_init.value,
                   help="speedq: stage-3 start: gptq (GPTQ on the q2b/q4 grid, then QAT on that frozen grid) or rtn "
                        "(the paper's clip init, min-max params recomputed every step)")
    s.add_argument("--speedq-val", type=float, default=d.speedq_val,
                   help="speedq: fraction of the calibration samples held out; stages 2-3 keep the weights with the "
                        "lowest held-out KL to the fp model (0: no hold-out)")
    s.add_argument("--speedq-eval-every", type=int, default=d.speedq_eval_every,
                   help="speedq: stage-3 steps between held-out evaluations")
    s.add_argument("--speedq-gen", type=int, default=d.speedq_gen,
                   help="speedq: teacher-sampled continuations per calibration sample added to the stage-3 data")
    s.add_argument("--batch-size", type=int, default=d.batch_size, help="calibration samples per forward pass")
    s.add_argument("--seed", type=int, default=d.seed)
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    s.add_argument("--format", choices=[f.value for f in Format], default=d.format.value,
                   help="evlm: one .evlm file (default); compressed-tensors / gptq: -o names a folder that gets a "
                        "Hugging Face checkpoint (language model packed, loadable by transformers and vLLM) and the "
                        ".evlm of the same weights (integer zero points)")


def cmd_export(args: argparse.Namespace) -> int:
    from .export.config import ExportConfig

    cfg = ExportConfig(method=args.method, bits=args.bits, text_bits=args.text_bits, group=args.group,
                       head_bits=args.head_bits,
                       embed_bits=args.embed_bits,
                       calib=args.calib, n_calib=args.n_calib, budget_bits=args.budget_bits,
                       budget_mb=args.budget_mb, keep_frac=args.keep_frac, keep_bits=args.keep_bits,
                       clip_search=args.clip_search, act_order=args.act_order, damp=args.damp,
                       true_sequential=args.true_sequential, awq=args.awq, awq_grid=args.awq_grid, refit=args.refit,
                       batch_size=args.batch_size, seed=args.seed, progress=not args.quiet, format=args.format)
    qv = dict(qig_steps=args.qig_steps, qig_baseline=args.qig_baseline, qig_hessian=args.qig_hessian,
              qig_act8=args.qig_act8, veq_text_weight=args.veq_text_weight)
    if any(v not in (None, False) and v != getattr(cfg, k) for k, v in qv.items()):
        import dataclasses

        cfg = dataclasses.replace(cfg, **qv)   # QIG / VEQ options (validated against the method)
    br = dict(block_refine=args.block_refine, block_refine_steps=args.block_refine_steps,
              block_refine_lr=args.block_refine_lr, block_refine_vectors=args.block_refine_vectors)
    br["block_refine_codes"] = args.block_refine_codes
    if any(v != getattr(cfg, k) for k, v in br.items()):   # validated: the options need --block-refine
        import dataclasses

        cfg = dataclasses.replace(cfg, **br)
    sq = dict(speedq_steps=args.speedq_steps, speedq_stage2_steps=args.speedq_stage2_steps,
              speedq_adaround_iters=args.speedq_adaround_iters, speedq_lr=args.speedq_lr,
              speedq_device=args.speedq_device)
    sq.update(speedq_init=args.speedq_init, speedq_val=args.speedq_val, speedq_eval_every=args.speedq_eval_every,
              speedq_gen=args.speedq_gen)
    if any(v != getattr(cfg, k) for k, v in sq.items()):   # SPEED-Q budgets (validated in ExportConfig)
        import dataclasses

        cfg = dataclasses.replace(cfg, **sq)
    try:
        from .export.pipeline import run_export
    except ImportError as e:
        raise ValueError(f"edgevlm export needs the export extra ({e.name} is missing): "
                         "pip install 'edgevlm[export]' (torch==2.13.0 first)") from None
    run_export(args.src, args.out, cfg)
    return 0


def _convert_parser(sub) -> None:
    s = sub.add_parser("convert", help="write the Hugging Face compressed-tensors / GPTQ folder of an .evlm",
                       description="Write a Hugging Face checkpoint folder whose language-model linears hold the "
                                   ".evlm's packed integers (compressed-tensors pack-quantized or GPTQ v1) and the "
                                   "other tensors dense. The .evlm must come from `edgevlm export --format F` "
                                   "(integer zero points); SRC is the model folder it was exported from (config, "
                                   "tokenizer and processor files are copied).")
    s.add_argument("model", help=".evlm file")
    s.add_argument("--src", required=True, help="the Hugging Face model folder the .evlm was exported from")
    s.add_argument("-o", "--out", required=True, help="output folder (new or empty; appears when complete)")
    s.add_argument("--format", required=True, choices=["compressed-tensors", "gptq"])
    s.add_argument("--dense-dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="dtype of the dense tensors (default: exact: float16 records as float16, the rest float32)")


def cmd_convert(args: argparse.Namespace) -> int:
    from .interop.hf_quantized import convert

    qc = convert(args.model, args.src, args.out, args.format, args.dense_dtype)
    print(f"wrote {args.out}: {qc['quant_method']} checkpoint")
    return 0


_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _image_paths(items: list[str]) -> list[str]:
    """Files, folders (their images, sorted) and globs, in the order given."""
    import glob
    from pathlib import Path

    out: list[str] = []
    for it in items:
        p = Path(it)
        if p.is_dir():
            found = sorted(str(q) for q in p.iterdir() if q.suffix.lower() in _IMAGE_EXTS)
            if not found:
                raise ValueError(f"{it}: folder has no images (expected {', '.join(_IMAGE_EXTS)})")
            out += found
        elif p.is_file():
            out.append(str(p))
        else:
            found = sorted(glob.glob(it))
            if not found:
                raise ValueError(f"{it}: no such file, folder or matching glob")
            out += found
    return out


def cmd_classify(args: argparse.Namespace) -> int:
    import time

    from .runtime import load_dual, set_num_threads

    labels = [x.strip() for x in args.labels.split(",") if x.strip()]
    if len(labels) < 2:
        raise ValueError(f"--labels needs at least two comma-separated labels, got {args.labels!r}")
    if "{}" not in args.prompt:
        raise ValueError(f"--prompt must contain {{}} where the label goes, got {args.prompt!r}")
    paths = _image_paths(args.images)
    if args.threads:
        set_num_threads(args.threads)
    enc = load_dual(args.model, device=args.device)
    text = enc.encode_text([args.prompt.format(x) for x in labels])
    adapter = None
    if args.adapt:
        from .adapt import QTTA, QTTAConfig

        adapter = QTTA(text, QTTAConfig(logit_scale=float(np.exp(enc.logit_scale))))
    counts = dict.fromkeys(labels, 0)
    rows, t0 = [], time.perf_counter()
    for path in paths:
        f = enc.encode_image(path)                       # [1, E] L2-normalised
        logits = enc.logits(f, text)[0] if adapter is None else adapter(f[0])
        prob = enc.probabilities(logits[None])[0]
        k = int(np.argmax(logits))
        counts[labels[k]] += 1
        rows.append({"image": path, "label": labels[k], "prob": float(prob[k])})
        if not args.json:
            print(f"{path}\t{labels[k]}\t{prob[k]:.3f}", flush=True)
    secs = time.perf_counter() - t0
    summary = {"images": len(paths), "ms_per_image": 1000 * secs / max(len(paths), 1), "counts": counts}
    if adapter is not None:
        summary["adapter_bytes"] = adapter.nbytes
    if args.json:
        print(json.dumps({"predictions": rows, "summary": summary}, indent=1))
    else:
        print(f"{len(paths)} image(s), {summary['ms_per_image']:.1f} ms/image"
              + (f", Q-TTA state {adapter.nbytes} bytes" if adapter is not None else "") + "; "
              + ", ".join(f"{k}: {v}" for k, v in counts.items()), file=sys.stderr)
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .runtime import load_dual

    if not args.image and not args.text:
        raise ValueError("give --image PATH... and/or --text STRING...")
    enc = load_dual(args.model, device=args.device)
    out: dict[str, np.ndarray] = {}
    if args.image:
        out["image"] = enc.encode_image(_image_paths(args.image))
    if args.text:
        out["text"] = enc.encode_text(args.text)
    dest = Path(args.out)
    if dest.suffix == ".json":
        dest.write_text(json.dumps({k: v.tolist() for k, v in out.items()}))
    elif dest.suffix == ".npy":
        if len(out) != 1:
            raise ValueError("a .npy file holds one array: give --image or --text, or write .npz / .json")
        np.save(dest, next(iter(out.values())))
    elif dest.suffix == ".npz":
        np.savez(dest, **out)
    else:
        raise ValueError(f"--out must end in .npy, .npz or .json, got {dest.name!r}")
    print(f"wrote {dest}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in out.items()), file=sys.stderr)
    return 0


def _dual_parsers(sub) -> None:
    s = sub.add_parser("classify", help="zero-shot classification of an image stream (CLIP/SigLIP .evlm)")
    s.add_argument("model")
    s.add_argument("images", nargs="+", help="image files, folders or globs, streamed in the order given")
    s.add_argument("--labels", required=True, help='comma-separated class names, e.g. "cat,dog,bird"')
    s.add_argument("--prompt", default="a photo of a {}", help="prompt template; {} is the label")
    s.add_argument("--adapt", action="store_true", help="LQA Q-TTA test-time adaptation over the stream")
    s.add_argument("--threads", type=int, default=0, help="kernel threads (default: all cores)")
    s.add_argument("--json", action="store_true", help="print predictions and summary as JSON")
    _device_arg(s)
    s = sub.add_parser("embed", help="L2-normalised image / text embeddings (CLIP/SigLIP .evlm)")
    s.add_argument("model")
    s.add_argument("--image", nargs="+", default=[], help="image files, folders or globs")
    s.add_argument("--text", nargs="+", default=[], help="texts")
    s.add_argument("-o", "--out", required=True, help="output .npy (one kind), .npz or .json")
    _device_arg(s)


def cmd_run(args: argparse.Namespace) -> int:
    from .runtime.vlm import Runtime

    images = _image_paths(args.image) if args.image else []
    rt = Runtime.load(args.model, ctx=args.ctx, threads=args.threads or None, device=args.device,
                      kv_dtype=args.kv_cache)
    stream = (lambda piece: (sys.stdout.write(piece), sys.stdout.flush())) if args.stream else None
    out = rt.generate(args.prompt, images, max_tokens=args.max_tokens, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                      seed=args.seed, stop=args.stop, raw=args.raw, on_text=stream)
    if args.json:
        print(json.dumps({"text": out.text, "finish_reason": out.finish_reason, "usage": out.usage,
                          "timings_ms": {k: round(v, 2) for k, v in out.timings.items() if k.endswith("_ms")}}))
        return 0
    print("" if args.stream else out.text)
    t = out.timings
    n_dec = max(int(t.get("decode_tokens", 0)), 0)
    rate = n_dec / (t["decode_ms"] / 1e3) if n_dec and t.get("decode_ms") else float("nan")
    print(f"[{out.prompt_tokens} prompt + {len(out.token_ids)} generated tokens, {out.finish_reason}; "
          f"time to first token {t['ttft_ms']:.0f} ms, decode {rate:.1f} tok/s]", file=sys.stderr)
    return 0


def _run_parser(sub) -> None:
    s = sub.add_parser("run", help="generate text about images with a generative VLM .evlm")
    s.add_argument("model")
    s.add_argument("--image", nargs="*", default=[], help="image files, folders or globs (one user turn)")
    s.add_argument("--prompt", required=True, help="the user message (or the whole formatted prompt with --raw)")
    s.add_argument("--max-tokens", type=int, default=256)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-k", type=int, default=0, help="0 = off")
    s.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    s.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--ctx", type=int, default=None, help="KV-cache length in tokens (default: min(model, 4096))")
    s.add_argument("--kv-cache", choices=("f32", "f16"), default="f32",
                   help="KV-cache element type: f16 halves its memory and the bytes each decode step "
                        "reads, at ~1e-4 logit error (default: f32, exact)")
    s.add_argument("--threads", type=int, default=0, help="kernel threads (default: all cores)")
    s.add_argument("--raw", action="store_true", help="the prompt is already chat-formatted (no template applied)")
    s.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    s.add_argument("--json", action="store_true", help="print the result as one JSON object")
    _device_arg(s)


def _device_arg(s) -> None:
    s.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the packed linears run: cpu (C++ kernels) or cuda (Triton kernels; needs "
                        "pip install 'edgevlm[cuda]' and an NVIDIA GPU; the rest stays on the CPU)")


def _serve_parser(sub) -> None:
    from .server.config import DEFAULT_MAX_BODY, DEFAULT_MAX_PIXELS, DEFAULT_REMOTE_BYTES, DEFAULT_REMOTE_TIMEOUT

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs: pip install 'edgevlm[server]')",
                       description="Serve .evlm models over HTTP: /v1/chat/completions (generative VLMs), "
                                   "/v1/embeddings and /v1/classify (CLIP/SigLIP), /v1/models, /health, /metrics. "
                                   "OpenAPI schema at /openapi.json.")
    s.add_argument("models", nargs="+", help="one or more .evlm files; a request's 'model' picks one by id")
    s.add_argument("--name", action="append", default=[],
                   help="model id, once per model in order (default: each file's stem)")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; 0.0.0.0 exposes it)")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--api-key", default=os.environ.get("EDGEVLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $EDGEVLM_API_KEY; none = open)")
    s.add_argument("--max-queue", type=int, default=8,
                   help="requests that may wait for the model; more get 503 + Retry-After")
    s.add_argument("--threads", type=int, default=0, help="kernel threads (default: all cores)")
    s.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs (off by default)")
    s.add_argument("--allowed-image-dir", default=None, help="serve local image paths from under this folder only")
    s.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY, help="request body limit (413 beyond)")
    s.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="per-image pixel limit")
    s.add_argument("--max-remote-image-bytes", type=int, default=DEFAULT_REMOTE_BYTES,
                   help="bytes read from one remote URL or local image file")
    s.add_argument("--remote-timeout", dest="remote_timeout_s", type=float, default=DEFAULT_REMOTE_TIMEOUT,
                   help="seconds for one remote image fetch")
    s.add_argument("--ctx", type=int, default=None, help="KV-cache length of generative models")
    s.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    s.add_argument("--max-streams", type=int, default=64, help="Q-TTA stream states kept per label set (LRU)")
    s.add_argument("--label-sets", default=None, help='JSON file of named label sets: {"name": ["a", "b"], ...}')
    s.add_argument("--shutdown-grace", dest="shutdown_grace_s", type=float, default=10.0,
                   help="seconds in-flight work may finish after SIGTERM before it is cancelled")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def cmd_serve(args: argparse.Namespace) -> int:
    from .server.config import ServerConfig, load_label_sets

    cfg = ServerConfig(models=tuple(args.models), names=tuple(args.name), host=args.host, port=args.port,
                       api_key=args.api_key, max_queue=args.max_queue, threads=args.threads,
                       allow_remote_images=args.allow_remote_images, allowed_image_dir=args.allowed_image_dir,
                       max_body_bytes=args.max_body_bytes, max_image_pixels=args.max_image_pixels,
                       max_remote_image_bytes=args.max_remote_image_bytes, remote_timeout_s=args.remote_timeout_s,
                       ctx=args.ctx, default_max_tokens=args.default_max_tokens, max_streams=args.max_streams,
                       label_sets=load_label_sets(args.label_sets) if args.label_sets else {},
                       shutdown_grace_s=args.shutdown_grace_s, log_level=args.log_level)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401

        from .server import serve
    except ImportError as e:
        raise ValueError(f"edgevlm serve needs the server extra ({e.name} is missing): "
                         "pip install 'edgevlm[server]'") from None
    serve(cfg)
    return 0


def _export_onnx_parser(sub) -> None:
    s = sub.add_parser("export-onnx", help="ONNX graph of a CLIP/SigLIP/LLaVA-vision .evlm (com.microsoft.MatMulNBits)",
                       description="Write an ONNX model that ONNX Runtime runs on CPU: packed 2/3/4/8-bit weights "
                                   "become com.microsoft.MatMulNBits (exact; 3-bit codes widened to 4), float "
                                   "tensors plain initializers. CLIP/SigLIP: vision and/or text tower; LLaVA: vision "
                                   "tower + projector. Preprocessing and tokenization stay outside the graph.")
    s.add_argument("model", help="input .evlm file")
    s.add_argument("-o", "--out", required=True, help="output .onnx file (written atomically)")
    s.add_argument("--tower", choices=("vision", "text", "both"), default=None,
                   help="what to export (default: both for CLIP/SigLIP, vision for LLaVA)")
    s.add_argument("--accuracy-level", type=int, choices=(0, 4), default=4,
                   help="MatMulNBits activations: 4 = int8 per block (ORT's fast CPU path), 0 = float32")
    s.add_argument("--external-data", action="store_true", default=None,
                   help="weights in OUT.data beside the model (automatic past 1.75 GiB of weights)")


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from .interop.onnx_export import OnnxExportConfig, export_onnx

    cfg = OnnxExportConfig(tower=args.tower, accuracy_level=args.accuracy_level, external_data=args.external_data)
    report = export_onnx(args.model, args.out, cfg, log=lambda m: print(m, file=sys.stderr))
    print("\n".join(report.lines()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgevlm", description="Quantized vision-language models on edge hardware.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("info", help="print the per-tensor table of an .evlm file")
    s.add_argument("model")
    s = sub.add_parser("verify", help="check every checksum of an .evlm file")
    s.add_argument("model")
    sub.add_parser("kernels", help="print the kernel ISAs this build and CPU support")
    _export_parser(sub)
    _dual_parsers(sub)
    _run_parser(sub)
    _serve_parser(sub)
    _export_onnx_parser(sub)
    _convert_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .format import FormatError

    try:
        if args.command == "info":
            return cmd_info(args.model)
        if args.command == "verify":
            return cmd_verify(args.model)
        if args.command == "kernels":
            return cmd_kernels()
        if args.command == "export":
            return cmd_export(args)
        if args.command == "classify":
            return cmd_classify(args)
        if args.command == "embed":
            return cmd_embed(args)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "export-onnx":
            return cmd_export_onnx(args)
        if args.command == "convert":
            return cmd_convert(args)
    except BrokenPipeError:
        # `edgevlm info x.evlm | head`: the reader left; stop quietly, as cat/ls do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except FormatError as e:
        print(f"edgevlm {args.command}: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, IsADirectoryError, PermissionError, ValueError) as e:
        print(f"edgevlm {args.command}: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
