"""Fake ST LSM6DS3 / LSM6DSL / LSM6DSOX: register files and FIFOs from the datasheets."""

from __future__ import annotations

import math

import numpy as np

from edged.fakes.imu.bus import FakeChip
from edged.sources.imu import STANDARD_GRAVITY

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
    """LSM6DS3 (WHO_AM_I 0x69, 8 kbyte FIFO), LSM6DS3H (0x69 too, 4 kbyte: `fifo_bytes=4096`) or
    LSM6DSL/LSM6DS3TR-C (0x6A, 4 kbyte): FIFO of 16-bit words in a gyro XYZ, accel XYZ pattern;
    continuous mode drops the oldest words.

    The accelerometer filter bits are read as the part at hand reads them (`accel_bandwidth`):
    on the DS3/DS3H, CTRL1_XL[1:0] is BW_XL, used when CTRL4_C[7] (XL_BW_SCAL_ODR) is set; on
    the DSL/DS3TR-C (ST lsm6dsl_reg.h), CTRL1_XL[1] is LPF1_BW_SEL (ODR/4), CTRL1_XL[0] BW0_XL
    (analog band), CTRL4_C[7] DEN_XL_EN and CTRL8_XL holds LPF2. A DS3-only setting written to a
    DSL is therefore misread just as the real part misreads it, and DS3-only bits that mean
    something else on the DSL are listed in `foreign_bits`."""

    DEFAULTS = {0x0F: 0x69, 0x12: 0x04}
    DSL_HPCF_DIV = {0b00: 50, 0b01: 100, 0b10: 9, 0b11: 400}

    def __init__(self, *args, fifo_bytes: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.FIFO_CAPACITY = fifo_bytes or (8192 if self.who_am_i == 0x69 else 4096)
        self.dsl = self.who_am_i == 0x6A
        self.foreign_bits: list[str] = []
        self._head = 0          # pattern position of the oldest word in the FIFO
        self._overrun = False

    def accel_bandwidth(self) -> float | None:
        """The accelerometer's low-pass cut-off (Hz) the registers select on this part; None when
        it follows the ODR by itself (DS3 with XL_BW_SCAL_ODR clear)."""
        odr = _ST_ODR.get(self.regs[0x10] >> 4)
        if odr is None:
            return None
        ctrl1 = self.regs[0x10]
        if not self.dsl:
            return (400.0, 200.0, 100.0, 50.0)[ctrl1 & 3] if self.regs[0x13] & 0x80 else None
        ctrl8 = self.regs[0x17]
        if ctrl8 & 0x80:                              # LPF2_XL_EN
            return odr / self.DSL_HPCF_DIV[(ctrl8 >> 5) & 3]
        return odr / 4 if ctrl1 & 0x02 else odr / 2   # LPF1_BW_SEL

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
        if self.dsl and reg == 0x13 and value & 0x80:
            self.foreign_bits.append("CTRL4_C[7] DEN_XL_EN (the LSM6DS3's XL_BW_SCAL_ODR)")
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

    def __init__(self, *args, word_order: str = "accel-first", gyro_startup_s: float = 0.07,
                 bootstrap_s: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.FIFO_CAPACITY = self.CAPACITY_WORDS * self.WORD
        self.word_order = word_order
        self.gyro_startup_s = gyro_startup_s
        # For `bootstrap_s` after its start-up, the gyroscope's words carry the invalid bootstrap
        # values 0x7ffd-0x7fff on every axis (what Linux st_lsm6dsx drops) instead of readings.
        self.bootstrap_s = bootstrap_s
        self.bootstrap_words = 0
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
                started = on_at + self.gyro_startup_s
                raw = self.quantise(si[:, 3:], g_lsb)
                boot = (t >= started) & (t < started + self.bootstrap_s)
                if boot.any():
                    raw[boot] = (0x7FFD + np.arange(int(boot.sum())) % 3)[:, None]
                    self.bootstrap_words += int(boot.sum())
                words.append((0x01, raw, t >= started))
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
