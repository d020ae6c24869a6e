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

Modules: `bus` (the bus, the chip base, clocks, motions), one per chip family (`mpu6050`,
`lsm6ds`, `bmi160`). Select a fake through the source's `smbus_factory`, e.g.
`ImuSource(chip="auto", smbus_factory=make_factory("mpu6050", motion_csv=path))`; everything above
the bus is production code.
"""

from __future__ import annotations

from pathlib import Path

from edged.fakes.imu.bmi160 import FakeBmi160
from edged.fakes.imu.bus import FakeBus, FakeChip, Motion, SimClock, csv_motion, synthetic_motion
from edged.fakes.imu.lsm6ds import FakeLsm6ds3, FakeLsm6dsox
from edged.fakes.imu.mpu6050 import FakeMpu6050
from edged.sources.imu import SYSTEM_CLOCK

# --- factories ----------------------------------------------------------------------------------

CHIPS: dict[str, tuple[type[FakeChip], int, dict]] = {
    # name: (fake class, default address, constructor options)
    "mpu6050": (FakeMpu6050, 0x68, {"who_am_i": 0x68}),
    "mpu6500": (FakeMpu6050, 0x68, {"who_am_i": 0x70}),
    "mpu9250": (FakeMpu6050, 0x68, {"who_am_i": 0x71}),
    "lsm6ds3": (FakeLsm6ds3, 0x6A, {"who_am_i": 0x69}),
    "lsm6ds3h": (FakeLsm6ds3, 0x6A, {"who_am_i": 0x69, "fifo_bytes": 4096}),
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


__all__ = ["CHIPS", "FakeBmi160", "FakeBus", "FakeChip", "FakeFactory", "FakeLsm6ds3", "FakeLsm6dsox", "FakeMpu6050",
           "Motion", "SimClock", "csv_motion", "make_factory", "synthetic_motion"]
