"""ImageNet-C-style corruptions (numpy + Pillow only), deterministic given a seed.

``corrupt(img, name, severity, seed=0) -> uint8 [H, W, 3]`` applies one corruption at severity
1-5 to an RGB image (uint8 ``[H, W, 3]``, ``[H, W]`` / ``[H, W, 1]`` grayscale, ``[H, W, 4]``
RGBA, or a PIL image of any mode; grayscale is replicated to 3 channels, alpha is dropped).
The same (image, name, severity, seed) always gives the same output.

Parameters follow Hendrycks & Dietterich's ImageNet-C (``make_imagenet_c.py``), which were set
for 224×224 images: apply corruptions after resizing to the model's input size for severities
comparable to ImageNet-C. Spatial parameters are in pixels and are not rescaled with image size.
Pixel values x are in [0, 1] below; the result is rounded to nearest and clipped to uint8
(ImageNet-C truncates when saving, so values may differ from theirs by one level).

====================  ==========================================  ==================================
name                  severity 1 .. 5                             operation
====================  ==========================================  ==================================
gaussian_noise        σ = .08 .12 .18 .26 .38                     x + N(0, σ²)
shot_noise            λ = 60 25 12 5 3                            Poisson(λx) / λ
impulse_noise         amount = .03 .06 .09 .17 .27                salt & pepper per value (50/50)
speckle_noise         σ = .15 .20 .35 .45 .60                     x + x·N(0, σ²)
gaussian_blur         σ = 1 2 3 4 6 (px)                          separable Gaussian, truncate 4σ,
                                                                  edge ("nearest") padding
defocus_blur          (radius, alias σ) = (3,.1) (4,.5) (6,.5)    disk kernel smoothed by a 3×3
                      (8,.5) (10,.5)                              Gaussian, reflect-101 borders
contrast              c = .4 .3 .2 .1 .05                         (x − mean_channel)·c + mean_channel
brightness            Δ = .1 .2 .3 .4 .5                          HSV: V ← min(V + Δ, 1)
fog                   (c, decay) = (1.5,2) (2,2) (2.5,1.7)        x·m/(m+c) + c·m/(m+c)·F, F a plasma
                      (2.5,1.5) (3,1.4)                           fractal in [0,1], m = max x
jpeg_compression      quality = 25 18 15 10 7                     Pillow JPEG encode/decode
pixelate              factor = .6 .5 .4 .3 .25                    BOX down to factor·size, BOX back up
====================  ==========================================  ==================================

Only ``*_noise`` and ``fog`` use randomness (``np.random.default_rng(seed)``).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np

__all__ = ["CORRUPTIONS", "PARAMS", "corrupt"]

PARAMS: dict[str, tuple] = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "shot_noise": (60, 25, 12, 5, 3),
    "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),
    "speckle_noise": (0.15, 0.2, 0.35, 0.45, 0.6),
    "gaussian_blur": (1, 2, 3, 4, 6),
    "defocus_blur": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
    "fog": ((1.5, 2.0), (2.0, 2.0), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)),
    "jpeg_compression": (25, 18, 15, 10, 7),
    "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),
}

CORRUPTIONS: list[str] = list(PARAMS)


# --------------------------------------------------------------------------- helpers
def _to_rgb_uint8(img) -> np.ndarray:
    if hasattr(img, "convert") and hasattr(img, "mode"):  # PIL image (no PIL import needed)
        img = np.asarray(img.convert("RGB"))
    a = np.asarray(img)
    if a.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"image must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got shape {a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:
        a = a[:, :, :3]
    return np.ascontiguousarray(a)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _correlate1d(x: np.ndarray, k: np.ndarray, axis: int, mode: str) -> np.ndarray:
    r = len(k) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    xp = np.pad(x, pad, mode=mode)
    n = x.shape[axis]
    out = np.zeros_like(x)
    for i, w in enumerate(k):
        out += w * np.take(xp, np.arange(i, i + n), axis=axis)
    return out


def _gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    r = int(truncate * sigma + 0.5)
    t = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _filter2d(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate each channel of x [H, W, 3] with kernel [kh, kw] (odd), reflect-101 borders,
    via FFT (the kernel is symmetric here, so correlation == convolution)."""
    kh, kw = kernel.shape
    rh, rw = kh // 2, kw // 2
    H, W = x.shape[:2]
    xp = np.pad(x, ((rh, rh), (rw, rw), (0, 0)), mode="reflect")
    Hp, Wp = xp.shape[:2]
    kp = np.zeros((Hp, Wp))
    kp[:kh, :kw] = kernel[::-1, ::-1]
    X = np.fft.rfft2(xp, axes=(0, 1))
    K = np.fft.rfft2(kp)
    y = np.fft.irfft2(X * K[:, :, None], s=(Hp, Wp), axes=(0, 1))
    # Circular convolution with the kernel at the origin shifts by (kh-1, kw-1).
    return y[kh - 1:kh - 1 + H, kw - 1:kw - 1 + W]


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    r = int(math.ceil(radius))
    L = np.arange(-8, 9) if radius <= 8 else np.arange(-r, r + 1)
    X, Y = np.meshgrid(L, L)
    d = ((X**2 + Y**2) <= radius**2).astype(np.float64)
    d /= d.sum()
    # cv2.GaussianBlur(ksize=(3, 3), sigmaX=alias_blur): separable 3-tap Gaussian, reflect-101.
    t = np.exp(-0.5 * (np.arange(-1, 2) / alias_blur) ** 2)
    t /= t.sum()
    d = _correlate1d(_correlate1d(d, t, 0, "reflect"), t, 1, "reflect")
    return d


def _plasma_fractal(mapsize: int, wibbledecay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square fractal in [0, 1] ([mapsize, mapsize], mapsize a power of two), as in
    ImageNet-C (including its wibble·U(−wibble, wibble) amplitude)."""
    assert mapsize >= 2 and mapsize & (mapsize - 1) == 0
    maparray = np.zeros((mapsize, mapsize))
    stepsize = mapsize
    wibble = 100.0

    def wibbledmean(array):
        return array / 4 + wibble * rng.uniform(-wibble, wibble, array.shape)

    while stepsize >= 2:
        half = stepsize // 2
        cornerref = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        squareaccum = cornerref + np.roll(cornerref, shift=-1, axis=0)
        squareaccum += np.roll(squareaccum, shift=-1, axis=1)
        maparray[half:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(squareaccum)
        drgrid = maparray[half:mapsize:stepsize, half:mapsize:stepsize]
        ulgrid = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        ltsum = drgrid + np.roll(drgrid, 1, axis=0) + ulgrid + np.roll(ulgrid, -1, axis=1)
        maparray[0:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(ltsum)
        ttsum = drgrid + np.roll(drgrid, 1, axis=1) + ulgrid + np.roll(ulgrid, -1, axis=0)
        maparray[half:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(ttsum)
        stepsize //= 2
        wibble /= wibbledecay
    maparray -= maparray.min()
    mx = maparray.max()
    return maparray / mx if mx > 0 else maparray


# --------------------------------------------------------------------------- corruptions
# Each takes x float64 [H, W, 3] in [0, 1], the severity parameter and an rng; returns floats.
def _gaussian_noise(x, c, rng):
    return x + rng.normal(size=x.shape, scale=c)


def _shot_noise(x, c, rng):
    return rng.poisson(x * c) / c


def _impulse_noise(x, c, rng):
    out = x.copy()
    flip = rng.random(x.shape) < c
    salt = rng.random(x.shape) < 0.5
    out[flip & salt] = 1.0
    out[flip & ~salt] = 0.0
    return out


def _speckle_noise(x, c, rng):
    return x + x * rng.normal(size=x.shape, scale=c)


def _gaussian_blur(x, c, rng):
    k = _gaussian_kernel1d(float(c))
    return _correlate1d(_correlate1d(x, k, 0, "edge"), k, 1, "edge")


def _defocus_blur(x, c, rng):
    return _filter2d(x, _disk(*c))


def _contrast(x, c, rng):
    means = x.mean(axis=(0, 1), keepdims=True)
    return (x - means) * c + means


def _brightness(x, c, rng):
    # For fixed hue and saturation RGB is linear in V = max(R, G, B), so raising V to
    # min(V + c, 1) scales the pixel; black (S = 0) becomes gray V'.
    v = x.max(axis=2, keepdims=True)
    v2 = np.minimum(v + c, 1.0)
    safe = np.where(v > 0, v, 1.0)
    return np.where(v > 0, x * (v2 / safe), v2)


def _fog(x, c, rng):
    H, W = x.shape[:2]
    mapsize = max(2, 1 << (max(H, W) - 1).bit_length())
    mapsize = max(mapsize, 256)  # ImageNet-C's 256 map, cropped
    frac = _plasma_fractal(mapsize, c[1], rng)[:H, :W, None]
    max_val = x.max()
    return (x + c[0] * frac) * max_val / (max_val + c[0])


def _jpeg_compression(x, c, rng):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_to_uint8(x)).save(buf, format="JPEG", quality=int(c))
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0


def _pixelate(x, c, rng):
    from PIL import Image

    H, W = x.shape[:2]
    im = Image.fromarray(_to_uint8(x))
    small = im.resize((max(1, int(W * c)), max(1, int(H * c))), Image.BOX)
    return np.asarray(small.resize((W, H), Image.BOX), dtype=np.float64) / 255.0


_FUNCS: dict[str, Callable] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "speckle_noise": _speckle_noise,
    "gaussian_blur": _gaussian_blur,
    "defocus_blur": _defocus_blur,
    "contrast": _contrast,
    "brightness": _brightness,
    "fog": _fog,
    "jpeg_compression": _jpeg_compression,
    "pixelate": _pixelate,
}


def corrupt(img, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Apply corruption ``name`` (one of :data:`CORRUPTIONS`) at ``severity`` 1-5.

    Returns a new uint8 [H, W, 3] array; deterministic for a given ``seed``.
    """
    if name not in _FUNCS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")
    x = _to_rgb_uint8(img).astype(np.float64) / 255.0
    rng = np.random.default_rng(seed)
    return _to_uint8(_FUNCS[name](x, PARAMS[name][int(severity) - 1], rng))
