"""ImageNet-C-style corruptions (edgevlm.adapt.corruptions): determinism, shapes, severity."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgevlm.adapt.corruptions import CORRUPTIONS, PARAMS, corrupt

RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "fog"}
# Distance from the clean image grows strictly with severity for these (on the test image).
# Not pixelate: BOX resampling at non-integer factors aliases, so its MSE is not monotonic
# (0.25 = exact 4x4 blocks on a 224 image beats 0.3); its loss of detail is (test below).
MONOTONIC = [
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "gaussian_blur", "defocus_blur",
    "contrast", "brightness", "fog", "jpeg_compression",
]


def natural_image(h: int = 96, w: int = 112, seed: int = 0) -> np.ndarray:
    """Smooth gradients, hard-edged shapes and mild texture: something blur/JPEG/pixelation hurt."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([0.2 + 0.5 * xx, 0.3 + 0.4 * yy, 0.5 + 0.3 * np.sin(6 * xx + 4 * yy)], axis=2)
    img[h // 4: h // 2, w // 5: w // 2] = [0.9, 0.1, 0.1]
    img[(yy - 0.6) ** 2 + (xx - 0.7) ** 2 < 0.02] = [0.1, 0.2, 0.8]
    img[::7] *= 0.85  # stripes
    img += 0.04 * rng.standard_normal(img.shape)
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def test_names_and_parameter_table():
    assert len(CORRUPTIONS) == len(set(CORRUPTIONS)) >= 9
    for n in ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "gaussian_blur", "contrast",
              "brightness", "fog", "jpeg_compression", "pixelate"):
        assert n in CORRUPTIONS
    assert all(len(PARAMS[n]) == 5 for n in CORRUPTIONS)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_deterministic_shape_dtype(name):
    img = natural_image()
    a = corrupt(img, name, 3, seed=1)
    b = corrupt(img, name, 3, seed=1)
    assert a.dtype == np.uint8 and a.shape == img.shape
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, img)
    np.testing.assert_array_equal(img, natural_image())  # input untouched
    c = corrupt(img, name, 3, seed=2)
    if name in RANDOM:
        assert not np.array_equal(a, c)
    else:
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("name", MONOTONIC)
def test_severity_monotonic(name):
    img = natural_image()
    d = [mse(corrupt(img, name, s, seed=0), img) for s in range(1, 6)]
    assert all(x < y for x, y in zip(d, d[1:])), d


def total_variation(a: np.ndarray) -> float:
    a = a.astype(np.float64)
    return float(np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean())


@pytest.mark.parametrize("name", ["pixelate", "gaussian_blur", "defocus_blur"])
@pytest.mark.parametrize("size", [(96, 112), (224, 224), (31, 47)])
def test_detail_lost_grows_with_severity(name, size):
    img = natural_image(*size)
    tv = [total_variation(corrupt(img, name, s)) for s in range(1, 6)]
    assert tv[0] < total_variation(img)
    assert all(x > y for x, y in zip(tv, tv[1:])), tv
    assert mse(corrupt(img, name, 5), img) > mse(corrupt(img, name, 1), img)


@pytest.mark.parametrize("name", CORRUPTIONS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (17, 1), (31, 47)])
def test_odd_sizes_and_grayscale(name, shape):
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, shape, dtype=np.uint8)
    out = corrupt(gray, name, 5, seed=0)
    assert out.shape == shape + (3,) and out.dtype == np.uint8
    # Grayscale input == the same image replicated to RGB, and PIL "L" / RGBA inputs work too.
    np.testing.assert_array_equal(out, corrupt(np.repeat(gray[:, :, None], 3, axis=2), name, 5, seed=0))
    np.testing.assert_array_equal(out, corrupt(Image.fromarray(gray, "L"), name, 5, seed=0))
    rgba = np.concatenate([np.repeat(gray[:, :, None], 3, axis=2), np.full(shape + (1,), 7, np.uint8)], axis=2)
    np.testing.assert_array_equal(out, corrupt(rgba, name, 5, seed=0))


def test_pil_rgb_input_matches_array():
    img = natural_image(40, 30)
    np.testing.assert_array_equal(corrupt(Image.fromarray(img), "pixelate", 2), corrupt(img, "pixelate", 2))


def test_specific_behaviour():
    img = natural_image()
    # contrast keeps each channel's mean (up to rounding) and shrinks the spread
    c = corrupt(img, "contrast", 5).astype(np.float64)
    np.testing.assert_allclose(c.mean(axis=(0, 1)), img.mean(axis=(0, 1)), atol=0.6)
    assert np.all(c.std(axis=(0, 1)) < 0.1 * img.astype(np.float64).std(axis=(0, 1)))
    # brightness never darkens a pixel
    assert np.all(corrupt(img, "brightness", 3) >= img)
    # impulse noise: a fraction ~amount of values become 0 or 255
    changed = corrupt(img, "impulse_noise", 5) != img
    assert 0.2 < changed.mean() < 0.3
    # pixelate at factor .25 on 96x112: blocks of the BOX-downsampled image, so few distinct rows
    p = corrupt(img, "pixelate", 5)
    assert len(np.unique(p[:, 0, 0])) <= 24 + 2


def test_bad_arguments():
    img = natural_image(8, 8)
    with pytest.raises(ValueError):
        corrupt(img, "snow", 1)
    for s in (0, 6, 2.0, True):
        with pytest.raises(ValueError):
            corrupt(img, "contrast", s)
    with pytest.raises(ValueError):
        corrupt(img.astype(np.float32), "contrast", 1)
    with pytest.raises(ValueError):
        corrupt(np.zeros((4, 4, 2), np.uint8), "contrast", 1)
