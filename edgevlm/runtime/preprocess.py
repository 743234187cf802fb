"""Image preprocessing for CLIP / SigLIP, replicating transformers' PIL image processors exactly.

:class:`ImagePreprocessor` is built from the ``preprocessor_config.json`` dict that the exporter
stores in the ``.evlm`` metadata (``metadata["preprocess"]``) and mirrors the PIL backend of
``CLIPImageProcessor`` / ``SiglipImageProcessor`` (``transformers.CLIPImageProcessorPil``,
``SiglipImageProcessorPil``) step by step:

1. convert to RGB: a PIL image with transparency is alpha-composited onto white, otherwise
   ``convert("RGB")``; a uint8 array with 4 channels is blended onto white in float64 and
   rounded; grey (H, W) / (H, W, 1) arrays are repeated to three channels;
2. resize with PIL on the uint8 image: ``size={"shortest_edge": s}`` scales the short side to
   ``s`` and the long side to ``int(s * long / short)`` (CLIP), ``size={"height", "width"}``
   resizes to exactly that (SigLIP); the filter is ``resample`` (PIL codes: 3 = BICUBIC);
3. center crop to ``crop_size`` (zero padding when the image is smaller), if ``do_center_crop``;
4. rescale: ``float32(float64(x) * rescale_factor)``;
5. normalize: ``(x - image_mean) / image_std`` in float32, channels first.

Because every step is the same operation in the same precision, the output equals the HF PIL
processor's bit for bit (tests/test_preprocess.py asserts max |diff| <= 1e-6 in normalized
units on real photos; measured 0.0).  Inputs: a PIL image, a uint8 numpy array (H, W, 3|4|1)
or (H, W), or a path to an image file (opened with PIL, EXIF orientation applied, as
``transformers.image_utils.load_image`` does).  Pillow + numpy only.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = ["ImagePreprocessor", "ImageInput", "load_image", "to_rgb_array"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
BILINEAR, BICUBIC = 2, 3

# Class defaults of the transformers processors, used where the stored config omits a key.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip": {"do_convert_rgb": True, "do_resize": True, "size": {"shortest_edge": 224}, "resample": BICUBIC,
             "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "do_rescale": True,
             "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": OPENAI_CLIP_MEAN,
             "image_std": OPENAI_CLIP_STD},
    "siglip": {"do_convert_rgb": True, "do_resize": True, "size": {"height": 224, "width": 224},
               "resample": BICUBIC, "do_center_crop": False, "crop_size": None, "do_rescale": True,
               "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": IMAGENET_STANDARD_MEAN,
               "image_std": IMAGENET_STANDARD_STD},
}
# the PIL backend's own defaults for any other processor type
_GENERIC = {"do_convert_rgb": True, "do_resize": True, "size": None, "resample": BILINEAR, "do_center_crop": False,
            "crop_size": None, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": IMAGENET_STANDARD_MEAN, "image_std": IMAGENET_STANDARD_STD}

ImageInput = Any  # PIL.Image.Image | np.ndarray (uint8) | str | os.PathLike


def _kind(cfg: dict, family: str | None) -> str:
    t = str(cfg.get("image_processor_type") or cfg.get("feature_extractor_type") or "").lower()
    if t.startswith("siglip") or family == "siglip":
        return "siglip"
    if t.startswith("clip") or family == "clip":
        return "clip"
    return "generic"


def _size_dict(size: Any, *, square: bool, what: str) -> dict[str, int] | None:
    """HF get_size_dict: an int means {"shortest_edge": s} (or a square when ``square``),
    a (h, w) pair means {"height": h, "width": w}."""
    if size is None:
        return None
    if isinstance(size, bool):
        raise ValueError(f"preprocessor {what} must be an int or a dict, got {size!r}")
    if isinstance(size, int):
        return {"height": size, "width": size} if square else {"shortest_edge": size}
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    if isinstance(size, dict):
        out = {k: int(v) for k, v in size.items() if v is not None}
        if out:
            return out
    raise ValueError(f"preprocessor {what} {size!r} is not understood; expected an int or a dict with "
                     "'shortest_edge' or 'height' and 'width'")


def load_image(path: str | os.PathLike) -> Any:
    """Open an image file with PIL and apply its EXIF orientation (like transformers' load_image)."""
    from PIL import Image, ImageOps

    with Image.open(os.fspath(path)) as im:
        im.load()
        return ImageOps.exif_transpose(im)


def _pil_image_module() -> Any:
    """PIL.Image if it is already imported, else None. An object can only be a PIL image if PIL is
    loaded, so uint8 arrays never import Pillow (~2.4 MB resident) just to be told they are not one."""
    return sys.modules.get("PIL.Image")


def to_rgb_array(image: ImageInput) -> np.ndarray:
    """Any supported input -> uint8 [H, W, 3] (step 1 of the module docstring)."""
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    Image = _pil_image_module()
    if Image is not None and isinstance(image, Image.Image):
        has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
        if has_alpha:  # exactly transformers.image_transforms.convert_to_rgb
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return np.array(Image.alpha_composite(background, image).convert("RGB"))
        return np.array(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        a = image
        if a.dtype != np.uint8:
            raise TypeError(f"image arrays must be uint8 (0..255) [H, W, 3], got {a.dtype}; for float pixel values "
                            "already normalized, pass them to the model directly (DualEncoder.encode_pixels)")
        if a.ndim == 2:
            a = a[:, :, None]
        if a.ndim != 3:
            raise ValueError(f"image array must be [H, W], [H, W, C] or [C, H, W], got shape {a.shape}")
        if a.shape[-1] not in (1, 3, 4) and a.shape[0] in (1, 3, 4):
            a = np.moveaxis(a, 0, -1)  # channels first -> last
        c = a.shape[-1]
        if c == 1:
            return np.repeat(a, 3, axis=-1)
        if c == 4:  # transformers' numpy branch: blend onto white in float64, round
            alpha = a[..., 3:4] / 255
            return np.round(alpha * a[..., :3] + (1 - alpha) * 255).astype(np.uint8)
        if c == 3:
            return np.ascontiguousarray(a)
        raise ValueError(f"image array must have 1, 3 or 4 channels, got shape {image.shape}")
    raise TypeError(f"unsupported image type {type(image).__name__}: give a PIL image, a uint8 numpy array "
                    "[H, W, 3] or a path")



def per_channel(v: Any, what: str) -> np.ndarray:
    """A preprocessor mean/std value (one number, or one per RGB channel) -> float32 [3]."""
    a = np.asarray(v if isinstance(v, Iterable) else [v] * 3, dtype=np.float32).reshape(-1)
    if a.size == 1:
        a = np.repeat(a, 3)
    if a.size != 3:
        raise ValueError(f"preprocessor {what} must have 3 values (one per RGB channel), got {v!r}")
    return a

class ImagePreprocessor:
    """The HF PIL image processor of a CLIP / SigLIP model, from its preprocessor_config dict.

    ``pre(images)`` -> float32 [B, 3, H, W] (channels first), ``images`` one image or a sequence
    of them (PIL images, uint8 arrays, paths).
    """

    def __init__(self, config: dict | None, family: str | None = None) -> None:
        config = dict(config or {})
        self.kind = _kind(config, family)
        d = {**(_DEFAULTS.get(self.kind) or _GENERIC), **{k: v for k, v in config.items() if v is not None}}
        self.config = config
        self.do_convert_rgb = bool(d["do_convert_rgb"])
        self.do_resize = bool(d["do_resize"])
        self.size = _size_dict(d["size"], square=False, what="size")
        self.resample = int(d["resample"]) if d["resample"] is not None else BILINEAR
        self.do_center_crop = bool(d["do_center_crop"])
        self.crop_size = _size_dict(d["crop_size"], square=True, what="crop_size")
        self.do_rescale = bool(d["do_rescale"])
        self.rescale_factor = float(d["rescale_factor"])
        self.do_normalize = bool(d["do_normalize"])
        self.image_mean = per_channel(d["image_mean"], "image_mean")
        self.image_std = per_channel(d["image_std"], "image_std")
        if self.do_resize:
            s = self.size or {}
            if not (s.get("shortest_edge") or (s.get("height") and s.get("width"))):
                raise ValueError(f"preprocessor size {self.size!r} is not supported: expected 'shortest_edge' "
                                 "(optionally with 'longest_edge') or 'height' and 'width'")
        if self.do_center_crop and not (self.crop_size and "height" in self.crop_size and "width" in self.crop_size):
            raise ValueError(f"preprocessor crop_size {self.crop_size!r} must have 'height' and 'width'")
        if self.resample not in range(6):
            raise ValueError(f"preprocessor resample {self.resample} is not a PIL filter code (0..5)")

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output when it does not depend on the input, else None."""
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        if self.do_resize and self.size and "height" in self.size and "width" in self.size \
                and not self.size.get("shortest_edge"):
            return self.size["height"], self.size["width"]
        return None

    # -- the steps ----------------------------------------------------------------------------
    def resize_shape(self, height: int, width: int) -> tuple[int, int]:
        """Output (height, width) of the resize step (transformers' size arithmetic)."""
        s = self.size
        se, le = s.get("shortest_edge"), s.get("longest_edge")
        if se and le:  # get_size_with_aspect_ratio
            size, raw = se, None
            lo, hi = float(min(height, width)), float(max(height, width))
            if hi / lo * size > le:
                raw = le * lo / hi
                size = int(round(raw))
            if (height <= width and height == size) or (width <= height and width == size):
                return height, width
            if width < height:
                return (int(raw * height / width) if raw is not None else int(size * height / width)), size
            return size, (int(raw * width / height) if raw is not None else int(size * width / height))
        if se:  # get_resize_output_image_size(default_to_square=False)
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = se, int(se * long / short)
            return (new_long, new_short) if width <= height else (new_short, new_long)
        return s["height"], s["width"]

    @staticmethod
    def center_crop(img: np.ndarray, height: int, width: int) -> np.ndarray:
        """uint8/float [H, W, C] -> [height, width, C]; zero padding where the image is smaller
        (transformers.image_transforms.center_crop)."""
        oh, ow = img.shape[:2]
        top, left = (oh - height) // 2, (ow - width) // 2
        if top >= 0 and left >= 0:
            return img[top:top + height, left:left + width]
        nh, nw = max(height, oh), max(width, ow)
        canvas = np.zeros((nh, nw, img.shape[2]), dtype=img.dtype)
        tp, lp = math.ceil((nh - oh) / 2), math.ceil((nw - ow) / 2)
        canvas[tp:tp + oh, lp:lp + ow] = img
        top, left = top + tp, left + lp
        return canvas[max(0, top):min(nh, top + height), max(0, left):min(nw, left + width)]

    def preprocess_one(self, image: ImageInput) -> np.ndarray:
        """One image -> float32 [3, H, W]."""
        if self.do_convert_rgb:
            img = to_rgb_array(image)
        else:
            if isinstance(image, (str, os.PathLike)):
                image = load_image(image)
            Image = _pil_image_module()
            img = np.array(image) if Image is not None and isinstance(image, Image.Image) else np.asarray(image)
            if img.ndim == 2:
                img = img[:, :, None]
        if self.do_resize:
            h, w = self.resize_shape(img.shape[0], img.shape[1])
            # Pillow's resize to the image's own size returns a copy (Image.resize: "if self.size ==
            # size and box == (0, 0) + self.size: return self.copy()"), so skipping it is exact.
            if (h, w) != img.shape[:2]:
                from PIL import Image

                pil = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
                img = np.array(pil.resize((w, h), resample=self.resample))
                if img.ndim == 2:
                    img = img[:, :, None]
        if self.do_center_crop:
            img = self.center_crop(img, self.crop_size["height"], self.crop_size["width"])
        x = img
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        x = np.ascontiguousarray(np.moveaxis(x, -1, 0))  # [C, H, W]
        if self.do_normalize:
            x = x.astype(np.float32, copy=False)
            c = x.shape[0]
            x = (x - self.image_mean[:c, None, None]) / self.image_std[:c, None, None]
        return x.astype(np.float32, copy=False)

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """One image or a sequence -> float32 [B, 3, H, W]."""
        batch = [images] if _is_single(images) else list(images)
        if not batch:
            raise ValueError("no images given")
        out = [self.preprocess_one(im) for im in batch]
        shapes = {o.shape for o in out}
        if len(shapes) > 1:
            raise ValueError(f"preprocessed images have different sizes {sorted(shapes)}; the config resizes by "
                             "shortest edge without a center crop, so they cannot be batched")
        return np.stack(out)

    def __repr__(self) -> str:
        return (f"ImagePreprocessor({self.kind}, size={self.size}, crop={self.crop_size if self.do_center_crop else None}, "
                f"resample={self.resample})")


def _is_single(images: Any) -> bool:
    """One image (PIL, path, array up to 3-D, anything else) vs a batch (list / tuple / 4-D array)."""
    if isinstance(images, np.ndarray):
        return images.ndim <= 3  # [B, H, W, C] is a batch
    return not isinstance(images, (list, tuple))
