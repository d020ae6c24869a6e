"""Motion signatures beyond the model's own classes: held-out activities and people, enrollment.

tests/data/hapt_heldout.npz holds HAPT recordings (a waist-worn smartphone, 50 Hz, gravity
included) of the activities and subjects the shipped model never trained on (see
scripts/export_hapt.py). Everything runs through the device path: MotionStage → Preprocessor →
int8 model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib

import numpy as np
import pytest

from conftest import REPO, write_config
from edged import centroids as cen
from edged.models import ModelError, load_manifest, open_model
from edged.records import ImuBatch
from edged.sources.imu.imucsv import write_imu_csv
from edged.stages.motion import InputSpec, MotionStage, Preprocessor, iter_windows, load_stage_centroids

DATA = REPO / "tests" / "data"
SHIPPED = REPO / "models" / "motion.centroids.json"
ACTIVITIES = ("walking_upstairs", "walking_downstairs", "sitting", "laying")


def edged(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "edged", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def entry():
    return load_manifest()["motion"]


@pytest.fixture(scope="module")
def model(entry):
    return open_model(entry, threads=1)


def bouts():
    d = np.load(DATA / "hapt_heldout.npz")
    x, start = d["x"].astype(np.float64), d["start"]
    ends = np.append(start[1:], len(x))
    rate = float(d["rate_hz"])
    for a, b, s, lab in zip(start, ends, d["subject"], d["label"]):
        yield int(s), str(lab), np.arange(b - a) / rate, x[a:b]


@pytest.fixture(scope="module")
def heldout(model, entry):
    """Signatures, the mean+std baseline of the same windows, subject and activity per window."""
    spec = InputSpec.from_entry(entry)
    pre = Preprocessor(spec, 2048)
    sig, base, subj, lab = [], [], [], []
    for s, a, t, x in bouts():
        out = MotionStage(model, entry).push(ImuBatch(t, x.astype(np.float32)))
        wins = list(iter_windows(t, x.astype(np.float32), spec))
        assert len(out) == len(wins) > 0
        for o, (i, j, end) in zip(out, wins):
            pre(t[i:j], x[i:j].astype(np.float32), end=end)
            res = pre.resampled  # the six channels on the model's grid, gravity included
            base.append(np.concatenate([res.mean(axis=0), res.std(axis=0)]))
            sig.append(o.signature)
            subj.append(s)
            lab.append(a)
    return np.array(sig, np.float64), np.array(base), np.array(subj), np.array(lab)


def loso(F, subj, lab, acts=ACTIVITIES):
    """Leave one subject out: their windows against centroids of the other subjects' (mean accuracy)."""
    accs = []
    for s in np.unique(subj):
        cents = np.array([F[(subj != s) & (lab == a)].mean(axis=0) for a in acts])
        te = subj == s
        accs.append(np.mean(np.array(acts)[cen.nearest(cents, F[te])] == lab[te]))
    return float(np.mean(accs))


def test_held_out_data_is_what_the_model_never_trained_on(entry, heldout):
    _, _, subj, lab = heldout
    assert set(lab) == set(ACTIVITIES) and set(subj) == set(range(16, 31))
    datasets = tomllib.loads(entry.manifest.read_text())["models"]["motion"]["datasets"]
    held = next(d for d in datasets if d["name"].startswith("HAPT"))
    assert "subjects 16-30" in held["use"] and all(a.replace("_", " ") in held["use"] for a in ACTIVITIES)
    assert held["license"].startswith("CC BY 4.0")


def test_signatures_recognise_unseen_activities_of_unseen_people(heldout):
    sig, base, subj, lab = heldout
    got = loso(sig, subj, lab)
    baseline = loso(base, subj, lab)
    assert got >= 0.90, got
    # The per-window mean and standard deviation of the six channels, through the same
    # nearest-centroid protocol, is the bar a signature has to clear.
    assert got > baseline + 0.03, (got, baseline)


def test_five_windows_enroll_a_new_motion(heldout):
    sig, _, subj, lab = heldout
    rng = np.random.default_rng(5)
    recalls = []
    for new in ACTIVITIES:
        known = [a for a in ACTIVITIES if a != new]
        for s in np.unique(subj)[::3]:
            others = (subj != s) & np.isin(lab, known)
            base = cen.build_centroids(sig[others], lab[others], order=known)
            pool = np.flatnonzero((subj != s) & (lab == new))
            cents = cen.enroll_centroid(base, sig[rng.choice(pool, 5, replace=False)], new)
            te = (subj == s) & (lab == new)
            recalls.append(np.mean([m.nearest == new for m in cen.classify(cents, sig[te])]))
    assert np.mean(recalls) >= 0.85, np.mean(recalls)


def test_enroll_thresholds_borrow_from_the_file(heldout):
    sig, _, _, lab = heldout
    base = cen.build_centroids(sig[lab != "laying"], lab[lab != "laying"])
    few = sig[lab == "laying"][:5]
    got = cen.enroll_centroid(base, few, "laying")
    assert got.labels == base.labels + ("laying",) and got.counts[-1] == 5
    np.testing.assert_allclose(got.centroids[-1], few.mean(axis=0))
    assert got.thresholds[-1] >= np.median(base.thresholds)
    with pytest.raises(cen.SignatureError, match="'sitting' is already enrolled"):
        cen.enroll_centroid(got, few, "sitting")
    again = cen.enroll_centroid(got, few, "sitting", replace=True)
    assert again.labels.count("sitting") == 1 and again.counts[-1] == 5
    for bad in ("Jumping!", "unknown", ""):
        with pytest.raises(cen.SignatureError, match="motion name"):
            cen.enroll_centroid(base, few, bad)


def _csv(tmp_path, name, subject=None, label=None):
    t, x = next((t, x) for s, a, t, x in bouts() if (subject is None or s == subject) and a == label)
    path = tmp_path / name
    write_imu_csv(path, t, x.astype(np.float32))
    return path


def _five_windows(tmp_path, label):
    """Signatures of five windows of `label`, one from each of five people, as `edged motion` prints them."""
    lines = []
    for subject in range(16, 21):
        r = edged("motion", str(_csv(tmp_path, f"{label}{subject}.csv", subject, label)))
        assert r.returncode == 0, r.stderr
        lines.append(r.stdout.splitlines()[2])
    few = tmp_path / f"{label}.jsonl"
    few.write_text("\n".join(lines) + "\n")
    return few


def test_enrolled_motion_is_labelled_by_the_device(tmp_path, entry, model):
    # The cloud: one window each of five people climbing stairs, run through the model as a
    # device would, enrolled into the shipped centroids as a new motion.
    few = _five_windows(tmp_path, "walking_upstairs")
    lines = few.read_text().splitlines()
    assert all(json.loads(x)["sig_v"] == entry.params["signature_version"] for x in lines)
    out = tmp_path / "centroids.json"
    e = edged("signatures", "enroll", str(few), "-c", str(SHIPPED), "--label", "stairs", "-o", str(out))
    assert e.returncode == 0, e.stderr
    assert "stairs enrolled from 5 signatures" in e.stderr and "5 motions" in e.stderr
    assert json.loads(SHIPPED.read_text())["motions"][-1]["label"] == "badminton"  # not touched

    # The device, given the new file: someone else on the stairs is "stairs"; the shipped
    # motions keep their names.
    r = edged("motion", str(_csv(tmp_path, "up25.csv", 25, "walking_upstairs")), "--centroids", str(out))
    assert r.returncode == 0, r.stderr
    got = [json.loads(x) for x in r.stdout.splitlines()]
    assert np.mean([g["label"] == "stairs" for g in got]) >= 0.8, [g["label"] for g in got]
    assert all(0.0 <= g["score"] <= 1.0 for g in got)
    demo = edged("motion", str(REPO / "samples" / "imu" / "basicmotions_demo.csv"), "--centroids", str(out))
    labels = [json.loads(x)["label"] for x in demo.stdout.splitlines()]
    assert "stairs" not in labels and {"standing", "walking", "running", "badminton"} <= set(labels)

    # Everyone else, for a motion enrolled from five people: most of their windows get its name.
    cents = load_stage_centroids(out, entry)
    recall = []
    for s, a, t, x in bouts():
        if a == "walking_upstairs" and s > 20:
            sig = [o.signature for o in MotionStage(model, entry, centroids=cents).push(ImuBatch(t, x.astype(np.float32)))]
            recall.append(np.mean([m.label == "stairs" for m in cen.classify(cents, sig)]))
    assert len(recall) == 10 and np.mean(recall) >= 0.9, recall

    # Enrolling the same name twice is refused in one line; --replace rebuilds it.
    twice = edged("signatures", "enroll", str(few), "-c", str(out), "--label", "stairs")
    assert twice.returncode == 2 and "already enrolled" in twice.stderr
    assert len(twice.stderr.strip().splitlines()) == 1 and "Traceback" not in twice.stderr
    assert edged("signatures", "enroll", str(few), "-c", str(out), "--label", "stairs", "--replace").returncode == 0


def test_centroids_of_another_signature_version_are_refused(tmp_path, entry, model):
    doc = json.loads(SHIPPED.read_text())
    doc["signature_version"] = 1
    old = tmp_path / "old.json"
    old.write_text(json.dumps(doc))
    with pytest.raises(ModelError, match=r"made for motion signature version 1, but model motion has "
                                         r"signature version \d"):
        MotionStage(model, entry, centroids=load_stage_centroids(old, entry))
    r = edged("motion", str(REPO / "samples" / "imu" / "basicmotions_demo.csv"), "--centroids", str(old))
    assert r.returncode == 2 and "rebuild them from this model's signatures" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    # A file of signatures from two embeddings cannot be enrolled from either.
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"signature": [1] * 16, "label": "x", "sig_v": 1}) + "\n"
                     + json.dumps({"signature": [1] * 16, "label": "x", "sig_v": 2}) + "\n")
    r = edged("signatures", "enroll", str(mixed), "-c", str(SHIPPED), "-o", str(tmp_path / "c.json"))
    assert r.returncode == 2 and "mixed.jsonl:2: sig_v: signature versions [1, 2] in one file" in r.stderr


def test_daemon_labels_an_enrolled_motion(tmp_path, broker, subscriber, daemon_factory, entry):
    few = _five_windows(tmp_path, "walking_upstairs")
    cents = tmp_path / "centroids.json"
    assert edged("signatures", "enroll", str(few), "-c", str(SHIPPED), "--label", "stairs",
                 "-o", str(cents)).returncode == 0
    climbing = _csv(tmp_path, "up22.csv", 22, "walking_upstairs")
    cfg = write_config(tmp_path / "edged.toml", broker,
                       extra=f'[camera]\nenabled = false\n[imu]\npath = "{climbing}"\nspeed = 1\n'
                             f'[motion]\ncentroids = "{cents}"\n')
    d = daemon_factory(cfg).start()
    assert subscriber.wait(lambda: len(subscriber.on("motion")) >= 5, 60), d.output()
    motion = subscriber.json("motion")
    assert all(m["sig_v"] == entry.params["signature_version"] for m in motion)
    assert np.mean([m["label"] == "stairs" for m in motion]) >= 0.8, [m["label"] for m in motion]
    assert d.stop() == 0


def test_a_missing_centroid_file_is_a_config_error(tmp_path):
    cfg = tmp_path / "edged.toml"
    cfg.write_text('[motion]\ncentroids = "/nonexistent/c.json"\nmounting = "free"\n')
    r = edged("check-config", str(cfg))
    assert r.returncode == 2 and "motion.centroids: file not found: /nonexistent/c.json" in r.stderr
    cfg.write_text('[motion]\nmounting = "sideways"\n')
    r = edged("check-config", str(cfg))
    assert r.returncode == 2 and "motion.mounting" in r.stderr
