"""Reading an ordinary Hugging Face model folder: config, safetensors weights, tokenizer, processor.

Weights are read tensor by tensor with plain file reads (no mmap, no torch): the exporter holds
one block in memory at a time and its resident set must not grow with the checkpoint as pages
of a mapped file would.  Pickled checkpoints (pytorch_model.bin) are refused: loading them runs
arbitrary code.  No network access: everything comes from the folder.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .tensor_map import Family, family_for

# safetensors dtype -> (numpy dtype of the stored bytes, itemsize)
_ST_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8"),
              "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
              "U8": np.dtype("u1"), "BOOL": np.dtype("?")}


@dataclass(frozen=True)
class _TensorLoc:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def _read_header(path: Path) -> dict[str, _TensorLoc]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes); re-download it")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 << 20:
            raise ValueError(f"{path}: not a safetensors file or truncated (header length {n} for a {size}-byte "
                             "file); re-download it")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e}); re-download it") from None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = info.get("dtype")
        if dt not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dt}, which edgevlm export does not read "
                             f"(supported: {', '.join(_ST_DTYPES)})")
        a, b = info["data_offsets"]
        shape = tuple(int(s) for s in info["shape"])
        if 8 + n + b > size or b - a != int(np.prod(shape, dtype=np.int64)) * _ST_DTYPES[dt].itemsize:
            raise ValueError(f"{path}: tensor {name!r} lies outside the file or has an inconsistent size; "
                             "the file is truncated or corrupt, re-download it")
        out[name] = _TensorLoc(path, dt, shape, 8 + n + a, b - a)
    return out


def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: {what} is not valid JSON ({e})") from None


@dataclass
class Source:
    """A validated model folder.  ``read(name)`` returns one tensor as float32 (or its int dtype)."""

    path: Path
    config: dict[str, Any]
    family: Family
    locs: dict[str, _TensorLoc]
    preprocessor: dict[str, Any] | None = None
    tokenizer_json: bytes | None = None
    tokenizer_config: dict[str, Any] = field(default_factory=dict)
    special_tokens: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None
    generation_config: dict[str, Any] | None = None
    extra_files: dict[str, Any] = field(default_factory=dict)  # e.g. sentence-transformers pooling

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.locs.items()}

    def read(self, name: str) -> np.ndarray:
        """One checkpoint tensor; floating types converted to float32 (bf16 exactly)."""
        loc = self.locs[name]
        buf = bytearray(loc.nbytes)
        with open(loc.file, "rb") as f:
            f.seek(loc.start)
            if f.readinto(buf) != loc.nbytes:
                raise ValueError(f"{loc.file}: truncated while reading {name!r}; re-download it")
        a = np.frombuffer(buf, dtype=_ST_DTYPES[loc.dtype]).reshape(loc.shape)
        if loc.dtype == "BF16":
            return (a.astype(np.uint32) << 16).view(np.float32)
        if a.dtype.kind == "f":
            return a.astype(np.float32)
        return a.copy()


def open_source(src: str | Path) -> Source:
    """Validate ``src`` as a supported Hugging Face model folder; ValueError says what is wrong."""
    path = Path(src)
    if not path.exists():
        raise ValueError(f"{path}: no such file or directory; give the path of a Hugging Face model folder "
                         "(config.json, *.safetensors, tokenizer.json, preprocessor_config.json)")
    if not path.is_dir():
        raise ValueError(f"{path}: is a file; give the Hugging Face model folder that contains it")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{path}: not a Hugging Face model folder (no config.json); download the whole "
                         "repository, e.g. `huggingface-cli download <repo> --local-dir DIR`")
    config = _load_json(cfg_path, "config.json")
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object")
    family = family_for(config)

    index = path / "model.safetensors.index.json"
    if index.is_file():
        wmap = _load_json(index, "model.safetensors.index.json").get("weight_map", {})
        files = sorted({path / f for f in wmap.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{path}: the index names shard(s) that are missing: {', '.join(missing)}; "
                             "finish the download")
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = (f" Found {', '.join(pickled)}: convert it to safetensors first (edgevlm never unpickles, as "
                "that can run arbitrary code)." if pickled else "")
        raise ValueError(f"{path}: no *.safetensors weights.{hint}")
    locs: dict[str, _TensorLoc] = {}
    for f in files:
        for k, v in _read_header(f).items():
            if k in locs:
                raise ValueError(f"tensor {k!r} appears in both {locs[k].file.name} and {f.name}")
            locs[k] = v

    s = Source(path, config, family, locs)
    vision = family.name != "bert"  # every other family sees images
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        s.preprocessor = _load_json(pre, "preprocessor_config.json")
    elif vision:
        raise ValueError(f"{path}: no preprocessor_config.json; the runtime needs the image processor settings "
                         "(resize, crop, mean/std). Save the processor: `AutoImageProcessor.from_pretrained(...)"
                         ".save_pretrained(DIR)`")
    _read_tokenizer(s)
    gen = path / "generation_config.json"
    if gen.is_file():
        s.generation_config = _load_json(gen, "generation_config.json")
    proc = path / "processor_config.json"  # processor-level settings (image token counts, image_seq_len, ...)
    if proc.is_file():
        s.extra_files["processor_config"] = _load_json(proc, "processor_config.json")
    pooling = path / "1_Pooling" / "config.json"  # sentence-transformers layout
    if pooling.is_file():
        s.extra_files["sentence_transformers_pooling"] = _load_json(pooling, "1_Pooling/config.json")
    return s


def _read_tokenizer(s: Source) -> None:
    path = s.path
    tcfg = path / "tokenizer_config.json"
    if tcfg.is_file():
        s.tokenizer_config = _load_json(tcfg, "tokenizer_config.json")
    smap = path / "special_tokens_map.json"
    if smap.is_file():
        s.special_tokens = _load_json(smap, "special_tokens_map.json")
    tj = path / "tokenizer.json"
    if tj.is_file():
        s.tokenizer_json = tj.read_bytes()
        _load_json(tj, "tokenizer.json")
    else:
        s.tokenizer_json = _convert_tokenizer(path)
    # chat template: tokenizer_config.json, then the files transformers 5 writes beside it
    tmpl = s.tokenizer_config.get("chat_template")
    for name in ("chat_template.jinja", "chat_template.json"):
        f = path / name
        if tmpl is None and f.is_file():
            tmpl = f.read_text(encoding="utf-8")
            if name.endswith(".json"):
                tmpl = json.loads(tmpl).get("chat_template")
    if isinstance(tmpl, list):  # named templates: keep the default one
        tmpl = next((t["template"] for t in tmpl if t.get("name") == "default"), tmpl[0]["template"])
    s.chat_template = tmpl


def _convert_tokenizer(path: Path) -> bytes:
    """No tokenizer.json: let transformers build the fast tokenizer (from vocab.txt, merges,
    sentencepiece, ...) and serialise it, so the runtime only ever needs `tokenizers`."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, use_fast=True)
        return tok.backend_tokenizer.to_str().encode("utf-8")
    except Exception as e:  # noqa: BLE001 - any failure means the same thing to the user
        raise ValueError(f"{path}: no tokenizer.json and transformers could not build a fast tokenizer from "
                         f"the folder ({type(e).__name__}: {e}); save the tokenizer with "
                         "`AutoTokenizer.from_pretrained(...).save_pretrained(DIR)`") from None


# vision model type -> the PIL image processor class (torchvision-free)
_PIL_BY_MODEL_TYPE = {"clip": "CLIPImageProcessorPil", "clip_vision_model": "CLIPImageProcessorPil",
                      "siglip": "SiglipImageProcessorPil", "siglip_vision_model": "SiglipImageProcessorPil"}


def _read_json_or_empty(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def pil_image_processor(model_dir: Path, vision_type: str = ""):
    """The ``*ImageProcessorPil`` class named in preprocessor_config.json (``CLIPImageProcessor``,
    ``CLIPImageProcessorFast`` and ``CLIPImageProcessorPil`` all mean ``CLIPImageProcessorPil``),
    else the one matching the vision model type, loaded from the folder."""
    import transformers

    cfg = _read_json_or_empty(model_dir / "preprocessor_config.json") or \
        _read_json_or_empty(model_dir / "processor_config.json").get("image_processor", {})
    if not cfg:
        raise ValueError(f"{model_dir}: no preprocessor_config.json (nor an image_processor in "
                         "processor_config.json); cannot preprocess images")
    names = []
    named = cfg.get("image_processor_type")
    if named:
        base = named
        for suffix in ("Fast", "Pil"):
            if base.endswith(suffix):
                base = base[: -len(suffix)]
        names.append(base + "Pil")
    if vision_type in _PIL_BY_MODEL_TYPE:
        names.append(_PIL_BY_MODEL_TYPE[vision_type])
    for name in names:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls.from_pretrained(str(model_dir))
    raise ValueError(f"{model_dir}: no PIL image processor for image_processor_type={named!r} "
                     f"(vision model type {vision_type!r}); tried {names}")
