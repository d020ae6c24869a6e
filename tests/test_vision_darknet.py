"""The default chain on the second held-out set (tests/data/vision/darknet.json: Debian's
darknet example photos), built after the person stage had been changed against the first
held-out set. The asserted figures are those docs/models.md reports ("Second held-out set")."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import score_labelled
from edged.models import load_manifest
from edged.stages.vision.graph import DEFAULT_CHAIN, open_graph

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data" / "vision"
SET = json.loads((DATA / "darknet.json").read_text())["images"]


@pytest.fixture(scope="module")
def found():
    """{image: (its labels, the default chain's objects)}: one run per image."""
    chain = open_graph(DEFAULT_CHAIN, load_manifest(REPO / "models"), threads=1)
    return {rel: (e, chain.detect(np.asarray(Image.open(REPO / rel).convert("RGB"))))
            for rel, e in SET.items()}


def test_every_image_is_there_and_its_source_and_licence_are_listed():
    readme = (DATA / "README.md").read_text()
    section = readme[readme.index("## Second held-out set"):]
    assert len(SET) == 6
    for rel in SET:
        assert (REPO / rel).is_file(), rel
        assert re.search(rf"`{Path(rel).stem}`", section), f"{rel} is not in the README's table"


def test_default_chain_on_the_second_held_out_set_keeps_its_measured_figures(found):
    # docs/models.md, "Second held-out set": people 7 of 8 and no false one with the closer look
    # at small boxes; 3 of 8 at precision 0.43 before it, when the beach's small people came out
    # as loose boxes, some over two people at once.
    tp, fp, fn = score_labelled(found, "person", REPO)
    assert tp >= 7 and fp == 0, (tp, fp, fn)
    tp, fp, fn = score_labelled(found, "face", REPO)
    assert fp == 0, (tp, fp, fn)   # the woman is seen from behind


def test_nothing_on_the_people_free_photos(found):
    empty = {Path(rel).stem: objects for rel, (e, objects) in found.items() if not e["objects"]}
    assert len(empty) == 4
    assert not any(empty.values()), empty
