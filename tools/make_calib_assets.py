"""Build the built-in calibration images shipped in ``edgevlm/export/calib/``.

Run from the repository root (needs scikit-image, scikit-learn and Pillow, which the exporter
itself does not need at run time)::

    .venv/bin/python tools/make_calib_assets.py

It reads the sample photos that ship inside the scikit-image wheel (``skimage/data``) and
scikit-learn's ``load_sample_images()`` (``china.jpg``, ``flower.jpg``), converts each to RGB
(gray -> RGB, RGBA composited on white), resizes it so the shorter side is 256 px (Pillow,
BICUBIC), and writes ``edgevlm/export/calib/images/<name>.jpg`` (JPEG quality 90, optimized,
no metadata).  It also writes ``edgevlm/export/calib/LICENSE.md`` from the provenance table
below.  Nothing is downloaded.  The output is deterministic for a given Pillow build.

``captions.jsonl`` and ``sentences.txt`` in the same folder are written by hand; this script
only checks that every image has exactly one caption there.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "edgevlm" / "export" / "calib"
SHORT_SIDE = 256
QUALITY = 90
MAX_TOTAL_BYTES = 500_000

# (output name, file in skimage/data, what it is, provenance / license as stated in the docstring
# of the matching skimage.data function in scikit-image 0.26).  Images whose docstring states no
# license (moon, page, motorcycle_left/right, logo, color wheel, ...) are deliberately left out,
# as is microaneurysms (102x102 px, too small to upscale).
SKIMAGE = [
    ("astronaut", "astronaut.png", "Eileen Collins, NASA astronaut (skimage.data.astronaut)",
     "Downloaded from the NASA Great Images database (https://flic.kr/p/r9qvLn). "
     "No known copyright restrictions, released into the public domain."),
    ("brick", "brick.png", "Brick wall, grayscale (skimage.data.brick)",
     "Downloaded from CC0Textures (https://cc0textures.com/view.php?tex=Bricks25), licensed under "
     "the Creative Commons CC0 License; perspective-transformed, rotated, cropped and scaled by "
     "scikit-image."),
    ("camera", "camera.png", "Man with a camera, grayscale (skimage.data.camera)",
     "No copyright restrictions. CC0 by the photographer (Lav Varshney)."),
    ("cell", "cell.png", "Cell floating in saline, quantitative phase image (skimage.data.cell)",
     "CC0, dedicated to the public domain (Müller et al., Optics Express 26(8), 2018, "
     "doi:10.1364/OE.26.010729)."),
    ("chelsea", "chelsea.png", "Chelsea the cat (skimage.data.chelsea)",
     "No copyright restrictions. CC0 by the photographer (Stefan van der Walt)."),
    ("clock", "clock_motion.png", "Motion-blurred wall clock, grayscale (skimage.data.clock)",
     "Released into the public domain by the photographer (Stefan van der Walt)."),
    ("coffee", "coffee.png", "Coffee cup, courtesy of Pikolo Espresso Bar (skimage.data.coffee)",
     "No copyright restrictions. CC0 by the photographer (Rachel Michetti)."),
    ("coins", "coins.png", "Greek coins from Pompeii, grayscale (skimage.data.coins)",
     "Downloaded from the Brooklyn Museum Collection "
     "(https://www.brooklynmuseum.org/opencollection/archives/image/51611). "
     "No known copyright restrictions."),
    ("grass", "grass.png", "Grass texture, grayscale (skimage.data.grass)",
     "Downloaded from DeviantArt (https://www.deviantart.com/linolafett/art/Grass-01-434853879), "
     "licensed under the Creative Commons CC0 License; cropped and converted to grayscale by "
     "scikit-image."),
    ("gravel", "gravel.png", "Gravel texture, grayscale (skimage.data.gravel)",
     "Downloaded from CC0Textures (https://cc0textures.com/view.php?tex=Gravel04), licensed under "
     "the Creative Commons CC0 License; rescaled, cropped and converted to grayscale by "
     "scikit-image."),
    ("horse", "horse.png", "Black silhouette of a horse (skimage.data.horse)",
     "Downloaded from openclipart (http://openclipart.org/detail/158377/horse-by-marauder). "
     "No copyright restrictions. CC0 given by owner (Andreas Preuss (marauder)). "
     "Transparent background composited on white here."),
    ("hubble_deep_field", "hubble_deep_field.jpg", "Hubble eXtreme Deep Field (skimage.data.hubble_deep_field)",
     "Downloaded from HubbleSite (http://hubblesite.org/newscenter/archive/releases/2012/37/image/a/). "
     "Captured by NASA; may be freely used in the public domain "
     "(http://www.nasa.gov/audience/formedia/features/MP_Photo_Guidelines.html)."),
    ("ihc", "ihc.png", "Immunohistochemistry stain of colonic glands (skimage.data.immunohistochemistry)",
     "Acquired at the Center for Microscopy And Molecular Imaging (CMMI). "
     "No known copyright restrictions."),
    ("retina", "retina.jpg", "Fundus photograph of a normal left eye (skimage.data.retina)",
     "Downloaded from Wikimedia Commons "
     "(https://commons.wikimedia.org/wiki/File:Fundus_photograph_of_normal_left_eye.jpg); "
     "made available under the Creative Commons CC0 1.0 Universal Public Domain Dedication "
     "(Häggström, WikiJournal of Medicine 1 (2), 2014, doi:10.15347/wjm/2014.008)."),
    ("rocket", "rocket.jpg", "Launch of DSCOVR on a SpaceX Falcon 9 (skimage.data.rocket)",
     "Downloaded from SpaceX Photos "
     "(https://www.flickr.com/photos/spacexphotos/16511594820/in/photostream/). Captured by "
     "SpaceX and released in the public domain."),
    ("text", "text.png", "Gray-level text image used for corner detection (skimage.data.text)",
     "Downloaded from Wikipedia (https://en.wikipedia.org/wiki/File:Corner.png). "
     "No known copyright restrictions, released into the public domain."),
]

# scikit-learn's sklearn/datasets/images/README.txt (scikit-learn 1.9).  Note: that README
# credits both photos to danielbuechele, but the flower's source link is the Flickr user vultilion.
SKLEARN = [
    ("china", "china.jpg", "Temple in China (sklearn.datasets.load_sample_images)",
     "Creative Commons Attribution 2.0 (https://creativecommons.org/licenses/by/2.0/). "
     "Attribution: some rights reserved by danielbuechele (https://www.flickr.com/photos/danielbuechele/). "
     "Source: https://www.flickr.com/photos/danielbuechele/6061409035/sizes/z/in/photostream/, "
     "retrieved 21 August 2011 by Robert Layton for scikit-learn."),
    ("flower", "flower.jpg", "Flower (sklearn.datasets.load_sample_images)",
     "Creative Commons Attribution 2.0 (https://creativecommons.org/licenses/by/2.0/). "
     "Source: https://www.flickr.com/photos/vultilion/6056698931/sizes/z/in/photostream/ "
     "(Flickr user vultilion, https://www.flickr.com/photos/vultilion/; scikit-learn's README "
     "names danielbuechele in the attribution line), retrieved 21 August 2011 by Robert Layton "
     "for scikit-learn."),
]


def to_rgb(im: Image.Image) -> Image.Image:
    """Gray -> RGB; transparency composited on white."""
    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    if im.mode in ("I;16", "I", "F"):
        raise ValueError(f"unexpected high bit-depth image mode {im.mode}")
    return im.convert("RGB")


def resize_short(im: Image.Image, short: int = SHORT_SIDE) -> Image.Image:
    w, h = im.size
    s = short / min(w, h)
    size = (max(short, round(w * s)), max(short, round(h * s)))
    return im.resize(size, Image.Resampling.BICUBIC)


def sources() -> list[tuple[str, Path, str, str, str]]:
    import skimage
    from sklearn.datasets import load_sample_images

    sk_dir = Path(skimage.__file__).parent / "data"
    out = [(n, sk_dir / f, what, lic, f"scikit-image {skimage.__version__} wheel, skimage/data/{f}")
           for n, f, what, lic in SKIMAGE]
    import sklearn

    files = {Path(p).name: Path(p) for p in load_sample_images().filenames}
    out += [(n, files[f], what, lic, f"scikit-learn {sklearn.__version__} wheel, sklearn/datasets/images/{f}")
            for n, f, what, lic in SKLEARN]
    return out


def write_license(rows: list[tuple[str, Path, str, str, str]]) -> None:
    lines = [
        "# Built-in calibration images: provenance and licenses",
        "",
        "The JPEGs in `images/` were made by `tools/make_calib_assets.py` from sample images that",
        "ship inside the scikit-image and scikit-learn wheels: converted to RGB (gray replicated,",
        "transparency composited on white), resized so the shorter side is 256 px (bicubic), and",
        "saved as JPEG quality 90.  The license facts below are copied from the scikit-image",
        "`skimage.data` function docstrings and from scikit-learn's",
        "`sklearn/datasets/images/README.txt`.  The code of both packages is BSD-3-Clause.",
        "",
        "`captions.jsonl` and `sentences.txt` were written for edgevlm and are distributed under",
        "the project's license (Apache-2.0).",
        "",
        "| file | image | taken from | provenance and license |",
        "|---|---|---|---|",
    ]
    for name, _, what, lic, origin in rows:
        lines.append(f"| `images/{name}.jpg` | {what} | {origin} | {lic} |")
    lines += [
        "",
        "`china.jpg` and `flower.jpg` are under CC BY 2.0, which requires the attribution above and",
        "an indication of changes: both were resized and re-encoded as described at the top.",
        "",
    ]
    (OUT / "LICENSE.md").write_text("\n".join(lines), encoding="utf-8")


def check_captions(names: list[str]) -> None:
    cap = OUT / "captions.jsonl"
    if not cap.exists():
        print(f"note: {cap} does not exist yet; write one caption per image", file=sys.stderr)
        return
    seen = [json.loads(line)["image"] for line in cap.read_text(encoding="utf-8").splitlines() if line.strip()]
    want = [f"{n}.jpg" for n in names]
    if sorted(seen) != sorted(want):
        raise SystemExit(f"captions.jsonl does not match the images: missing {sorted(set(want) - set(seen))}, "
                         f"extra {sorted(set(seen) - set(want))}, duplicates {len(seen) - len(set(seen))}")


def main() -> None:
    rows = sources()
    img_dir = OUT / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    keep = {f"{n}.jpg" for n, *_ in rows}
    for stale in img_dir.iterdir():
        if stale.name not in keep:
            stale.unlink()
    total = 0
    for name, src, *_ in rows:
        with Image.open(src) as im:
            im.load()
            out = resize_short(to_rgb(im))
        dst = img_dir / f"{name}.jpg"
        out.save(dst, "JPEG", quality=QUALITY, optimize=True)
        total += dst.stat().st_size
        print(f"{dst.relative_to(ROOT)}  {out.size[0]}x{out.size[1]}  {dst.stat().st_size / 1000:.1f} kB")
    print(f"{len(rows)} images, {total / 1000:.1f} kB in total")
    if total > MAX_TOTAL_BYTES:
        raise SystemExit(f"images total {total} bytes > {MAX_TOTAL_BYTES}")
    write_license(rows)
    check_captions([n for n, *_ in rows])


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
