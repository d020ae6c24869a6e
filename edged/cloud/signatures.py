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
from dataclasses import dataclass, replace
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
    if label is None:
        names = sorted(set(labels))
        if len(names) != 1:
            raise SignatureError(f"{signatures_path}: {label_key}: one motion per enrollment, found {names} "
                                 "(or name it with --label)")
        label = names[0]
    return _enroll_into(cents, sig, version, label, signatures_path, centroids_path, out_path, replace)


# Motion windows as `edged ingest` (or `edged subscribe`) stores them (docs/cloud.md): device,
# seq, time, the device's label, the signature and its version (absent before version 2: 1),
# oldest first. One query per store; the device is optional (None: every device).
_PG_WINDOWS = """
SELECT device_id, seq, extract(epoch FROM ts)::float8, payload ->> 'label',
       ARRAY(SELECT jsonb_array_elements_text(payload -> 'signature')::smallint),
       coalesce((payload ->> 'sig_v')::int, 1)
FROM results
WHERE kind = 'motion' AND (%(device)s::text IS NULL OR device_id = %(device)s)
  AND ts >= to_timestamp(%(since)s) AND ts <= to_timestamp(%(until)s)
ORDER BY ts, device_id, seq
LIMIT %(limit)s
"""

_SQLITE_WINDOWS = """
SELECT device_id, seq, ts, json_extract(payload, '$.label'), json_extract(payload, '$.signature'),
       coalesce(json_extract(payload, '$.sig_v'), 1)
FROM results
WHERE kind = 'motion' AND (:device IS NULL OR device_id = :device) AND ts >= :since AND ts <= :until
ORDER BY ts, device_id, seq
LIMIT :limit
"""


@dataclass(frozen=True)
class Windows:
    """Stored motion windows: their signatures (one version, one length) and where each came from."""

    signatures: np.ndarray
    version: int
    devices: list[str]
    seqs: list[int]
    ts: list[float]
    labels: list[str]  # the device's label for each window


def windows_from_db(url: str, device_id: str | None = None, *, since: float = 0.0, until: float = 1e12,
                    limit: int = 1000, labelled: bool = False) -> Windows:
    """The motion windows `edged ingest` stored (PostgreSQL URL or sqlite:///FILE) of one device
    or of all, between two times, oldest first. `labelled`: only those the device gave a motion's
    label (not 'unknown'), for building centroids."""
    params = {"device": device_id, "since": since, "until": until, "limit": limit}
    if url.startswith("sqlite:///"):
        rows = _sqlite_rows(url, params)
    elif url.startswith(("postgresql://", "postgres://")):
        rows = _pg_rows(url, params)
    else:
        raise SignatureError(f"--db: expected a PostgreSQL URL (postgresql://…) or sqlite:///FILE, "
                             f"got {_safe_url(url)!r}")
    where = f"{_safe_url(url)}: " + (f"device {device_id!r}" if device_id else "all devices")
    if labelled:
        rows = [r for r in rows if isinstance(r[3], str) and r[3] and r[3] != UNKNOWN]
    if not rows:
        raise SignatureError(f"{where}: no {'labelled ' if labelled else ''}motion windows "
                             f"between {since:.3f} and {until:.3f}")
    versions = sorted({r[5] for r in rows})
    if len(versions) > 1:
        raise SignatureError(f"{where}: signature versions {versions} in that time range; "
                             "narrow it to one model's windows")
    if len({len(r[4]) for r in rows}) != 1:
        raise SignatureError(f"{where}: signatures of different lengths in that time range")
    return Windows(np.array([r[4] for r in rows], dtype=np.float64), versions[0], [r[0] for r in rows],
                   [r[1] for r in rows], [float(r[2]) for r in rows], [r[3] for r in rows])


def _pg_rows(url: str, params: dict) -> list[tuple]:
    try:
        import psycopg
    except ImportError:
        raise SignatureError("reading signatures from PostgreSQL needs psycopg: pip install 'edged[cloud]'") from None
    try:
        with psycopg.connect(url, connect_timeout=10) as conn:
            return conn.execute(_PG_WINDOWS, params).fetchall()
    except psycopg.Error as exc:
        raise SignatureError(f"{_safe_url(url)}: {str(exc).strip().splitlines()[0]}") from None


def _sqlite_rows(url: str, params: dict) -> list[tuple]:
    import sqlite3

    from edged.cloud.sqlite_store import path_of

    path = path_of(url)
    if not path.is_file():  # sqlite3 would make an empty one
        raise SignatureError(f"{url}: no such file")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = conn.execute(_SQLITE_WINDOWS, params).fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise SignatureError(f"{url}: {exc}") from None
    out = []
    for device, seq, ts, label, sig, version in rows:
        try:
            sig = json.loads(sig)
        except (TypeError, ValueError):
            raise SignatureError(f"{url}: device {device!r} seq {seq}: the stored signature is not JSON") from None
        out.append((device, seq, ts, label, sig, version))
    return out


def signatures_from_db(url: str, device_id: str, *, since: float = 0.0, until: float = 1e12,
                       limit: int = 1000) -> tuple[np.ndarray, int]:
    """The signatures (and their one version) of a device's motion windows between two times:
    "what pi-gym-3 did from 10:00:05 to 10:00:20", the handful an operator enrolls as a new motion."""
    w = windows_from_db(url, device_id, since=since, until=until, limit=limit)
    return w.signatures, w.version


def _safe_url(url: str) -> str:
    """A database URL without its password, for messages."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if not parts.password:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _enroll_into(cents: Centroids, sig: np.ndarray, version: int, label: str, source, centroids_path,
                 out_path, replace: bool) -> Centroids:
    _check_version(cents, version, source, centroids_path)
    if sig.shape[1] != cents.dim:
        raise SignatureError(f"{source}: signatures have {sig.shape[1]} values, {centroids_path} has {cents.dim}")
    new = enroll_centroid(cents, sig, label, replace=replace)
    save_centroids(new, out_path)
    return new


def enroll_from_db(centroids_path: str | Path, url: str, device_id: str, out_path: str | Path, *,
                   label: str, since: float = 0.0, until: float = 1e12, limit: int = 1000,
                   replace: bool = False) -> Centroids:
    """`edged signatures enroll --db`: add a motion from a device's stored windows."""
    cents = load_centroids(centroids_path)
    sig, version = signatures_from_db(url, device_id, since=since, until=until, limit=limit)
    return _enroll_into(cents, sig, version, label, f"device {device_id!r}", centroids_path, out_path, replace)


def build_from_db(url: str, out_path: str | Path, *, device_id: str | None = None, since: float = 0.0,
                  until: float = 1e12, limit: int = 100000, quantile: float = DEFAULT_QUANTILE,
                  margin: float = DEFAULT_MARGIN) -> Centroids:
    """`edged signatures build --db`: centroids from stored motion windows and the labels their
    devices gave them ('unknown' ones left out)."""
    w = windows_from_db(url, device_id, since=since, until=until, limit=limit, labelled=True)
    cents = replace(build_centroids(w.signatures, w.labels, quantile=quantile, margin=margin),
                    signature_version=w.version)
    save_centroids(cents, out_path)
    return cents


def classify_from_db(centroids_path: str | Path, url: str, *, device_id: str | None = None, since: float = 0.0,
                     until: float = 1e12, limit: int = 100000) -> tuple[Windows, list[Match]]:
    """`edged signatures classify --db`: each stored motion window against a centroid file."""
    cents = load_centroids(centroids_path)
    w = windows_from_db(url, device_id, since=since, until=until, limit=limit)
    source = f"{_safe_url(url)}: " + (f"device {device_id!r}" if device_id else "all devices")
    _check_version(cents, w.version, source, centroids_path)
    if w.signatures.shape[1] != cents.dim:
        raise SignatureError(f"{source}: signatures have {w.signatures.shape[1]} values, "
                             f"{centroids_path} has {cents.dim}")
    return w, classify(cents, w.signatures)


def accuracy(matches: Iterable[Match], truth: Iterable[str]) -> float:
    pairs = list(zip(matches, truth))
    return sum(m.label == t for m, t in pairs) / max(1, len(pairs))
