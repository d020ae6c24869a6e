#!/usr/bin/env python3
"""Build edged's multi-person scene set (tests/data/vision/scenes/ and scenes.json).

Two kinds of image, both from files that Debian or PyPI packages ship:

* real scenes from Debian's opencv-doc package (OpenCV's sample data): four frames of the
  pedestrian clip vtest.avi, basketball1.png and basketball2.png, messi5.jpg, and people-free scenes. Every person
  and face in them was measured by hand on a coordinate grid (HAND below);
* groups: people cut out of the portrait photos of the close-up set with MediaPipe's selfie
  segmentation model (from the mediapipe wheel) and pasted at 1-5 m scale into people-free
  street and building scenes. Their boxes follow from the hand-measured boxes of the sources and
  the placement arithmetic; a person's box is the visible part of the cut-out.

Inputs (already downloaded; nothing is fetched here):
  --opencv-doc  opencv-doc_4.6.0+dfsg-12_all.deb (Debian 12), or the directory it unpacks to
  --mediapipe   mediapipe-0.10.14-cp311-...whl (for selfie_segmentation.tflite)

    .venv/bin/python scripts/make_scenes_testset.py --opencv-doc opencv-doc_4.6.0+dfsg-12_all.deb \
        --mediapipe mediapipe-0.10.14-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl

Needs numpy, Pillow, opencv-python-headless (to read vtest.avi) and ai-edge-litert.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "data" / "vision"
QUALITY = 90
DATA = "usr/share/doc/opencv-doc/examples/data"

# Hand-measured boxes, pixels [x0, y0, x1, y1] on the files at their original size. People are
# boxed by their visible extent; faces from the hairline (or forehead) to the chin, cheek to
# cheek. "ignore" boxes cover what cannot be labelled one by one (a blurred crowd, a face turned
# away): a detection that is mostly inside one is neither right nor wrong.
HAND: dict[str, dict] = {
    "vtest_0000": {"frame": 0, "skip": ["face"], "objects": [
        ("person", (253, 220, 283, 308)), ("person", (500, 157, 530, 233)),
        ("person", (640, 240, 686, 321))]},
    "vtest_0300": {"frame": 300, "skip": ["face"], "objects": [
        ("person", (186, 159, 219, 234)), ("person", (243, 160, 270, 221)),
        ("person", (299, 160, 323, 231)), ("person", (315, 210, 344, 296)),
        ("person", (582, 160, 611, 235)), ("person", (620, 160, 644, 235))]},
    "vtest_0600": {"frame": 600, "skip": ["face"], "objects": [
        ("person", (189, 144, 214, 214)), ("person", (284, 431, 331, 576)),
        ("person", (455, 301, 505, 418)), ("person", (569, 200, 596, 288)),
        ("person", (670, 207, 703, 297)), ("person", (641, 305, 671, 412))]},
    "vtest_0700": {"frame": 700, "skip": ["face"], "objects": [
        ("person", (184, 166, 213, 239)), ("person", (281, 212, 308, 294)),
        ("person", (366, 172, 397, 255)), ("person", (405, 152, 427, 203)),
        ("person", (102, 286, 143, 395)), ("person", (476, 136, 495, 200)),
        ("person", (520, 166, 544, 234)), ("person", (680, 207, 728, 306))]},
    "basketball1": {"file": "basketball1.png", "objects": [
        ("person", (33, 80, 163, 479)), ("face", (60, 88, 103, 137)),
        ("person", (436, 20, 640, 480)), ("face?", (500, 25, 612, 140))]},
    "basketball2": {"file": "basketball2.png", "objects": [
        ("person", (36, 81, 160, 479)), ("face", (64, 90, 103, 135)),
        ("person", (426, 20, 640, 480)), ("face?", (515, 20, 612, 125))]},
    "messi5": {"file": "messi5.jpg", "objects": [
        ("person", (68, 60, 457, 336)), ("face", (220, 95, 262, 132)),
        ("person?", (0, 0, 548, 262)), ("face?", (0, 0, 548, 262))]},
}
EMPTY = ["building.jpg", "home.jpg", "leuvenA.jpg", "licenseplate_motion.jpg", "squirrel_cls.jpg",
         "stuff.jpg", "fruits.jpg", "board.jpg", "aero1.jpg",
         # Added later, as a check that the chain's rules were not fitted to the nine above:
         # animal faces, fruit and a toy scene filling close-ups, a painting, graffiti with drawn
         # faces, a street and an aerial view.
         "baboon.jpg", "chicky_512.png", "orange.jpg", "apple.jpg", "butterfly.jpg", "aloeL.jpg",
         "starry_night.jpg", "graf1.png", "box_in_scene.png", "rubberwhale1.png", "smarties.png",
         "leuvenB.jpg", "aero3.jpg", "ela_original.jpg", "pca_test1.jpg"]

# Cut-out sources for the groups: file in the repository, hand person box, hand face box.
PEOPLE = {
    "astronaut": ("samples/images/astronaut.jpg", (18, 14, 362, 512), (180, 82, 272, 185)),
    "camera": ("samples/images/camera.jpg", (0, 64, 332, 512), (182, 110, 258, 205)),
    "hopper": ("tests/data/vision/images/grace_hopper.jpg", (12, 22, 512, 600), (168, 140, 358, 330)),
}
# Groups: background (opencv-doc file), then (who, scale, x of the cut-out's left edge, how far
# its bottom reaches below the frame): people stand close to the camera, cut by the frame's edge.
GROUPS = {
    "group_leuven": ("leuvenA.jpg", [("astronaut", 0.42, 40, 0), ("hopper", 0.30, 300, 20),
                                      ("camera", 0.55, 500, 30)]),
    "group_building": ("building.jpg", [("camera", 0.40, 40, 0), ("astronaut", 0.30, 250, 10),
                                        ("hopper", 0.22, 430, 0), ("astronaut", 0.50, 620, 40)]),
    "group_home": ("home.jpg", [("hopper", 0.25, 20, 0), ("camera", 0.30, 180, 10),
                                ("astronaut", 0.28, 360, 0)]),
    "group_street": ("leuvenA.jpg", [("hopper", 0.18, 120, 0), ("astronaut", 0.22, 260, 0),
                                     ("camera", 0.25, 420, 0), ("hopper", 0.15, 600, 0)]),
}


class Deb:
    """Files of a .deb (unpacked once with dpkg-deb) or of an unpacked directory."""

    def __init__(self, path: str):
        p = Path(path)
        if p.is_dir():
            self.root = p
        else:
            self._tmp = tempfile.TemporaryDirectory()
            subprocess.run(["dpkg-deb", "-x", str(p), self._tmp.name], check=True)
            self.root = Path(self._tmp.name)

    def path(self, name: str) -> Path:
        return self.root / DATA / name


class Segmenter:
    """MediaPipe selfie segmentation: a soft person mask for a portrait photo."""

    MEMBER = "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite"

    def __init__(self, wheel: str):
        from ai_edge_litert.interpreter import Interpreter
        with zipfile.ZipFile(wheel) as zf:
            self.it = Interpreter(model_content=zf.read(self.MEMBER), num_threads=1)
        self.it.allocate_tensors()
        self.inp = self.it.get_input_details()[0]["index"]
        self.out = self.it.get_output_details()[0]["index"]

    def __call__(self, im: Image.Image) -> np.ndarray:
        x = np.asarray(im.resize((256, 256), Image.BILINEAR), np.float32) / 255.0
        self.it.set_tensor(self.inp, x[None])
        self.it.invoke()
        m = (self.it.get_tensor(self.out)[0, :, :, 0] * 255).astype(np.uint8)
        return np.asarray(Image.fromarray(m).resize(im.size, Image.BILINEAR))


def rows(doc: dict, units_note: str = "") -> str:
    """The labels file's text, one image a line; `units_note` ends the units line (JSON-escaped)."""
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(doc.items())]
    return ('{\n "units": "pixels, [x0, y0, x1, y1], origin top-left; a label ending in ? marks a '
            'region to ignore' + units_note + '",\n "images": {\n' + ",\n".join(lines) + "\n }\n}\n")


def entry(objects, skip=()) -> dict:
    e = {"objects": [{"label": lab, "box": [round(float(v), 1) for v in box]} for lab, box in objects]}
    if skip:
        e["skip"] = list(skip)
    return e


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--opencv-doc", required=True)
    ap.add_argument("--mediapipe", required=True)
    args = ap.parse_args()
    deb = Deb(args.opencv_doc)
    seg = Segmenter(args.mediapipe)
    out = OUT / "scenes"
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, dict] = {}

    import cv2
    cap = cv2.VideoCapture(str(deb.path("vtest.avi")))
    frames, i = {}, 0
    want = {h["frame"] for h in HAND.values() if "frame" in h}
    while len(frames) < len(want):
        ok, bgr = cap.read()
        if not ok:
            raise SystemExit("vtest.avi ended early")
        if i in want:
            frames[i] = Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1]))
        i += 1
    for name, h in HAND.items():
        im = frames[h["frame"]] if "frame" in h else Image.open(deb.path(h["file"])).convert("RGB")
        im.save(out / f"{name}.jpg", quality=QUALITY)
        doc[f"tests/data/vision/scenes/{name}.jpg"] = entry(h["objects"], h.get("skip", ()))
    for f in EMPTY:
        im = Image.open(deb.path(f)).convert("RGB")
        name = f.rsplit(".", 1)[0]
        im.save(out / f"{name}.jpg", quality=QUALITY)
        doc[f"tests/data/vision/scenes/{name}.jpg"] = entry([])

    cuts = {}
    for who, (rel, pbox, fbox) in PEOPLE.items():
        im = Image.open(REPO / rel).convert("RGB").crop(pbox)
        m = seg(im)
        cuts[who] = (im, m, (fbox[0] - pbox[0], fbox[1] - pbox[1], fbox[2] - pbox[0], fbox[3] - pbox[1]))
    for name, (bg, placed) in GROUPS.items():
        canvas = Image.open(deb.path(bg)).convert("RGB")
        objects = []
        for who, s, x, below in placed:
            im, m, fb = cuts[who]
            w, h = round(im.width * s), round(im.height * s)
            y = canvas.height - h + below
            small = im.resize((w, h), Image.LANCZOS)
            alpha = Image.fromarray(m).resize((w, h), Image.BILINEAR)
            canvas.paste(small, (x, y), alpha)
            a = np.asarray(alpha) > 127
            ys, xs = np.nonzero(a)
            x0, y0 = x + xs.min(), y + ys.min()
            x1 = min(x + xs.max() + 1, canvas.width)
            y1 = min(y + ys.max() + 1, canvas.height)
            objects.append(("person", (x0, y0, x1, y1)))
            objects.append(("face", (x + fb[0] * s, y + fb[1] * s, x + fb[2] * s, y + fb[3] * s)))
        canvas.save(out / f"{name}.jpg", quality=QUALITY)
        doc[f"tests/data/vision/scenes/{name}.jpg"] = entry(objects)

    (OUT / "scenes.json").write_text(rows(doc))
    n = sum(len(v["objects"]) for v in doc.values())
    print(f"wrote {len(doc)} images and {n} boxes to {out.relative_to(REPO)} and scenes.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
