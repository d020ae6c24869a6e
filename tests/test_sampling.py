"""Sampling (`[sampling]`, docs/mqtt.md `sample`): what the models could not place leaves the
device within a budget, in its own queue, never ahead of a result.

The IMU recording is HAPT stair climbing (tests/data/hapt_heldout.npz, a person the shipped model
never trained on), which the shipped BasicMotions centroids call `unknown`: a motion nobody
enrolled. Real daemon, real mosquitto, real SQLite; the budget's clock is the only thing a
unit test here sets by hand.
"""

from __future__ import annotations

import json
import signal
import sqlite3

import jsonschema
import numpy as np
import pytest

from conftest import REPO, Arrivals, last_seq, wait_until, write_config
from edged import config
from edged.delivery import codec
from edged.delivery.samples import DAY, HOUR, Caps, SampleQueue
from edged.records import Sample
from edged.sources.imu.imucsv import read_imu_csv, write_imu_csv
from harness import TcpProxy

DATA = REPO / "tests" / "data"
CENTROIDS = REPO / "models" / "motion.centroids.json"
SCHEMA = json.loads((REPO / "docs" / "schemas" / "sample.schema.json").read_text())


def stairs_csv(path, subject=22):
    d = np.load(DATA / "hapt_heldout.npz")
    ends = np.append(d["start"][1:], len(d["x"]))
    i = next(k for k in range(len(d["start"])) if d["label"][k] == "walking_upstairs" and d["subject"][k] == subject)
    a, b = d["start"][i], ends[i]
    write_imu_csv(path, np.arange(b - a) / float(d["rate_hz"]), d["x"][a:b].astype(np.float32))
    return path


def sampling_config(tmp_path, broker, csv, sampling: str, mqtt: str = ""):
    return write_config(tmp_path / "edged.toml", broker, mqtt=mqtt,
                        extra=f'[camera]\nenabled = false\n[imu]\npath = "{csv}"\nspeed = 1\n'
                              f'[motion]\ncentroids = "{CENTROIDS}"\n[stats]\ninterval_s = 1\n'
                              f'[sampling]\nenabled = true\n{sampling}')


# -- config ----------------------------------------------------------------------------------------

def test_sampling_is_off_by_default_and_checked_strictly():
    assert config.Config().sampling.enabled is False
    with pytest.raises(config.ConfigError) as err:
        config.parse('[sampling]\nenabled = true\nvision_min_score = 0.7\nvision_max_score = 0.5\n'
                     'vision_labels = ["Face!"]\nper_hour = -1\nbogus = 1\n', "edged.toml")
    problems = err.value.problems
    assert "edged.toml:6: sampling.per_hour: expected 0 to 100000, got -1" in problems
    assert any(p.startswith("edged.toml:7: sampling.bogus: unknown key") for p in problems)
    assert "edged.toml:3: sampling.vision_min_score: must be below sampling.vision_max_score " \
           "(the uncertainty band is [min, max))" in problems
    assert "edged.toml:5: sampling.vision_labels[0]: expected a lowercase label, got 'Face!'" in problems
    assert len(problems) == 4


# -- the queue and its budget (real SQLite, a clock set by hand) --------------------------------------

class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _payload(size: int):
    return lambda sid: json.dumps({"id": sid, "pad": "x" * size}).encode()


def test_the_budget_holds_across_reopening_and_slides(tmp_path):
    clock = Clock(1_800_000_000.0)
    caps = Caps(per_hour=3, bytes_per_hour=10_000, per_day=5, bytes_per_day=1 << 20, max_sample_bytes=5000)
    path = tmp_path / "samples.db"
    q = SampleQueue(path, caps, clock=clock)
    ids = [q.offer("t", _payload(100)) for _ in range(3)]
    assert None not in ids and ids == sorted(ids)
    assert q.offer("t", _payload(100)) is None and q.skipped == 1  # 3 per hour
    q.close()
    # A restart (or a crash: every offer is its own committed transaction) does not reset it.
    q = SampleQueue(path, caps, clock=clock)
    assert q.depth == 3 and q.spent()["hour"] == 3
    assert not q.room() and q.offer("t", _payload(100)) is None
    assert q.offer("t", _payload(6000)) is None  # larger than max_sample_bytes, whatever the budget
    clock.t += HOUR + 1                     # the hour slides on; the day still holds the three
    assert [q.offer("t", _payload(100)) is not None for _ in range(3)] == [True, True, False]  # 5 per day
    assert q.spent()["day"] == 5
    # Sent and deleted samples stay spent.
    q.delete([r.id for r in q.pending(0, 10)])
    assert q.depth == 0 and q.spent()["day"] == 5 and q.offer("t", _payload(100)) is None
    # A clock set back an hour still counts what was taken "later".
    clock.t -= 2 * HOUR
    assert q.spent()["day"] == 5 and q.offer("t", _payload(100)) is None
    clock.t += 2 * HOUR + DAY + 1           # a day after the last one: all free again
    assert q.offer("t", _payload(100)) is not None
    q.close()
    q = SampleQueue(path, caps, clock=clock)
    assert q.spent() == {"hour": 1, "hour_bytes": q.spent()["hour_bytes"], "day": 1, "day_bytes": q.spent()["day_bytes"]}
    db = sqlite3.connect(path)
    assert db.execute("SELECT count(*) FROM taken").fetchone()[0] == 1  # older entries pruned
    db.close()
    q.close()


def test_bytes_caps_and_the_queue_bound_drop_the_oldest(tmp_path):
    clock = Clock(1_800_000_000.0)
    caps = Caps(per_hour=100, bytes_per_hour=2500, per_day=100, bytes_per_day=1 << 20, max_sample_bytes=2000)
    q = SampleQueue(tmp_path / "samples.db", caps, clock=clock, max_bytes=2500)
    sizes = []
    while (sid := q.offer("t", _payload(1000))) is not None:
        sizes.append(sid)
    assert len(sizes) == 2 and q.spent()["hour_bytes"] <= 2500  # a third would pass 2500 bytes
    clock.t += HOUR + 1
    assert q.offer("t", _payload(1000)) is not None
    assert q.depth == 2 and q.dropped == 1  # the queue's own bound: the oldest went
    assert [r.id for r in q.pending(0, 10)] == sizes[1:] + [sizes[-1] + 1]
    q.close()


# -- the real daemon ---------------------------------------------------------------------------------

def test_unknown_windows_arrive_as_samples_that_decode_to_the_recording(tmp_path, broker, daemon_factory):
    codec_name = "json"  # CBOR: the fault test below
    csv = stairs_csv(tmp_path / "stairs.csv")
    rec = read_imu_csv(csv)
    got = Arrivals(broker, ("motion", "sample", "stats"))
    cfg = sampling_config(tmp_path, broker, csv, "min_interval_s = 0\nper_hour = 3\n",
                          mqtt=f'codec = "{codec_name}"\n')
    d = daemon_factory(cfg).start()
    try:
        # A reload in between (the sampler is restarted with the pipeline) changes nothing.
        assert wait_until(lambda: got.of("sample"), 60), d.output()
        d.signal(signal.SIGHUP)
        assert wait_until(lambda: "msg=reloaded" in d.output(), 30), d.output()
        assert wait_until(lambda: len(got.of("sample")) >= 3 and any(
            s.get("samples_skipped") for s in got.of("stats")), 60), d.output()
        assert d.stop() == 0
    finally:
        got.close()
    samples = got.of("sample")
    assert len(samples) == 3  # the hourly cap, though more windows were unknown
    motion = {round(m["ts"], 3): m for m in got.of("motion")}
    from edged.models import load_manifest, open_model
    from edged.stages.motion import InputSpec, Preprocessor

    entry = load_manifest()["motion"]
    model = open_model(entry, threads=1)
    spec = InputSpec.from_entry(entry)
    for s in samples:
        raw = next(p for lf, b, p in got.items if lf == "sample" and b["id"] == s["id"])
        jsonschema.validate(json.loads(raw), SCHEMA)
        assert s["kind"] == "imu" and s["trigger"] == "unknown" and s["label"] == "unknown"
        m = motion[s["ts"]]  # the result it belongs to: same window end, same signature
        assert m["label"] == "unknown" and m["signature"] == s["signature"] and m["sig_v"] == s["sig_v"]
        t, x = codec.imu_window(s)
        assert len(t) == s["n"] > spec.window
        # Exactly the recording's samples (the replay stamps them with wall-clock time).
        k = int(np.flatnonzero((rec.data == x[0]).all(axis=1))[0])
        assert np.array_equal(x, rec.data[k:k + len(x)])
        steps = np.diff(t)
        assert np.allclose(steps, np.diff(rec.t[k:k + len(x)]), atol=2e-6)
        # And they make the window the model saw: its signature again.
        win = Preprocessor(spec, len(t))(t, x, end=s["ts"])
        model.set_input(0, win[None])
        model.invoke()
        sig_i = model.output_by_name(entry.params["signature_output"])
        again = model.raw_output(sig_i).reshape(-1).astype(int)
        assert np.abs(again - np.array(s["signature"])).max() <= 1  # ts is rounded to 1 ms in the payload
    last = got.of("stats")[-1]
    assert last["samples_taken"] == 3 and last["samples_sent"] == 3 and last["samples_skipped"] >= 1
    assert last["samples_bytes_sent"] == sum(len(p) for lf, _, p in got.items if lf == "sample")


def test_budget_holds_across_outages_and_restarts_and_results_go_first(tmp_path, broker, daemon_factory):
    """Broker unreachable, the daemon stopped, killed and restarted meanwhile: the hourly cap
    holds over all of it, and after the outage every spooled result arrives before any sample."""
    csv = stairs_csv(tmp_path / "stairs.csv", subject=16)
    proxy = TcpProxy(broker.host, broker.port)
    got = Arrivals(broker, ("motion", "sample", "stats"))
    state = tmp_path / "state"
    cfg = sampling_config(tmp_path, proxy, csv, "min_interval_s = 0\nper_hour = 3\n",
                          mqtt='reconnect_min_s = 0.2\ncodec = "cbor"\n')
    proxy.refuse(True)

    def taken() -> int:
        try:
            db = sqlite3.connect(f"file:{state / 'samples.db'}?mode=ro", uri=True)
        except sqlite3.OperationalError:
            return 0
        try:
            return db.execute("SELECT count(*) FROM taken").fetchone()[0]
        except sqlite3.OperationalError:
            return 0
        finally:
            db.close()

    try:
        # Run 1, broker down: one sample taken, then a clean stop.
        d = daemon_factory(cfg).start()
        assert wait_until(lambda: taken() >= 1, 60), d.output()
        assert d.stop() == 0
        # Run 2: killed once the budget is spent and two more unknown windows were turned away.
        mark = last_seq(state)
        d = daemon_factory(cfg).start()
        assert wait_until(lambda: taken() >= 3, 60), d.output()
        # Every window is unknown and may be sampled: four windows in this run, two of them beyond
        # the budget. (A window's result and its sample are committed by different threads, so
        # the seq read when the third sample was taken can lag it: counted from `mark` instead.)
        assert wait_until(lambda: last_seq(state) >= mark + 4, 60), d.output()
        d.signal(signal.SIGKILL)
        d.wait(10)
        assert taken() == 3  # the windows beyond the budget were turned away
        # Run 3: nothing more may be taken within the hour.
        mark = last_seq(state)
        d = daemon_factory(cfg).start()
        assert wait_until(lambda: last_seq(state) >= mark + 2, 60), d.output()
        assert taken() == 3
        spooled = last_seq(state)
        proxy.refuse(False)  # the broker is back
        assert wait_until(lambda: len(got.of("sample")) >= 3 and {m["seq"] for m in got.of("motion")}
                          >= set(range(1, spooled + 1)), 60), d.output()[-3000:]
        assert wait_until(lambda: any(s.get("samples_sent") for s in got.of("stats")), 30)
        assert d.stop() == 0
    finally:
        got.close()
        proxy.close()
    assert taken() == 3 and len({s["id"] for s in got.of("sample")}) == 3
    for (leaf, body, raw) in got.items:
        if leaf == "sample":  # CBOR on the wire; decoded, what the schema describes
            assert raw[:1] != b"{"
            jsonschema.validate({**body, "data": "x"}, SCHEMA)
            assert len(codec.sample_data(body)) == body["n"] * 28
    # Every result spooled during the outage arrived before the first sample.
    order = got.order()
    first_sample = next(i for i, (lf, _) in enumerate(order) if lf == "sample")
    before = {b["seq"] for lf, b in order[:first_sample] if lf == "motion"}
    assert set(range(1, spooled + 1)) <= before
    stats = got.of("stats")[-1]
    assert stats["samples_last_hour"] == 3 and stats["samples_skipped"] >= 1


def test_uncertain_detections_are_sent_as_crops(tmp_path, broker, daemon_factory):
    got = Arrivals(broker, ("motion", "sample", "stats"))
    cfg = write_config(tmp_path / "edged.toml", broker,
                       extra='[camera]\nfps = 4\n[imu]\nenabled = false\n[vision]\nmodel = "face"\nheartbeat_s = 1\n'
                             '[sampling]\nenabled = true\nvision_min_score = 0.3\nvision_max_score = 0.999\n'
                             'min_interval_s = 0\nper_hour = 2\ncrop_margin = 0.5\n')
    d = daemon_factory(cfg).start()
    try:
        assert wait_until(lambda: len(got.of("sample")) >= 2, 60), d.output()
        assert d.stop() == 0
    finally:
        got.close()
    from PIL import Image
    import io

    for s in got.of("sample"):
        jsonschema.validate({**s, "data": "x"}, SCHEMA)
        assert s["kind"] == "crop" and s["trigger"] == "uncertain" and 0.3 <= s["score"] < 0.999
        x0, y0, x1, y1 = s["box"]
        r0, r1, r2, r3 = s["region"]
        assert r0 <= x0 + 1e-3 and r1 <= y0 + 1e-3 and r2 >= x1 - 1e-3 and r3 >= y1 - 1e-3
        assert (r2 - r0) < 1.0 or (r3 - r1) < 1.0  # a crop, not the frame
        im = Image.open(io.BytesIO(codec.sample_data(s)))
        assert im.format == "JPEG" and im.size == (s["width"], s["height"])
        assert s["label"] == "face" and s["model"] == "face"


def test_the_ingest_checks_and_the_schema_agree_on_samples():
    """What edged ingest stores is what docs/schemas/sample.schema.json describes (both ways)."""
    import base64
    import time

    from edged.cloud import payloads

    now = time.time()
    rows = np.zeros((4, 7), "<f4").tobytes()
    jpeg = b"\xff\xd8\xff\xe0" + b"\0" * 20
    good = {
        "imu": {"v": 1, "device_id": "pi-a", "id": 7, "ts": now, "kind": "imu", "trigger": "unknown",
                "model": "motion", "label": "unknown", "score": 0.0, "t0": now - 3, "n": 4,
                "signature": [1, -2], "sig_v": 2, "data": base64.b64encode(rows).decode()},
        "crop": {"v": 1, "device_id": "pi-a", "id": 8, "ts": now, "kind": "crop", "trigger": "uncertain",
                 "model": "face", "label": "face", "score": 0.6, "box": [0.1, 0.1, 0.2, 0.2],
                 "region": [0.0, 0.0, 0.3, 0.3], "width": 20, "height": 20, "data": base64.b64encode(jpeg).decode()},
    }
    mutations = [("id", 0), ("id", "7"), ("v", 2), ("kind", "audio"), ("score", 2.0), ("label", "Face"),
                 ("extra", 1), ("model", "a b"), ("device_id", "a/b"), ("n", 1), ("signature", [200]),
                 ("sig_v", 0), ("box", [0, 0, 2, 1]), ("width", 0), ("region", [0, 0, 1])]
    validator = jsonschema.Draft202012Validator(SCHEMA)
    for kind, body in good.items():
        assert validator.is_valid(body), list(validator.iter_errors(body))
        assert payloads.parse_sample("pi-a", json.dumps(body).encode(), None, now=now, max_bytes=1 << 20).kind == kind
        other = "crop" if kind == "imu" else "imu"
        for key, value in mutations + [("trigger", good[other]["trigger"]), ("t0" if kind == "crop" else "box", 1)]:
            if key not in body and key not in ("extra", "t0", "box"):
                continue
            bad = dict(body, **{key: value})
            assert not validator.is_valid(bad), (kind, key, value)
            got = payloads.parse_sample("pi-a", json.dumps(bad).encode(), None, now=now, max_bytes=1 << 20)
            assert isinstance(got, payloads.Reject), (kind, key, value)
        for key in body:
            short = {k: v for k, v in body.items() if k != key}
            assert not validator.is_valid(short), (kind, key)
            assert isinstance(payloads.parse_sample("pi-a", json.dumps(short).encode(), None, now=now,
                                                    max_bytes=1 << 20), payloads.Reject), (kind, key)


@pytest.mark.parametrize("full_frame", [False, True])
def test_a_crop_is_the_box_with_its_margin_and_fits_the_sample_limit(tmp_path, full_frame):
    """The sampler on its own (real queue, real JPEG encoder): a crop shows the box grown by the
    margin, the whole frame only when configured, and a JSON payload (base64) stays within
    sampling.max_sample_bytes by re-encoding smaller."""
    import io

    from PIL import Image

    from edged.records import DetectedObject
    from edged.service.sampler import Sampler

    cfg = config.parse(f'[sampling]\nenabled = true\nvision_min_score = 0.4\nvision_max_score = 0.8\n'
                       f'min_interval_s = 0\nmax_sample_bytes = 8192\nfull_frame = {str(full_frame).lower()}\n'
                       f'crop_margin = 0.5\n')
    q = SampleQueue(tmp_path / "samples.db", Caps.from_config(cfg.sampling))
    s = Sampler(cfg, q, codec.JSON)
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)  # noise: JPEG's worst case
    o = DetectedObject("face", 0.6, (0.25, 0.25, 0.5, 0.75))
    assert not s.wants_crop(DetectedObject("face", 0.9, o.box), 1.0)  # outside the band
    assert s.wants_crop(o, 1.0)
    s.take_crop(image, o, 1.0, "face")
    s._store(s._requests.get_nowait())
    (row,) = q.pending(0, 5)
    assert len(row.payload) <= 8192
    body = codec.decode(row.payload)
    region = body["region"]
    assert region == ([0.0, 0.0, 1.0, 1.0] if full_frame else [0.125, 0.0, 0.625, 1.0])
    im = Image.open(io.BytesIO(codec.sample_data(body)))
    assert im.size == (body["width"], body["height"])
    # Shrunk to fit, keeping the region's shape.
    want = (640, 480) if full_frame else (320, 480)
    assert im.size[0] / im.size[1] == pytest.approx(want[0] / want[1], rel=0.05) and im.size[0] < want[0]
    q.close()


def test_a_damaged_sample_queue_turns_sampling_off_not_the_results(tmp_path, broker, subscriber, daemon_factory):
    csv = stairs_csv(tmp_path / "stairs.csv")
    state = tmp_path / "state"
    state.mkdir()
    (state / "samples.db").write_bytes(b"this is not a database" * 100)
    cfg = sampling_config(tmp_path, broker, csv, "min_interval_s = 0\n")
    d = daemon_factory(cfg).start()
    assert subscriber.wait(lambda: len(subscriber.on("motion")) >= 2, 60), d.output()
    assert d.stop() == 0
    out = d.output()
    assert 'msg="sampling off: the sample queue cannot be opened"' in out and "samples.db" in out
    assert subscriber.on("sample") == [] and "Traceback" not in out
    assert (state / "samples.db").read_bytes().startswith(b"this is not a database")  # left for inspection
