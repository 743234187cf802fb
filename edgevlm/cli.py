"""The ``edgevlm`` command line.

    edgevlm info MODEL.evlm       per-tensor table: qtype, bits, group, shape, bytes, bits/weight
    edgevlm verify MODEL.evlm     check every tensor checksum (exit 1 on corruption)
    edgevlm kernels               compiled / supported ISAs, the default one, CPU features
    edgevlm export SRC -o OUT     quantize a Hugging Face model folder into an .evlm file

Each subcommand parses its flags and calls one function; errors print a one-line message
and exit with status 2 (bad input) or 1 (corrupt file) instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
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
    from .export.config import BITS, ExportConfig, Method

    d = ExportConfig()
    s = sub.add_parser("export", help="quantize a Hugging Face model folder into an .evlm file",
                       description="Quantize a Hugging Face model folder (config.json, *.safetensors, tokenizer, "
                                   "preprocessor_config.json) into one .evlm file. Supported: CLIPModel, SiglipModel, "
                                   "LlavaForConditionalGeneration (CLIP/SigLIP + Llama/Qwen2), BertModel.")
    s.add_argument("src", help="Hugging Face model folder")
    s.add_argument("-o", "--out", required=True, help="output .evlm file (written atomically)")
    s.add_argument("--method", choices=[m.value for m in Method], default=d.method.value,
                   help="rtn: round to nearest; gptq: Hessian-based; shq: LQA selective hybrid (default)")
    s.add_argument("--bits", type=int, choices=BITS, default=d.bits, help="width of the quantized layers (16 = float16)")
    s.add_argument("--text-bits", type=int, choices=BITS, default=None,
                   help="width of the text tower / language model (default: --bits; 8 for shq)")
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
    s.add_argument("--clip-search", action="store_true", help="per-group range shrink search (rtn, gptq)")
    s.add_argument("--no-act-order", dest="act_order", action="store_false",
                   help="gptq: quantize columns in their natural order instead of by descending Hessian diagonal")
    s.add_argument("--no-true-sequential", dest="true_sequential", action="store_false",
                   help="gptq: take every Hessian of a block from one full-precision pass")
    s.add_argument("--damp", type=float, default=d.damp, help="gptq damping, fraction of the mean Hessian diagonal")
    s.add_argument("--batch-size", type=int, default=d.batch_size, help="calibration samples per forward pass")
    s.add_argument("--seed", type=int, default=d.seed)
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def cmd_export(args: argparse.Namespace) -> int:
    from .export.config import ExportConfig

    cfg = ExportConfig(method=args.method, bits=args.bits, text_bits=args.text_bits, group=args.group,
                       calib=args.calib, n_calib=args.n_calib, budget_bits=args.budget_bits,
                       budget_mb=args.budget_mb, keep_frac=args.keep_frac, keep_bits=args.keep_bits,
                       clip_search=args.clip_search, act_order=args.act_order, damp=args.damp,
                       true_sequential=args.true_sequential,
                       batch_size=args.batch_size, seed=args.seed, progress=not args.quiet)
    try:
        from .export.pipeline import run_export
    except ImportError as e:
        raise ValueError(f"edgevlm export needs the export extra ({e.name} is missing): "
                         "pip install 'edgevlm[export]' (torch==2.13.0 first)") from None
    run_export(args.src, args.out, cfg)
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
    except FormatError as e:
        print(f"edgevlm {args.command}: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, IsADirectoryError, PermissionError, ValueError) as e:
        print(f"edgevlm {args.command}: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
