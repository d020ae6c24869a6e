"""What a newcomer meets first, from a fresh clone: every mistake is one line and a non-zero
exit, never a traceback or a silent success."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import REPO, SAMPLES, free_port

DEMO_CSV = SAMPLES / "imu" / "basicmotions_demo.csv"
FACE = SAMPLES / "images"


def edged(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "edged", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


def one_line(r) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_an_unwritable_state_dir_is_one_line(tmp_path):
    """The config check refuses a state_dir that cannot be created (exit 2); the outbox refuses one
    it cannot write (exit 69, e.g. a read-only mount). One line naming the directory either way."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = tmp_path / "edged.toml"
    cfg.write_text(f'state_dir = "{blocker / "edged"}"\n[mqtt]\nport = {free_port()}\n')
    r = edged("run", "--config", str(cfg))
    assert r.returncode in (2, 69)
    line = [x for x in r.stderr.splitlines() if x.startswith("edged:")]
    assert "Traceback" not in r.stderr and len(line) == 1
    assert str(blocker / "edged") in line[0] and "state_dir" in line[0]

    # The default state dir, for a service user whose HOME cannot hold one.
    env = {k: v for k, v in os.environ.items() if k not in ("STATE_DIRECTORY", "XDG_STATE_HOME")}
    env["HOME"] = str(blocker)
    cfg.write_text(f"[mqtt]\nport = {free_port()}\n")
    r = edged("run", "--config", str(cfg), env=env)
    assert r.returncode in (2, 69) and "Traceback" not in r.stderr
    assert f"{blocker}/.local/state/edged" in r.stderr and "state_dir" in r.stderr


def test_the_outbox_names_a_directory_it_cannot_create():
    from edged.delivery.outbox import Outbox, OutboxError

    with pytest.raises(OutboxError, match="cannot create the outbox directory .*set state_dir"):
        Outbox(Path("/proc/1/edged-cannot-be-here/outbox.db"))


def _resampled(tmp_path, name: str, keep) -> str:
    lines = DEMO_CSV.read_text().splitlines()
    body = [x for i, x in enumerate(lines[1:]) if keep(i)]
    path = tmp_path / name
    path.write_text("\n".join([lines[0], *body]) + "\n")
    return str(path)


@pytest.mark.parametrize("name, keep, says", [
    ("5hz.csv", lambda i: i % 2 == 0, "sample rate 5 Hz is below the model's 10 Hz"),
    ("8hz.csv", lambda i: i % 5 != 0, "sample rate 8 Hz is below the model's 10 Hz"),
    ("1hz.csv", lambda i: i % 10 == 0, "sample rate 1 Hz is below the model's 10 Hz"),
    ("short.csv", lambda i: i < 20, "shorter than one window"),
])
def test_motion_refuses_what_gives_no_window(tmp_path, name, keep, says):
    r = edged("motion", _resampled(tmp_path, name, keep))
    assert r.returncode == 2 and r.stdout == ""
    line = one_line(r)
    assert name in line and says in line.replace("8.01 Hz", "8 Hz")


def test_detect_threshold_has_one_meaning():
    img = str(FACE / "astronaut.jpg")
    for bad in ("2", "-0.1", "many"):
        r = edged("detect", "--threshold", bad, img)
        assert r.returncode == 2 and "Traceback" not in r.stderr and "within 0..1" in r.stderr
    # 0 means the model's own threshold, as vision.score_threshold = 0 does: not "everything".
    default, zero = edged("detect", img), edged("detect", "--threshold", "0", img)
    assert default.returncode == zero.returncode == 0
    assert zero.stdout == default.stdout and '"face"' in default.stdout
    strict = edged("detect", "--threshold", "0.999", img)
    assert strict.returncode == 0 and '"objects": []' in strict.stdout


CTRL_C_DURING_IMPORT = """
import importlib.abc, signal, sys
# As in a terminal: a shell that starts jobs in the background makes them ignore SIGINT.
signal.signal(signal.SIGINT, signal.default_int_handler)
class CtrlC(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == sys.argv[1]:
            sys.meta_path.remove(self)
            signal.raise_signal(signal.SIGINT)  # a real SIGINT, as the terminal sends on Ctrl-C
        return None
sys.meta_path.insert(0, CtrlC())
from edged.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("module", ["numpy", "ai_edge_litert", "paho"])
def test_ctrl_c_during_start_up_is_quiet(module):
    r = subprocess.run([sys.executable, "-c", CTRL_C_DURING_IMPORT, module, "detect",
                        str(FACE / "astronaut.jpg")] if module != "paho" else
                       [sys.executable, "-c", CTRL_C_DURING_IMPORT, module, "subscribe", "--port", "1"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 130 and r.stderr == "", r.stderr


def test_subscribe_refuses_bad_ports_and_creates_nothing_when_it_cannot_connect(tmp_path):
    r = edged("subscribe", "--port", "99999")
    assert r.returncode == 2 and "expected a port number 1-65535, got 99999" in r.stderr
    db = tmp_path / "results.db"
    r = edged("subscribe", "--port", str(free_port()), "--db", str(db))
    assert r.returncode == 69 and "Connection refused" in one_line(r)
    assert not db.exists()
    with NotMqtt(b"HTTP/1.1 400 Bad Request\r\n\r\n") as port:
        r = edged("subscribe", "--port", str(port), "--db", str(db))
    assert r.returncode == 69 and "Traceback" not in r.stderr and not db.exists()
    helps = edged("subscribe", "--help").stdout
    for flag in ("--host HOST", "--port PORT", "--username", "--ca-file PATH"):
        text = helps.split(flag, 1)[1].split("\n  -", 1)[0]
        assert len(text.split()) >= 2, f"{flag} has no help text"


class NotMqtt:
    """A real TCP service on a free port that is not an MQTT broker: it answers `reply` (or
    nothing) to whatever it is sent, then closes."""

    def __init__(self, reply: bytes | None) -> None:
        self.reply = reply
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.reply is None:
                self._held.append(conn)  # silent: keep it open, say nothing
                continue
            with conn:
                try:
                    conn.recv(1024)
                    conn.sendall(self.reply)
                except OSError:
                    pass

    def __enter__(self) -> int:
        self._thread.start()
        return self.port

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.sock.close()
        for c in self._held:
            c.close()
        self._thread.join(5)


def test_snapshot_writes_what_the_camera_sees_with_the_boxes(tmp_path):
    """`edged snapshot` from the replay camera and from the fake V4L2 webcam (the live path)."""
    import json

    import numpy as np
    from PIL import Image

    for name, body in (("replay", ""), ("v4l2", '[camera]\nsource = "v4l2"\nfake = true\n')):
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(f'state_dir = "{tmp_path / "state"}"\n{body}[imu]\nenabled = false\n')
        out = tmp_path / f"{name}.jpg"
        r = edged("snapshot", "--config", str(cfg), "--out", str(out))
        assert r.returncode == 0, r.stderr
        shown = json.loads(r.stdout)
        # The default chain on the astronaut: her face (and, on the full photo, her as a person).
        assert shown["camera"] == name and "face" in [o["label"] for o in shown["objects"]], shown
        im = np.asarray(Image.open(out).convert("RGB")).astype(int)
        assert [im.shape[1], im.shape[0]] == shown["size"]
        face = next(o for o in shown["objects"] if o["label"] == "face")
        x0, y0, x1, y1 = (round(v * s) for v, s in zip(face["box"], shown["size"] * 2))
        ymid = (y0 + y1) // 2
        edge = im[ymid - 3:ymid + 3, max(0, x0 - 1):x0 + 2]  # the box's left side, drawn in red
        assert (edge[..., 0] - edge[..., 1:].max(axis=-1) > 100).any()
    no_camera = tmp_path / "none.toml"
    no_camera.write_text("[camera]\nenabled = false\n")
    r = edged("snapshot", "--config", str(no_camera))
    assert r.returncode == 2 and "camera.enabled = false" in one_line(r)


def test_a_port_that_is_not_a_broker_is_named_in_the_log(tmp_path, daemon_factory):
    """The daemon says in words, once, that the port takes TCP but never answers MQTT."""
    from conftest import wait_until

    with NotMqtt(None) as port:
        cfg = tmp_path / "edged.toml"
        cfg.write_text(f'device_id = "test-dev"\nstate_dir = "{tmp_path / "state"}"\n'
                       f"[mqtt]\nport = {port}\n")
        d = daemon_factory(cfg).start()
        assert wait_until(lambda: "sent no MQTT CONNACK within 10 s" in d.output(), 60), d.output()
        assert d.proc.poll() is None
        assert d.stop() == 0
    assert d.output().count("sent no MQTT CONNACK") == 1
