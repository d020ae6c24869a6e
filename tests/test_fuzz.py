"""Property tests for every parser that takes outside input: config files, IMU recordings, command
payloads with their topics and MQTT 5 properties, the codec's decoder, the receiver's message
handling (results and samples), and image files. Each may fail only with its documented error type, in one line.

`make test` runs a short budget (the "ci" profile); `make fuzz` runs the long one
(HYPOTHESIS_PROFILE=fuzz)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edged import config
from edged.delivery import codec, commands
from edged.sources.camera import CameraError, decode_image
from edged.sources.imu.imucsv import ImuCsvError, read_imu_csv

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=3000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def one_line(text: str) -> None:
    assert text and "\n" not in text and "\r" not in text and "Traceback" not in text, text


# -- config -----------------------------------------------------------------------------------------

KEYS = {"": ["device_id", "log_level", "state_dir", "models_dir"],
        "mqtt": ["host", "port", "topic_prefix", "keepalive_s", "reconnect_min_s", "reconnect_max_s",
                 "protocol", "codec", "ca_file", "max_inflight"],
        "camera": ["fps", "path", "source", "width", "max_pixels", "loop"],
        "imu": ["speed", "rate_hz", "path", "address", "lpf_hz"],
        "outbox": ["max_bytes", "path", "max_file_bytes"],
        "stats": ["interval_s"],
        "commands": ["enabled", "reply_prefix", "snapshots_per_minute"],
        "homeassistant": ["prefix", "labels"],
        "vision": ["score_threshold", "heartbeat_s"]}

toml_scalars = st.one_of(
    st.booleans(), st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=80))


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON's escapes are TOML basic-string escapes
    return "[" + ", ".join(toml_value(x) for x in v) + "]"


@st.composite
def config_texts(draw):
    lines = []
    for section, keys in KEYS.items():
        chosen = draw(st.lists(st.sampled_from(keys), unique=True, max_size=3))
        if not chosen:
            continue
        if section:
            lines.append(f"[{section}]")
        for key in chosen:
            value = draw(st.one_of(toml_scalars, st.lists(toml_scalars, max_size=3)))
            lines.append(f"{key} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


@given(st.one_of(config_texts(), st.text(max_size=300),
                 st.integers(1, 3000).map(lambda n: "a = " + "[" * n + "]" * n)))
def test_config_parse_fails_only_with_config_error(text):
    try:
        cfg = config.parse(text, "fuzz.toml")
    except config.ConfigError as exc:
        assert exc.problems
        for line in exc.problems:
            one_line(line)
            assert len(line) < 1000
        return
    assert config._ID_RE.fullmatch(cfg.device_id)
    for v in (cfg.camera.fps, cfg.imu.speed, cfg.stats.interval_s, cfg.mqtt.reconnect_min_s):
        assert math.isfinite(v)


# -- IMU CSV ------------------------------------------------------------------------------------------

HEADER = b"t,ax,ay,az,gx,gy,gz\n"
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                    st.sampled_from(["1e39", "-3.5e38", "nan", "", " ", "0x10", "1_0", "\u0661"]),
                    st.integers(-10 ** 40, 10 ** 40).map(str))
csv_lines = st.lists(numbers, min_size=0, max_size=9).map(lambda xs: ",".join(xs))


@given(st.one_of(st.lists(csv_lines, max_size=20).map(lambda ls: HEADER + "\n".join(ls).encode()),
                 st.binary(max_size=400).map(lambda b: HEADER + b), st.binary(max_size=200)))
def test_imu_csv_fails_only_with_imu_csv_error(data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rec.csv"
        path.write_bytes(data)
        try:
            batch = read_imu_csv(path)
        except ImuCsvError as exc:
            one_line(str(exc))
            assert str(path) in str(exc)
            return
    assert batch.data.dtype == np.float32 and np.isfinite(batch.data).all()
    assert np.isfinite(batch.t).all() and (np.diff(batch.t) > 0).all()


# -- commands: payloads, topics, properties -------------------------------------------------------

class Props:
    """What paho hands over as a message's MQTT 5 properties: attributes that may or may not be there."""

    def __init__(self, **kw) -> None:
        self.__dict__.update(kw)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=5), kids,
                                                                                      max_size=4), max_leaves=20)
payloads = st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode()),
                     st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
                     st.dictionaries(st.sampled_from(["id", "x"]), json_values).map(lambda d: json.dumps(d).encode()))
odd = st.one_of(st.none(), st.text(max_size=40), st.binary(max_size=40), st.integers(), st.lists(st.integers()))
topics = st.one_of(st.text(max_size=40), st.sampled_from(
    ["edged/dev/response", "edged/dev/response/x", "edged/+/status", "edged/#", "$SYS/x", "edged/dev/responsex",
     "edged/other/response", "client/1", "client", "homeassistant/x/config", "", "a\x00b"]))


@given(st.text(max_size=30) | st.sampled_from(commands.NAMES), payloads,
       st.one_of(st.none(), st.builds(Props, ResponseTopic=topics, CorrelationData=odd), st.builds(Props)),
       st.sampled_from(["", "client"]))
def test_command_parse_never_raises_and_replies_stay_home(name, payload, props, reply_prefix):
    cmd, error = commands.parse(name, payload, props, own_prefix="edged/dev/response", reply_prefix=reply_prefix)
    body = json.loads(commands.reply(cmd, error is None, error=error))
    assert body["ok"] is (error is None)
    if error:
        one_line(error)
    if cmd.response_topic is not None:
        t = cmd.response_topic
        assert not any(c in t for c in "+#\x00") and not t.startswith("$")
        assert t == "edged/dev/response" or t.startswith("edged/dev/response/") or (
            reply_prefix and (t == reply_prefix or t.startswith(reply_prefix + "/")))
    assert cmd.correlation is None or isinstance(cmd.correlation, bytes)


seq_like = st.one_of(st.integers(-3, 40), st.integers(), st.sampled_from([(1 << 63) - 1, 1 << 63]), st.booleans(),
                     st.floats(), st.text(max_size=3), st.none())
resend_bodies = st.fixed_dictionaries(
    {"ranges": st.one_of(st.lists(st.tuples(st.integers(1, 70), st.integers(0, 30)).map(lambda t: [t[0], t[0] + t[1]]),
                                  min_size=1, max_size=17),
                         st.lists(st.lists(seq_like, max_size=3), max_size=20), json_values)},
    optional={"id": json_values, "x": json_values})


@given(resend_bodies, st.lists(st.integers(1, 60), unique=True, max_size=40), st.integers(1, 50),
       st.integers(0, 60))
def test_a_resend_request_is_refused_or_planned_within_its_bounds(body, held, cap, last_seq):
    """Whatever the request says, the plan sends only held seqs it asked for, at most `cap`,
    and accounts for every asked seq up to where it stopped: resent, gone or later."""
    held = sorted(s for s in held if s <= last_seq)
    cmd, error = commands.parse("resend", json.dumps(body).encode(), None, own_prefix="edged/dev/response")
    if error:
        one_line(error)
        assert cmd.ranges == ()
        return
    ranges = cmd.ranges
    assert 1 <= len(ranges) <= commands.MAX_RANGES
    assert all(1 <= a <= b <= commands.SEQ_MAX for a, b in ranges)
    assert all(ranges[i][1] + 1 < ranges[i + 1][0] for i in range(len(ranges) - 1))  # sorted, merged
    lookups = []

    def within(a, b, limit):
        lookups.append(limit)
        return [s for s in held if a <= s <= b][:limit]

    seqs, gone, gone_count, later = commands.plan_resend(ranges, within, cap, last_seq)
    asked = lambda s: any(a <= s <= b for a, b in ranges)  # noqa: E731
    assert len(seqs) <= cap and seqs == sorted(set(seqs)) and all(s in held and asked(s) for s in seqs)
    assert all(n <= cap + 1 for n in lookups) and len(lookups) <= len(ranges)
    assert gone_count == sum(b - a + 1 for a, b in gone)
    assert not any(a <= s <= b for a, b in gone for s in held)
    if not later:  # everything asked was looked at: each asked seq resent or gone, once
        total = sum(b - a + 1 for a, b in ranges)
        assert len(seqs) + gone_count == total


# -- decoders: the codec's and the subscriber's ---------------------------------------------------

cbor_like = st.one_of(st.binary(max_size=200), st.builds(lambda b: b"\xa1" + b, st.binary(max_size=60)))


@given(st.one_of(cbor_like, payloads), st.sampled_from([None, "application/json", "application/cbor", "x"]))
def test_codec_decode_fails_only_with_value_error(payload, content_type):
    try:
        body = codec.decode(payload, content_type)
    except ValueError:
        return
    assert isinstance(body, dict)


_worker = None


def worker():
    """The ingest worker `edged subscribe` and `edged ingest --db sqlite:///` run, on a SQLite
    file, never connected: only its handling of what arrives is exercised."""
    global _worker
    if _worker is None:
        from edged.cloud.ingest import IngestConfig, Worker

        import atexit
        import shutil

        where = tempfile.mkdtemp(prefix="edged-fuzz-")
        atexit.register(shutil.rmtree, where, True)
        cfg = IngestConfig()
        cfg.database.url = f"sqlite:///{where}/results.db"
        cfg.ingest.batch_delay_s = 0.0
        _worker = Worker(cfg, shared=False, persistent=False)
    return _worker


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["edged/dev/motion", "edged/dev/detections", "edged/dev/events", "edged/dev/status",
                        "edged/dev/stats", "x", "edged//motion"]),
       st.one_of(cbor_like, payloads,
                 st.builds(lambda s, ts: json.dumps({"seq": s, "ts": ts}).encode(),
                           st.one_of(st.integers(-2, 1 << 70), st.floats(), st.text(max_size=3)),
                           st.one_of(st.floats(), st.none(), st.text(max_size=3)))),
       st.sampled_from([None, "application/json", "application/cbor"]),
       st.sampled_from([0, 1]))
def test_the_receiver_takes_any_message_without_failing(topic, payload, content_type, qos):
    from paho.mqtt.client import MQTTMessage

    w = worker()
    msg = MQTTMessage(topic=topic.encode())
    msg.payload, msg.qos = payload, qos
    if content_type:
        msg.properties = Props(ContentType=content_type)
    w._on_message(None, None, msg)
    before = w.counters.received
    w.step()  # decodes, checks, commits: any problem is a rejected row, never an exception
    assert w.counters.received == before + 1
    bad = w.store.conn.execute("SELECT count(*) FROM results WHERE seq < 1 OR typeof(seq) != 'integer' "
                               "OR ts < 946684800").fetchone()[0]
    assert bad == 0


def _good_sample() -> dict:
    import base64
    import time

    rows = np.zeros((3, 7), "<f4").tobytes()
    return {"v": 1, "device_id": "dev", "id": 5, "ts": time.time(), "kind": "imu", "trigger": "unknown",
            "model": "motion", "label": "unknown", "score": 0.0, "t0": time.time() - 3, "n": 3,
            "signature": [1, 2], "sig_v": 2, "data": base64.b64encode(rows).decode()}


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.floats(),
                                     st.text(max_size=12)),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                                        max_size=3), max_leaves=8)


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(sorted(_good_sample()) + ["box", "region", "width", "height", "x"]),
                       json_values, max_size=4),
       st.sampled_from(["json", "cbor"]), st.sampled_from([False, False, False, True]))  # the worker: 1 in 4
def test_a_sample_from_the_network_is_stored_or_rejected_never_an_error(changes, codec_name, through_worker):
    """A sample (docs/mqtt.md `sample`) with any of its fields replaced by any value: a checked
    record or a one-line Reject, and the receiver stores or rejects it and goes on."""
    import time

    import cbor2

    from edged.cloud import payloads

    body = {**_good_sample(), **changes}
    try:
        payload = json.dumps(body).encode() if codec_name == "json" else cbor2.dumps(body)
    except (ValueError, TypeError, OverflowError):
        return  # not encodable (e.g. NaN into strict JSON): nothing a device could send
    got = payloads.parse_sample("dev", payload, None, now=time.time(), max_bytes=1 << 20)
    assert isinstance(got, (payloads.SampleRecord, payloads.Reject))
    if isinstance(got, payloads.Reject):
        one_line(got.reason)
    else:
        assert got.kind == "crop" or len(got.data) == got.meta["n"] * 28
    if through_worker:
        from paho.mqtt.client import MQTTMessage

        w = worker()
        msg = MQTTMessage(topic=b"edged/dev/sample")
        msg.payload, msg.qos = payload, 1
        w._on_message(None, None, msg)
        before = w.counters.received
        w.step()
        assert w.counters.received == before + 1


# -- images -------------------------------------------------------------------------------------------

MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"BM", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"P6\n",
         b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x01\x00\x00\x00\x01\x00\x00\x01\x00"]


def _png(w: int, h: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (w, h)).save(buf, format="PNG")
    return buf.getvalue()


@given(st.one_of(st.builds(lambda m, b: m + b, st.sampled_from(MAGIC), st.binary(max_size=300)),
                 st.builds(lambda w, h, cut: _png(w, h)[:cut], st.integers(1, 64), st.integers(1, 64),
                           st.integers(8, 400)),
                 st.builds(_png, st.integers(1, 64), st.integers(1, 64))),
       st.sampled_from([1 << 12, 1 << 24]))
def test_image_decode_fails_only_with_camera_error(data, max_pixels):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "frame.img"
        path.write_bytes(data)
        try:
            image = decode_image(path, max_pixels=max_pixels)
        except CameraError as exc:
            one_line(str(exc))
            return
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] * image.shape[1] <= max_pixels
