"""Qwen2-VL / Qwen2.5-VL image preprocessing, replicating ``transformers.Qwen2VLImageProcessorPil``.

Steps, each the same operation in the same precision as the HF PIL processor:

1. convert to RGB (:func:`edgevlm.runtime.preprocess.to_rgb_array`, as for CLIP);
2. ``smart_resize``: the target (height, width) are multiples of ``factor = patch_size *
   merge_size``, nearest to the input size, scaled into ``[min_pixels, max_pixels]`` total
   pixels with the aspect ratio kept (Python ``round`` / ``floor`` / ``ceil``, as HF);
3. resize the uint8 image with PIL (``resample``, 3 = BICUBIC);
4. rescale ``float32(float64(x) * rescale_factor)``, normalize ``(x - mean) / std`` in float32;
5. patchify: [C, H, W] -> [gh*gw, C*Tp*P*P] rows in merge-block order (the ``m x m`` patches of
   one merged token are consecutive), each row ordered (C, Tp, P, P) like the Conv3d weight,
   the single frame repeated ``temporal_patch_size`` times (an image is a 1-frame video).

``grid_thw`` is (1, gh, gw) per image.  tests/test_qwen2vl.py checks pixel values and grids
against the HF processor on photos (max |diff| 0.0 measured).  Pillow + numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageInput, per_channel, to_rgb_array

__all__ = ["QwenImagePreprocessor", "smart_resize"]

# Qwen2VLImageProcessor class defaults (used where preprocessor_config.json omits a key)
_DEFAULTS: dict[str, Any] = {"do_convert_rgb": True, "do_resize": True, "resample": 3, "do_rescale": True,
                             "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": OPENAI_CLIP_MEAN,
                             "image_std": OPENAI_CLIP_STD, "patch_size": 14, "temporal_patch_size": 2,
                             "merge_size": 2}
_MIN_PIXELS, _MAX_PIXELS = 56 * 56, 28 * 28 * 1280


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' ``smart_resize``: (height, width) multiples of ``factor`` with
    min_pixels <= h*w <= max_pixels (up to rounding) and the aspect ratio kept."""
    if min(height, width) <= 0:
        raise ValueError(f"image has an empty side: {height} x {width}")
    if max(height, width) / min(height, width) > 200:
        ratio = max(height, width) / min(height, width)
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {ratio} ({height} x {width}); "
                         "crop the image first")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class QwenImagePreprocessor:
    """The Qwen2-VL image processor from its preprocessor_config.json dict (:meth:`from_config`).

    ``pre(images)`` -> (pixel_values float32 [ΣN, C*Tp*P*P], grid_thw int64 [n, 3]).
    """

    min_pixels: int
    max_pixels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    resample: int
    do_convert_rgb: bool
    do_resize: bool
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: np.ndarray  # float32 [3]
    image_std: np.ndarray   # float32 [3]

    @classmethod
    def from_config(cls, config: dict | None) -> QwenImagePreprocessor:
        c = {**_DEFAULTS, **{k: v for k, v in dict(config or {}).items() if v is not None}}
        # Qwen2VLImageProcessorPil.__init__: min_pixels / max_pixels override size's edges
        size = dict(c.get("size") or {"shortest_edge": _MIN_PIXELS, "longest_edge": _MAX_PIXELS})
        if c.get("min_pixels") is not None:
            size["shortest_edge"] = c["min_pixels"]
        if c.get("max_pixels") is not None:
            size["longest_edge"] = c["max_pixels"]
        if not size.get("shortest_edge") or not size.get("longest_edge"):
            raise ValueError(f"Qwen2-VL preprocessor size must have 'shortest_edge' (min pixels) and 'longest_edge' "
                             f"(max pixels), got {size}")
        out = cls(int(size["shortest_edge"]), int(size["longest_edge"]), int(c["patch_size"]),
                  int(c["temporal_patch_size"]), int(c["merge_size"]), int(c["resample"]),
                  bool(c["do_convert_rgb"]), bool(c["do_resize"]), bool(c["do_rescale"]),
                  float(c["rescale_factor"]), bool(c["do_normalize"]), per_channel(c["image_mean"], "image_mean"),
                  per_channel(c["image_std"], "image_std"))
        if min(out.patch_size, out.temporal_patch_size, out.merge_size) < 1:
            raise ValueError(f"patch_size, temporal_patch_size and merge_size must be positive, got {config}")
        if out.resample not in range(6):
            raise ValueError(f"preprocessor resample {out.resample} is not a PIL filter code (0..5)")
        return out

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    def resize_shape(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def image_array(self, image: ImageInput) -> np.ndarray:
        """One image -> normalized float32 [3, H, W] at the resized size (steps 1-4)."""
        from PIL import Image

        # RGB conversion always: without it HF fails on anything but 3-channel input, on which
        # the conversion is the identity
        img = to_rgb_array(image)                                           # uint8 [H, W, 3]
        if self.do_resize:
            h, w = self.resize_shape(img.shape[0], img.shape[1])
            img = np.array(Image.fromarray(img).resize((w, h), resample=self.resample))
        elif img.shape[0] % self.factor or img.shape[1] % self.factor:
            raise ValueError(f"with do_resize off the image sides must be multiples of {self.factor}, got "
                             f"{img.shape[0]} x {img.shape[1]}")
        x = img.astype(np.float64) * self.rescale_factor if self.do_rescale else img
        x = np.ascontiguousarray(np.moveaxis(np.asarray(x).astype(np.float32), -1, 0))  # [C, H, W]
        if self.do_normalize:
            x = (x - self.image_mean[:, None, None]) / self.image_std[:, None, None]
        return x.astype(np.float32, copy=False)

    def patchify(self, x: np.ndarray) -> tuple[np.ndarray, int, int]:
        """[C, H, W] -> ([gh*gw, C*Tp*P*P], gh, gw), rows in merge-block order (HF ``patchify``)."""
        c, h, w = x.shape
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = h // p, w // p
        t = x.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, P, P]
        t = np.broadcast_to(t[:, :, :, :, :, None], (*t.shape[:5], tp, p, p))          # one frame, Tp times
        return t.reshape(gh * gw, c * tp * p * p), gh, gw

    def __call__(self, images: ImageInput | list[ImageInput]) -> tuple[np.ndarray, np.ndarray]:
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise ValueError("no images given")
        rows, grids = [], []
        for im in batch:
            patches, gh, gw = self.patchify(self.image_array(im))
            rows.append(patches)
            grids.append((1, gh, gw))
        return np.concatenate(rows, axis=0), np.asarray(grids, dtype=np.int64)
