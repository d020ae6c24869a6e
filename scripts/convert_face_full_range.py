#!/usr/bin/env python3
"""Store the full-range BlazeFace model's weights as dense float32: one copy of them in memory.

MediaPipe's `face_detection_full_range_sparse.tflite` keeps its convolution weights as float16,
46 of them also sparse, and unpacks them in the graph (46 DENSIFY and 182 DEQUANTIZE operators).
LiteRT's XNNPack delegate runs those operators once when it is built and keeps their float32
results for its lifetime beside the weights it packs from them: 1.6 MB more resident than the
same graph with the float32 weights stored (docs/benchmarks.md, section 3).

What this script changes: every DEQUANTIZE whose input is a constant, or the DENSIFY of a
constant, becomes the constant it computes (its output tensor gets the float32 values as its
buffer), and those operators are removed. Every float16 value is a float32 one, and densifying
only places values, so the weights the convolutions see are the same numbers: the outputs are
bit for bit those of the original (checked here on the repository's photos, and by
tests/test_vision.py). Nothing else is touched.

Writes models/face_detection_full_range_f32.tflite and prints its manifest values. The
conversion is deterministic: a re-run reproduces the manifest's sha256.

Run with the training environment (TensorFlow's flatbuffer tools live only there):
    /tmp/trainenv/bin/python scripts/convert_face_full_range.py
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "tests" / "data" / "vision" / "face_detection_full_range_sparse.tflite"  # as MediaPipe ships it
TARGET = REPO / "models" / "face_detection_full_range_f32.tflite"


def constant_values(tf, path: Path) -> dict[int, np.ndarray]:
    """Every tensor's value after one invoke without delegates (the unpacked weights among them)."""
    interp = tf.lite.Interpreter(
        model_path=str(path), experimental_preserve_all_tensors=True,
        experimental_op_resolver_type=tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interp.allocate_tensors()
    spec = interp.get_input_details()[0]
    interp.set_tensor(spec["index"], np.zeros(spec["shape"], spec["dtype"]))
    interp.invoke()
    return {d["index"]: interp.get_tensor(d["index"]) for d in interp.get_tensor_details()
            if d["dtype"] == np.float32}


def fold_unpacking(tf, source: Path) -> tuple[bytes, int, int]:
    """The model with its constant DEQUANTIZE / DENSIFY chains folded into float32 constants:
    (flatbuffer, constants made, operators removed)."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(source))
    if len(model.subgraphs) != 1:
        raise SystemExit(f"{source}: expected one subgraph, found {len(model.subgraphs)}")
    graph = model.subgraphs[0]
    values = constant_values(tf, source)
    ops = schema.BuiltinOperator

    def kind(op) -> int:
        code = model.operatorCodes[op.opcodeIndex]
        return max(code.builtinCode, code.deprecatedBuiltinCode)

    def constant(t: int) -> bool:
        data = model.buffers[graph.tensors[t].buffer].data
        return data is not None and len(data) > 0

    made_by = {t: i for i, op in enumerate(graph.operators) for t in op.outputs}
    removed: set[int] = set()
    made = 0
    for i, op in enumerate(graph.operators):
        if kind(op) != ops.DEQUANTIZE:
            continue
        chain, src = [i], op.inputs[0]
        if not constant(src):
            j = made_by.get(src)
            if j is None or kind(graph.operators[j]) != ops.DENSIFY or not constant(graph.operators[j].inputs[0]):
                continue  # a dequantize of a computed tensor stays
            chain.append(j)
        out = op.outputs[0]
        value = values[out]
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(np.ascontiguousarray(value).tobytes(), np.uint8).copy()
        model.buffers.append(buffer)
        graph.tensors[out].buffer = len(model.buffers) - 1
        removed.update(chain)
        made += 1
    graph.operators = [op for i, op in enumerate(graph.operators) if i not in removed]
    used = set(graph.inputs) | set(graph.outputs)
    for op in graph.operators:
        used.update(t for t in op.inputs if t >= 0)
        used.update(op.outputs)
    for t, tensor in enumerate(graph.tensors):
        if t not in used and tensor.buffer:
            model.buffers[tensor.buffer].data = None  # the float16 / sparse originals
    builder_out = flatbuffer_utils.convert_object_to_bytearray(model)
    return bytes(builder_out), made, len(removed)


def agreement(tf, a: Path, b: Path) -> tuple[int, int]:
    """(photos on which every output of `a` and `b` is bit-identical, photos tried), on the
    repository's photos letterboxed to the input the way edged feeds it (scaled to −1…1)."""
    from PIL import Image

    photos = sorted((REPO / "samples" / "images").glob("*.jpg")) + sorted((REPO / "tests" / "data" / "vision").rglob("*.jpg"))
    interps = []
    for path in (a, b):
        it = tf.lite.Interpreter(model_path=str(path), num_threads=1)
        it.allocate_tensors()
        interps.append(it)
    spec = interps[0].get_input_details()[0]
    h, w = spec["shape"][1:3]
    same = 0
    for p in photos:
        img = np.asarray(Image.open(p).convert("RGB").resize((w, h)), np.float32) / 127.5 - 1.0
        outs = []
        for it in interps:
            it.set_tensor(it.get_input_details()[0]["index"], img[None])
            it.invoke()
            outs.append([it.get_tensor(d["index"]).copy() for d in it.get_output_details()])
        same += all(np.array_equal(x, y) for x, y in zip(*outs))
    return same, len(photos)


def main() -> int:
    import tensorflow as tf

    data, made, removed = fold_unpacking(tf, SOURCE)
    TARGET.write_bytes(data)
    same, tried = agreement(tf, SOURCE, TARGET)
    print(f"{TARGET.name}: {made} float32 constants made, {removed} operators removed; "
          f"outputs bit-identical to {SOURCE.name} on {same} of {tried} photos")
    print(f'file = "{TARGET.name}"\nsha256 = "{hashlib.sha256(data).hexdigest()}"\nsize = {len(data)}')
    return 0 if same == tried else 1


if __name__ == "__main__":
    sys.exit(main())
