"""``edgevlm export-onnx``: an ``.evlm`` file -> an ONNX graph that ONNX Runtime runs on CPU.

    from edgevlm.interop.onnx_export import OnnxExportConfig, export_onnx
    report = export_onnx("clip-q4.evlm", "clip-q4.onnx", OnnxExportConfig(tower="both"))

What is exported (the math of ``edgevlm.runtime``, tower by tower; onnx_graph.py says how each
piece is written):

* CLIPModel / SiglipModel (runtime/dual.py): vision ``pixel_values`` float32 [B, 3, S, S] ->
  ``image_features`` (before L2 normalisation, ``DualEncoder.encode_pixels(normalize=False)``) and
  ``image_embeds`` (L2-normalised, ``encode_image``); text ``input_ids`` int64 [B, T] (+
  ``attention_mask`` int64 [B, T] for CLIP, which pads to the longest text; SigLIP runs unmasked on
  texts padded to max_length, as the runtime does) -> ``text_features`` / ``text_embeds``. With
  both towers, ``logits_per_image`` [B_img, B_txt] as ``DualEncoder.logits``.
* LlavaForConditionalGeneration (runtime/llava.py): the vision tower up to the selected layers and
  the projector: ``pixel_values`` -> ``image_features`` [B, n_tokens, D_text], the rows that replace
  the image tokens. The language model is not exported.

Preprocessing and tokenization stay outside the graph: feed what ``DualEncoder.preprocess`` /
``tokenize`` (or the Hugging Face processor) return; the file's preprocessor config is stored in
the model's metadata (``edgevlm.preprocess``). Batch (and text length) axes are dynamic; the image
size is fixed. The output file is written atomically (temp files, then rename); weights go to
``OUT.data`` next to it (ONNX external data) when asked or when they would pass protobuf's 2 GiB.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .onnx_graph import Graph

__all__ = ["FAMILIES", "OnnxExportConfig", "OnnxExportReport", "Tower", "export_onnx"]

F32 = np.float32
#: metadata "family" -> architecture export-onnx supports
FAMILIES = {"clip": "CLIPModel", "siglip": "SiglipModel", "llava": "LlavaForConditionalGeneration"}
# Protobuf cannot serialize a message past 2 GiB; above this many initializer bytes the weights go to
# external data whatever was asked (the margin covers the graph itself).
EXTERNAL_AUTO_BYTES = int(1.75 * (1 << 30))


class Tower(str, enum.Enum):
    VISION = "vision"
    TEXT = "text"
    BOTH = "both"


@dataclass(frozen=True)
class OnnxExportConfig:
    """tower: what to export (None: both for CLIP/SigLIP, vision for LLaVA).
    accuracy_level: MatMulNBits' activations, 0 = float32, 4 = int8 per block (ORT's fast CPU path,
    like edgevlm's SIMD kernels). external_data: weights in ``OUT.data`` (None: only past 1.75 GiB)."""

    tower: Tower | None = None
    accuracy_level: int = 4
    external_data: bool | None = None

    def __post_init__(self) -> None:
        if self.tower is not None and not isinstance(self.tower, Tower):
            try:
                object.__setattr__(self, "tower", Tower(self.tower))
            except ValueError:
                raise ValueError(f"tower must be one of {[t.value for t in Tower]} (or None for the family's "
                                 f"default), got {self.tower!r}") from None
        if self.accuracy_level not in (0, 4):
            raise ValueError(f"accuracy_level must be 0 (float32 activations) or 4 (int8 activations), got "
                             f"{self.accuracy_level!r} (ORT's CPU kernel runs levels 1-3 on float32 inputs as level 0)")


@dataclass(frozen=True)
class OnnxExportReport:
    """What :func:`export_onnx` wrote: files, graph size, and the MatMulNBits width per edgevlm qtype."""

    path: Path
    data_path: Path | None
    family: str
    tower: str
    accuracy_level: int
    nodes: int
    matmulnbits: int
    dense_linears: int
    widths: dict[str, int] = field(default_factory=dict)  # "q4 -> 4-bit block 32" -> linears
    file_bytes: int = 0
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        """Human-readable summary (what ``edgevlm export-onnx`` prints)."""
        size = self.file_bytes + (self.data_path.stat().st_size if self.data_path else 0)
        out = [f"wrote {self.path} ({size / 2**20:.2f} MiB" + (f", weights in {self.data_path.name}" if
                                                              self.data_path else "") + ")",
               f"  {self.family} {self.tower}: {self.nodes} nodes, {self.matmulnbits} MatMulNBits (accuracy_level "
               f"{self.accuracy_level}), {self.dense_linears} float MatMul linears",
               f"  inputs {', '.join(self.inputs)} -> outputs {', '.join(self.outputs)}"]
        for k, v in sorted(self.widths.items()):
            note = "widened to 4-bit codes, exact" if k.startswith("q3 ") else "exact"
            out.append(f"  {k}: {v} linears ({note})")
        return out


def _dense(g: Graph, x: str, prefix: str, rows: slice) -> str:
    """x @ W[rows]^T + b[rows] for a float ``{prefix}.weight`` / ``.bias`` (a slice of a fused matrix)."""
    y = g.op("MatMul", [x, g.tensor(f"{prefix}.weight", transpose=True, rows=rows)], prefix + ".mm")
    return g.op("Add", [y, g.tensor(f"{prefix}.bias", rows=rows)], prefix + ".out")


def _vision_embed(g: Graph, vt: Any, px: str) -> str:
    """Patch conv [+ class token] + positions [+ CLIP pre-LN]: [B, 3, S, S] -> [B, T, D].
    ``vt`` is the runtime's VisionTower or LlavaVision (patch, dim, cls, pre, eps)."""
    p, d = vt.patch, vt.dim
    ins = [px, g.tensor("vision.embed.patch.weight")]
    if "vision.embed.patch.bias" in g.f.records:
        ins.append(g.tensor("vision.embed.patch.bias"))
    x = g.op("Conv", ins, "vision.embed.conv", kernel_shape=[p, p], strides=[p, p])       # [B, D, g, g]
    x = g.op("Transpose", [g.op("Reshape", [x, g.const([0, d, -1])], "vision.embed.flat")], "vision.embed.patches",
             perm=[0, 2, 1])                                                               # [B, N, D]
    if vt.cls is not None:
        b = g.op("Slice", [g.op("Shape", [x], "vision.embed.shape"), g.const([0]), g.const([1])], "vision.embed.b")
        shape = g.op("Concat", [b, g.const([1, d])], "vision.embed.cls_shape", axis=0)
        cls = g.op("Expand", [g.array("vision.embed.class", vt.cls.reshape(1, 1, d)), shape], "vision.embed.cls_b")
        x = g.op("Concat", [cls, x], "vision.embed.tokens", axis=1)                      # [B, 1+N, D]
    x = g.op("Add", [x, g.tensor("vision.embed.pos")], "vision.embed.out")
    if getattr(vt, "pre", None) is not None:
        x = g.layer_norm(x, "vision.pre_norm", vt.eps)
    return x


def _vision(g: Graph, vt: Any, px: str) -> str:
    """runtime.dual.VisionTower: [B, 3, S, S] -> image features [B, E]."""
    x = _vision_embed(g, vt, px)
    for i, blk in enumerate(vt.blocks):
        x = g.block(x, f"vision.blocks.{i}", blk, vt.dim)
    if vt.family == "clip":
        pooled = g.op("Gather", [x, g.const(0)], "vision.cls", axis=1)                     # [B, D]
        return g.linear(g.layer_norm(pooled, "vision.post_norm", vt.eps), "vision.proj", 2, bias=False)
    x = g.layer_norm(x, "vision.post_norm", vt.eps)                                        # [B, N, D]
    d = vt.dim
    kv = _dense(g, x, "vision.head.attn.in_proj", slice(d, 3 * d))                          # [B, N, 2D]
    k = g.op("Slice", [kv, g.const([0]), g.const([d]), g.const([-1])], "vision.head.k")
    v = g.op("Slice", [kv, g.const([d]), g.const([2 * d]), g.const([-1])], "vision.head.v")
    q = g.array("vision.head.q_probe", vt.head_q_probe)        # [1, 1, D]: input-independent, the runtime's
    a = g.attention(q, k, v, vt.heads, d, "vision.head.attn")                              # [B, 1, D]
    h = g.linear(a, "vision.head.attn.out_proj", 3)
    m = g.act(g.linear(g.layer_norm(h, "vision.head.norm", vt.eps), "vision.head.mlp.fc1", 3), vt.act,
              "vision.head.mlp.act")
    h = g.op("Add", [h, g.linear(m, "vision.head.mlp.fc2", 3)], "vision.head.res")
    return g.op("Squeeze", [h, g.const([1])], "vision.head.out")                           # [B, D]


def _text(g: Graph, tt: Any, ids: str, mask: str | None) -> str:
    """runtime.dual.TextTower: input_ids [B, T] (+ attention_mask, CLIP) -> text features [B, E]."""
    x = g.embedding(ids, "text.embed.tok")                                                 # [B, T, D]
    shape = g.op("Shape", [ids], "text.shape")
    t = g.op("Slice", [shape, g.const([1]), g.const([2])], "text.t")                      # [1] = T
    pos = g.op("Slice", [g.tensor("text.embed.pos"), g.const([0]), t, g.const([0])], "text.pos")
    x = g.op("Add", [x, pos], "text.embed.out")
    d = tt.pos.shape[1]
    allow = None
    if tt.family == "clip":  # query i sees keys j <= i, and only unpadded keys
        r = g.op("Range", [g.const(0), g.op("Squeeze", [t, g.const([0])], "text.t0"), g.const(1)], "text.r")
        allow = g.op("LessOrEqual", [g.op("Unsqueeze", [r, g.const([0])], "text.j"),
                                     g.op("Unsqueeze", [r, g.const([1])], "text.i")], "text.causal")  # [T, T]
        km = g.op("Cast", [mask], "text.keymask", to=9)                                     # bool: mask != 0
        km = g.op("Unsqueeze", [km, g.const([1, 2])], "text.keymask4")                      # [B, 1, 1, T]
        allow = g.op("And", [allow, km], "text.allow")                                     # [B, 1, T, T]
    for i, blk in enumerate(tt.blocks):
        x = g.block(x, f"text.blocks.{i}", blk, d, allow)
    if tt.family == "siglip":  # the last position
        last = g.op("Sub", [g.op("Squeeze", [t, g.const([0])], "text.tlast"), g.const(1)], "text.last")
        pooled = g.op("Gather", [x, last], "text.pooled", axis=1)                          # [B, D]
    else:  # the first eos of each row (legacy configs with eos id 2: the largest id)
        ids32 = g.op("Cast", [ids], "text.ids32", to=6)                                     # int32
        key = ids32 if tt.eos_token_id == 2 else g.op(
            "Cast", [g.op("Equal", [ids32, g.const(int(tt.eos_token_id), np.int32)], "text.is_eos")], "text.eos32",
            to=6)
        idx = g.op("ArgMax", [key], "text.pool_idx", axis=1, keepdims=1)                   # [B, 1] first max
        pooled = g.op("GatherND", [x, idx], "text.pooled", batch_dims=1)                   # [B, D]
    pooled = g.layer_norm(pooled, "text.final_norm", tt.eps)
    return g.linear(pooled, "text.proj", 2, bias=False) if tt.family == "clip" else g.linear(pooled, "text.head", 2)


def _llava(g: Graph, lv: Any, px: str) -> str:
    """runtime.llava.LlavaVision.encode: [B, 3, S, S] -> projected features [B, n_tokens, D_text]."""
    x = _vision_embed(g, lv, px)
    hidden = {0: x}
    for i, blk in enumerate(lv.blocks[:max(lv.layers)]):
        x = g.block(x, f"vision.blocks.{i}", blk, lv.dim)
        hidden[i + 1] = x
    feats = [hidden[i] for i in lv.layers]
    x = feats[0] if len(feats) == 1 else g.op("Concat", feats, "vision.features", axis=-1)
    if lv.strategy == "default":  # drop the CLS row
        x = g.op("Slice", [x, g.const([1]), g.const([np.iinfo(np.int64).max]), g.const([1])], "vision.no_cls")
    h = g.act(g.linear(x, "projector.fc1", 3), lv.proj_act, "projector.act")
    return g.linear(h, "projector.fc2", 3)


def _build(f: Any, cfg: OnnxExportConfig) -> tuple[Any, Graph, str, Tower]:
    meta = f.metadata or {}
    family, arch = meta.get("family"), meta.get("architecture")
    if family not in FAMILIES or arch != FAMILIES[family]:
        raise ValueError(f"{f.path}: export-onnx supports CLIPModel and SiglipModel (vision and text towers) and "
                         f"LlavaForConditionalGeneration (vision tower + projector); this file is {arch!r} (family "
                         f"{family!r}). Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Idefics3/SmolVLM and BERT exports are not "
                         "supported.")
    g = Graph(f, cfg.accuracy_level)
    inputs, outputs = [], []
    doc = f"edgevlm export-onnx of {arch}; preprocessing and tokenization are outside the graph"
    if family == "llava":
        tower = cfg.tower or Tower.VISION
        if tower is not Tower.VISION:
            raise ValueError(f"LLaVA exports only its vision tower + projector (--tower vision), got --tower "
                             f"{tower.value}; the language model is not exported to ONNX")
        from ..runtime.llava import LlavaVision

        lv = LlavaVision(f, meta.get("config") or {})
        inputs.append(g.value_info("pixel_values", "float", ["batch", lv.channels, lv.image_size, lv.image_size]))
        feats = _llava(g, lv, "pixel_values")
        out = g.op("Identity", [feats], "image_features")
        outputs.append(g.value_info(out, "float", ["batch", "image_tokens", lv.fc2.n]))
        return g.model(inputs, outputs, doc, _metadata(meta, family, tower, cfg)), g, family, tower
    from ..runtime.dual import DualEncoder

    enc = DualEncoder(f)
    tower = cfg.tower or Tower.BOTH
    e = enc.embed_dim
    if tower in (Tower.VISION, Tower.BOTH):
        vt = enc.vision
        inputs.append(g.value_info("pixel_values", "float", ["image_batch", vt.channels, vt.image_size,
                                                             vt.image_size]))
        img = g.op("Identity", [_vision(g, vt, "pixel_values")], "image_features")
        img_n = g.l2_normalize(img, "image_embeds")
        outputs += [g.value_info(img, "float", ["image_batch", e]), g.value_info(img_n, "float", ["image_batch", e])]
    if tower in (Tower.TEXT, Tower.BOTH):
        inputs.append(g.value_info("input_ids", "int64", ["text_batch", "sequence"]))
        mask = None
        if enc.family == "clip":
            mask = "attention_mask"
            inputs.append(g.value_info(mask, "int64", ["text_batch", "sequence"]))
        txt = g.op("Identity", [_text(g, enc.text, "input_ids", mask)], "text_features")
        txt_n = g.l2_normalize(txt, "text_embeds")
        outputs += [g.value_info(txt, "float", ["text_batch", e]), g.value_info(txt_n, "float", ["text_batch", e])]
    if tower is Tower.BOTH:  # DualEncoder.logits: (img @ txt^T) * exp(logit_scale) + logit_bias
        s = g.op("MatMul", [img_n, g.op("Transpose", [txt_n], "text_embeds_t", perm=[1, 0])], "cos")
        s = g.op("Mul", [s, g.const(F32(np.exp(enc.logit_scale)), F32)], "logits_scaled")
        lg = g.op("Add", [s, g.const(F32(enc.logit_bias), F32)], "logits_per_image")
        outputs.append(g.value_info(lg, "float", ["image_batch", "text_batch"]))
    return g.model(inputs, outputs, doc, _metadata(meta, family, tower, cfg)), g, family, tower


def _metadata(meta: dict, family: str, tower: Tower, cfg: OnnxExportConfig) -> dict[str, str]:
    return {"edgevlm.family": family, "edgevlm.tower": tower.value,
            "edgevlm.accuracy_level": str(cfg.accuracy_level),
            "edgevlm.config": json.dumps(meta.get("config") or {}),
            "edgevlm.preprocess": json.dumps(meta.get("preprocess") or {})}


def _save(model: Any, out: Path, external: bool) -> Path | None:
    """Write ``out`` (and ``out.data`` with external weights) atomically: into a temp folder beside
    it, fsync, then rename data first and the model last (a reader never sees a model without its
    data). Returns the data path or None."""
    import onnx

    tmp = out.with_name(f".{out.name}.{secrets.token_hex(6)}.tmp")
    tmp.mkdir()
    data_name = out.name + ".data"
    try:
        if external:
            onnx.save_model(model, tmp / out.name, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(model, tmp / out.name)
        files = [data_name, out.name] if external else [out.name]
        for name in files:
            fd = os.open(tmp / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for name in files:
            os.replace(tmp / name, out.with_name(name))
    finally:
        for p in tmp.iterdir() if tmp.exists() else ():
            with contextlib.suppress(OSError):
                p.unlink()
        with contextlib.suppress(OSError):
            tmp.rmdir()
    return out.with_name(data_name) if external else None


def export_onnx(src: str | os.PathLike, out: str | os.PathLike, cfg: OnnxExportConfig = OnnxExportConfig(),
                log: Callable[[str], None] | None = None) -> OnnxExportReport:
    """Export the ``.evlm`` file ``src`` to the ONNX model ``out`` (overwritten atomically, like
    ``edgevlm export``). Raises ValueError for an unsupported family or a bad output path."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ValueError("edgevlm export-onnx needs the onnx package: pip install onnx (and onnxruntime to run "
                         "the model)") from None
    from .. import format as fmt

    src, out = Path(src), Path(out)
    if out.is_dir():
        raise ValueError(f"output {out} is a directory; give a file name such as {out / 'model.onnx'}")
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise ValueError(f"output {out} is the input file; give another name (e.g. {out.with_suffix('.onnx')})")
    out.parent.mkdir(parents=True, exist_ok=True)
    with fmt.open(src) as f:
        model, g, family, tower = _build(f, cfg)
        external = bool(cfg.external_data) or g.init_bytes > EXTERNAL_AUTO_BYTES
        if log and external and not cfg.external_data:
            log(f"weights are {g.init_bytes / 2**30:.2f} GiB, past protobuf's 2 GiB limit with the graph: "
                f"writing them to {out.name}.data")
        data = _save(model, out, external)
    widths = {f"{q} -> {b}-bit block {blk}": n for (q, b, blk), n in g.widths.items()}
    return OnnxExportReport(out, data, family, tower.value, cfg.accuracy_level, len(g.nodes),
                            sum(1 for n in g.nodes if n.op_type == "MatMulNBits"), g.dense, widths,
                            out.stat().st_size, tuple(i.name for i in model.graph.input),
                            tuple(o.name for o in model.graph.output))

