"""The hardware boundary, chosen in one place.

Production code never imports a fake. It asks `for_config(cfg)` for a `Hardware` and takes the
parts it needs from it: the class that opens a Pi camera module (picamera2's), the V4L2 capture
backend (OpenCV's), the SMBus factory for an IMU (smbus2's) and the Edge TPU delegate loader
(the TFLite runtime with libedgetpu). `None` from a method means "the real library, imported by
the source itself when it is used", so nothing heavy is imported for a part the config leaves off.

Where a config section says `fake = true`, the factory named "fake" (the emulations in
`edged.fakes`, loaded by name the way gpiozero loads its pin factories) hands out emulated
hardware for those parts; the code above them is unchanged.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

# Factory name -> "module:attribute". The fake one is looked up only when a config asks for it.
FACTORIES = {"real": "edged.hardware:Hardware", "fake": "edged.fakes:FakeHardware"}


class Hardware:
    """The real hardware: every method returns None, meaning "the real library"."""

    name = "real"

    def picamera2_factory(self, cam) -> Callable[[int], Any] | None:
        """What makes a Picamera2 object for camera number N."""
        return None

    def v4l2_backend(self, cam) -> Any | None:
        """The V4L2 capture backend (`open`, `node`, `cv2`)."""
        return None

    def smbus_factory(self, imu) -> Callable[[int], Any] | None:
        """Bus number -> an SMBus-like object."""
        return None

    def edgetpu_loader(self) -> Any | None:
        """A `Runtime`-like object with `load_delegate` (see `edged.tpu`)."""
        return None


def load_factory(name: str, cfg=None) -> Hardware:
    """The hardware factory called `name` ("real" or "fake"), built for `cfg`."""
    try:
        module, _, attr = FACTORIES[name].partition(":")
    except KeyError:
        raise ValueError(f"unknown hardware factory {name!r} (known: {', '.join(FACTORIES)})") from None
    cls = getattr(importlib.import_module(module), attr)
    return cls() if name == "real" else cls(cfg)


def for_config(cfg) -> Hardware:
    """The hardware a config describes: fakes for the sections with `fake = true`, real elsewhere."""
    wants_fake = (cfg.camera.enabled and cfg.camera.fake and cfg.camera.source != "replay") or \
                 (cfg.imu.enabled and cfg.imu.fake and cfg.imu.source != "replay") or \
                 bool(cfg.accelerator.fake)
    return load_factory("fake" if wants_fake else "real", cfg)
