"""bench_methods.py's report (split from it for size): table cells, the per-(model, method, bits)
summaries over calibration seeds (mean ± std), the per-seed paired bars and the RESULTS.md
section.  Rows are bench_methods.run()'s dicts."""

from __future__ import annotations

import numpy as np

SECTION = "## Quantization methods (bench_methods.py)"


COLS = (("model", "{}"), ("method", "{}"), ("bits", "{}"), ("seed", "{}"), ("layer_err", "{:.4f}"),
        ("logit_kl", "{:.5f}"), ("token_agreement", "{:.3f}"), ("cosine", "{:.5f}"), ("export_s", "{:.1f}"))
METRICS = ("layer_err", "logit_kl", "token_agreement", "cosine")
#: the issue's bars: (method, baseline it must not exceed, models where the pair applies or None = all)
PAIRS = (("qig", "awq", None), ("qig-qb", "awq", None), ("veq-ma", "gptq", ("tiny-moe",)))


def _cell(row: dict, k: str, f: str) -> str:
    return "null" if row.get(k) is None else f.format(row[k])


def fmt_row(row: dict) -> str:
    return "  ".join(f"{k}={_cell(row, k, f)}" for k, f in COLS)


def summarise(rows: list[dict]) -> list[dict]:
    """One row per (model, method, bits): each metric's mean over the calibration seeds, its
    sample standard deviation (``<metric>_sd``, None with one seed) and ``seeds``."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["method"], r["bits"]), []).append(r)
    out = []
    for (model, method, bits), rs in groups.items():
        row = {"model": model, "method": method, "bits": bits, "seeds": [r["seed"] for r in rs]}
        for k in (*METRICS, "export_s"):
            v = [r[k] for r in rs if r.get(k) is not None]
            row[k] = float(np.mean(v)) if v else None
            row[f"{k}_sd"] = float(np.std(v, ddof=1)) if len(v) > 1 else None
        out.append(row)
    return out


def bars(rows: list[dict]) -> list[str]:
    """The issue's bars on the same data (QIG <= AWQ-uniform error; VEQ-MA <= GPTQ error on the MoE
    model), paired per calibration seed: both methods calibrated on the same draw and scored on
    the same held-out inputs.  PASS when the mean over seeds is <=; the line gives the mean
    relative difference, its spread over seeds and how many seeds hold on their own."""
    by = {(r["model"], r["method"], r["bits"], r["seed"]): r for r in rows}
    out = []
    for method, pair, models in PAIRS:
        for model, bits in sorted({(r["model"], r["bits"]) for r in rows if r["method"] == method}):
            if models is not None and model not in models:
                continue
            seeds = sorted(s for (m_, me, b, s) in by if (m_, me, b) == (model, method, bits)
                           and (model, pair, bits, s) in by)
            for k in ("layer_err", "logit_kl"):
                got = [(by[(model, method, bits, s)][k], by[(model, pair, bits, s)][k]) for s in seeds]
                got = [(a, b) for a, b in got if a is not None and b is not None]
                if not got:
                    continue
                a, b = np.array(got).T
                rel = (a - b) / np.maximum(b, 1e-30) * 100.0
                ok = float(a.mean()) <= float(b.mean())
                sd = f" ± {rel.std(ddof=1):.1f}" if len(rel) > 1 else ""
                # the mean paired difference within 2 standard errors of 0: not resolved by these seeds
                noise = len(rel) > 1 and abs(rel.mean()) < 2 * rel.std(ddof=1) / np.sqrt(len(rel))
                out.append(f"- {model} W{bits} {k}: {method} {a.mean():.5f} vs {pair} {b.mean():.5f} "
                           f"({rel.mean():+.1f}%{sd} over {len(rel)} seed(s), {int((a <= b).sum())}/{len(rel)} "
                           f"seeds <=): {'PASS' if ok else 'MISS'} ({method} <= {pair})"
                           + (", within seed noise (|mean| < 2 SE)" if noise else ""))
    return out


def _mean_cell(row: dict, k: str, f: str) -> str:
    if row.get(k) is None:
        return "null"
    sd = row.get(f"{k}_sd")
    return f.format(row[k]) + (f" ± {f.format(sd)}" if sd is not None and k in ("layer_err", "logit_kl") else "")


def section_lines(args, rows: list[dict], bar_lines: list[str], secs: float, info: dict, *,
                  n_new: int) -> list[str]:
    """The RESULTS.md section; n_new: the greedy continuation length logit_kl is measured over."""
    summ = summarise(rows)
    cols = [c for c in COLS if c[0] != "seed"]
    hdr = [k for k, _ in cols]
    lines = [SECTION, "",
             f"`{args.command}`  ({secs:.0f} s; {info['cpu']}, {info['logical_cpus']} logical CPUs, torch threads "
             f"{args.threads}, load {info['loadavg']}; torch {info['versions']['torch']}, transformers "
             f"{info['versions']['transformers']})", "",
             "Each row: the model exported with `edgevlm export --method M --bits B` (built-in calibration set, "
             f"n_calib {args.n_calib} drawn with seeds {', '.join(map(str, args.seeds))}, group {args.group} or the "
             "largest group dividing the in-features), loaded back into transformers with the file's dequantized "
             "weights, against fp32 on held-out inputs (generative models: "
             f"{args.n_held} synthetic images with prompts, none in the calibration set; tiny CLIP: {args.n_held} "
             "images + texts; MiniLM: bench_quality's 64 held-out sentences). Cells are means over the "
             "calibration seeds, ± their standard deviation. layer_err: mean relative block-output error with the "
             f"fp32 block input; logit_kl / token_agreement: teacher-forced over a {n_new}-token greedy fp32 "
             "continuation; cosine: embeddings. Tiny models have random weights (except trained-llava: Qwen2 text "
             "hidden 128, 4 layers, LM + projector pretrained 300 steps on the built-in captions/sentences by "
             "bench_speedq.pretrain_llava; its held-out inputs: the training prompt \"Describe the image.\" over "
             "other augmented views of the built-in photos, and the first halves of sentences in no seed's "
             "calibration draw): compare methods within a model, not across models. qig-qb: qig with "
             "`--qig-baseline quantized`. "
             "awq/qig/veq-me fold scales only where exact (MiniLM is post-LN BERT: v -> o only, "
             "so there qig can differ from awq only in that group); veq-ma/veq-me apply to the MoE model only, "
             "speedq to LLaVA at 2/4 bits.", "",
             "| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    lines += ["| " + " | ".join(_mean_cell(r, k, f) for k, f in cols) + " |" for r in summ]
    lines += ["", "Bars (same data, paired per calibration seed):"] + \
        (bar_lines or ["- (no qig/awq or veq-ma/gptq pairs in this run)"])
    if getattr(args, "notes", None):
        lines += ["", "Notes:"] + [f"- {n}" for n in args.notes]
    return lines
