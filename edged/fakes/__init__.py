"""Fakes at edged's hardware boundary, for tests and for running edged without the hardware.

Every fake lives here: `camera` (picamera2 and an OpenCV V4L2 capture), `imu` (register-level
emulations of each supported chip behind a fake SMBus), `tpu` (the Edge TPU delegate loader).
Each stands exactly where the hardware library would and behaves like the device, including its
failures. Production code never imports this package: `edged.hardware` loads `FakeHardware` by
name when a config section says `fake = true`, and hands its parts to the same constructor
arguments the real libraries go through.
"""

from __future__ import annotations

from edged.hardware import Hardware

# The emulated part closest to each chip name an `[imu] source` may use.
_FAKE_CHIP = {"auto": "mpu6050", "mpu6000": "mpu6050", "lsm6ds3tr-c": "lsm6dsl", "lsm6dso": "lsm6dsox"}


def imu_bus_factory(imu):
    """The fake SMBus factory an `[imu]` section with `fake = true` asks for: its chip on its bus
    and address, moving as the recording at `imu.path` (in real time)."""
    from edged.fakes.imu import make_factory

    return make_factory(_FAKE_CHIP.get(imu.source, imu.source), motion_csv=imu.path, bus_number=imu.bus,
                        address=imu.address or None)


class FakeHardware(Hardware):
    """Emulated hardware for the config sections that ask for it (`fake = true`), the real
    libraries for the others. The fake camera shows the images at `camera.path`; the fake IMU
    moves as the recording at `imu.path`."""

    name = "fake"

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def picamera2_factory(self, cam):
        if not cam.fake:
            return None
        from edged.fakes.camera import FakePicamera2Factory

        return FakePicamera2Factory(cam.path)

    def v4l2_backend(self, cam):
        if not cam.fake:
            return None
        from edged.fakes.camera import FakeV4l2
        from edged.sources.camera.v4l2 import v4l2_device

        return FakeV4l2(cam.path, devices=(v4l2_device(cam.device or "/dev/video0"),))

    def smbus_factory(self, imu):
        return imu_bus_factory(imu) if imu.fake and imu.source != "replay" else None

    def edgetpu_loader(self):
        acc = self.cfg.accelerator
        if not acc.fake:
            return None
        from edged.fakes.tpu import FakeEdgeTpu

        kind = "pci" if acc.device.startswith("pci") else "usb"
        return FakeEdgeTpu(kind, fault=None if acc.fake == "tpu" else acc.fake, fault_after=acc.fake_fault_after)
