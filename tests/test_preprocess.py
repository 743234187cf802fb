"""edgevlm.runtime.preprocess against transformers' PIL image processors on real photos.

Tolerance: max |ours - HF| <= 1e-6 in normalized units (the runtime replicates the PIL path
step by step: PIL resize of the uint8 image, the same crop, float64 rescale then float32, float32
normalize), measured 0.0 (bit-identical) on every image and config below.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
skdata = pytest.importorskip("skimage.data")
from PIL import Image  # noqa: E402

from edgevlm.runtime.preprocess import ImagePreprocessor, to_rgb_array  # noqa: E402

TOL = 1e-6
CALIB = Path(__file__).resolve().parents[1] / "edgevlm" / "export" / "calib" / "images"
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]

# preprocessor_config.json of real checkpoints (what the exporter stores in the .evlm metadata)
CONFIGS = {
    # openai/clip-vit-base-patch16 (legacy int sizes, as on the hub)
    "clip_b16_legacy": {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": OPENAI_MEAN,
                        "image_std": OPENAI_STD, "resample": 3, "size": 224},
    # the same as transformers 5 saves it
    "clip_b16": {"crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
                 "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": OPENAI_MEAN,
                 "image_processor_type": "CLIPImageProcessor", "image_std": OPENAI_STD, "resample": 3,
                 "rescale_factor": 1 / 255, "size": {"shortest_edge": 224}},
    # openai/clip-vit-large-patch14-336
    "clip_l14_336": {"crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "image_mean": OPENAI_MEAN,
                     "image_processor_type": "CLIPImageProcessor", "image_std": OPENAI_STD, "resample": 3,
                     "size": {"shortest_edge": 336}},
    # google/siglip-base-patch16-224 (SiglipImageProcessor defaults: bicubic, no crop, mean/std 0.5)
    "siglip_224": {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
                   "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5], "resample": 3,
                   "rescale_factor": 1 / 255, "size": {"height": 224, "width": 224}},
    # google/siglip-so400m-patch14-384
    "siglip_384": {"image_processor_type": "SiglipImageProcessor", "size": {"height": 384, "width": 384}},
    # awkward: crop larger than the resize (zero padding), bilinear, shortest+longest edge
    "clip_pad_bilinear": {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 200},
                          "crop_size": {"height": 230, "width": 190}, "resample": 2},
    "clip_longest_edge": {"image_processor_type": "CLIPImageProcessor",
                          "size": {"shortest_edge": 224, "longest_edge": 300}, "crop_size": {"height": 224,
                                                                                            "width": 224}},
}


def _hf(cfg: dict):
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

    kind = cfg.get("image_processor_type") or cfg.get("feature_extractor_type") or ""
    cls = SiglipImageProcessorPil if kind.lower().startswith("siglip") else CLIPImageProcessorPil
    return cls(**{k: v for k, v in cfg.items() if k not in ("image_processor_type", "feature_extractor_type")})


def _rgba_odd() -> np.ndarray:
    """An RGBA crop of odd size (333 x 217) with a fully transparent background and soft edges."""
    a = skdata.logo()[61:394, 20:237].copy()
    a[..., 3] = np.where(a[..., 3] > 0, a[..., 3], 0)
    a[:40, :, 3] = np.linspace(0, 255, 217).astype(np.uint8)  # a partial-alpha gradient band
    return a


def _images() -> dict[str, object]:
    imgs: dict[str, object] = {
        "astronaut": skdata.astronaut(),          # 512x512 RGB
        "chelsea": skdata.chelsea(),              # 300x451
        "coffee": skdata.coffee(),                # 400x600
        "rocket": skdata.rocket(),                # 427x640
        "retina_small": skdata.retina()[::9, ::7],  # 157x202, non-square, odd
        "camera_gray": Image.fromarray(skdata.camera()),  # 'L' mode
        "rgba_odd": _rgba_odd(),
        "tiny": skdata.coffee()[100:113, 200:220],  # 13x20: upscaled
        "strip": skdata.rocket()[:30, :],         # 30x640: extreme aspect ratio
    }
    return imgs


IMAGES = _images()


def _max_diff(cfg: dict, image) -> float:
    ref = _hf(cfg)(images=[image], return_tensors="np")["pixel_values"][0]
    got = ImagePreprocessor(cfg)(image)[0]
    assert got.dtype == np.float32 and got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.abs(got.astype(np.float64) - ref).max())


@pytest.mark.parametrize("cfg_name", sorted(CONFIGS))
def test_matches_hf_pil_processor_on_photos(cfg_name):
    cfg = CONFIGS[cfg_name]
    worst = {}
    for name, img in IMAGES.items():
        pil = img if isinstance(img, Image.Image) else Image.fromarray(img)
        worst[f"{name}/pil"] = _max_diff(cfg, pil)
        if isinstance(img, np.ndarray):
            worst[f"{name}/numpy"] = _max_diff(cfg, img)
    bad = {k: v for k, v in worst.items() if v > TOL}
    assert not bad, bad


@pytest.mark.parametrize("cfg_name", ["clip_b16", "siglip_224"])
def test_calib_images_by_path_match_hf(cfg_name):
    cfg = CONFIGS[cfg_name]
    paths = sorted(CALIB.glob("*.jpg"))
    assert len(paths) >= 10
    pre, hf = ImagePreprocessor(cfg), _hf(cfg)
    ours = pre(paths)  # a list of paths is a batch
    ref = hf(images=[Image.open(p) for p in paths], return_tensors="np")["pixel_values"]
    assert ours.shape == ref.shape == (len(paths), 3, 224, 224)
    assert np.abs(ours - ref).max() <= TOL
    # str paths and a single path
    np.testing.assert_array_equal(pre(str(paths[0]))[0], ours[0])


def test_grayscale_array_equals_grayscale_pil():
    # transformers refuses a 2-D array; the runtime treats it as a grey image, like PIL 'L'.
    cfg = CONFIGS["clip_b16"]
    cam = skdata.camera()
    ref = _hf(cfg)(images=[Image.fromarray(cam)], return_tensors="np")["pixel_values"][0]
    pre = ImagePreprocessor(cfg)
    assert np.abs(pre(cam)[0] - ref).max() <= TOL
    assert np.abs(pre(cam[:, :, None])[0] - ref).max() <= TOL


def test_palette_with_transparency_and_la_match_hf():
    cfg = CONFIGS["siglip_224"]
    rgba = Image.fromarray(_rgba_odd())
    for im in (rgba.convert("LA"), rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)):
        if im.mode == "P":
            im.info["transparency"] = 0
        assert _max_diff(cfg, im) <= TOL


def test_batch_shapes_and_dtypes():
    pre = ImagePreprocessor(CONFIGS["clip_b16"])
    batch = np.stack([skdata.astronaut(), skdata.astronaut()[::-1]])  # [B, H, W, 3] uint8 is a batch
    out = pre(batch)
    assert out.shape == (2, 3, 224, 224) and out.dtype == np.float32
    assert pre.output_size == (224, 224)
    assert ImagePreprocessor(CONFIGS["siglip_384"]).output_size == (384, 384)
    chw = np.ascontiguousarray(np.moveaxis(skdata.chelsea(), -1, 0))  # channels-first uint8 also accepted
    np.testing.assert_array_equal(pre(chw), pre(skdata.chelsea()))


def test_defaults_follow_the_processor_type():
    clip = ImagePreprocessor({"image_processor_type": "CLIPImageProcessor"})
    assert clip.size == {"shortest_edge": 224} and clip.do_center_crop and clip.resample == 3
    np.testing.assert_array_equal(clip.image_mean, np.float32(OPENAI_MEAN))
    sig = ImagePreprocessor({}, family="siglip")
    assert sig.size == {"height": 224, "width": 224} and not sig.do_center_crop and sig.resample == 3
    np.testing.assert_allclose(sig.image_std, [0.5, 0.5, 0.5])


def test_bad_inputs_raise_clearly():
    pre = ImagePreprocessor(CONFIGS["clip_b16"])
    with pytest.raises(TypeError, match="uint8"):
        pre(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(TypeError, match="unsupported image type"):
        pre(12)
    with pytest.raises(ValueError, match="no images"):
        pre([])
    with pytest.raises(ValueError, match="channels"):
        to_rgb_array(np.zeros((8, 8, 5), np.uint8))
    with pytest.raises(ValueError, match="size"):
        ImagePreprocessor({"image_processor_type": "CLIPImageProcessor", "size": {"max_pixels": 4}})
    with pytest.raises(ValueError, match="different sizes"):
        ImagePreprocessor({"image_processor_type": "CLIPImageProcessor", "do_center_crop": False})(
            [skdata.astronaut(), skdata.chelsea()])
