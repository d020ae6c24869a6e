"""Fake InvenSense MPU-6050 / 6500 / 9250: register file and FIFO from the datasheet."""

from __future__ import annotations

import math

import numpy as np

from edged.fakes.imu.bus import FakeChip
from edged.sources.imu import STANDARD_GRAVITY


class FakeMpu6050(FakeChip):
    """MPU-6050 (WHO_AM_I 0x68), MPU-6500 (0x70) or MPU-9250 (0x71), per RM-MPU-6000A-00 rev 4.2
    and RM-MPU-6500A-00 rev 2.1: big-endian FIFO frames in register order, count latched by
    FIFO_COUNTH, FIFO_OFLOW_INT when enabled, oldest bytes dropped on overflow."""

    ID_REGISTER = 0x75
    DEFAULTS = {0x6B: 0x40, 0x75: 0x68}  # PWR_MGMT_1: SLEEP; WHO_AM_I
    ACCEL_LSB_PER_G = (16384.0, 8192.0, 4096.0, 2048.0)   # AFS_SEL 0..3
    GYRO_LSB_PER_DPS = (131.0, 65.5, 32.8, 16.4)          # FS_SEL 0..3
    TEMP_RAW = -3920  # about 25 °C: T = raw / 340 + 36.53 on the MPU-6050

    def __init__(self, *args, gyro_startup_s: float | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.FIFO_CAPACITY = 1024 if self.who_am_i == 0x68 else 512
        # The gyroscope needs 60 ms (6050) / 70 ms (6500, 9250) after leaving sleep before its
        # readings are valid (Linux inv_mpu_iio.h INV_MPU6050/6500_GYRO_STARTUP_TIME); until
        # then this fake, like a part still settling, reports zero rate.
        self.gyro_startup_s = gyro_startup_s if gyro_startup_s is not None else (
            0.060 if self.who_am_i == 0x68 else 0.070)
        self._awake_at = -math.inf
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
        settling = t < self._awake_at + self.gyro_startup_s
        for axis, bit in enumerate((0x40, 0x20, 0x10)):
            if en & bit:
                g = self.quantise(si[:, 3 + axis:4 + axis], g_lsb)
                g[settling] = 0
                cols.append(g)
        return np.hstack(cols).astype(">i2").tobytes()

    def on_overflow(self, dropped_bytes):
        super().on_overflow(dropped_bytes)
        if self.regs[0x38] & 0x10:           # FIFO_OFLOW_EN
            self.regs[0x3A] |= 0x10          # FIFO_OFLOW_INT

    def write_register(self, reg, value):
        if reg == 0x6B and value & 0x80:     # DEVICE_RESET
            self._power_on()
            return
        if reg == 0x6B and self.regs[0x6B] & 0x40 and not value & 0x40:
            self._awake_at = self.clock.time()   # leaving sleep: the gyroscope starts up
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
