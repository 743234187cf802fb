"""bench_methods.py's report (split from it for size): table cells, the per-(model, method, bits)
summaries over calibration seeds (mean ± std), the per-seed paired bars (and, where rows keep
per-input metrics, the paired deltas per seed over the held-out inputs) and the RESULTS.md
section.  Rows are bench_methods.run()'s dicts; a row's ``head_bits`` (None or absent: the
exporter's default head) and ``n_calib`` (absent: 32, the runs before it was recorded) are part of
its key, so runs with ``--head-bits`` / ``--n-calib`` sit beside the others."""

from __future__ import annotations

import numpy as np

SECTION = "## Quantization methods (bench_methods.py)"


COLS = (("model", "{}"), ("method", "{}"), ("bits", "{}"), ("head_bits", "{}"), ("n_calib", "{}"),
        ("seed", "{}"), ("layer_err", "{:.4f}"),
        ("logit_kl", "{:.5f}"), ("token_agreement", "{:.3f}"), ("cosine", "{:.5f}"), ("export_s", "{:.1f}"))
METRICS = ("layer_err", "logit_kl", "token_agreement", "cosine")
#: the issue's bars: (method, baseline it must not exceed, models where the pair applies or None = all)
MOE = ("tiny-moe", "trained-moe", "trained-moe-img")
PAIRS = (("qig", "awq", None), ("qig-qb", "awq", None), ("veq-ma", "gptq", MOE))
#: the pairs of the per-input deltas: the bars' and VEQ-ME (VEQ's AWQ-side variant) against awq and gptq
DETAIL_PAIRS = PAIRS + (("veq-me", "awq", MOE), ("veq-me", "gptq", MOE))


#: n_calib of the rows that do not record it (every run before it was recorded used the default)
N_CALIB = 32


def _setting(row: dict) -> tuple[int, int]:
    """The export settings that key a row besides model/method/bits: (head_bits, 0 = the
    exporter's default head; n_calib)."""
    return row.get("head_bits") or 0, row.get("n_calib") or N_CALIB


def _label(model: str, setting: tuple[int, int]) -> str:
    """The model as the bars name it: ``model``, or e.g. ``model (head 16, n_calib 128)``."""
    head, n_calib = setting
    parts = ([f"head {head}"] if head else []) + ([f"n_calib {n_calib}"] if n_calib != N_CALIB else [])
    return model + (f" ({', '.join(parts)})" if parts else "")


def _cell(row: dict, k: str, f: str) -> str:
    if k == "head_bits" and row.get(k) is None:
        return "-"
    if k == "n_calib" and row.get(k) is None:
        return str(N_CALIB)
    return "null" if row.get(k) is None else f.format(row[k])


def fmt_row(row: dict) -> str:
    return "  ".join(f"{k}={_cell(row, k, f)}" for k, f in COLS)


def summarise(rows: list[dict]) -> list[dict]:
    """One row per (model, method, bits): each metric's mean over the calibration seeds, its
    sample standard deviation (``<metric>_sd``, None with one seed) and ``seeds``."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["method"], r["bits"], _setting(r)), []).append(r)
    out = []
    for (model, method, bits, (head, n_calib)), rs in groups.items():
        row = {"model": model, "method": method, "bits": bits, "head_bits": head or None, "n_calib": n_calib,
               "seeds": [r["seed"] for r in rs]}
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
    by = {(r["model"], r["method"], r["bits"], _setting(r), r["seed"]): r for r in rows}
    out = []
    for method, pair, models in PAIRS:
        for model, bits, head in sorted({(r["model"], r["bits"], _setting(r)) for r in rows if r["method"] == method}):
            if models is not None and model not in models:
                continue
            seeds = sorted(s for (m_, me, b, h, s) in by if (m_, me, b, h) == (model, method, bits, head)
                           and (model, pair, bits, head, s) in by)
            for k in ("layer_err", "logit_kl"):
                got = [(by[(model, method, bits, head, s)][k], by[(model, pair, bits, head, s)][k]) for s in seeds]
                got = [(a, b) for a, b in got if a is not None and b is not None]
                if not got:
                    continue
                a, b = np.array(got).T
                rel = (a - b) / np.maximum(b, 1e-30) * 100.0
                ok = float(a.mean()) <= float(b.mean())
                sd = f" ± {rel.std(ddof=1):.1f}" if len(rel) > 1 else ""
                # the mean paired difference within 2 standard errors of 0: not resolved by these seeds
                noise = len(rel) > 1 and abs(rel.mean()) < 2 * rel.std(ddof=1) / np.sqrt(len(rel))
                out.append(f"- {_label(model, head)} W{bits} {k}: {method} {a.mean():.5f} vs {pair} {b.mean():.5f} "
                           f"({rel.mean():+.1f}%{sd} over {len(rel)} seed(s), {int((a <= b).sum())}/{len(rel)} "
                           f"seeds <=): {'PASS' if ok else 'MISS'} ({method} <= {pair})"
                           + (", within seed noise (|mean| < 2 SE)" if noise else ""))
    return out


def input_kinds(row: dict) -> list[str] | None:
    """"image" / "text" per held-out input of a row with ``per_input`` metrics: the row's
    ``input_kinds``, or for rows written before it was recorded, the order
    trained_models.trained_inputs uses (n // 2 image prompts, then texts) on the trained models
    and image prompts only elsewhere."""
    n = len(row["per_input"]["logit_kl"])
    if row.get("input_kinds"):
        return list(row["input_kinds"])
    return ["image"] * (n // 2) + ["text"] * (n - n // 2) if row["model"].startswith("trained-") else ["image"] * n


def _deltas(pairs: list[tuple[int, np.ndarray, np.ndarray]], pp: bool) -> str:
    """'seed s mean ± 2 SE[*]; ...; mean over seeds m ± 2 SE' of (seed, method, baseline) arrays."""
    cells, per_seed = [], []
    for s, a, b in pairs:
        d = (a - b) * (100.0 if pp else 100.0 / max(float(b.mean()), 1e-30))
        se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0
        per_seed.append(d.mean())
        cells.append(f"seed {s} {d.mean():+.2f} ± {2 * se:.2f}{'*' if abs(d.mean()) > 2 * se else ''}")
    m = np.asarray(per_seed)
    sse = f" ± {2 * m.std(ddof=1) / np.sqrt(len(m)):.2f}" if len(m) > 1 else ""
    return "; ".join(cells) + f"; mean over seeds {m.mean():+.2f}{sse}"


def input_deltas(rows: list[dict]) -> list[str]:
    """Per :data:`DETAIL_PAIRS` pair, (model, bits, settings) and metric, over the rows that keep
    ``per_input`` metrics: the paired difference method - baseline on the same held-out inputs,
    per calibration seed: its mean ± 2 standard errors over the inputs (relative to the baseline's
    mean for layer_err / logit_kl, in percentage points for token_agreement), ``*`` where that
    seed's difference is resolved (|mean| > 2 SE); then the mean over seeds with 2 SE over the
    seeds (the calibration-draw noise, which more inputs do not shrink).  Where the inputs mix
    image prompts and texts, layer_err and logit_kl also get a sub-line per kind."""
    by = {(r["model"], r["method"], r["bits"], _setting(r), r["seed"]): r for r in rows if r.get("per_input")}
    out = []
    for method, pair, models in DETAIL_PAIRS:
        for model, bits, head in sorted({k[0:1] + k[2:4] for k in by if k[1] == method}):
            if models is not None and model not in models:
                continue
            seeds = sorted(k[4] for k in by
                           if k[:4] == (model, method, bits, head) and (model, pair, bits, head, k[4]) in by)
            if not seeds:
                continue
            first = by[(model, method, bits, head, seeds[0])]
            kinds = np.asarray(input_kinds(first))
            for k in ("layer_err", "logit_kl", "token_agreement"):
                pp = k == "token_agreement"
                arr = [(s, np.asarray(by[(model, method, bits, head, s)]["per_input"][k]),
                        np.asarray(by[(model, pair, bits, head, s)]["per_input"][k])) for s in seeds]
                out.append(f"- {_label(model, head)} W{bits} {k}, {method} - {pair} ({'pp' if pp else '%'}, "
                           f"{len(kinds)} inputs): " + _deltas(arr, pp))
                if pp or len(set(kinds)) < 2:
                    continue
                for kind in ("image", "text"):
                    sel = kinds == kind
                    out.append(f"  - {kind} {'prompts' if kind == 'image' else 'inputs'} ({int(sel.sum())}): "
                               + _deltas([(s, a[sel], b[sel]) for s, a, b in arr], pp))
    return out


def _mean_cell(row: dict, k: str, f: str) -> str:
    if k in ("head_bits", "n_calib"):
        return "-" if row.get(k) is None else str(row[k])
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
             f"{args.n_held} synthetic images with prompts (or the --n-held of the run's command), none in the "
             f"calibration set; tiny CLIP: {args.n_held} "
             "images + texts; MiniLM: bench_quality's 64 held-out sentences). Cells are means over the "
             "calibration seeds, ± their standard deviation. layer_err: mean relative block-output error with the "
             f"fp32 block input; logit_kl / token_agreement: teacher-forced over a {n_new}-token greedy fp32 "
             "continuation; cosine: embeddings. Tiny models have random weights (except trained-llava: Qwen2 text "
             "hidden 128, 4 layers, LM + projector pretrained 300 steps on the built-in captions/sentences by "
             "bench_speedq.pretrain_llava; its held-out inputs: the training prompt \"Describe the image.\" over "
             "other augmented views of the built-in photos, and the first halves of sentences in no seed's "
             "calibration draw; trained-moe: tiny Qwen3-VL-MoE, text hidden 128, 4 MoE layers of 8 experts "
             "(width 192), top-2, LM (attention, routers, experts) + mergers pretrained 300 steps the same way by "
             "bench_speedq.pretrain (CE + the router load-balancing loss), vision frozen; held out like "
             "trained-llava, routing statistics below; trained-moe-img: the same with images up to 96 x 96 px, "
             "144 merged tokens instead of 36, so image tokens outnumber a prompt's text tokens as in VEQ's "
             "setting): compare methods within a model, not across models. n_calib: the calibration samples of "
             "the row's run (the MoE recipe calibrates on image prompts only). "
             "head_bits: the LM head's width for every method of the row (`--head-bits`; 16 = float16, so the "
             "rows compare the linears alone); - = the exporter's default (4 bits at W3/W4, quantized by the "
             "method's own rule: GPTQ for gptq/veq-ma, RTN for rtn/awq/qig/veq-me). qig-qb: qig with "
             "`--qig-baseline quantized`. "
             "awq/qig/veq-me fold scales only where exact (MiniLM is post-LN BERT: v -> o only, "
             "so there qig can differ from awq only in that group); veq-ma/veq-me apply to the MoE model only, "
             "speedq to LLaVA at 2/4 bits.", "",
             "| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    lines += ["| " + " | ".join(_mean_cell(r, k, f) for k, f in cols) + " |" for r in summ]
    lines += ["", "Bars (same data, paired per calibration seed):"] + \
        (bar_lines or ["- (no qig/awq or veq-ma/gptq pairs in this run)"])
    detail = input_deltas(rows)
    if detail:
        lines += ["", "Paired deltas over the held-out inputs (rows that keep per-input metrics): per calibration "
                  "seed, mean(method - baseline) over the same inputs ± 2 SE over the inputs (* = resolved: "
                  "|mean| > 2 SE; layer_err / logit_kl relative to the baseline's mean, token_agreement in "
                  "percentage points; negative = method has less error / less agreement), then the mean over "
                  "seeds ± 2 SE over seeds:"] + detail
    router = getattr(args, "router", None) or {}
    if router:
        from trained_models import router_lines

        lines += ["", "Routing of the fp32 MoE models on their held-out inputs (with --merge: of the first listed "
                  "run that records the model; top-k slots per expert; entropies "
                  "over log(#experts): 1 = uniform; TV: total-variation distance between the image tokens' and the "
                  "text tokens' expert loads):"]
        lines += [ln for name in sorted(router) for ln in router_lines(name, router[name])]
    if getattr(args, "notes", None):
        lines += ["", "Notes:"] + [f"- {n}" for n in args.notes]
    return lines
