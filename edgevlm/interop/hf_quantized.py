"""Scale-out export: the language model of an ``.evlm`` as a Hugging Face checkpoint folder in the
compressed-tensors "pack-quantized" or the GPTQ (v1) layout, which transformers loads (and vLLM
serves, tensor-parallel over GPUs), with the vision tower, projector, embeddings, norms and LM
head stored dense.  The packed integers and float16 scales are the ``.evlm``'s own, so both
files hold the same weights: the exporter quantizes the language model with integer zero points
for these formats (``export/int_zero.py``) and :func:`convert` refuses a file whose mins no
integer zero point expresses exactly.  Not here: the packing of other towers, MoE experts.

    edgevlm export SRC -o OUT_DIR --format compressed-tensors      # export_hf(): OUT_DIR/model.evlm too
    edgevlm convert MODEL.evlm --src SRC -o OUT_DIR --format gptq  # convert(): from a finished .evlm

Bit layouts (both pack an LSB-first bit stream into little-endian int32 words, :func:`pack_int32`):
  compressed-tensors  weight_packed int32 [N, ceil(K b / 32)] (codes q + 2^(b-1) along K),
                      weight_scale [N, G] float32 (our float16 values), weight_zero_point int32 [ceil(N b / 32), G]
                      (zero points + 2^(b-1) along N; asymmetric only), weight_shape int64 [2];
                      w = scale * (q - zero_point), q and zero_point signed.
  GPTQ (v1)           qweight int32 [K b / 32, N] (unsigned codes along K), qzeros int32
                      [G, N b / 32] (zero - 1 along N: the v1 convention, so zero >= 1),
                      scales float16 [G, N], g_idx int32 [K] = k // group; w = scale * (q - zero).
Our q2/q3/q4 (w = s q + m) map with zero = -m / s; q8 (w = s c, c in [-127, 127]) is symmetric:
q = c + 128, zero 128.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from .. import format as fmt
from .. import qtypes
from ..export.config import ExportConfig, Format
from ..export.tensor_map import family_for

#: family (tensor_map ``Family.name``) -> regexes of the module names that stay dense besides
#: ``lm_head``: the vision tower and the projector.  Written unanchored (``.*x.*``) so they match
#: transformers' module names and vLLM's (which spell the prefixes differently).
DENSE_MODULES: dict[str, tuple[str, ...]] = {
    "llava": (r".*vision_tower.*", r".*multi_modal_projector.*"),
    "qwen2_vl": (r".*visual.*",),
    "qwen2_5_vl": (r".*visual.*",),
    "idefics3": (r".*vision_model.*", r".*connector.*"),
    "smolvlm": (r".*vision_model.*", r".*connector.*"),
}
#: widths each format packs: compressed-tensors' bit stream of 3-bit codes changed between its
#: versions (0.20 packs densely, older ones 10 per word), so only widths that divide 32 are written.
BITS = {Format.COMPRESSED_TENSORS: (2, 4, 8), Format.GPTQ: (2, 3, 4, 8)}
#: lowest integer zero point each format stores: GPTQ v1 writes zero - 1, so zero 0 would wrap.
ZMIN = {Format.COMPRESSED_TENSORS: 0, Format.GPTQ: 1}
MAX_SHARD_BYTES = 2 << 30   # per safetensors shard; also the writer's peak memory
_SOURCE_FILES = re.compile(r".*\.(json|jinja|txt|model|tiktoken)$")
_NOT_COPIED = {"config.json", "model.safetensors.index.json", "quantize_config.json"}


def _fmt(f) -> Format:
    try:
        f = Format(f)
    except ValueError:
        raise ValueError(f"format must be one of {', '.join(x.value for x in Format if x is not Format.EVLM)}, "
                         f"got {f!r}") from None
    if f is Format.EVLM:
        raise ValueError("format evlm is edgevlm's own file; choose compressed-tensors or gptq for a Hugging Face "
                         "checkpoint folder")
    return f


def int_zero_for(f: Format, kind: str, tower: str, key: str) -> int | None:
    """The lowest integer zero point of a tensor that format ``f`` packs, None for tensors it
    stores dense (which keep float mins).  Packed: the language model's decoder linears."""
    if kind != "linear" or tower != "text" or key == "lm_head.weight":
        return None
    return ZMIN[_fmt(f)]


def check_supported(config: dict, f: Format, bits: int) -> str:
    """Family name of ``config`` (config.json) if format ``f`` can pack its language model at
    ``bits``; ValueError naming what is supported otherwise."""
    f = _fmt(f)
    fam = family_for(config)
    if fam.name not in DENSE_MODULES:
        why = (" (its experts are fused 3-D tensors in transformers, not Linear modules these formats target)"
               if fam.fused else "")
        raise ValueError(f"--format {f.value} exports generative VLMs with a dense language model "
                         f"({', '.join(sorted(DENSE_MODULES))}); {fam.architecture} is not supported{why}")
    if bits not in BITS[f]:
        raise ValueError(f"--format {f.value} packs the language model at {'/'.join(map(str, BITS[f]))} bits, got "
                         f"text bits {bits}; set --text-bits (or --bits for rtn/gptq) to one of them")
    return fam.name


# ---- packing --------------------------------------------------------------------------------
def pack_int32(values: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Pack unsigned ``values`` [..., L, ...] in [0, 2^bits) along ``axis`` as one LSB-first bit
    stream (element i at bits [i b, i b + b) of the stream) into little-endian int32 words:
    int32 [..., ceil(L b / 32), ...].  The run is zero-padded to a multiple of 32 elements, so a
    3-bit element may straddle two words; for b in {2, 4, 8} element j of a word sits at bit j b.
    This is both compressed-tensors' ``pack_to_int32`` (+ 2^(b-1) offset applied by the caller)
    and GPTQ's qweight / qzeros packing (including its 3-bit scheme)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"[pack_int32] expected bits in [1, 8], got {bits}")
    v = np.moveaxis(np.asarray(values), axis, -1)
    if v.size and (int(v.min()) < 0 or int(v.max()) >= 1 << bits):
        raise ValueError(f"[pack_int32] expected values in [0, {(1 << bits) - 1}], got [{v.min()}, {v.max()}]")
    L = v.shape[-1]
    pad = -L % 32
    v = np.concatenate([v, np.zeros((*v.shape[:-1], pad), v.dtype)], -1) if pad else v
    runs = v.reshape(*v.shape[:-1], -1, 32).astype(np.uint64)      # [..., L/32, 32]
    words = np.zeros((*runs.shape[:-1], bits), np.uint64)            # 32 elements -> b words
    for j in range(32):
        pos = j * bits
        w, o = divmod(pos, 32)
        words[..., w] |= (runs[..., j] << np.uint64(o)) & np.uint64(0xFFFFFFFF)
        if o + bits > 32:                                            # the element's high bits
            words[..., w + 1] |= runs[..., j] >> np.uint64(32 - o)
    out = words.astype(np.uint32).reshape(*runs.shape[:-2], -1)[..., : -(-L * bits // 32)]
    return np.moveaxis(out.view(np.int32), -1, axis)


@dataclass(frozen=True)
class Scheme:
    """How one packed linear is quantized (what the quantization_config describes)."""

    module: str             # transformers module name
    bits: int
    group: int
    sym: bool               # q8: w = s (q - 2^(b-1)); else w = s (q - zero)


@dataclass(frozen=True, eq=False)
class Packed:
    """One language-model linear as integers: what both formats store."""

    name: str               # checkpoint name of the weight (".weight" stripped)
    scheme: Scheme
    q: np.ndarray           # uint8 [N, K] unsigned codes
    zero: np.ndarray        # int64 [N, G] zero points (2^(b-1) for sym)
    scales: np.ndarray      # float16 [N, G]

    @property
    def bits(self) -> int:
        return self.scheme.bits


def unpack_record(f: fmt.EvlmFile, name: str, rec, zmin: int) -> Packed:
    """The integers of a q2/q3/q4/q8 record; ValueError when a group's min is not exactly
    -scale * z for an integer z in [zmin, 2^b - 1] (a file exported without --format)."""
    qt = qtypes.get(rec.qtype)
    n, k = rec.shape
    u = qt.unpack(np.asarray(f[name]).reshape(-1), n, k, rec.group_size)
    src = rec.extra["src"]
    base = src[: -len(".weight")] if src.endswith(".weight") else src
    module = family_for(f.metadata["config"]).canonical(src)
    module = module[: -len(".weight")] if module.endswith(".weight") else module
    if qt.symmetric:
        off = 1 << (qt.bits - 1)
        q = (u.codes.astype(np.int16) + off).astype(np.uint8)
        return Packed(base, Scheme(module, qt.bits, rec.group_size, True), q, np.full(u.scales.shape, off, np.int64),
                      np.array(u.scales))
    s, m = u.scales.astype(np.float64), u.mins.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(s > 0, np.rint(-m / s), zmin)
    qmax = (1 << qt.bits) - 1
    bad = ~((m == -s * z) & (z >= zmin) & (z <= qmax))
    if bad.any():
        i, g = (int(x[0]) for x in np.nonzero(bad))
        raise ValueError(f"{name}: group ({i}, {g}) has scale {s[i, g]!r} and min {m[i, g]!r}, which no integer zero "
                         f"point in [{zmin}, {qmax}] expresses exactly; the Hugging Face formats need integer zero "
                         "points: export with `edgevlm export SRC -o DIR --format ...` (it quantizes with them)")
    return Packed(base, Scheme(module, qt.bits, rec.group_size, False), np.array(u.codes, np.uint8),
                  z.astype(np.int64), np.array(u.scales))


def ct_tensors(p: Packed) -> dict[str, np.ndarray]:
    """compressed-tensors pack-quantized tensors of one linear (see the module docstring)."""
    n, k = p.q.shape
    out = {f"{p.name}.weight_packed": pack_int32(p.q, p.bits, 1),
           # float32 (exactly the float16 scales): compressed-tensors dequantizes in the scale's dtype,
           # and float16 would round scale * (q - zero) (13-bit products); vLLM casts on load.
           f"{p.name}.weight_scale": p.scales.astype(np.float32),
           f"{p.name}.weight_shape": np.array([n, k], np.int64)}
    if not p.scheme.sym:   # signed zero point z - 2^(b-1), packed with the + 2^(b-1) offset: z itself
        out[f"{p.name}.weight_zero_point"] = pack_int32(p.zero, p.bits, 0)
    return out


def gptq_tensors(p: Packed) -> dict[str, np.ndarray]:
    """GPTQ v1 tensors of one linear (see the module docstring)."""
    n, k = p.q.shape
    if (n * p.bits) % 32:
        raise ValueError(f"{p.name}: GPTQ packs the zero points of {n} output features at {p.bits} bits into whole "
                         f"int32 words, which needs N * bits to be a multiple of 32")
    return {f"{p.name}.qweight": pack_int32(p.q.T, p.bits, 0),
            f"{p.name}.qzeros": pack_int32((p.zero - 1).T, p.bits, 1),
            f"{p.name}.scales": np.ascontiguousarray(p.scales.T, np.float16),
            f"{p.name}.g_idx": (np.arange(k) // p.scheme.group).astype(np.int32)}


# ---- configs --------------------------------------------------------------------------------
def _suffix(module: str) -> str:
    """``self_attn.q_proj`` of ``model.language_model.layers.3.self_attn.q_proj``."""
    m = re.search(r"\.\d+\.(.+)$", module)
    return m.group(1) if m else module


def ct_config(packed: list[Scheme], dense_res: list[str], dense_linears: list[str]) -> dict:
    """``quantization_config`` of compressed-tensors: one config group per (bits, group, sym)."""
    schemes: dict[tuple, set[str]] = {}
    for p in packed:
        schemes.setdefault((p.bits, p.group, p.sym), set()).add(_suffix(p.module))
    groups = {}
    for i, ((bits, group, sym), sfx) in enumerate(sorted(schemes.items())):
        targets = ["Linear"] if len(schemes) == 1 else [rf"re:.*\.{re.escape(s)}$" for s in sorted(sfx)]
        groups[f"group_{i}"] = {"targets": targets, "format": "pack-quantized", "input_activations": None,
                                "output_activations": None,
                                "weights": {"num_bits": bits, "type": "int", "symmetric": sym, "group_size": group,
                                            "strategy": "group", "dynamic": False}}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": groups, "ignore": ["lm_head", *(f"re:{r}" for r in dense_res), *dense_linears],
            "kv_cache_scheme": None, "global_compression_ratio": None}


def gptq_config(packed: list[Scheme], dense_res: list[str], dense_linears: list[str], blocks: str) -> dict:
    """``quantization_config`` of GPTQ v1 (one width and group for every packed linear)."""
    kinds = {(p.bits, p.group, p.sym) for p in packed}
    if len(kinds) != 1:
        raise ValueError(f"GPTQ checkpoints have one width and group size, but the language model's linears have "
                         f"{sorted(kinds)} (bits, group, symmetric): a group that does not divide some in-features "
                         "falls back to a smaller one; export with a --group that divides them all (e.g. 32), or use "
                         "--format compressed-tensors")
    (bits, group, sym), = kinds
    skip = [*dense_res, *(re.escape(m) + "$" for m in dense_linears)]
    return {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False, "sym": sym,
            "static_groups": False, "true_sequential": True, "checkpoint_format": "gptq", "lm_head": False,
            "block_name_to_quantize": blocks, "dynamic": {f"-:{r}": {} for r in skip},
            "meta": {"quantizer": [f"edgevlm:{__version__}"]}}


# ---- the folder -----------------------------------------------------------------------------
def _dense(a: np.ndarray, dense_dtype: str | None):
    import torch

    t = torch.from_numpy(np.ascontiguousarray(a))
    if dense_dtype is not None and t.is_floating_point():
        t = t.to(getattr(torch, dense_dtype))
    return t


class _ShardWriter:
    """Streams tensors into safetensors shards of <= MAX_SHARD_BYTES (memory: one shard), then
    names them as transformers does: model.safetensors, or model-0000i-of-0000n.safetensors with
    model.safetensors.index.json."""

    def __init__(self, out: Path) -> None:
        self.out, self.parts, self.cur, self.size = out, [], {}, 0
        self.weight_map: dict[str, int] = {}

    def add(self, name: str, t) -> None:
        nb = t.numel() * t.element_size()
        if self.cur and self.size + nb > MAX_SHARD_BYTES:
            self._flush()
        self.cur[name] = t.contiguous()
        self.weight_map[name] = len(self.parts)
        self.size += nb

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.out / f".shard-{len(self.parts)}.tmp"
        save_file(self.cur, str(path), metadata={"format": "pt"})
        self.parts.append((path, self.size))
        self.cur, self.size = {}, 0

    def close(self) -> None:
        if self.cur or not self.parts:
            self._flush()
        n = len(self.parts)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for (path, _), name in zip(self.parts, names):
            os.replace(path, self.out / name)
        if n > 1:
            index = {"metadata": {"total_size": sum(sz for _, sz in self.parts)},
                     "weight_map": {k: names[i] for k, i in sorted(self.weight_map.items())}}
            (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_folder(evlm: str | Path, src: str | Path, out: str | Path, f: Format,
                 dense_dtype: str | None = None) -> dict:
    """Write the Hugging Face folder of ``evlm`` (exported from the model folder ``src``) into the
    existing folder ``out``; returns the ``quantization_config`` written.  ``dense_dtype`` None
    stores every dense tensor exactly (float16 records as float16, float32 ones and dequantized
    tensors as float32); "float16" / "bfloat16" casts them (smaller, no longer bit-exact)."""
    import torch

    from ..export.source import open_source

    f = _fmt(f)
    if dense_dtype not in (None, "float16", "bfloat16", "float32"):
        raise ValueError(f"dense_dtype must be float16, bfloat16, float32 or None (exact), got {dense_dtype!r}")
    src, out = Path(src), Path(out)
    source = open_source(src)
    with fmt.open(evlm) as ef:
        config = json.loads(json.dumps(ef.metadata["config"]))
        fam_name = family_for(config).name
        if fam_name != source.family.name:
            raise ValueError(f"{evlm} holds a {ef.metadata.get('architecture')} but {src} is a "
                             f"{source.family.architecture}; give the folder the file was exported from")
        q = ef.metadata.get("quantization", {})
        check_supported(config, f, int(q.get("text_bits", 16)))
        fam = family_for(config)
        tensors = _ShardWriter(out)
        written: set[str] = set()
        packed: list[Scheme] = []     # (the codes go to the shards as they are made)
        dense_linears: list[str] = []
        untie = False
        for name, rec in ef.records.items():
            extra = rec.extra if isinstance(rec.extra, dict) else {}
            if extra.get("kind") == "tokenizer":
                continue
            zmin = int_zero_for(f, extra.get("kind", ""), extra.get("tower", ""), name)
            if zmin is not None and rec.quantized:
                p = unpack_record(ef, name, rec, zmin)
                packed.append(p.scheme)
                for k, v in (ct_tensors(p) if f is Format.COMPRESSED_TENSORS else gptq_tensors(p)).items():
                    tensors.add(k, torch.from_numpy(np.ascontiguousarray(v)))
                continue
            if zmin is not None:   # an LM linear the export kept float16 (in-features not a multiple of 32)
                dense_linears.append(fam.canonical(extra["src"])[: -len(".weight")])
            a = ef[name]
            if rec.quantized:
                n, k = rec.shape
                a = qtypes.get(rec.qtype).dequantize(np.asarray(a).reshape(-1), n, k, rec.group_size)
            key = extra.get("param") or extra["src"]
            untie |= "param" in extra    # a tied head packed apart from the embeddings: untie it
            tensors.add(key, _dense(np.array(a).reshape(rec.shape), dense_dtype))
            written.add(key)
        for ckpt in ef.metadata.get("dropped", {}):   # unused by the forward pass; kept so loaders find them
            if ckpt in source.locs and ckpt not in written:
                tensors.add(ckpt, _dense(source.read(ckpt), dense_dtype or
                                         ("float32" if source.locs[ckpt].dtype != "F16" else "float16")))
    if not packed:
        raise ValueError(f"{evlm}: no packed language-model linear (text bits {q.get('text_bits')}); export with "
                         "--text-bits 2/3/4/8")
    dense_res = list(DENSE_MODULES[fam_name])
    if f is Format.COMPRESSED_TENSORS:
        qc = ct_config(packed, dense_res, dense_linears)
    else:
        qc = gptq_config(packed, dense_res, dense_linears, fam.towers["text"]["blocks"])
    config["quantization_config"] = qc
    if untie:
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"]["tie_word_embeddings"] = False
    tensors.close()
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if f is Format.GPTQ:   # AutoGPTQ-era loaders read the settings from this file
        (out / "quantize_config.json").write_text(json.dumps({k: v for k, v in qc.items() if k != "quant_method"},
                                                             indent=2) + "\n")
    for p in sorted(src.iterdir()):
        if p.is_file() and _SOURCE_FILES.match(p.name) and p.name not in _NOT_COPIED:
            shutil.copy2(p, out / p.name)
    return qc


def _fresh_dir(out: Path) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder; give a new folder for the Hugging Face checkpoint")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()   # empty (checked by _fresh_dir)
    os.replace(tmp, out)


def convert(evlm: str | Path, src: str | Path, out: str | Path, f: Format | str,
            dense_dtype: str | None = None) -> dict:
    """``edgevlm convert``: the Hugging Face folder ``out`` (new or empty) of a finished ``.evlm``
    whose language model was quantized with integer zero points.  Appears only when complete."""
    f, out = _fmt(f), Path(out)
    tmp = _fresh_dir(out)
    try:
        qc = write_folder(evlm, src, tmp, f, dense_dtype)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return qc


def export_hf(src: str | Path, out: str | Path, cfg: ExportConfig, *, log=None, **kw):
    """``edgevlm export SRC -o OUT --format compressed-tensors|gptq``: quantize ``src`` (the
    language model with integer zero points) into ``OUT/model.evlm``, then write the Hugging
    Face checkpoint of the same weights beside it.  ``OUT`` appears only when both are complete.
    Returns the pipeline's ExportReport (its path is the .evlm inside ``OUT``)."""
    from ..export.pipeline import run_export
    from ..export.source import open_source

    f, out = _fmt(cfg.format), Path(out)
    check_supported(open_source(src).config, f, cfg.effective_text_bits)   # before the (long) export
    tmp = _fresh_dir(out)
    try:
        report = run_export(src, tmp / "model.evlm", cfg, log=log, evlm_only=True, **kw)
        write_folder(tmp / "model.evlm", src, tmp, f)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.path = out / "model.evlm"
    (log or (lambda m: print(m, file=sys.stderr, flush=True)))(
        f"wrote {out}: Hugging Face {f.value} checkpoint (language model packed) + model.evlm of the same weights")
    return report


__all__ = ["BITS", "DENSE_MODULES", "Packed", "Scheme", "check_supported", "convert", "ct_config", "ct_tensors",
           "export_hf", "gptq_config", "gptq_tensors", "int_zero_for", "pack_int32", "unpack_record", "write_folder"]
