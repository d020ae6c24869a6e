"""Small artefacts released without a model, and the fleet-wide announcement.

The cloud enrolls a new motion (`edged signatures enroll` on signatures the device path produced
from HAPT recordings it never trained on), releases the centroids alone with
`edged release artefact`; a real `edged run` with `[updates]`, fed by a real HTTP server on
loopback and a real mosquitto, installs them and labels the new motion itself. Centroids made for
another signature version are refused in one line.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest

from conftest import REPO, write_config
from test_updates import Server, device_config, edged_cli, models_reports

from edged.cloud.releases import ReleaseError, Repository
from edged.models import load_manifest, open_model
from edged.records import ImuBatch
from edged.service.updater import Updater
from edged.sources.imu.imucsv import write_imu_csv
from edged.stages.motion import MotionStage

DATA = REPO / "tests" / "data"
SHIPPED = REPO / "models" / "motion.centroids.json"


def bouts(label: str):
    d = np.load(DATA / "hapt_heldout.npz")
    x, start = d["x"], d["start"]
    ends = np.append(start[1:], len(x))
    for a, b, s, lab in zip(start, ends, d["subject"], d["label"]):
        if str(lab) == label:
            yield int(s), np.arange(b - a) / float(d["rate_hz"]), x[a:b].astype(np.float32)


@pytest.fixture(scope="module")
def stairs(tmp_path_factory):
    """Centroids with "stairs" enrolled by the CLI from one window each of five people (subjects
    16-20) climbing stairs, run through the device's motion stage; and a recording of someone
    else (subject 22) on the stairs."""
    tmp = tmp_path_factory.mktemp("stairs")
    entry = load_manifest()["motion"]
    model = open_model(entry, threads=1)
    lines = []
    for s, t, x in bouts("walking_upstairs"):
        if 16 <= s <= 20 and not any(json.loads(ln)["subject"] == s for ln in lines):
            out = MotionStage(model, entry).push(ImuBatch(t, x))
            lines.append(json.dumps({"signature": list(out[len(out) // 2].signature), "sig_v": out[0].signature_v,
                                     "subject": s}))
    assert len(lines) == 5
    few = tmp / "stairs.jsonl"
    few.write_text("\n".join(lines) + "\n")
    cents = tmp / "centroids.json"
    r = edged_cli("signatures", "enroll", str(few), "-c", str(SHIPPED), "--label", "stairs", "-o", str(cents))
    assert r.returncode == 0, r.stderr
    climbing = tmp / "up22.csv"
    t, x = next((t, x) for s, t, x in bouts("walking_upstairs") if s == 22)
    write_imu_csv(climbing, t, x)
    return cents, climbing


def publish(broker, topic: str, payloads, *, qos: int = 1, retain: bool = False) -> None:
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-announce-{time.monotonic_ns()}")
    c.connect(broker.host, broker.port)
    c.loop_start()
    infos = [c.publish(topic, p, qos=qos, retain=retain) for p in payloads]
    for info in infos:
        info.wait_for_publish(10)
    c.loop_stop()
    c.disconnect()


FLEET = "edged/fleet/release"


def test_enrolled_centroids_released_alone_are_labelled_by_a_running_daemon(tmp_path, stairs, broker, subscriber,
                                                                            daemon_factory):
    cents, climbing = stairs
    repo = tmp_path / "repo"
    assert edged_cli("release", "init", str(repo)).returncode == 0
    srv = Server(repo / "public")
    try:
        cfg = write_config(tmp_path / "edged.toml", broker, extra=(
            f'[camera]\nenabled = false\n[imu]\npath = "{climbing}"\nspeed = 1\nloop = true\n'
            "[commands]\nenabled = true\n[stats]\ninterval_s = 1\n"
            f'[updates]\nurl = "{srv.url}"\nroot_json = "{repo / "root.json"}"\n'
            'poll_interval_s = 3600\nhealth_window_s = 2\nannounce_interval_s = 1\n'))
        d = daemon_factory(cfg).start()
        # The shipped model's own classifier knows four motions: no "stairs".
        assert subscriber.wait(lambda: len(subscriber.json("motion")) >= 3 and models_reports(subscriber), 60), \
            d.output()
        assert not any(m["label"] == "stairs" for m in subscriber.json("motion"))

        r = edged_cli("release", "artefact", str(repo), str(cents), "--kind", "centroids", "--version", "1")
        assert r.returncode == 0, r.stderr
        assert "motion centroids 1: released" in r.stderr
        r = edged_cli("release", "rollout", str(repo), "--name", "motion", "--kind", "centroids",
                      "--version", "1", "--percent", "100")
        assert r.returncode == 0, r.stderr
        # Announced to the fleet, retained; what the message says is not read (it could say anything).
        publish(broker, FLEET, [json.dumps({"url": "http://elsewhere.invalid/", "install": "x"}).encode()],
                retain=True)

        def centroids_running(m) -> int | None:
            return ((m["models"]["motion"].get("artefacts") or {}).get("centroids") or {}).get("running")
        assert subscriber.wait(lambda: any(centroids_running(m) == 1 for m in models_reports(subscriber)), 60), \
            d.output()
        rep = next(m for m in models_reports(subscriber) if centroids_running(m) == 1)
        assert rep["last"] == {**rep["last"], "model": "motion", "artefact": "centroids", "version": 1,
                               "outcome": "installed"}
        assert rep["models"]["motion"]["running"] is None  # the shipped model: no new model came
        n = len(subscriber.json("motion"))
        assert subscriber.wait(lambda: len(subscriber.json("motion")) >= n + 6, 60), d.output()
        after = [m["label"] for m in subscriber.json("motion")[n + 2:]]  # past the swap
        assert np.mean([lab == "stairs" for lab in after]) >= 0.8, after

        # Centroids of another signature version: refused in one line, the installed ones kept.
        doc = json.loads(cents.read_text())
        doc["signature_version"] = 1
        old = tmp_path / "old-centroids.json"
        old.write_text(json.dumps(doc))
        assert edged_cli("release", "artefact", str(repo), str(old), "--kind", "centroids",
                         "--version", "2").returncode == 0
        assert edged_cli("release", "rollout", str(repo), "--name", "motion", "--kind", "centroids",
                         "--version", "2", "--percent", "100").returncode == 0
        publish(broker, "edged/test-dev/cmd/update", [b"{}"])  # or one device, by command
        assert subscriber.wait(lambda: any((m["last"] or {}).get("outcome") == "refused"
                                           for m in models_reports(subscriber)), 60), d.output()
        refused = [m for m in models_reports(subscriber) if (m["last"] or {}).get("outcome") == "refused"][-1]
        assert refused["last"]["version"] == 2 and refused["last"]["artefact"] == "centroids"
        assert ("made for motion signature version 1, but model motion has signature version 2"
                in refused["last"]["reason"])
        assert centroids_running(refused) == 1
        assert d.output().count("update refused") == 1

        # A flood on the announce topic (anyone who may publish there): the device counts it but
        # checks the repository at most once per announce_interval_s (1 s here).
        def stats() -> dict:
            return subscriber.json("stats")[-1]
        before = stats()
        t0 = time.monotonic()
        publish(broker, FLEET, [bytes([i % 256]) * (i % 50) for i in range(300)])
        assert subscriber.wait(lambda: stats()["update_announcements"] >= before["update_announcements"] + 300
                               and stats()["update_checks"] > before["update_checks"], 60), d.output()
        elapsed = time.monotonic() - t0
        checks = stats()["update_checks"] - before["update_checks"]
        assert checks <= 2 + elapsed / 1.0, (checks, elapsed)
        # Nothing was published outside the device's own prefix but what the test sent.
        with subscriber._lock:
            topics = {t for t, _, _ in subscriber.messages}
        assert {t for t in topics if not t.startswith("edged/test-dev/")} == {FLEET}
        assert d.stop() == 0
        assert "Traceback" not in d.output()
        installed = tmp_path / "state" / "updates" / "artefacts" / "motion" / "centroids"
        assert sorted(p.name for p in installed.iterdir()) == ["1"]
    finally:
        srv.close()


def test_artefact_cli_checks_files_and_versions(tmp_path, stairs):
    cents, _ = stairs
    repo = Repository.init(tmp_path / "repo")
    rel = repo.add_artefact(cents, "centroids", version=1)
    assert (rel.name, rel.files) == ("motion", ["centroids.json"])
    with pytest.raises(ReleaseError, match="already released"):
        repo.add_artefact(cents, "centroids", version=1)
    with pytest.raises(ReleaseError, match="centroids for model 'motion', not --name 'face'"):
        repo.add_artefact(cents, "centroids", version=2, name="face")
    with pytest.raises(ReleaseError, match="motion.labels: not JSON"):
        repo.add_artefact(REPO / "models" / "motion.labels", "centroids", version=2)
    other = tmp_path / "other.json"
    other.write_text('{"format": "something else"}')
    with pytest.raises(ReleaseError, match="not an edged centroid file"):
        repo.add_artefact(other, "centroids", version=2)
    repo.add_artefact(REPO / "models" / "face.labels", "labels", version=1, name="face")
    repo.rollout("motion", 1, 50.0, kind="centroids")
    with pytest.raises(ReleaseError, match="motion labels version 1 is not released"):
        repo.rollout("motion", 1, 50.0, kind="labels")
    repo.revoke("motion", 1, kind="centroids")
    repo.publish()
    status = json.loads(edged_cli("release", "status", str(tmp_path / "repo"), "--json").stdout)
    assert status["artefacts"] == {"face": {"labels": [1]}, "motion": {"centroids": [1]}}
    assert status["artefact_channels"]["stable"]["motion"]["centroids"] == {"rollouts": [], "revoked": [1]}
    assert status["releases"] == {}
    text = edged_cli("release", "status", str(tmp_path / "repo")).stdout
    assert "release motion centroids: versions 1" in text and "channel stable: motion centroids: nothing; revoked 1" in text


def test_a_label_map_that_does_not_fit_the_model_is_refused(tmp_path, caplog):
    repo_dir = tmp_path / "repo"
    repo = Repository.init(repo_dir)
    labels = tmp_path / "face.labels"
    labels.write_text("face\nhead\n")  # the face model has one class
    repo.add_artefact(labels, "labels", version=1, name="face")
    repo.rollout("face", 1, 100.0, kind="labels")
    repo.publish()
    srv = Server(repo_dir / "public")
    try:
        up = Updater(device_config(tmp_path, srv.url, repo_dir / "root.json"))
        up.on_start()
        with caplog.at_level(logging.ERROR, logger="edged.updater"):
            up.check()
            up.check()
        refused = [r for r in caplog.records if r.getMessage().startswith("update refused")]
        assert len(refused) == 1
        assert up.state.last["reason"] == ("artefacts/face/labels/1: a label map of 2 labels, but model face "
                                           "has 1 classes")
        assert up._staged.empty() and up.state.model("face").artefact("labels").running is None
        assert up.checks == 2 and up.bytes_fetched > 0
    finally:
        srv.close()


def test_channel_artefact_rollouts_round_trip_and_unknown_kinds_are_ignored():
    from edged.rollout import Channel, ModelRollout

    ch = Channel("stable", {"motion": ModelRollout({2: 100.0})},
                 {"motion": {"centroids": ModelRollout({3: 10.0, 1: 100.0}, {2})}})
    again = Channel.from_bytes(ch.to_bytes())
    assert again == ch
    assert again.artefact("motion", "centroids").choose("pi-1", "motion") in (1, 3)
    assert b"artefacts" not in Channel("stable", {"motion": ModelRollout({2: 100.0})}).to_bytes()
    # A newer release tool's kind is skipped, not a reason to refuse the whole channel.
    doc = json.loads(ch.to_bytes())
    doc["artefacts"]["motion"]["thresholds"] = {"rollouts": [{"version": 1, "percent": 100.0}], "revoked": []}
    parsed = Channel.from_bytes(json.dumps(doc).encode())
    assert set(parsed.artefacts["motion"]) == {"centroids"}



def test_a_label_map_released_alone_renames_the_models_classes(tmp_path, broker, subscriber, daemon_factory):
    """The face model's one class, renamed by a label map released on its own: a running daemon
    installs it at its first check and labels its detections with the new name; the shipped
    manifest is not touched. Damaged on disk afterwards, it is not used at the next start."""
    repo_dir = tmp_path / "repo"
    repo = Repository.init(repo_dir)
    labels = tmp_path / "face.labels"
    labels.write_text("visitor\n")
    repo.add_artefact(labels, "labels", version=1, name="face")
    repo.rollout("face", 1, 100.0, kind="labels")
    repo.publish()
    srv = Server(repo_dir / "public")
    try:
        cfg = write_config(tmp_path / "edged.toml", broker, extra=(
            "[camera]\nfps = 5\n[imu]\nenabled = false\n"
            f'[updates]\nurl = "{srv.url}"\nroot_json = "{repo_dir / "root.json"}"\npoll_interval_s = 3600\n'))
        d = daemon_factory(cfg).start()

        def labelled(name: str, since: int = 0) -> list[dict]:
            return [m for m in subscriber.json("detections")[since:] if any(o["label"] == name for o in m["objects"])]
        assert subscriber.wait(lambda: labelled("visitor"), 60), d.output()
        assert load_manifest()["face"].labels == ["face"]
        assert d.stop() == 0
        installed = tmp_path / "state" / "updates" / "artefacts" / "face" / "labels" / "1" / "labels.txt"
        assert installed.read_text() == "visitor\n"
        installed.write_text("intruder\n")
        n = len(subscriber.json("detections"))
        d = daemon_factory(cfg).start()
        assert subscriber.wait(lambda: labelled("face", n), 60), d.output()
        assert not labelled("intruder")
        assert "installed artefact damaged; using the one before it" in d.output()
        assert d.stop() == 0
    finally:
        srv.close()
