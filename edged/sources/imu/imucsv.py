"""IMU recordings as CSV files: the `t,ax,ay,az,gx,gy,gz` format edged replays and ships as demo data.

One row per sample: `t` in seconds (any origin, strictly increasing), acceleration in m/s²
(gravity included or not, as the chip reported it) and angular rate in rad/s. A file that does
not follow this is refused with one line naming the file, the line and what is wrong.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np

from edged.records import IMU_CHANNELS, ImuBatch

HEADER = ("t",) + IMU_CHANNELS


class ImuCsvError(ValueError):
    """An IMU CSV file that cannot be used, worded for the user (one line: file:line: what)."""


# The largest magnitude a float32 holds: a value beyond it would become inf in the batch.
_F32_MAX = float(np.finfo(np.float32).max)
# Recordings are read whole; one bigger than this is not a recording edged can replay.
MAX_FILE_BYTES = 1 << 30


def read_imu_csv(path: str | Path) -> ImuBatch:
    """Read a whole IMU CSV file into one `ImuBatch` (t float64, data float32 in IMU_CHANNELS order)."""
    path = Path(path)
    text = _read_text(path)
    # Lines end at \n, \r\n or \r, as the file would be read in text mode.
    lines = io.StringIO(text, newline="").readlines()
    _check_header(path, lines[0] if lines else "")
    try:
        # The fast path: numpy parses the whole body in C. Only when it fails do we walk the
        # lines in Python, to say which line is wrong.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "no data": reported below
            rows = np.loadtxt(lines[1:], delimiter=",", dtype=np.float64, ndmin=2)
    except ValueError:
        rows = None
    if rows is None:
        _raise_first_bad_line(path, lines)
    if rows.size == 0:
        raise ImuCsvError(f"{path}: no samples after the header")
    if rows.shape[1] != len(HEADER):
        _raise_first_bad_line(path, lines)
    if not np.isfinite(rows).all():
        bad_row = int(np.flatnonzero(~np.isfinite(rows).all(axis=1))[0])
        bad_col = int(np.flatnonzero(~np.isfinite(rows[bad_row]))[0])
        raise ImuCsvError(f"{path}:{_line_of_row(lines, bad_row)}: {HEADER[bad_col]}: "
                          f"value is not finite ({rows[bad_row, bad_col]})")
    big = np.abs(rows[:, 1:]) > _F32_MAX
    if big.any():
        bad_row = int(np.flatnonzero(big.any(axis=1))[0])
        bad_col = int(np.flatnonzero(big[bad_row])[0]) + 1
        raise ImuCsvError(f"{path}:{_line_of_row(lines, bad_row)}: {HEADER[bad_col]}: "
                          f"value out of range ({rows[bad_row, bad_col]:g}; at most ±{_F32_MAX:.3g})")
    t = rows[:, 0].copy()
    steps = np.diff(t)
    if (steps <= 0).any():
        k = int(np.flatnonzero(steps <= 0)[0]) + 1
        raise ImuCsvError(f"{path}:{_line_of_row(lines, k)}: t: {t[k]:g} is not after the previous "
                          f"sample's {t[k - 1]:g} (timestamps must increase)")
    data = np.ascontiguousarray(rows[:, 1:], dtype=np.float32)
    return ImuBatch(t=t, data=data)


def _read_text(path: Path) -> str:
    """The file's text, read once. Not a regular file, not UTF-8: refused with one line."""
    import os
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ImuCsvError(f"{path}: no such file") from None
    except OSError as exc:
        raise ImuCsvError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImuCsvError(f"{path}: not a regular file (expected CSV with header {','.join(HEADER)})")
        if st.st_size > MAX_FILE_BYTES:
            raise ImuCsvError(f"{path}: too large ({st.st_size} bytes, at most {MAX_FILE_BYTES})")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ImuCsvError(f"{path}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ImuCsvError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {col}; "
                          f"expected CSV with header {','.join(HEADER)})") from None


def write_imu_csv(path: str | Path, t: np.ndarray, data: np.ndarray, *, decimals: int = 6) -> None:
    """Write samples in the format `read_imu_csv` reads (used to make demo and test recordings)."""
    t = np.asarray(t, dtype=np.float64)
    data = np.asarray(data, dtype=np.float64)
    if data.ndim != 2 or data.shape[1] != len(IMU_CHANNELS) or len(t) != len(data):
        raise ValueError(f"expected t (N,) and data (N, {len(IMU_CHANNELS)}), got {t.shape} and {data.shape}")
    np.savetxt(path, np.column_stack([t, data]), delimiter=",", header=",".join(HEADER), comments="",
               fmt=f"%.{decimals}f")


def _check_header(path: Path, header: str) -> None:
    names = [h.strip() for h in header.strip().lstrip("\ufeff").split(",")]
    if tuple(names) != HEADER:
        got = header.strip() or "an empty line"
        raise ImuCsvError(f"{path}:1: header must be {','.join(HEADER)}, got {got[:80]!r}")


def _raise_first_bad_line(path: Path, lines: list[str]) -> None:
    for lineno, line in enumerate(lines[1:], start=2):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        fields = text.split(",")
        if len(fields) != len(HEADER):
            raise ImuCsvError(f"{path}:{lineno}: expected {len(HEADER)} comma-separated values "
                              f"({','.join(HEADER)}), got {len(fields)}")
        for name, field in zip(HEADER, fields):
            try:
                value = float(field)
            except ValueError:
                raise ImuCsvError(f"{path}:{lineno}: {name}: not a number: {field.strip()[:40]!r}") from None
            if not math.isfinite(value):
                raise ImuCsvError(f"{path}:{lineno}: {name}: value is not finite ({field.strip()[:40]})")
    raise ImuCsvError(f"{path}: cannot parse as CSV with header {','.join(HEADER)}")


def _line_of_row(lines: list[str], row: int) -> int:
    """The 1-based file line of data row `row` (0-based), skipping blank and comment lines as loadtxt does."""
    seen = -1
    for lineno, line in enumerate(lines[1:], start=2):
        text = line.strip()
        if text and not text.startswith("#"):
            seen += 1
            if seen == row:
                return lineno
    return 0
