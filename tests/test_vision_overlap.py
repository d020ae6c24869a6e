"""The vision graph with its invokes on a thread of their own (edged.stages.vision.overlap), and
stages that share an input sharing its preprocessing: real models on real scenes, results checked
against the plain one-after-the-other run. Behaviour only: the speed-up is measured by `make bench`
(benchmarks/stages.py), not here."""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import wait_until, write_config
from edged.fakes.tpu import FakeEdgeTpu
from edged.models import load_manifest, open_model
from edged.stages.vision.graph import DEFAULT_CHAIN, StageSpec, Wait, open_graph
from edged.stages.vision.overlap import FrameRunner, Invoker
from edged.tpu import TpuError, open_for_backend

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
SCENES = REPO / "tests" / "data" / "vision" / "scenes"
# People and faces, several per frame, and a scene with nobody (no crops at all).
FRAMES = ("group_leuven.jpg", "vtest_0300.jpg", "building.jpg", "basketball1.jpg")


def load(name: str) -> np.ndarray:
    return np.asarray(Image.open(SCENES / name).convert("RGB"))


@pytest.fixture(scope="module")
def manifest():
    return load_manifest(MODELS)


@pytest.fixture(scope="module")
def frames():
    return [load(n) for n in FRAMES]


@pytest.fixture(scope="module")
def chain(manifest):
    return open_graph(DEFAULT_CHAIN, manifest, threads=1)


@pytest.fixture(scope="module")
def expected(chain, frames):
    return [chain.detect(f) for f in frames]


@pytest.fixture(scope="module")
def expected_invokes(chain, frames):
    """Per frame: each stage's invokes in a plain run."""
    out = []
    for f in frames:
        chain.detect(f)
        out.append([r.invokes for r in chain.runs])
    return out


def invoke_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "vision-invoke"]


def run_all(runner: FrameRunner, frames, tags) -> list:
    out = []
    for tag, f in zip(tags, frames):
        out += runner.push(f, tag)
    return out + runner.flush()


@pytest.mark.parametrize("overlap", [False, True])
def test_runner_gives_the_objects_of_a_plain_run_in_order(chain, frames, expected, expected_invokes, overlap):
    assert sum(len(e) for e in expected) >= 10 and () in expected  # people and faces, and a frame with none
    runner = FrameRunner(chain, overlap=overlap)
    try:
        # Twice through: the second pass starts with the stages' input slots where the first left them.
        tags = list(range(2 * len(frames)))
        out = run_all(runner, frames * 2, tags)
        assert [t for t, _, _ in out] == tags
        assert [objs for _, objs, _ in out] == expected * 2
        assert all(ms > 0 for _, _, ms in out)
        assert runner.pending == 0
        # Per-stage counts are the last frame's, though its stages completed during other pushes.
        assert [r.invokes for r in chain.runs] == expected_invokes[-1] != expected_invokes[-2]
    finally:
        assert runner.close()


def test_with_overlap_a_frame_comes_out_of_the_next_push(chain, frames, expected):
    runner = FrameRunner(chain, overlap=True)
    try:
        assert runner.push(frames[0], "a") == []  # its last invoke may still run: handed out later
        assert runner.pending == 1
        (tag, objs, _), = runner.push(frames[1], "b")
        assert (tag, objs) == ("a", expected[0])
        assert [(t, o) for t, o, _ in runner.flush()] == [("b", expected[1])]
    finally:
        runner.close()


def test_on_done_gets_a_frame_as_soon_as_its_last_invoke_is_decoded(chain, frames, expected):
    # The daemon publishes from on_done: frame a's results arrive while frame b is being worked
    # on (b's first invoke already started), not after b's whole push.
    seen = []
    runner = FrameRunner(chain, overlap=True, on_done=lambda tag, objs, ms: seen.append((tag, objs, runner.pending)))
    try:
        assert runner.push(frames[0], "a") == [] and seen == []
        assert runner.push(frames[1], "b") == []
        assert seen == [("a", expected[0], 1)]  # b was still pending when a came out
        assert runner.flush() == []
        assert seen[1:] == [("b", expected[1], 0)]
    finally:
        runner.close()


def test_stop_is_clean_and_leaves_no_thread(chain, frames):
    before = len(invoke_threads())
    dropped = []
    runner = FrameRunner(chain, overlap=True, on_drop=dropped.append)
    assert len(invoke_threads()) == before + 1
    runner.push(frames[0], "a")
    assert [t for t, _, _ in runner.push(frames[1], "b")] == ["a"]
    assert runner.close(timeout=30)  # one frame still in flight: its results are dropped...
    assert dropped == ["b"]  # ...and its owner told (the daemon gives its camera buffer back)
    assert len(invoke_threads()) == before
    with pytest.raises(RuntimeError, match="closed"):
        runner.push(frames[0])


@pytest.mark.parametrize("overlap", [False, True])
def test_a_stop_abandons_the_frame_after_the_invoke_running_then(manifest, frames, overlap):
    # A frame of five units (the frame and 2x2 tiles); each invoke holds until the test lets it
    # go. The stop comes while the first one runs: the runner waits for that invoke and starts
    # no other (not the unit prepared and queued behind it either), hands out nothing of the
    # half-done frame and gives it back to its owner. Before, the whole frame ran to its end.
    graph = open_graph([StageSpec(name="faces", model="face", tiles=2)], manifest, threads=1)
    model = graph.runs[0].stage.model
    real, cond, gate = model.invoke, threading.Condition(), threading.Event()
    started = []

    def held() -> None:
        with cond:
            started.append(threading.current_thread().name)
            cond.notify_all()
        gate.wait()
        real()

    model.invoke = held
    stop, done, dropped, out = threading.Event(), [], [], []
    runner = FrameRunner(graph, overlap=overlap, stop=stop, on_done=lambda *a: done.append(a),
                         on_drop=dropped.append)
    pusher = threading.Thread(target=lambda: out.append(runner.push(frames[0], "f")), daemon=True)
    try:
        pusher.start()
        with cond:
            assert cond.wait_for(lambda: started, timeout=60)
        stop.set()
        gate.set()
        pusher.join(60)
        assert not pusher.is_alive()
        assert out == [[]] and done == [] and dropped == ["f"]
        assert len(started) == 1, started
        assert runner.pending == 0
        assert runner.flush() == [] and len(started) == 1
    finally:
        gate.set()
        assert runner.close(timeout=30)
    assert len(started) == 1


def test_a_unit_handed_to_an_idle_invoke_thread_is_started_before_the_vision_thread_goes_on(manifest, frames):
    # The invoke thread needs the GIL to start an invoke. Handed a unit while it waits for work,
    # it has taken it when submit returns, so the vision thread's Python that follows (decoding
    # the last unit, preparing the next) cannot keep the interpreter idle meanwhile. Shown with a
    # switch interval so long that the GIL changes hands only where a thread blocks: the unit's
    # input is committed while the pure-Python loop after submit runs. Before, the invoke thread
    # waited for that loop to end (in the daemon: up to 5 ms, the default interval).
    graph = open_graph([StageSpec(name="faces", model="face")], manifest, threads=1)
    pre = graph.runs[0].stage.preprocess
    real, entered = pre.commit, threading.Event()

    def commit(slot: int = 0) -> None:  # the first thing a unit's invoke does
        entered.set()
        real(slot)

    pre.commit = commit
    fw = graph.start(frames[0])
    unit = next(graph.units(fw, overlap=True))
    invoker = Invoker()
    saved = sys.getswitchinterval()
    seen = False
    try:
        assert wait_until(lambda: invoker._idle, 30)
        sys.setswitchinterval(30.0)
        job = invoker.submit(unit)
        deadline = time.perf_counter() + 10.0
        while time.perf_counter() < deadline:  # Python only: no GIL given up here
            if entered.is_set():
                seen = True
                break
    finally:
        sys.setswitchinterval(saved)
    try:
        assert seen
        assert job.done.wait(60) and unit.error is None
        graph.finish(unit)
        assert fw.objects == graph.detect(frames[0])
    finally:
        assert invoker.close(timeout=30)


def test_output_copies_reuse_their_buffers(chain, frames):
    # The copy taken after each invoke (what the vision thread decodes while the next invoke
    # runs) goes into buffers of its own, made once (the person model's scores alone are 174 kB),
    # not into new arrays per invoke.
    from edged.runtime import OutputCopy

    run = chain.runs[0]
    model = run.stage.model
    run.stage.preprocess(frames[0])
    model.invoke()
    copy = OutputCopy(model, tuple(run.stage.reads))
    copy.capture(model)
    held = {i: copy.raw_output(i) for i in run.stage.reads}
    copy.capture(model)
    assert all(copy.raw_output(i) is held[i] for i in run.stage.reads)
    for i in run.stage.reads:
        assert np.array_equal(copy.raw_output(i), model.raw_output(i))
        assert np.array_equal(copy.output(i), model.output(i))
    model.invoke()  # no view of the interpreter's buffers is left behind


def test_a_bad_frame_is_refused_before_any_work_and_the_runner_goes_on(chain, frames, expected):
    runner = FrameRunner(chain, overlap=True)
    try:
        assert runner.push(frames[0], 0) == []
        with pytest.raises(ValueError, match=r"expected an RGB uint8 image"):
            runner.push(np.zeros((40, 40), np.uint8), 1)
        out = runner.push(frames[1], 2) + runner.flush()
        assert [(t, o) for t, o, _ in out] == [(0, expected[0]), (2, expected[1])]
    finally:
        runner.close()


def test_stages_with_the_same_input_resample_it_once(manifest, frames):
    # The same geometry twice on the frame (and its tiles) and twice on the same crops: the second
    # of each pair reads the first one's pixels. The objects are those of the same graph with every
    # stage resampling for itself.
    specs = [StageSpec("people", "person", tiles=2, score_threshold=0.4),
             StageSpec("people_sure", "person", tiles=2, score_threshold=0.7),
             StageSpec("faces", "face", input="person@people", region="top"),
             StageSpec("faces_sure", "face", input="person@people", region="top", score_threshold=0.8),
             StageSpec("faces_whole", "face", input="person@people")]  # other crops: not shared
    g = open_graph(specs, manifest, threads=1)
    apart = open_graph(specs, manifest, threads=1, share_input=False)
    assert [r.share_from for r in g.runs] == [-1, 0, -1, 2, -1]
    assert [r.share_from for r in apart.runs] == [-1] * 5
    frames = frames[:2]
    runner = FrameRunner(g, overlap=True)
    try:
        got = [objs for _, objs, _ in run_all(runner, frames, range(len(frames)))]
    finally:
        runner.close()
    for f, objs in zip(frames, got):
        assert objs == g.detect(f) == apart.detect(f)
        for mine, own in zip(g.runs, apart.runs):  # each stage's last input: shared pixels or its own
            assert np.array_equal(mine.stage.preprocess.buffer(0), own.stage.preprocess.buffer(0)), mine.spec.name
    pre = {r.spec.name: r.stage.preprocess for r in g.runs}
    assert pre["people_sure"].resamples == 0 and pre["people"].resamples > 0
    assert pre["faces_sure"].resamples == 0 and pre["faces"].resamples > 0 and pre["faces_whole"].resamples > 0
    assert all(r.stage.preprocess.resamples > 0 for r in apart.runs)
    invokes = {r.spec.name: r.invokes for r in g.runs}
    assert invokes["faces_sure"] == invokes["faces"] > 0


# Frames on which the default chain's second look at people (people_closer, on the person model
# that the people stage runs too) crops 7, 4, 3, 2, 8, 0, 6 and 0 times: the two stages' input slots
# meet in every order across frames (the people stage always makes 5 units a frame).
SHARED_FRAMES = ("vtest_0300.jpg", "group_street.jpg", "vtest_0000.jpg", "group_building.jpg",
                 "vtest_0700.jpg", "group_leuven.jpg", "vtest_0600.jpg", "basketball1.jpg")


@pytest.fixture(scope="module")
def shared_frames():
    return [load(n) for n in SHARED_FRAMES]


@pytest.fixture(scope="module")
def unshared(manifest, shared_frames):
    """The default chain with one interpreter per stage: each frame's objects, one unit at a time."""
    g = open_graph(DEFAULT_CHAIN, manifest, threads=1, share_models=False)
    assert len(g.models) == len(g.runs) == 4
    return [g.detect(f) for f in shared_frames]


def test_stages_naming_one_model_share_its_interpreter_and_keep_their_own_inputs(manifest):
    opened = []
    g = open_graph(DEFAULT_CHAIN, manifest, open_entry=lambda e: opened.append(e.name) or open_model(e, threads=1))
    assert [r.spec.model for r in g.runs] == ["person", "face_full_range", "face", "person"]
    assert opened == ["person", "face_full_range", "face"]
    people, closer = g.runs[0], g.runs[3]
    assert closer.stage.model is people.stage.model
    assert g.models == [people.stage.model, g.runs[1].stage.model, g.runs[2].stage.model]
    # What a unit is prepared in is each stage's own: input slots, output copies, decoder.
    slots = [r.stage.preprocess.buffer(k) for r in (people, closer) for k in (0, 1)]
    assert not any(np.shares_memory(a, b) for n, a in enumerate(slots) for b in slots[n + 1:])
    assert people.stage.preprocess.buffer(0) is people.stage.model.input_buffer(0)
    assert closer.stage.decoder is not people.stage.decoder


def latest_invokes(graph, frames) -> list:
    """The frames' objects when every unit is invoked only once the next unit has been prepared,
    in order, with overlap's two input slots per stage: the latest a FrameRunner's invoke thread
    may start a unit (one unit is in flight while the vision thread prepares the next; the last
    unit of a frame, while the next frame's first is prepared)."""
    works, pending = [], None

    def run(unit) -> None:
        unit.invoke()
        graph.finish(unit)

    for f in frames:
        fw = graph.start(f)
        works.append(fw)
        for item in graph.units(fw, overlap=True):
            if isinstance(item, Wait):
                assert pending is not None, "a wait with nothing in flight"
                run(pending)
                pending = None
                continue
            if pending is not None:
                run(pending)
            pending = item
    if pending is not None:
        run(pending)
    return [fw.objects for fw in works]


def test_a_shared_interpreter_gives_the_objects_of_one_per_stage_when_invokes_start_late(manifest, shared_frames,
                                                                                          unshared):
    # Deterministic: the schedule in which a stage's input, if it lay in the other stage's buffer,
    # would be overwritten before it was committed (this fails when people_closer fills the
    # person model's own input buffer, as the people stage does).
    g = open_graph(DEFAULT_CHAIN, manifest, threads=1)
    closer = g.runs[3]
    crops = []
    frames = shared_frames * 2  # the second round starts with every slot where the first left it
    got = latest_invokes(g, frames)
    assert got == unshared * 2
    assert sum(len(objs) for objs in unshared) >= 30
    for f, want in zip(shared_frames, unshared):  # one unit at a time, too; the second look ran, not on every frame
        assert g.detect(f) == want
        crops.append(closer.invokes)
    assert crops == [7, 4, 3, 2, 8, 0, 6, 0]


def test_a_shared_interpreter_with_overlap_gives_the_objects_of_one_per_stage(manifest, shared_frames, unshared):
    g = open_graph(DEFAULT_CHAIN, manifest, threads=1)
    assert g.runs[3].stage.model is g.runs[0].stage.model
    runner = FrameRunner(g, overlap=True)
    try:
        frames = shared_frames * 2
        out = run_all(runner, frames, range(len(frames)))
    finally:
        assert runner.close()
    assert [t for t, _, _ in out] == list(range(len(frames)))
    assert [objs for _, objs, _ in out] == unshared * 2


def tpu_face_models(tmp_path: Path, tpu: FakeEdgeTpu) -> Path:
    """The shipped models dir with a fake-compiled Edge TPU twin of the short-range face model."""
    d = tmp_path / "models"
    shutil.copytree(MODELS, d)
    compiled = tpu.compile(d / "face_detection_short_range.tflite", d / "face_edgetpu.tflite")
    digest = hashlib.sha256(compiled.read_bytes()).hexdigest()
    text = (d / "manifest.toml").read_text()
    head = "[models.face]\n"
    assert head in text
    (d / "manifest.toml").write_text(text.replace(head, head + f'edgetpu_file = "{compiled.name}"\n'
                                                  f'edgetpu_sha256 = "{digest}"\n'
                                                  f"edgetpu_size = {compiled.stat().st_size}\n", 1))
    return d


CROPS = [StageSpec("people", "person"), StageSpec("faces_in_people", "face", input="person@people", region="top")]


def test_a_tpu_lost_while_the_second_input_slot_is_in_use_reruns_that_input_on_the_cpu(tmp_path, manifest):
    tpu = FakeEdgeTpu("usb")
    models = load_manifest(tpu_face_models(tmp_path, tpu))
    frame = load("group_leuven.jpg")
    want = open_graph(CROPS, manifest, threads=1).detect(frame)
    g = open_graph(CROPS, models, open_entry=lambda e: open_for_backend(e, "usb", loader=tpu, retry_s=3600,
                                                                        threads=1))
    face = g.runs[1]
    runner = FrameRunner(g, overlap=True)
    try:
        assert [o for _, o, _ in runner.push(frame) + runner.flush()] == [want]
        assert face.stage.model.backend == "edgetpu:usb"
        crops = face.invokes
        assert crops % 2 == 1, crops  # so the next frame's first crop goes to input slot 1
        assert face.slot == 1
        tpu.fail_next = 1  # that invoke fails on the TPU: the crop must be re-run from slot 1
        assert [o for _, o, _ in runner.push(frame) + runner.push(frame) + runner.flush()] == [want, want]
        assert face.stage.model.backend == "cpu" and face.stage.model.fallbacks == 1
    finally:
        runner.close()


def test_an_invoke_error_reaches_the_vision_thread(tmp_path):
    tpu = FakeEdgeTpu("usb")
    models = load_manifest(tpu_face_models(tmp_path, tpu))
    g = open_graph(CROPS, models, open_entry=lambda e: open_for_backend(e, "usb", False, loader=tpu, threads=1))
    dropped = []
    runner = FrameRunner(g, overlap=True, on_drop=dropped.append)
    try:
        tpu.unplug()
        with pytest.raises(TpuError, match="the Edge TPU failed mid-run"):
            runner.push(load("group_leuven.jpg"), "x")
            runner.flush()
        assert runner.pending == 0 and dropped == ["x"]  # forgotten, and its owner told
    finally:
        assert runner.close(timeout=30)


HANG = """
models_dir = "{models}"
[camera]
path = "{images}"
fps = 5
[imu]
enabled = false
[accelerator]
device = "usb"
fake = "hang"
fake_fault_after = 4
retry_s = 3600
invoke_timeout_s = 2
[vision]
threads = 1
[[vision.stages]]
name = "people"
model = "person"
[[vision.stages]]
name = "faces_in_people"
model = "face"
input = "person@people"
region = "top"
"""


def test_a_hang_in_a_later_stage_on_the_invoke_thread_is_caught(tmp_path, broker, daemon_factory):
    # Only the second stage's model is on the (fake) Edge TPU; it hangs on its fifth crop, on the
    # invoke thread. The daemon must see it there, record it and exit for systemd to restart it.
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(SCENES / "group_leuven.jpg", images / "g.jpg")
    models = tpu_face_models(tmp_path, FakeEdgeTpu("usb"))
    cfg = write_config(tmp_path / "edged.toml", broker, extra=HANG.format(models=models, images=images))
    d = daemon_factory(cfg).start()
    assert wait_until(lambda: d.proc.poll() is not None, 120), d.output()
    out = d.output()
    assert d.proc.returncode == 75, out
    assert re.search(r"Edge TPU inference hung; exiting so the service restarts on the CPU.* model=face", out), out
    assert "Traceback" not in out
    assert '"fault": "hang"' in (tmp_path / "state" / "tpu-fault.json").read_text()


def test_a_confirming_stage_with_overlap_gives_the_objects_of_a_plain_run(manifest):
    # The confirming stage waits for every earlier stage (it looks at what the result so far left
    # out): frames where it confirms a person (vtest_0700), looks and confirms none (orange), has
    # nothing to look at (building), back to back so that its units meet the next frame's.
    from edged.config import PEOPLE_CONFIRMED

    g = open_graph(list(DEFAULT_CHAIN) + [PEOPLE_CONFIRMED], manifest, threads=1)
    frames = [load(n) for n in ("vtest_0700.jpg", "orange.jpg", "building.jpg", "vtest_0700.jpg")]
    expected = [g.detect(f) for f in frames]
    assert any(o.stage == "people_confirmed" for o in expected[0])
    runner = FrameRunner(g, overlap=True)
    try:
        got = run_all(runner, frames, range(len(frames)))
    finally:
        assert runner.close()
    assert [objs for _, objs, _ in got] == expected
