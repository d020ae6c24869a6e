"""The default chain on the held-out set (tests/data/vision/heldout.json), built after the chain's
rules were set on the other two sets. The asserted floors are the figures docs/models.md reports
for the committed part of the set ("Held-out set"): the chain misses the issue's people goal
there, and these tests keep it from getting worse unnoticed."""

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
SET = json.loads((DATA / "heldout.json").read_text())["images"]
SHIPPED = {rel: e for rel, e in SET.items() if not e.get("extra")}


@pytest.fixture(scope="module")
def found():
    """{image: (its labels, the default chain's objects)}: one run per committed image."""
    chain = open_graph(DEFAULT_CHAIN, load_manifest(REPO / "models"), threads=1)
    return {rel: (e, chain.detect(np.asarray(Image.open(REPO / rel).convert("RGB"))))
            for rel, e in SHIPPED.items()}


def score(found, label):
    return score_labelled(found, label, REPO)


def test_every_committed_image_is_there_and_its_source_and_licence_are_listed():
    readme = (DATA / "README.md").read_text()
    section = readme[readme.index("## Held-out set"):]
    for rel in SHIPPED:
        assert (REPO / rel).is_file(), rel
        assert re.search(rf"`{Path(rel).stem}`", section), f"{rel} is not in the README's held-out table"
    # The extras (photos from PyPI source archives) are labelled, listed and never committed.
    for rel in set(SET) - set(SHIPPED):
        assert "/extra/" in rel and Path(rel).stem in section, rel
    assert "tests/data/vision/heldout/extra/" in (REPO / ".gitignore").read_text()


def test_default_chain_on_the_held_out_set_keeps_its_measured_figures(found):
    # docs/models.md, "Held-out set", committed images: people 11 of 17 at precision 0.92 with the
    # closer look at small and unsure boxes (9 of 17 at 0.90 without it, people from 0.3; 8 of 17
    # from 0.4, the figure held out), faces 3 of 3 at 0.75 (the false one is the drawn girl's
    # face, below). Still short of the 0.85 for people.
    tp, fp, fn = score(found, "person")
    assert tp >= 11 and tp / (tp + fp) >= 0.9, (tp, fp, fn)
    tp, fp, fn = score(found, "face")
    assert (tp, fn) == (3, 0) and fp <= 1, (tp, fp, fn)


def test_no_person_on_the_people_free_held_out_scenes(found):
    empty = {rel: objects for rel, (e, objects) in found.items() if not e["objects"]}
    assert len(empty) == 15
    people = {rel: o for rel, objects in empty.items() for o in objects if o.label == "person"}
    assert not people, people
    # The one false alarm of the chain there: the full-range face model on a drawn face.
    faces = {Path(rel).stem for rel, objects in empty.items() if objects}
    assert faces <= {"drawn_girl"}, faces
