"""Calibration data for the exporter: images (+ captions) and text-only strings.

``load_calib(None)`` uses the assets that ship inside the package (``edgevlm/export/calib/``:
18 photos and textures at 256 px, one caption each, 575 sentences; provenance and licenses in
``calib/LICENSE.md``), so an export needs nothing beyond the model folder.  A user can instead
give a folder of images (+ ``captions.jsonl`` / ``sentences.txt``), a ``.jsonl`` file or a
``.txt`` file.  Only numpy and Pillow are needed; the result is deterministic for a given seed.
"""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_SHORT_SIDE = 1024  # larger images are downscaled on load (bicubic) to bound memory
_CROP_AREA = (0.5, 1.0)  # random-resized-crop area fraction of augmented views
_CROP_RATIO = (3 / 4, 4 / 3)  # ... and aspect ratio range (sampled log-uniformly)
_SEED_MASK = 2**64 - 1  # any int seed, negative ones included


@dataclass(frozen=True)
class CalibSet:
    """A calibration set, sized exactly as requested.

    images    ``n_images`` RGB images (sizes vary; the model's processor resizes them).
    captions  one string per image, ``""`` where the image has no caption.
    texts     ``n_texts`` text-only calibration strings (sentences + captions).
    source    ``"built-in"``, the path given, or the path plus a note saying which part came
              from the built-in assets (e.g. ``"notes.txt (texts) + built-in images"``).
    """

    images: tuple[Image.Image, ...]
    captions: tuple[str, ...]
    texts: tuple[str, ...]
    source: str


@dataclass(frozen=True)
class _Raw:
    """Unexpanded sources: image paths with their captions, and the text pool."""

    images: tuple[tuple[pathlib.Path, str], ...]
    texts: tuple[str, ...]


def builtin_dir() -> pathlib.Path:
    """The folder of the built-in assets: ``images/*.jpg``, ``captions.jsonl``, ``sentences.txt``."""
    return pathlib.Path(__file__).resolve().parent / "calib"


def load_calib(path: str | os.PathLike | None = None, *, n_images: int = 64, n_texts: int = 64,
               seed: int = 0) -> CalibSet:
    """Load calibration data and expand or subsample it to exactly ``n_images`` / ``n_texts``.

    ``path``:
      * ``None`` - the built-in assets (:func:`builtin_dir`).
      * a folder - every image directly in it (extensions :data:`IMAGE_EXTS`, sorted by name,
        not recursive), plus an optional ``captions.jsonl`` (lines ``{"image": name, "text":
        caption}``; lines with only ``"text"`` are extra texts; further captions of the same
        image are extra texts) and an optional ``sentences.txt`` (one text per non-blank line).
      * a ``.jsonl`` file - lines with ``"image"`` (relative to the file's folder) and/or
        ``"text"``; a line with both is a captioned image.
      * a ``.txt`` file - texts only, one per non-blank line.
      When the given data has no images, the built-in images are used; when it has no texts,
      the built-in texts are; ``source`` says so.

    Expansion: with fewer source images than ``n_images`` the sources are cycled in name order;
    the first pass uses the images unchanged, later passes use augmented views (random-resized
    crop of 50-100% of the area, resized back to the source size, and a random horizontal flip).
    With more, a random subset of ``n_images`` is taken (kept in name order).  Texts (sentences
    first, then captions) are cycled or subsampled the same way, without augmentation.  All
    randomness comes from ``seed``; only the selected images are decoded.  Images are RGB (EXIF
    orientation applied, transparency composited on white, first frame of animations) with the
    shorter side capped at :data:`MAX_SHORT_SIDE`.

    Raises ``ValueError`` (saying what is wrong and how to fix it) for a missing path, a folder
    without images, an unreadable image, a bad JSONL line, a caption naming a missing image,
    an unsupported file type, or ``n_images`` / ``n_texts`` < 1.
    """
    for name, v in (("n_images", n_images), ("n_texts", n_texts)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer (at least 1), got {v!r}")
    if path is None:
        raw, source = _builtin(), "built-in"
    else:
        p = pathlib.Path(os.fspath(path)).expanduser()
        if not p.exists():
            raise ValueError(f"calibration path {str(p)!r} does not exist; give a folder of images, a .jsonl "
                             f"or a .txt file, or leave it unset to use the built-in calibration set")
        source = str(path)
        if p.is_dir():
            raw = _from_folder(p, p)
        elif p.suffix.lower() == ".jsonl":
            raw = _from_jsonl(p)
        elif p.suffix.lower() == ".txt":
            raw = _Raw((), _read_lines(p))
        else:
            raise ValueError(f"calibration file {str(p)!r} has an unsupported type; give a folder of images "
                             f"({', '.join(IMAGE_EXTS)}), a .jsonl file or a .txt file")
        if not raw.images:
            raw = _Raw(_builtin().images, raw.texts)
            source += " (texts) + built-in images"
        if not raw.texts:
            raw = _Raw(raw.images, _builtin().texts)
            source += " + built-in texts"
    images, captions = _expand_images(raw.images, n_images, seed)
    return CalibSet(images, captions, _expand_texts(raw.texts, n_texts, seed), source)


# ------------------------------------------------------------------------------------------------
def _builtin() -> _Raw:
    d = builtin_dir()
    return _from_folder(d / "images", d)


def _from_folder(img_dir: pathlib.Path, meta_dir: pathlib.Path) -> _Raw:
    """Images in ``img_dir``; ``captions.jsonl`` / ``sentences.txt`` in ``meta_dir``."""
    files = sorted((f for f in img_dir.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTS),
                   key=lambda f: f.name)
    if not files:
        raise ValueError(f"calibration folder {str(img_dir)!r} contains no images; put image files with one "
                         f"of the extensions {', '.join(IMAGE_EXTS)} directly in it (subfolders are not searched)")
    by_name = {f.name: f for f in files}
    captions: dict[str, str] = {}
    extra: list[str] = []
    cap_file = meta_dir / "captions.jsonl"
    if cap_file.is_file():
        for where, image, text in _jsonl_entries(cap_file):
            if image is None:
                extra.append(text)
                continue
            if image not in by_name:
                raise ValueError(f"{where}: caption names image {image!r}, which is not an image in "
                                 f"{str(img_dir)!r}; fix the name or remove the line")
            if image in captions:
                extra.append(text or "")
            else:
                captions[image] = text or ""
    sentences = _read_lines(meta_dir / "sentences.txt") if (meta_dir / "sentences.txt").is_file() else ()
    images = tuple((f, captions.get(f.name, "")) for f in files)
    return _Raw(images, _text_pool(sentences + tuple(extra), images))


def _from_jsonl(p: pathlib.Path) -> _Raw:
    images: list[tuple[pathlib.Path, str]] = []
    texts: list[str] = []
    for where, image, text in _jsonl_entries(p):
        if image is None:
            texts.append(text)
            continue
        f = pathlib.Path(image).expanduser()
        f = f if f.is_absolute() else p.parent / f
        if not f.is_file():
            raise ValueError(f"{where}: image {image!r} not found (looked for {str(f)!r}; relative paths are "
                             f"relative to the .jsonl file's folder)")
        images.append((f, text or ""))
    return _Raw(tuple(images), _text_pool(tuple(texts), tuple(images)))


def _jsonl_entries(p: pathlib.Path):
    """Yield ``("file:line", image | None, text | None)`` for each non-blank line of ``p``."""
    for i, line in enumerate(_read_text(p).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:{i}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg}); each line must be an object like "
                             f'{{"image": "photo.jpg", "text": "a caption"}}') from None
        if not isinstance(obj, dict) or not ("image" in obj or "text" in obj):
            raise ValueError(f'{where}: each line must be a JSON object with an "image" and/or a "text" '
                             f"key, got {line.strip()[:80]!r}")
        image, text = obj.get("image"), obj.get("text")
        if image is not None and not (isinstance(image, str) and image):
            raise ValueError(f'{where}: "image" must be a non-empty string (a file name), got {image!r}')
        if text is not None and not isinstance(text, str):
            raise ValueError(f'{where}: "text" must be a string, got {text!r}')
        if image is None and not text:
            raise ValueError(f'{where}: a line without "image" needs a non-empty "text"')
        yield where, image, text


def _read_text(p: pathlib.Path) -> str:
    try:
        return p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {str(p)!r} as UTF-8 text ({e}); save it as UTF-8") from None


def _read_lines(p: pathlib.Path) -> tuple[str, ...]:
    return tuple(s for s in (line.strip() for line in _read_text(p).splitlines()) if s)


def _text_pool(texts: tuple[str, ...], images) -> tuple[str, ...]:
    """Texts then non-empty captions, exact duplicates removed (first kept)."""
    return tuple(dict.fromkeys(t for t in texts + tuple(c for _, c in images) if t))


def _load_image(f: pathlib.Path) -> Image.Image:
    try:
        with Image.open(f) as im:
            im.seek(0)
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
            im = im.convert("RGB")
    except Exception as e:  # Pillow raises many types for bad files
        raise ValueError(f"cannot read calibration image {str(f)!r} ({type(e).__name__}: {e}); "
                         f"replace or remove the file") from None
    w, h = im.size
    if min(w, h) > MAX_SHORT_SIDE:
        s = MAX_SHORT_SIDE / min(w, h)
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)
    return im


def _augment(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Random-resized crop (50-100% of the area) back to the same size, then maybe a flip."""
    w, h = im.size
    area = w * h * rng.uniform(*_CROP_AREA)
    ratio = float(np.exp(rng.uniform(np.log(_CROP_RATIO[0]), np.log(_CROP_RATIO[1]))))
    cw = int(min(w, max(1, round(np.sqrt(area * ratio)))))
    ch = int(min(h, max(1, round(np.sqrt(area / ratio)))))
    x = int(rng.integers(0, w - cw + 1))
    y = int(rng.integers(0, h - ch + 1))
    out = im.resize((w, h), Image.Resampling.BICUBIC, box=(x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def _pick(n_src: int, n: int, rng: np.random.Generator) -> list[int]:
    """Indices of ``n`` items: a sorted random subset when there are enough, else a cycle."""
    if n_src >= n:
        return sorted(int(i) for i in rng.choice(n_src, size=n, replace=False))
    return [i % n_src for i in range(n)]


def _expand_images(src, n: int, seed: int) -> tuple[tuple[Image.Image, ...], tuple[str, ...]]:
    rng = np.random.default_rng([int(seed) & _SEED_MASK, 0])
    idx = _pick(len(src), n, rng)
    cache: dict[int, Image.Image] = {}
    images, captions = [], []
    for k, i in enumerate(idx):
        if i not in cache:
            cache[i] = _load_image(src[i][0])
        images.append(cache[i] if k < len(src) else _augment(cache[i], rng))
        captions.append(src[i][1])
    return tuple(images), tuple(captions)


def _expand_texts(pool: tuple[str, ...], n: int, seed: int) -> tuple[str, ...]:
    rng = np.random.default_rng([int(seed) & _SEED_MASK, 1])
    return tuple(pool[i] for i in _pick(len(pool), n, rng))
