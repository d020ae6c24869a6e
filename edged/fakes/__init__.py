"""Fakes at edged's hardware boundary, for tests and for running edged without the hardware.

Each fake stands exactly where the hardware library would (the picamera2 module, an OpenCV
V4L2 capture, the Edge TPU delegate loader; the IMU's fake SMBus lives in `edged.fakes.imu`) and
behaves like the device, including its failures. Production code receives them through the
same factory argument it uses for the real thing and cannot tell the difference.
"""

# The emulated part closest to each chip name an `[imu] source` may use.
_FAKE_CHIP = {"auto": "mpu6050", "mpu6000": "mpu6050", "lsm6ds3tr-c": "lsm6dsl", "lsm6dso": "lsm6dsox"}


def imu_bus_factory(imu):
    """The fake SMBus factory an `[imu]` section with `fake = true` asks for: its chip on its bus
    and address, moving as the recording at `imu.path` (in real time)."""
    from edged.fakes.imu import make_factory

    return make_factory(_FAKE_CHIP.get(imu.source, imu.source), motion_csv=imu.path, bus_number=imu.bus,
                        address=imu.address or None)
