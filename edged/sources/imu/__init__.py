"""IMU sources for edged, and the contract every IMU chip driver fulfils.

A source hands out `edged.records.ImuBatch`es: acceleration in m/s², angular rate in rad/s, each
sample stamped with its capture time. `replay.py` plays a recording; `source.ImuSource` reads a
real chip over I²C through one of the drivers (`mpu6050.py`, `lsm6ds.py`, `bmi160.py`), which all
build on `registers.Chip`. `fake.py` emulates those chips behind the same SMBus calls, so
everything above the bus runs unchanged in tests and demos.

This module holds only what drivers, source and fakes share: the error type, the settings a
driver reports, the clock they all read time from, and `Chip`, the base every driver extends.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from edged.service.log import fields
from edged.sources.imu.registers import RegisterDevice

STANDARD_GRAVITY = 9.80665  # m/s² per g, as the chips' datasheets define LSB/g
SETUP_ATTEMPTS = 3  # configurations tried before a chip that does not keep its registers is refused

log = logging.getLogger("edged.imu")


class ImuError(Exception):
    """A fault the user must act on (wrong chip, no device, no I²C), worded as one line."""


@dataclass(frozen=True, slots=True)
class ChipSettings:
    """What a driver actually configured (the nearest supported values to what was asked for)."""

    chip: str                 # driver name, e.g. "mpu6050"
    variant: str              # the part identified by WHO_AM_I / CHIP_ID, e.g. "mpu6500"
    rate_hz: float            # output data rate of the FIFO samples
    accel_range_g: float
    gyro_range_dps: float
    accel_lpf_hz: float | None  # low-pass cut-off (-3 dB); None when it follows the rate
    gyro_lpf_hz: float | None
    fifo_frames: int          # samples the hardware FIFO holds before it overflows

    def describe(self) -> dict:
        return {"chip": self.chip, "variant": self.variant, "rate_hz": round(self.rate_hz, 3),
                "accel_range_g": self.accel_range_g, "gyro_range_dps": self.gyro_range_dps,
                "accel_lpf_hz": self.accel_lpf_hz, "gyro_lpf_hz": self.gyro_lpf_hz,
                "fifo_frames": self.fifo_frames}


class SystemClock:
    """Wall-clock time for stamps, monotonic time for waiting; `sleep` ends early when `stop` is set."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float, stop: threading.Event | None = None) -> bool:
        """Sleep up to `seconds`; True when `stop` was set (the caller should give up)."""
        if seconds <= 0:
            return bool(stop and stop.is_set())
        if stop is None:
            time.sleep(seconds)
            return False
        return stop.wait(seconds)


SYSTEM_CLOCK = SystemClock()


def nearest(options: dict[float, int], want: float) -> tuple[float, int]:
    """The supported (value, register code) closest to `want`; ties go to the larger value."""
    value = min(options, key=lambda v: (abs(v - want), -v))
    return value, options[value]


class Chip(RegisterDevice):
    """Base of the chip drivers: identification, configuration, FIFO level and FIFO reads.

    A driver identifies the part in its constructor (refusing any other with one line naming bus,
    address, expected and read values), then configures ranges, rate, filter and FIFO. The source
    then only calls `fifo_reset`, `fifo_level`, `read_samples` and `standby`; bus errors surface as
    OSError for the source to count and retry.
    """

    name: ClassVar[str]                     # driver name, as `imu.chip` selects it
    ID_REGISTER: ClassVar[int]              # WHO_AM_I / CHIP_ID address
    IDS: ClassVar[dict[int, str]]           # identification value -> variant name
    ADDRESSES: ClassVar[tuple[int, ...]]    # 7-bit addresses the part can strap to
    FIFO_BYTES: ClassVar[int]               # bytes read per stream transfer at most
    # Configuration registers read back after every setup, address -> datasheet name. A write
    # the chip did not take (dropped on the bus, sent too soon after the previous one, a bit the
    # part does not have) would otherwise leave it running with settings edged does not know.
    READBACK: ClassVar[dict[int, str]] = {}

    def __init__(self, bus, address: int, *, where: str, clock, rate_hz: float = 100.0,
                 accel_range_g: float = 4.0, gyro_range_dps: float = 500.0,
                 lpf_hz: float | None = None) -> None:
        super().__init__(bus, address, stream_capacity=self.FIFO_BYTES)
        self.where = where
        self.clock = clock
        self._expected: dict[int, int] = {}   # READBACK register -> last value written
        self.readback_mismatches = 0          # setups whose read-back found a register that differed
        self.invalid: np.ndarray | None = None  # per row of the last read_samples: True = not a real sample
        self.variant = self.identify()
        # float32 factors raw LSB -> SI, in IMU_CHANNELS order; set by configure()
        self.scale = np.ones(6, dtype=np.float32)
        self.settings = self.setup(rate_hz=rate_hz, accel_range_g=accel_range_g,
                                   gyro_range_dps=gyro_range_dps, lpf_hz=lpf_hz)

    def write_u8(self, reg: int, value: int) -> None:
        super().write_u8(reg, value)
        if reg in self.READBACK:
            self._expected[reg] = value & 0xFF

    def setup(self, **config) -> ChipSettings:
        """`configure`, then read every configuration register back; configure again when one
        did not keep what was written, and refuse (ImuError, one line naming the register, the
        value written and the value read) when it still does not after SETUP_ATTEMPTS."""
        for attempt in range(1, SETUP_ATTEMPTS + 1):
            self._expected.clear()
            settings = self.configure(**config)
            wrong = self.readback()
            if wrong is None:
                return settings
            self.readback_mismatches += 1
            reg, wrote, read = wrong
            line = (f"imu: {self.where}: {self.variant} register {self.READBACK[reg]} (0x{reg:02x}) reads "
                    f"0x{read:02x} after writing 0x{wrote:02x}")
            if attempt == SETUP_ATTEMPTS:
                raise ImuError(f"{line}, {SETUP_ATTEMPTS} setups in a row; the chip does not keep its configuration")
            log.warning("IMU configuration did not take; setting the chip up again",
                        extra=fields(register=self.READBACK[reg], wrote=f"0x{wrote:02x}",
                                     read=f"0x{read:02x}", attempt=attempt))
        raise AssertionError("unreachable")

    def readback(self) -> tuple[int, int, int] | None:
        """(register, written, read) of the first configuration register that differs, or None."""
        for reg, wrote in self._expected.items():
            read = self.read_u8(reg)
            if read != wrote:
                return reg, wrote, read
        return None

    @classmethod
    def expected_ids(cls) -> str:
        ids = [f"0x{v:02x} ({n})" for v, n in cls.IDS.items()]
        return ids[0] if len(ids) == 1 else ", ".join(ids[:-1]) + " or " + ids[-1]

    @classmethod
    def probe(cls, bus, address: int) -> tuple[str | None, int]:
        """(variant, value read) when the ID register answers; OSError when nothing answers."""
        value = int(bus.read_byte_data(address, cls.ID_REGISTER)) & 0xFF
        return cls.IDS.get(value), value

    def identify(self) -> str:
        try:
            value = self.read_u8(self.ID_REGISTER)
        except OSError as exc:
            raise ImuError(f"imu: {self.where}: no {self.name} answers "
                           f"({exc.strerror or exc}); check wiring, address and that the chip is powered") from None
        variant = self.IDS.get(value)
        if variant is None:
            raise ImuError(f"imu: {self.where}: not a {self.name}: expected ID {self.expected_ids()} "
                           f"in register 0x{self.ID_REGISTER:02x}, read 0x{value:02x}")
        return variant

    # -- what each driver implements -----------------------------------------------------
    def configure(self, *, rate_hz: float, accel_range_g: float, gyro_range_dps: float,
                  lpf_hz: float | None) -> ChipSettings:
        raise NotImplementedError

    def fifo_reset(self) -> None:
        """Empty the FIFO and start collecting again; the next sample is the first after this call."""
        raise NotImplementedError

    def fifo_level(self) -> tuple[int, bool]:
        """(whole samples waiting, whether the FIFO overflowed or lost its frame alignment)."""
        raise NotImplementedError

    def read_samples(self, n: int) -> np.ndarray:
        """Read the `n` samples `fifo_level` reported: float32 (k, 6) in m/s² and rad/s.

        k equals n except on chips whose FIFO interleaves tagged words (then a sample whose second
        half has not arrived yet waits for the next read), and k is 0 when the FIFO overflowed
        after `fifo_level` looked: the burst then does not follow on from the previous one, so it
        is dropped and the next `fifo_level` reports the overflow."""
        raise NotImplementedError

    def standby(self) -> None:
        """Stop sampling (best effort, on close)."""

    # -- shared helpers ------------------------------------------------------------------------
    _overflow_in_read = False  # set by read_samples, reported (once) by the next fifo_level

    def _drop_burst(self) -> np.ndarray:
        """What read_samples returns when the FIFO overflowed between the level read and the
        burst: nothing, since where the burst sits on the sample grid is unknown."""
        self._overflow_in_read = True
        return np.empty((0, 6), np.float32)

    def _take_overflow_in_read(self) -> bool:
        seen, self._overflow_in_read = self._overflow_in_read, False
        return seen

    def _set_scale(self, accel_g_per_lsb: float, gyro_dps_per_lsb: float) -> None:
        self.scale[:3] = accel_g_per_lsb * STANDARD_GRAVITY
        self.scale[3:] = np.deg2rad(gyro_dps_per_lsb)

    def _convert(self, raw: np.ndarray, accel_col: int, gyro_col: int) -> np.ndarray:
        """int16 frames (n, 6) -> SI float32 (n, 6), taking the accelerometer and gyroscope
        triplets from the columns where this chip's frame puts them."""
        out = np.empty((raw.shape[0], 6), dtype=np.float32)
        np.multiply(raw[:, accel_col:accel_col + 3], self.scale[:3], out=out[:, :3])
        np.multiply(raw[:, gyro_col:gyro_col + 3], self.scale[3:], out=out[:, 3:])
        return out
