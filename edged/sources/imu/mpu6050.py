"""Driver for the InvenSense MPU-6050 / MPU-6000, MPU-6500 and MPU-9250 (accelerometer + gyroscope
over I²C, read through the on-chip FIFO).

Written from:
- MPU-6000/MPU-6050 Product Specification, PS-MPU-6000A-00 rev 3.4, and Register Map and
  Descriptions, RM-MPU-6000A-00 rev 4.2 (2013-08-19);
- MPU-6500 Register Map and Descriptions, RM-MPU-6500A-00 rev 2.1 (2013-09-16);
- MPU-9250 Register Map and Descriptions, RM-MPU-9250A-00 rev 1.4 (2013-09-09). The MPU-9250's
  magnetometer (AK8963, behind the auxiliary bus) is not used;
- checked against the Linux IIO driver drivers/iio/imu/inv_mpu6050/ (inv_mpu_iio.h: gyroscope
  start-up 60 ms on the 6050, 70 ms on the 6500 family, INV_MPU6050/6500_GYRO_STARTUP_TIME) and
  InvenSense's Motion Driver (inv_mpu.c, `mpu_set_sensors`, which waits only 50 ms after waking
  the sensors: edged follows the kernel's longer, per-part figures).

The family shares the register layout used here; the 6500/9250 add ACCEL_CONFIG2 (a separate
accelerometer low-pass filter) and a 13-bit FIFO count. The FIFO carries, per sample, the 12 bytes
of ACCEL_XOUT_H..ACCEL_ZOUT_L and GYRO_XOUT_H..GYRO_ZOUT_L in register order, big-endian two's
complement (temperature is left out of the FIFO). When the FIFO is full the oldest byte is dropped
(RM 4.2 §4.31, FIFO_R_W), so after an overflow the byte stream no longer starts on a frame: the FIFO must be
reset.
"""

from __future__ import annotations

import numpy as np

from edged.sources.imu import ChipSettings, Chip, nearest
from edged.sources.imu.registers import Bit, Field, Word

FRAME = 12  # accel xyz + gyro xyz, 2 bytes each

# Register addresses (RM-MPU-6000A-00 §3)
SMPLRT_DIV = 0x19
CONFIG = 0x1A
GYRO_CONFIG = 0x1B
ACCEL_CONFIG = 0x1C
ACCEL_CONFIG2 = 0x1D      # MPU-6500/9250 only
FIFO_EN = 0x23
INT_ENABLE = 0x38
INT_STATUS = 0x3A
USER_CTRL = 0x6A
PWR_MGMT_1 = 0x6B
FIFO_COUNTH = 0x72
FIFO_R_W = 0x74
WHO_AM_I = 0x75

# FIFO_EN bits: XG, YG, ZG (6..4) and ACCEL (3); TEMP (7) and the slaves stay off.
FIFO_EN_ACCEL_GYRO = 0b0111_1000

# Full-scale selections: AFS_SEL / FS_SEL code -> sensitivity (PS-MPU-6000A-00 §6.1, §6.2).
ACCEL_LSB_PER_G = {2.0: 16384.0, 4.0: 8192.0, 8.0: 4096.0, 16.0: 2048.0}
ACCEL_CODE = {2.0: 0, 4.0: 1, 8.0: 2, 16.0: 3}
GYRO_LSB_PER_DPS = {250.0: 131.0, 500.0: 65.5, 1000.0: 32.8, 2000.0: 16.4}
GYRO_CODE = {250.0: 0, 500.0: 1, 1000.0: 2, 2000.0: 3}

# DLPF_CFG 1..6 (CONFIG[2:0]) keep the internal sample rate at 1 kHz, so SMPLRT_DIV gives
# rate = 1000 / (1 + div). Bandwidths (Hz) per part: (accelerometer, gyroscope).
INTERNAL_RATE_HZ = 1000.0
DLPF_6050 = {1: (184.0, 188.0), 2: (94.0, 98.0), 3: (44.0, 42.0), 4: (21.0, 20.0),
             5: (10.0, 10.0), 6: (5.0, 5.0)}                       # RM-MPU-6000A-00 §4.3
DLPF_6500_GYRO = {1: 184.0, 2: 92.0, 3: 41.0, 4: 20.0, 5: 10.0, 6: 5.0}  # RM-MPU-6500A-00 §4.6
A_DLPF_6500 = {1: 218.1, 2: 99.0, 3: 44.8, 4: 21.2, 5: 10.2, 6: 5.05}   # RM-MPU-6500A-00 §4.8

FIFO_SIZE = {"mpu6050": 1024, "mpu6500": 512, "mpu9250": 512}
GYRO_STARTUP_S = {"mpu6050": 0.060, "mpu6500": 0.070, "mpu9250": 0.070}


class Mpu6050(Chip):
    """MPU-6050 family over I²C; see the module docstring for the sources."""

    name = "mpu6050"
    ID_REGISTER = WHO_AM_I
    IDS = {0x68: "mpu6050", 0x70: "mpu6500", 0x71: "mpu9250"}
    ADDRESSES = (0x68, 0x69)  # AD0 low / high
    FIFO_BYTES = 1024

    smplrt_div = Field(SMPLRT_DIV)
    dlpf_cfg = Field(CONFIG, 0, 3)
    fs_sel = Field(GYRO_CONFIG, 3, 2)
    fchoice_b = Field(GYRO_CONFIG, 0, 2)          # 6500/9250; 00 = use DLPF_CFG
    afs_sel = Field(ACCEL_CONFIG, 3, 2)
    accel_fchoice_b = Bit(ACCEL_CONFIG2, 3)       # 6500/9250; 0 = use A_DLPF_CFG
    a_dlpf_cfg = Field(ACCEL_CONFIG2, 0, 3)       # 6500/9250
    fifo_en = Field(FIFO_EN)
    fifo_oflow_en = Bit(INT_ENABLE, 4)
    int_status = Field(INT_STATUS, readonly=True)
    user_fifo_en = Bit(USER_CTRL, 6)
    user_fifo_reset = Bit(USER_CTRL, 2)
    device_reset = Bit(PWR_MGMT_1, 7)
    sleep = Bit(PWR_MGMT_1, 6)
    clksel = Field(PWR_MGMT_1, 0, 3)
    fifo_count = Word(FIFO_COUNTH, 2, "big", mask=0x1FFF)

    FIFO_OFLOW_INT = 1 << 4  # INT_STATUS bit; cleared by reading INT_STATUS
    READBACK = {SMPLRT_DIV: "SMPLRT_DIV", CONFIG: "CONFIG", GYRO_CONFIG: "GYRO_CONFIG",
                ACCEL_CONFIG: "ACCEL_CONFIG", ACCEL_CONFIG2: "ACCEL_CONFIG2", FIFO_EN: "FIFO_EN",
                INT_ENABLE: "INT_ENABLE", PWR_MGMT_1: "PWR_MGMT_1"}

    def configure(self, *, rate_hz, accel_range_g, gyro_range_dps, lpf_hz) -> ChipSettings:
        clock = self.clock
        self.write_u8(PWR_MGMT_1, 0x80)      # DEVICE_RESET: registers to their defaults
        clock.sleep(0.1)                     # let the reset finish (RM: register 107, PWR_MGMT_1)
        # Leave sleep mode and clock from the X gyro PLL (CLKSEL=1): the register map recommends a
        # gyro reference over the internal oscillator for stability.
        self.write_u8(PWR_MGMT_1, 0x01)
        # Gyroscope start-up before the first samples: the Linux driver (inv_mpu6050_iio.h)
        # waits INV_MPU6050_GYRO_STARTUP_TIME = 60 ms on the 6050 and INV_MPU6500_GYRO_STARTUP_TIME
        # = 70 ms on the 6500/9250; samples before that are not yet valid rate readings.
        clock.sleep(GYRO_STARTUP_S[self.variant])

        rates = {INTERNAL_RATE_HZ / (1 + d): d for d in range(256)}
        rate, div = nearest(rates, rate_hz)
        g_range, g_code = nearest(GYRO_CODE, gyro_range_dps)
        a_range, a_code = nearest(ACCEL_CODE, accel_range_g)

        six500 = self.variant != "mpu6050"
        gyro_bw = {c: (DLPF_6500_GYRO[c] if six500 else DLPF_6050[c][1]) for c in DLPF_6050}
        cfg = self._pick_filter(gyro_bw, lpf_hz, rate)
        self.smplrt_div = div
        self.write_u8(CONFIG, cfg)           # EXT_SYNC off; on the 6500 also FIFO_MODE=0 (oldest dropped)
        self.write_u8(GYRO_CONFIG, g_code << 3)  # FCHOICE_B = 00 on the 6500
        self.write_u8(ACCEL_CONFIG, a_code << 3)
        if six500:
            a_cfg = self._pick_filter(A_DLPF_6500, lpf_hz, rate)
            self.write_u8(ACCEL_CONFIG2, a_cfg)  # ACCEL_FCHOICE_B = 0
            accel_bw = A_DLPF_6500[a_cfg]
        else:
            accel_bw = DLPF_6050[cfg][0]
        # Without FIFO_OFLOW_EN (register 56) the chip does not raise FIFO_OFLOW_INT, and an
        # overflow would go unseen.
        self.write_u8(INT_ENABLE, 0x10)
        self.fifo_en = FIFO_EN_ACCEL_GYRO

        self._set_scale(1.0 / ACCEL_LSB_PER_G[a_range], 1.0 / GYRO_LSB_PER_DPS[g_range])
        self._capacity = FIFO_SIZE[self.variant]
        return ChipSettings(chip=self.name, variant=self.variant, rate_hz=rate, accel_range_g=a_range,
                            gyro_range_dps=g_range, accel_lpf_hz=accel_bw, gyro_lpf_hz=gyro_bw[cfg],
                            fifo_frames=self._capacity // FRAME)

    @staticmethod
    def _pick_filter(bandwidths: dict[int, float], lpf_hz: float | None, rate: float) -> int:
        if lpf_hz is not None:
            return min(bandwidths, key=lambda c: abs(bandwidths[c] - lpf_hz))
        # Unasked, take the widest band that still stops aliasing: below half the output rate.
        ok = [c for c, bw in bandwidths.items() if bw <= rate / 2]
        return max(ok, key=bandwidths.get) if ok else min(bandwidths, key=bandwidths.get)

    def fifo_reset(self) -> None:
        # FIFO_RESET only acts while USER_CTRL.FIFO_EN is 0 (register 106): stop, reset, restart.
        self.write_u8(USER_CTRL, 0x04)
        self.write_u8(USER_CTRL, 0x40)
        self.read_u8(INT_STATUS)             # clear an overflow flag left from before the reset
        self._overflow_in_read = False

    def fifo_level(self) -> tuple[int, bool]:
        late = self._take_overflow_in_read()
        status = self.read_u8(INT_STATUS)
        count = self.fifo_count              # one block read: FIFO_COUNTH first, which latches both
        overflow = late or bool(status & self.FIFO_OFLOW_INT) or count >= self._capacity or count % FRAME != 0
        return count // FRAME, overflow

    def read_samples(self, n: int) -> np.ndarray:
        if n <= 0:
            return np.empty((0, 6), np.float32)
        raw = self.read_stream(FIFO_R_W, n * FRAME, FRAME).view(">i2").reshape(n, 6)
        # An overflow after fifo_level read INT_STATUS (which cleared FIFO_OFLOW_INT) dropped
        # bytes off the front, so this burst is neither where the last one ended nor cut at
        # frames. The flag stays set until INT_STATUS is read again (RM-MPU-6000A-00 rev 4.2,
        # register 58, INT_STATUS), so one more read tells whether the burst can be trusted.
        if self.read_u8(INT_STATUS) & self.FIFO_OFLOW_INT:
            return self._drop_burst()
        return self._convert(raw, accel_col=0, gyro_col=3)

    def standby(self) -> None:
        self.write_u8(USER_CTRL, 0x00)
        self.sleep = True
