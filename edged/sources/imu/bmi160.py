"""Driver for the Bosch BMI160 (accelerometer + gyroscope over I²C, read through the FIFO).

Written from the BMI160 data sheet, BST-BMI160-DS000-07 revision 0.8 (February 2015): §2.5 (FIFO),
§2.11 (register map: CHIP_ID 0x00, PMU_STATUS 0x03, FIFO_LENGTH 0x22-0x23, FIFO_DATA 0x24,
ACC_CONF 0x40, ACC_RANGE 0x41, GYR_CONF 0x42, GYR_RANGE 0x43, FIFO_CONFIG 0x46-0x47, CMD 0x7E)
and the sensitivity figures of its specification tables.

After power-on both sensors sit in suspend mode; CMD 0x11 / 0x15 put the accelerometer /
gyroscope into normal mode (start-up up to 3.8 ms / 80 ms). While no sensor is in normal mode
the interface needs at least 450 µs between two register writes (§3.2.4; Bosch's reference
driver BMI160_SensorAPI writes one register at a time with a delay in `bmi160_set_regs` unless a
sensor is in normal mode; Linux drivers/iio/imu/bmi160/bmi160_core.c waits
BMI160_SUSPENDED_WRITE_USLEEP = 450 µs). A write sent sooner is lost, and written back to back
after the soft reset the ranges stay at their reset values (±2 g, ±2000 °/s) while edged would
scale for others. So, as the reference drivers do, edged brings both sensors to normal mode
first (each command spaced by the suspend-mode gap) and only then writes the configuration,
and reads every configuration register back (`Chip.setup`). With a sensor in normal mode the
gap is 2 µs (§3.2.4), less than one I²C register write lasts (about 29 bit times: 73 µs at
400 kHz), so it needs no timing of its own. The FIFO is used in headerless mode
with both sensors at the same rate: each 12-byte frame holds GYR X,Y,Z then ACC X,Y,Z (data
register order), little-endian two's complement. When the 1024-byte FIFO is full the oldest whole
frame is discarded for each new one, so alignment survives, but the samples in between are gone:
we treat "no room for another frame" as an overflow.
"""

from __future__ import annotations

import logging

import numpy as np

from edged.sources.imu import ChipSettings, Chip, ImuError, nearest
from edged.sources.imu.registers import Field, Word
from edged.service.log import fields

log = logging.getLogger("edged.imu")

CHIP_ID = 0x00
ERR_REG = 0x02
PMU_STATUS = 0x03
FIFO_LENGTH = 0x22
FIFO_DATA = 0x24
ACC_CONF = 0x40
ACC_RANGE = 0x41
GYR_CONF = 0x42
GYR_RANGE = 0x43
FIFO_CONFIG_1 = 0x47
CMD = 0x7E

CMD_SOFTRESET = 0xB6
CMD_ACC_NORMAL = 0x11
CMD_GYR_NORMAL = 0x15
CMD_ACC_SUSPEND = 0x10
CMD_GYR_SUSPEND = 0x14
CMD_FIFO_FLUSH = 0xB0

SOFTRESET_S = 0.05              # the kernel waits 1 ms (BMI160_SOFTRESET_USLEEP); generous here
SUSPENDED_WRITE_GAP_S = 500e-6  # ≥ 450 µs between writes while no sensor is in normal mode (§3.2.4)
ACC_STARTUP_S = 0.005           # accelerometer suspend -> normal: 3.8 ms at most (BMI160_ACCEL_PMU_MIN_USLEEP)
GYR_STARTUP_S = 0.085           # gyroscope suspend -> normal: 80 ms at most (BMI160_GYRO_PMU_MIN_USLEEP)

FRAME = 12
FIFO_SIZE = 1024
FIFO_GYR_ACC_HEADERLESS = 0b1100_0000  # fifo_gyr_en, fifo_acc_en; fifo_header_en (bit 4) off

# acc_odr / gyr_odr: rate = 100 / 2^(8 - code) Hz. 25..1600 Hz is what both sensors offer.
ODR_CODE = {25.0: 6, 50.0: 7, 100.0: 8, 200.0: 9, 400.0: 10, 800.0: 11, 1600.0: 12}
ACC_RANGE_CODE = {2.0: 0b0011, 4.0: 0b0101, 8.0: 0b1000, 16.0: 0b1100}
ACC_LSB_PER_G = {2.0: 16384.0, 4.0: 8192.0, 8.0: 4096.0, 16.0: 2048.0}
GYR_RANGE_CODE = {2000.0: 0b000, 1000.0: 0b001, 500.0: 0b010, 250.0: 0b011, 125.0: 0b100}
GYR_LSB_PER_DPS = {2000.0: 16.4, 1000.0: 32.8, 500.0: 65.6, 250.0: 131.2, 125.0: 262.4}

# -3 dB cut-off (Hz) in normal filter mode per ODR. OSR2 / OSR4 average 2 / 4 samples, which
# puts the cut-off near that of normal mode at ODR/2 / ODR/4.
ACC_NORMAL_CUTOFF = {12.5: 5.06, 25.0: 10.12, 50.0: 20.25, 100.0: 40.5, 200.0: 80.0, 400.0: 162.0,
                     800.0: 324.0, 1600.0: 684.0}
GYR_NORMAL_CUTOFF = {25.0: 10.7, 50.0: 20.8, 100.0: 39.9, 200.0: 74.6, 400.0: 136.6, 800.0: 254.6,
                     1600.0: 523.9}
# bandwidth parameter codes: (acc_bwp, gyr_bwp) for normal, OSR2, OSR4
FILTER_MODES = {1: (0b010, 0b10), 2: (0b001, 0b01), 4: (0b000, 0b00)}


def _cutoff(table: dict[float, float], rate: float, divisor: int) -> float:
    return table.get(rate / divisor, table[rate] / divisor)


class Bmi160(Chip):
    """Bosch BMI160; see the module docstring for the source."""

    name = "bmi160"
    ID_REGISTER = CHIP_ID
    IDS = {0xD1: "bmi160"}
    ADDRESSES = (0x68, 0x69)  # SDO to GND / to VDDIO
    FIFO_BYTES = FIFO_SIZE

    acc_pmu_status = Field(PMU_STATUS, 4, 2, readonly=True)
    gyr_pmu_status = Field(PMU_STATUS, 2, 2, readonly=True)
    acc_bwp = Field(ACC_CONF, 4, 3)
    acc_odr = Field(ACC_CONF, 0, 4)
    acc_range = Field(ACC_RANGE, 0, 4)
    gyr_bwp = Field(GYR_CONF, 4, 2)
    gyr_odr = Field(GYR_CONF, 0, 4)
    gyr_range = Field(GYR_RANGE, 0, 3)
    fifo_config_1 = Field(FIFO_CONFIG_1)
    fifo_length = Word(FIFO_LENGTH, 2, "little", mask=0x07FF)

    READBACK = {ACC_CONF: "ACC_CONF", ACC_RANGE: "ACC_RANGE", GYR_CONF: "GYR_CONF", GYR_RANGE: "GYR_RANGE",
                FIFO_CONFIG_1: "FIFO_CONFIG_1"}

    _suspended = True       # no sensor in normal mode: writes need the long gap
    _last_write = -1.0      # monotonic time of the last register write

    def write_u8(self, reg: int, value: int) -> None:
        if self._suspended:
            wait = self._last_write + SUSPENDED_WRITE_GAP_S - self.clock.monotonic()
            if wait > 0:
                self.clock.sleep(wait)
        super().write_u8(reg, value)
        self._last_write = self.clock.monotonic()

    def configure(self, *, rate_hz, accel_range_g, gyro_range_dps, lpf_hz) -> ChipSettings:
        self._suspended = True
        self.write_u8(CMD, CMD_SOFTRESET)
        self.clock.sleep(SOFTRESET_S)
        # Normal mode first (the order of the reference drivers): from then on writes may follow
        # each other at bus speed, and the configuration below cannot be lost to the write gap.
        self.write_u8(CMD, CMD_ACC_NORMAL)
        self.clock.sleep(ACC_STARTUP_S)
        self._suspended = False  # the accelerometer is in normal mode now
        self.write_u8(CMD, CMD_GYR_NORMAL)
        self.clock.sleep(GYR_STARTUP_S)
        pmu = self.read_u8(PMU_STATUS)
        if (pmu >> 4) & 0b11 != 0b01 or (pmu >> 2) & 0b11 != 0b01:
            raise ImuError(f"imu: {self.where}: bmi160 did not enter normal mode "
                           f"(PMU_STATUS 0x{pmu:02x}, expected accelerometer and gyroscope 0b01)")

        rate, odr = nearest(ODR_CODE, rate_hz)
        a_range, a_code = nearest(ACC_RANGE_CODE, accel_range_g)
        g_range, g_code = nearest(GYR_RANGE_CODE, gyro_range_dps)
        if lpf_hz is None:
            mode = 1
        else:
            mode = min(FILTER_MODES, key=lambda m: abs(_cutoff(GYR_NORMAL_CUTOFF, rate, m) - lpf_hz))
        acc_bwp, gyr_bwp = FILTER_MODES[mode]
        self.write_u8(ACC_CONF, acc_bwp << 4 | odr)
        self.write_u8(ACC_RANGE, a_code)
        self.write_u8(GYR_CONF, gyr_bwp << 4 | odr)
        self.write_u8(GYR_RANGE, g_code)
        err = self.read_u8(ERR_REG)
        if err:
            log.warning("BMI160 reports an error after configuration", extra=fields(err_reg=f"0x{err:02x}"))
        self.fifo_config_1 = FIFO_GYR_ACC_HEADERLESS

        self._set_scale(1.0 / ACC_LSB_PER_G[a_range], 1.0 / GYR_LSB_PER_DPS[g_range])
        return ChipSettings(chip=self.name, variant=self.variant, rate_hz=rate, accel_range_g=a_range,
                            gyro_range_dps=g_range,
                            accel_lpf_hz=_cutoff(ACC_NORMAL_CUTOFF, rate, mode),
                            gyro_lpf_hz=_cutoff(GYR_NORMAL_CUTOFF, rate, mode),
                            fifo_frames=FIFO_SIZE // FRAME)

    def fifo_reset(self) -> None:
        self.write_u8(CMD, CMD_FIFO_FLUSH)
        self._overflow_in_read = False

    def fifo_level(self) -> tuple[int, bool]:
        late = self._take_overflow_in_read()
        length = self.fifo_length
        return length // FRAME, late or length + FRAME > FIFO_SIZE or length % FRAME != 0

    def read_samples(self, n: int) -> np.ndarray:
        if n <= 0:
            return np.empty((0, 6), np.float32)
        # Every transfer ends on a frame boundary: the FIFO's byte counter only moves on whole
        # frames (§2.11.9, FIFO_LENGTH).
        raw = self.read_stream(FIFO_DATA, n * FRAME, FRAME).view("<i2").reshape(n, 6)
        # The FIFO went on filling after FIFO_LENGTH sized this burst. Had it filled up, it
        # discarded its oldest frames (§2.5) and the burst no longer follows the previous one;
        # headerless frames do not say so (the skip frame is header mode only, §2.5.1), but the
        # byte counter does (§2.11.9): the n frames taken out plus those left must still leave
        # room for one more, else the FIFO was full in between. Frames arriving during the
        # transfer count as left, so this errs towards seeing an overflow, and only near full.
        if (n + 1) * FRAME + self.fifo_length > FIFO_SIZE:
            return self._drop_burst()
        return self._convert(raw, accel_col=3, gyro_col=0)

    def standby(self) -> None:
        self.write_u8(CMD, CMD_ACC_SUSPEND)   # the gyroscope still runs: no long gap needed
        self.clock.sleep(0.005)
        self.write_u8(CMD, CMD_GYR_SUSPEND)
        self._suspended = True
