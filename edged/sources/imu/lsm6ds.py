"""Drivers for the ST LSM6DS family (accelerometer + gyroscope over I²C, read through the FIFO):
`Lsm6ds3` for the LSM6DS3 (and the register-compatible LSM6DSL / LSM6DS3TR-C), `Lsm6dsox` for the
LSM6DSOX / LSM6DSO.

Written from:
- LSM6DS3 datasheet, DocID026899 Rev 8 (February 2016), and application note AN4650
  (DocID027415 Rev 1), chapter 8 "First-in first-out (FIFO) buffer";
- LSM6DSL datasheet, DocID028475 Rev 7, §5.5 (same FIFO registers, 4 kbyte FIFO) and §9
  (register description: CTRL1_XL, CTRL4_C, CTRL8_XL differ from the LSM6DS3's), checked
  against ST's reference drivers (STMems_Standard_C_Drivers lsm6dsl_reg.h, lsm6ds3tr_c_reg.h,
  lsm6dsox_reg.h) and the Linux IIO driver drivers/iio/imu/st_lsm6dsx/ (st_lsm6dsx_core.c
  settings table, st_lsm6dsx_buffer.c FIFO reads);
- LSM6DSOX datasheet DS12814, §6.5 (FIFO) and §9 (register description).

Both generations share the control registers used here (CTRL1_XL/CTRL2_G/CTRL3_C: ODR, full
scale, BDU, auto-increment) and the sensitivities (0.061 mg/LSB at ±2 g doubling per range step;
8.75 mdps/LSB at ±245/250 dps doubling per range step, 4.375 at ±125). They differ in the FIFO:

- LSM6DS3/DSL: untagged 16-bit words in a fixed pattern, gyroscope XYZ then accelerometer XYZ
  per sample, little-endian; FIFO_STATUS1..4 give the unread word count, overrun flag and the
  pattern position of the next word. A burst read of FIFO_DATA_OUT_L/H wraps around those two
  registers, so one transfer drains many words.
- LSM6DSOX/DSO: 7-byte words, a tag byte (sensor in TAG_SENSOR[7:3]: 0x01 gyroscope, 0x02
  accelerometer) and 6 data bytes; a burst from FIFO_DATA_OUT_TAG wraps over the 7 registers. The
  two sensors' words interleave, so samples are paired by tag, not by position. Words of
  0x7ffd-0x7fff are bootstrap samples, not measurements (Linux st_lsm6dsx_buffer.c drops them):
  edged drops them too and counts them (`invalid_samples`).

In continuous mode both drop the oldest data when full and raise an overrun flag.
"""

from __future__ import annotations

import logging

import numpy as np

from edged.sources.imu import ChipSettings, Chip, nearest
from edged.sources.imu.registers import Bit, Field
from edged.service.log import fields

log = logging.getLogger("edged.imu")

WHO_AM_I = 0x0F
CTRL1_XL = 0x10
CTRL2_G = 0x11
CTRL3_C = 0x12
CTRL4_C = 0x13
FIFO_STATUS1 = 0x3A

# ODR_XL / ODR_G / ODR_FIFO / BDR codes, common to both generations (rate in Hz -> code).
ODR_CODE = {12.5: 1, 26.0: 2, 52.0: 3, 104.0: 4, 208.0: 5, 416.0: 6, 833.0: 7, 1660.0: 8}
# FS_XL codes and sensitivities (mg/LSB)
ACCEL_CODE = {2.0: 0b00, 16.0: 0b01, 4.0: 0b10, 8.0: 0b11}
ACCEL_MG_PER_LSB = {2.0: 0.061, 4.0: 0.122, 8.0: 0.244, 16.0: 0.488}
# FS_G codes (125 dps is the separate FS_125 bit) and sensitivities (mdps/LSB)
GYRO_MDPS_PER_LSB = {125.0: 4.375, 250.0: 8.75, 500.0: 17.50, 1000.0: 35.0, 2000.0: 70.0}
GYRO_CODE = {250.0: 0b00, 500.0: 0b01, 1000.0: 0b10, 2000.0: 0b11}

CTRL3_BDU_IF_INC = 0b0100_0100  # block data update + register auto-increment (burst reads)
FIFO_CONTINUOUS = 0b110         # FIFO_MODE: continuous, the newest data overwrite the oldest
FIFO_BYPASS = 0b000             # FIFO_MODE: bypass, which also empties the FIFO


class _Lsm6ds(Chip):
    ADDRESSES = (0x6A, 0x6B)  # SDO/SA0 low / high
    ID_REGISTER = WHO_AM_I
    FS_G0_DPS = 250.0  # what the datasheet calls FS_G = 00 (same 8.75 mdps/LSB either way)

    odr_xl = Field(CTRL1_XL, 4, 4)
    fs_xl = Field(CTRL1_XL, 2, 2)
    odr_g = Field(CTRL2_G, 4, 4)
    fs_g = Field(CTRL2_G, 2, 2)
    fs_125 = Bit(CTRL2_G, 1)
    sw_reset = Bit(CTRL3_C, 0)

    def configure(self, *, rate_hz, accel_range_g, gyro_range_dps, lpf_hz) -> ChipSettings:
        self.sw_reset = True
        self.clock.sleep(0.05)  # SW_RESET clears itself within ~50 µs; boot is slower
        if self.sw_reset:
            self.clock.sleep(0.1)
        self.write_u8(CTRL3_C, CTRL3_BDU_IF_INC)

        rate, odr = nearest(ODR_CODE, rate_hz)
        a_range, a_code = nearest(ACCEL_CODE, accel_range_g)
        g_range, _ = nearest(GYRO_MDPS_PER_LSB, gyro_range_dps)
        accel_lpf, ctrl1_low = self._accel_filter(rate, lpf_hz)
        self.write_u8(CTRL1_XL, odr << 4 | a_code << 2 | ctrl1_low)
        g_bits = 0b10 if g_range == 125.0 else GYRO_CODE[g_range] << 2  # FS_125 overrides FS_G
        self.write_u8(CTRL2_G, odr << 4 | g_bits)
        self._configure_fifo(odr)
        # The gyroscope needs tens of ms after power-up before its samples are valid; starting the
        # FIFO only then keeps both sensors' streams in step from the first sample.
        self.clock.sleep(0.1)

        self._set_scale(ACCEL_MG_PER_LSB[a_range] / 1000.0, GYRO_MDPS_PER_LSB[g_range] / 1000.0)
        self._odr_code = odr
        if lpf_hz is not None:
            log.info("gyroscope bandwidth follows the output rate; lpf_hz applies to the accelerometer only",
                     extra=fields(chip=self.variant))
        named_range = self.FS_G0_DPS if g_range == 250.0 else g_range
        return ChipSettings(chip=self.name, variant=self.variant, rate_hz=rate, accel_range_g=a_range,
                            gyro_range_dps=named_range, accel_lpf_hz=accel_lpf, gyro_lpf_hz=None,
                            fifo_frames=self._fifo_samples)

    def _accel_filter(self, rate: float, lpf_hz: float | None) -> tuple[float | None, int]:
        raise NotImplementedError

    def _configure_fifo(self, odr: int) -> None:
        raise NotImplementedError

    def standby(self) -> None:
        self.write_u8(CTRL1_XL, 0)
        self.write_u8(CTRL2_G, 0)


class Lsm6ds3(_Lsm6ds):
    """LSM6DS3 / LSM6DS3H / LSM6DSL / LSM6DS3TR-C: untagged FIFO pattern (gyro XYZ, accel XYZ).

    The parts share the FIFO and the ODR/full-scale fields but not the filter bits, so each
    variant has its own map of CTRL1_XL[1:0], CTRL4_C[7] and CTRL8_XL:

    - LSM6DS3 / DS3H (WHO_AM_I 0x69): CTRL1_XL[1:0] is BW_XL, the anti-aliasing filter
      (400/200/100/50 Hz), in charge only with XL_BW_SCAL_ODR (CTRL4_C[7]) set; FS_G = 00 is
      ±245 °/s.
    - LSM6DSL / DS3TR-C (0x6A; ST's lsm6dsl_reg.h and lsm6ds3tr_c_reg.h `lsm6dsl_ctrl1_xl_t`,
      `lsm6dsl_ctrl4_c_t`, `lsm6dsl_ctrl8_xl_t`): CTRL1_XL bit 0 is BW0_XL (analog bandwidth) and
      bit 1 LPF1_BW_SEL (digital LPF1 at ODR/2 or ODR/4); CTRL4_C bit 7 is DEN_XL_EN (nothing to do
      with filtering); the second low-pass LPF2 is CTRL8_XL: LPF2_XL_EN (bit 7), HPCF_XL[6:5]
      (ODR/50, /100, /9, /400), INPUT_COMPOSITE (bit 3, 0 = low latency). FS_G = 00 is ±250 °/s.

    The LSM6DS3H answers 0x69 like the LSM6DS3 but its FIFO is half the size (4 kbyte against
    8 kbyte: 682 against 1365 six-byte data sets in the Linux st_lsm6dsx_core.c settings table,
    `max_fifo_size`). Nothing on the bus tells them apart (the kernel relies on the device
    tree), so edged plans for the smaller FIFO on every part: with the DS3's size assumed on a
    DS3H, the fill check after a burst would never fire and a whole-pattern overrun, which
    leaves the pattern position at 0, would slip timestamps without a trace.
    """

    name = "lsm6ds3"
    IDS = {0x69: "lsm6ds3", 0x6A: "lsm6dsl"}  # 0x69: LSM6DS3 or DS3H; 0x6A: LSM6DSL or DS3TR-C
    FIFO_BYTES = 4096  # the DS3H's and DSL's 4 kbyte (the DS3's 8 kbyte is never relied on)

    FIFO_CTRL3 = 0x08
    FIFO_CTRL5 = 0x0A
    FIFO_DATA_OUT_L = 0x3E
    CTRL8_XL = 0x17
    SAMPLE_WORDS = 6
    FIFO_WORDS = 2048  # 16-bit words in 4 kbyte
    # LSM6DS3 / DS3H
    DS3_XL_BW_SCAL_ODR = 0x80  # CTRL4_C[7]
    DS3_BW_XL = {400.0: 0b00, 200.0: 0b01, 100.0: 0b10, 50.0: 0b11}  # CTRL1_XL[1:0]
    # LSM6DSL / DS3TR-C
    DSL_LPF1_BW_SEL = 0x02     # CTRL1_XL[1]: LPF1 at ODR/4 instead of ODR/2
    DSL_LPF2_XL_EN = 0x80      # CTRL8_XL[7]
    DSL_HPCF_XL = {50: 0b00, 100: 0b01, 9: 0b10, 400: 0b11}  # CTRL8_XL[6:5], cut-off ODR / key

    dec_fifo_gyro = Field(FIFO_CTRL3, 3, 3)
    dec_fifo_xl = Field(FIFO_CTRL3, 0, 3)
    odr_fifo = Field(FIFO_CTRL5, 3, 4)
    fifo_mode = Field(FIFO_CTRL5, 0, 3)

    READBACK = {CTRL1_XL: "CTRL1_XL", CTRL2_G: "CTRL2_G", CTRL3_C: "CTRL3_C", CTRL4_C: "CTRL4_C",
                CTRL8_XL: "CTRL8_XL", FIFO_CTRL3: "FIFO_CTRL3"}

    _fifo_words = FIFO_WORDS
    _fifo_samples = FIFO_WORDS // SAMPLE_WORDS

    @property
    def FS_G0_DPS(self) -> float:  # noqa: N802 - the datasheets' name for FS_G = 00
        return 245.0 if self.variant == "lsm6ds3" else 250.0

    def _accel_filter(self, rate, lpf_hz):
        if self.variant == "lsm6ds3":
            return self._accel_filter_ds3(lpf_hz)
        return self._accel_filter_dsl(rate, lpf_hz)

    def _accel_filter_ds3(self, lpf_hz):
        if lpf_hz is None:
            # XL_BW_SCAL_ODR = 0: the anti-aliasing bandwidth follows the ODR by itself.
            self.write_u8(CTRL4_C, 0)
            return None, 0
        bw, code = nearest(self.DS3_BW_XL, lpf_hz)
        self.write_u8(CTRL4_C, self.DS3_XL_BW_SCAL_ODR)  # use BW_XL instead of the automatic band
        return bw, code

    def _accel_filter_dsl(self, rate, lpf_hz):
        self.write_u8(CTRL4_C, 0)
        if lpf_hz is None:
            self.write_u8(self.CTRL8_XL, 0)
            return rate / 2, 0                      # LPF1 alone at ODR/2
        # (cut-off, CTRL1_XL[1:0], CTRL8_XL) for each filter path
        options = {rate / 2: (0, 0), rate / 4: (self.DSL_LPF1_BW_SEL, 0)}
        for div, code in self.DSL_HPCF_XL.items():
            options.setdefault(rate / div, (0, self.DSL_LPF2_XL_EN | code << 5))
        cutoff = min(options, key=lambda c: (abs(c - lpf_hz), -c))
        ctrl1_low, ctrl8 = options[cutoff]
        self.write_u8(self.CTRL8_XL, ctrl8)
        return cutoff, ctrl1_low

    def _configure_fifo(self, odr: int) -> None:
        self.write_u8(self.FIFO_CTRL5, FIFO_BYPASS)
        self.set_fields(dec_fifo_gyro=1, dec_fifo_xl=1)  # both sensors, no decimation

    def fifo_reset(self) -> None:
        self.write_u8(self.FIFO_CTRL5, self._odr_code << 3 | FIFO_BYPASS)
        self.write_u8(self.FIFO_CTRL5, self._odr_code << 3 | FIFO_CONTINUOUS)
        self._overflow_in_read = False

    def _status(self) -> tuple[int, bool]:
        """(unread words, whether the stream overran or slipped), from FIFO_STATUS1..4."""
        s = self.read_block(FIFO_STATUS1, 4)  # FIFO_STATUS1..4 in one transfer
        words = s[0] | (s[1] & 0x0F) << 8
        overrun = bool(s[1] & 0x40)
        pattern = s[2] | (s[3] & 0x03) << 8
        # We only ever read whole samples, so the next word must be the first of a pattern
        # (gyroscope X); anything else means the stream slipped (overrun or a broken transfer).
        return words, overrun or pattern != 0

    def fifo_level(self) -> tuple[int, bool]:
        late = self._take_overflow_in_read()
        words, slipped = self._status()
        # No room for another sample in the FIFO planned for (the DS3H's) means it may have
        # overrun already; on an LSM6DS3 that errs towards an overflow only when this far behind.
        full = words + self.SAMPLE_WORDS > self._fifo_words
        return words // self.SAMPLE_WORDS, late or slipped or full

    def read_samples(self, n: int) -> np.ndarray:
        if n <= 0:
            return np.empty((0, 6), np.float32)
        raw = self.read_stream(self.FIFO_DATA_OUT_L, n * 12, 2).view("<i2").reshape(n, 6)
        # The FIFO went on filling after FIFO_STATUS sized this burst; had it overrun, the oldest
        # words went (continuous mode, AN4650 §8) and the burst no longer follows the previous
        # one. OVER_RUN only holds while the FIFO is full, and a whole-sample loss leaves the
        # pattern at 0, so also count: the words taken out plus those left must still leave room
        # for one more sample, else the FIFO was full in between (words arriving during the
        # transfer count as left, so this errs towards an overflow, and only near full).
        words, slipped = self._status()
        if slipped or (n + 1) * self.SAMPLE_WORDS + words > self._fifo_words:
            return self._drop_burst()
        return self._convert(raw, accel_col=3, gyro_col=0)


class Lsm6dsox(_Lsm6ds):
    """LSM6DSOX / LSM6DSO: tagged FIFO words, paired into samples by tag."""

    name = "lsm6dsox"
    IDS = {0x6C: "lsm6dsox"}  # LSM6DSO answers the same; LSM6DSO32 too, but its ranges differ
    WORD = 7
    FIFO_BYTES = 1024 * 7  # DIFF_FIFO is 10 bits: never more than 1023 words waiting

    FIFO_CTRL3 = 0x09
    FIFO_CTRL4 = 0x0A
    CTRL8_XL = 0x17
    FIFO_DATA_OUT_TAG = 0x78
    TAG_GYRO = 0x01
    TAG_ACCEL = 0x02
    LPF2_XL_EN = 0x02  # CTRL1_XL[1]
    # CTRL8_XL HPCF_XL[7:5] with LPF2 on: cut-off = ODR / divisor
    LPF2_DIVISOR = {4: 0b000, 10: 0b001, 20: 0b010, 45: 0b011, 100: 0b100, 200: 0b101,
                    400: 0b110, 800: 0b111}

    # Tagged words holding one of these on every axis are not measurements: the Linux driver
    # (st_lsm6dsx_buffer.c, tagged FIFO read) drops samples of 0x7ffd-0x7fff as invalid
    # bootstrap samples the part emits while a sensor starts. A real reading pinned at full
    # scale on one or two axes is kept.
    INVALID_MIN = 0x7FFD
    READBACK = {CTRL1_XL: "CTRL1_XL", CTRL2_G: "CTRL2_G", CTRL3_C: "CTRL3_C", CTRL8_XL: "CTRL8_XL",
                FIFO_CTRL3: "FIFO_CTRL3"}

    bdr_gy = Field(FIFO_CTRL3, 4, 4)
    bdr_xl = Field(FIFO_CTRL3, 0, 4)
    fifo_mode = Field(FIFO_CTRL4, 0, 3)

    def __init__(self, *args, **kwargs) -> None:
        self._pending_g = np.empty((0, 3), np.int16)
        self._pending_a = np.empty((0, 3), np.int16)
        self._words = 0
        self._desync = False
        super().__init__(*args, **kwargs)

    # Words that the FIFO holds before it overruns. The datasheet sizes the FIFO in bytes for the
    # whole feature set ("up to 9 kbyte"); we plan for the 512-word figure the Linux st_lsm6dsx
    # driver uses, which only makes bursts smaller than they could be.
    _fifo_samples = 256

    def _accel_filter(self, rate, lpf_hz):
        if lpf_hz is None:
            self.write_u8(self.CTRL8_XL, 0)
            return rate / 2, 0          # LPF1 only: ODR/2
        options = {rate / d: code for d, code in self.LPF2_DIVISOR.items()}
        options[rate / 2] = None
        cutoff, code = nearest(options, lpf_hz)
        if code is None:
            self.write_u8(self.CTRL8_XL, 0)
            return cutoff, 0
        self.write_u8(self.CTRL8_XL, code << 5)
        return cutoff, self.LPF2_XL_EN

    def _configure_fifo(self, odr: int) -> None:
        self.write_u8(self.FIFO_CTRL4, FIFO_BYPASS)
        self.write_u8(self.FIFO_CTRL3, odr << 4 | odr)  # batch gyro and accel at the ODR

    def fifo_reset(self) -> None:
        self.write_u8(self.FIFO_CTRL4, FIFO_BYPASS)
        self.write_u8(self.FIFO_CTRL4, FIFO_CONTINUOUS)
        self._pending_g = self._pending_g[:0]
        self._pending_a = self._pending_a[:0]
        self._words = 0
        self._desync = False
        self._overflow_in_read = False

    def fifo_level(self) -> tuple[int, bool]:
        late = self._take_overflow_in_read()
        s = self.read_block(FIFO_STATUS1, 2)
        self._words = s[0] | (s[1] & 0x03) << 8
        # FIFO_OVR_IA (bit 6) while overrun; FIFO_OVR_LATCHED (bit 3) until this read
        overflow = late or bool(s[1] & 0x48) or self._desync
        return (self._words + len(self._pending_g) + len(self._pending_a)) // 2, overflow

    def read_samples(self, n: int) -> np.ndarray:
        words = min(self._words, len(self._stream) // self.WORD)
        self._words -= words
        if words:
            raw = self.read_stream(self.FIFO_DATA_OUT_TAG, words * self.WORD, self.WORD).reshape(words, self.WORD)
            # An overrun after fifo_level read FIFO_STATUS2 dropped the oldest words, so this
            # burst no longer follows the previous one. FIFO_OVR_LATCHED holds until FIFO_STATUS2
            # is read again (DS12814 §9, FIFO_STATUS2 (3Bh)): one more read tells.
            if self.read_u8(FIFO_STATUS1 + 1) & 0x08:
                self._pending_g = self._pending_g[:0]
                self._pending_a = self._pending_a[:0]
                return self._drop_burst()
            tags = raw[:, 0] >> 3
            data = np.ascontiguousarray(raw[:, 1:]).view("<i2")  # (words, 3)
            g = data[tags == self.TAG_GYRO]
            a = data[tags == self.TAG_ACCEL]
            if len(self._pending_g):
                g = np.concatenate([self._pending_g, g])
            if len(self._pending_a):
                a = np.concatenate([self._pending_a, a])
        else:
            g, a = self._pending_g, self._pending_a
        k = min(len(g), len(a))
        out = np.empty((k, 6), dtype=np.float32)
        np.multiply(a[:k], self.scale[:3], out=out[:, :3])
        np.multiply(g[:k], self.scale[3:], out=out[:, 3:])
        # A sample whose accelerometer or gyroscope half is a bootstrap word is no measurement;
        # it still held its batch slot, so it is marked (the source stamps, then drops it).
        bad = (a[:k] >= self.INVALID_MIN).all(axis=1) | (g[:k] >= self.INVALID_MIN).all(axis=1)
        self.invalid = bad if bad.any() else None
        self._pending_g = g[k:].copy()
        self._pending_a = a[k:].copy()
        # Both sensors batch at the same rate, so at most one half-sample can be waiting; more
        # means one stream stopped or slipped and pairing by order is no longer sound.
        if len(self._pending_g) > 2 or len(self._pending_a) > 2:
            self._desync = True
        return out
