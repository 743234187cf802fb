"""Idefics3 / SmolVLM image preprocessing, replicating transformers' PIL image processors
(``Idefics3ImageProcessorPil`` and ``SmolVLMImageProcessorPil``, which are the same code).

From the ``preprocessor_config.json`` dict (``metadata["preprocess"]`` of an export), per image:

1. convert to RGB (:func:`edgevlm.runtime.preprocess.to_rgb_array`: alpha composited onto white);
2. resize (``do_resize``) with PIL on the uint8 image: ``size={"longest_edge": L}`` scales the
   longest edge to L and the other one to ``int(L * short / long)`` rounded up to even, then
   caps both at 4096 (transformers' ``MAX_IMAGE_SIZE``); ``{"height", "width"}`` is exact; the
   filter is ``resample`` (PIL code, default 1 = LANCZOS);
3. ``do_image_splitting``: resize again so both sides are multiples of
   ``M = max_image_size["longest_edge"]`` (the long side rounded up to a multiple of M, the other
   side ``int(long / aspect)`` rounded up likewise); if larger than M x M, cut it into
   ``rows x cols`` tiles of M x M (row-major) and append the whole image resized to M x M (the
   "global" image); else the image is the only frame and rows = cols = 0.  Without splitting the
   image is resized to M x M, rows = cols = 0;
4. rescale ``float32(float64(x) * rescale_factor)`` and normalize ``(x - mean) / std`` in float32,
   channels first;
5. ``do_pad``: every frame is zero-padded at the bottom/right to the largest frame of the call
   and ``pixel_attention_mask`` (int64, 1 = real pixel) marks the unpadded part.

All resizes run on uint8 images, exactly as the HF processor does (its numpy frames stay uint8
until step 4), so the output is the HF processor's bit for bit (tests/test_idefics3.py checks
max |diff| == 0 on photos).  Pillow + numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .preprocess import (IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, ImageInput, _is_single, per_channel,
                         to_rgb_array)

__all__ = ["Idefics3ImagePreprocessor", "Idefics3Images"]

LANCZOS = 1
MAX_IMAGE_SIZE = 4096  # transformers' absolute cap on the resized image


@dataclass(frozen=True)
class Idefics3Images:
    """The preprocessed frames of a list of images (one prompt's images, in order).

    pixel_values          float32 [F, 3, H, W]: every image's tiles (row-major) then its global
                          image, image after image.
    pixel_attention_mask  int64 [F, H, W]: 1 = real pixel, 0 = padding.
    rows, cols            per image: the tile grid (0, 0 when the image was not split).
    frames                per image: its number of frames (rows * cols + 1, or 1).
    """

    pixel_values: np.ndarray
    pixel_attention_mask: np.ndarray
    rows: tuple[int, ...]
    cols: tuple[int, ...]
    frames: tuple[int, ...]


def _longest_edge_size(height: int, width: int, max_len: int) -> tuple[int, int]:
    """transformers' get_resize_output_image_size: longest edge -> max_len (other side even),
    then scaled below MAX_IMAGE_SIZE."""
    aspect = width / height
    if width >= height:
        width = max_len
        height = int(width / aspect)
        if height % 2 != 0:
            height += 1
    else:
        height = max_len
        width = int(height * aspect)
        if width % 2 != 0:
            width += 1
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width = MAX_IMAGE_SIZE
        height = int(width / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height = MAX_IMAGE_SIZE
        width = int(height * aspect)
    return max(height, 1), max(width, 1)


def _vision_encoder_size(height: int, width: int, m: int) -> tuple[int, int]:
    """transformers' resize_for_vision_encoder: both sides to multiples of m."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / m) * m
        height = int(width / aspect)
        height = math.ceil(height / m) * m
    else:
        height = math.ceil(height / m) * m
        width = int(height * aspect)
        width = math.ceil(width / m) * m
    return height, width


def _size(v: Any, what: str) -> dict[str, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return {"longest_edge": v}
    if isinstance(v, dict):
        out = {k: int(x) for k, x in v.items() if x is not None}
        if out.get("longest_edge") or (out.get("height") and out.get("width")):
            return out
    raise ValueError(f"preprocessor {what} {v!r} is not supported: expected {{'longest_edge': N}} or "
                     "{'height': H, 'width': W}")


class Idefics3ImagePreprocessor:
    """``pre(images)`` -> :class:`Idefics3Images`; ``images`` one image or a sequence (PIL images,
    uint8 arrays [H, W, 3|4|1] or [H, W], paths)."""

    def __init__(self, config: dict | None) -> None:
        c = {k: v for k, v in dict(config or {}).items() if v is not None}
        self.config = dict(config or {})
        self.do_convert_rgb = bool(c.get("do_convert_rgb", True))
        self.do_resize = bool(c.get("do_resize", True))
        self.size = _size(c.get("size", {"longest_edge": 4 * 364}), "size")
        self.resample = int(c.get("resample", LANCZOS))
        self.do_image_splitting = bool(c.get("do_image_splitting", True))
        mis = c.get("max_image_size", {"longest_edge": 364})
        if not (isinstance(mis, dict) and int(mis.get("longest_edge") or 0) > 0):
            raise ValueError(f"preprocessor max_image_size {mis!r} is not supported: expected {{'longest_edge': N}}")
        self.tile = int(mis["longest_edge"])
        self.do_rescale = bool(c.get("do_rescale", True))
        self.rescale_factor = float(c.get("rescale_factor", 1 / 255))
        self.do_normalize = bool(c.get("do_normalize", True))
        self.image_mean = per_channel(c.get("image_mean", IMAGENET_STANDARD_MEAN), "image_mean")
        self.image_std = per_channel(c.get("image_std", IMAGENET_STANDARD_STD), "image_std")
        self.do_pad = bool(c.get("do_pad", True))
        if self.resample not in range(6):
            raise ValueError(f"preprocessor resample {self.resample} is not a PIL filter code (0..5)")

    # -- steps (uint8 [H, W, C] in and out) -------------------------------------------------------
    def _resize(self, img: np.ndarray, height: int, width: int) -> np.ndarray:
        from PIL import Image

        pil = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
        out = np.array(pil.resize((width, height), resample=self.resample))
        return out[:, :, None] if out.ndim == 2 else out

    def _first_resize(self, img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        if self.size.get("longest_edge"):
            return self._resize(img, *_longest_edge_size(h, w, self.size["longest_edge"]))
        return self._resize(img, self.size["height"], self.size["width"])

    def frames_of(self, image: ImageInput) -> tuple[list[np.ndarray], int, int]:
        """One image -> (uint8 frames [h, w, C], rows, cols) before rescale / normalize."""
        if self.do_convert_rgb:
            img = to_rgb_array(image)
        else:
            img = np.asarray(image)
            if img.dtype != np.uint8:
                raise TypeError(f"image arrays must be uint8 (0..255), got {img.dtype}")
            img = img[:, :, None] if img.ndim == 2 else img
        if self.do_resize:
            img = self._first_resize(img)
        m = self.tile
        if not self.do_image_splitting:
            return [self._resize(img, m, m)], 0, 0
        img = self._resize(img, *_vision_encoder_size(img.shape[0], img.shape[1], m))
        h, w = img.shape[:2]
        if h <= m and w <= m:
            return [img], 0, 0
        rows, cols = (h - m) // m + 1, (w - m) // m + 1
        frames = [img[r * m:(r + 1) * m, c * m:(c + 1) * m] for r in range(rows) for c in range(cols)]
        frames.append(self._resize(img, m, m))  # the global image, from the multiple-of-M image
        return frames, rows, cols

    def _lut(self, channels: int) -> np.ndarray:
        """float32 [C, 256]: step 4's value of every uint8 level per channel.  Rescale and
        normalize are elementwise functions of the uint8 value, so a lookup table computed with
        the same operations (rescale in float64, normalize in float32) gives the same bits as
        running them on the frame, without the frame-sized float64/float32 temporaries."""
        x = np.arange(256, dtype=np.uint8)[None, :].repeat(channels, 0)       # [C, 256]
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        x = x.astype(np.float32)
        if self.do_normalize:
            x = (x - self.image_mean[:channels, None]) / self.image_std[:channels, None]
        return np.ascontiguousarray(x, dtype=np.float32)

    def normalize(self, frame: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 [h, w, C] -> float32 [C, h, w] (rescale in float64, normalize in float32), written
        into ``out`` (float32 [C, h, w], any strides) when given."""
        h, w, c = frame.shape
        if out is None:
            out = np.empty((c, h, w), dtype=np.float32)
        lut = self._lut(c)
        for ch in range(c):  # mode="clip": uint8 indices are always in range, and it skips a buffered copy
            np.take(lut[ch], frame[:, :, ch], out=out[ch], mode="clip")
        return out

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> Idefics3Images:
        batch = [images] if _is_single(images) else list(images)
        if not batch:
            raise ValueError("no images given")
        frames, rows, cols, counts = [], [], [], []
        for im in batch:  # uint8 frames (tiles are views of the resized image), normalized below
            f, r, c = self.frames_of(im)
            frames += f
            rows.append(r)
            cols.append(c)
            counts.append(len(f))
        hmax, wmax = max(x.shape[0] for x in frames), max(x.shape[1] for x in frames)
        if not self.do_pad and any(x.shape[:2] != (hmax, wmax) for x in frames):
            raise ValueError(f"do_pad is off but the frames have different sizes "
                             f"{sorted({x.shape[:2] for x in frames})}; they cannot be batched")
        nch = frames[0].shape[2]
        pv = np.zeros((len(frames), nch, hmax, wmax), dtype=np.float32)
        mask = np.zeros((len(frames), hmax, wmax), dtype=np.int64)
        for i, x in enumerate(frames):  # straight into the batch: no per-frame float copies
            self.normalize(x, out=pv[i, :, :x.shape[0], :x.shape[1]])
            mask[i, :x.shape[0], :x.shape[1]] = 1
        return Idefics3Images(pv, mask, tuple(rows), tuple(cols), tuple(counts))

    def __repr__(self) -> str:
        return (f"Idefics3ImagePreprocessor(size={self.size}, tile={self.tile}, split={self.do_image_splitting}, "
                f"resample={self.resample})")
