"""What every camera source shares: its errors, the install hints, and the frame pacer."""

from __future__ import annotations

import threading
import time

OPENCV_HINT = ("video files are read with OpenCV: pip install opencv-python-headless "
               "(or on Raspberry Pi OS: sudo apt install python3-opencv)")
PICAMERA2_HINT = ("picamera2 is not installed: on Raspberry Pi OS run 'sudo apt install python3-picamera2' "
                  "and give edged's venv --system-site-packages (scripts/provision does both)")
ERROR_KINDS = ("unplugged", "busy", "timeout", "permission", "error")


class CameraError(Exception):
    """A camera that cannot be used as configured: the user's to fix (one line, exit status 2/69)."""


class CameraFault(Exception):
    """A camera failure the source survives by retrying; `kind` is one of ERROR_KINDS."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def chain_text(exc: BaseException) -> str:
    """The messages of an exception and of the ones it was raised from, in one line."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = " ".join(str(exc).split())
        parts.append(text or type(exc).__name__)
        exc = exc.__cause__ or exc.__context__
    return ": ".join(parts)


class Pacer:
    """Releases one frame every `period` seconds without drifting; interruptible by close()."""

    def __init__(self, fps: float) -> None:
        self.period = 1.0 / fps
        self.next = time.monotonic()
        self.closed = threading.Event()

    def wait(self) -> bool:
        """Wait for the next frame's turn; False when closed."""
        delay = self.next - time.monotonic()
        if delay > 0 and self.closed.wait(delay):
            return False
        # After a stall, do not burst to catch up: frames are perishable anyway.
        self.next = max(self.next + self.period, time.monotonic() - self.period)
        return not self.closed.is_set()
