"""The fake I²C bus, the chip base class (register file, FIFO, sample grid), clocks and motions."""

from __future__ import annotations

import ctypes
import errno
import math
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from edged.sources.imu import STANDARD_GRAVITY, SYSTEM_CLOCK

Motion = Callable[[np.ndarray], np.ndarray]  # times (n,) in seconds -> (n, 6) m/s² and rad/s

_I2C_M_RD = 0x0001


# --- clocks and motion ---------------------------------------------------------------------------

class SimClock:
    """Simulated time: `sleep` advances it at once, so a test of minutes runs in milliseconds."""

    def __init__(self, start: float = 1_790_000_000.0) -> None:
        self._start = start
        self._now = start
        self._lock = threading.Lock()

    def time(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._now - self._start + 1000.0

    def sleep(self, seconds: float, stop: threading.Event | None = None) -> bool:
        if stop is not None and stop.is_set():
            return True
        self.advance(max(0.0, seconds))
        return False

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


def synthetic_motion(tilt_deg: float = 25.0) -> Motion:
    """Gravity tilted about X by `tilt_deg`, plus sinusoids on every axis (well inside ±4 g, ±500 °/s)."""
    tilt = math.radians(tilt_deg)
    g = STANDARD_GRAVITY

    def motion(t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        out = np.empty((len(t), 6))
        out[:, 0] = 1.5 * np.sin(2 * np.pi * 1.3 * t)
        out[:, 1] = g * math.sin(tilt) + 0.8 * np.sin(2 * np.pi * 0.7 * t + 1.0)
        out[:, 2] = g * math.cos(tilt) + 0.5 * np.cos(2 * np.pi * 2.1 * t)
        out[:, 3] = 0.6 * np.sin(2 * np.pi * 0.5 * t)
        out[:, 4] = 0.3 * np.cos(2 * np.pi * 1.1 * t)
        out[:, 5] = -0.4 * np.sin(2 * np.pi * 1.9 * t + 0.3)
        return out

    return motion


def csv_motion(path: str | Path, start: float = 0.0) -> Motion:
    """A recording, linearly interpolated and looped; time `start` plays its first sample."""
    from edged.sources.imu.imucsv import read_imu_csv

    rec = read_imu_csv(path)
    t = rec.t - rec.t[0]
    data = rec.data.astype(np.float64)
    step = float(np.median(np.diff(t))) if len(t) > 1 else 0.01
    duration = float(t[-1]) + step
    # close the loop so interpolation runs from the last sample back to the first
    t = np.append(t, duration)
    data = np.vstack([data, data[:1]])

    def motion(times: np.ndarray) -> np.ndarray:
        pos = np.mod(np.asarray(times, dtype=np.float64) - start, duration)
        out = np.empty((len(pos), 6))
        for c in range(6):  # six channels, each interpolated in C
            out[:, c] = np.interp(pos, t, data[:, c])
        return out

    return motion


# --- the bus --------------------------------------------------------------------------------------

class FakeBus:
    """An I²C bus with fake chips on it, answering the smbus2.SMBus calls."""

    def __init__(self, number: int = 1) -> None:
        self.number = number
        self.devices: dict[int, FakeChip] = {}
        self.transfers = 0          # bus transactions, to check that reads come in bursts
        self.bytes_read = 0
        self.closed = False
        self._faults: list[list] = []  # [count, register or None, errno]
        self._hooks: list[list] = []   # [count, register, action]
        self._lost_writes: list[list] = []  # [count, register or None]
        self.writes_lost = 0
        self._lock = threading.RLock()

    def attach(self, address: int, chip: FakeChip) -> FakeChip:
        self.devices[address] = chip
        return chip

    def fail_reads(self, count: int = 1, *, register: int | None = None, err: int = errno.EREMOTEIO) -> None:
        """Make the next `count` reads (of `register` only, if given) raise OSError(err)."""
        self._faults.append([count, register, err])

    def lose_writes(self, count: int = 1, *, register: int | None = None) -> None:
        """Make the next `count` writes (to `register` only, if given) vanish: acknowledged on the
        bus but never taking effect in the chip, as a write the chip ignores does."""
        self._lost_writes.append([count, register])

    def _write_lost(self, register: int) -> bool:
        for f in self._lost_writes:
            if f[1] is None or f[1] == register:
                f[0] -= 1
                if f[0] <= 0:
                    self._lost_writes.remove(f)
                self.writes_lost += 1
                return True
        return False

    def before_reads(self, register: int, action: Callable[[], None], count: int = 1) -> None:
        """Call `action()` just before each of the next `count` reads of `register` is answered:
        e.g. advance a `SimClock` between two transfers of the driver, as a reader thread that
        loses the CPU between them would see it."""
        self._hooks.append([count, register, action])

    def _run_hooks(self, register: int) -> None:
        for h in list(self._hooks):
            if h[1] == register:
                h[0] -= 1
                if h[0] <= 0:
                    self._hooks.remove(h)
                h[2]()

    def _device(self, addr: int) -> FakeChip:
        if self.closed:
            raise OSError(errno.EBADF, "Bad file descriptor")
        dev = self.devices.get(addr)
        if dev is None:
            raise OSError(errno.EREMOTEIO, "Remote I/O error")
        return dev

    def _maybe_fail(self, register: int) -> None:
        for f in self._faults:
            if f[1] is None or f[1] == register:
                f[0] -= 1
                if f[0] <= 0:
                    self._faults.remove(f)
                raise OSError(f[2], "Remote I/O error" if f[2] == errno.EREMOTEIO else "I/O error")

    # SMBus API -------------------------------------------------------------------------------
    def read_byte_data(self, i2c_addr: int, register: int, force=None) -> int:
        with self._lock:
            dev = self._device(i2c_addr)
            self.transfers += 1
            self._run_hooks(register)
            self._maybe_fail(register)
            self.bytes_read += 1
            return dev.read_block(register, 1)[0]

    def write_byte_data(self, i2c_addr: int, register: int, value: int, force=None) -> None:
        with self._lock:
            dev = self._device(i2c_addr)
            self.transfers += 1
            if not self._write_lost(register):
                dev.write(register, value & 0xFF)

    def read_i2c_block_data(self, i2c_addr: int, register: int, length: int, force=None) -> list[int]:
        if length > 32:
            raise ValueError("Desired block length over 32 bytes")
        with self._lock:
            dev = self._device(i2c_addr)
            self.transfers += 1
            self._run_hooks(register)
            self._maybe_fail(register)
            self.bytes_read += length
            return list(dev.read_block(register, length))

    def write_i2c_block_data(self, i2c_addr: int, register: int, data, force=None) -> None:
        with self._lock:
            dev = self._device(i2c_addr)
            self.transfers += 1
            for i, v in enumerate(data):
                dev.write(register + i, int(v) & 0xFF)

    def i2c_rdwr(self, *msgs) -> None:
        """Combined transfer: a 1-byte write sets the register, a read then streams from it."""
        with self._lock:
            self.transfers += 1
            register = None
            for m in msgs:
                dev = self._device(m.addr)
                if m.flags & _I2C_M_RD:
                    if register is None:
                        raise OSError(errno.EINVAL, "read without a register address")
                    self._run_hooks(register)
                    self._maybe_fail(register)
                    data = dev.read_block(register, m.len)
                    ctypes.memmove(m.buf, data, m.len)
                    self.bytes_read += m.len
                else:
                    payload = ctypes.string_at(m.buf, m.len)
                    register = payload[0]
                    for i, v in enumerate(payload[1:]):
                        dev.write(register + i, v)

    def close(self) -> None:
        self.closed = True


class FakeChip:
    """Register file + FIFO + sample grid. Subclasses give the chip's registers and encoding."""

    ID_REGISTER = 0
    DEFAULTS: dict[int, int] = {}
    FIFO_CAPACITY = 1024   # bytes

    def __init__(self, clock=None, motion: Motion | None = None, *, who_am_i: int | None = None,
                 odr_error: float = 0.0, record: bool = False) -> None:
        self.clock = clock or SYSTEM_CLOCK
        self.motion = motion or synthetic_motion()
        self.who_am_i = who_am_i if who_am_i is not None else self.DEFAULTS[self.ID_REGISTER]
        self.odr_error = odr_error
        self.record = record
        self.regs = bytearray(256)
        self.fifo = bytearray()
        self.pushed = 0             # samples written into the FIFO since power-on
        self.overwritten = 0        # samples (or their bytes) pushed out by newer ones
        self.fifo_resets = 0
        self.pushed_at_reset: list[int] = []   # `pushed` at each FIFO reset, for tests
        self.log_t: list[np.ndarray] = []      # true sample times, when `record`
        self._grid = None           # (t0, rate) of the running sample grid, or None
        self._next = 1              # next grid index to produce
        self._slot = 1
        self._power_on()

    # registers -------------------------------------------------------------------------------
    def _power_on(self) -> None:
        self.regs[:] = bytes(256)
        for reg, value in self.DEFAULTS.items():
            self.regs[reg] = value
        self.regs[self.ID_REGISTER] = self.who_am_i
        self.fifo.clear()
        self._grid = None

    def read_block(self, register: int, n: int) -> bytes:
        self.update()
        return bytes(self.read_register(register + i) for i in range(n))

    def read_register(self, reg: int) -> int:
        return self.regs[reg & 0xFF]

    def write(self, reg: int, value: int) -> None:
        self.update()
        before = self.sampling()
        self.write_register(reg, value)
        after = self.sampling()
        if after != before:
            self._grid = (self.clock.time(), after[0]) if after else None
            self._next = 1

    def write_register(self, reg: int, value: int) -> None:
        if reg != self.ID_REGISTER:
            self.regs[reg] = value

    # sampling ----------------------------------------------------------------------------------
    def sampling(self) -> tuple | None:
        """(rate_hz, whatever else restarts the sample grid when it changes) while sampling, else
        None. Ranges and FIFO settings do not: they change what is stored, not when."""
        raise NotImplementedError

    def collecting(self) -> bool:
        """Whether produced samples enter the FIFO (sampling can run with the FIFO off)."""
        return True

    def encode(self, si: np.ndarray, t: np.ndarray) -> bytes:
        """(n, 6) SI samples taken at times `t` -> the FIFO bytes of those n samples."""
        raise NotImplementedError

    def frame_bytes(self) -> int:
        raise NotImplementedError

    def push(self, data: bytes, n: int) -> None:
        """Append n encoded samples; on overflow drop the oldest, byte- or frame-wise per chip."""
        self.fifo += data
        excess = len(self.fifo) - self.FIFO_CAPACITY
        if excess > 0:
            del self.fifo[:excess]
            self.on_overflow(excess)

    def on_overflow(self, dropped_bytes: int) -> None:
        self.overwritten += math.ceil(dropped_bytes / self.frame_bytes())

    def update(self) -> None:
        """Produce every sample due on the grid up to now."""
        if self._grid is None:
            return
        t0, rate = self._grid
        true_rate = rate * (1.0 + self.odr_error)
        due = math.floor((self.clock.time() - t0) * true_rate + 1e-9)
        if due < self._next:
            return
        first, self._next = self._next, due + 1
        if not self.collecting():
            return
        # Samples older than what the FIFO can hold would be overwritten anyway: produce only the
        # newest ones, but count all.
        keep = self.FIFO_CAPACITY // self.frame_bytes() + 2
        skipped = max(0, due - first + 1 - keep)
        if skipped:
            self.pushed += skipped
            self.overwritten += skipped
            if self.record:
                self.log_t.append(t0 + np.arange(first, first + skipped) / true_rate)
            first += skipped
        self._slot = first                     # grid index of the first sample being encoded
        t = t0 + np.arange(first, due + 1) / true_rate
        if self.record:
            self.log_t.append(t)
        self.pushed += len(t)
        self.push(self.encode(self.motion(t), t), len(t))

    def clear_fifo(self) -> None:
        self.fifo.clear()
        self.fifo_resets += 1
        self.pushed_at_reset.append(self.pushed)

    def true_times(self) -> np.ndarray:
        """Times of all samples pushed so far (needs `record=True`)."""
        return np.concatenate(self.log_t) if self.log_t else np.empty(0)

    @staticmethod
    def quantise(values: np.ndarray, lsb: float) -> np.ndarray:
        return np.clip(np.rint(values / lsb), -32768, 32767).astype(np.int16)
