"""Triton dequant-matmul kernels (edgevlm.kernels) vs torch fp16 ``x @ W.T`` (cuBLAS) on a CUDA GPU.

    python benchmarks/bench_triton.py --json build/bench_triton.json --results benchmarks/RESULTS.md
    python benchmarks/bench_triton.py --from-json build/bench_triton.json --results benchmarks/RESULTS.md

Per qtype and shape W[N, K] (4096x14336 both ways, and a few LLM shapes) and per M (1 = the
split-K GEMV, 16/128/512 = the tiled GEMM): first correctness on the GPU (the dequant kernel
bit-exact against the numpy twin; the matmul's relative error against an fp32 product of the
same dequantized weights), then the median time (triton.testing.do_bench, which also flushes
the 50 MB L2 before every launch), packed-weight GB/s, and the ratio to torch fp16 on the same
shape. Several weight copies are used in turn, so no launch finds its weights in L2. The
physical limit is the GPU's device-to-device copy bandwidth (bytes read + written), measured
here too. ``--from-json`` rewrites the RESULTS.md section from a saved run (no GPU needed).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SECTION = "## Triton kernels on CUDA (bench_triton.py)"

# (K, N): out = N rows of W, in = K.
SHAPES = ((4096, 14336), (14336, 4096), (4096, 4096), (1536, 8960), (8960, 1536))
QTYPES = (("q4", 128), ("q4", 32), ("q2", 128), ("q3", 128), ("q8", 128), ("q2b", 16))
MS = (1, 16, 128, 512)


def random_blob(qtype: str, n: int, k: int, group: int, rng: np.random.Generator) -> np.ndarray:
    """A valid packed blob with random codes and realistic scales (packing real weights at these
    sizes takes minutes in numpy; the kernels' speed does not depend on the values)."""
    from edgevlm import qtypes

    qt = qtypes.get(qtype)
    g = k // group
    if qtype == "q2b":
        from edgevlm.qtypes import q2b

        nb = q2b.row_blocks(n)
        return qt.pack_parts(rng.integers(0, 4, (n, k), dtype=np.uint8), rng.integers(0, 4, (n, g), dtype=np.uint8),
                             rng.integers(0, 16, (n, g), dtype=np.uint8),
                             (rng.random((nb, g), dtype=np.float32) * 2e-3 + 1e-3),
                             rng.random((nb, g), dtype=np.float32) * -4)
    scales = (rng.random((n, g), dtype=np.float32) * 0.01 + 0.005).astype(np.float16)
    if qt.symmetric:
        return qt.pack_parts(rng.integers(-127, 128, (n, k), dtype=np.int8), scales, None)
    mins = (-scales.astype(np.float32) * (2 ** (qt.bits - 1))).astype(np.float16)
    return qt.pack_parts(rng.integers(0, 2 ** qt.bits, (n, k), dtype=np.uint8), scales, mins)


def copy_bandwidth(torch, do_bench) -> float:
    """Device-to-device copy of 1 GiB, GB/s counting bytes read + written (median of do_bench)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def rotating(fns):
    """One callable that runs fns[0], fns[1], ... in turn (weights leave L2 between launches)."""
    state = {"i": 0}

    def call():
        f = fns[state["i"] % len(fns)]
        state["i"] += 1
        return f()

    return call


def check_configs(torch, ek, rng, qts=None, gemm: bool = True) -> list[str]:
    """Every GEMV / GEMM config of the autotune sets (GEMV: the set of the type's path), on odd shapes
    with tail units, against an fp32 product on the GPU: a config the autotuner may pick must be
    correct, not only the fastest. qts: qtypes to check (default all); gemm=False: GEMV only."""
    from edgevlm import qtypes

    bad = []
    for qtype, group, n, k in (("q4", 32, 333, 4128), ("q2", 32, 77, 4192), ("q3", 32, 61, 4160),
                               ("q8", 32, 45, 4128), ("q2b", 16, 83, 4128), ("q4", 128, 300, 1024)):
        if qts is not None and qtype not in qts:
            continue
        blob = random_blob(qtype, n, k, group, rng)
        w = ek.PackedWeight.from_blob(blob, qtype, n, k, group, device="cuda")
        deq = ek.dequantize(w)
        if not torch.equal(deq.cpu(), torch.from_numpy(qtypes.get(qtype).dequantize(blob, n, k, group))):
            bad.append(f"dequant {qtype} g{group} {n}x{k}")
        gemv_fast = importlib.import_module("edgevlm.kernels.gemv").default_fast(w)
        gemv_cfgs = ek.GEMV_FAST_CONFIGS if gemv_fast else ek.GEMV_CONFIGS
        for m, cfgs in ((1, gemv_cfgs), (19, ek.GEMM_CONFIGS))[:2 if gemm else 1]:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            bias = torch.randn(n, device="cuda")
            ref = x.float() @ deq.T + bias
            for cfg in cfgs:
                for _ in range(3):  # repeated launches: the split-K counters must come back to zero
                    y = ek.matmul(x, w, bias=bias, config=cfg, out_dtype=torch.float32)
                rel = float((y - ref).abs().max() / ref.abs().max())
                if not rel < 2e-3:
                    bad.append(f"{qtype} g{group} {n}x{k} M={m} {cfg}: rel.err {rel:.1e}")
    return bad


def qts_sel(args) -> list[tuple[str, int]]:
    return [q for q in QTYPES if f"{q[0]}g{q[1]}" in args.qtypes] if args.qtypes else list(QTYPES)


# The GEMV before the word-PTX unpack (pure-Triton uint8 unpack), at the config the autotuner
# picked for q4 on the H100: timed beside the new one (--old) in the same process.
OLD_GEMV = dict(config=(16, 1024, 4, 4), fast=False)


def graph_ms(torch, do_bench, fns, reps: int = 24) -> float:
    """Per-call GPU time of fns (called in turn, reps calls) captured in one CUDA graph: the kernels
    alone, without the Python launch cost that do_bench's per-call figure includes when it exceeds
    the GPU time (a few us for a batch-1 GEMV)."""
    call = rotating(fns)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            call()
    return do_bench(g.replay, warmup=5, rep=100) / reps


def bench(args) -> dict:
    import torch
    from triton.testing import do_bench

    import edgevlm.kernels as ek
    from edgevlm import qtypes

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    import triton

    info = {"device": torch.cuda.get_device_name(dev), "sms": props.multi_processor_count,
            "l2_mb": getattr(props, "L2_cache_size", 0) / 2**20, "torch": torch.__version__,
            "triton": triton.__version__}
    info["copy_gb_s"] = copy_bandwidth(torch, do_bench)
    print(f"# {info['device']}: {info['sms']} SMs, L2 {info['l2_mb']:.0f} MB, torch {info['torch']}, "
          f"triton {info['triton']}; d2d copy {info['copy_gb_s']:.0f} GB/s (read+write)", flush=True)
    rng = np.random.default_rng(0)
    info["config_failures"] = check_configs(torch, ek, rng, {q for q, _ in (qts_sel(args))}, gemm=max(args.ms) > 1)
    print(f"# every autotune config on odd shapes: {info['config_failures'] or 'all correct'}", flush=True)
    rows = []
    fp16_ms: dict[tuple, float] = {}
    shapes = [s for s in SHAPES if f"{s[0]}x{s[1]}" in args.shapes] if args.shapes else SHAPES
    qts = qts_sel(args)
    gemv_mod = importlib.import_module("edgevlm.kernels.gemv")
    for k, n in shapes:
        wf = [torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02 for _ in range(args.copies_fp16)]
        for qtype, group in qts:
            if k % group:
                continue
            t0 = time.perf_counter()
            blob = random_blob(qtype, n, k, group, rng)
            ref_w = qtypes.get(qtype).dequantize(blob, n, k, group)              # numpy float32 [N, K]
            copies = max(2, int(np.ceil(4 * info["l2_mb"] * 2**20 / blob.nbytes)))
            ws = [ek.PackedWeight.from_blob(blob, qtype, n, k, group, device=dev) for _ in range(copies)]
            deq = ek.dequantize(ws[0])
            exact = bool(torch.equal(deq.cpu().view(torch.int32), torch.from_numpy(ref_w).view(torch.int32)))
            for m in args.ms:
                x = torch.randn(m, k, device=dev, dtype=torch.float16)
                y = ek.matmul(x, ws[0])
                ref = x.float() @ deq.T
                rel = float((y.float() - ref).abs().max() / ref.abs().max())
                ours = [lambda w=w: ek.matmul(x, w) for w in ws]
                call_ms = do_bench(rotating(ours), warmup=25, rep=200)
                ms = graph_ms(torch, do_bench, ours)
                tuned = ((gemv_mod._gemv_fast_tuned if gemv_mod.default_fast(ws[0]) else gemv_mod._gemv_tuned) if m == 1 else
                         importlib.import_module("edgevlm.kernels.gemm")._gemm_tuned)
                key = (k, n, m)
                if key not in fp16_ms:
                    fp16_ms[key] = graph_ms(torch, do_bench, [lambda w=w: x @ w.T for w in wf])
                gbs = blob.nbytes / (ms * 1e-3) / 1e9
                row = {"qtype": qtype, "group": group, "K": k, "N": n, "M": m, "ms": ms, "call_ms": call_ms,
                       "fp16_ms": fp16_ms[key],
                       "speedup": fp16_ms[key] / ms, "packed_gb_s": gbs, "copy_frac": gbs / info["copy_gb_s"],
                       "rel_err": rel, "dequant_exact": exact, "config": str(tuned.best_config), "packed_bytes": int(blob.nbytes)}
                rows.append(row)
                if args.json:  # written after every row: a run cut short keeps what it measured
                    Path(args.json).write_text(json.dumps({"info": info, "rows": rows}, indent=1))
                print(f"{qtype:>4} g{group:<3} K={k:<5} N={n:<5} M={m:<4} {ms*1e3:8.1f} us (call {call_ms*1e3:6.1f})"
                      f"  fp16 {fp16_ms[key]*1e3:8.1f} us"
                      f"  x{row['speedup']:5.2f}  {gbs:6.0f} GB/s ({100*row['copy_frac']:3.0f}% of copy)"
                      f"  rel.err {rel:.1e}  dequant exact {exact}  [{row['config']}]", flush=True)
            if args.old and 1 in args.ms and gemv_mod.default_fast(ws[0]):
                x = torch.randn(1, k, device=dev, dtype=torch.float16)
                cfg = ek.GemvConfig(*OLD_GEMV["config"])

                def old(w, x=x, cfg=cfg):
                    out = torch.empty(1, n, dtype=x.dtype, device=dev)
                    return gemv_mod.gemv(x[0], w, None, out[0], cfg, fast=OLD_GEMV["fast"])

                ref = x.float() @ deq.T
                rel = float((old(ws[0]).float() - ref).abs().max() / ref.abs().max())
                ms = graph_ms(torch, do_bench, [lambda w=w: old(w) for w in ws])
                call_ms = do_bench(rotating([lambda w=w: old(w) for w in ws]), warmup=25, rep=200)
                key = (k, n, 1)
                gbs = blob.nbytes / (ms * 1e-3) / 1e9
                rows.append({"qtype": qtype, "group": group, "K": k, "N": n, "M": 1, "ms": ms, "call_ms": call_ms,
                             "fp16_ms": fp16_ms[key], "speedup": fp16_ms[key] / ms, "packed_gb_s": gbs,
                             "copy_frac": gbs / info["copy_gb_s"], "rel_err": rel, "dequant_exact": exact,
                             "config": f"old unpack {OLD_GEMV}", "variant": "old", "packed_bytes": int(blob.nbytes)})
                print(f"{qtype:>4} g{group:<3} K={k:<5} N={n:<5} M=1    {ms*1e3:8.1f} us (call {call_ms*1e3:6.1f})"
                      f"  x{fp16_ms[key] / ms:5.2f}  {gbs:6.0f} GB/s  rel.err {rel:.1e}  [old uint8 unpack]", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps({"info": info, "rows": rows}, indent=1))
            del ws, deq
            print(f"#   ({time.perf_counter() - t0:.0f} s for {qtype} g{group} {k}x{n})", flush=True)
    return {"info": info, "rows": rows}


def markdown(res: dict, command: str) -> list[str]:
    i = res["info"]
    out = [SECTION, "",
           f"Device: **{i['device']}** ({i['sms']} SMs, L2 {i['l2_mb']:.0f} MB), torch {i['torch']}, triton "
           f"{i['triton']}. Device-to-device copy: **{i['copy_gb_s']:.0f} GB/s** (bytes read + written, 1 GiB).",
           "", "```", command, "```", "",
           "us: GPU time per call from a CUDA graph of 24 calls on rotating weight copies (>= 4x L2 in all), "
           "replayed under triton.testing.do_bench (median; L2 flushed before each replay); call us: "
           "do_bench of one eager call (includes Python/launch cost where that exceeds the kernel). "
           "GB/s: packed weight bytes (codes + scales/mins) per second; % copy: that over the copy bandwidth. "
           "x fp16: torch fp16 `x @ W.T` time / ours. rel.err: max |y - ref| / max |ref| against an fp32 product "
           "of the same dequantized weights; dequant: the dequant kernel equals the numpy twin bit for bit.", "",
           "| qtype | K | N | M | us | call us | fp16 us | x fp16 | GB/s | % copy | rel.err | dequant |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    mark = {"old": " (old unpack)", "carried": " *", "ptx-unused": " (word PTX: slower, not used)"}
    for r in res["rows"]:
        out.append(f"| {r['qtype']} g{r['group']}{mark.get(r.get('variant'), '')} | {r['K']} | {r['N']} | {r['M']} | {r['ms']*1e3:.1f} | {r['call_ms']*1e3:.1f} | "
                   f"{r['fp16_ms']*1e3:.1f} | {r['speedup']:.2f} | {r['packed_gb_s']:.0f} | {100*r['copy_frac']:.0f} | "
                   f"{r['rel_err']:.1e} | {'exact' if r['dequant_exact'] else 'DIFFERS'} |")
    if any(r.get("variant") == "old" for r in res["rows"]):
        out += ["", "(old unpack): the same GEMV with the previous pure-Triton uint8 unpack "
                f"(config {OLD_GEMV['config']}), timed in the same run for comparison."]
    if any(r.get("variant") == "ptx-unused" for r in res["rows"]):
        out += ["", "(word PTX: slower, not used): q4 g32 and q8 through the word-PTX GEMV, autotuned over "
                "GEMV_FAST_CONFIGS, in the same run; slower than the uint8 unpack, so their default stays the "
                "latter (gemv.default_fast), whose rows here are the fixed config "
                f"{OLD_GEMV['config']} of that run (the autotuner picks from GEMV_CONFIGS, which contains it)."]
    if res.get("carried_command") is not None:
        out += ["", "Rows marked * were not re-measured in this run (the GEMM, M >= 16, is unchanged); "
                "they are carried over from the previous run: `" + res["carried_command"]
                .replace("/root/out/r3.json", "build/bench_triton_r3.json") + "`."]
    bar = [r for r in res["rows"] if r["qtype"] == "q4" and r["M"] == 1 and {r["K"], r["N"]} == {4096, 14336}
           and r.get("variant") is None]
    if bar:
        out += ["", "Bar (issue 8): batch-1 q4 GEMV >= 2.5x torch fp16 at 4096x14336: " + "; ".join(
            f"g{r['group']} K={r['K']} N={r['N']}: {r['speedup']:.2f}x "
            f"({'PASS' if r['speedup'] >= 2.5 else 'MISS'})" for r in bar) + "."]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the measurements here")
    ap.add_argument("--results", help="rewrite this script's section of this markdown file (RESULTS.md)")
    ap.add_argument("--from-json", help="render --results from a saved --json file instead of measuring")
    ap.add_argument("--shapes", nargs="*", help="KxN to run, e.g. 4096x14336 (default: all)")
    ap.add_argument("--qtypes", nargs="*", help="qtype and group to run, e.g. q4g128 (default: all)")
    ap.add_argument("--ms", nargs="*", type=int, default=list(MS), help="rows of X (1 = GEMV)")
    ap.add_argument("--copies-fp16", type=int, default=3, help="fp16 weight copies rotated for the baseline")
    ap.add_argument("--old", action="store_true", help="also time the GEMV with the old uint8 unpack (M = 1)")
    ap.add_argument("--carry-from", help="with --from-json: add the rows of this older JSON that the new "
                                         "run did not measure (marked as carried over)")
    args = ap.parse_args(argv)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        if args.carry_from:
            old = json.loads(Path(args.carry_from).read_text())
            have = {(r["qtype"], r["group"], r["K"], r["N"], r["M"]) for r in res["rows"]}
            res["rows"] += [dict(r, variant="carried") for r in old["rows"]
                            if (r["qtype"], r["group"], r["K"], r["N"], r["M"]) not in have]
            res["carried_command"] = old.get("command", "")
    else:
        res = bench(args)
        res["command"] = "python benchmarks/bench_triton.py " + " ".join(sys.argv[1:] if argv is None else argv)
        if args.json:
            # Recorded with the JSON's place in the repository (build/), not the device's $OUT.
            res["command"] = res["command"].replace(args.json, "build/bench_triton.json")
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(res, indent=1))
    if args.results:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from bench_quality import write_section

        write_section(args.results, markdown(res, res.get("command", "")), SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
