"""Cloud-side use of motion signatures: files of signatures, and the `edged signatures` commands.

Signatures come as JSON lines, one object per line with a `signature` list and, for building or
enrolling, a `label` (the MQTT motion payload has both fields, so captured payloads can be used
as they are). `build` makes a centroid file from labelled signatures, `enroll` adds one motion to
a centroid file from a handful of them, `classify_path` matches signatures against a file. The
centroid model itself lives in `edged.centroids`, which the device shares.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Iterable

import numpy as np

from edged.centroids import (  # noqa: F401  (re-exported: the cloud side's one import)
    DEFAULT_MARGIN, DEFAULT_QUANTILE, FORMAT, UNKNOWN, Centroids, Match, SignatureError, build_centroids,
    classify, enroll_centroid, load_centroids, nearest, save_centroids,
)


def read_signatures(path: str | Path, *, label_key: str | None = "label") -> tuple[np.ndarray, list[str | None]]:
    """Signatures (and labels, when `label_key` is given) from a JSON-lines file."""
    sig, labels, _ = read_signature_file(path, label_key=label_key)
    return sig, labels


def read_signature_file(path: str | Path, *, label_key: str | None = "label") -> tuple[np.ndarray, list[str | None], int]:
    """Signatures, labels and their signature version (each line's `sig_v`, 1 where absent).

    One file holds one version: signatures of two embeddings cannot be compared.
    """
    path = Path(path)
    sigs, labels, versions = [], [], set()
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise SignatureError(f"{path}: no such file") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SignatureError(f"{path}:{lineno}: not JSON: {exc.msg}") from None
        sig = rec.get("signature") if isinstance(rec, dict) else None
        if not isinstance(sig, list) or not sig or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in sig):
            raise SignatureError(f"{path}:{lineno}: signature: expected a non-empty list of numbers")
        if sigs and len(sig) != len(sigs[0]):
            raise SignatureError(f"{path}:{lineno}: signature: {len(sig)} values, earlier lines have {len(sigs[0])}")
        label = None
        if label_key is not None:
            label = rec.get(label_key)
            if not isinstance(label, str) or not label:
                raise SignatureError(f"{path}:{lineno}: {label_key}: expected a motion name")
        version = rec.get("sig_v", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise SignatureError(f"{path}:{lineno}: sig_v: expected an integer >= 1, got {version!r}")
        versions.add(version)
        if len(versions) > 1:
            raise SignatureError(f"{path}:{lineno}: sig_v: signature versions {sorted(versions)} in one file; "
                                 "signatures of different models cannot be compared")
        sigs.append(sig)
        labels.append(label)
    if not sigs:
        raise SignatureError(f"{path}: no signatures")
    return np.array(sigs, dtype=np.float64), labels, versions.pop()


def _check_version(cents: Centroids, version: int, signatures_path, centroids_path) -> None:
    if cents.signature_version != version:
        raise SignatureError(f"{signatures_path}: signature version {version}, but {centroids_path} holds "
                             f"version {cents.signature_version} centroids")


def build(signatures_path: str | Path, out_path: str | Path, *, label_key: str = "label",
          quantile: float = DEFAULT_QUANTILE, margin: float = DEFAULT_MARGIN) -> Centroids:
    """`edged signatures build`: labelled JSON-lines signatures → centroid file."""
    sig, labels, version = read_signature_file(signatures_path, label_key=label_key)
    cents = build_centroids(sig, labels, quantile=quantile, margin=margin)
    cents = replace(cents, signature_version=version)
    save_centroids(cents, out_path)
    return cents


def classify_path(centroids_path: str | Path, signatures_path: str | Path) -> list[Match]:
    """`edged signatures classify`: one Match per line of a JSON-lines signature file."""
    cents = load_centroids(centroids_path)
    sig, _, version = read_signature_file(signatures_path, label_key=None)
    _check_version(cents, version, signatures_path, centroids_path)
    if sig.shape[1] != cents.dim:
        raise SignatureError(f"{signatures_path}: signatures have {sig.shape[1]} values, "
                             f"{centroids_path} has {cents.dim}")
    return classify(cents, sig)


def enroll(centroids_path: str | Path, signatures_path: str | Path, out_path: str | Path, *,
           label: str | None = None, label_key: str = "label", replace: bool = False) -> Centroids:
    """`edged signatures enroll`: add a motion to a centroid file from a few labelled signatures.

    The motion's name is `label`, or else the one name all lines carry under `label_key`.
    """
    cents = load_centroids(centroids_path)
    sig, labels, version = read_signature_file(signatures_path, label_key=None if label else label_key)
    _check_version(cents, version, signatures_path, centroids_path)
    if label is None:
        names = sorted(set(labels))
        if len(names) != 1:
            raise SignatureError(f"{signatures_path}: {label_key}: one motion per enrollment, found {names} "
                                 "(or name it with --label)")
        label = names[0]
    if sig.shape[1] != cents.dim:
        raise SignatureError(f"{signatures_path}: signatures have {sig.shape[1]} values, "
                             f"{centroids_path} has {cents.dim}")
    new = enroll_centroid(cents, sig, label, replace=replace)
    save_centroids(new, out_path)
    return new


# Motion windows a device sent, as `edged ingest` stores them (docs/cloud.md): the signature, its
# version (absent before version 2: 1), oldest first.
_DB_WINDOWS = """
SELECT ARRAY(SELECT jsonb_array_elements_text(payload -> 'signature')::smallint),
       coalesce((payload ->> 'sig_v')::int, 1)
FROM results
WHERE kind = 'motion' AND device_id = %s AND ts >= to_timestamp(%s) AND ts <= to_timestamp(%s)
ORDER BY ts, seq
LIMIT %s
"""


def signatures_from_db(url: str, device_id: str, *, since: float = 0.0, until: float = 1e12,
                       limit: int = 1000) -> tuple[np.ndarray, int]:
    """The signatures (and their one version) of a device's motion windows between two times,
    from the PostgreSQL database `edged ingest` fills: "what pi-gym-3 did from 10:00:05 to
    10:00:20", the handful of windows an operator enrolls as a new motion."""
    if not url.startswith(("postgresql://", "postgres://")):
        raise SignatureError(f"--db: expected a PostgreSQL URL (postgresql://…), got {_safe_url(url)!r}")
    try:
        import psycopg
    except ImportError:
        raise SignatureError("reading signatures from a database needs psycopg: "
                             "pip install 'edged[cloud]'") from None
    try:
        with psycopg.connect(url, connect_timeout=10) as conn:
            rows = conn.execute(_DB_WINDOWS, (device_id, since, until, limit)).fetchall()
    except psycopg.Error as exc:
        raise SignatureError(f"{_safe_url(url)}: {str(exc).strip().splitlines()[0]}") from None
    where = f"{_safe_url(url)}: device {device_id!r}"
    if not rows:
        raise SignatureError(f"{where}: no motion windows between {since:.3f} and {until:.3f}")
    versions = sorted({v for _, v in rows})
    if len(versions) > 1:
        raise SignatureError(f"{where}: signature versions {versions} in that time range; "
                             "narrow it to one model's windows")
    if len({len(sig) for sig, _ in rows}) != 1:
        raise SignatureError(f"{where}: signatures of different lengths in that time range")
    return np.array([sig for sig, _ in rows], dtype=np.float64), versions[0]


def _safe_url(url: str) -> str:
    """A database URL without its password, for messages."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if not parts.password:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def enroll_from_db(centroids_path: str | Path, url: str, device_id: str, out_path: str | Path, *,
                   label: str, since: float = 0.0, until: float = 1e12, limit: int = 1000,
                   replace: bool = False) -> Centroids:
    """`edged signatures enroll --db`: add a motion from a device's stored windows."""
    cents = load_centroids(centroids_path)
    sig, version = signatures_from_db(url, device_id, since=since, until=until, limit=limit)
    _check_version(cents, version, f"device {device_id!r}", centroids_path)
    if sig.shape[1] != cents.dim:
        raise SignatureError(f"device {device_id!r}: signatures have {sig.shape[1]} values, "
                             f"{centroids_path} has {cents.dim}")
    new = enroll_centroid(cents, sig, label, replace=replace)
    save_centroids(new, out_path)
    return new


def accuracy(matches: Iterable[Match], truth: Iterable[str]) -> float:
    pairs = list(zip(matches, truth))
    return sum(m.label == t for m, t in pairs) / max(1, len(pairs))
