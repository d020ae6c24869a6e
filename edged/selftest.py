"""Golden self-test vectors: a few real model inputs with the outputs the cloud measured for them.

A release carries them beside its model (`edged release add` measures them); before a device
puts a downloaded model into service it runs the same inputs through it and refuses the model
when an output differs from the measured one by more than the release's tolerance. This catches
what a signature cannot: a model that is authentic but does not work on this device's runtime
(a different TFLite build, an Edge TPU compilation that went wrong, a converter bug).

The file is a `.npz` (read with `allow_pickle=False`): `in_K` is input K as the model takes it
(its own dtype, already quantised), `out_K_I` is output I for it as float32 (dequantised),
`meta` a JSON string with the tolerance and the tensor names.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_TOLERANCE = 0.05  # of each output's measured range (max - min), per element


class SelfTestError(Exception):
    """A golden file that cannot be read, or a model that does not reproduce it (one line)."""


@dataclass
class Golden:
    inputs: list[np.ndarray]
    outputs: list[list[np.ndarray]]  # per input, per output tensor
    tolerance: float = DEFAULT_TOLERANCE
    output_names: tuple[str, ...] = ()

    def to_bytes(self) -> bytes:
        arrays = {f"in_{k}": x for k, x in enumerate(self.inputs)}
        for k, outs in enumerate(self.outputs):
            arrays.update({f"out_{k}_{i}": np.asarray(y, np.float32) for i, y in enumerate(outs)})
        meta = {"v": 1, "tolerance": self.tolerance, "vectors": len(self.inputs),
                "outputs": list(self.output_names)}
        buf = io.BytesIO()
        np.savez_compressed(buf, meta=np.array(json.dumps(meta)), **arrays)
        return buf.getvalue()

    @classmethod
    def load(cls, path: Path) -> "Golden":
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                n = int(meta["vectors"])
                inputs = [z[f"in_{k}"] for k in range(n)]
                outputs = []
                for k in range(n):
                    outs, i = [], 0
                    while f"out_{k}_{i}" in z:
                        outs.append(z[f"out_{k}_{i}"])
                        i += 1
                    outputs.append(outs)
                return cls(inputs, outputs, float(meta["tolerance"]), tuple(meta.get("outputs", ())))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SelfTestError(f"{path}: not a self-test file edged can read ({exc})") from None


def measure(model, inputs: list[np.ndarray], tolerance: float = DEFAULT_TOLERANCE) -> Golden:
    """Run `inputs` (each as the model's input 0 takes it) through `model` and record the outputs."""
    outputs = []
    for x in inputs:
        model.set_input(0, x)
        model.invoke()
        outputs.append([model.output(i).copy() for i in range(len(model.outputs))])
    return Golden([np.array(x) for x in inputs], outputs, tolerance,
                  tuple(t.name for t in model.outputs))


def check(model, golden: Golden) -> None:
    """Raise SelfTestError unless `model` reproduces every golden output within the tolerance."""
    if not golden.inputs:
        raise SelfTestError("the release has no self-test vectors")
    spec = model.inputs[0]
    for k, (x, want) in enumerate(zip(golden.inputs, golden.outputs)):
        if tuple(x.shape) != tuple(spec.shape) or x.dtype != spec.dtype:
            raise SelfTestError(f"self-test input {k} is {x.dtype}{list(x.shape)}, the model takes "
                                f"{spec.dtype}{list(spec.shape)}")
        if len(want) != len(model.outputs):
            raise SelfTestError(f"the model has {len(model.outputs)} outputs, the self-test {len(want)}")
        model.set_input(0, x)
        model.invoke()
        for i, w in enumerate(want):
            got = model.output(i)
            if got.shape != w.shape:
                raise SelfTestError(f"output {i} has shape {list(got.shape)}, the self-test {list(w.shape)}")
            span = float(w.max() - w.min()) if w.size else 0.0
            allowed = golden.tolerance * max(span, 1e-6)
            worst = float(np.max(np.abs(got - w))) if w.size else 0.0
            if not worst <= allowed:  # also refuses NaN
                name = golden.output_names[i] if i < len(golden.output_names) else str(i)
                raise SelfTestError(f"output {name!r} of self-test vector {k} differs by {worst:.4g} "
                                    f"(allowed {allowed:.4g}, {golden.tolerance:g} of its range)")

