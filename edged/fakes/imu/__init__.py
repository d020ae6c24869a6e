"""Fake I²C buses with emulated IMU chips, for tests and for running edged without the hardware.

A `FakeBus` answers the smbus2.SMBus calls the drivers make (`read_byte_data`, `write_byte_data`,
`read_i2c_block_data`, `write_i2c_block_data`, `i2c_rdwr`) for the chips attached to it, and
raises OSError(EREMOTEIO) — what a Raspberry Pi reports for a NACK — for any other address. Each
fake chip keeps a register file and a FIFO written from its own datasheet (scale factors, byte
order, frame layout, reset values, overflow behaviour), independently of the driver code:

- samples fall on the chip's own sample grid, which starts when sampling is configured and runs
  on regardless of FIFO resets (as on the real parts: the first sample after a reset comes at
  the next tick), at the configured rate times (1 + `odr_error`);
- each sample is the motion signal at that instant, quantised with the configured full scale
  and saturated at it; the motion is synthetic (gravity at a tilt plus slow sinusoids) or a
  recorded CSV (`t,ax,ay,az,gx,gy,gz`), replayed in a loop;
- time comes from a clock: `SimClock` for fast deterministic tests (sleeping advances it), the
  system clock for demos;
- faults on demand: OSError on the next reads (optionally only of one register), a wrong
  WHO_AM_I, a FIFO left unread until it overflows, time that jumps just before a given register
  is read (`FakeBus.before_reads`).

What is not emulated: the digital filters (samples are exact values of the motion), the data
output registers (read as 0), BMI160 header mode, FIFO decimation, and the temperature
sensor beyond a constant value.

Select a fake through the source's `smbus_factory`, e.g.
`ImuSource(chip="auto", smbus_factory=make_factory("mpu6050", motion_csv=path))`; everything above
the bus is production code.
"""

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
        self._lock = threading.RLock()

    def attach(self, address: int, chip: FakeChip) -> FakeChip:
        self.devices[address] = chip
        return chip

    def fail_reads(self, count: int = 1, *, register: int | None = None, err: int = errno.EREMOTEIO) -> None:
        """Make the next `count` reads (of `register` only, if given) raise OSError(err)."""
        self._faults.append([count, register, err])

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


# --- chips ----------------------------------------------------------------------------------------

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


class FakeMpu6050(FakeChip):
    """MPU-6050 (WHO_AM_I 0x68), MPU-6500 (0x70) or MPU-9250 (0x71), per RM-MPU-6000A-00 rev 4.2
    and RM-MPU-6500A-00 rev 2.1: big-endian FIFO frames in register order, count latched by
    FIFO_COUNTH, FIFO_OFLOW_INT when enabled, oldest bytes dropped on overflow."""

    ID_REGISTER = 0x75
    DEFAULTS = {0x6B: 0x40, 0x75: 0x68}  # PWR_MGMT_1: SLEEP; WHO_AM_I
    ACCEL_LSB_PER_G = (16384.0, 8192.0, 4096.0, 2048.0)   # AFS_SEL 0..3
    GYRO_LSB_PER_DPS = (131.0, 65.5, 32.8, 16.4)          # FS_SEL 0..3
    TEMP_RAW = -3920  # about 25 °C: T = raw / 340 + 36.53 on the MPU-6050

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.FIFO_CAPACITY = 1024 if self.who_am_i == 0x68 else 512
        self._count_latch = 0
        self._last_fifo_byte = 0

    def sampling(self):
        asleep = self.regs[0x6B] & 0x40
        if asleep:
            return None
        dlpf = self.regs[0x1A] & 0x07
        internal = 8000.0 if dlpf in (0, 7) else 1000.0
        return (internal / (1 + self.regs[0x19]),)

    def collecting(self) -> bool:
        return bool(self.regs[0x6A] & 0x40) and self.regs[0x23] != 0

    def frame_bytes(self) -> int:
        en = self.regs[0x23]
        return 6 * bool(en & 0x08) + 2 * bool(en & 0x80) + 2 * bin(en & 0x70).count("1") or 1

    def encode(self, si, t):
        en = self.regs[0x23]
        a_lsb = STANDARD_GRAVITY / self.ACCEL_LSB_PER_G[(self.regs[0x1C] >> 3) & 3]
        g_lsb = math.radians(1.0) / self.GYRO_LSB_PER_DPS[(self.regs[0x1B] >> 3) & 3]
        cols = []
        if en & 0x08:
            cols.append(self.quantise(si[:, :3], a_lsb))
        if en & 0x80:
            cols.append(np.full((len(si), 1), self.TEMP_RAW, np.int16))
        for axis, bit in enumerate((0x40, 0x20, 0x10)):
            if en & bit:
                cols.append(self.quantise(si[:, 3 + axis:4 + axis], g_lsb))
        return np.hstack(cols).astype(">i2").tobytes()

    def on_overflow(self, dropped_bytes):
        super().on_overflow(dropped_bytes)
        if self.regs[0x38] & 0x10:           # FIFO_OFLOW_EN
            self.regs[0x3A] |= 0x10          # FIFO_OFLOW_INT

    def write_register(self, reg, value):
        if reg == 0x6B and value & 0x80:     # DEVICE_RESET
            self._power_on()
            return
        if reg == 0x6A:
            if value & 0x04 and not value & 0x40:  # FIFO_RESET acts only with FIFO_EN = 0
                self.clear_fifo()
            value &= ~0x04 & 0xFF                 # self-clearing
        if reg in (0x3A, 0x72, 0x73):             # read-only
            return
        super().write_register(reg, value)

    def read_register(self, reg):
        if reg == 0x3A:                      # INT_STATUS clears on read
            value = self.regs[0x3A]
            self.regs[0x3A] = 0
            return value
        if reg == 0x72:
            self._count_latch = len(self.fifo)
            return (self._count_latch >> 8) & 0x1F
        if reg == 0x73:
            return self._count_latch & 0xFF
        if reg == 0x74:                      # FIFO_R_W: an empty FIFO repeats the last byte
            if self.fifo:
                self._last_fifo_byte = self.fifo.pop(0)
            return self._last_fifo_byte
        return super().read_register(reg)

    def read_block(self, register, n):
        if register == 0x74:                 # the address stays on FIFO_R_W: a burst drains the FIFO
            self.update()
            k = min(n, len(self.fifo))
            out = bytes(self.fifo[:k])
            del self.fifo[:k]
            if k:
                self._last_fifo_byte = out[-1]
            return out + bytes([self._last_fifo_byte]) * (n - k)
        return super().read_block(register, n)


_ST_ODR = {1: 12.5, 2: 26.0, 3: 52.0, 4: 104.0, 5: 208.0, 6: 416.0, 7: 833.0, 8: 1660.0,
           9: 3330.0, 10: 6660.0}
_ST_ACCEL_MG = {0b00: 0.061, 0b10: 0.122, 0b11: 0.244, 0b01: 0.488}   # FS_XL -> mg/LSB
_ST_GYRO_MDPS = {0b00: 8.75, 0b01: 17.50, 0b10: 35.0, 0b11: 70.0}     # FS_G -> mdps/LSB


class _FakeSt(FakeChip):
    ID_REGISTER = 0x0F

    def _lsb(self) -> tuple[float, float]:
        a = _ST_ACCEL_MG[(self.regs[0x10] >> 2) & 3] * 1e-3 * STANDARD_GRAVITY
        ctrl2 = self.regs[0x11]
        mdps = 4.375 if ctrl2 & 0x02 else _ST_GYRO_MDPS[(ctrl2 >> 2) & 3]
        return a, math.radians(mdps * 1e-3)

    def write_register(self, reg, value):
        if reg == 0x12 and value & 0x01:          # SW_RESET: registers to defaults, self-clearing
            self._power_on()
            return
        super().write_register(reg, value)

    def read_block(self, register, n):
        if not self.regs[0x12] & 0x04:            # IF_INC off: a burst repeats one register
            self.update()
            return bytes([self.read_register(register)]) * n
        return super().read_block(register, n)


class FakeLsm6ds3(_FakeSt):
    """LSM6DS3 (WHO_AM_I 0x69, 8 kbyte FIFO) or LSM6DSL/LSM6DS3TR-C (0x6A, 4 kbyte): FIFO of
    16-bit words in a gyro XYZ, accel XYZ pattern; continuous mode drops the oldest words."""

    DEFAULTS = {0x0F: 0x69, 0x12: 0x04}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.FIFO_CAPACITY = 8192 if self.who_am_i == 0x69 else 4096
        self._head = 0          # pattern position of the oldest word in the FIFO
        self._overrun = False

    def _pattern(self) -> tuple[bool, bool]:
        gyro = (self.regs[0x08] >> 3) & 7 and self.regs[0x11] >> 4
        accel = self.regs[0x08] & 7 and self.regs[0x10] >> 4
        return bool(gyro), bool(accel)

    def sampling(self):
        odr = (self.regs[0x0A] >> 3) & 0xF       # ODR_FIFO paces the FIFO writes
        gyro, accel = self._pattern()
        if odr not in _ST_ODR or not (gyro or accel):
            return None
        return (_ST_ODR[odr], gyro, accel)

    def collecting(self):
        return self.regs[0x0A] & 7 != 0

    def frame_bytes(self):
        return 6 * sum(self._pattern()) or 2

    def encode(self, si, t):
        a_lsb, g_lsb = self._lsb()
        gyro, accel = self._pattern()
        cols = ([self.quantise(si[:, 3:], g_lsb)] if gyro else []) + ([self.quantise(si[:, :3], a_lsb)] if accel else [])
        return np.hstack(cols).astype("<i2").tobytes()

    def push(self, data, n):
        self.fifo += data
        excess = len(self.fifo) - self.FIFO_CAPACITY
        if excess > 0:
            if self.regs[0x0A] & 7 == 0b001:     # FIFO mode: stop when full, keep the oldest
                del self.fifo[self.FIFO_CAPACITY:]
            else:                                # continuous: whole oldest words go
                del self.fifo[:excess]
                self._head = (self._head + excess // 2) % (self.frame_bytes() // 2)
            self._overrun = True
            self.on_overflow(excess)

    def write_register(self, reg, value):
        super().write_register(reg, value)
        if reg == 0x0A and value & 7 == 0:       # bypass empties the FIFO
            self.clear_fifo()
            self._head = 0
            self._overrun = False

    def read_register(self, reg):
        words = len(self.fifo) // 2
        if reg == 0x3A:
            return words & 0xFF
        if reg == 0x3B:
            full = len(self.fifo) + self.frame_bytes() > self.FIFO_CAPACITY
            return self._overrun << 6 | full << 5 | (words == 0) << 4 | (words >> 8) & 0x0F
        if reg == 0x3C:
            return self._head & 0xFF
        if reg == 0x3D:
            return (self._head >> 8) & 0x03
        return super().read_register(reg)

    def read_block(self, register, n):
        if register == 0x3E:                     # FIFO_DATA_OUT_L/H: a burst wraps over the pair
            self.update()
            k = min(n, len(self.fifo)) // 2 * 2
            out = bytes(self.fifo[:k])
            del self.fifo[:k]
            if k:
                self._overrun = False
                self._head = (self._head + k // 2) % (self.frame_bytes() // 2)
            return out + bytes(n - k)
        return super().read_block(register, n)


class FakeLsm6dsox(_FakeSt):
    """LSM6DSOX / LSM6DSO (WHO_AM_I 0x6C): tagged 7-byte FIFO words, accelerometer (tag 0x02) and
    gyroscope (tag 0x01) words per batch slot, in the order `word_order` gives; continuous mode
    drops the oldest words; FIFO_OVR_LATCHED clears when FIFO_STATUS2 is read. The gyroscope's
    words only start `gyro_startup_s` after it is switched on, as on the real part."""

    DEFAULTS = {0x0F: 0x6C, 0x12: 0x04}
    WORD = 7
    CAPACITY_WORDS = 512

    def __init__(self, *args, word_order: str = "accel-first", gyro_startup_s: float = 0.07, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.FIFO_CAPACITY = self.CAPACITY_WORDS * self.WORD
        self.word_order = word_order
        self.gyro_startup_s = gyro_startup_s
        self._gyro_on_at = None
        self._ovr_latched = False
        self._ovr = False

    def _batched(self) -> tuple[float | None, float | None]:
        bdr_g, bdr_a = self.regs[0x09] >> 4, self.regs[0x09] & 0xF
        g = _ST_ODR.get(bdr_g) if self.regs[0x11] >> 4 else None
        a = _ST_ODR.get(bdr_a) if self.regs[0x10] >> 4 else None
        return g, a

    def sampling(self):
        g, a = self._batched()
        if g is None and a is None:
            return None
        return (a or g, g is not None, a is not None)

    def collecting(self):
        return self.regs[0x0A] & 7 != 0

    def frame_bytes(self):
        return self.WORD * 2

    def encode(self, si, t):
        n = len(si)
        a_lsb, g_lsb = self._lsb()
        g_on, a_on = self._batched()
        slots = (self._slot + np.arange(n)) % 4  # TAG_CNT: 2-bit batch-slot counter
        words = []
        for kind in (("accel", "gyro") if self.word_order == "accel-first" else ("gyro", "accel")):
            if kind == "accel" and a_on is not None:
                words.append((0x02, self.quantise(si[:, :3], a_lsb), np.ones(n, bool)))
            if kind == "gyro" and g_on is not None:
                on_at = self._gyro_on_at if self._gyro_on_at is not None else -math.inf
                words.append((0x01, self.quantise(si[:, 3:], g_lsb), t >= on_at + self.gyro_startup_s))
        out = np.zeros((n, len(words), self.WORD), np.uint8)
        keep = np.zeros((n, len(words)), bool)
        for j, (tag, raw, valid) in enumerate(words):
            tagbyte = (tag << 3 | slots << 1).astype(np.uint8)
            # TAG_PARITY (bit 0): set so the tag byte has even parity; the driver does not check it
            parity = np.unpackbits(tagbyte[:, None], axis=1).sum(axis=1) & 1
            out[:, j, 0] = tagbyte | parity
            out[:, j, 1:] = raw.astype("<i2").view(np.uint8).reshape(n, 6)
            keep[:, j] = valid
        return out[keep].tobytes()

    def push(self, data, n):
        self.fifo += data
        excess = len(self.fifo) - self.FIFO_CAPACITY
        if excess > 0:
            drop = -(-excess // self.WORD) * self.WORD
            del self.fifo[:drop]
            self._ovr = self._ovr_latched = True
            self.overwritten += math.ceil(drop / self.frame_bytes())

    def write_register(self, reg, value):
        if reg == 0x11 and value >> 4 and not self.regs[0x11] >> 4:
            self._gyro_on_at = self.clock.time()
        super().write_register(reg, value)
        if reg == 0x0A and value & 7 == 0:
            self.clear_fifo()
            self._ovr = self._ovr_latched = False

    def read_register(self, reg):
        words = len(self.fifo) // self.WORD
        if reg == 0x3A:
            return words & 0xFF
        if reg == 0x3B:
            value = self._ovr << 6 | (len(self.fifo) + self.WORD > self.FIFO_CAPACITY) << 5 \
                | self._ovr_latched << 3 | (words >> 8) & 0x03
            self._ovr_latched = False
            return value
        return super().read_register(reg)

    def read_block(self, register, n):
        if register == 0x78:                     # a burst wraps over the 7 FIFO output registers
            self.update()
            k = min(n // self.WORD, len(self.fifo) // self.WORD) * self.WORD
            out = bytes(self.fifo[:k])
            del self.fifo[:k]
            if k:
                self._ovr = False
            return out + bytes(n - k)
        return super().read_block(register, n)


class FakeBmi160(FakeChip):
    """BMI160 (CHIP_ID 0xD1), per BST-BMI160-DS000-07: sensors start suspended until the CMD
    register wakes them; headerless FIFO frames GYR XYZ + ACC XYZ, little-endian; a full FIFO
    discards its oldest whole frame; reading past the end returns 0x80; the byte counter moves
    on whole frames only."""

    ID_REGISTER = 0x00
    DEFAULTS = {0x00: 0xD1, 0x40: 0x28, 0x41: 0x03, 0x42: 0x28, 0x43: 0x00, 0x47: 0x10}
    ACC_LSB_PER_G = {0b0011: 16384.0, 0b0101: 8192.0, 0b1000: 4096.0, 0b1100: 2048.0}
    GYR_LSB_PER_DPS = {0: 16.4, 1: 32.8, 2: 65.6, 3: 131.2, 4: 262.4}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.acc_normal = False
        self.gyr_normal = False

    def _power_on(self):
        super()._power_on()
        self.acc_normal = self.gyr_normal = False

    def sampling(self):
        acc_odr, gyr_odr = self.regs[0x40] & 0xF, self.regs[0x42] & 0xF
        if not (self.acc_normal and self.gyr_normal) or acc_odr != gyr_odr or not 1 <= acc_odr <= 12:
            return None  # only the case edged uses: both sensors running at one rate
        return (100.0 / 2 ** (8 - acc_odr),)

    def collecting(self):
        # headerless frames of gyro + accel; header mode is not emulated (nothing is collected)
        return self.regs[0x47] & 0xF0 == 0xC0

    def frame_bytes(self):
        return 12

    def encode(self, si, t):
        a_lsb = STANDARD_GRAVITY / self.ACC_LSB_PER_G.get(self.regs[0x41] & 0xF, 16384.0)
        g_lsb = math.radians(1.0) / self.GYR_LSB_PER_DPS.get(self.regs[0x43] & 0x7, 16.4)
        return np.hstack([self.quantise(si[:, 3:], g_lsb), self.quantise(si[:, :3], a_lsb)]).astype("<i2").tobytes()

    def push(self, data, n):
        self.fifo += data
        excess = len(self.fifo) - self.FIFO_CAPACITY
        if excess > 0:
            drop = -(-excess // 12) * 12
            del self.fifo[:drop]
            self.overwritten += drop // 12

    def write_register(self, reg, value):
        if reg == 0x7E:
            if value == 0xB6:
                self._power_on()
            elif value in (0x11, 0x10):
                self.acc_normal = value == 0x11
            elif value in (0x15, 0x14):
                self.gyr_normal = value == 0x15
            elif value == 0xB0:
                self.clear_fifo()
            return
        super().write_register(reg, value)

    def read_register(self, reg):
        if reg == 0x03:
            return (0b01 if self.acc_normal else 0) << 4 | (0b01 if self.gyr_normal else 0) << 2
        if reg == 0x22:
            return len(self.fifo) & 0xFF
        if reg == 0x23:
            return (len(self.fifo) >> 8) & 0x07
        return super().read_register(reg)

    def read_block(self, register, n):
        if register == 0x24:                     # FIFO_DATA: a burst drains frames
            self.update()
            avail = len(self.fifo)
            k = min(n, avail)
            out = bytes(self.fifo[:k])
            del self.fifo[:k // 12 * 12]          # a frame cut short stays for the next read
            return out + b"\x80" * (n - k)
        return super().read_block(register, n)


# --- factories ----------------------------------------------------------------------------------

CHIPS: dict[str, tuple[type[FakeChip], int, dict]] = {
    # name: (fake class, default address, constructor options)
    "mpu6050": (FakeMpu6050, 0x68, {"who_am_i": 0x68}),
    "mpu6500": (FakeMpu6050, 0x68, {"who_am_i": 0x70}),
    "mpu9250": (FakeMpu6050, 0x68, {"who_am_i": 0x71}),
    "lsm6ds3": (FakeLsm6ds3, 0x6A, {"who_am_i": 0x69}),
    "lsm6dsl": (FakeLsm6ds3, 0x6A, {"who_am_i": 0x6A}),
    "lsm6dsox": (FakeLsm6dsox, 0x6A, {}),
    "bmi160": (FakeBmi160, 0x69, {}),
}


class FakeFactory:
    """`smbus_factory` for ImuSource: `factory(bus_number)` -> the fake bus with the chip on it.

    The same bus object comes back on every call, so a test can reach the chip (`factory.chip`)
    and the bus (`factory.bus`) the source is using; `factory.clock` is the clock the source
    should wait on (ImuSource picks it up)."""

    def __init__(self, bus: FakeBus, chip: FakeChip, clock) -> None:
        self.bus = bus
        self.chip = chip
        self.clock = clock

    def __call__(self, bus_number: int) -> FakeBus:
        if bus_number != self.bus.number:
            return FakeBus(bus_number)  # an empty bus: nothing answers there
        self.bus.closed = False
        return self.bus


def make_factory(chip: str, motion_csv: Path | str | None = None, clock=None, *, address: int | None = None,
                 motion: Motion | None = None, bus_number: int = 1, **options) -> FakeFactory:
    """A factory whose bus `bus_number` carries one fake `chip` at `address` (its default if None).

    `motion_csv` plays a recording; `motion` a function of time; default: `synthetic_motion()`.
    `clock` defaults to the system clock (real time, for demos); tests pass a `SimClock`.
    Other options go to the fake chip (`who_am_i`, `odr_error`, `record`, ...)."""
    if chip not in CHIPS:
        raise ValueError(f"no fake for chip {chip!r} (fakes: {', '.join(CHIPS)})")
    cls, default_address, defaults = CHIPS[chip]
    clock = clock or SYSTEM_CLOCK
    if motion is None and motion_csv is not None:
        motion = csv_motion(motion_csv, start=clock.time())
    bus = FakeBus(bus_number)
    dev = bus.attach(address if address is not None else default_address,
                     cls(clock, motion, **{**defaults, **options}))
    return FakeFactory(bus, dev, clock)
