"""The command line as a user runs it: help texts, the cloud-side signature tools, the subscriber."""

import json
import subprocess
import sys
import time

from conftest import REPO, SAMPLES, write_config

COMMANDS = ("run", "check-config", "config", "detect", "snapshot", "motion", "models", "subscribe", "signatures", "doctor")


def edged(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "edged", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_help_lists_every_command_and_each_has_help():
    top = edged("--help")
    assert top.returncode == 0
    for cmd in COMMANDS:
        assert cmd in top.stdout
        r = edged(cmd, "--help")
        assert r.returncode == 0 and r.stdout.startswith(f"usage: edged {cmd}"), cmd
    assert edged("--version").stdout.startswith("edged ")


def test_signatures_build_and_classify_round_trip(tmp_path):
    r = edged("motion", str(SAMPLES / "imu" / "basicmotions_demo.csv"))
    assert r.returncode == 0, r.stderr
    sigs = tmp_path / "sigs.jsonl"
    sigs.write_text(r.stdout)
    cents = tmp_path / "c.json"
    b = edged("signatures", "build", str(sigs), "-o", str(cents))
    assert b.returncode == 0, b.stderr
    assert "4 centroids" in b.stderr
    c = edged("signatures", "classify", "-c", str(cents), str(sigs))
    matches = [json.loads(x) for x in c.stdout.splitlines()]
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    truth = [x["label"] for x in lines]
    assert len(matches) == len(truth)
    # Windows that lie within one of the demo's 10 s recordings (the others straddle two
    # activities, and the signature is not the classifier's input: they may fall either way).
    inside = [i for i, x in enumerate(lines) if x["t"] % 10.0 >= 2.85]
    agree = sum(matches[i]["nearest"] == truth[i] for i in inside) / len(inside)
    assert len(inside) >= 50 and agree >= 0.95
    # The shipped centroids, built from TRAIN, classify the demo recording too.
    shipped = edged("signatures", "classify", "-c", str(REPO / "models" / "motion.centroids.json"), str(sigs))
    shipped = [json.loads(x) for x in shipped.stdout.splitlines()]
    assert sum(shipped[i]["nearest"] == truth[i] for i in inside) / len(inside) >= 0.95
    # Windows that straddle two activities in the demo recording are rightly far from every
    # centroid; most are not.
    assert sum(m["label"] == "unknown" for m in shipped) / len(shipped) <= 0.25

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"signature": [1, 2]}\nnot json\n')
    r = edged("signatures", "classify", "-c", str(cents), str(bad))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _subscribe(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edged", "subscribe", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def test_subscribe_reports_results_and_gaps(tmp_path, broker, daemon_factory):
    import sqlite3

    cfg = write_config(tmp_path / "edged.toml", broker, extra="[camera]\nfps = 5\n[imu]\nspeed = 10\n",
                       mqtt='codec = "cbor"\n')
    db = tmp_path / "r.db"
    sub = _subscribe("--port", str(broker.port), "--db", str(db), "--count", "20")
    time.sleep(1.0)
    d = daemon_factory(cfg).start()
    try:
        out, err = sub.communicate(timeout=60)
        lines = [json.loads(x) for x in out.splitlines()]
        assert len(lines) == 20 and all(x["device"] == "test-dev" for x in lines)
        assert any(x["topic"] == "motion" and len(x["signature"]) == 16 for x in lines)
        assert "test-dev: 20 results" in err and "0 missing" in err
        conn = sqlite3.connect(db)
        assert conn.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 20
        # --count N stores exactly N; a second run on the same file prints and counts only its own.
        out, err = _subscribe("--port", str(broker.port), "--db", str(db), "--count", "5").communicate(timeout=60)
    finally:
        d.stop()
    second = sorted(json.loads(x)["seq"] for x in out.splitlines())
    assert len(second) == 5 and not set(second) & {x["seq"] for x in lines}
    assert f"test-dev: 5 results (seq {second[0]}–{second[-1]})" in err, err
    missing = second[-1] - second[0] + 1 - 5
    assert f"{missing} missing" in err, err
    assert conn.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 25
    breaks = sum(b > a + 1 for a, b in zip(second, second[1:]))
    assert conn.execute("SELECT count(*) FROM gaps WHERE first_missing > ? AND last_missing < ?",
                        (second[0], second[-1])).fetchone()[0] == breaks


def test_subscribe_refuses_a_file_or_flag_it_cannot_use(tmp_path, broker):
    """(A bad port and an unreachable broker: tests/test_first_run.py.)"""
    import sqlite3

    for bad in (["--prefix", "a/#"], ["--count", "-1"], ["--client-id", "two words"]):
        r = _subscribe("--db", str(tmp_path / "never.db"), *bad)
        out, err = r.communicate(timeout=60)
        assert r.returncode == 2 and len(err.strip().splitlines()) == 1, (bad, err)
    assert not (tmp_path / "never.db").exists()
    # A file from the subscriber before it ran the ingest worker: named, exit 2, left as it is.
    old = tmp_path / "old.db"
    conn = sqlite3.connect(old)
    conn.execute("CREATE TABLE results (device_id TEXT, seq INTEGER, leaf TEXT, ts REAL, received REAL, body TEXT)")
    conn.commit()
    conn.close()
    r = _subscribe("--port", str(broker.port), "--db", str(old))
    out, err = r.communicate(timeout=60)
    assert r.returncode == 2 and "older `edged subscribe`" in err and "Traceback" not in err, err
    assert sqlite3.connect(old).execute("PRAGMA user_version").fetchone()[0] == 0


def test_detect_uses_the_configs_model_unless_told(tmp_path):
    cfg = tmp_path / "edged.toml"
    cfg.write_text('[vision]\nmodel = "person"\n')
    img = str(SAMPLES / "images" / "astronaut.jpg")
    by_config = json.loads(edged("detect", "--config", str(cfg), img).stdout)
    assert [o["label"] for o in by_config["objects"]] == ["person"]
    by_flag = json.loads(edged("detect", "--config", str(cfg), "--model", "face", img).stdout)
    assert [o["label"] for o in by_flag["objects"]] == ["face"]
    r = edged("detect", "--model", "motion", img)
    assert r.returncode == 2 and "is a motion model, not a vision model" in r.stderr


def test_detect_without_flags_runs_the_default_chain():
    # The default chain finds each of the group's three people and, inside them, their faces.
    img = str(REPO / "tests" / "data" / "vision" / "scenes" / "group_leuven.jpg")
    out = json.loads(edged("detect", img).stdout)
    people = [o for o in out["objects"] if o["label"] == "person"]
    faces = [o for o in out["objects"] if o["label"] == "face"]
    assert len(people) == 3 and len(faces) == 3, out
    assert {o["stage"] for o in people} == {"people"}
    for f in faces:
        if "parent" in f:
            p = out["objects"][f["parent"]]
            assert p["label"] == "person"
            assert p["box"][0] <= f["box"][0] and f["box"][2] <= p["box"][2]
    assert any("parent" in f for f in faces)
