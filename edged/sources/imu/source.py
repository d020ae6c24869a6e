"""The IMU source the daemon reads: one chip on one I²C bus, drained from its FIFO in bursts.

`ImuSource` opens the bus (smbus2, imported only here and only when a real bus is opened), finds
the chip (`chip="auto"` scans 0x68, 0x69, 0x6A, 0x6B and identifies by WHO_AM_I / CHIP_ID),
configures it through its driver and then, on each `read()`, sleeps until the FIFO holds a burst
and returns every sample in it as one `ImuBatch`.

Timestamps come from the chip's sample clock, not from when Python got round to reading: the
source anchors a start time when it (re)starts the FIFO and stamps sample k (1, 2, ...) of that
run at start + k × period. Only an overflow or a failed FIFO transfer restarts the FIFO and re-anchors;
the samples missed in between are estimated from the elapsed time and counted. Because a chip's
oscillator runs off its nominal rate by up to a few percent, the period used for stamping is
measured over the run (samples produced vs. elapsed time) once the run is long enough.

Time is read from a clock object: the system clock, or the one a fake bus factory carries
(`smbus_factory.clock`), so tests on a simulated clock run in milliseconds.

A bus error (OSError: NACK, EREMOTEIO, a loose wire) never escapes `read()`: it is counted,
logged once per kind, and the read is retried on the next poll. A chip that stops producing
samples altogether (a power glitch resets it to its power-on defaults) is set up again.
"""

from __future__ import annotations

import errno as errno_mod
import logging
import threading

import numpy as np

from edged.sources.imu import SYSTEM_CLOCK, Chip, ChipSettings, ImuError
from edged.service.log import Once, fields
from edged.records import ImuBatch

log = logging.getLogger("edged.imu")

SCAN_ADDRESSES = (0x68, 0x69, 0x6A, 0x6B)
BURST_S = 0.05          # aim to read about this much data per burst
MIN_SLEEP_S = 0.002
RATE_BASELINE_S = 5.0   # start following the chip's real rate after this long a run
RATE_TOLERANCE = 0.05   # and only while it is within this fraction of the nominal rate
SLEW = 0.1              # stamps move onto a new rate line by at most this fraction of a period per sample
STALL_S = 1.0           # an empty FIFO for this long (at least 20 periods) means the chip stopped


def _drivers() -> dict[str, type[Chip]]:
    from edged.sources.imu.bmi160 import Bmi160
    from edged.sources.imu.lsm6ds import Lsm6ds3, Lsm6dsox
    from edged.sources.imu.mpu6050 import Mpu6050

    return {"mpu6050": Mpu6050, "bmi160": Bmi160, "lsm6ds3": Lsm6ds3, "lsm6dsox": Lsm6dsox}


# Names a config may use for a part; each maps to the driver that serves it.
CHIP_ALIASES = {"mpu6050": "mpu6050", "mpu6000": "mpu6050", "mpu6500": "mpu6050", "mpu9250": "mpu6050",
                "lsm6ds3": "lsm6ds3", "lsm6dsl": "lsm6ds3", "lsm6ds3tr-c": "lsm6ds3",
                "lsm6dsox": "lsm6dsox", "lsm6dso": "lsm6dsox", "bmi160": "bmi160"}


def open_smbus(bus_number: int):
    """smbus2.SMBus(bus_number), with one actionable line for each way that fails."""
    try:
        from smbus2 import SMBus
    except ImportError:
        raise ImuError("imu: the smbus2 package is missing: pip install smbus2 "
                       "(or apt install python3-smbus2)") from None
    dev = f"/dev/i2c-{bus_number}"
    try:
        return SMBus(bus_number)
    except FileNotFoundError:
        raise ImuError(f"imu: {dev} does not exist: enable I2C (sudo raspi-config nonint do_i2c 0, "
                       f"or dtparam=i2c_arm=on in /boot/firmware/config.txt) and reboot") from None
    except PermissionError:
        raise ImuError(f"imu: {dev}: permission denied: add the user running edged to the i2c group "
                       f"(sudo usermod -aG i2c <user>)") from None
    except OSError as exc:
        raise ImuError(f"imu: cannot open {dev}: {exc.strerror or exc}") from None


def scan(bus, bus_label: str, addresses=SCAN_ADDRESSES) -> tuple[type[Chip], int]:
    """Find the first supported chip among `addresses`; ImuError listing what answered if none."""
    drivers = list(_drivers().values())
    seen = []
    for address in addresses:
        answers = []
        for cls in drivers:
            if address not in cls.ADDRESSES:
                continue
            try:
                variant, value = cls.probe(bus, address)
            except OSError:
                break  # nothing acknowledges this address
            if variant is not None:
                log.info("found IMU", extra=fields(chip=variant, bus=bus_label, address=f"0x{address:02x}"))
                return cls, address
            answers.append(f"reg 0x{cls.ID_REGISTER:02x}=0x{value:02x}")
        seen.append(f"0x{address:02x}: " + (", ".join(answers) if answers else "no answer"))
    raise ImuError(f"imu: no supported IMU on {bus_label} ({'; '.join(seen)}); supported: "
                   "MPU-6050/6500/9250 (WHO_AM_I 0x75 = 0x68/0x70/0x71), BMI160 (0x00 = 0xd1), "
                   "LSM6DS3/DSL/DSOX (0x0f = 0x69/0x6a/0x6c)")


class ImuSource:
    """One IMU chip on I²C, read from its FIFO. `read()` is meant for one dedicated thread;
    `close()` and `stats` may be called from any thread."""

    def __init__(self, *, chip: str = "auto", bus: int | object = 1, address: int | None = None,
                 rate_hz: float = 100.0, accel_range_g: float = 4.0, gyro_range_dps: float = 500.0,
                 lpf_hz: float | None = None, smbus_factory=None, clock=None, position=None) -> None:
        key = chip.lower()
        if key != "auto" and key not in CHIP_ALIASES:
            raise ImuError(f"imu: unknown chip {chip!r} (choose auto, {', '.join(sorted(CHIP_ALIASES))})")
        self._clock = clock or getattr(smbus_factory, "clock", None) or SYSTEM_CLOCK
        if isinstance(bus, int):
            self._bus = (smbus_factory or open_smbus)(bus)
            self._owns_bus = True
            label = f"I2C bus {bus}"
        else:
            self._bus = bus
            self._owns_bus = False
            label = "the given I2C bus"
        try:
            if key == "auto":
                cls, address = scan(self._bus, label, SCAN_ADDRESSES if address is None else (address,))
            else:
                cls = _drivers()[CHIP_ALIASES[key]]
                address = self._pick_address(cls, address)
            where = f"{label} address 0x{address:02x}"
            try:
                self._chip: Chip = cls(self._bus, address, where=where, clock=self._clock, rate_hz=rate_hz,
                                       accel_range_g=accel_range_g, gyro_range_dps=gyro_range_dps,
                                       lpf_hz=lpf_hz)
            except OSError as exc:
                raise ImuError(f"imu: {where}: I2C error while configuring the chip: "
                               f"{exc.strerror or exc}") from None
        except BaseException:
            if self._owns_bus:
                self._bus.close()
            raise
        self.settings: ChipSettings = self._chip.settings
        self.chip_name: str = self._chip.variant
        self.address = address
        self._nominal = 1.0 / self.settings.rate_hz
        self._period = self._nominal       # tracked: see _track_rate
        frames = max(1, self.settings.fifo_frames)
        # Big enough to keep bus traffic low, small enough that a late wake-up does not overflow.
        self._burst = int(min(max(1, round(BURST_S * self.settings.rate_hz)), max(1, frames // 4)))

        self._lock = threading.Lock()      # the bus: read() vs close()
        self._stop = threading.Event()
        self._once = Once(log)
        self._error_kinds: set[str] = set()  # bus error kinds logged since the last good read
        self._run_start: float | None = None  # time of the FIFO (re)start of this run
        self._last_stamp = 0.0             # stamp of the last sample delivered
        self._index = 0                    # samples delivered in this run
        self._restart_due = False
        self._next_poll = 0.0              # monotonic time the next burst is due
        self._samples = 0
        self._overflows = 0
        self._lost = 0
        self._read_errors = 0
        self._chip_resets = 0
        self._invalid = 0
        self._lost_restart = 0
        # An `edged.sources.imu.position.ImuPosition`: where the stream stands, saved for the next
        # process, which counts the samples that went by while it was down.
        self._position = position
        self._config = dict(rate_hz=rate_hz, accel_range_g=accel_range_g, gyro_range_dps=gyro_range_dps,
                            lpf_hz=lpf_hz)
        # A FIFO that stays empty this long means the chip stopped sampling (a brown-out resets
        # its registers to power-on defaults: asleep, FIFO off) and must be set up again.
        self._stall_s = max(STALL_S, 20 * self._nominal)
        log.info("IMU ready", extra=fields(address=f"0x{address:02x}", burst=self._burst,
                                             **self.settings.describe()))

    def _pick_address(self, cls: type[Chip], address: int | None) -> int:
        if address is not None:
            return address
        for a in cls.ADDRESSES:
            try:
                variant, _ = cls.probe(self._bus, a)
            except OSError:
                continue
            if variant is not None:
                return a
        # Nothing with the right ID: let identify() word the error at the first address that
        # answers at all, or at the default one.
        for a in cls.ADDRESSES:
            try:
                cls.probe(self._bus, a)
                return a
            except OSError:
                continue
        return cls.ADDRESSES[0]

    # -- reading -----------------------------------------------------------------------------
    def read(self, timeout: float = 1.0) -> ImuBatch | None:
        """Wait until the FIFO holds a burst (up to `timeout` s), then return every sample in it.

        Returns what has arrived when the timeout ends, or None if nothing has (or on close)."""
        clock = self._clock
        deadline = clock.monotonic() + timeout
        # Right after a burst the FIFO is empty: sleep until the next one is due before asking.
        early = min(self._next_poll, deadline) - clock.monotonic()
        if early > 0 and clock.sleep(early, self._stop):
            return None
        while not self._stop.is_set():
            now = clock.monotonic()
            with self._lock:
                if self._stop.is_set():
                    return None
                batch, wait = self._poll(final=now >= deadline)
            if batch is not None:
                self._next_poll = clock.monotonic() + self._burst * self._period
                return batch
            left = deadline - clock.monotonic()
            if left <= 0:
                if now >= deadline:
                    return None
                continue  # one last poll at the deadline
            if clock.sleep(min(max(wait, MIN_SLEEP_S), left), self._stop):
                return None
        return None

    def _poll(self, final: bool) -> tuple[ImuBatch | None, float]:
        """One look at the chip: (batch to return or None, how long to sleep before the next look)."""
        chip = self._chip
        clock = self._clock
        try:
            if self._run_start is None or self._restart_due:
                self._restart()
            level, overflow = chip.fifo_level()
            measured_at = clock.time()
            if overflow:
                lost = self._restart()
                self._overflows += 1
                self._once("overflow", "FIFO overflowed; samples were lost (reading too slowly?)",
                           lost=lost, overflows=self._overflows)
                return None, self._burst * self._nominal
        except OSError as exc:
            self._bus_error(exc, "status")
            return None, self._burst * self._nominal
        if level == 0 and measured_at - self._last_stamp > self._stall_s:
            return None, self._reconfigure(measured_at - self._last_stamp)
        if level < self._burst and not (final and level > 0):
            return None, (self._burst - level) * self._period
        try:
            data = chip.read_samples(level)
        except OSError as exc:
            self._bus_error(exc, "FIFO")
            # Part of the burst may have left the FIFO: where its frames start is unknown now.
            self._restart_due = True
            return None, self._period
        if self._error_kinds:
            for kind in self._error_kinds:
                self._once.clear(kind)
            self._error_kinds.clear()
            log.info("I2C reads recovered", extra=fields(read_errors=self._read_errors))
        n = len(data)
        if n == 0:
            return None, self._burst * self._period
        t = self._stamps(n)
        self._index += n
        self._track_rate(measured_at, self._index - n + level)
        invalid = chip.invalid
        if invalid is not None:
            # Rows the chip marked as no real measurement (e.g. start-up samples) held a slot
            # on the sample grid: stamped with the rest, then left out and counted.
            chip.invalid = None
            bad = int(np.count_nonzero(invalid))
            self._invalid += bad
            self._once("invalid-samples", "IMU delivered invalid samples (sensor start-up); dropped",
                       dropped=bad)
            keep = ~invalid
            t, data = t[keep], data[keep]
            n = len(data)
            if n == 0:
                return None, self._burst * self._period
        self._samples += n
        if self._position is not None:
            self._save_position("running", force=False)
        return ImuBatch(t=t, data=data), 0.0

    def _stamps(self, n: int) -> np.ndarray:
        """Times of the next n samples of this run: on the line start + k * period, reached by
        slewing when the period estimate moves the line, so that stamps always increase."""
        p = self._period
        last = self._last_stamp
        offset = self._run_start + (self._index + n) * p - (last + n * p)
        limit = SLEW * p * n
        step = p + min(max(offset, -limit), limit) / n
        t = last + np.arange(1, n + 1, dtype=np.float64) * step
        self._last_stamp = float(t[-1])
        return t

    def _track_rate(self, measured_at: float, produced: int) -> None:
        """Follow the chip's real sample rate, which differs from the nominal one by the tolerance
        of its oscillator (a percent or so: over half a minute per hour). The samples produced
        since the FIFO restart, counted against host time over a long baseline, give the period
        to within half a sample over that baseline."""
        elapsed = measured_at - self._run_start
        if elapsed < RATE_BASELINE_S:
            return
        period = elapsed / (produced + 0.5)
        if abs(period / self._nominal - 1.0) <= RATE_TOLERANCE:
            self._period = period
        # else: implausible for a working chip; keep what we have

    def _reconfigure(self, silent_s: float) -> float:
        """Set the chip up again after it went silent; returns how long to wait before the next poll."""
        self._once("stalled", "no IMU samples; reconfiguring the chip (power glitch or reset?)",
                   silent_s=round(silent_s, 2), address=f"0x{self.address:02x}")
        try:
            self._chip.identify()
            self._chip.settings = self._chip.setup(**self._config)
        except OSError as exc:
            self._bus_error(exc, "setup")
            return self._stall_s / 4
        except ImuError as exc:  # answers, but not as the chip it was (swapped? another device?)
            self._read_errors += 1
            self._once("setup-failed", str(exc))
            return self._stall_s / 4
        self._chip_resets += 1
        self._once.clear("stalled")
        self._restart_due = True
        return self._burst * self._nominal

    def _restart(self) -> int:
        """Reset the FIFO and re-anchor time; returns the samples estimated lost since the last run.

        If the reset itself fails (OSError), nothing changes and the next poll tries again."""
        clock = self._clock
        self._chip.fifo_reset()
        # Read the time after the flush: samples the chip made up to the flush are lost too.
        now = clock.time()
        lost = 0
        first = self._run_start is None
        if first and self._position is not None:
            self._count_restart_gap(clock.monotonic())
        if not first:
            # samples the chip produced in the ended run that we never delivered
            produced = int(round((now - self._run_start) / self._period))
            lost = max(0, produced - self._index)
            self._lost += lost
        self._run_start = self._last_stamp = now
        self._index = 0
        self._restart_due = False
        if first and self._position is not None:
            self._save_position("running", force=False)  # a death before the first burst counts from here
        return lost

    def _count_restart_gap(self, now_mono: float) -> None:
        """At this process's first FIFO start: count the samples the chip produced since the last
        one the previous process delivered, when that process did not stop cleanly."""
        gap = self._position.lost_since(self.chip_name, self.address, now_mono)
        if gap is None:
            return
        lost, seconds = gap
        self._lost_restart += lost
        # None of them is recovered: setting the chip up emptied its FIFO (see position.py).
        log.warning("IMU samples lost while the daemon was down", extra=fields(
            lost=lost, gap_s=round(seconds, 3), recovered=0, fifo_frames=self.settings.fifo_frames))

    def _save_position(self, state: str, *, force: bool) -> None:
        clock = self._clock
        now_mono = clock.monotonic()
        last_stamp = self._last_stamp
        # the monotonic time of the last sample delivered (its stamp is on the wall clock)
        last_mono = now_mono - max(0.0, clock.time() - last_stamp)
        self._position.save(chip=self.chip_name, address=self.address, period_s=self._period,
                            last_stamp=last_stamp, last_mono=last_mono, now_mono=now_mono,
                            state=state, force=force)

    def _bus_error(self, exc: OSError, phase: str) -> None:
        self._read_errors += 1
        name = errno_mod.errorcode.get(exc.errno or 0, "EIO")
        kind = f"read-error-{name}"
        self._error_kinds.add(kind)
        self._once(kind, f"I2C {phase} read failed: {exc.strerror or exc}; retrying",
                   errno=name, address=f"0x{self.address:02x}")

    # -- state ---------------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        return {"samples": self._samples, "overflows": self._overflows, "lost_samples": self._lost,
                "read_errors": self._read_errors, "chip_resets": self._chip_resets,
                "invalid_samples": self._invalid, "config_readback_mismatches": self._chip.readback_mismatches,
                "lost_across_restart": self._lost_restart}

    def close(self, *, restart: bool = False) -> None:
        """Stop sampling and release the bus. `restart`: the daemon exits to be restarted (an
        Edge TPU hang), so the next process counts the samples lost until it reads again."""
        if self._stop.is_set():
            return
        self._stop.set()
        with self._lock:
            if self._position is not None and self._run_start is not None:
                self._save_position("restarting" if restart else "stopped", force=True)
            try:
                self._chip.standby()
            except OSError:
                pass  # the chip may be gone; closing must not fail because of it
            if self._owns_bus:
                try:
                    self._bus.close()
                except OSError:
                    pass
