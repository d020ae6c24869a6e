"""Edge TPU support: loading the Coral delegate, choosing the compiled or the CPU model, falling back.

A stage asks `open_for_backend(entry, accelerator)` for its model instead of `Model(...)`. With
`accelerator = "cpu"` that is the manifest's `file` on the CPU. Otherwise, and when the manifest
gives the model an `edgetpu_file`, edged loads libedgetpu the way Coral documents it for TFLite
(`load_delegate("libedgetpu.so.1", {"device": ":0" | "usb" | "usb:0" | "pci" | "pci:0"})`, as
pycoral spells them; no options for "auto") through the process's own TFLite runtime, and runs the compiled model with it.

What happens when the TPU is not there:
- configured but absent, or the delegate does not load: one log line saying which (library not
  installed, or no device answering) and how to fix it; then the CPU model (or, with
  `fallback = false`, a `TpuError` that stops the daemon);
- lost mid-run (a USB reset makes `invoke()` raise): one log line, the same input is run again on
  the CPU model so no frame is lost, and the stats show the fallback;
- in both cases the TPU is tried again every `retry_s` seconds, from inside `invoke()` (the stage's
  own thread, since an interpreter is not thread-safe); when it answers, inference moves back.

A compiled model cannot run on the CPU (its layers live inside one `edgetpu-custom-op`), so the
fallback model is the manifest's `file`, which must have the same input and output tensors (it is
the int8 model that was compiled). `edged.runtime.Model` refuses a compiled model without a
delegate with a message that says so.

pycoral is used only to list Edge TPUs when it is importable; it is never needed (it has no build
for Raspberry Pi OS bookworm's Python 3.11).
"""

from __future__ import annotations

import ctypes
import dataclasses
import glob
import logging
import os
import re
import time
from pathlib import Path
from typing import Callable

import numpy as np

from edged.service.log import Once, fields
from edged.models import ModelEntry, ModelError, verify
from edged.runtime import EDGETPU_OP, Model, Runtime, RuntimeUnavailable, custom_ops, runtime

log = logging.getLogger("edged.tpu")

EDGETPU_LIBRARY = "libedgetpu.so.1"
# USB ids of the Coral USB Accelerator: it enumerates as Global Unichip until libedgetpu has
# loaded its firmware, then as Google.
USB_IDS = {("1a6e", "089a"): "Coral USB Accelerator (firmware not loaded yet)",
           ("18d1", "9302"): "Coral USB Accelerator"}
# pycoral's spelling of a device (make_interpreter's `device`, passed on to libedgetpu as is):
# ":N" the Nth Edge TPU of any kind, "usb" / "pci" the first of that kind, "usb:N" / "pci:N" the Nth.
ACCELERATOR_RE = re.compile(r"^(cpu|auto|(usb|pci)(:\d{1,2})?|:\d{1,2})$")

INSTALL_LIBEDGETPU = ("install the Edge TPU runtime from Coral's apt repository: "
                      "sudo apt install libedgetpu1-std (see docs/hardware.md)")
FIX_USB = ("plug the Coral USB Accelerator into a USB 3 port (lsusb lists 1a6e:089a or 18d1:9302); "
           "the user running edged needs the plugdev group (the udev rule from libedgetpu1-std)")
FIX_PCI = ("check that the PCIe/M.2 Coral has its driver (sudo apt install gasket-dkms; /dev/apex_0 "
           "must exist) and that the user running edged is in the apex group")


class TpuError(RuntimeUnavailable):
    """The Edge TPU is required (`accelerator.fallback = false`) but cannot be used."""


class AbiMismatch(RuntimeError):
    """libedgetpu and the interpreter were built against different TF Lite versions."""


class _Unavailable(Exception):
    """The TPU cannot be used right now; `kind` is library | device | model."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def delegate_options(accelerator: str) -> dict[str, str]:
    """libedgetpu's options for an `accelerator.device` value ("auto": the first TPU found)."""
    return {} if accelerator == "auto" else {"device": accelerator}


def backend_name(accelerator: str) -> str:
    return "edgetpu" if accelerator == "auto" else f"edgetpu:{accelerator}"


# --- which libedgetpu build works with which interpreter --------------------------------------------
#
# libedgetpu is compiled against one TensorFlow Lite version: its delegate is a TfLiteDelegate
# struct of that version's layout, and an interpreter of another version calls into it blindly,
# which segfaults instead of raising (google-coral/edgetpu#731, #812; google-coral/libedgetpu#53).
# Coral's own packages (libedgetpu1-std / -max 16.0, "release-grouper") are built against
# TF 2.5.0 (libedgetpu workspace.bzl; Coral in edgetpu#731) and are reported to work with
# tflite_runtime up to 2.11 only (libedgetpu#53). Community builds (feranick/libedgetpu, Debian
# version "16.0tf<X.Y.Z>-N", bookworm arm64/armhf/amd64) name the TF version they were built
# against; one built against 2.13.1 was reported working with tflite_runtime 2.14.1 and 2.15.0
# (edgetpu#812). LiteRT (ai_edge_litert) is versioned on its own, and no libedgetpu build is
# made against it.
LIBEDGETPU_PACKAGES = ("libedgetpu1-std", "libedgetpu1-max")
CORAL_TF = (2, 5)
# libedgetpu's TF (major, minor) -> the tflite_runtime (major, minor) reported to work with it
REPORTED_COMPATIBLE = {(2, 5): {(2, m) for m in range(5, 12)}, (2, 13): {(2, 13), (2, 14), (2, 15)}}
# What can be installed to pair with it (checked for Debian 12, whose Python is 3.11):
# - Debian has no libedgetpu and no TFLite interpreter package; Coral's apt repository has only
#   its TF 2.5.0 build (16.0);
# - PyPI has tflite-runtime for Python 3.11 in one version only, 2.14.0 (armv7l, aarch64,
#   x86_64 wheels): nothing up to 2.11 for Coral's build (2.5.0 has wheels for Python 3.5-3.8);
# - the community builds are GitHub release assets of feranick/libedgetpu, made against TF
#   2.11.1, 2.12.1, 2.13.1, 2.15.0, 2.16.1, 2.17.x, 2.18.1 and 2.19.1 (its debian/changelog);
#   the one for tflite-runtime 2.14 is 16.0tf2.13.1 (edgetpu#812).
# So no matching pair comes from Debian and PyPI alone: the fix names the manual step.
COMMUNITY_BUILDS = {(2, 11): "2.11.1", (2, 12): "2.12.1", (2, 13): "2.13.1", (2, 15): "2.15.0",
                    (2, 16): "2.16.1", (2, 17): "2.17.1", (2, 18): "2.18.1", (2, 19): "2.19.1"}
PYPI_TFLITE_RUNTIME = "2.14.0"   # the one tflite-runtime with Python 3.11 wheels
DEBIAN_ARCH = {"armv7l": "armhf", "aarch64": "arm64", "x86_64": "amd64"}


def abi_fix(runtime_name: str, runtime_version: str, machine: str | None = None, pip: str | None = None) -> str:
    """The manual steps that give this machine a matching libedgetpu / interpreter pair."""
    import platform
    import sys

    arch = DEBIAN_ARCH.get(machine or platform.machine(), "<arch>")
    pip = pip or f"{sys.prefix}/bin/pip"
    steps = []
    m = re.match(r"(\d+)\.(\d+)", runtime_version) if runtime_name == "tflite_runtime" else None
    rt = (int(m.group(1)), int(m.group(2))) if m else None
    if rt is None:  # LiteRT: no libedgetpu is built against it; change to the interpreter one is
        steps.append(f"{pip} uninstall -y ai-edge-litert && {pip} install tflite-runtime=={PYPI_TFLITE_RUNTIME}")
        rt = (2, 14)
    tf = (2, 13) if rt == (2, 14) else rt
    if rt in REPORTED_COMPATIBLE[CORAL_TF]:
        return "sudo apt install libedgetpu1-std (Coral's 16.0, built against TF 2.5.0)"
    if tf in COMMUNITY_BUILDS:
        build = COMMUNITY_BUILDS[tf]
        steps.append(f"download libedgetpu1-std 16.0tf{build} for {arch} from the feranick/libedgetpu releases on "
                     f"GitHub and sudo apt install ./libedgetpu1-std_16.0tf{build}-*_{arch}.deb"
                     + (" (reported working with tflite_runtime 2.14, google-coral/edgetpu#812)" if tf != rt else ""))
    else:
        steps.append(f"install a libedgetpu built against TF {rt[0]}.{rt[1]} (none is published), or "
                     f"{pip} install tflite-runtime=={PYPI_TFLITE_RUNTIME} and the 16.0tf2.13.1 build")
    if tf == (2, 13):  # the one pair provisioning can install, given the .deb
        steps[-1] += ("; or give the .deb to scripts/provision --with-tpu --libedgetpu-deb FILE, which also "
                      "sets up the interpreter")
    return "; then ".join(steps) + "; neither Debian nor PyPI has a matching pair (docs/hardware.md, \"Runtime pairs\")"


def installed_libedgetpu(root: str | Path = "/") -> tuple[str, str] | None:
    """(package, Debian version) of the libedgetpu package dpkg has installed, or None."""
    try:
        text = Path(root, "var/lib/dpkg/status").read_text(errors="replace")
    except OSError:
        return None
    for block in text.split("\n\n"):
        fields_ = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line[0].isspace())
        if fields_.get("Package") in LIBEDGETPU_PACKAGES and "installed" in fields_.get("Status", "").split():
            if fields_["Status"].endswith(" installed"):
                return fields_["Package"], fields_.get("Version", "")
    return None


def libedgetpu_tf(version: str) -> tuple[int, int] | None:
    """The TF (major, minor) a libedgetpu Debian version was built against, when it says."""
    m = re.search(r"tf(\d+)\.(\d+)", version.lower())
    if m:
        return int(m.group(1)), int(m.group(2))
    if re.fullmatch(r"16\.0(-\d+)?", version.strip()):
        return CORAL_TF
    return None


def abi_pair(runtime_name: str, runtime_version: str, lib: tuple[str, str] | None) -> tuple[str, str]:
    """("match" | "mismatch" | "unknown", one line) for an interpreter and a libedgetpu package."""
    if lib is None:
        return "unknown", "no libedgetpu package installed by dpkg (a hand-built library is not checked)"
    pkg, version = lib
    lib_tf = libedgetpu_tf(version)
    what = f"{pkg} {version}" + (f" (built against TF {lib_tf[0]}.{lib_tf[1]})" if lib_tf else "")
    if runtime_name != "tflite_runtime":
        return "unknown", (f"{what} with {runtime_name} {runtime_version}: LiteRT has no libedgetpu build "
                           "known to match it; a mismatch segfaults at the first inference on the TPU")
    m = re.match(r"(\d+)\.(\d+)", runtime_version)
    rt = (int(m.group(1)), int(m.group(2))) if m else None
    if lib_tf is None or rt is None:
        return "unknown", f"{what} with tflite_runtime {runtime_version}: versions not recognised"
    if rt == lib_tf or rt in REPORTED_COMPATIBLE.get(lib_tf, ()):
        return "match", f"{what} with tflite_runtime {runtime_version}"
    return "mismatch", (f"{what} does not match tflite_runtime {runtime_version}: the delegate would "
                        "segfault the process instead of raising")


def system_loader(library: str = EDGETPU_LIBRARY) -> Runtime:
    """The process's TFLite runtime, whose `load_delegate` first checks that the library loads.

    The check spares the log the runtime's own noise: when the library is missing, LiteRT's
    Delegate fails half-built and Python prints an ignored AttributeError from its __del__."""
    rt = runtime()

    def load_delegate(lib: str, options: dict | None = None):
        ctypes.CDLL(lib)  # OSError: "<lib>: cannot open shared object file"
        status, text = abi_pair(rt.name, rt.version, installed_libedgetpu())
        if status == "mismatch":  # refuse rather than segfault: the CPU fallback takes over
            raise AbiMismatch(f"{text}: {abi_fix(rt.name, rt.version)}")
        return rt.load_delegate(lib, options or {})

    return dataclasses.replace(rt, load_delegate=load_delegate)


def library_loadable(library: str = EDGETPU_LIBRARY) -> tuple[bool, str]:
    """(True, where it was found) or (False, why not)."""
    try:
        handle = ctypes.CDLL(library)
    except OSError as exc:
        return False, str(exc)
    return True, getattr(handle, "_name", library)


def list_edge_tpus() -> list[dict] | None:
    """pycoral's list of Edge TPUs ({"type": "usb"|"pci", "path": ...}), or None without pycoral."""
    try:
        from pycoral.utils.edgetpu import list_edge_tpus as pycoral_list
    except ImportError:
        return None
    try:
        return [dict(t) for t in pycoral_list()]
    except (RuntimeError, OSError, ValueError):
        return []


def find_usb_tpus(root: str | Path = "/") -> list[tuple[str, str]]:
    """Coral USB Accelerators in sysfs: (device directory name, description)."""
    found = []
    for d in sorted(glob.glob(os.path.join(str(root), "sys/bus/usb/devices/*"))):
        try:
            vid = Path(d, "idVendor").read_text().strip().lower()
            pid = Path(d, "idProduct").read_text().strip().lower()
        except OSError:
            continue
        desc = USB_IDS.get((vid, pid))
        if desc:
            found.append((os.path.basename(d), f"{desc} {vid}:{pid}"))
    return found


def find_pci_tpus(root: str | Path = "/") -> list[str]:
    """PCIe/M.2 Edge TPU device nodes (/dev/apex_N), made by the gasket/apex driver."""
    return sorted(glob.glob(os.path.join(str(root), "dev/apex_*")))


def _fix_for(accelerator: str) -> str:
    if accelerator.startswith("usb"):
        return FIX_USB
    if accelerator.startswith("pci"):
        return FIX_PCI
    return f"{FIX_USB}; or for PCIe: {FIX_PCI}"


def _classify(exc: BaseException, accelerator: str) -> _Unavailable:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, AbiMismatch):
        return _Unavailable("library", text)
    if isinstance(exc, OSError) or "cannot open shared object" in text:
        return _Unavailable("library", f"{EDGETPU_LIBRARY} is not installed ({text}): {INSTALL_LIBEDGETPU}")
    where = "any" if accelerator == "auto" else repr(accelerator)
    return _Unavailable("device", f"no Edge TPU answers on device {where} ({text}): {_fix_for(accelerator)}")


def edgetpu_digest(entry: ModelEntry) -> tuple[str, int]:
    """The manifest's sha256 and size of the model's `edgetpu_file` (load_manifest requires both)."""
    if entry.edgetpu_sha256 is None or entry.edgetpu_size is None:
        raise ModelError(f"{entry.manifest}: models.{entry.name}: edgetpu_file needs edgetpu_sha256 and edgetpu_size "
                         "so the compiled model can be verified")
    return entry.edgetpu_sha256, entry.edgetpu_size


def verify_edgetpu(entry: ModelEntry) -> Path:
    path = entry.edgetpu_path
    sha, size = edgetpu_digest(entry)
    verify(dataclasses.replace(entry, path=path, sha256=sha, size=size))
    return path


def _same_tensors(a: Model, b: Model) -> str | None:
    """Why `a` and `b` cannot stand in for each other (None when they can)."""
    for kind in ("inputs", "outputs"):
        ta, tb = getattr(a, kind), getattr(b, kind)
        if len(ta) != len(tb):
            return f"{len(ta)} {kind} vs {len(tb)}"
        for x, y in zip(ta, tb):
            if (x.shape, x.dtype, x.scale, x.zero_point) != (y.shape, y.dtype, y.scale, y.zero_point):
                return (f"{kind[:-1]} {x.name!r} is {x.dtype}{list(x.shape)} (scale {x.scale:g}) vs "
                        f"{y.dtype}{list(y.shape)} (scale {y.scale:g})")
    return None


class TpuFaultRecord:
    """What survives a process that the Edge TPU took down, in the state dir (`tpu-fault.json`).

    libedgetpu does not raise on a USB fault: it aborts the process (`F driver/usb/usb_driver.cc:
    … transfer on tag … failed. Abort.`, google-coral/edgetpu#476, #494) or blocks in `invoke()`
    for good (#94), so the in-process fallback never runs. The record remembers across the
    restart: while a model is on the TPU the file says so (`active`); a clean stop or a switch to
    the CPU clears that. A start that finds `active` set (the last process died on the TPU: an
    abort) or a `hang` the daemon recorded before exiting starts on the CPU and tries the TPU
    again after a backoff that doubles with each fault in a row (`retry_s`, 2 × retry_s, …, at
    most an hour). An hour on the TPU without a fault resets the count. A crash for another
    reason while on the TPU (power loss, OOM kill) also counts, erring towards the CPU."""

    BACKOFF_MAX_S = 3600.0
    CLEAN_S = 3600.0
    _shared: dict[Path, "TpuFaultRecord"] = {}

    @classmethod
    def for_state_dir(cls, state_dir: str | Path) -> "TpuFaultRecord":
        """The one record of this state dir (pipelines opened on reload share it)."""
        path = Path(state_dir) / "tpu-fault.json"
        rec = cls._shared.get(path)
        if rec is None:
            rec = cls._shared[path] = cls(path)
        return rec

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._users: set[str] = set()
        self.data = self._load()

    def _load(self) -> dict:
        import json

        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save(self) -> None:
        import json

        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.data))
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot write the Edge TPU fault record", extra=fields(path=str(self.path), error=str(exc)))

    def previous_fault(self) -> str | None:
        """"abort" (died while on the TPU) or "hang" when the last run ended in a TPU fault."""
        if self.data.get("active"):
            return "abort"
        return self.data.get("fault")

    def start_fault(self, retry_s: float) -> float | None:
        """At start: seconds to stay on the CPU because of a previous fault (None: no fault). The
        fault is counted once, whichever model asks first."""
        kind = self.previous_fault()
        if kind is None:
            return None
        if not self.data.get("counted"):
            self.data.update(fault=kind, faults=int(self.data.get("faults", 0)) + 1, active=False,
                             at=self._clock(), counted=True)
            self._save()
        n = max(1, int(self.data.get("faults", 1)))
        return min(self.BACKOFF_MAX_S, retry_s * 2 ** (n - 1))

    def on_tpu(self, model: str) -> None:
        self._users.add(model)
        if not self.data.get("active"):
            self.data.update(active=True, since=self._clock(), counted=False)
            self.data.pop("fault", None)
            self._save()

    def off_tpu(self, model: str, *, clean: bool = True) -> None:
        self._users.discard(model)
        if not self._users and self.data.get("active"):
            ran = self._clock() - float(self.data.get("since", self._clock()))
            self.data["active"] = False
            if clean and ran >= self.CLEAN_S:
                self.data["faults"] = 0
            self._save()

    def hung(self, model: str) -> None:
        """The daemon found an invoke that never returned: record it before exiting."""
        self.data.update(active=False, fault="hang", counted=False, at=self._clock())
        self._save()


class BackendModel:
    """A model on the Edge TPU or the CPU, switching between them; used like `edged.runtime.Model`.

    Call from one thread (the stage's). `backend` says where the next inference runs
    ("edgetpu:usb", "edgetpu", "cpu"); `stats` counts TPU failures, fallbacks and recoveries.
    """

    def __init__(self, entry: ModelEntry, *, accelerator: str = "cpu", fallback: bool = True,
                 retry_s: float = 60.0, threads: int | None = None, loader: Runtime | None = None,
                 clock: Callable[[], float] = time.monotonic, faults: TpuFaultRecord | None = None) -> None:
        if not ACCELERATOR_RE.match(accelerator):
            raise TpuError(f"accelerator.device: expected cpu, auto, :N, usb, usb:N, pci or pci:N, got {accelerator!r}")
        self.entry = entry
        self.accelerator = accelerator
        self.fallback = fallback
        self.retry_s = retry_s
        self._threads = threads
        self._loader = loader
        self._clock = clock
        self._once = Once(log)
        self.tpu_failures = 0    # delegate loads that failed and invokes that raised on the TPU
        self.fallbacks = 0       # switches from the TPU to the CPU, at start or mid-run
        self.recoveries = 0      # switches back
        self.last_error = ""
        self._tpu: Model | None = None
        self._cpu: Model | None = None
        self._next_retry: float | None = None
        self.faults = faults
        self.invoking_since: float | None = None  # monotonic start of an invoke on the TPU
        self._committed: dict[int, np.ndarray | None] = {}  # per input: the caller's buffer last committed
        self.wants_tpu = accelerator != "cpu" and entry.edgetpu_path is not None
        if accelerator != "cpu" and entry.edgetpu_path is None:
            log.info("model has no edgetpu_file in the manifest; it runs on the CPU",
                     extra=fields(model=entry.name, accelerator=accelerator))
        held_off = faults.start_fault(retry_s) if (self.wants_tpu and faults is not None and fallback) else None
        if held_off is not None:
            # The last run ended in an Edge TPU fault that took the process with it.
            self.tpu_failures += 1
            self.fallbacks += 1
            self.last_error = f"previous run ended in an Edge TPU {faults.previous_fault()}"
            self._next_retry = self._clock() + held_off
            log.warning("the last run ended in an Edge TPU fault; running on the CPU, trying the TPU "
                        "again later", extra=fields(model=entry.name, fault=faults.previous_fault(),
                                                    retry_in_s=round(held_off, 1),
                                                    faults_in_a_row=faults.data.get("faults")))
        elif self.wants_tpu:
            try:
                self._tpu = self._open_tpu()
            except _Unavailable as exc:
                self._unavailable(exc, at_start=True)
        if self._tpu is None or fallback:
            self._cpu = Model(entry.path, threads=threads, rt=loader)
        if self._tpu is not None and self._cpu is not None:
            why = _same_tensors(self._tpu, self._cpu)
            if why:
                raise ModelError(f"models.{entry.name}: edgetpu_file {entry.edgetpu_path.name} and file "
                                 f"{entry.path.name} differ ({why}); the CPU fallback must be the int8 model "
                                 "the Edge TPU model was compiled from")
        self._active: Model = self._tpu or self._cpu
        self.inputs = self._active.inputs
        self.outputs = self._active.outputs
        if self._tpu is not None:
            if faults is not None:
                faults.on_tpu(entry.name)
            log.info("model on the Edge TPU", extra=fields(model=entry.name, backend=self._tpu.backend,
                                                           file=entry.edgetpu_path.name))

    # -- the Model interface the stages use ---------------------------------------------------
    @property
    def backend(self) -> str:
        return self._active.backend

    @property
    def runtime(self) -> str:
        return self._active.runtime

    @property
    def path(self) -> Path:
        return self._active.path

    def input_buffer(self, i: int = 0) -> np.ndarray:
        return self._active.input_buffer(i)

    def set_input(self, i: int, data: np.ndarray) -> None:
        self._active.set_input(i, data)

    def commit_input(self, i: int = 0, buf: np.ndarray | None = None) -> None:
        self._committed[i] = buf
        self._active.commit_input(i, buf)

    def output(self, i: int) -> np.ndarray:
        return self._active.output(i)

    def raw_output(self, i: int) -> np.ndarray:
        return self._active.raw_output(i)

    def copy_output(self, i: int, out: np.ndarray) -> None:
        self._active.copy_output(i, out)

    def output_by_name(self, name: str) -> int:
        return self._active.output_by_name(name)

    def invoke(self) -> None:
        if self._next_retry is not None and self._clock() >= self._next_retry:
            self._retry()
        active = self._active
        on_tpu = active is self._tpu
        try:
            if on_tpu:
                # Watched by the daemon: an invoke that never returns is a hung TPU.
                self.invoking_since = time.monotonic()
            active.invoke()
            return
        except RuntimeError as exc:
            if not on_tpu:
                raise
            self._lost(exc)
        finally:
            self.invoking_since = None
        self._active.invoke()  # the same input, now on the CPU

    def close(self) -> None:
        """A clean stop: this model no longer holds the TPU."""
        if self.faults is not None and self._tpu is not None:
            self.faults.off_tpu(self.entry.name)

    @property
    def stats(self) -> dict:
        return {"backend": self.backend, "tpu_failures": self.tpu_failures, "fallbacks": self.fallbacks,
                "recoveries": self.recoveries}

    # -- switching ------------------------------------------------------------------------------
    def _open_tpu(self) -> Model:
        entry = self.entry
        path = verify_edgetpu(entry)  # a bad file is the user's to fix, not a reason to fall back
        if EDGETPU_OP not in custom_ops(path):
            self._once("not-compiled", "edgetpu_file contains no edgetpu-custom-op: it was not compiled "
                       "with edgetpu_compiler, so the delegate leaves all of it on the CPU",
                       model=entry.name, file=path.name)
        loader = self._loader or system_loader()
        try:
            delegate = loader.load_delegate(EDGETPU_LIBRARY, delegate_options(self.accelerator))
        except (OSError, ValueError, RuntimeError) as exc:
            raise _classify(exc, self.accelerator) from None
        try:
            return Model(path, threads=self._threads, delegates=[delegate],
                         backend=backend_name(self.accelerator), rt=loader)
        except RuntimeUnavailable as exc:
            raise _Unavailable("model", f"{exc}") from None

    def _unavailable(self, exc: _Unavailable, *, at_start: bool) -> None:
        self.tpu_failures += 1
        self.last_error = str(exc)
        if not self.fallback:
            raise TpuError(f"model {self.entry.name!r}: Edge TPU required (accelerator.fallback = false) "
                           f"but unusable: {exc}") from None
        if at_start:
            self.fallbacks += 1
        self._next_retry = self._clock() + self.retry_s
        # "auto" means "use one if there is one": its absence is not a warning.
        quiet = self.accelerator == "auto" and exc.kind in ("library", "device")
        self._once(f"unavailable:{exc.kind}", f"Edge TPU unavailable; running on the CPU, retrying every "
                   f"{self.retry_s:g} s", level=logging.INFO if quiet else logging.WARNING,
                   model=self.entry.name, error=str(exc))

    def _lost(self, exc: RuntimeError) -> None:
        """The TPU failed in invoke(): move this model to the CPU (or fail)."""
        self.tpu_failures += 1
        text = " ".join(str(exc).split())
        self.last_error = text
        tpu, self._tpu = self._tpu, None
        if not self.fallback:
            raise TpuError(f"model {self.entry.name!r}: the Edge TPU failed mid-run ({text}) and "
                           "accelerator.fallback = false") from None
        self.fallbacks += 1
        self._switch(tpu, self._cpu)
        if self.faults is not None:
            self.faults.off_tpu(self.entry.name, clean=False)
        self._next_retry = self._clock() + self.retry_s
        log.error("Edge TPU failed mid-run (unplugged or reset?); this model now runs on the CPU",
                  extra=fields(model=self.entry.name, error=text, retry_s=self.retry_s))

    def _retry(self) -> None:
        try:
            tpu = self._open_tpu()
        except _Unavailable as exc:
            self.tpu_failures += 1
            self.last_error = str(exc)
            self._next_retry = self._clock() + self.retry_s
            log.debug("Edge TPU still unavailable", extra=fields(model=self.entry.name, error=str(exc)))
            return
        except ModelError as exc:
            self._next_retry = None  # the file changed under us: retrying cannot help
            log.error("Edge TPU retries stopped", extra=fields(model=self.entry.name, error=str(exc)))
            return
        why = _same_tensors(tpu, self._cpu)
        if why:
            self._next_retry = None
            log.error("Edge TPU model does not match the CPU model; staying on the CPU",
                      extra=fields(model=self.entry.name, why=why))
            return
        self._next_retry = None
        self.recoveries += 1
        self._tpu = tpu
        self._switch(self._cpu, tpu)
        if self.faults is not None:
            self.faults.on_tpu(self.entry.name)
        for kind in ("unavailable:library", "unavailable:device", "unavailable:model"):
            self._once.clear(kind)
        log.info("Edge TPU is back; model moved to it", extra=fields(model=self.entry.name, backend=tpu.backend))

    def _switch(self, old: Model, new: Model) -> None:
        """Make `new` the active model, carrying over the input already committed to `old` (from
        the caller's buffer when it committed one: its own may hold the next input by now)."""
        for i in range(len(new.inputs)):
            buf = self._committed.get(i)
            new.set_input(i, old.input_buffer(i) if buf is None else buf)
        self._active = new


def open_for_backend(entry: ModelEntry, accelerator: str = "cpu", fallback: bool = True, loader=None, *,
                     retry_s: float = 60.0, threads: int | None = None,
                     clock: Callable[[], float] = time.monotonic,
                     faults: TpuFaultRecord | None = None) -> BackendModel:
    """The model for a stage: verified, on the Edge TPU when configured and present, else the CPU.

    `loader` is a `Runtime`-like object (`load_delegate`, `interpreter_cls`, `name`, `version`);
    default: the process's TFLite runtime with libedgetpu. Tests pass `edged.fakes.tpu.FakeEdgeTpu`."""
    verify(entry)
    return BackendModel(entry, accelerator=accelerator, fallback=fallback, retry_s=retry_s,
                        threads=threads, loader=loader, clock=clock, faults=faults)
