"""Smoke test of `make bench`: every benchmark runs on its quick budget against the real daemon,
models and a real mosquitto, and returns well-formed figures. No timing is asserted (the
machines are shared and noisy); the relations checked hold whatever the speed."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import run  # noqa: E402
from benchmarks.common import Figure, percentile  # noqa: E402

pytestmark = pytest.mark.usefixtures("_mosquitto_installed")


@pytest.fixture
def _mosquitto_installed():
    from conftest import mosquitto_bin

    mosquitto_bin()


def by_name(figures: list[Figure]) -> dict[str, Figure]:
    return {f.name: f for f in figures}


def check_well_formed(name: str, figures: list[Figure]) -> None:
    assert figures, f"{name} returned no figures"
    for f in figures:
        assert isinstance(f, Figure) and f.bench == name
        assert isinstance(f.value, (int, float)) and math.isfinite(f.value), f
        assert f.name and isinstance(f.unit, str) and isinstance(f.note, str)
        # A figure has a verdict exactly when it has a goal.
        assert (f.ok is None) == (f.goal == ""), f
        assert f.ok in (None, True, False)


@pytest.fixture(scope="module")
def results() -> dict[str, list[Figure]]:
    figures, failures = run.run(list(run.BENCHMARKS), quick=True, log=sys.stderr)
    assert not failures, failures
    out: dict[str, list[Figure]] = {}
    for f in figures:
        out.setdefault(f.bench, []).append(f)
    return out


@pytest.mark.parametrize("name", list(run.BENCHMARKS))
def test_each_benchmark_returns_well_formed_figures(results, name):
    check_well_formed(name, results.get(name, []))


def test_efficiency_figures(results):
    figs = results["efficiency"]
    ratios = [f for f in figs if f.unit == "×"]
    assert {f.name.split(" ")[0] for f in ratios} >= {"face", "person", "motion"}
    for f in ratios:
        assert 0 < f.value < 5, f  # a ratio of rates, not a rate
        assert f.goal == "≥ 0.95"
    per_window = by_name(figs)["motion: CPU per window, all daemon threads"]
    assert per_window.value > 0 and per_window.unit == "µs"


def test_latency_percentiles_are_ordered(results):
    f = by_name(results["latency"])
    p50 = f["capture → subscriber minus invoke, p50"].value
    p99 = f["capture → subscriber minus invoke, p99"].value
    mx = f["capture → subscriber minus invoke, max"].value
    assert p50 <= p99 <= mx
    assert "detections at 30 fps" in f["capture → subscriber minus invoke, p50"].note


def test_memory_breakdown_adds_up_to_the_daemon(results):
    figs = results["memory"]
    peak = by_name(figs)["peak RSS, edged run with face + motion"]
    parts = [f.value for f in figs if f.name.startswith("  of which")]
    assert 10 < peak.value < 2000
    assert len(parts) >= 8
    # The steps are increments up to the running daemon's RSS, which is at most its peak.
    assert sum(parts) <= peak.value + 1.0
    ready = by_name(figs)["edged run: spawn → READY=1"]
    assert 0 < ready.value < 30


def test_outbox_and_drain_rates(results):
    f = by_name(results["outbox"])
    batched = f["durable appends, writer batches (≤ 256)"].value
    single = f["durable appends, one per transaction"].value
    assert batched > 0 and single > 0
    assert f["drain to mosquitto, QoS 1 acknowledged"].value > 0


def test_bandwidth_is_consistent(results):
    f = by_name(results["bandwidth"])
    raw = f["raw frames + IMU samples per hour"].value
    sent = f["result payloads published per hour"].value
    wire = f["MQTT bytes per hour (payload + framing)"].value
    assert raw > wire > sent > 0
    assert f["raw / published payload bytes"].value == pytest.approx(raw / sent, rel=0.02)
    # Sampling only adds bytes: every trigger sampled costs the most, the default budget less.
    every = f["with sampling, every trigger: raw / (results + samples)"].value
    budget = f["with sampling at the default budget, worst case: raw / (results + samples)"].value
    assert 0 < every < budget <= f["raw / published payload bytes"].value
    assert f["with sampling, every trigger: sample payloads per hour"].value > 0


def test_imu_counts(results):
    f = results["imu"]
    lost, delivered = f[0], f[1]
    assert lost.goal == "0" and lost.value >= 0 and float(lost.value).is_integer()
    # 20 simulated seconds at 400 Hz on the quick budget: every sample the chip made is either
    # delivered or counted lost. How many are delivered depends on the CPU the worker got (a
    # starved reader lets the FIFO overflow: 1,478 delivered once at load ~30), so it is no bound.
    assert delivered.value > 0 and delivered.value + lost.value > 400 * 10


def test_idle_share_is_a_share(results):
    f = by_name(results["idle"])
    assert 0 <= f["CPU share, static scene and still IMU"].value <= 100
    assert f["wake-ups (voluntary context switches)"].value >= 0


def test_table_and_json_output(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert run.main(["--quick", "--only", "outbox", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "durable appends, writer batches" in text and "benchmark" in text.splitlines()[1]
    doc = json.loads(out.read_text())
    assert doc["machine"]["cores"] >= 1 and doc["quick"] is True
    assert [f["bench"] for f in doc["figures"]] == ["outbox"] * len(doc["figures"])


def test_unknown_benchmark_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        run.main(["--only", "nosuch"])
    assert exc.value.code == 2
    assert "unknown benchmark nosuch" in capsys.readouterr().err


def test_percentile_interpolates():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 99) == 5
    assert math.isnan(percentile([], 50))


def test_ingest_loses_nothing_and_orders_its_percentiles(results):
    f = by_name(results["ingest"])
    assert f["fleet: missing rows"].value == 0 and f["fleet: duplicate rows"].value == 0
    assert 0 <= f["fleet: device ts → committed row, p50"].value <= f["fleet: device ts → committed row, p99"].value
    one = f["one worker, results/s (drain)"].value
    two = f["two workers, results/s (drain) = PostgreSQL rows/s"].value
    assert one > 0 and two > 0
    # The ratio is rounded to 0.01 from the unrounded rates, which are reported rounded to 1/s.
    slack = 0.005 + (two / one) * (0.5 / one + 0.5 / two)
    assert f["scale-out: two workers ÷ one"].value == pytest.approx(two / one, abs=slack)


def test_stage_figures_cover_each_stage_and_the_floor(results):
    f = by_name(results["stages"])
    for frame in ("vtest_0300.jpg", "group_leuven.jpg"):
        for stage in ("people", "faces", "faces_in_people"):
            assert f[f"{frame}: stage {stage}"].value > 0
    for overlap in ("off", "on"):
        ratio = f[f"efficiency, one core, overlap {overlap}"]
        assert 0 < ratio.value < 5 and ratio.goal == "≥ 0.95"
    if len(os.sched_getaffinity(0)) >= 2:
        assert f["efficiency, two cores, overlap on"].goal == "≥ 0.98"
        assert 0 < f["efficiency, two cores, overlap off"].value < 5
        assert f["efficiency with overlap ÷ without, 2 cores"].value > 0
    assert f["bare invoke, person"].value > f["bare invoke, face"].value  # 300x300 int8 vs 128x128
    # A lying person's crop costs the pose stage its views: 3 for the astronaut, 2 for the pedestrian.
    assert f["pose, astronaut lying (498x344)"].note.startswith("3 view(s)")
    assert f["pose, pedestrian lying (102x44)"].note.startswith("2 view(s)")
    assert f["pose, astronaut upright (344x498)"].note.startswith("1 view(s)")
    assert f["pose, astronaut: lying ÷ upright"].value > 0
    # Where the interpreter idled, by cause: with its busy share, the whole of the stream's time.
    where = "two cores" if len(os.sched_getaffinity(0)) >= 2 else "one core"
    idle = [x for n, x in f.items() if n.startswith(f"interpreter idle, {where}, overlap on: ")]
    assert len(idle) == 5 and all(x.value >= 0 for x in idle)
    busy = [float(v) for v in f[f"interpreter busy, {where}, overlap on"].note.rsplit("rounds: ", 1)[1].split(", ")]
    assert sum(x.value for x in idle) + busy[-1] == pytest.approx(1.0, abs=0.01)
    assert busy[-1] <= f[f"interpreter busy, {where}, overlap on, within the stream"].value <= 1.0
    for stage in ("people", "faces", "faces_in_people"):
        for part in ("prepare", "decode"):
            assert f[f"Python per unit, stage {stage}: {part}"].value > 0
    # Three views, each resampled and filled by both resamplers (test_resample fails where the
    # compiled one should be there and is not), and how many times faster the compiled one is.
    from edged.stages.vision import native

    kinds = ("numpy", "compiled") if native.library()[0] is not None else ("numpy",)
    for what in ("resample ", "fill "):
        timed = [n for n in f if n.startswith(what) and n.endswith(tuple(f", {k}" for k in kinds))]
        assert len(timed) == 3 * len(kinds) and all(f[n].value > 0 and "fastest" in f[n].note for n in timed)
    ratios = [n for n in f if n.endswith(": numpy ÷ compiled")]
    assert len(ratios) == (3 if len(kinds) == 2 else 0) and all(f[n].value > 0 for n in ratios)
    if len(kinds) == 2:
        assert f["vision thread CPU ÷ invoke thread CPU, overlap on, numpy resampler"].value > 0


def test_updates_figures(results):
    f = by_name(results["updates"])
    quiet = f["bytes per metadata refresh, nothing new"]
    assert 0 < quiet.value < 2000, quiet  # a timestamp, not the whole metadata again
    first = int(quiet.note.rsplit(": ", 1)[1].split()[0])
    assert first > quiet.value
    assert f["memory added by the updater"].value >= 0
    # Centroids alone: a few kB (the file and a descriptor, the metadata refresh), not a model's size.
    assert quiet.value < f["bytes to install a centroids release"].value < 20_000
    polled = next(x for n, x in f.items() if n.startswith("rollout to 100 %") and "polling" in n)
    announced = next(x for n, x in f.items() if n.startswith("rollout to 100 %") and "announced" in n)
    assert polled.value > 0 and announced.value > 0
