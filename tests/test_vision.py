"""The vision stage with the real shipped detectors on the shipped sample images."""

from __future__ import annotations

import dataclasses
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import iou
from edged.models import ModelError, load_manifest, open_model
from edged.records import Frame
from edged.runtime import TensorSpec
from edged.stages.vision import DECODERS, PostprocessDecoder, Preprocessor, VisionStage, nms, nms_few, resize_frame, ssd_anchors
from edged.stages.vision.boxes import logit

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "samples" / "images"
LABELLED = json.loads((REPO / "tests" / "data" / "vision" / "labels.json").read_text())["images"]

# Hand-measured on samples/images/astronaut.jpg (512x512): cheek to cheek, hairline to chin, px.
ASTRONAUT_FACE_PX = (180, 82, 272, 185)


def load(name: str) -> np.ndarray:
    return np.asarray(Image.open(IMAGES / f"{name}.jpg").convert("RGB"))


@pytest.fixture(scope="module")
def manifest():
    return load_manifest(REPO / "models")


@pytest.fixture(scope="module")
def face(manifest):
    entry = manifest["face"]
    return VisionStage(open_model(entry, threads=1), entry)


def test_face_found_where_it_is_on_astronaut(face):
    img = load("astronaut")
    objs = face.detect(img)
    assert len(objs) == 1
    (o,) = objs
    assert o.label == "face"
    assert o.score > 0.8
    h, w = img.shape[:2]
    expected = (ASTRONAUT_FACE_PX[0] / w, ASTRONAUT_FACE_PX[1] / h,
                ASTRONAUT_FACE_PX[2] / w, ASTRONAUT_FACE_PX[3] / h)
    assert iou(o.box, expected) > 0.75, (o.box, expected)


@pytest.mark.parametrize("name", ["coffee", "chelsea", "rocket"])
def test_no_face_on_images_without_people(face, name):
    assert face.detect(load(name)) == ()


def test_boxes_are_normalised_floats(face):
    for name in ("astronaut", "camera"):
        for o in face.detect(load(name)):
            assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in o.box)
            assert o.box[0] < o.box[2] and o.box[1] < o.box[3]
            assert isinstance(o.score, float)


def _box_px(stage, img):
    (o,) = stage.detect(img)
    h, w = img.shape[:2]
    return np.array(o.box) * [w, h, w, h]


def test_box_follows_the_face_into_a_padded_frame(face):
    img = load("astronaut")[:300, 100:400]  # head and shoulders, 300x300
    ref = _box_px(face, img)
    # Placed off-centre on a wider grey canvas: another aspect ratio, so another letterbox.
    canvas = np.full((380, 520, 3), 128, np.uint8)
    top, left = 40, 190
    canvas[top:top + 300, left:left + 300] = img
    moved = _box_px(face, canvas)
    # One model-input pixel is 520/128 ≈ 4 frame pixels here.
    np.testing.assert_allclose(moved, ref + [left, top, left, top], atol=10)
    h, w = canvas.shape[:2]
    (o,) = face.detect(canvas)
    assert o.box[0] > left / w and o.box[2] < (left + 300) / w


def test_box_follows_a_scaled_frame(face):
    img = load("astronaut")
    ref = _box_px(face, img)
    # Uniform scales only: squashing a face changes the box the detector draws around it.
    for size in (320, 800):
        scaled = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))
        got = _box_px(face, scaled)
        np.testing.assert_allclose(got, ref * size / 512, atol=size / 128 * 1.5)


def test_anchor_count_matches_model(face):
    n = face.model.outputs[face.decoder._boxes].shape[1]
    assert n == 896
    assert face.decoder.anchors.shape == (896, 4)
    # BlazeFace: stride 8 → 16x16 cells x 2 anchors, then 8x8 cells x 6; all centres inside.
    a = face.decoder.anchors
    assert np.all((a[:, :2] > 0) & (a[:, :2] < 1))
    np.testing.assert_allclose(a[0, :2], [0.5 / 16, 0.5 / 16])
    np.testing.assert_allclose(a[512, :2], [0.5 / 8, 0.5 / 8])


def test_model_sized_frame_reuses_buffers(face):
    pre = face.preprocess
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (pre.height, pre.width, 3), dtype=np.uint8)
    buf = face.model.input_buffer(0)
    pre(img)
    plan = pre.plan(pre.height, pre.width)
    idx = plan.idx
    tracemalloc.start()
    try:
        pre(img)
        pre(img)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert face.model.input_buffer(0) is buf
    assert pre.plan(pre.height, pre.width) is plan and plan.idx is idx
    # One float32 input is 128*128*3*4 = 196 kB; a per-call copy would show up here.
    assert peak < 16_000, peak
    np.testing.assert_allclose(buf[0], img / 127.5 - 1.0, atol=1e-6)


def test_letterbox_padding_and_placement(face):
    pre = face.preprocess
    img = np.full((64, 128, 3), 255, np.uint8)  # 2:1 → 128x64 region, 32 rows of padding each side
    box = pre(img)
    assert (box.top, box.left, box.height, box.width) == (32, 0, 64, 128)
    buf = face.model.input_buffer(0)[0]
    assert np.all(buf[:32] == -1.0) and np.all(buf[96:] == -1.0)
    assert np.all(buf[32:96] == 1.0)


def test_rejects_non_rgb_input_with_one_line(face):
    with pytest.raises(ValueError, match=r"^vision: expected an RGB uint8 image .*\(100, 100\)"):
        face.detect(np.zeros((100, 100), np.uint8))
    with pytest.raises(ValueError, match="float32"):
        face.detect(np.zeros((100, 100, 3), np.float32))


def test_process_wraps_frame(face):
    det = face.process(Frame(ts=123.5, image=load("astronaut")))
    assert det.ts == 123.5 and len(det.objects) == 1 and det.inference_ms > 0


def test_score_threshold_override(manifest):
    entry = manifest["face"]
    strict = VisionStage(open_model(entry, threads=1), entry, score_threshold=0.99)
    assert strict.detect(load("astronaut")) == ()
    with pytest.raises(ValueError, match="score_threshold"):
        VisionStage(open_model(entry, threads=1), entry, score_threshold=1.5)


def test_unknown_decoder_is_one_clear_line(manifest):
    entry = dataclasses.replace(manifest["face"], decoder="yolo")
    with pytest.raises(ModelError, match=r"manifest\.toml: models\.face\.decoder: unknown decoder 'yolo' \(known: "):
        VisionStage(open_model(entry, threads=1), entry)


def test_wrong_anchor_config_is_caught(manifest):
    entry = manifest["face"]
    params = dict(entry.params, anchors=dict(entry.params["anchors"], strides=[8, 16, 16]))
    bad = dataclasses.replace(entry, params=params)
    with pytest.raises(ModelError, match=r"anchors: generate 768 anchors, the model has 896"):
        VisionStage(open_model(entry, threads=1), bad)


@pytest.mark.parametrize("key,value,message", [
    ("resize", "cubic", r"models\.face\.input\.resize: expected \"nearest\" or \"bilinear\", got 'cubic'"),
    ("range", [0, 1, 2], r"models\.face\.input\.range: expected \[low, high\], got \[0, 1, 2\]"),
    ("letterbox", "yes", r"models\.face\.input\.letterbox: expected true or false, got 'yes'"),
    ("pad", 300, r"models\.face\.input\.pad: expected 0\.\.255, got 300"),
])
def test_bad_input_table_is_one_clear_line(manifest, face, key, value, message):
    entry = dataclasses.replace(manifest["face"], input=dict(manifest["face"].input, **{key: value}))
    with pytest.raises(ModelError, match=message) as info:
        VisionStage(face.model, entry)
    assert "\n" not in str(info.value)


def test_quantised_input_gets_pixels_within_one_code(person):
    pre = person.preprocess
    img = np.arange(300 * 300 * 3, dtype=np.uint32).reshape(300, 300, 3).astype(np.uint8)
    pre(img)
    q = person.model.input_buffer(0)[0].astype(int)
    # Scale 2/255 with zero point 127: pixel p lands half a code from p, so p or p - 1.
    assert np.all((img - q >= 0) & (img - q <= 1))


# --------------------------------------------------------------------------- decoder units

def test_weighted_nms_merges_overlapping_boxes():
    boxes = np.array([[0.0, 0.0, 1.0, 1.0], [0.1, 0.0, 1.1, 1.0], [2, 2, 3, 3]], np.float32)
    scores = np.array([0.9, 0.3, 0.5], np.float32)
    b, s = nms(boxes, scores, 0.3, 10, weighted=True)
    np.testing.assert_allclose(s, [0.9, 0.5])
    np.testing.assert_allclose(b[0], [0.025, 0, 1.025, 1], atol=1e-6)  # 0.9/1.2 of one, 0.3/1.2 of the other
    b, s = nms(boxes, scores, 0.3, 10)
    np.testing.assert_allclose(b[0], boxes[0])
    b, s = nms(boxes, scores, 0.3, 1)
    assert len(s) == 1


@pytest.mark.parametrize("weighted", [False, True])
def test_nms_on_python_floats_matches_nms(weighted):
    rng = np.random.default_rng(7)
    for _ in range(50):
        n = int(rng.integers(2, 40))
        centres = rng.uniform(0, 1, (3, 2))[rng.integers(0, 3, n)] + rng.normal(0, 0.03, (n, 2))
        size = rng.uniform(0.1, 0.3, (n, 2))
        boxes = np.concatenate([centres - size / 2, centres + size / 2], axis=1).astype(np.float32)
        scores = rng.uniform(0.5, 1.0, n).astype(np.float32)
        b, s = nms(boxes, scores, 0.3, 5, weighted=weighted)
        kept = nms_few(list(zip(scores.tolist(), map(tuple, boxes.tolist()))), 0.3, 5, weighted=weighted)
        assert len(kept) == len(s) and len(s) <= 5
        np.testing.assert_allclose([k[0] for k in kept], s, rtol=1e-6)
        np.testing.assert_allclose([k[1] for k in kept], b, atol=1e-5)


def _clustered_candidates(rng, anchors, n_objects: int, per_object: int) -> np.ndarray:
    """Anchor indices in groups that overlap: the anchors nearest a few random points."""
    centre = anchors[:, :2]
    picks = []
    for _ in range(n_objects):
        p = rng.uniform(0.2, 0.8, 2)
        picks += np.argsort(((centre - p) ** 2).sum(axis=1))[:per_object].tolist()
    return np.unique(picks)


def _both_routes(monkeypatch, decoder, outs, threshold):
    """What `decoder` makes of `outs` on the numpy route and on the Python-float route."""
    import edged.stages.vision.boxes

    monkeypatch.setattr(edged.stages.vision.boxes, "FEW", 0)
    on_numpy = decoder.decode(outs, threshold)
    monkeypatch.setattr(edged.stages.vision.boxes, "FEW", 10**6)
    on_python = decoder.decode(outs, threshold)
    return on_numpy, on_python


def _assert_same(a, b) -> None:
    assert a.classes == b.classes
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)
    np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-5)


@pytest.mark.parametrize("n_objects, per_object", [(1, 6), (3, 8), (6, 10)])
def test_blazeface_decodes_the_same_on_both_routes(face, monkeypatch, n_objects, per_object):
    # A few candidates take the Python-float route, many the numpy one (FEW): same detections.
    dec = face.decoder
    rng = np.random.default_rng(n_objects)
    n = len(dec.anchors)
    raw = rng.normal(0, 3, (1, n, 16)).astype(np.float32)
    logits = np.full((1, n, 1), -8.0, np.float32)
    hit = _clustered_candidates(rng, dec.anchors, n_objects, per_object)
    logits[0, hit, 0] = rng.uniform(0.5, 4.0, len(hit))
    outs = [None, None]
    outs[dec._boxes], outs[dec._scores] = raw, logits
    on_numpy, on_python = _both_routes(monkeypatch, dec, outs, 0.5)
    assert len(on_numpy.scores) >= n_objects
    _assert_same(on_numpy, on_python)


@pytest.mark.parametrize("n_objects, per_object", [(1, 5), (4, 12)])
def test_ssd_decodes_the_same_on_both_routes(person, monkeypatch, n_objects, per_object):
    dec = person.decoder
    rng = np.random.default_rng(10 + n_objects)
    a = dec.anchors  # [ycenter, xcenter, h, w]
    n = len(a)
    enc = rng.normal(0, 1, (1, n, 4)).astype(np.float32)
    logits = np.full((1, n, 2), [4.0, -4.0], np.float32)
    hit = _clustered_candidates(rng, a[:, [1, 0, 3, 2]], n_objects, per_object)
    logits[0, hit, 1] = rng.uniform(0.1, 3.0, len(hit))
    outs = [None, None]
    outs[dec._boxes], outs[dec._scores] = enc, logits
    on_numpy, on_python = _both_routes(monkeypatch, dec, outs, 0.5)
    assert len(on_numpy.scores) >= 1 and set(on_numpy.classes) == {0}
    _assert_same(on_numpy, on_python)


@pytest.mark.parametrize("stage", ["face", "person"])
@pytest.mark.parametrize("name", ["astronaut", "camera", "coffee"])
def test_detections_on_photos_are_the_same_on_both_routes(request, monkeypatch, stage, name):
    # The whole stage on real photos, the person model reading its int8 outputs as stored.
    import edged.stages.vision.boxes

    st = request.getfixturevalue(stage)
    img = load(name)
    monkeypatch.setattr(edged.stages.vision.boxes, "FEW", 0)
    on_numpy = st.detect(img)
    monkeypatch.setattr(edged.stages.vision.boxes, "FEW", 10**6)
    on_python = st.detect(img)
    assert [o.label for o in on_python] == [o.label for o in on_numpy]
    np.testing.assert_allclose([o.score for o in on_python], [o.score for o in on_numpy], rtol=1e-6)
    np.testing.assert_allclose([o.box for o in on_python], [o.box for o in on_numpy], atol=1e-5)
    if name == "astronaut":
        assert on_python  # somebody is in view: the routes had something to agree on


@pytest.mark.parametrize("model", ["face", "face_full_range"])
def test_blazeface_float_outputs_read_as_stored_give_exactly_the_dequantised_route(manifest, model):
    # decode_model reads a float model's outputs as stored (an OutputCopy's own buffers, or the
    # interpreter's), not through Model.output's copies: the same detections to the last bit,
    # from the model itself and from a copy taken after the invoke.
    from edged.runtime import OutputCopy

    entry = manifest[model]
    st = VisionStage(open_model(entry, threads=1), entry)
    dec = st.decoder
    assert dec._as_stored
    found = 0
    for name in ("astronaut", "camera", "coffee"):
        st.preprocess(load(name))
        st.model.invoke()
        for threshold in (dec.score_threshold, 0.05):
            reference = dec.decode([st.model.output(i) for i in range(len(st.model.outputs))], threshold)
            copy = OutputCopy(st.model, tuple(dec.reads))
            copy.capture(st.model)
            for source in (st.model, copy):
                got = dec.decode_model(source, threshold)
                assert (got.boxes, got.scores, got.classes) == (reference.boxes, reference.scores, reference.classes)
            found += len(reference.scores)
    assert found >= 2  # the astronaut's face at least, at both thresholds


@pytest.mark.parametrize("model", ["face", "face_full_range"])
def test_blazeface_candidates_found_by_the_library_decode_exactly_as_numpy_finds_them(manifest, model, monkeypatch):
    # From an output copy the compiled scan (edged_float_candidates) finds and gathers the
    # candidates in one call; the detections must be numpy's to the last bit, with faces, without,
    # and with more candidates than it gathers (numpy's route then). Its float32 comparison with
    # the threshold's logit is numpy's: a float32 array against a Python float.
    from edged.runtime import OutputCopy
    from edged.stages.vision import native

    if native.LIB is None:
        pytest.skip("the compiled resampler's library is not built (tests/test_resample.py says why)")
    entry = manifest[model]
    st = VisionStage(open_model(entry, threads=1), entry)
    dec = st.decoder
    assert dec.compiled is not None
    counts = []
    for name in ("astronaut", "camera", "coffee"):
        st.preprocess(load(name))
        st.model.invoke()
        copy = OutputCopy(st.model, tuple(dec.reads))
        copy.capture(st.model)
        for threshold in (dec.score_threshold, 0.2, 0.001):
            monkeypatch.setattr(dec, "compiled", None)
            want = dec.decode_model(copy, threshold)
            monkeypatch.setattr(dec, "compiled", native.LIB)
            got = dec.decode_model(copy, threshold)
            assert (got.boxes, got.scores, got.classes) == (want.boxes, want.scores, want.classes)
            counts.append(int((copy.raw_output(dec._scores) >= np.float32(logit(threshold))).sum()))
    assert min(counts) == 0 and 0 < max(c for c in counts if c <= 32) and max(counts) > 32, counts
    # At the threshold itself: a score equal to the float32 limit counts, the float32 just below
    # does not, and a limit between two float32 values compares as its float32 rounding.
    scores = copy.raw_output(dec._scores)
    scores[...] = -8.0
    scores[0, 5, 0] = 1.5
    scores[0, 6, 0] = np.nextafter(np.float32(1.5), np.float32(-np.inf))
    for z in (1.5, 1.5 + 1e-9):  # logits whose float32 rounding is 1.5
        threshold = 1 / (1 + np.exp(-z))
        monkeypatch.setattr(dec, "compiled", None)
        want = dec.decode_model(copy, threshold)
        monkeypatch.setattr(dec, "compiled", native.LIB)
        got = dec.decode_model(copy, threshold)
        assert len(want.scores) == 1 and (got.boxes, got.scores) == (want.boxes, want.scores)


def test_ssd_int8_outputs_read_as_stored_keep_the_exact_threshold(person, monkeypatch):
    # The stored-code bound is one code below the threshold; the float comparison decides.
    import edged.stages.vision.boxes

    dec = person.decoder
    spec_b, spec_s = dec.outputs[dec._boxes], dec.outputs[dec._scores]
    n = len(dec.anchors)
    bound = dec._raw_bound(0.5)
    scores = np.full((1, n, 2), [127, -128], np.int8)
    scores[0, 100, 1] = bound          # just under the threshold's logit: not a detection
    scores[0, 900, 1] = bound + 20     # well over it
    boxes = np.full((1, n, 4), spec_b.zero_point, np.int8)

    class Stored:  # what decode_model reads of a Model: its outputs as stored
        def raw_output(self, i):
            return (boxes if i == dec._boxes else scores).copy()

    assert (bound - spec_s.zero_point) * spec_s.scale < 0 <= (bound + 20 - spec_s.zero_point) * spec_s.scale
    # The library's candidate scan, then numpy's two routes (few candidates, many).
    for compiled, few in ((dec.compiled, 32), (None, 0), (None, 10**6)):
        monkeypatch.setattr(dec, "compiled", compiled)
        monkeypatch.setattr(edged.stages.vision.boxes, "FEW", few)
        d = dec.decode_model(Stored(), 0.5)
        assert len(d.scores) == 1 and d.scores[0] > 0.5
        yc, xc, h, w = dec.anchors[900]
        np.testing.assert_allclose(d.boxes[0], [xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2], atol=1e-5)


def test_ssd_candidates_found_by_the_library_decode_exactly_as_numpy_finds_them(person, monkeypatch):
    # The compiled scan (edged_ssd_candidates) finds, dequantises and gathers the candidates in one
    # call where numpy takes a dozen; the detections must be the same to the last bit, from the
    # model and from an output copy, with people in view, with nobody, and with more candidates
    # than it gathers (a low threshold: the numpy route takes over).
    from edged.runtime import OutputCopy
    from edged.stages.vision import native

    if native.LIB is None:
        pytest.skip("the compiled resampler's library is not built (tests/test_resample.py says why)")
    dec = person.decoder
    assert dec.compiled is not None and dec._int8
    scene = np.asarray(Image.open(REPO / "tests" / "data" / "vision" / "scenes" / "vtest_0300.jpg").convert("RGB"))
    counts = []
    for image in (scene, load("astronaut"), load("coffee")):
        person.preprocess(image)
        person.model.invoke()
        copy = OutputCopy(person.model, tuple(dec.reads))
        copy.capture(person.model)
        for threshold in (dec.score_threshold, 0.3, 0.02):
            for source in (person.model, copy):
                monkeypatch.setattr(dec, "compiled", None)
                want = dec.decode_model(source, threshold)
                monkeypatch.setattr(dec, "compiled", native.LIB)
                got = dec.decode_model(source, threshold)
                assert (got.boxes, got.scores, got.classes) == (want.boxes, want.scores, want.classes)
            raw = copy.raw_output(dec._scores)[..., dec.background:]
            counts.append(int((raw >= dec._raw_bound(threshold)).sum()))
    assert min(counts) == 0 and 0 < max(c for c in counts if c <= 32) and max(counts) > 32, counts


def test_ssd_anchor_count_for_tf_ssdlite_layout():
    # 300x300 SSD with 6 layers on 19,10,5,3,2,1 maps: 19*19*3 + (100+25+9+4+1)*6 = 1917.
    a = ssd_anchors(input_size=(300, 300), strides=[16, 32, 64, 128, 256, 512], min_scale=0.2,
                    max_scale=0.95, aspect_ratios=[1.0, 2.0, 0.5, 3.0, 1 / 3],
                    reduce_boxes_in_lowest_layer=True,
                    feature_map_sizes=[[19, 19], [10, 10], [5, 5], [3, 3], [2, 2], [1, 1]])
    assert a.shape == (1917, 4)


def _postprocess_decoder(labels, **params):
    specs = [TensorSpec(i, n, s, np.dtype(np.float32), 0.0, 0) for i, (n, s) in enumerate(
        [("boxes", (1, 10, 4)), ("classes", (1, 10)), ("scores", (1, 10)), ("count", (1,))])]
    entry = dataclasses.replace(
        load_manifest(REPO / "models")["face"], name="coco", decoder="tflite_detection_postprocess",
        labels=labels, params={"score_threshold": 0.5, **params})
    return DECODERS["tflite_detection_postprocess"](entry, specs, (300, 300))


def test_postprocess_decoder_reads_coral_layout():
    dec = _postprocess_decoder(["0  person", "1  bicycle", "2  car", "9  traffic light"])
    assert isinstance(dec, PostprocessDecoder)
    boxes = np.zeros((1, 10, 4), np.float32)
    boxes[0, 0] = [0.1, 0.2, 0.5, 0.6]  # ymin, xmin, ymax, xmax
    boxes[0, 1] = [0.0, 0.0, 1.0, 0.5]
    boxes[0, 2] = [0.3, 0.3, 0.4, 0.4]
    boxes[0, 3] = [0.6, 0.6, 0.9, 0.9]
    classes = np.array([[0, 2, 9, 1, 0, 0, 0, 0, 0, 0]], np.float32)
    scores = np.array([[0.9, 0.7, 0.6, 0.4, 0.95, 0, 0, 0, 0, 0]], np.float32)
    count = np.array([4], np.float32)  # row 4 lies beyond count: must be ignored
    d = dec.decode([boxes, classes, scores, count], 0.5)
    np.testing.assert_allclose(d.boxes, [[0.2, 0.1, 0.6, 0.5], [0.0, 0.0, 0.5, 1.0], [0.3, 0.3, 0.4, 0.4]])
    np.testing.assert_allclose(d.scores, [0.9, 0.7, 0.6])
    assert [dec.label(c) for c in d.classes] == ["person", "car", "traffic light"]
    assert len(dec.decode([boxes, classes, scores, count], 0.3).scores) == 4


def test_unused_class_ids_give_no_object():
    # Coral's COCO label file marks unused ids "n/a": such a class is no label, not an object.
    dec = _postprocess_decoder(["0  person", "1  n/a", "2  car"])
    boxes = np.tile(np.array([0.1, 0.1, 0.5, 0.5], np.float32), (1, 10, 1))
    classes = np.array([[1, 2, 0, 0, 0, 0, 0, 0, 0, 0]], np.float32)
    scores = np.array([[0.9, 0.8, 0, 0, 0, 0, 0, 0, 0, 0]], np.float32)
    d = dec.decode([boxes, classes, scores, np.array([2], np.float32)], 0.5)
    assert [dec.label(c) for c in d.classes] == [None, "car"]
    assert "n/a" not in dec.labels.values()


def test_postprocess_decoder_label_offset_for_plain_label_files():
    # Some exports count classes from 1 with "???" for background; others from 0.
    dec = _postprocess_decoder(["???", "person", "bicycle"], label_offset=1)
    assert dec.label(0 + dec.label_offset) == "person"


# --------------------------------------------------------------------------- person detector (ssd)

@pytest.fixture(scope="module")
def person(manifest):
    entry = manifest["person"]
    return VisionStage(open_model(entry, threads=1), entry)


def _score_set(stage, label):
    """(true positives, false positives, false negatives) at IoU >= 0.5 over the labelled set."""
    tp = fp = fn = 0
    for rel, objs in LABELLED.items():
        img = np.asarray(Image.open(REPO / rel).convert("RGB"))
        h, w = img.shape[:2]
        truth = [np.array(o["box"]) / [w, h, w, h] for o in objs if o["label"] == label]
        for d in stage.detect(img):
            assert d.label == label
            best = max(range(len(truth)), key=lambda i: iou(d.box, truth[i]), default=None)
            if best is not None and iou(d.box, truth[best]) >= 0.5:
                tp += 1
                truth.pop(best)
            else:
                fp += 1
        fn += len(truth)
    return tp, fp, fn


def test_person_found_on_astronaut(person):
    img = load("astronaut")
    (o,) = person.detect(img)
    assert o.label == "person" and o.score > 0.8
    truth = np.array(LABELLED["samples/images/astronaut.jpg"][0]["box"]) / 512
    assert iou(o.box, truth) > 0.75


def test_person_precision_recall_on_labelled_set(person):
    # docs/models.md reports 7 of 7 found, no false positive; the pair image's smaller person
    # scores right at the threshold, so allow one miss here.
    tp, fp, fn = _score_set(person, "person")
    assert tp + fn == 7
    assert fp == 0 and tp >= 6, (tp, fp, fn)


def test_face_precision_recall_on_labelled_set(face):
    # Faces under ~15 model pixels (pair.jpg's astronaut, the cameraman pasted small) are out of
    # the short-range model's reach; the rest must be found.
    tp, fp, fn = _score_set(face, "face")
    assert tp + fn == 7
    assert tp >= 5 and fp <= 1, (tp, fp, fn)


def test_person_anchor_table_matches_generator(person):
    # The table was evaluated from the TF graph; the generic SSD generator must reproduce it.
    gen = ssd_anchors(input_size=(300, 300), strides=[16, 32, 64, 128, 256, 512], min_scale=0.2,
                      max_scale=0.95, aspect_ratios=[1.0, 2.0, 0.5, 3.0, 1 / 3],
                      reduce_boxes_in_lowest_layer=True,
                      feature_map_sizes=[[19, 19], [10, 10], [5, 5], [3, 3], [2, 2], [1, 1]])
    np.testing.assert_allclose(gen[:, [1, 0, 3, 2]], person.decoder.anchors, atol=1e-4)


def test_person_model_is_full_int8(person):
    assert person.model.inputs[0].dtype == np.uint8 and person.model.inputs[0].quantized
    assert all(t.dtype == np.int8 and t.quantized for t in person.model.outputs)


def test_ssd_decoder_on_synthetic_heads(person):
    dec = person.decoder
    a = dec.anchors  # rows [ycenter, xcenter, h, w]
    n = len(a)
    enc = np.zeros((1, n, 4), np.float32)
    logits = np.full((1, n, 2), [4.0, -4.0], np.float32)  # background everywhere ...
    k, j, far = 400, 401, 1500
    logits[0, k] = [-3.0, 3.0]  # ... a confident person on anchor k with zero offsets,
    logits[0, j] = [-2.0, 2.0]  # a weaker one on anchor j encoded to decode onto k's box,
    logits[0, far] = [-1.0, 1.0]  # and one far away.
    enc[0, j] = [10 * (a[k, 0] - a[j, 0]) / a[j, 2], 10 * (a[k, 1] - a[j, 1]) / a[j, 3],
                 5 * np.log(a[k, 2] / a[j, 2]), 5 * np.log(a[k, 3] / a[j, 3])]
    outs = [None, None]
    outs[dec._boxes], outs[dec._scores] = enc, logits
    d = dec.decode(outs, 0.5)
    yc, xc, h, w = a[k]
    assert len(d.scores) == 2  # j suppressed by k (IoU 1), far kept
    np.testing.assert_allclose(d.boxes[0], [xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2], atol=1e-5)
    np.testing.assert_allclose(d.scores, 1 / (1 + np.exp([-3.0, -1.0])), rtol=1e-6)
    assert [dec.label(c) for c in d.classes] == ["person", "person"]
    assert len(dec.decode(outs, 0.96).scores) == 0


def test_bilinear_resize_matches_pillow_when_upscaling():
    # Upscaling is where Pillow's BILINEAR is the plain half-pixel-centre bilinear filter.
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    ours = resize_frame(img, 25, 31, bilinear=True).astype(int)
    ref = np.asarray(Image.fromarray(img).resize((31, 25), Image.BILINEAR)).astype(int)
    assert np.abs(ours - ref).max() <= 1


def test_crops_of_ever_changing_sizes_share_the_stages_buffers(face):
    # Person crops come in a new size every frame: each size's plan draws on the stage's one set of
    # work buffers, which grow to the largest size asked for and no further (a buffer set per size
    # once held about 0.5 MB for every crop size ever seen).
    pre = face.preprocess
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    pre(img[:239, :239])  # the largest crop here: every resampling buffer at its largest
    pre(img[:16, :239])  # and the widest letterbox padding bands (painted through the table's row)
    grown = pre._work.nbytes
    for h, w in rng.integers(16, 240, (60, 2)):  # 60 other sizes: nothing more is kept
        want = resize_frame(img[:h, :w], pre.height, pre.width, letterbox=True, bilinear=True)
        box = pre(img[:h, :w])
        got = pre.buffer(0)[0, box.top:box.top + box.height, box.left:box.left + box.width]
        assert np.allclose(got, want / 127.5 - 1.0, atol=1e-6)
    assert pre._work.nbytes == grown
    assert len(pre._plans) <= pre.MAX_PLANS


def test_bilinear_plan_reuses_its_buffers(person):
    pre = person.preprocess
    img = load("coffee")  # 600x400, resampled to 300x300
    pre(img)
    plan = pre.plan(*img.shape[:2])
    tracemalloc.start()
    try:
        pre(img)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert pre.plan(*img.shape[:2]) is plan
    # A float32 300x300x3 scratch array would be 1 MB.
    assert peak < 16_000, peak


def _float_bilinear(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """The resampler edged used before its fixed-point one, restated with plain indexing: half-pixel
    centres clamped to the image, float32 blends along the rows then down the columns, rounded
    half to even. The fixed-point resampler must stay within one level of it."""
    def taps(src, dst):
        pos = np.clip((np.arange(dst) + 0.5) * (src / dst) - 0.5, 0.0, src - 1)
        i0 = np.floor(pos).astype(np.intp)
        return i0, np.minimum(i0 + 1, src - 1), (pos - i0).astype(np.float32)

    y0, y1, wy = taps(img.shape[0], out_h)
    x0, x1, wx = taps(img.shape[1], out_w)
    f = img.astype(np.float32)
    wx = wx[None, :, None]
    top = f[y0][:, x0] + (f[y0][:, x1] - f[y0][:, x0]) * wx
    bottom = f[y1][:, x0] + (f[y1][:, x1] - f[y1][:, x0]) * wx
    return np.rint(top + (bottom - top) * wy[:, None, None]).astype(np.uint8)


@pytest.mark.parametrize("resampler", ["numpy", "compiled"])
def test_fixed_point_bilinear_is_within_one_level_of_the_float_blend(resampler):
    # 300 random frame and model sizes, both ways (down and up), stretched and letterboxed: no
    # channel of any pixel differs from the float resampler by more than 1, most not at all. The
    # frames are regions of a larger array, read in place as the tiles and crops of a chain are.
    # Both resamplers (tests/test_resample.py checks they give the same bytes).
    rng = np.random.default_rng(14)
    differing = total = 0
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 700, 2))
        mh, mw = (int(v) for v in rng.integers(1, 320, 2))
        letterbox = bool(rng.integers(0, 2))
        ox, oy = (int(v) for v in rng.integers(0, 9, 2))
        frame = rng.integers(0, 256, (h + oy + 3, w + ox + 5, 3), dtype=np.uint8)
        region = frame[oy:oy + h, ox:ox + w]
        got = resize_frame(region, mh, mw, letterbox=letterbox, bilinear=True, resampler=resampler)
        want = _float_bilinear(region, *got.shape[:2])
        diff = np.abs(got.astype(int) - want)
        assert diff.max() <= 1, (h, w, mh, mw, letterbox)
        differing += int(np.count_nonzero(diff))
        total += diff.size
    assert differing < 0.1 * total


@pytest.mark.parametrize("resampler", ["numpy", "compiled"])
def test_a_region_is_resampled_in_place_of_its_frame(person, resampler):
    # A tile (or crop) of the frame: its rows are read from the frame itself, with the same pixels
    # as a copy of the region would give, and no copy of it is made.
    pre = Preprocessor(person.model, person.entry, resampler=resampler)
    img = load("coffee")  # 600x400
    x, y, w, h = 161, 37, 329, 247
    region = img[y:y + h, x:x + w]
    box, got = pre.fill(region, base=img, at=(x, y))
    assert np.array_equal(got, resize_frame(np.ascontiguousarray(region), pre.height, pre.width, bilinear=True))
    pre.fill(region, base=img, at=(x, y))
    tracemalloc.start()
    try:
        pre.fill(region, base=img, at=(x, y))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16_000, peak  # a copy of the region would be 244 kB


def test_nearest_resampling_picks_the_nearest_source_pixel():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    got = resize_frame(img, 20, 90)
    rows = np.minimum(((np.arange(20) + 0.5) * (37 / 20)).astype(int), 36)
    cols = np.minimum(((np.arange(90) + 0.5) * (53 / 90)).astype(int), 52)
    assert np.array_equal(got, img[rows][:, cols])


@pytest.mark.parametrize("resampler", ["numpy", "compiled"])
def test_plans_sharing_work_buffers_in_turn_resample_as_alone(resampler):
    # A person stage resamples the frame, then its tiles, then the next frame: plans of different
    # sizes take turns in one set of work buffers, the weight tables included (spread there from
    # one weight per row and column when a plan uses them). Each gives what it gives alone, and
    # keeps no full-size table of its own (one was 2.5 MB for a 768x576 frame at 300x300).
    from edged.stages.vision.preprocess import Scratch, _Plan

    rng = np.random.default_rng(4)
    frame = rng.integers(0, 256, (576, 768, 3), dtype=np.uint8)
    shared = Scratch()
    views = [((0, 0, 768, 576), False), ((329, 247, 768, 576), False), ((100, 50, 260, 300), True)]

    def plan(region, letterbox, scratch=None):
        x0, y0, x1, y1 = region
        size = 128 if letterbox else 300
        return _Plan(y1 - y0, x1 - x0, size, size, letterbox, True, np.dtype(np.uint8), gather=False,
                     scratch=scratch, resampler=resampler)

    plans = [plan(r, lb, shared) for r, lb in views]
    alone = [plan(r, lb).resample(np.ascontiguousarray(frame[r[1]:r[3], r[0]:r[2]])).copy() for r, lb in views]
    for _ in range(2):
        for p, ((x0, y0, x1, y1), _), want in zip(plans, views, alone):
            assert np.array_equal(p.resample(frame[y0:y1, x0:x1], frame, (x0, y0)), want)
    for p in plans:
        own = sum(v.nbytes for v in vars(p).values() if isinstance(v, np.ndarray))
        assert own < 64_000, own


@pytest.mark.parametrize("threads", [1, 2])
def test_the_shipped_full_range_model_gives_the_outputs_of_mediapipes_bit_for_bit(threads):
    """models/face_detection_full_range_f32.tflite is MediaPipe's float16, partly sparse model
    with the unpacked float32 weights stored (scripts/convert_face_full_range.py): no unpacking
    operators left, and every output the same bits as the original's, fed as edged feeds it."""
    from edged.runtime import Model

    entry = load_manifest()["face_full_range"]
    shipped = Model(entry.path, threads=threads)
    original = Model(REPO / "tests" / "data" / "vision" / "face_detection_full_range_sparse.tflite", threads=threads)
    kinds = {op["op_name"] for op in shipped._interp._get_ops_details()}
    assert "CONV_2D" in kinds and not kinds & {"DEQUANTIZE", "DENSIFY"}
    assert {"DEQUANTIZE", "DENSIFY"} <= {op["op_name"] for op in original._interp._get_ops_details()}
    stage_new, stage_old = VisionStage(shipped, entry), VisionStage(original, entry)
    photos = sorted((REPO / "samples" / "images").glob("*.jpg")) + sorted((REPO / "tests" / "data" / "vision").glob("*.jpg"))
    found = 0
    for p in photos:
        image = np.asarray(Image.open(p).convert("RGB"))
        a, b = stage_new.detect(image), stage_old.detect(image)
        for i in range(len(shipped.outputs)):
            np.testing.assert_array_equal(shipped.raw_output(i), original.raw_output(i))
        assert a == b
        found += len(a)
    assert found > 0  # the photos have faces in them
