"""`edged ingest` against a real mosquitto and a real PostgreSQL: exactly once in the database
through worker kills, database restarts and malformed payloads.

The devices are the fleet simulator (edged/cloud/fleet.py): each its own MQTT connection, seq
and codec, publishing payloads made by the project's codec, keeping every result until the
broker acknowledged it. Every wait is for a condition (rows in the database, a process state),
never a fixed time.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from conftest import REPO, last_seq, wait_until, write_config
from harness import Broker
from pgserver import Postgres

psycopg = pytest.importorskip("psycopg", reason="the cloud extra (psycopg) is part of the test extra")

from edged.cloud import payloads, store  # noqa: E402
from edged.cloud.fleet import Fleet  # noqa: E402

# What docs/cloud.md tells an operator to set on mosquitto for ingest: no cap on a persistent
# session's queue (the default, 1000, drops messages queued for a dead worker) and a window of
# unacknowledged messages wide enough for batches.
BROKER_CONF = "max_queued_messages 0\nmax_inflight_messages 1000\n"


@pytest.fixture(scope="session")
def postgres():
    pg = Postgres().start()
    yield pg
    pg.close()


@pytest.fixture
def db(postgres, request):
    """A fresh, migrated database; its URL."""
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name)[:50].lower() + \
        f"_{time.monotonic_ns() % 10**6}"
    url = postgres.create_database(name)
    with psycopg.connect(url, autocommit=True) as conn:
        store.migrate(conn)
    return url


@pytest.fixture
def ingest_broker(tmp_path):
    b = Broker(tmp_path / "broker", listener_conf=BROKER_CONF, persistent=True).start()
    yield b
    b.stop()


def ingest_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "edged", "ingest", *args]


class Worker:
    """`edged ingest` as a process, as systemd would run it."""

    def __init__(self, tmp: Path, broker: Broker, db: str, client_id: str, *extra: str) -> None:
        self.args = ingest_cmd("--db", db, "--host", broker.host, "--port", str(broker.port),
                               "--client-id", client_id, "--batch-delay", "0.05", *extra)
        self.log = tmp / f"{client_id}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Worker":
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(self.args, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                     env=env, cwd=REPO)
        # Up when the broker granted its subscriptions (from then on the group's share is kept).
        mark = self.output().count('msg=subscribed')
        if not wait_until(lambda: self.output().count("msg=subscribed") > mark or self.proc.poll() is not None, 30):
            raise RuntimeError(f"ingest worker did not connect: {self.output()[-2000:]}")
        assert self.proc.poll() is None, self.output()
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(20)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture
def workers(tmp_path):
    made: list[Worker] = []

    def make(broker, db, client_id, *extra) -> Worker:
        w = Worker(tmp_path, broker, db, client_id, *extra)
        made.append(w)
        return w

    yield make
    for w in made:
        w.kill()


def q(url: str, sql: str, *params):
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def count(url: str) -> int:
    return q(url, "SELECT count(*) FROM results")[0][0]


def assert_exactly_once(url: str, last_seqs: dict[str, int]) -> None:
    """Every device's seqs 1..last are stored, each once, and `gaps` is empty."""
    rows = q(url, "SELECT device_id, count(*), count(DISTINCT seq), min(seq), max(seq) FROM results GROUP BY 1")
    got = {d: (n, distinct, lo, hi) for d, n, distinct, lo, hi in rows}
    assert set(got) == set(last_seqs)
    for device, last in last_seqs.items():
        assert got[device] == (last, last, 1, last), device
    assert q(url, "SELECT * FROM gaps") == []


def wait_stored(url: str, n: int, timeout: float = 60) -> int:
    return wait_until(lambda: count(url) >= n and count(url), timeout, 0.1) or count(url)


# -- payload checks -----------------------------------------------------------------------------


def _schema(name: str) -> dict:
    return json.loads((REPO / "docs" / "schemas" / f"{name}.schema.json").read_text())


def test_payload_checks_agree_with_the_shipped_schemas():
    """The ingest's own checks accept and refuse what docs/schemas/ accept and refuse."""
    jsonschema = pytest.importorskip("jsonschema")
    now = time.time()
    good = {
        "detections": {"v": 1, "device_id": "pi-a", "seq": 3, "ts": now, "inference_ms": 2.5,
                       "objects": [{"label": "face", "score": 0.9, "box": [0.1, 0.2, 0.3, 0.4]}]},
        "motion": {"v": 1, "device_id": "pi-a", "seq": 4, "ts": now, "label": "walking", "score": 0.8,
                   "signature": [1, -128, 127], "window_s": 3.0, "inference_ms": 0.3},
        "events": {"v": 1, "device_id": "pi-a", "seq": 5, "ts": now, "type": "end", "id": 3, "label": "person",
                   "score": 0.9, "box": [0.1, 0.2, 0.3, 0.4], "start_ts": now - 5, "dwell_s": 5.0,
                   "inside": ["face"]},
    }
    mutations = [
        ("seq", 0), ("seq", "7"), ("seq", True), ("v", 2), ("device_id", "a/b"), ("ts", "x"),
        ("inference_ms", -1), ("extra", 1), ("score", 1.5), ("label", "Walking"),
        ("signature", [128]), ("signature", []), ("signature", list(range(17))), ("window_s", 0),
        ("objects", [{"label": "face", "score": 0.5, "box": [0, 0, 1]}]),
        ("objects", [{"label": "face", "score": 0.5, "box": [0, 0, 1, 2]}]),
        ("objects", [{"label": "face", "score": 0.5}]), ("objects", "face"),
        ("objects", [{"label": "face", "score": 0.5, "box": [0, 0, 1, 1], "parent": -1}]),
        ("objects", [{"label": "face", "score": 0.5, "box": [0, 0, 1, 1], "stage": "a b"}]),
        ("objects", [{"label": "pose", "score": 0.5, "box": [0, 0, 1, 1], "signature": [128, 0, 0]}]),
        ("type", "start"), ("id", 0), ("box", [0, 0, 2, 1]), ("dwell_s", -1), ("inside", ["Face"]),
        ("inside", ["face", "face"]), ("parent", 0),
    ]
    chained = dict(good["detections"], objects=[
        {"label": "person", "score": 0.9, "box": [0.1, 0.1, 0.5, 0.9], "stage": "people"},
        {"label": "face", "score": 0.8, "box": [0.2, 0.1, 0.3, 0.2], "stage": "faces_in_people", "parent": 0},
        {"label": "pose", "score": 0.9, "box": [0.1, 0.1, 0.5, 0.9], "stage": "poses", "parent": 0,
         "signature": [0, -127, 127] * 17}])
    assert payloads.check("detections", chained, now=now) is None
    assert jsonschema.Draft202012Validator(_schema("detections")).is_valid(chained)
    for kind, body in good.items():
        validator = jsonschema.Draft202012Validator(_schema(kind))
        assert validator.is_valid(body) and payloads.check(kind, body, now=now) is None
        for key, value in mutations:
            if key not in body and key != "extra":
                continue
            bad = dict(body, **{key: value})
            assert not validator.is_valid(bad), (kind, key, value)
            assert payloads.check(kind, bad, now=now), (kind, key, value)
        for key in body:
            short = {k: v for k, v in body.items() if k != key}
            assert not validator.is_valid(short) and payloads.check(kind, short, now=now)


def test_resend_replies_are_read_only_when_well_formed():
    """A device's resend reply comes from the network: the worker reads `gone` and `later` only
    from a reply docs/schemas/response.schema.json accepts, and nothing else from anything."""
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(_schema("response"))
    good = {"cmd": "resend", "ok": True, "id": "w1", "resent": 3, "resent_ranges": [[4, 6]],
            "gone": [[1, 3]], "gone_count": 3, "later": [[7, 9]]}
    assert validator.is_valid(good)
    assert payloads.resend_answer(json.dumps(good).encode()) == ([(1, 3)], [(7, 9)])
    # first <= last is beyond what the schema can say; the worker checks it too.
    assert payloads.resend_answer(json.dumps(dict(good, gone=[[3, 1]])).encode()) is None
    forged = [
        dict(good, gone=[[0, 3]]), dict(good, gone=[["1", "3"]]),
        dict(good, gone=[[True, 3]]), dict(good, gone=[[1.5, 3]]), dict(good, later=[[1, 1 << 63]]),
        dict(good, later=[[1, 2, 3]]), dict(good, gone=[[i, i] for i in range(1, 34)]), dict(good, gone="1-3"),
    ]
    for body in forged:
        assert not validator.is_valid(body), body
        assert payloads.resend_answer(json.dumps(body).encode()) is None, body
    for raw in (b"\xff", b"[" * 5000, b"[]", b'{"cmd": "stats", "ok": true}', b'{"cmd": "resend", "ok": false}',
                json.dumps(dict(good, pad="x" * 70000)).encode()):
        assert payloads.resend_answer(raw) is None


def test_both_codecs_decode_to_the_same_row():
    from edged.delivery import codec
    from edged.records import MotionSignature

    m = MotionSignature(ts=1764012347.5, label="walking", score=0.98, signature=(12, -40, 3, -128),
                        window_s=3.0, inference_ms=0.31)
    rows = [payloads.parse("pi-a", "motion", c.motion(m, "pi-a", 7), c.content_type, now=time.time(),
                           max_bytes=65536) for c in (codec.JSON, codec.get("cbor"))]
    assert all(isinstance(r, payloads.Result) for r in rows)
    assert rows[0].body["signature"] == rows[1].body["signature"] == [12, -40, 3, -128]
    assert (rows[0].seq, rows[0].ts) == (rows[1].seq, rows[1].ts) == (7, 1764012347.5)
    wrong = payloads.parse("pi-b", "motion", codec.JSON.motion(m, "pi-a", 7), None, now=time.time(),
                           max_bytes=65536)
    assert isinstance(wrong, payloads.Reject) and wrong.kind == "wrong_device"


# -- the command line -----------------------------------------------------------------------------


def test_resend_command_line_refusals(tmp_path):
    """`--device` only with `--resend`, and only a device id; a broker that is not there: 69."""
    db = f"sqlite:///{tmp_path / 'r.db'}"
    for args, needle in ((["--device", "pi-1"], "--device: only with --resend"),
                         (["--resend", "--device", "a/b"], "--device: expected a device id")):
        r = subprocess.run(ingest_cmd("--db", db, *args), capture_output=True, text=True, cwd=REPO, timeout=60)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r
    r = subprocess.run(ingest_cmd("--db", db, "--port", "1", "--resend"), capture_output=True, text=True, cwd=REPO,
                       timeout=60)
    assert r.returncode == 69 and "cannot connect to the broker 127.0.0.1:1" in r.stderr, r
    assert "Traceback" not in r.stderr


def test_migrate_is_idempotent_and_an_unmigrated_database_is_refused(postgres, tmp_path):
    url = postgres.create_database(f"t_migrate_{time.monotonic_ns() % 10**6}")
    run = lambda *a: subprocess.run(ingest_cmd("--db", url, *a), capture_output=True, text=True,  # noqa: E731
                                    cwd=REPO, timeout=60)
    refused = run("--port", "1")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "edged: the database schema is at version 0, this edged needs 5: run `edged ingest --migrate` first"]
    first, again = run("--migrate"), run("--migrate")
    assert first.returncode == again.returncode == 0, first.stderr
    assert "applied 0001_schema, 0002_events, 0003_samples, 0004_resend, 0005_event_posture" in first.stdout and "applied" not in again.stdout
    assert q(url, "SELECT version FROM schema_migrations ORDER BY 1") == [(1,), (2,), (3,), (4,), (5,)]
    # Today's partition (and its neighbours) exist before any result arrives.
    assert len(q(url, "SELECT 1 FROM pg_inherits WHERE inhparent = 'results'::regclass")) == 3


def test_bad_config_is_one_line_per_problem_and_exit_2(tmp_path):
    cfg = tmp_path / "ingest.toml"
    cfg.write_text('[ingest]\nbatch_size = 0\ngroup = "a/b"\n[database]\nurl = "mysql://x"\n[mqtt]\nport = 1883\nbogus = 1\n')
    r = subprocess.run(ingest_cmd("--config", str(cfg), "--batch-delay", "-1"), capture_output=True,
                       text=True, cwd=REPO, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines == [
        f"edged: {cfg}:2: ingest.batch_size: expected 1 to 10000, got 0",
        f"edged: {cfg}:3: ingest.group: expected 1 to 64 letters, digits, '-' or '_', got 'a/b'",
        f"edged: {cfg}:5: database.url: expected a postgresql:// URL or sqlite:///FILE, got 'mysql://x'",
        f"edged: {cfg}:8: mqtt.bogus: unknown key (known here: ca_file, cert_file, host, keepalive_s, "
        "key_file, password, port, reconnect_max_s, reconnect_min_s, session_expiry_s, tls, topic_prefix, username)",
        "edged: command line: ingest.batch_delay_s: expected 0.0 to 60, got -1.0",
    ]
    assert "Traceback" not in r.stderr


def test_help_names_every_setting():
    r = subprocess.run(ingest_cmd("--help"), capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0
    for flag in ("--migrate", "--db", "--group", "--client-id", "--batch-size", "--batch-delay",
                 "--max-inflight", "--retention-days", "--config"):
        assert flag in r.stdout


# -- delivery -------------------------------------------------------------------------------------


def test_every_result_lands_once_with_device_rows(ingest_broker, db, workers):
    w = workers(ingest_broker, db, "solo").start()
    fleet = Fleet(ingest_broker.host, ingest_broker.port, 12, motion_hz=40, detection_every_s=0.1,
                  per_device=40, stats_every_s=0.2).start()
    fleet.restart(3)  # republishes what the broker had not acknowledged yet: duplicates, counted
    assert wait_until(fleet.done, 60)
    total = fleet.made()
    assert wait_stored(db, total) == total
    assert_exactly_once(db, fleet.last_seqs())
    devices = dict((d, (s, dropped, backend)) for d, s, dropped, backend in
                   q(db, "SELECT device_id, status, dropped, backend FROM devices"))
    assert set(devices) == set(fleet.last_seqs())
    assert all(v == ("online", 0, "cpu") for v in devices.values()), devices
    # The views users query: typed columns from both codecs.
    sig = q(db, "SELECT signature, label FROM motion WHERE device_id = 'sim-0001' ORDER BY seq LIMIT 1")[0]
    assert len(sig[0]) == 16 and all(-128 <= v <= 127 for v in sig[0]) and sig[1] in ("standing", "walking", "running", "badminton")
    assert q(db, "SELECT count(*) FROM detected_objects")[0][0] > 0
    fleet.stop()
    assert wait_until(lambda: q(db, "SELECT count(*) FROM devices WHERE status = 'offline'")[0][0] == 12, 30)
    assert w.stop() == 0
    assert "ingest worker stopped" in w.output()


def test_a_redelivered_result_is_counted_not_stored(ingest_broker, db, workers):
    from edged.delivery import codec
    from edged.records import Detections

    workers(ingest_broker, db, "solo").start()
    payload = codec.JSON.detections(Detections(ts=time.time(), objects=(), inference_ms=1.0), "pi-x", 1)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect(ingest_broker.host, ingest_broker.port)
    c.loop_start()
    for _ in range(3):
        c.publish("edged/pi-x/detections", payload, qos=1).wait_for_publish(10)
    assert wait_until(lambda: q(db, "SELECT duplicates FROM devices WHERE device_id = 'pi-x'") == [(2,)], 30)
    assert q(db, "SELECT device_id, seq, kind FROM results") == [("pi-x", 1, "detections")]
    c.loop_stop()
    c.disconnect()


def test_two_workers_one_killed_and_restarted_mid_stream_lose_nothing(ingest_broker, db, workers):
    w1 = workers(ingest_broker, db, "w1").start()
    w2 = workers(ingest_broker, db, "w2").start()
    fleet = Fleet(ingest_broker.host, ingest_broker.port, 16, motion_hz=25, detection_every_s=0.2,
                  per_device=150, stats_every_s=0).start()
    total = 16 * 150
    rng = random.Random(12)
    marks = sorted(rng.sample(range(200, total - 400), 3))
    for mark in marks:
        assert wait_until(lambda: count(db) >= mark, 60), f"stuck below {mark}: {count(db)}"
        w1.kill()
        before = count(db)
        # The survivor keeps storing its share while w1 is dead ...
        assert wait_until(lambda: count(db) >= before + 50 or fleet.done(), 60)
        w1.start()  # ... and w1's share, held by the broker for its session, arrives on restart.
    assert wait_until(fleet.done, 60)
    assert wait_stored(db, total) == total
    assert_exactly_once(db, fleet.last_seqs())
    assert w2.proc.poll() is None
    fleet.stop()


def test_three_real_daemons_two_workers_one_killed(ingest_broker, db, workers, daemon_factory, tmp_path):
    """The issue's bar: real `edged run` daemons (demo camera and IMU replay, sped up), two
    workers in one group, one SIGKILLed mid-stream and restarted; afterwards each device's seqs
    are contiguous from 1 to its outbox's last, once each, and `gaps` is empty."""
    fast = "[camera]\nfps = 5\n[imu]\nspeed = 10\n[stats]\ninterval_s = 1\n"
    w1 = workers(ingest_broker, db, "w1").start()
    workers(ingest_broker, db, "w2").start()
    daemons, states = [], {}
    for n in range(3):
        d = tmp_path / f"dev{n}"
        d.mkdir()
        cfg = write_config(d / "edged.toml", ingest_broker, device_id=f"pi-{n}", extra=fast,
                           mqtt='codec = "cbor"\n' if n == 1 else "")
        daemons.append(daemon_factory(cfg).start())
        states[f"pi-{n}"] = d / "state"
    assert wait_until(lambda: count(db) >= 40, 90), [dm.output()[-1000:] for dm in daemons]
    w1.kill()
    before = count(db)
    assert wait_until(lambda: count(db) >= before + 20, 60)
    w1.start()
    assert wait_until(lambda: count(db) >= before + 60, 60)
    for dm in daemons:
        assert dm.stop() == 0
    last = {device: last_seq(state) for device, state in states.items()}
    assert wait_until(lambda: count(db) >= sum(last.values()), 60)
    assert_exactly_once(db, last)
    stats = q(db, "SELECT device_id, status, dropped, backend FROM devices ORDER BY 1")
    assert stats == [(f"pi-{n}", "offline", 0, "cpu") for n in range(3)]


def test_postgres_restarted_mid_stream_loses_nothing(ingest_broker, postgres, db, workers):
    w = workers(ingest_broker, db, "solo").start()
    fleet = Fleet(ingest_broker.host, ingest_broker.port, 10, motion_hz=25, detection_every_s=0.2,
                  per_device=120, stats_every_s=0).start()
    total = 10 * 120
    for mark, mode in ((250, "immediate"), (700, "fast")):
        assert wait_until(lambda: count(db) >= mark, 60)
        seen = w.output().count("not acknowledging until it is back")
        postgres.stop(mode)
        # The worker notices (its next batch fails) and stops acknowledging ...
        assert wait_until(lambda: w.output().count("not acknowledging until it is back") > seen, 30)
        postgres.start()
        # ... and carries on when the database is back.
        assert wait_until(lambda: w.output().count("the database is back") > seen, 60)
    assert wait_until(fleet.done, 60)
    assert wait_stored(db, total) == total
    assert_exactly_once(db, fleet.last_seqs())
    assert w.proc.poll() is None
    fleet.stop()


# Resend soon, in a test: gaps a second old are asked for, and a worker looks every 5 s.
RESEND_FAST = "[ingest]\nresend_after_s = 1\nresend_interval_s = 5\n"


def test_broker_restarted_mid_stream_loses_nothing(ingest_broker, db, workers, tmp_path):
    """mosquitto with persistence saves the workers' sessions and queues on a clean stop; the
    devices keep publishing through the restart. mosquitto 2.0.11 does not restore a shared
    subscription from its persistence file, so what devices publish between the broker's start
    and the worker's new subscription matches no subscription and is dropped after the device
    has its acknowledgement (docs/cloud.md, "Broker restarts"). The worker finds those seqs in
    `gaps` and asks the devices for them (`cmd/resend`); the devices still keep them and send
    them again: in the end every result is stored once and `gaps` is empty.

    The worker reconnects at most every 2 s, the devices within a second: the devices are
    usually back first, so the window in which results are lost is real, not left to chance."""
    cfg = tmp_path / "ingest.toml"
    cfg.write_text(RESEND_FAST + "[mqtt]\nreconnect_min_s = 2\n")
    w = workers(ingest_broker, db, "solo", "--config", str(cfg)).start()
    fleet = Fleet(ingest_broker.host, ingest_broker.port, 10, motion_hz=25, detection_every_s=0.2,
                  per_device=120, stats_every_s=0).start()
    total = 10 * 120
    assert wait_until(lambda: count(db) >= 300, 60)
    mark = w.output().count("msg=subscribed")
    ingest_broker.stop()
    ingest_broker.start()
    assert wait_until(lambda: w.output().count("msg=subscribed") > mark, 60), w.output()[-2000:]
    assert wait_until(fleet.done, 90)
    got = wait_stored(db, total, 120)
    assert got == total, (got, fleet.resent(), q(db, "SELECT * FROM gaps")[:20], w.output()[-3000:])
    assert_exactly_once(db, fleet.last_seqs())
    if fleet.resent():  # what was lost came back through resend, and the worker said it asked
        assert "asked devices to resend lost results" in w.output()
    assert w.proc.poll() is None
    assert not fleet.errors, fleet.errors
    fleet.stop()


def test_real_daemon_publishing_through_a_broker_restart_loses_nothing(ingest_broker, db, workers, daemon_factory,
                                                                       tmp_path):
    """A real `edged run` keeps publishing through a broker restart; what mosquitto drops before
    the worker's subscription is back comes again from the daemon's outbox (its kept rows), asked
    for by the worker: in the end its seqs are 1..last, once each."""
    cfg = tmp_path / "ingest.toml"
    cfg.write_text(RESEND_FAST + "[mqtt]\nreconnect_min_s = 2\n")
    w = workers(ingest_broker, db, "solo", "--config", str(cfg)).start()
    dev = tmp_path / "dev"
    dev.mkdir()
    d = daemon_factory(write_config(dev / "edged.toml", ingest_broker, device_id="pi-r",
                                    extra="[camera]\nfps = 5\n[imu]\nspeed = 10\n[stats]\ninterval_s = 1\n")).start()
    assert wait_until(lambda: count(db) >= 20, 90), d.output()[-2000:]
    mark = w.output().count("msg=subscribed")
    ingest_broker.stop()
    ingest_broker.start()
    assert wait_until(lambda: w.output().count("msg=subscribed") > mark, 60), w.output()[-2000:]
    after = count(db)
    # Published through and after the restart, and the gaps closed while the daemon still runs.
    assert wait_until(lambda: count(db) >= after + 30 and not q(db, "SELECT * FROM gaps"), 120), (
        q(db, "SELECT * FROM gaps"), w.output()[-2000:])
    assert d.stop() == 0
    last = {"pi-r": last_seq(dev / "state")}
    assert wait_until(lambda: count(db) >= last["pi-r"], 60)
    assert_exactly_once(db, last)
    resent = q(db, "SELECT (stats ->> 'resent')::int FROM devices")[0][0]
    if resent:
        assert "asked devices to resend lost results" in w.output()
    assert "Traceback" not in d.output()


def any_db(url: str, sql: str, *params):
    """A query on either store: PostgreSQL, or the SQLite file of a sqlite:/// URL."""
    if not url.startswith("sqlite:///"):
        return q(url, sql, *params)
    import sqlite3

    conn = sqlite3.connect(url[len("sqlite:///"):], isolation_level=None, timeout=30)
    try:
        return [tuple(r) for r in conn.execute(sql.replace("%s", "?"), params).fetchall()]
    finally:
        conn.close()


@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
def test_results_the_database_lacks_are_asked_for_and_come_back_unchanged(ingest_broker, db, workers, tmp_path,
                                                                          kind):
    """Rows taken out of `results` stand for results lost after the broker acknowledged them:
    the worker asks their devices, the devices send them again with the same seq and payload,
    and they are stored once. A range a device no longer keeps is answered `gone`, recorded, and
    not asked for again; `edged ingest --resend` asks at once, and leaves out what is gone."""
    if kind == "sqlite":
        db = f"sqlite:///{tmp_path / 'results.db'}"
    q = any_db  # noqa: F811 — this test's queries go to the store under test
    count = lambda url: q(url, "SELECT count(*) FROM results")[0][0]  # noqa: E731
    cfg = tmp_path / "ingest.toml"
    cfg.write_text(RESEND_FAST)
    w = workers(ingest_broker, db, "solo", "--config", str(cfg)).start()
    # Each device keeps its newest 60 acknowledged results.
    fleet = Fleet(ingest_broker.host, ingest_broker.port, 3, motion_hz=50, detection_every_s=0,
                  per_device=100, stats_every_s=0, keep=60).start()
    assert wait_until(fleet.done, 60)
    assert wait_until(lambda: count(db) == 300, 60)
    lost = ("sim-0001", 80, 84)
    aged = ("sim-0002", 10, 14)
    before = q(db, "SELECT seq, payload FROM results WHERE device_id = %s AND seq BETWEEN %s AND %s ORDER BY seq",
               *lost)
    for d, a, b in (lost, aged):
        q(db, "DELETE FROM results WHERE device_id = %s AND seq BETWEEN %s AND %s RETURNING seq", d, a, b)
    assert sorted(q(db, "SELECT device_id, first_missing, last_missing FROM gaps")) == [
        ("sim-0001", 80, 84), ("sim-0002", 10, 14)]
    assert wait_until(lambda: count(db) == 295 and q(db, "SELECT resend_gone FROM gaps") == [(5,)], 60), (
        q(db, "SELECT * FROM gaps"), w.output()[-2000:])
    after = q(db, "SELECT seq, payload FROM results WHERE device_id = %s AND seq BETWEEN %s AND %s ORDER BY seq",
              *lost)
    assert after == before
    assert q(db, "SELECT device_id, first_missing, last_missing, missing, resend_asked, resend_gone FROM gaps") == [
        ("sim-0002", 10, 14, 5, 1, 5)]
    assert q(db, "SELECT device_id, first_seq, last_seq FROM resend_gone") == [("sim-0002", 10, 14)]
    assert q(db, "SELECT duplicates FROM devices WHERE device_id = 'sim-0001'") == [(0,)]
    assert fleet.resent() == 5
    # The operator's command, beside a worker that does not ask by itself (so the asking is the
    # command's): nothing left that a device still has; then a gap of a device that still has it.
    w.stop()
    quiet = tmp_path / "quiet.toml"
    quiet.write_text("[ingest]\nresend = false\n")
    w = workers(ingest_broker, db, "solo", "--config", str(quiet)).start()
    run = subprocess.run(ingest_cmd("--db", db, "--host", ingest_broker.host, "--port", str(ingest_broker.port),
                                    "--resend"), capture_output=True, text=True, cwd=REPO, timeout=60)
    assert run.returncode == 0 and run.stdout == "" and "0 resend request(s)" in run.stderr, run
    q(db, "DELETE FROM results WHERE device_id = 'sim-0000' AND seq IN (97, 98) RETURNING seq")
    run = subprocess.run(ingest_cmd("--db", db, "--host", ingest_broker.host, "--port", str(ingest_broker.port),
                                    "--resend", "--device", "sim-0000"),
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert run.returncode == 0 and run.stdout == "sim-0000: asked for 2 results (97-98)\n", run
    assert wait_until(lambda: count(db) == 295, 30)
    assert q(db, "SELECT device_id FROM gaps") == [("sim-0002",)]
    assert w.proc.poll() is None and not fleet.errors
    fleet.stop()


def test_malformed_payloads_are_rejected_stored_and_the_worker_keeps_going(ingest_broker, db, workers):
    import cbor2

    from edged.delivery import codec
    from edged.records import MotionSignature

    w = workers(ingest_broker, db, "solo").start()
    good = MotionSignature(ts=time.time(), label="walking", score=0.9, signature=(1, 2, 3),
                           window_s=3.0, inference_ms=0.3)
    cbor = codec.get("cbor").motion(good, "pi-m", 2)
    bad = [
        ("edged/pi-m/detections", bytes(range(255, -1, -1)) * 4, "undecodable"),  # binary junk
        ("edged/pi-m/motion", b'{"v":1,"device_id":"pi-m","seq":1}', "invalid"),
        ("edged/pi-m/motion", cbor[: len(cbor) // 2], "undecodable"),
        ("edged/pi-m/motion", b"{" + b" " * (1 << 20) + b"}", "too_large"),
        ("edged/pi-m/motion", codec.JSON.motion(good, "pi-other", 3), "wrong_device"),
        ("edged/pi-m/motion", cbor2.dumps([1, 2, 3]), "invalid"),
        ("edged/pi-m/status", b"maybe", "invalid"),
        ("edged/pi-m/stats", b"not json", "undecodable"),
        ("edged/pi-m/stats", b'{"ts": 1764012345, "note": "\\u0000"}', "invalid"),  # jsonb has no NUL
    ]
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect(ingest_broker.host, ingest_broker.port)
    c.loop_start()
    for topic, payload, _ in bad:
        c.publish(topic, payload, qos=1).wait_for_publish(10)
    c.publish("edged/pi-m/motion", cbor, qos=1).wait_for_publish(10)
    assert wait_until(lambda: q(db, "SELECT count(*) FROM rejected")[0][0] == len(bad) and count(db) == 1, 30)
    rows = q(db, "SELECT topic, kind, size, length(payload), reason FROM rejected ORDER BY id")
    assert [(t, k) for t, k, *_ in rows] == [(t, k) for t, _, k in bad]
    big = rows[3]
    assert big[2] == (1 << 20) + 2 and big[3] == 65536  # the size as sent, the bytes kept bounded
    assert all(r[4] for r in rows)
    assert q(db, "SELECT seq FROM results WHERE device_id = 'pi-m'") == [(2,)]
    assert q(db, "SELECT rejected FROM devices WHERE device_id = 'pi-m'") == [(len(bad),)]
    # Logged once per kind, not once per payload.
    logged = [line for line in w.output().splitlines() if "rejected a payload" in line]
    assert len(logged) == len({k for _, _, k in bad})
    assert w.proc.poll() is None
    c.loop_stop()
    c.disconnect()


def test_one_machine_on_sqlite_same_worker_same_guarantees(ingest_broker, workers, tmp_path):
    """`--db sqlite:///FILE`: the same worker with no database server; the schema is made on first
    open, every result lands once, rejects are kept, the views answer."""
    import sqlite3

    path = tmp_path / "results.db"
    url = f"sqlite:///{path}"
    mig = subprocess.run(ingest_cmd("--db", url, "--migrate"), capture_output=True, text=True, cwd=REPO, timeout=60)
    assert mig.returncode == 0 and "applied 0001_schema, 0002_events, 0003_samples, 0004_resend, 0005_event_posture" in mig.stdout, mig.stderr
    again = subprocess.run(ingest_cmd("--db", url, "--migrate"), capture_output=True, text=True, cwd=REPO, timeout=60)
    assert again.returncode == 0 and "applied" not in again.stdout
    w = workers(ingest_broker, url, "solo").start()
    fleet = Fleet(ingest_broker.host, ingest_broker.port, 8, motion_hz=40, detection_every_s=0.1,
                  per_device=40, stats_every_s=0.2).start()
    fleet.restart(2)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect(ingest_broker.host, ingest_broker.port)
    c.loop_start()
    c.publish("edged/sim-0001/motion", b"\xff\x00junk", qos=1).wait_for_publish(10)
    assert wait_until(fleet.done, 60)
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    total = fleet.made()
    rows = lambda sql: db.execute(sql).fetchall()  # noqa: E731
    assert wait_until(lambda: rows("SELECT count(*) FROM results")[0][0] >= total and
                      rows("SELECT count(*) FROM rejected")[0][0] == 1, 60)
    got = {d: (n, lo, hi) for d, n, lo, hi in rows("SELECT device_id, count(*), min(seq), max(seq) FROM results GROUP BY 1")}
    assert got == {d: (last, 1, last) for d, last in fleet.last_seqs().items()}
    assert rows("SELECT * FROM gaps") == []
    assert rows("SELECT kind, device_id FROM rejected") == [("undecodable", "sim-0001")]
    assert rows("SELECT count(*) FROM motion")[0][0] + rows("SELECT count(*) FROM detections")[0][0] == total
    assert wait_until(lambda: rows("SELECT count(*) FROM devices WHERE status = 'online' AND dropped = 0")[0][0] == 8, 30)
    db.close()
    c.loop_stop()
    c.disconnect()
    fleet.stop()
    assert w.stop() == 0


def test_fleet_sim_command_feeds_a_worker(ingest_broker, db, workers):
    workers(ingest_broker, db, "solo").start()
    r = subprocess.run([sys.executable, "-m", "edged", "fleet-sim", "--port", str(ingest_broker.port),
                        "-n", "5", "--seconds", "2", "--motion-hz", "10", "--detection-every", "0.5",
                        "--restart-every", "0.5", "--drop-every", "0.7"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    made = int(line.split(" made ")[1].split()[0])
    assert made > 20 and "all acknowledged" in line and "restarts" in line
    assert wait_stored(db, made) == made
    rows = q(db, "SELECT device_id, count(*), min(seq), max(seq) FROM results GROUP BY 1")
    assert sum(n for _, n, _, _ in rows) == made and all(lo == 1 and hi == n for _, n, lo, hi in rows)


def test_a_dropped_simulated_device_reconnects_without_waiting_to_write(ingest_broker):
    """A drop is noticed at once, not when the device next writes: a device with nothing more to
    send comes back well within its keepalive. (A drop at the very end of `edged fleet-sim`, with
    results in flight, once left them unacknowledged past the 30-s drain.)"""
    from edged.cloud.fleet import Fleet

    onlines = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = lambda c, u, m: onlines.append(m.payload) if m.payload == b"online" else None
    sub.connect(ingest_broker.host, ingest_broker.port)
    sub.subscribe("edged/dropped-0000/status", qos=1)
    sub.loop_start()
    fleet = Fleet(ingest_broker.host, ingest_broker.port, 1, id_prefix="dropped", motion_hz=0, detection_every_s=0,
                  stats_every_s=0, keepalive_s=120).start()
    try:
        assert wait_until(lambda: len(onlines) >= 1, 30)
        fleet.drop(0)
        # Each connect publishes `online`: the second is the reconnect, with nothing written between.
        assert wait_until(lambda: len(onlines) >= 2, 60), onlines
        assert fleet.devices[0].connected
    finally:
        fleet.stop()
        sub.loop_stop()
        sub.disconnect()


def test_track_events_land_and_a_row_the_database_refuses_is_rejected_alone(ingest_broker, db, workers):
    """Events are results like the others (their own view); and a row the database refuses —
    here through a constraint added for the test — goes to `rejected` by itself while the rest of
    its batch is stored and the worker goes on."""
    from edged.delivery import codec
    from edged.records import TrackEvent

    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("ALTER TABLE results ADD CONSTRAINT test_no_seq_7 CHECK (seq <> 7)")
    w = workers(ingest_broker, db, "solo", "--batch-delay", "0.5").start()
    now = time.time()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect(ingest_broker.host, ingest_broker.port)
    c.loop_start()
    for seq in range(5, 10):
        e = TrackEvent(ts=now, type="new" if seq == 5 else "update", track_id=1, label="person", score=0.9,
                       box=(0.1, 0.1, 0.5, 0.9), first_ts=now - 1, dwell_s=1.0, inside=("face",),
                       stage="people", posture="fallen" if seq == 9 else "")
        if seq == 8:  # a face inside the person: its stage and its parent track
            e = TrackEvent(ts=now, type="new", track_id=2, label="face", score=0.8, box=(0.2, 0.1, 0.3, 0.2),
                           first_ts=now, dwell_s=0.0, stage="faces_in_people", parent=1)
        cdc = codec.JSON if seq % 2 else codec.get("cbor")
        c.publish("edged/pi-e/events", cdc.events(e, "pi-e", seq), qos=1).wait_for_publish(10)
    assert wait_until(lambda: count(db) == 4 and q(db, "SELECT count(*) FROM rejected")[0][0] == 1, 30), w.output()[-2000:]
    assert [r[0] for r in q(db, "SELECT seq FROM events ORDER BY seq")] == [5, 6, 8, 9]
    assert q(db, "SELECT type, label, inside FROM events WHERE seq = 5") == [("new", "person", ["face"])]
    # Schema version 5: the stage, the enclosing track and the posture, NULL where a payload has none.
    assert q(db, "SELECT seq, stage, parent, posture FROM events ORDER BY seq") == [
        (5, "people", None, None), (6, "people", None, None), (8, "faces_in_people", 1, None),
        (9, "people", None, "fallen")]
    kind, reason = q(db, "SELECT kind, reason FROM rejected")[0]
    assert kind == "refused" and "test_no_seq_7" in reason
    assert w.proc.poll() is None
    c.loop_stop()
    c.disconnect()


def test_retention_drops_old_partitions_only(db):
    day = 86400.0
    now = time.time()
    results = [payloads.Result("pi-r", i + 1, "motion", now - age * day, {"seq": i + 1})
               for i, age in enumerate((40, 31.5, 5, 0))]
    with psycopg.connect(db, autocommit=True) as conn:
        known = store.existing_partitions(conn)
        out = store.write(conn, results, [], {}, known)
        assert out.stored == 4
        dropped = store.retention_pass(conn, 30, now, known)
        assert len(dropped) == 2
        assert [r[0] for r in conn.execute("SELECT seq FROM results ORDER BY seq")] == [3, 4]
        assert store.retention_pass(conn, 0, now, known) == []  # 0 keeps everything


# -- enrolling a new motion from what a device sent -----------------------------------------------

def test_enroll_a_motion_from_a_devices_stored_windows(db, tmp_path):
    """The operator's loop: people climb stairs in front of one device, its windows land in the
    database, `edged signatures enroll --db` turns the stored windows of that time range into a new
    motion, and the device labels someone else's stairs with it."""
    import numpy as np

    from edged.centroids import classify, load_centroids
    from edged.delivery import codec
    from edged.models import load_manifest, open_model
    from edged.records import ImuBatch
    from edged.stages.motion import MotionStage
    from test_motion_signatures import bouts

    entry = load_manifest()["motion"]
    model = open_model(entry, threads=1)
    t0 = float(int(time.time()) - 3600)
    results, seq, later = [], 0, []
    for s, a, t, x in bouts():
        if a not in ("walking_upstairs", "sitting") or not 16 <= s <= 20:
            continue
        out = MotionStage(model, entry).push(ImuBatch(t, x.astype(np.float32)))
        # One window of each person's climb in the first five minutes; their sitting afterwards.
        at = t0 + 60 * (s - 16) if a == "walking_upstairs" else t0 + 600 + 60 * (s - 16)
        for k, m in enumerate(out[2:3] if a == "walking_upstairs" else out[:3]):
            seq += 1
            m = type(m)(ts=at + k, label=m.label, score=m.score, signature=m.signature, window_s=m.window_s,
                        inference_ms=m.inference_ms, signature_v=m.signature_v)
            r = payloads.parse("gym-1", "motion", codec.JSON.motion(m, "gym-1", seq), "application/json",
                               now=time.time(), max_bytes=65536)
            assert isinstance(r, payloads.Result), r
            (results if a == "walking_upstairs" else later).append(r)
    with psycopg.connect(db, autocommit=True) as conn:
        store.write(conn, results + later, [], {}, set())

    out = tmp_path / "centroids.json"
    shipped = str(REPO / "models" / "motion.centroids.json")
    r = edged_cli("signatures", "enroll", "--db", db, "--device", "gym-1", "--since", str(t0),
                  "--until", str(t0 + 300), "--label", "stairs", "-c", shipped, "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "stairs enrolled from 5 signatures" in r.stderr
    cents = load_centroids(out)
    assert cents.labels[-1] == "stairs" and cents.signature_version == entry.params["signature_version"]

    # Someone else on the stairs, through the device's stage: labelled with the new motion.
    s, a, t, x = next(b for b in bouts() if b[0] == 27 and b[1] == "walking_upstairs")
    sig = [m.signature for m in MotionStage(model, entry).push(ImuBatch(t, x.astype(np.float32)))]
    assert np.mean([m.label == "stairs" for m in classify(cents, sig)]) >= 0.8

    # A time range with nothing in it, or no --device: one line, exit 2.
    r = edged_cli("signatures", "enroll", "--db", db, "--device", "gym-1", "--since", str(t0 + 5000),
                  "--label", "stairs", "-c", shipped, "-o", str(out))
    assert r.returncode == 2 and "no motion windows" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = edged_cli("signatures", "enroll", "--db", db, "--label", "stairs", "-c", shipped)
    assert r.returncode == 2 and "--device and --label are needed" in r.stderr
    r = edged_cli("signatures", "enroll", "--db", f"sqlite:///{tmp_path}/r.db", "--device", "gym-1",
                  "--label", "stairs", "-c", shipped)
    assert r.returncode == 2 and "no such file" in r.stderr and f"sqlite:///{tmp_path}" in r.stderr
    r = edged_cli("signatures", "enroll", "--db", "mysql://u:secret@h/x", "--device", "gym-1",
                  "--label", "stairs", "-c", shipped)
    assert r.returncode == 2 and "expected a PostgreSQL URL" in r.stderr and "secret" not in r.stderr


def edged_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edged", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


# -- samples ([sampling] on a device) -------------------------------------------------------------

def test_a_devices_samples_are_stored_labelled_and_decode_to_its_window(ingest_broker, db, workers,
                                                                        daemon_factory, tmp_path):
    """A real daemon samples the windows it calls `unknown` (stair climbing, which the shipped
    centroids do not know); the worker stores them; one is labelled; what training reads back is
    exactly the recording's samples. Malformed and forged samples are rejected, a redelivery is
    not stored twice."""
    import dataclasses

    import numpy as np
    from test_sampling import sampling_config, stairs_csv

    from edged.cloud import samples as cloud_samples
    from edged.delivery import codec
    from edged.records import Sample
    from edged.sources.imu.imucsv import read_imu_csv

    w = workers(ingest_broker, db, "solo").start()
    csv = stairs_csv(tmp_path / "stairs.csv")
    rec = read_imu_csv(csv)
    cfg = sampling_config(tmp_path, ingest_broker, csv, "min_interval_s = 0\nper_hour = 2\n")
    d = daemon_factory(cfg).start()
    stored = lambda: q(db, "SELECT count(*) FROM samples")[0][0]  # noqa: E731
    assert wait_until(lambda: stored() >= 2, 60), d.output() + w.output()
    assert d.stop() == 0
    rows = q(db, "SELECT device_id, sample_id, kind, trigger, model, device_label, bytes, label, "
                 "meta ->> 'n' FROM samples ORDER BY sample_id")
    assert [r[:6] for r in rows] == [("test-dev", r[1], "imu", "unknown", "motion", "unknown") for r in rows]
    assert all(r[6] == int(r[8]) * 28 and r[7] is None for r in rows)

    # Untrusted: each of these is rejected with its reason; the worker carries on.
    t = np.arange(100) / 50.0
    x = np.zeros((100, 6), np.float32)
    win = np.column_stack([t, x]).astype("<f4")
    good = Sample(ts=time.time(), kind="imu", trigger="unknown", model="motion", label="unknown", score=0.0,
                  data=win.tobytes(), t0=time.time() - 2, n=100, signature=(1, 2, 3), signature_v=2)
    body = json.loads(codec.JSON.sample(good, "pi-s", 5))
    nan = win.copy()
    nan[3, 2] = np.nan
    crop = Sample(ts=time.time(), kind="crop", trigger="uncertain", model="face", label="face", score=0.5,
                  data=b"not a jpeg", box=(0.1, 0.1, 0.2, 0.2), region=(0, 0, 0.3, 0.3), width=10, height=10)
    bad = [
        (json.dumps({**body, "data": "**not base64**"}).encode(), "invalid"),
        (json.dumps({**body, "n": 99}).encode(), "invalid"),
        (json.dumps({**body, "trigger": "uncertain"}).encode(), "invalid"),
        (codec.JSON.sample(dataclasses.replace(good, data=nan.tobytes()), "pi-s", 5), "invalid"),
        (codec.get("cbor").sample(crop, "pi-s", 6), "invalid"),
        (json.dumps({**body, "device_id": "pi-other"}).encode(), "wrong_device"),
        (json.dumps({**body, "box": [0, 0, 1, 1]}).encode(), "invalid"),
        (b"\xa1" * 10, "undecodable"),
    ]
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect(ingest_broker.host, ingest_broker.port)
    c.loop_start()
    for payload, _ in bad:
        c.publish("edged/pi-s/sample", payload, qos=1).wait_for_publish(10)
    for _ in range(2):  # a redelivery: stored once
        c.publish("edged/pi-s/sample", codec.get("cbor").sample(good, "pi-s", 5), qos=1).wait_for_publish(10)
    assert wait_until(lambda: q(db, "SELECT count(*) FROM rejected")[0][0] == len(bad) and stored() == 3, 30), \
        w.output()
    assert [k for (k,) in q(db, "SELECT kind FROM rejected ORDER BY id")] == [k for _, k in bad]
    reasons = [r for (r,) in q(db, "SELECT reason FROM rejected ORDER BY id")]
    assert "sample: data: not base64" in reasons[0] and "expected 99 rows" in reasons[1]
    assert "not a finite number" in reasons[3] and "not a JPEG" in reasons[4]
    c.loop_stop()
    c.disconnect()
    assert w.proc.poll() is None

    # Labelling (the command line), then what training reads: the recording's own samples.
    device, sid = rows[0][:2]
    listed = edged_cli("samples", "list", "--db", db, "--unlabelled")
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == 3, listed.stderr
    assert edged_cli("samples", "label", "--db", db, device, str(sid), "stairs").returncode == 0
    refused = edged_cli("samples", "label", "--db", db, device, "12345", "stairs")
    assert refused.returncode == 2 and "no sample 12345 of device 'test-dev'" in refused.stderr
    assert "label: expected" in edged_cli("samples", "label", "--db", db, device, str(sid), "Stairs!").stderr
    got = cloud_samples.labelled_windows(db)
    assert [(g.device_id, g.sample_id, g.label, g.sig_v) for g in got] == [(device, sid, "stairs", 2)]
    k = int(np.flatnonzero((rec.data == got[0].data[0]).all(axis=1))[0])
    assert np.array_equal(got[0].data, rec.data[k:k + len(got[0].data)])
    assert np.allclose(np.diff(got[0].t), np.diff(rec.t[k:k + len(got[0].t)]), atol=2e-6)
    out = tmp_path / "export"
    assert edged_cli("samples", "export", "--db", db, "-o", str(out), "--all").returncode == 0
    exported = read_imu_csv(out / f"{device}-{sid}.csv")
    assert np.allclose(exported.data, got[0].data, atol=1e-6)
    # The motion trainer reads the same (without TensorFlow: only its sample loader).
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import train_motion
    except ImportError as exc:  # its dataset modules need the training extra
        pytest.fail(f"scripts/train_motion.py cannot be imported: {exc}")
    recs = train_motion.sample_recordings([db])
    assert len(recs) == 1 and recs[0].dataset == train_motion.SAMPLES_DATASET
    assert np.array_equal(recs[0].x, got[0].data.astype(np.float64))


def test_the_sqlite_events_view_shows_stage_parent_and_posture(tmp_path):
    """Schema version 5 on SQLite, as on PostgreSQL: a person's posture and a face's parent track
    are columns of `events`; a payload without them reads NULL."""
    import sqlite3

    from edged.cloud.sqlite_store import SqliteStore
    from edged.delivery import codec
    from edged.records import TrackEvent

    now = time.time()
    events = [TrackEvent(ts=now, type="update", track_id=4, label="person", score=0.9, box=(0.1, 0.1, 0.5, 0.9),
                         first_ts=now - 5, dwell_s=5.0, stage="people", posture="fallen"),
              TrackEvent(ts=now, type="new", track_id=5, label="face", score=0.8, box=(0.2, 0.1, 0.3, 0.2),
                         first_ts=now, dwell_s=0.0, stage="faces_in_people", parent=4),
              TrackEvent(ts=now, type="end", track_id=6, label="person", score=0.7, box=(0.6, 0.1, 0.9, 0.9),
                         first_ts=now - 9, dwell_s=9.0)]
    results = []
    for seq, e in enumerate(events, 1):
        got = payloads.parse("pi-f", "events", codec.get("cbor").events(e, "pi-f", seq), "application/cbor",
                             now=now, max_bytes=65536)
        assert isinstance(got, payloads.Result), got
        results.append(got)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    st = SqliteStore(url)
    st.open()
    st.write(results, [], {}, {})
    st.close()
    conn = sqlite3.connect(tmp_path / "r.db")
    assert conn.execute("SELECT seq, track_id, stage, parent, posture FROM events ORDER BY seq").fetchall() == [
        (1, 4, "people", None, "fallen"), (2, 5, "faces_in_people", 4, None), (3, 6, None, None, None)]
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 5


def test_samples_on_the_sqlite_store(tmp_path):
    """The one-machine store keeps samples the same way (real SQLite; no broker needed)."""
    import numpy as np

    from edged.cloud import samples as cloud_samples
    from edged.cloud.sqlite_store import SqliteStore
    from edged.delivery import codec
    from edged.records import Sample

    url = f"sqlite:///{tmp_path / 'r.db'}"
    st = SqliteStore(url)
    st.open()
    t0 = time.time() - 3
    rows = np.column_stack([np.arange(60) / 20.0, np.random.default_rng(1).normal(size=(60, 6))]).astype("<f4")
    s = Sample(ts=t0 + 3, kind="imu", trigger="unknown", model="motion", label="unknown", score=0.0,
               data=rows.tobytes(), t0=t0, n=60, signature=(5, -5), signature_v=2)
    recs = [payloads.parse_sample("pi-q", c.sample(s, "pi-q", 9), c.content_type, now=time.time(), max_bytes=1 << 20)
            for c in (codec.JSON, codec.get("cbor"))]
    assert all(isinstance(r, payloads.SampleRecord) for r in recs), recs
    assert recs[0] == recs[1]  # both codecs, one record
    assert st.write_samples(recs) == 1 and st.write_samples(recs[:1]) == 0
    st.close()
    cloud_samples.set_label(url, "pi-q", 9, "shaking")
    (got,) = cloud_samples.labelled_windows(url)
    assert np.array_equal(got.data, rows[:, 1:]) and np.allclose(got.t, t0 + rows[:, 0].astype(np.float64))


# -- what devices run (edged release status --db) --------------------------------------------------

def test_release_status_reads_what_devices_run_from_the_database(ingest_broker, db, workers, daemon_factory,
                                                                  tmp_path):
    """A real daemon installs centroids released alone from a real HTTP server, says so in its
    stats, a real worker stores them as devices.models, and `edged release status --db` prints it."""
    from test_updates import Server

    repo = tmp_path / "repo"
    for args in (("init", str(repo)),
                 ("artefact", str(repo), str(REPO / "models" / "motion.centroids.json"), "--kind", "centroids",
                  "--version", "1"),
                 ("rollout", str(repo), "--name", "motion", "--kind", "centroids", "--version", "1",
                  "--percent", "100")):
        r = edged_cli("release", *args)
        assert r.returncode == 0, r.stderr
    srv = Server(repo / "public")
    try:
        workers(ingest_broker, db, "w1").start()
        cfg = write_config(tmp_path / "edged.toml", ingest_broker, device_id="pi-9", extra=(
            "[camera]\nenabled = false\n[imu]\nspeed = 10\n[stats]\ninterval_s = 1\n"
            f'[updates]\nurl = "{srv.url}"\nroot_json = "{repo / "root.json"}"\npoll_interval_s = 3600\n'))
        d = daemon_factory(cfg).start()

        def models():
            rows = q(db, "SELECT models FROM devices WHERE device_id = 'pi-9'")
            return rows[0][0] if rows else None
        assert wait_until(lambda: (models() or {}).get("motion", {}).get("artefacts") == {"centroids": 1}, 60), \
            (models(), d.output()[-2000:])
        assert models()["motion"]["running"] is None
        r = edged_cli("release", "status", str(repo), "--db", db)
        assert r.returncode == 0, r.stderr
        assert "device pi-9: motion running shipped; centroids 1 (online)" in r.stdout, r.stdout
        status = json.loads(edged_cli("release", "status", str(repo), "--db", db, "--json").stdout)
        assert status["devices"]["pi-9"]["models"]["motion"] == {"running": None, "trial": False,
                                                                  "artefacts": {"centroids": 1}}
        assert d.stop() == 0
    finally:
        srv.close()
    r = edged_cli("release", "status", str(repo), "--db", "postgresql://127.0.0.1:1/none")
    assert r.returncode == 2 and r.stderr.startswith("edged: postgresql://127.0.0.1:1/none: ")
    assert len(r.stderr.strip().splitlines()) == 1


# -- building and classifying centroids from what the devices sent ---------------------------------

def test_signatures_build_and_classify_read_stored_windows_from_postgres_and_sqlite(db, tmp_path):
    """`edged signatures build/classify --db` read the motion windows a database holds, with the
    label each device gave them, in PostgreSQL and in SQLite alike, and agree with the same
    windows read from a JSON-lines file."""
    import numpy as np

    from conftest import SAMPLES
    from edged.centroids import load_centroids
    from edged.cloud.sqlite_store import SqliteStore

    r = edged_cli("motion", str(SAMPLES / "imu" / "basicmotions_demo.csv"))
    assert r.returncode == 0, r.stderr
    windows = [json.loads(x) for x in r.stdout.splitlines()]
    for w in windows[::10]:
        w["label"] = "unknown"  # as a device with centroids labels what is far from all of them
    t0 = float(int(time.time()) - 3600)
    results = []
    for device, offset in (("gym-1", 0.0), ("gym-2", 600.0)):
        for seq, w in enumerate(windows, start=1):
            body = {"v": 1, "device_id": device, "seq": seq, "ts": t0 + offset + w["t"], "label": w["label"],
                    "score": w["score"], "signature": w["signature"], "window_s": 2.56, "inference_ms": 1.0,
                    "sig_v": w["sig_v"]}
            got = payloads.parse(device, "motion", json.dumps(body).encode(), "application/json",
                                 now=time.time(), max_bytes=65536)
            assert isinstance(got, payloads.Result), got
            results.append(got)
    with psycopg.connect(db, autocommit=True) as conn:
        store.write(conn, results, [], {}, set())
    lite = f"sqlite:///{tmp_path}/results.db"
    s = SqliteStore(lite)
    s.open()
    s.write(results, [], {}, {})
    s.close()

    # The file an operator would have exported: gym-1's windows its device labelled.
    jsonl = tmp_path / "gym-1.jsonl"
    jsonl.write_text("".join(json.dumps(w) + "\n" for w in windows if w["label"] != "unknown"))
    assert edged_cli("signatures", "build", str(jsonl), "-o", str(tmp_path / "file.json")).returncode == 0
    want = load_centroids(tmp_path / "file.json")
    for name, url in (("pg", db), ("sqlite", lite)):
        out = tmp_path / f"{name}.json"
        b = edged_cli("signatures", "build", "--db", url, "--device", "gym-1", "-o", str(out))
        assert b.returncode == 0, b.stderr
        got = load_centroids(out)
        assert got.labels == want.labels and got.signature_version == want.signature_version == windows[0]["sig_v"]
        np.testing.assert_allclose(got.centroids, want.centroids)
        np.testing.assert_allclose(got.thresholds, want.thresholds)
        # Every device: twice the windows; then a time range that holds only gym-2's.
        both = edged_cli("signatures", "build", "--db", url, "-o", str(tmp_path / f"{name}-all.json"))
        assert both.returncode == 0, both.stderr
        assert list(load_centroids(tmp_path / f"{name}-all.json").counts) == [2 * n for n in want.counts]

        c = edged_cli("signatures", "classify", "--db", url, "-c", str(out), "--since", str(t0 + 600))
        assert c.returncode == 0, c.stderr
        rows = [json.loads(x) for x in c.stdout.splitlines()]
        assert [x["device_id"] for x in rows] == ["gym-2"] * len(windows)
        assert [x["seq"] for x in rows] == list(range(1, len(windows) + 1))
        assert [x["device_label"] for x in rows] == [w["label"] for w in windows]
        (tmp_path / "all.jsonl").write_text("".join(json.dumps(w) + "\n" for w in windows))
        f = edged_cli("signatures", "classify", "-c", str(out), str(tmp_path / "all.jsonl"))
        assert [(x["label"], x["nearest"], x["distance"]) for x in rows] == \
            [(y["label"], y["nearest"], y["distance"]) for y in map(json.loads, f.stdout.splitlines())]

    # What cannot be read is one line and exit 2; a missing SQLite file is not created.
    for args, words in ((["--db", f"sqlite:///{tmp_path}/none.db"], "no such file"),
                        (["--db", "mysql://x/y"], "expected a PostgreSQL URL"),
                        (["--db", db, "--device", "gym-9"], "no labelled motion windows"),
                        (["--db", db, str(jsonl)], "one of them")):
        r = edged_cli("signatures", "build", *args, "-o", str(tmp_path / "x.json"))
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "none.db").exists()


def test_workers_claiming_the_same_gaps_at_once_ask_once_then_back_off(db, tmp_path):
    """Which worker asks is settled by one upsert per pass: of two claiming the same gaps at the
    same moment, exactly one gets them; a gap is asked again only after its back-off and while
    attempts remain; `force` (the operator's --resend) asks regardless. On SQLite as well."""
    import threading

    from edged.cloud.sqlite_store import SqliteStore

    pg = [store.PostgresStore(db) for _ in range(2)]
    for s in pg:
        s.open()
    try:
        for round_ in range(8):
            pieces = [(f"d{round_}", 5, 9), (f"d{round_}", 20, 20), ("other", round_ * 10 + 1, round_ * 10 + 3)]
            barrier = threading.Barrier(2)
            got: list = []

            def claim(s):
                barrier.wait()
                got.append(s.claim_resends(pieces, base_s=60, cap_s=3600, attempts=3, force=False))

            threads = [threading.Thread(target=claim, args=(s,)) for s in pg]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert sorted(len(g) for g in got) == [0, 3], got
        assert pg[0].claim_resends(pieces, base_s=60, cap_s=3600, attempts=3, force=False) == []  # backed off
        assert [r[3] for r in pg[1].claim_resends(pieces, base_s=60, cap_s=3600, attempts=3, force=True)] == [2, 2, 2]
        wait = q(db, "SELECT extract(epoch FROM next_ask - last_asked) FROM resend_asks WHERE device_id = 'd7' "
                     "AND first_seq = 5")[0][0]
        assert 119 <= wait <= 121  # doubled from resend_after_s
        q(db, "UPDATE resend_asks SET next_ask = now() - interval '1 second' RETURNING 1")
        assert len(pg[0].claim_resends(pieces, base_s=60, cap_s=3600, attempts=3, force=False)) == 3  # third ask
        q(db, "UPDATE resend_asks SET next_ask = now() - interval '1 second' RETURNING 1")
        assert pg[0].claim_resends(pieces, base_s=60, cap_s=3600, attempts=3, force=False) == []  # attempts used up
    finally:
        for s in pg:
            s.close()

    lite = SqliteStore(f"sqlite:///{tmp_path / 'r.db'}")
    lite.open()
    try:
        pieces = [("d", 5, 9), ("d", 20, 20)]
        assert [r[3] for r in lite.claim_resends(pieces, base_s=60, cap_s=3600, attempts=3, force=False)] == [1, 1]
        assert lite.claim_resends(pieces, base_s=60, cap_s=3600, attempts=3, force=False) == []
        assert [r[3] for r in lite.claim_resends(pieces, base_s=60, cap_s=3600, attempts=3, force=True)] == [2, 2]
        lite.resend_answered([store.ResendAnswer("d", gone=[(5, 7), (8, 9)], later=[(20, 20)])])
        assert lite.gone_ranges(["d", "x"]) == {"d": [(5, 9)]}
        assert store.subtract_ranges(1, 30, [(5, 9), (20, 20)]) == [(1, 4), (10, 19), (21, 30)]
        # `later` gives the attempt back and makes the gap due at once
        assert [r[3] for r in lite.claim_resends([("d", 20, 20)], base_s=60, cap_s=3600, attempts=3,
                                                 force=False)] == [2]
    finally:
        lite.close()
