"""A fake Coral Edge TPU, seen the way edged sees the real one: through the delegate loader.

`FakeEdgeTpu` is a drop-in for the `loader` of `edged.tpu.open_for_backend` (a `Runtime`-like
object: `load_delegate`, `interpreter_cls`, `name`, `version`). It behaves like libedgetpu and
the device behind it:

- `load_delegate("libedgetpu.so.1", {"device": ...})` raises OSError when the library is "not
  installed" (what ctypes raises), ValueError("Failed to load delegate from ...") when no TPU of
  that kind is plugged in, and otherwise returns a delegate bound to the device;
- a model run with that delegate executes on the "TPU": the compiled model's single
  `edgetpu-custom-op` is emulated by running, with the real TFLite interpreter, the CPU model it
  was compiled from (`compile()` records which); its tensors are the source model's, as with
  edgetpu_compiler;
- `unplug()` makes every invoke through an existing delegate raise RuntimeError (as a USB reset
  does) and new delegate loads fail until `plug()`; a delegate from before the unplug stays dead;
- `fault="abort"` / `fault="hang"`: after `fault_after` inferences the next one does what
  libedgetpu really does on a USB fault instead of raising: it logs its fatal line and aborts the
  whole process (SIGABRT; google-coral/edgetpu#476, #494), or blocks in invoke() for ever (#94).

A compiled model carries its source model's sha256 (in the custom op's options), so a fake TPU
in another process (the daemon under test) finds the source model beside the compiled one.

`compile(src, dst)` writes a real .tflite flatbuffer shaped like edgetpu_compiler's output: the
source's tensors and buffers, one CUSTOM operator `edgetpu-custom-op` in place of all layers.
The real runtime refuses to run it without the delegate ("unresolved custom op"), exactly like a
real compiled model. It needs ai_edge_litert's flatbuffer schema module.

Not emulated: TPU timing, the on-chip parameter cache, several TPUs of one kind.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from edged.runtime import EDGETPU_OP, custom_ops, runtime


class FakeDelegate:
    """What load_delegate returns: bound to one plug-in of the device."""

    def __init__(self, tpu: "FakeEdgeTpu", options: dict) -> None:
        self.tpu = tpu
        self.options = dict(options)
        self.generation = tpu.generation

    @property
    def alive(self) -> bool:
        return self.tpu.present and self.generation == self.tpu.generation


class FakeEdgeTpu:
    """One fake Edge TPU of `kind` "usb" or "pci" and its runtime library."""

    name = "fake-edgetpu"
    version = "16.0-fake"

    def __init__(self, kind: str = "usb", *, library: bool = True, present: bool = True,
                 fault: str | None = None, fault_after: int = 0) -> None:
        if kind not in ("usb", "pci"):
            raise ValueError(f"kind must be usb or pci, got {kind!r}")
        if fault not in (None, "abort", "hang"):
            raise ValueError(f"fault must be abort or hang, got {fault!r}")
        self.fault = fault
        self.fault_after = fault_after
        self.kind = kind
        self.library = library
        self.present = present
        self.generation = 0          # bumped by every unplug: old delegates stay dead
        self.invokes = 0             # inferences that ran on the "TPU"
        self.loads = 0               # delegates handed out
        self.fail_next = 0           # make the next N TPU invokes raise, device still present
        self._compiled: dict[str, Path] = {}
        self._lock = threading.Lock()
        self.interpreter_cls = self._interpreter_class()

    # -- what a test does to the device ---------------------------------------------------------
    def unplug(self) -> None:
        with self._lock:
            self.present = False
            self.generation += 1

    def plug(self) -> None:
        with self._lock:
            self.present = True

    def compile(self, src: str | Path, dst: str | Path) -> Path:
        """Write a compiled-looking model of `src` to `dst`; this TPU will run it as `src`."""
        import flatbuffers
        from ai_edge_litert import schema_py_generated as schema

        src, dst = Path(src), Path(dst)
        data = src.read_bytes()
        model = schema.ModelT.InitFromPackedBuf(data, 0)
        if len(model.subgraphs) != 1:
            raise ValueError(f"{src}: fake compile handles one subgraph, found {len(model.subgraphs)}")
        graph = model.subgraphs[0]
        code = schema.OperatorCodeT()
        code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
        code.customCode = EDGETPU_OP
        code.version = 1
        op = schema.OperatorT()
        op.opcodeIndex = 0
        op.inputs = list(graph.inputs)
        op.outputs = list(graph.outputs)
        op.customOptions = list(b"fake-edgetpu " + hashlib.sha256(data).hexdigest().encode())
        model.operatorCodes = [code]
        graph.operators = [op]
        builder = flatbuffers.Builder(len(data) + 1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        out = bytes(builder.Output())
        dst.write_bytes(out)
        self._compiled[hashlib.sha256(out).hexdigest()] = src
        return dst

    def _fault_now(self) -> None:
        """What libedgetpu does on a USB fault: abort the process, or never return."""
        import os
        import sys

        if self.fault == "abort":
            sys.stderr.write("F driver/usb/usb_driver.cc:1012] transfer on tag 2 failed. Abort. "
                             "(fake Edge TPU)\n")
            sys.stderr.flush()
            os.abort()
        threading.Event().wait()  # "hang": blocked in the driver for good

    # -- what edged calls (the loader interface) ------------------------------------------------
    def load_delegate(self, library: str, options: dict | None = None) -> FakeDelegate:
        options = dict(options or {})
        if not self.library:
            raise OSError(f"{library}: cannot open shared object file: No such file or directory")
        device = str(options.get("device", ""))
        kind, _, index = device.partition(":")
        wanted = (kind in ("", self.kind)) and index in ("", "0")
        with self._lock:
            if not (self.present and wanted):
                raise ValueError(f"Failed to load delegate from {library}\n")
            self.loads += 1
            return FakeDelegate(self, options)

    def _interpreter_class(self):
        tpu = self

        class FakeTpuInterpreter:
            """The runtime's interpreter, with the Edge TPU custom op emulated."""

            def __init__(self, model_path: str, num_threads: int | None = None,
                         experimental_delegates: list | None = None) -> None:
                real = runtime().interpreter_cls
                self._delegate = next((d for d in experimental_delegates or []
                                       if isinstance(d, FakeDelegate)), None)
                path = Path(model_path)
                if self._delegate is not None and not self._delegate.alive:
                    raise RuntimeError("Failed to prepare for TPU: the Edge TPU is gone")
                if self._delegate is not None and EDGETPU_OP in custom_ops(path):
                    data = path.read_bytes()
                    source = tpu._compiled.get(hashlib.sha256(data).hexdigest()) or _source_beside(path, data)
                    if source is None:
                        raise ValueError(f"{path}: not compiled for this Edge TPU")
                    path = source
                self._interp = real(model_path=str(path), num_threads=num_threads)

            def allocate_tensors(self):
                return self._interp.allocate_tensors()

            def get_input_details(self):
                return self._interp.get_input_details()

            def get_output_details(self):
                return self._interp.get_output_details()

            def set_tensor(self, index, value):
                return self._interp.set_tensor(index, value)

            def get_tensor(self, index):
                return self._interp.get_tensor(index)

            def tensor(self, index):
                return self._interp.tensor(index)

            def invoke(self):
                d = self._delegate
                if d is not None:
                    with tpu._lock:
                        failing = tpu.fail_next > 0
                        if failing:
                            tpu.fail_next -= 1
                        if not d.alive or failing:
                            raise RuntimeError("Failed to execute request: USB transfer error 2 "
                                               f"[LibUsbDataOutCallback]; Node number 0 ({EDGETPU_OP}) "
                                               "failed to invoke.")
                        faulting = tpu.fault is not None and tpu.invokes >= tpu.fault_after
                        if not faulting:
                            tpu.invokes += 1
                    if faulting:
                        tpu._fault_now()
                return self._interp.invoke()

        return FakeTpuInterpreter


def _source_beside(path: Path, compiled: bytes) -> Path | None:
    """The model `compiled` was made from, found in the compiled model's directory by the sha256
    `compile()` wrote into the custom op's options; None when it is not there."""
    marker = b"fake-edgetpu "
    at = compiled.find(marker)
    if at < 0:
        return None
    digest = compiled[at + len(marker):at + len(marker) + 64].decode("ascii", "replace")
    for candidate in sorted(path.parent.glob("*.tflite")):
        if candidate != path and hashlib.sha256(candidate.read_bytes()).hexdigest() == digest:
            return candidate
    return None
