"""The model manifest (`models/manifest.toml`): what each shipped model is, and loading it safely.

Every model file is checked against the manifest's size and sha256 before the interpreter sees
it, so a truncated copy or a swapped file is refused with a message that says which.
"""

from __future__ import annotations

import hashlib
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from edged.runtime import Model

MANIFEST = "manifest.toml"
DROP_INS = "manifest.d"  # more tables, one file per model scripts/fetch-models added
TASKS = ("vision", "motion")


class ModelError(Exception):
    """A manifest or model file problem, worded for the user (one line)."""


def default_models_dir() -> Path:
    """Where the shipped models are: the source checkout, else the installed data files."""
    candidates = (
        Path(__file__).resolve().parent.parent / "models",
        Path(sys.prefix) / "share" / "edged" / "models",
        Path("/usr/share/edged/models"),
    )
    for c in candidates:
        if (c / MANIFEST).is_file():
            return c
    return candidates[0]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    sha256: str
    size: int
    task: str
    decoder: str
    labels: list[str]
    source: str
    license: str
    input: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    edgetpu_path: Path | None = None
    edgetpu_sha256: str | None = None
    edgetpu_size: int | None = None
    manifest: Path | None = None  # the file that defines it (manifest.toml or manifest.d/*.toml)
    # A centroid file an update installed for this model (an artefact release, edged.artefacts):
    # the motion stage labels by it rather than by motion.centroids.
    centroids: Path | None = None


def _manifest_docs(models_dir: Path) -> list[tuple[Path, dict]]:
    """manifest.toml, then manifest.d/*.toml in name order. Fetched models get a file of their
    own there, so a reinstall that replaces manifest.toml keeps them."""
    paths = [models_dir / MANIFEST]
    if (models_dir / DROP_INS).is_dir():
        paths += sorted(p for p in (models_dir / DROP_INS).glob("*.toml") if not p.name.startswith("."))
    docs = []
    for path in paths:
        try:
            with path.open("rb") as fh:
                docs.append((path, tomllib.load(fh)))
        except FileNotFoundError:
            raise ModelError(f"{path}: model manifest not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ModelError(f"{path}: {exc}") from None
        except OSError as exc:
            raise ModelError(f"{path}: cannot read the manifest: {exc.strerror}") from None
    return docs


def load_manifest(models_dir: Path | None = None) -> dict[str, ModelEntry]:
    models_dir = Path(models_dir) if models_dir else default_models_dir()
    tables = [(path, name, t) for path, doc in _manifest_docs(models_dir)
              for name, t in (doc.get("models") or {}).items()]
    entries = {}
    defined_in: dict[str, Path] = {}
    for path, name, t in tables:
        if name in defined_in:
            raise ModelError(f"{path}: models.{name}: model {name!r} is already defined in {defined_in[name]}")
        defined_in[name] = path
        entries[name] = entry_from_table(name, t, models_dir, path)
    return entries


def entry_from_table(name: str, t: dict, models_dir: Path, path: Path) -> ModelEntry:
    """One manifest table as an entry, its files relative to `models_dir`; `path` is the file
    that defines it (a manifest, or an installed release's release.json), for messages."""
    where = f"{path}: models.{name}"
    try:
        labels_file = models_dir / t["labels"]
        labels = [ln.strip() for ln in labels_file.read_text().splitlines() if ln.strip()]
        task = t["task"]
        if task not in TASKS:
            raise ModelError(f"{where}.task: expected one of {', '.join(TASKS)}, got {task!r}")
        edgetpu = t.get("edgetpu_file")
        return ModelEntry(
            name=name,
            path=models_dir / t["file"],
            sha256=str(t["sha256"]).lower(),
            size=int(t["size"]),
            task=task,
            decoder=str(t.get("decoder", "")),
            labels=labels,
            source=str(t.get("source", "")),
            license=str(t.get("license", "")),
            input=dict(t.get("input", {})),
            params=dict(t.get("params", {})),
            metrics=dict(t.get("metrics", {})),
            edgetpu_path=models_dir / edgetpu if edgetpu else None,
            edgetpu_sha256=str(t["edgetpu_sha256"]).lower() if edgetpu else None,
            edgetpu_size=int(t["edgetpu_size"]) if edgetpu else None,
            manifest=path,
        )
    except KeyError as exc:
        raise ModelError(f"{where}: missing key {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:  # e.g. size = "big"
        raise ModelError(f"{where}: a value has the wrong type ({exc})") from None
    except OSError as exc:
        raise ModelError(f"{where}.labels: cannot read {exc.filename}: {exc.strerror}") from None


def select(manifest: dict[str, ModelEntry], name: str, task: str, key: str) -> ModelEntry:
    """The model `name` for `task`; `key` names the setting that asked for it, for the error."""
    entry = manifest.get(name)
    if entry is None:
        raise ModelError(f"{key}: no model named {name!r} in the manifest (have: {', '.join(sorted(manifest))})")
    if entry.task != task:
        raise ModelError(f"{key}: model {name!r} is a {entry.task} model, not a {task} model")
    return entry


def verify(entry: ModelEntry, path: Path | None = None) -> None:
    """Raise ModelError unless the file has the manifest's size and sha256."""
    path = path or entry.path
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ModelError(f"{path}: model file missing (manifest entry {entry.name!r})") from None
    if size != entry.size:
        raise ModelError(
            f"{path}: size {size} bytes, manifest says {entry.size}: truncated or replaced file; "
            "restore it from the release or re-run scripts/fetch-models")
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != entry.sha256:
        raise ModelError(
            f"{path}: sha256 {digest.hexdigest()[:12]}… does not match the manifest's "
            f"{entry.sha256[:12]}…: refusing to load a modified model")


def open_model(entry: ModelEntry, threads: int | None = None) -> Model:
    verify(entry)
    return Model(entry.path, threads=threads)
