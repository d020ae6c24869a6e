"""Fake Bosch BMI160: register file and headerless FIFO from the datasheet."""

from __future__ import annotations

import math

import numpy as np

from edged.fakes.imu.bus import FakeChip
from edged.sources.imu import STANDARD_GRAVITY


SUSPENDED_WRITE_GAP_S = 450e-6  # datasheet §3.2.4; Linux bmi160_core.c BMI160_SUSPENDED_WRITE_USLEEP


class FakeBmi160(FakeChip):
    """BMI160 (CHIP_ID 0xD1), per BST-BMI160-DS000-07: sensors start suspended until the CMD
    register wakes them; headerless FIFO frames GYR XYZ + ACC XYZ, little-endian; a full FIFO
    discards its oldest whole frame; reading past the end returns 0x80; the byte counter moves
    on whole frames only.

    While neither sensor is in normal mode (after power-on or a soft reset, in suspend), the
    interface needs 450 µs between two writes (§3.2.4, "idle time between write accesses"; the
    condition Bosch's BMI160_SensorAPI `bmi160_set_regs` applies): a write sooner than that after
    the previous one is ignored and counted in `dropped_writes`, as the real part would lose it.
    In normal mode the 2 µs gap is always met by the bus transfer itself, so it is not checked."""

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

    dropped_writes = 0
    _last_write: float | None = None

    def write(self, reg, value):
        now = self.clock.monotonic()
        suspended = not (self.acc_normal or self.gyr_normal)
        if suspended and self._last_write is not None and now - self._last_write < SUSPENDED_WRITE_GAP_S:
            self.dropped_writes += 1
            return
        super().write(reg, value)
        self._last_write = now

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
