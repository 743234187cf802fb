"""The ``edgevlm`` command line.

    edgevlm info MODEL.evlm       per-tensor table: qtype, bits, group, shape, bytes, bits/weight
    edgevlm verify MODEL.evlm     check every tensor checksum (exit 1 on corruption)
    edgevlm kernels               compiled / supported ISAs, the default one, CPU features

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
        total = sum(r.nbytes for r in recs)
        n_weights = sum(int(np.prod(r.shape)) for r in recs)
        print(f"{path}: format v{f.version}, {len(recs)} tensors, {_human(total)} of tensor data")
        arch = f.metadata.get("architecture") or f.metadata.get("model_type")
        if arch:
            print(f"architecture: {arch}")
        rows = [("tensor", "qtype", "group", "shape", "bytes", "bits/w", "export err")]
        for r in recs:
            numel = int(np.prod(r.shape)) or 1
            err = r.extra.get("error") if isinstance(r.extra, dict) else None
            rows.append((r.name, r.qtype, str(r.group_size or "-"), "x".join(map(str, r.shape)) or "scalar",
                         _human(r.nbytes), f"{8 * r.nbytes / numel:.2f}",
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgevlm", description="Quantized vision-language models on edge hardware.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("info", help="print the per-tensor table of an .evlm file")
    s.add_argument("model")
    s = sub.add_parser("verify", help="check every checksum of an .evlm file")
    s.add_argument("model")
    sub.add_parser("kernels", help="print the kernel ISAs this build and CPU support")
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
    except FormatError as e:
        print(f"edgevlm {args.command}: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, IsADirectoryError, PermissionError, ValueError) as e:
        print(f"edgevlm {args.command}: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
