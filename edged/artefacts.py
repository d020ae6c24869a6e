"""Small artefacts released without a model: a motion model's centroids, a model's label map.

Shared by the release tooling (`edged release artefact`, which checks a file before signing it)
and the device's updater (which checks it again after verifying it, and against the model it
runs). An artefact belongs to one model by name; whether it fits the model in service is decided
on the device, because a model may be updated apart from its artefacts:

- centroids (`edged.centroids`' file, "edged-centroids/1"): the file's model and signature
  version must be the running model's, and its centroids as long as its signatures;
- labels (one label per line): as many labels as the model has classes. A label map renames
  classes; it cannot add any.

An artefact that does not fit is refused (and, installed earlier for a model since replaced, left
unused) with one line saying which of the two it was made for.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from edged.centroids import Centroids, SignatureError

if TYPE_CHECKING:
    from edged.models import ModelEntry

KINDS = ("centroids", "labels")
FILES = {"centroids": "centroids.json", "labels": "labels.txt"}  # the target's file name in a release
MAX_LABEL = 64


class ArtefactError(ValueError):
    """An artefact file that cannot be used, worded for the user (one line)."""


def parse(kind: str, data: bytes, where: str) -> Centroids | list[str]:
    """The artefact in `data`: a Centroids, or a list of labels."""
    if kind == "centroids":
        try:
            return Centroids.from_json(json.loads(data), where)
        except ValueError as exc:  # JSON errors and SignatureError alike
            raise ArtefactError(str(exc) if isinstance(exc, SignatureError) else f"{where}: not JSON: {exc}") from None
    if kind == "labels":
        try:
            lines = [ln.strip() for ln in data.decode("utf-8").splitlines()]
        except UnicodeDecodeError:
            raise ArtefactError(f"{where}: not UTF-8 text") from None
        labels = [ln for ln in lines if ln]
        if not labels:
            raise ArtefactError(f"{where}: no labels (expected one per line)")
        for i, lab in enumerate(labels, 1):
            if len(lab) > MAX_LABEL or not lab.isprintable():
                raise ArtefactError(f"{where}: label {i} ({lab[:20]!r}…): expected at most {MAX_LABEL} "
                                    "printable characters")
        return labels
    raise ArtefactError(f"{where}: unknown artefact kind {kind!r} (expected one of {', '.join(KINDS)})")


def describe(kind: str, artefact: Centroids | list[str]) -> dict:
    """What the artefact was made for, as a release descriptor records it."""
    if kind == "centroids":
        return {"model": artefact.model, "signature_version": artefact.signature_version,
                "dim": artefact.dim, "labels": list(artefact.labels)}
    return {"classes": len(artefact), "labels": list(artefact)}


def misfit(kind: str, artefact: Centroids | list[str], entry: "ModelEntry") -> str | None:
    """Why `artefact` does not fit model `entry` (one line), or None when it does."""
    if kind == "labels":
        if len(artefact) != len(entry.labels):
            return (f"a label map of {len(artefact)} labels, but model {entry.name} has "
                    f"{len(entry.labels)} classes")
        return None
    if entry.task != "motion":
        return f"centroids are for motion models; {entry.name} is a {entry.task} model"
    version = entry.params.get("signature_version", 1)
    if artefact.model and artefact.model != entry.name or artefact.signature_version != version:
        return (f"made for {artefact.model or 'a model'} signature version {artefact.signature_version}, "
                f"but model {entry.name} has signature version {version}")
    dim = entry.params.get("signature_dim")
    if isinstance(dim, int) and dim != artefact.dim:
        return f"centroids have {artefact.dim} values, model {entry.name}'s signatures {dim}"
    return None
