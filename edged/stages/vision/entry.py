"""Values from a model's manifest entry, checked, with errors that name the manifest key."""

from __future__ import annotations

from typing import Any

import numpy as np

from edged.models import ModelEntry, ModelError


def where(entry: ModelEntry, key: str) -> str:
    return f"{entry.manifest or entry.path.parent / 'manifest.toml'}: models.{entry.name}.{key}"


def number(entry: ModelEntry, table: dict, section: str, key: str, default: Any = None, *,
         lo: float | None = None, hi: float | None = None) -> float:
    value = table.get(key, default)
    if value is None:
        raise ModelError(f"{where(entry, section)}.{key}: missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelError(f"{where(entry, section)}.{key}: expected a number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ModelError(f"{where(entry, section)}.{key}: expected {lo}..{hi}, got {value!r}")
    return float(value)


def per_channel(entry: ModelEntry, key: str, value: Any) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, 3)
    if arr.size != 3 or not np.all(np.isfinite(arr)):
        raise ModelError(f"{where(entry, 'input')}.{key}: expected a number or 3 numbers, got {value!r}")
    return arr


def per4(entry: ModelEntry, key: str, value: Any) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float32).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, 4)
    if arr.size != 4 or np.any(arr == 0):
        raise ModelError(f"{where(entry, 'params')}.{key}: expected 1 or 4 non-zero numbers, got {value!r}")
    return arr
