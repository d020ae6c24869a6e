#!/usr/bin/env python3
"""Build edged's second held-out vision set (tests/data/vision/darknet/ and darknet.json).

A second check on other photos than the held-out set (heldout.json), which the person stage's
settings have now been looked at against: the example photos that Debian 12's `darknet` package
ships (0.0.0+git20180914.61c9d02e-2+b4, /usr/share/darknet/data/). Its copyright file covers
them under `Files: *` as "GPL-3.0+ or MIT or WTFPL". Two photos with people (a beach with
kite surfers, people from 8 to 150 px tall; a woman from behind with a dog and a horse) and four
without (a dog with a bicycle and a truck, an eagle, a giraffe, horses). The painting
(scream.jpg) is left out: its figures are people to some eyes and not to others.

    .venv/bin/python scripts/make_darknet_testset.py --darknet darknet_0.0.0+git20180914.61c9d02e-2+b4_amd64.deb

(or the directory the .deb unpacks to). Nothing is fetched here. Needs numpy and Pillow.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from make_heldout_testset import QUALITY, entry, fit  # noqa: E402
from make_scenes_testset import Deb  # noqa: E402
from make_scenes_testset import rows as scenes_rows  # noqa: E402

OUT = REPO / "tests" / "data" / "vision"
DATA = "usr/share/darknet/data/"

# Hand-measured boxes, pixels [x0, y0, x1, y1], with the rules of the other sets (a person's
# visible extent; "?" regions ignored; "skip": faces too small or turned away to box). On the
# beach, people shorter than 25 px or standing in the surf (the kite surfers, 15-25 px and cut
# by the water) are "?" regions: too small to box one by one.
PEOPLE = {
    "kite_beach": ("kite.jpg", [
        ("person", (114, 612, 165, 762)), ("person", (216, 699, 270, 854)),   # two in hoods, from behind
        ("person", (21, 531, 39, 557)), ("person", (41, 511, 52, 560)),      # child in a red cap, man in white
        ("person", (83, 508, 101, 566)), ("person", (96, 537, 109, 567)),    # man in black, the child in front of him
        ("person", (177, 541, 191, 573)),                                    # girl at the water's edge
        ("person?", (346, 486, 357, 505)), ("person?", (519, 504, 533, 531)), ("person?", (537, 513, 555, 535)),
        ("person?", (461, 475, 468, 484)), ("person?", (694, 461, 703, 472)), ("person?", (1206, 450, 1216, 466)),
    ], ["face"]),
    # From behind: no face to box, so any face found is a false one.
    "woman_horse": ("person.jpg", [("person", (192, 99, 275, 375))], []),
}
EMPTY = {"dog_bicycle": "dog.jpg", "eagle": "eagle.jpg", "giraffe": "giraffe.jpg", "horses": "horses.jpg"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--darknet", required=True, help="Debian's darknet .deb, or the directory it unpacks to")
    args = ap.parse_args()
    deb = Deb(args.darknet)
    out = OUT / "darknet"
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, dict] = {}
    for name, (rel, objects, skip) in PEOPLE.items():
        im, objs = fit(Image.open(deb.root / DATA / rel).convert("RGB"), None, None, objects)
        im.save(out / f"{name}.jpg", quality=QUALITY)
        doc[f"tests/data/vision/darknet/{name}.jpg"] = entry(objs, skip)
    for name, rel in EMPTY.items():
        Image.open(deb.root / DATA / rel).convert("RGB").save(out / f"{name}.jpg", quality=QUALITY)
        doc[f"tests/data/vision/darknet/{name}.jpg"] = entry([])
    (OUT / "darknet.json").write_text(scenes_rows(doc, ""))
    print(f"{len(PEOPLE) + len(EMPTY)} images in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
