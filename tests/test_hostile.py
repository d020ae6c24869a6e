"""Input from outside, as an attacker or an unlucky operator sends it: commands and their MQTT 5
properties from the broker, config files, IMU recordings and images. The real daemon and a real
mosquitto where the fault involves them. Nothing may end the process, publish outside the
device's prefix, or print a traceback; a bad file is one line naming it, exit 2."""

from __future__ import annotations

import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from conftest import FAST, REPO, SAMPLES, Subscriber, last_seq, wait_until, write_config

NESTED = b"[" * 2000 + b"]" * 2000   # 4 KB, deeper than Python's recursion limit


def edged(*args, timeout=60, **kw):
    return subprocess.run([sys.executable, "-m", "edged", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, **kw)


def one_line_exit_2(r, *needles):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    assert len(lines) == 1, r.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


class Requester:
    """An MQTT 5 client that sends commands and records everything under '#'."""

    def __init__(self, broker) -> None:
        self.got: list = []
        self._lock = threading.Lock()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        ready = threading.Event()
        self.c.on_subscribe = lambda *a: ready.set()
        self.c.on_message = self._on_message
        self.c.connect(broker.host, broker.port)
        self.c.subscribe("#", qos=1)
        self.c.loop_start()
        assert ready.wait(10)

    def _on_message(self, client, userdata, m) -> None:
        with self._lock:
            self.got.append((m.topic, m.payload, m.properties))

    def send(self, topic: str, payload: bytes, *, response_topic=None, retain=False):
        props = None
        if response_topic is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = response_topic
        self.c.publish(topic, payload, qos=1, retain=retain, properties=props).wait_for_publish(5)

    def on(self, topic: str) -> list[bytes]:
        with self._lock:
            return [p for t, p, _ in self.got if t == topic]

    def topics(self) -> set[str]:
        with self._lock:
            return {t for t, _, _ in self.got}

    def replies(self, topic="edged/test-dev/response") -> list[dict]:
        return [json.loads(p) for p in self.on(topic)]

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def _stats(req: Requester) -> dict:
    got = req.on("edged/test-dev/stats")
    return json.loads(got[-1]) if got else {}


# -- commands -------------------------------------------------------------------------------------

def test_retained_nested_command_and_hostile_response_topics(tmp_path, broker, daemon_factory):
    req = Requester(broker)
    # Retained before the daemon starts: it arrives at every start.
    req.send("edged/test-dev/cmd/stats", NESTED, retain=True)
    cfg = write_config(tmp_path / "edged.toml", broker, extra=FAST + "[commands]\nenabled = true\n")
    try:
        for start in range(2):
            mark = len(req.replies())
            d = daemon_factory(cfg).start()
            assert wait_until(lambda: len(req.replies()) > mark, 30), d.output()
            r = req.replies()[mark]
            assert r["cmd"] == "stats" and not r["ok"] and "nested too deeply" in r["error"], r
            assert d.proc.poll() is None
            if start == 0:
                # Response Topics that are wildcards, another device's, Home Assistant's, $SYS.
                hostile = ["edged/+/status", "edged/#", "edged/other-device/status",
                           "homeassistant/binary_sensor/x/config", "$SYS/x", "edged/test-dev/detections",
                           "edged/test-dev/cmd/reload", "edged/test-dev/responsex"]
                before = len(req.replies())
                for topic in hostile:
                    req.send("edged/test-dev/cmd/stats", b"{}", response_topic=topic)
                assert wait_until(lambda: len(req.replies()) >= before + len(hostile), 30), d.output()
                refused = req.replies()[before:]
                assert all(not r["ok"] and "response topic refused" in r["error"] for r in refused), refused
                # Allowed: below the device's own response topic.
                req.send("edged/test-dev/cmd/stats", b"{}", response_topic="edged/test-dev/response/me")
                assert wait_until(lambda: req.on("edged/test-dev/response/me"), 30)
                assert json.loads(req.on("edged/test-dev/response/me")[0])["ok"] is True
                assert wait_until(lambda: _stats(req).get("commands_refused", 0) >= 1 + len(hostile), 30)
                assert wait_until(lambda: last_seq(tmp_path / "state") > 0, 30) and d.proc.poll() is None
            assert d.stop() == 0
            out = d.output()
            assert "Traceback" not in out
    finally:
        req.send("edged/test-dev/cmd/stats", b"", retain=True)  # clear the retained command
        req.close()
    mine = {t for t in req.topics() if not t.startswith("edged/test-dev/cmd/")}
    outside = {t for t in mine if not t.startswith("edged/test-dev/")
               and not t.startswith("homeassistant/") or t in {"homeassistant/binary_sensor/x/config"}}
    assert outside == set(), outside
    assert not any(t.startswith("edged/other-device") or t.startswith("edged/test-dev/detections")
                   and t != "edged/test-dev/detections" for t in mine)


def test_snapshot_budget_per_minute(tmp_path, broker, daemon_factory):
    cfg = write_config(tmp_path / "edged.toml", broker, extra=FAST.replace("interval_s = 1", "interval_s = 3600")
                       + "[commands]\nenabled = true\nsnapshot = true\nsnapshots_per_minute = 3\n")
    req = Requester(broker)
    d = daemon_factory(cfg).start()
    try:
        # A detection means the vision stage has a frame: snapshots can be taken.
        assert wait_until(lambda: req.on("edged/test-dev/detections"), 60), d.output()
        req.send("edged/test-dev/cmd/snapshot", b'{"id": 0}')
        assert wait_until(lambda: req.replies(), 30), d.output()
        assert req.replies()[0]["ok"] is True, req.replies()
        for i in range(1, 41):
            req.send("edged/test-dev/cmd/snapshot", json.dumps({"id": i}).encode())
        assert wait_until(lambda: sum(1 for r in req.replies() if r.get("id", 0) >= 1) >= 40, 60), d.output()
        flood = [r for r in req.replies() if r.get("id", 0) >= 1]
        ok = [r for r in flood if r["ok"]]
        shots = [r for r in req.replies() if r["ok"]]
        assert len(shots) == 3, shots  # the first snapshot plus two of the flood
        assert len(ok) == 2 and all("snapshot refused: at most 3 per minute" in r["error"]
                                    for r in flood if not r["ok"])
        assert len(req.on("edged/test-dev/snapshot")) == 3
        req.send("edged/test-dev/cmd/stats", b"")
        assert wait_until(lambda: _stats(req).get("snapshots_refused") == 38, 30), _stats(req)
        assert d.proc.poll() is None
        assert d.output().count("snapshot refused") == 1  # said once, counted always
    finally:
        req.close()


def _results_by_seq(req: Requester) -> dict[int, list[bytes]]:
    out: dict[int, list[bytes]] = {}
    for leaf in ("detections", "motion", "events"):
        for p in req.on(f"edged/test-dev/{leaf}"):
            out.setdefault(json.loads(p)["seq"], []).append(p)
    return out


SEQ_MAX = (1 << 63) - 1
HOSTILE_RESENDS = [
    (b"\xff\xfe\x00", "payload is not JSON"),
    (NESTED, "nested too deeply"),
    (b"[1, 2]", "payload must be a JSON object"),
    (b"", 'expected "ranges"'),
    (b'{"ranges": "1-5"}', 'expected "ranges"'),
    (b'{"ranges": []}', 'expected "ranges"'),
    (b'{"ranges": [[5, 1]]}', "ranges[0]: expected 1 <= first <= last"),
    (b'{"ranges": [[0, 3]]}', "ranges[0]: expected 1 <= first <= last"),
    (b'{"ranges": [[-5, 3]]}', "ranges[0]: expected 1 <= first <= last"),
    (b'{"ranges": [[1, 9223372036854775808]]}', "ranges[0]: expected 1 <= first <= last"),
    (b'{"ranges": [[1.0, 3]]}', "ranges[0]: expected [first, last], two integers"),
    (b'{"ranges": [[true, 3]]}', "ranges[0]: expected [first, last], two integers"),
    (b'{"ranges": [["1", "2"]]}', "ranges[0]: expected [first, last], two integers"),
    (b'{"ranges": [[1, 2, 3]]}', "ranges[0]: expected [first, last], two integers"),
    (b'{"ranges": [[1, 2], 7]}', "ranges[1]: expected [first, last], two integers"),
    (json.dumps({"ranges": [[i, i] for i in range(1, 18)]}).encode(), "at most 16 ranges per request, got 17"),
    (b'{"ranges": [[1, 2]], "topic": "edged/other/motion"}', "unknown key 'topic'"),
    (b'{"ranges": [[1, 2]], "id": {"x": 1}}', "id must be a string"),
    (b'{"ranges": [[1, 2]], "pad": "' + b"x" * 5000 + b'"}', "payload too large"),
]


def test_resend_requests_hostile_and_honest(tmp_path, broker, daemon_factory):
    """`cmd/resend` is answered with commands off (the default): an honest request gets the
    asked results again, byte for byte, through the outbox; a request as wide as a seq can be is
    capped; garbage of every shape is one error reply each; a flood meets the per-minute budget;
    a Response Topic elsewhere is refused; other commands stay unanswered. The daemon keeps
    running and publishes nothing outside its prefix."""
    cfg = write_config(tmp_path / "edged.toml", broker, extra=FAST + "[commands]\nresend_max_rows = 20\n"
                       "resend_per_minute = 5\n")
    req = Requester(broker)
    d = daemon_factory(cfg).start()
    try:
        assert wait_until(lambda: len(_results_by_seq(req)) >= 30, 60), d.output()
        firsts = {seq: copies[0] for seq, copies in _results_by_seq(req).items()}
        req.send("edged/test-dev/cmd/stats", b'{"id": "not-enabled"}')
        req.send("edged/test-dev/cmd/resend", b'{"id": "honest", "ranges": [[3, 5], [1, 2], [4, 10]]}')
        assert wait_until(lambda: any(r.get("id") == "honest" for r in req.replies()), 30), d.output()
        honest = next(r for r in req.replies() if r.get("id") == "honest")
        assert honest == {"cmd": "resend", "ok": True, "id": "honest", "resent": 10, "resent_ranges": [[1, 10]],
                          "gone": [], "gone_count": 0, "later": []}, honest
        assert wait_until(lambda: all(len(_results_by_seq(req)[s]) >= 2 for s in range(1, 11)), 30)
        again = _results_by_seq(req)
        assert all(again[s][1] == firsts[s] for s in range(1, 11))  # same seq, same bytes
        assert not any(r["cmd"] == "stats" for r in req.replies())  # commands.enabled is false

        req.send("edged/test-dev/cmd/resend", json.dumps({"id": "wide", "ranges": [[1, SEQ_MAX]]}).encode())
        assert wait_until(lambda: any(r.get("id") == "wide" for r in req.replies()), 30)
        wide = next(r for r in req.replies() if r.get("id") == "wide")
        assert wide["ok"] and wide["resent"] == 20 and wide["resent_ranges"] == [[1, 20]], wide
        assert wide["later"] == [[21, SEQ_MAX]] and wide["gone"] == [], wide

        mark = len(req.replies())
        for payload, _ in HOSTILE_RESENDS:
            req.send("edged/test-dev/cmd/resend", payload)
        req.send("edged/test-dev/cmd/resend", b'{"ranges": [[1, 2]]}', response_topic="edged/other-device/response")
        n = len(HOSTILE_RESENDS) + 1
        assert wait_until(lambda: len(req.replies()) >= mark + n, 30), d.output()
        bad = req.replies()[mark:mark + n]
        for (payload, needle), r in zip(HOSTILE_RESENDS, bad):
            assert r["cmd"] == "resend" and r["ok"] is False and needle in r["error"], (payload[:60], r)
        assert "response topic refused" in bad[-1]["error"]

        # A flood: three more fit in the minute's five requests.
        mark = len(req.replies())
        for i in range(20):
            req.send("edged/test-dev/cmd/resend", json.dumps({"id": i, "ranges": [[1, 2]]}).encode())
        assert wait_until(lambda: len(req.replies()) >= mark + 20, 30), d.output()
        flood = req.replies()[mark:]
        assert [r["ok"] for r in flood] == [True] * 3 + [False] * 17, flood
        assert all("resend refused: at most 5 per minute" in r["error"] and 0 < r["retry_after_s"] <= 60
                   for r in flood[3:])
        # A resent row leaves the kept rows until the broker acknowledges it again, so the kept
        # count is read from a stats message taken once every resend is acknowledged.
        assert wait_until(lambda: _stats(req).get("resend_refused") == 17 and _stats(req).get("outbox_kept", 0) >= 30,
                          30), _stats(req)
        st = _stats(req)
        assert st["commands_refused"] >= n and st["resend_requests"] == 2 + 20
        assert st["resent"] == 10 + 20 + 3 * 2 and st["outbox_kept"] >= 30 and st["resend_gone"] == 0
        jsonschema = pytest.importorskip("jsonschema")
        schema = json.loads((REPO / "docs" / "schemas" / "response.schema.json").read_text())
        for r in req.replies():
            jsonschema.validate(r, schema)
        assert d.proc.poll() is None
        assert d.stop() == 0
        assert "Traceback" not in d.output()
        assert d.output().count("resend request refused: over the budget") == 1
    finally:
        req.close()
    outside = {t for t in req.topics() if not t.startswith("edged/test-dev/") and not t.startswith("homeassistant/")}
    assert outside == set(), outside


# -- config ---------------------------------------------------------------------------------------

BAD_CONFIGS = [
    ("a = " + "[" * 500 + "]" * 500 + "\n", "nested too deeply"),
    ("[camera]\nfps = nan\n", "camera.fps: expected a finite number, got nan"),
    ("[stats]\ninterval_s = nan\n", "stats.interval_s: expected a finite number"),
    ("[imu]\nspeed = nan\n", "imu.speed: expected a finite number"),
    ("[imu]\nrate_hz = inf\n", "imu.rate_hz: expected a finite number, got inf"),
    ('device_id = "nl\\n"\n', "device_id: expected 1 to 64 letters"),
    ('[mqtt]\ntopic_prefix = "a\\u0000b"\n', "mqtt.topic_prefix: must not contain NUL"),
    ('[mqtt]\ntopic_prefix = "$SYS"\n', "mqtt.topic_prefix: expected a topic prefix"),
    ('[mqtt]\ntopic_prefix = "' + "p" * 70000 + '"\n', "mqtt.topic_prefix: expected at most 65405 bytes"),
    ('[homeassistant]\nprefix = "ha/+"\n', "homeassistant.prefix: expected a topic prefix"),
    ('state_dir = "/dev/null/x"\n', "state_dir: cannot create '/dev/null/x': '/dev/null' is a character device"),
    ('[outbox]\npath = "/dev/null/x/outbox.db"\n', "outbox.path: cannot create"),
    ("[outbox]\nkeep_acked_s = -1\n", "outbox.keep_acked_s: expected 0 to 2592000, got -1"),
    ('[commands]\nresend = "yes"\n', "commands.resend: expected true or false"),
    ("[commands]\nresend_max_rows = 0\n", "commands.resend_max_rows: expected 1 to 100000, got 0"),
    ('[camera]\npath = "a\\u0000b"\n', "camera.path: must not contain NUL"),
]


@pytest.mark.parametrize("text, needle", BAD_CONFIGS, ids=range(len(BAD_CONFIGS)))
def test_bad_config_one_line_exit_2(tmp_path, text, needle):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    line = one_line_exit_2(edged("check-config", str(p)), needle, f"{p}")
    assert len(line) < 600
    # `edged run` refuses it the same way, before anything starts.
    one_line_exit_2(edged("run", "--config", str(p)), needle)


def test_config_that_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "edged.toml"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    one_line_exit_2(edged("check-config", str(fifo), timeout=30), "not a regular file (a FIFO)")
    one_line_exit_2(edged("check-config", str(tmp_path), timeout=30), "not a regular file (a directory)")
    assert time.monotonic() - t0 < 25  # refused at once, not after a blocked read


def _running(tmp_path, broker, daemon_factory, req, extra=""):
    cfg = write_config(tmp_path / "edged.toml", broker, extra=FAST + extra)
    d = daemon_factory(cfg).start()
    assert wait_until(lambda: req.on("edged/test-dev/motion") and req.on("edged/test-dev/detections"), 60), d.output()
    return cfg, d


def test_reload_with_any_bad_file_keeps_the_running_pipeline(tmp_path, broker, daemon_factory):
    req = Requester(broker)
    good = None
    try:
        cfg, d = _running(tmp_path, broker, daemon_factory, req)
        good = cfg.read_text()
        bad_csv = tmp_path / "bad.csv"
        bad_csv.write_bytes(b"t,ax,ay,az,gx,gy,gz\n0,1,2,3,4,5,6\n0.01,1,2,\xff\xfe,4,5,6\n")
        bads = [text for text, _ in BAD_CONFIGS[:9]] + [good.replace("[imu]\n", f'[imu]\npath = "{bad_csv}"\n')]
        for n, text in enumerate(bads):
            cfg.write_text(text)
            mark = d.output().count("msg=\"reload")
            d.signal(signal.SIGHUP)
            assert wait_until(lambda: d.output().count("msg=\"reload") > mark, 30), (n, d.output()[-3000:])
            assert d.proc.poll() is None, (n, d.output()[-3000:])
        # A FIFO in the config's place: refused without blocking, so SIGTERM still works.
        cfg.unlink()
        os.mkfifo(cfg)
        mark = d.output().count("msg=\"reload")
        d.signal(signal.SIGHUP)
        assert wait_until(lambda: d.output().count("msg=\"reload") > mark, 30), d.output()[-3000:]
        out = d.output()
        assert "msg=reloaded" not in out and "Traceback" not in out
        assert "not UTF-8 text" in out and "not a regular file (a FIFO)" in out
        # Still running the pipeline it started with: new results keep coming.
        seen = len(req.on("edged/test-dev/motion"))
        assert wait_until(lambda: len(req.on("edged/test-dev/motion")) > seen + 3, 60), d.output()[-3000:]
        assert d.stop() == 0  # within TimeoutStopSec: the main loop was not left blocked on the FIFO
        assert d.stop_sequence_s() < 2.0, d.output()[-3000:]
    finally:
        req.close()


# -- IMU recordings -------------------------------------------------------------------------------

@pytest.mark.parametrize("body, needle", [
    (b"0,1,2,3,4,5,6\n0.01,1,2,\xff\xfe,4,5,6\n", ":3: not UTF-8 text (byte 0xff at column 10"),
    (b"0,1,2,3,4,5,6\n0.01,1,2,1e39,4,5,6\n", ":3: az: value out of range (1e+39"),
    (b"0,1,2,3,4,5,6\n0.01,1,2,3,-4e38,5,6\n", ":3: gx: value out of range"),
])
def test_imu_csv_refused_with_one_line(tmp_path, body, needle):
    p = tmp_path / "rec.csv"
    p.write_bytes(b"t,ax,ay,az,gx,gy,gz\n" + body)
    one_line_exit_2(edged("motion", str(p)), str(p) + needle)


# -- images ---------------------------------------------------------------------------------------

def _bilevel_png(path, side):
    """A 1-bit PNG that compresses to a few KB whatever its size."""
    from PIL import Image

    Image.new("1", (side, side)).save(path, optimize=True)
    return path


def test_detect_refuses_huge_images_in_one_line(tmp_path):
    bomb = _bilevel_png(tmp_path / "bomb.png", 14000)
    big = _bilevel_png(tmp_path / "big.png", 12000)
    assert bomb.stat().st_size < 64 * 1024
    for p in (bomb, big):
        one_line_exit_2(edged("detect", str(p), timeout=120), str(p), "refused")
    r = edged("detect", str(big), str(SAMPLES / "images" / sorted(os.listdir(SAMPLES / "images"))[0]))
    assert r.returncode == 2 and len(r.stdout.splitlines()) == 1  # the good one still detected


def test_large_images_are_decoded_within_bounds(tmp_path):
    """Peak memory of decoding, in a fresh process: a refused PNG costs nothing, a large JPEG is
    decoded reduced (draft mode)."""
    from PIL import Image

    big = _bilevel_png(tmp_path / "big.png", 12000)
    jpeg = tmp_path / "large.jpg"
    Image.new("RGB", (8000, 6000), (90, 120, 200)).save(jpeg, quality=60)
    # The peak is the process's own (VmHWM, reset by exec): ru_maxrss would carry over the RSS of
    # the pytest process the child was forked from, which is larger than the bound in a full run.
    code = ("import sys\nfrom pathlib import Path\n"
            "from edged.sources.camera.images import decode_image, ImageRefused\n"
            "try:\n    decode_image(Path(sys.argv[1]))\nexcept ImageRefused:\n    print('refused')\n"
            "im = decode_image(Path(sys.argv[2]))\nprint(im.shape)\n"
            "print(next(ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM:')))\n")
    r = subprocess.run([sys.executable, "-c", code, str(big), str(jpeg)], capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    refused, shape, rss_kb = r.stdout.split("\n")[:3]
    assert refused == "refused"
    assert shape == "(3000, 4000, 3)"  # 48 M pixels decoded at 1/2: 12 M ≤ camera.max_pixels
    assert int(rss_kb) < 400 * 1024, rss_kb  # a full decode would need 144 MB for the JPEG alone


def test_replay_daemon_skips_and_counts_refused_images(tmp_path, broker, daemon_factory):
    import shutil

    images = tmp_path / "images"
    images.mkdir()
    for p in sorted((SAMPLES / "images").iterdir())[:2]:
        shutil.copy(p, images / p.name)
    _bilevel_png(images / "zz-bomb.png", 14000)
    (images / "zz-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    req = Requester(broker)
    try:
        cfg = write_config(tmp_path / "edged.toml", broker,
                           extra=FAST.replace("[camera]\n", f'[camera]\npath = "{images}"\n'))
        d = daemon_factory(cfg).start()
        assert wait_until(lambda: _stats(req).get("camera_refused") == 1 and _stats(req).get("camera_errors") == 2
                          and _stats(req).get("frames", 0) > 5, 60), (_stats(req), d.output()[-3000:])
        assert d.proc.poll() is None
        out = d.output()
        assert len([line for line in out.splitlines() if "zz-bomb.png" in line]) == 1  # said once
        assert "Traceback" not in out
    finally:
        req.close()


# -- TLS to a port that does not speak it ----------------------------------------------------------

def test_tls_to_a_plain_port_says_so(tmp_path, broker, daemon_factory):
    from test_mqtt import Pki

    (tmp_path / "pki").mkdir()
    pki = Pki(tmp_path / "pki")
    ca = pki.files["ca"][0]
    cfg = write_config(tmp_path / "edged.toml", broker, extra=FAST, mqtt=f'tls = true\nca_file = "{ca}"\n')
    d = daemon_factory(cfg).start()
    try:
        assert wait_until(lambda: "cannot connect to the broker" in d.output(), 60), d.output()
        line = next(ln for ln in d.output().splitlines() if "cannot connect to the broker" in ln)
        assert "is the port a TLS listener?" in line, line
        assert d.proc.poll() is None
    finally:
        d.kill()


# -- edged subscribe (the ingest worker on SQLite) -------------------------------------------------

def test_subscriber_survives_forged_results_and_reports_gaps_as_ranges(tmp_path, broker):
    sub = subprocess.Popen([sys.executable, "-m", "edged", "subscribe", "--port", str(broker.port),
                            "--db", str(tmp_path / "r.db"), "--count", "4", "--quiet"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    pub = Requester(broker)
    try:
        topic = "edged/dev1/motion"

        def motion(seq, **change) -> bytes:
            return json.dumps({"v": 1, "device_id": "dev1", "seq": seq, "ts": time.time(), "label": "idle",
                               "score": 0.5, "signature": [1, 2, 3], "window_s": 2.0, "inference_ms": 1.0,
                               **change}).encode()

        def first_stored() -> bool:
            # Sent until the subscriber has stored it: then it is surely subscribed.
            pub.send(topic, motion(1))
            try:
                db = sqlite3.connect(f"file:{tmp_path / 'r.db'}?mode=ro", uri=True)
                try:
                    return db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 1
                finally:
                    db.close()
            except sqlite3.Error:
                return False

        assert wait_until(first_stored, 30, interval=0.2)
        # Forged seqs and fields in otherwise complete results (rejected), and what is not a
        # result at all (undecodable): none of it stored, all of it counted.
        forged = [motion(s) for s in (1e20, "12", -5, True, 18446744073709551616)]
        forged += [motion(7, ts="now"), motion(7, v=2), b'\xa1cseq\xfb\x7f\xf0\x00\x00\x00\x00\x00\x00',
                   b"[1, 2]", b"\xff\x00 not a payload"]
        for payload in forged:
            pub.send(topic, payload)
        epoch_ms = int(time.time() * 1000)
        for seq in (2, 5, epoch_ms):  # a jump to epoch milliseconds, as a reset outbox made
            pub.send(topic, motion(seq))
        out, err = sub.communicate(timeout=60)
    finally:
        pub.close()
        if sub.poll() is None:
            sub.kill()
    assert sub.returncode == 0, err
    line = next(ln for ln in err.splitlines() if "dev1:" in ln)
    assert f"4 results (seq 1–{epoch_ms})" in line, line
    assert f"{epoch_ms - 4} missing: 3–4, 6–{epoch_ms - 1}" in line and "8 rejected, 2 undecodable" in line, line
