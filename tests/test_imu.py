"""IMU chip drivers and the IMU source, run against the fake chips (edged/fakes/imu.py) on a
simulated clock. Expected register values, scale factors and byte layouts are written here from
the datasheets, independently of the driver and fake code they check."""

from __future__ import annotations

import errno
import logging
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edged.sources.imu import ImuError, STANDARD_GRAVITY as G
from edged.sources.imu.bmi160 import Bmi160
from edged.fakes.imu import FakeBus, FakeBmi160, FakeLsm6ds3, FakeLsm6dsox, FakeMpu6050, SimClock, make_factory
from edged.sources.imu.lsm6ds import Lsm6ds3, Lsm6dsox
from edged.sources.imu.mpu6050 import Mpu6050
from edged.sources.imu.registers import Bit, Field, RegisterDevice, Word
from edged.sources.imu.source import ImuSource

REPO = Path(__file__).resolve().parent.parent
DEG = math.pi / 180

# chip -> (driver variant name, default address, nominal rate for 100 Hz asked,
#          accel LSB at ±4 g in m/s², gyro LSB at ±500 °/s in rad/s)     [datasheet figures]
CHIPS = {
    "mpu6050": ("mpu6050", 0x68, 100.0, G / 8192, DEG / 65.5),
    "mpu6500": ("mpu6500", 0x68, 100.0, G / 8192, DEG / 65.5),
    "mpu9250": ("mpu9250", 0x68, 100.0, G / 8192, DEG / 65.5),
    "lsm6ds3": ("lsm6ds3", 0x6A, 104.0, 0.122e-3 * G, 17.50e-3 * DEG),
    "lsm6ds3h": ("lsm6ds3", 0x6A, 104.0, 0.122e-3 * G, 17.50e-3 * DEG),  # answers 0x69 as the DS3 does
    "lsm6dsl": ("lsm6dsl", 0x6A, 104.0, 0.122e-3 * G, 17.50e-3 * DEG),
    "lsm6dsox": ("lsm6dsox", 0x6A, 104.0, 0.122e-3 * G, 17.50e-3 * DEG),
    "bmi160": ("bmi160", 0x69, 100.0, G / 8192, DEG / 65.6),
}
# the register each driver streams the FIFO from, and a status register it polls
FIFO_REG = {"mpu": 0x74, "lsm6ds3": 0x3E, "lsm6ds3h": 0x3E, "lsm6dsl": 0x3E, "lsm6dsox": 0x78, "bmi160": 0x24}
STATUS_REG = {"mpu": 0x72, "lsm6ds3": 0x3A, "lsm6ds3h": 0x3A, "lsm6dsl": 0x3A, "lsm6dsox": 0x3A, "bmi160": 0x22}


def reg_key(chip: str) -> str:
    return "mpu" if chip.startswith("mpu") else chip


def open_source(chip: str, *, source_chip: str = "auto", clock=None, **kw):
    fake_kw = {k: kw.pop(k) for k in ("who_am_i", "odr_error", "address", "motion", "motion_csv", "word_order",
                                      "gyro_startup_s", "bootstrap_s", "fifo_bytes") if k in kw}
    clock = clock or SimClock()
    factory = make_factory(chip, clock=clock, record=True, **fake_kw)
    return ImuSource(chip=source_chip, smbus_factory=factory, **kw), factory, clock


def collect(src: ImuSource, clock: SimClock, seconds: float):
    end = clock.time() + seconds
    ts, data = [], []
    while clock.time() < end:
        b = src.read(timeout=0.5)
        if b is not None and len(b):
            ts.append(b.t)
            data.append(b.data)
    if not ts:
        return np.empty(0), np.empty((0, 6), np.float32)
    return np.concatenate(ts), np.concatenate(data)


def truth(factory, run: int, n: int):
    """True times and motion of the first n samples the chip pushed after FIFO reset `run`
    (-1: the last reset, -2 the one before...)."""
    start = factory.chip.pushed_at_reset[run]
    t = factory.chip.true_times()[start:start + n]
    assert len(t) == n
    return t, factory.chip.motion(t)


def assert_motion(data, expected, a_lsb, g_lsb):
    err = np.abs(data.astype(np.float64) - expected)
    assert err[:, :3].max() <= a_lsb / 2 + 1e-5, err[:, :3].max()
    assert err[:, 3:].max() <= g_lsb / 2 + 1e-6, err[:, 3:].max()


# --- register helper --------------------------------------------------------------------------

class _Regs(RegisterDevice):
    low = Field(0x10, 0, 3)
    high = Field(0x10, 4, 4)
    flag = Bit(0x10, 3)
    status = Field(0x11, readonly=True)
    level = Word(0x12, 2, "big", mask=0x0FFF)


class _DictBus:
    def __init__(self):
        self.mem = bytearray(256)
        self.writes = []

    def read_byte_data(self, addr, reg):
        return self.mem[reg]

    def write_byte_data(self, addr, reg, value):
        self.writes.append((reg, value))
        self.mem[reg] = value

    def read_i2c_block_data(self, addr, reg, n):
        return list(self.mem[reg:reg + n])


def test_register_fields_read_modify_write_like_the_register_map():
    bus = _DictBus()
    dev = _Regs(bus, 0x50)
    bus.mem[0x10] = 0b1010_0101
    assert dev.low == 0b101 and dev.high == 0b1010 and dev.flag is False
    dev.flag = True
    assert bus.mem[0x10] == 0b1010_1101          # other bits kept
    dev.set_fields(low=0b010, high=0b0001)       # one write for two fields of one register
    assert bus.mem[0x10] == 0b0001_1010 and bus.writes[-1] == (0x10, 0b0001_1010)
    assert len(bus.writes) == 2
    bus.mem[0x12:0x14] = bytes([0xF1, 0x23])
    assert dev.level == 0x123                    # masked, big-endian, one block read
    with pytest.raises(ValueError, match="high: 16 does not fit in 4 bit"):
        dev.high = 16
    with pytest.raises(AttributeError, match="read-only"):
        dev.status = 1
    assert repr(_Regs.high) == "<high 0x10[7:4]>"


# --- identification -----------------------------------------------------------------------------

@pytest.mark.parametrize("chip", list(CHIPS))
def test_identifies_chip(chip):
    variant, address, rate, *_ = CHIPS[chip]
    src, factory, _ = open_source(chip)
    assert src.chip_name == variant
    assert src.address == address
    assert src.settings.rate_hz == rate
    src.close()


@pytest.mark.parametrize("chip, driver", [("mpu6050", "mpu6050"), ("lsm6ds3", "lsm6ds3"),
                                          ("lsm6dsox", "lsm6dsox"), ("bmi160", "bmi160")])
def test_refuses_wrong_who_am_i_in_one_line(chip, driver):
    _, address, *_ = CHIPS[chip]
    with pytest.raises(ImuError) as exc:
        open_source(chip, source_chip=driver, who_am_i=0x12, address=address)
    msg = str(exc.value)
    assert "\n" not in msg
    assert "expected" in msg and "read 0x12" in msg
    assert f"bus 1 address 0x{address:02x}" in msg


def test_refuses_a_different_chip_than_configured():
    with pytest.raises(ImuError, match=r"not a bmi160: expected ID 0xd1 \(bmi160\) in register 0x00, read 0x00"):
        open_source("mpu6050", source_chip="bmi160")


def test_no_device_and_unknown_chip_name_are_one_line_errors():
    clock = SimClock()
    empty = make_factory("mpu6050", clock=clock, bus_number=3)   # nothing on bus 1
    with pytest.raises(ImuError) as exc:
        ImuSource(chip="auto", bus=1, smbus_factory=empty)
    assert "no supported IMU on I2C bus 1 (0x68: no answer; 0x69: no answer; 0x6a: no answer; 0x6b: no answer)" \
        in str(exc.value)
    with pytest.raises(ImuError, match="0x68: no mpu6050 answers"):
        ImuSource(chip="mpu6050", bus=1, address=0x68, smbus_factory=empty)
    with pytest.raises(ImuError, match="unknown chip 'icm42688'"):
        ImuSource(chip="icm42688", smbus_factory=empty)


# --- auto-scan -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fake, address, variant", [
    (FakeMpu6050, 0x68, "mpu6050"), (FakeMpu6050, 0x69, "mpu6050"),
    (FakeBmi160, 0x68, "bmi160"), (FakeBmi160, 0x69, "bmi160"),
    (FakeLsm6ds3, 0x6A, "lsm6ds3"), (FakeLsm6ds3, 0x6B, "lsm6ds3"),
    (FakeLsm6dsox, 0x6A, "lsm6dsox"), (FakeLsm6dsox, 0x6B, "lsm6dsox"),
])
def test_auto_scan_finds_each_chip_at_each_of_its_addresses(fake, address, variant):
    clock = SimClock()
    bus = FakeBus(1)
    bus.attach(address, fake(clock))
    src = ImuSource(chip="auto", bus=bus, clock=clock)
    assert (src.chip_name, src.address) == (variant, address)
    src.close()
    assert not bus.closed   # a bus handed in is the caller's to close


def test_auto_scan_skips_an_unknown_device_and_reports_what_answered():
    clock = SimClock()
    bus = FakeBus(1)
    bus.attach(0x68, FakeMpu6050(clock, who_am_i=0x12))  # something else at 0x68 (an RTC, say)
    bus.attach(0x6B, FakeLsm6dsox(clock))
    src = ImuSource(chip="auto", bus=bus, clock=clock)
    assert (src.chip_name, src.address) == ("lsm6dsox", 0x6B)
    del bus.devices[0x6B]
    with pytest.raises(ImuError, match=r"0x68: reg 0x75=0x12, reg 0x00=0x00; 0x69: no answer"):
        ImuSource(chip="auto", bus=bus, clock=clock)


# --- configuration, checked in the fake's registers ---------------------------------------------

def test_mpu6050_registers():
    src, f, _ = open_source("mpu6050", rate_hz=100, accel_range_g=4, gyro_range_dps=500)
    r = f.chip.regs
    assert r[0x19] == 9                      # SMPLRT_DIV: 1 kHz / (1 + 9) = 100 Hz
    assert r[0x1A] & 7 == 3                  # DLPF_CFG 3: 44/42 Hz, the widest below 50 Hz
    assert r[0x1B] == 0x08 and r[0x1C] == 0x08  # FS_SEL = 1 (±500 °/s), AFS_SEL = 1 (±4 g)
    assert r[0x23] == 0x78                   # FIFO_EN: XG YG ZG ACCEL
    assert r[0x38] & 0x10                    # FIFO_OFLOW_EN
    assert r[0x6B] == 0x01                   # awake, PLL with X gyro
    src.close()
    assert f.chip.regs[0x6B] & 0x40          # close puts it to sleep
    assert f.bus.closed

    src, f, _ = open_source("mpu6050", rate_hz=190, accel_range_g=10, gyro_range_dps=1800, lpf_hz=22)
    r = f.chip.regs
    assert r[0x19] == 4 and src.settings.rate_hz == 200.0   # nearest: 1000/5
    assert r[0x1C] == 0x10 and src.settings.accel_range_g == 8.0
    assert r[0x1B] == 0x18 and src.settings.gyro_range_dps == 2000.0
    assert r[0x1A] & 7 == 4 and src.settings.gyro_lpf_hz == 20.0


def test_mpu6500_sets_its_separate_accel_filter():
    src, f, _ = open_source("mpu6500", rate_hz=100)
    assert f.chip.regs[0x1D] == 3            # ACCEL_CONFIG2: A_DLPF_CFG 3 (44.8 Hz), FCHOICE_B 0
    assert src.settings.accel_lpf_hz == 44.8 and src.settings.fifo_frames == 512 // 12


def test_lsm6ds3_registers():
    src, f, _ = open_source("lsm6ds3", rate_hz=100, accel_range_g=4, gyro_range_dps=500)
    r = f.chip.regs
    assert r[0x10] == 0x48                   # CTRL1_XL: ODR 104 Hz (0100), FS ±4 g (10)
    assert r[0x11] == 0x44                   # CTRL2_G: ODR 104 Hz, FS ±500 °/s (01)
    assert r[0x12] & 0x44 == 0x44            # CTRL3_C: BDU, IF_INC
    assert r[0x08] == 0x09                   # FIFO_CTRL3: no decimation for gyro and accel
    src.read(0.2)
    assert r[0x0A] == (0b0100 << 3) | 0b110  # FIFO_CTRL5: FIFO ODR 104 Hz, continuous mode

    src, f, _ = open_source("lsm6ds3", rate_hz=400, accel_range_g=16, gyro_range_dps=125, lpf_hz=90)
    r = f.chip.regs
    assert r[0x10] == (0b0110 << 4) | (0b01 << 2) | 0b10  # 416 Hz, ±16 g, BW_XL 100 Hz
    assert r[0x13] & 0x80                    # XL_BW_SCAL_ODR: BW_XL in charge
    assert r[0x11] == (0b0110 << 4) | 0b10   # FS_125
    assert (src.settings.gyro_range_dps, src.settings.accel_lpf_hz) == (125.0, 100.0)


def test_lsm6dsox_registers():
    src, f, _ = open_source("lsm6dsox", rate_hz=200, accel_range_g=2, gyro_range_dps=2000, lpf_hz=21)
    r = f.chip.regs
    assert r[0x10] == (0b0101 << 4) | 0b10   # 208 Hz, ±2 g, LPF2_XL_EN
    assert r[0x17] >> 5 == 0b001             # HPCF_XL: ODR/10 = 20.8 Hz
    assert r[0x11] == (0b0101 << 4) | (0b11 << 2)
    assert r[0x09] == 0x55                   # FIFO_CTRL3: BDR_GY = BDR_XL = 208 Hz
    src.read(0.2)
    assert r[0x0A] & 7 == 0b110              # FIFO_CTRL4: continuous
    assert src.settings.accel_lpf_hz == pytest.approx(20.8)


def test_bmi160_registers():
    src, f, _ = open_source("bmi160", rate_hz=100, accel_range_g=4, gyro_range_dps=500)
    r = f.chip.regs
    assert r[0x40] == 0x28 and r[0x42] == 0x28  # normal filter mode, ODR 100 Hz (0x8)
    assert r[0x41] == 0b0101 and r[0x43] == 0b010  # ±4 g, ±500 °/s
    assert r[0x47] == 0xC0                   # FIFO: gyro + accel, headerless
    assert f.chip.acc_normal and f.chip.gyr_normal
    src, f, _ = open_source("bmi160", rate_hz=1000, accel_range_g=16, gyro_range_dps=125, lpf_hz=170)
    assert f.chip.regs[0x40] == (0b001 << 4) | 11   # 800 Hz, OSR2 (cut-off ~162 Hz)
    assert (f.chip.regs[0x41], f.chip.regs[0x43]) == (0b1100, 0b100)


# --- datasheet rules the fakes enforce ----------------------------------------------------------

def test_fake_bmi160_ignores_a_write_too_soon_after_another_while_suspended():
    # BMI160 datasheet §3.2.4: ≥ 450 µs between writes unless a sensor is in normal mode.
    clock = SimClock()
    bus = FakeBus(1)
    dev = bus.attach(0x69, FakeBmi160(clock))
    bus.write_byte_data(0x69, 0x41, 0b0101)      # ACC_RANGE ±4 g: the first write is taken
    bus.write_byte_data(0x69, 0x43, 0b010)       # GYR_RANGE at once after it: lost
    assert (dev.regs[0x41], dev.regs[0x43], dev.dropped_writes) == (0b0101, 0b000, 1)
    clock.advance(500e-6)
    bus.write_byte_data(0x69, 0x43, 0b010)
    assert dev.regs[0x43] == 0b010
    clock.advance(500e-6)
    bus.write_byte_data(0x69, 0x7E, 0x11)        # accelerometer to normal mode ...
    bus.write_byte_data(0x69, 0x41, 0b1000)      # ... and writes may follow at bus speed
    bus.write_byte_data(0x69, 0x43, 0b001)
    assert (dev.regs[0x41], dev.regs[0x43], dev.dropped_writes) == (0b1000, 0b001, 1)


def test_bmi160_configuration_is_not_lost_to_the_suspend_mode_write_gap():
    src, f, clock = open_source("bmi160", rate_hz=100, accel_range_g=4, gyro_range_dps=500)
    r = f.chip.regs
    assert f.chip.dropped_writes == 0
    assert (r[0x40], r[0x41], r[0x42], r[0x43]) == (0x28, 0b0101, 0x28, 0b010)
    # what the driver scales for is what the chip measures in: ±4 g, ±500 °/s
    t, data = collect(src, clock, 1.0)
    true_t, expected = truth(f, -1, len(t))
    assert_motion(data, expected, G / 8192, DEG / 65.6)


@pytest.mark.parametrize("lpf_hz", [None, 60.0, 26.0, 11.0, 2.0, 0.3])
def test_lsm6dsl_filter_bits_are_the_dsls_not_the_ds3s(lpf_hz):
    # LSM6DSL / DS3TR-C (ST lsm6dsl_reg.h): CTRL1_XL[1] LPF1_BW_SEL, [0] BW0_XL; CTRL4_C[7]
    # DEN_XL_EN; LPF2 in CTRL8_XL. The cut-off edged reports is the one the part applies.
    src, f, _ = open_source("lsm6dsl", rate_hz=100, lpf_hz=lpf_hz)
    assert f.chip.foreign_bits == []
    assert f.chip.regs[0x10] & 0x01 == 0                     # BW0_XL: analog band left at 1.5 kHz
    assert src.settings.accel_lpf_hz == pytest.approx(f.chip.accel_bandwidth())
    if lpf_hz is not None and lpf_hz >= 2.0:
        assert abs(src.settings.accel_lpf_hz - lpf_hz) / lpf_hz < 0.2  # a path close to what was asked


@pytest.mark.parametrize("lpf_hz", [None, 400.0, 190.0, 100.0, 40.0])
def test_lsm6ds3_filter_bits_are_the_ds3s(lpf_hz):
    src, f, _ = open_source("lsm6ds3", rate_hz=400, lpf_hz=lpf_hz)
    assert src.settings.accel_lpf_hz == f.chip.accel_bandwidth()


@pytest.mark.parametrize("chip, dps", [("lsm6ds3", 245.0), ("lsm6ds3h", 245.0), ("lsm6dsl", 250.0),
                                       ("lsm6dsox", 250.0)])
def test_st_smallest_gyro_range_is_named_as_each_datasheet_names_it(chip, dps):
    src, f, _ = open_source(chip, gyro_range_dps=250)
    assert src.settings.gyro_range_dps == dps and (f.chip.regs[0x11] >> 1) & 0b111 == 0


def test_lsm6ds3h_is_planned_for_with_its_smaller_fifo():
    # DS3 and DS3H both answer 0x69; the DS3H holds 4 kbyte (Linux st_lsm6dsx: 682 data sets
    # against the DS3's 1365), and nothing on the bus tells them apart: plan for the smaller.
    for chip in ("lsm6ds3", "lsm6ds3h"):
        src, f, _ = open_source(chip)
        assert src.settings.fifo_frames == 4096 // 12


def test_lsm6dsox_bootstrap_samples_are_dropped_counted_and_stamps_stay_on_the_grid():
    rate = 104.0
    src, f, clock = open_source("lsm6dsox", rate_hz=100, gyro_startup_s=0.07, bootstrap_s=0.5)
    dev = f.chip
    t, data = collect(src, clock, 2.0)
    assert dev.bootstrap_words > 0
    assert src.stats["invalid_samples"] > 0.25 * rate             # those after the FIFO started
    assert np.abs(data[:, 3:]).max() < 1000 * DEG                 # no 0x7fxx reading came out
    # every delivered sample is the sample of its own grid slot
    start = dev.pushed_at_reset[-1]
    true_all = dev.true_times()[start:]
    valid = true_all >= dev._gyro_on_at + 0.07 + 0.5
    true_t = true_all[valid][:len(t)]
    assert len(true_t) == len(t)
    assert np.all(t - true_t >= -1e-6) and np.all(t - true_t <= 1 / rate + 1e-6)
    assert_motion(data, dev.motion(true_t), 0.122e-3 * G, 17.50e-3 * DEG)
    assert src.stats["samples"] == len(t) and src.stats["lost_samples"] == 0


@pytest.mark.parametrize("chip", ["mpu6050", "mpu6500", "mpu9250"])
def test_mpu_waits_for_the_gyroscope_to_start_before_sampling(chip):
    # Linux inv_mpu6050: gyro start-up 60 ms (6050) / 70 ms (6500 family); the fake reads zero
    # rate until then, as a part still settling does.
    src, f, clock = open_source(chip, rate_hz=200)
    t, data = collect(src, clock, 0.5)
    true_t, expected = truth(f, -1, len(t))
    assert true_t[0] >= f.chip._awake_at + f.chip.gyro_startup_s
    assert_motion(data, expected, G / 8192, DEG / 65.5)


@pytest.mark.parametrize("chip, register, name", [("mpu6050", 0x1B, "GYRO_CONFIG"), ("lsm6dsl", 0x10, "CTRL1_XL"),
                                                  ("lsm6dsox", 0x17, "CTRL8_XL"), ("bmi160", 0x43, "GYR_RANGE")])
def test_a_configuration_write_that_did_not_take_is_found_on_read_back(chip, register, name):
    # lpf_hz=10 makes every one of these registers differ from its reset value
    clock = SimClock()
    factory = make_factory(chip, clock=clock)
    factory.bus.lose_writes(1, register=register)            # lost once: set up again, counted
    src = ImuSource(chip="auto", smbus_factory=factory, rate_hz=100, accel_range_g=4, gyro_range_dps=500,
                    lpf_hz=10)
    assert factory.bus.writes_lost == 1
    assert src.stats["config_readback_mismatches"] == 1
    src.close()

    factory = make_factory(chip, clock=SimClock())
    factory.bus.lose_writes(100, register=register)          # never takes: refused in one line
    with pytest.raises(ImuError) as e:
        ImuSource(chip="auto", smbus_factory=factory, rate_hz=100, accel_range_g=4, gyro_range_dps=500,
                  lpf_hz=10)
    msg = str(e.value)
    assert "\n" not in msg and f"register {name} (0x{register:02x}) reads 0x" in msg and "after writing 0x" in msg


# --- scale factors: hand-made FIFO bytes -> SI ----------------------------------------------------

def _driver(cls, fake):
    clock = SimClock()
    bus = FakeBus(1)
    addr = cls.ADDRESSES[0]
    dev = bus.attach(addr, fake(clock))
    chip = cls(bus, addr, where="test", clock=clock, rate_hz=100, accel_range_g=4, gyro_range_dps=500)
    chip.fifo_reset()
    return chip, dev


def test_mpu6050_scale_and_frame_layout():
    chip, dev = _driver(Mpu6050, FakeMpu6050)
    # AX AY AZ GX GY GZ, big-endian: 4096 LSB = 0.5 g and 655 LSB = 10 °/s at ±4 g / ±500 °/s
    dev.fifo[:] = np.array([[4096, -8192, 16384, 655, -6550, 131]], ">i2").tobytes()
    assert chip.fifo_level() == (1, False)
    out = chip.read_samples(1)
    np.testing.assert_allclose(out[0], [0.5 * G, -1 * G, 2 * G, 10 * DEG, -100 * DEG, 2 * DEG], rtol=1e-6)


def test_lsm6ds3_scale_and_frame_layout():
    chip, dev = _driver(Lsm6ds3, FakeLsm6ds3)
    # GX GY GZ AX AY AZ, little-endian: 0.122 mg/LSB and 17.50 mdps/LSB at ±4 g / ±500 °/s
    dev.fifo[:] = np.array([[1000, -2000, 4, 10000, -8197, 1]], "<i2").tobytes()
    assert chip.fifo_level() == (1, False)
    out = chip.read_samples(1)
    np.testing.assert_allclose(out[0], [1.22 * G, -0.122 * 8.197 * G, 0.122e-3 * G,
                                        17.5 * DEG, -35 * DEG, 0.07 * DEG], rtol=1e-5)


@pytest.mark.parametrize("order", ["gyro-first", "accel-first"])
def test_lsm6dsox_scale_and_tagged_words(order):
    chip, dev = _driver(Lsm6dsox, FakeLsm6dsox)

    def word(tag, cnt, xyz):
        return bytes([tag << 3 | cnt << 1]) + np.array(xyz, "<i2").tobytes()

    g = [word(0x01, i % 4, [1000 * (i + 1), 0, -1000]) for i in range(3)]
    a = [word(0x02, i % 4, [10000, -10000 * (i + 1), 0]) for i in range(3)]
    pairs = zip(g, a) if order == "gyro-first" else zip(a, g)
    dev.fifo[:] = b"".join(x + y for x, y in pairs)
    assert chip.fifo_level() == (3, False)
    out = chip.read_samples(3)
    np.testing.assert_allclose(out[:, 3], [17.5 * DEG, 35 * DEG, 52.5 * DEG], rtol=1e-5)
    np.testing.assert_allclose(out[:, 1], [-1.22 * G, -2.44 * G, -3.66 * G], rtol=1e-5)
    np.testing.assert_allclose(out[:, 0], 1.22 * G, rtol=1e-5)
    # half a sample waits for its partner in the next read
    dev.fifo[:] = word(0x02, 3, [0, 0, 8197])
    assert chip.fifo_level()[0] == 0
    assert chip.read_samples(0).shape == (0, 6)
    dev.fifo[:] = word(0x01, 3, [0, 0, 0])
    assert chip.fifo_level()[0] == 1
    np.testing.assert_allclose(chip.read_samples(1)[0, 2], 0.122 * 8.197 * G, rtol=1e-5)


def test_bmi160_scale_and_frame_layout():
    chip, dev = _driver(Bmi160, FakeBmi160)
    # GX GY GZ AX AY AZ, little-endian: 8192 LSB/g and 65.6 LSB/(°/s) at ±4 g / ±500 °/s
    dev.fifo[:] = np.array([[656, -1312, 0, 8192, -4096, 16384]] * 2, "<i2").tobytes()
    assert chip.fifo_level() == (2, False)
    out = chip.read_samples(2)
    np.testing.assert_allclose(out[1], [G, -0.5 * G, 2 * G, 10 * DEG, -20 * DEG, 0], rtol=1e-6, atol=1e-7)


# --- FIFO parsing and timestamps, end to end ------------------------------------------------------

@pytest.mark.parametrize("chip", list(CHIPS))
def test_motion_in_equals_motion_out_with_timestamps_at_the_chip_rate(chip):
    variant, _, rate, a_lsb, g_lsb = CHIPS[chip]
    src, f, clock = open_source(chip, rate_hz=100)
    clock.advance(0.0123)                    # the FIFO starts off the chip's sample grid
    t, data = collect(src, clock, 3.0)
    assert data.dtype == np.float32 and data.shape[1] == 6 and t.dtype == np.float64
    assert len(t) >= 3.0 * rate - 2 * src._burst
    true_t, expected = truth(f, -1, len(t))
    assert_motion(data, expected, a_lsb, g_lsb)
    # spaced at 1/ODR, continuous across bursts, each within one sample period of the truth
    np.testing.assert_allclose(np.diff(t), 1 / rate, rtol=0, atol=1e-6)
    assert np.all(t - true_t >= -1e-6) and np.all(t - true_t <= 1 / rate + 1e-6)
    assert src.stats == {"samples": len(t), "overflows": 0, "lost_samples": 0, "read_errors": 0,
                         "chip_resets": 0, "invalid_samples": 0, "config_readback_mismatches": 0,
                         "lost_across_restart": 0}


def test_reads_come_in_bursts_not_sample_by_sample():
    src, f, clock = open_source("mpu6050", rate_hz=200)
    collect(src, clock, 1.0)
    before = f.bus.transfers
    t, _ = collect(src, clock, 10.0)
    per_sample = (f.bus.transfers - before) / len(t)
    assert per_sample < 0.6                  # status + count + one FIFO transfer per ~10 samples


def test_smbus_block_reads_when_the_bus_has_no_i2c_rdwr():
    class BlockOnlyBus(FakeBus):
        i2c_rdwr = None

        def read_i2c_block_data(self, addr, reg, n, force=None):
            assert n <= 32
            if reg in (0x74, 0x24):
                assert n % 12 == 0           # whole frames per transfer
            return super().read_i2c_block_data(addr, reg, n)

    del BlockOnlyBus.i2c_rdwr
    for fake, cls, chip in ((FakeMpu6050, Mpu6050, "mpu6050"), (FakeBmi160, Bmi160, "bmi160"),
                            (FakeLsm6dsox, Lsm6dsox, "lsm6dsox")):
        clock = SimClock()
        bus = BlockOnlyBus(1)
        dev = bus.attach(cls.ADDRESSES[-1], fake(clock, record=True))
        src = ImuSource(chip=chip, bus=bus, clock=clock, rate_hz=400)
        t, data = collect(src, clock, 1.0)
        a_lsb, g_lsb = CHIPS[chip][3:]
        start = dev.pushed_at_reset[-1]
        true_t = dev.true_times()[start:start + len(t)]
        assert len(t) > 300
        assert_motion(data, dev.motion(true_t), a_lsb, g_lsb)


def test_recorded_csv_motion_through_the_fake():
    csv = REPO / "samples" / "imu" / "basicmotions_demo.csv"
    src, f, clock = open_source("bmi160", motion_csv=csv, rate_hz=100, accel_range_g=16, gyro_range_dps=2000)
    t, data = collect(src, clock, 2.0)
    true_t, expected = truth(f, -1, len(t))
    assert_motion(data, expected, G / 2048, DEG / 16.4)
    assert np.abs(expected).max() > 5        # the recording moves


def test_the_replay_takes_the_median_step_as_numpy_does_without_importing_numpy_ma():
    from edged.sources.imu.replay import median

    rng = np.random.default_rng(3)
    for n in (1, 2, 3, 10, 11, 1000):
        x = rng.normal(size=n) * 10.0 ** rng.integers(-3, 3)
        assert median(x) == float(np.median(x))
        x[n // 2] = np.nan
        assert math.isnan(median(x)) and math.isnan(float(np.median(x)))
    t = np.cumsum(rng.uniform(0.009, 0.011, 5000))
    assert median(np.diff(t)) == float(np.median(np.diff(t)))
    csv = REPO / "samples" / "imu" / "basicmotions_demo.csv"
    code = ("import sys; from edged.sources.imu.replay import ReplayImu; "
            f"r = ReplayImu({str(csv)!r}); print(repr(r.duration), 'numpy.ma' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO)}, check=True).stdout.split()
    from edged.sources.imu.imucsv import read_imu_csv

    rec = read_imu_csv(csv)
    rt = rec.t - rec.t[0]
    assert out == [repr(float(rt[-1]) + float(np.median(np.diff(rt)))), "False"]


# --- overflow ------------------------------------------------------------------------------------

@pytest.mark.parametrize("chip", list(CHIPS))
def test_overflow_is_detected_counted_and_recovered(chip, caplog):
    variant, _, rate, a_lsb, g_lsb = CHIPS[chip]
    src, f, clock = open_source(chip, rate_hz=100)
    t1, _ = collect(src, clock, 1.0)
    stall = 1.5 * src.settings.fifo_frames / rate + 1.0
    clock.advance(stall)                     # the reader stalls: the FIFO overflows
    with caplog.at_level(logging.WARNING, logger="edged.imu"):
        t2, data2 = collect(src, clock, 1.0)
    stats = src.stats
    assert stats["overflows"] == 1
    produced = f.chip.pushed_at_reset[-1] - f.chip.pushed_at_reset[-2]  # in the run that overflowed
    assert abs(stats["lost_samples"] - (produced - len(t1))) <= 1
    assert stats["lost_samples"] >= stall * rate * 0.9
    assert "FIFO overflowed" in caplog.text
    # after the restart: right data, re-anchored stamps
    true_t, expected = truth(f, -1, len(t2))
    assert_motion(data2, expected, a_lsb, g_lsb)
    assert np.all(np.abs(t2 - true_t) <= 1 / rate + 1e-6)
    assert t2[0] > t1[-1] + stall


@pytest.mark.parametrize("chip", list(CHIPS))
def test_overflow_between_level_read_and_burst_is_detected_and_counted(chip):
    # A late reader finds the FIFO half full, then loses the CPU between reading the level and
    # starting the burst transfer; by then the FIFO has filled and dropped its oldest samples, so
    # the burst no longer begins where the last one ended, and what is left after it is well
    # short of full. None of the dropped or shifted samples may come out as if nothing
    # happened: the overflow is counted, the gap estimated, the stamps re-anchored.
    _, _, rate, a_lsb, g_lsb = CHIPS[chip]
    src, f, clock = open_source(chip, rate_hz=100)
    dev = f.chip
    t1, d1 = collect(src, clock, 1.0)
    holds = dev.FIFO_CAPACITY // dev.frame_bytes()

    def preempted():
        dev.update()
        waiting = len(dev.fifo) // dev.frame_bytes()
        clock.advance((holds - waiting + 2.5) / rate)  # two or three samples more than fit

    # half of what the driver plans for (on an LSM6DS3 that is a quarter of its 8 kbyte FIFO)
    f.bus.before_reads(STATUS_REG[reg_key(chip)], lambda: clock.advance(src.settings.fifo_frames // 2 / rate))
    f.bus.before_reads(FIFO_REG[reg_key(chip)], preempted)
    overwritten = dev.overwritten
    t2, d2 = collect(src, clock, holds / rate + 1.0)
    assert dev.overwritten > overwritten     # the race did happen: the chip dropped samples
    t, data = np.concatenate([t1, t2]), np.concatenate([d1, d2])
    stats = src.stats
    assert stats["overflows"] == 1
    # k samples came from the run that overflowed, the rest from the one after the restart
    k = int(np.flatnonzero(np.diff(t) > 1.5 / rate)[0]) + 1
    produced = dev.pushed_at_reset[-1] - dev.pushed_at_reset[-2]
    assert abs(stats["lost_samples"] - (produced - k)) <= 1
    assert stats["lost_samples"] >= 2
    for run, sl in ((-2, slice(None, k)), (-1, slice(k, None))):
        true_t, expected = truth(f, run, len(t[sl]))
        assert_motion(data[sl], expected, a_lsb, g_lsb)
        assert np.all(t[sl] - true_t >= -1e-6) and np.all(t[sl] - true_t <= 1 / rate + 1e-6)


# --- bus errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("chip", ["mpu6050", "lsm6ds3", "lsm6dsox", "bmi160"])
def test_status_read_errors_are_counted_logged_once_and_lose_nothing(chip, caplog):
    _, _, rate, a_lsb, g_lsb = CHIPS[chip]
    src, f, clock = open_source(chip, rate_hz=100)
    collect(src, clock, 0.5)
    f.bus.fail_reads(3, register=STATUS_REG[reg_key(chip)])
    with caplog.at_level(logging.INFO, logger="edged.imu"):
        t, data = collect(src, clock, 1.0)
    assert src.stats["read_errors"] == 3 and src.stats["lost_samples"] == 0
    assert caplog.text.count("I2C status read failed") == 1
    assert "Remote I/O error" in caplog.text and "reads recovered" in caplog.text
    np.testing.assert_allclose(np.diff(t), 1 / rate, rtol=0, atol=1e-6)
    start = f.chip.pushed_at_reset[-1]
    first = src.stats["samples"] - len(t)
    true_t = f.chip.true_times()[start + first:start + first + len(t)]
    assert_motion(data, f.chip.motion(true_t), a_lsb, g_lsb)


@pytest.mark.parametrize("chip", ["mpu6050", "lsm6ds3", "lsm6dsox", "bmi160"])
def test_fifo_read_error_restarts_the_fifo_and_counts_the_gap(chip):
    _, _, rate, a_lsb, g_lsb = CHIPS[chip]
    src, f, clock = open_source(chip, rate_hz=100)
    t1, _ = collect(src, clock, 0.5)
    f.bus.fail_reads(1, register=FIFO_REG[reg_key(chip)])
    t2, data2 = collect(src, clock, 1.0)
    stats = src.stats
    assert stats["read_errors"] == 1 and stats["overflows"] == 0
    produced = f.chip.pushed_at_reset[-1] - f.chip.pushed_at_reset[-2]
    assert abs(stats["lost_samples"] - (produced - len(t1))) <= 1
    true_t, expected = truth(f, -1, len(t2))
    assert_motion(data2, expected, a_lsb, g_lsb)


def test_a_long_outage_never_raises_and_reading_resumes():
    src, f, clock = open_source("mpu6050", rate_hz=100)
    collect(src, clock, 0.5)
    f.bus.fail_reads(30, err=errno.EIO)      # 30 polls in a row fail: well over a second
    results = [src.read(0.2) for _ in range(5)]
    assert all(r is None for r in results)
    assert src.stats["read_errors"] >= 10
    t, _ = collect(src, clock, 3.0)
    assert len(t) > 250 and src.stats["read_errors"] == 30


@pytest.mark.parametrize("chip", ["mpu6050", "lsm6ds3", "lsm6dsox", "bmi160"])
def test_a_chip_that_resets_itself_is_set_up_again(chip, caplog):
    _, _, rate, a_lsb, g_lsb = CHIPS[chip]
    src, f, clock = open_source(chip, rate_hz=100)
    t1, _ = collect(src, clock, 1.0)
    f.chip._power_on()                       # brown-out: registers back to power-on defaults
    with caplog.at_level(logging.WARNING, logger="edged.imu"):
        t2, data2 = collect(src, clock, 3.0)
    assert src.stats["chip_resets"] == 1 and "reconfiguring the chip" in caplog.text
    assert len(t2) > 1.5 * rate
    true_t, expected = truth(f, -1, len(t2))
    assert_motion(data2, expected, a_lsb, g_lsb)
    assert abs((t2[0] - t1[-1]) * rate - src.stats["lost_samples"]) <= 2


# --- timing ----------------------------------------------------------------------------------------

def test_stamps_follow_a_chip_clock_that_runs_fast():
    rate = 100.0
    src, f, clock = open_source("mpu6050", rate_hz=rate, odr_error=0.015)  # 1.5 % fast oscillator
    t, _ = collect(src, clock, 120.0)
    true_t = f.chip.true_times()[f.chip.pushed_at_reset[-1]:][:len(t)]
    # nominal stamps would be 1.8 s behind by now; tracked ones stay within a couple of periods
    assert abs(t[-1] - true_t[-1]) < 2.5 / rate
    assert np.all(np.diff(t) > 0)
    assert src.stats["overflows"] == 0


def test_read_returns_none_on_timeout_and_after_close():
    src, f, clock = open_source("lsm6ds3", rate_hz=100)
    assert src.read(timeout=0.0) is None     # nothing has arrived yet
    src.close()
    assert src.read(timeout=1.0) is None
    src.close()                              # idempotent
    assert f.chip.regs[0x10] == 0 and f.chip.regs[0x11] == 0  # sensors powered down


def test_close_from_another_thread_ends_a_blocked_read():
    factory = make_factory("mpu6050")        # real time: this test waits for real
    src = ImuSource(smbus_factory=factory, rate_hz=100)
    factory.bus.fail_reads(10_000)           # the chip stops answering: read() keeps retrying
    result = {}

    def reader():
        result["batch"] = src.read(timeout=5.0)
        result["ended"] = time.monotonic()

    th = threading.Thread(target=reader)
    th.start()
    # Closed while read() is retrying (at least two failed reads seen), however slowly the
    # machine got there.
    end = time.monotonic() + 10
    while src.stats["read_errors"] < 2 and time.monotonic() < end:
        time.sleep(0.005)
    assert th.is_alive() and "batch" not in result  # still retrying
    closed = time.monotonic()
    src.close()
    th.join(2.0)
    assert not th.is_alive() and result["batch"] is None and result["ended"] - closed < 1.0
    assert src.stats["read_errors"] >= 2


# --- smbus2 stays out until a real bus is opened -----------------------------------------------------

def test_drivers_do_not_import_smbus2_and_a_missing_bus_is_one_line():
    code = ("import sys; import edged.sources.imu.source, edged.sources.imu.mpu6050, edged.sources.imu.lsm6ds, edged.sources.imu.bmi160, "
            "edged.fakes.imu; print('smbus2' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO)}, check=True).stdout.strip()
    assert out == "False"
    with pytest.raises(ImuError, match=r"/dev/i2c-97 does not exist: enable I2C"):
        ImuSource(bus=97)


def test_missing_smbus2_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "smbus2", None)
    with pytest.raises(ImuError, match=r"pip install smbus2 \(or apt install python3-smbus2\)"):
        ImuSource(bus=1)


# --- samples lost while the daemon was down ---------------------------------------------------

@pytest.mark.parametrize("chip", ["mpu6050", "lsm6ds3", "lsm6dsox", "bmi160"])
def test_samples_lost_while_the_process_was_down_are_counted_once(tmp_path, chip, caplog):
    from edged.sources.imu.position import ImuPosition

    # The fake chip outlives the first source, as a real one outlives a process that died: the
    # second source, on the same bus, is the restarted daemon. every_s=0: saved at every burst.
    path = tmp_path / "imu-position.json"
    src, f, clock = open_source(chip, position=ImuPosition(path, every_s=0))
    nominal = 1 / CHIPS[chip][2]
    t1, _ = collect(src, clock, 2.0)          # ... and the process dies (no close)
    clock.advance(4.0)
    with caplog.at_level(logging.WARNING, "edged.imu"):
        src2 = ImuSource(chip="auto", smbus_factory=f, position=ImuPosition(path, every_s=0))
        t2, _ = collect(src2, clock, 1.0)
    between = (t2[0] - t1[-1]) / nominal - 1       # grid slots between the two streams' samples
    lost = src2.stats["lost_across_restart"]
    assert between > 4.0 / nominal and abs(lost - between) <= 1.5, (lost, between)
    assert src2.stats["lost_samples"] == 0 and src2.stats["samples"] == len(t2)
    lines = [r for r in caplog.records if r.getMessage() == "IMU samples lost while the daemon was down"]
    assert len(lines) == 1 and lines[0].fields["lost"] == lost and lines[0].fields["recovered"] == 0
    # counted once: a third process after a clean stop of the second counts nothing
    src2.close()
    src3 = ImuSource(chip="auto", smbus_factory=f, position=ImuPosition(path))
    collect(src3, clock, 0.5)
    assert src3.stats["lost_across_restart"] == 0


def test_a_stop_for_a_restart_counts_the_gap_from_the_last_sample_delivered(tmp_path):
    from edged.sources.imu.position import ImuPosition

    path = tmp_path / "imu-position.json"
    # default every_s (1 s): the save on close is what makes the count exact
    src, f, clock = open_source("lsm6dsox", position=ImuPosition(path))
    t1, _ = collect(src, clock, 2.5)
    src.close(restart=True)                   # an Edge TPU hang: exit 75, systemd restarts
    clock.advance(3.0)
    src2 = ImuSource(chip="auto", smbus_factory=f, position=ImuPosition(path))
    t2, _ = collect(src2, clock, 0.5)
    assert abs(src2.stats["lost_across_restart"] - ((t2[0] - t1[-1]) * 104.0 - 1)) <= 1.5


def test_no_count_after_a_clean_stop_a_reload_a_reboot_or_another_chip(tmp_path, caplog):
    import json

    from edged.sources.imu.position import ImuPosition

    path = tmp_path / "imu-position.json"

    def run(chip="lsm6dsox", after_restart=True, close=True, f=None):
        f = f or make_factory(chip, clock=clock)
        src = ImuSource(chip="auto", smbus_factory=f, position=ImuPosition(path, after_restart=after_restart))
        collect(src, clock, 0.5)
        if close:
            src.close()
        return src, f

    clock = SimClock()
    run()
    clock.advance(2)
    assert run()[0].stats["lost_across_restart"] == 0                 # clean stop: a choice, not a loss
    _, f = run(close=False)
    clock.advance(2)
    assert run(after_restart=False, f=f)[0].stats["lost_across_restart"] == 0   # a reload, same process
    run(close=False)
    clock.advance(2)
    assert run(chip="bmi160")[0].stats["lost_across_restart"] == 0     # another chip was there before
    run(close=False)
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "boot_id": "another-boot"}))
    clock.advance(2)
    assert run()[0].stats["lost_across_restart"] == 0                 # the device rebooted: the chip did too
    path.write_text('{"state": "running"')
    with caplog.at_level(logging.WARNING, "edged.imu"):
        assert run()[0].stats["lost_across_restart"] == 0
    assert [r.getMessage() for r in caplog.records].count(
        "IMU position record unreadable; samples lost while the daemon was down are not counted") == 1
    assert json.loads(path.read_text())["state"] == "stopped"         # and it is rewritten whole
