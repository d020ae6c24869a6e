"""Edge TPU delegate loading, model choice and CPU fallback, through the fake delegate loader.

The "compiled" models here are real .tflite files with an `edgetpu-custom-op` in place of their
layers (made by FakeEdgeTpu.compile); the real runtime refuses them without a delegate, as it
refuses real compiled models. Everything above the loader is production code.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, SAMPLES
from edged.sources.camera import decode_image
from edged.fakes.tpu import FakeEdgeTpu
from edged.models import ModelError, load_manifest
from edged.runtime import EDGETPU_OP, Model, RuntimeUnavailable, custom_ops, runtime
from edged.tpu import TpuError, abi_fix, abi_pair, find_pci_tpus, find_usb_tpus, installed_libedgetpu, libedgetpu_tf, \
    open_for_backend

MODELS = REPO / "models"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_models(tmp_path, tpu: FakeEdgeTpu, *, name="motion", file="motion.tflite", labels="motion.labels",
                compile_from=None, digest=True, task="motion", decoder="classifier+embedding", extra=""):
    """A models dir with `file` and its fake-compiled twin `<name>_edgetpu.tflite` in the manifest."""
    d = tmp_path / "models"
    d.mkdir(exist_ok=True)
    shutil.copy(MODELS / file, d / file)
    shutil.copy(MODELS / labels, d / labels)
    tpu_file = d / f"{name}_edgetpu.tflite"
    tpu.compile(MODELS / (compile_from or file), tpu_file)
    lines = [f"[models.{name}]", f'file = "{file}"', f'sha256 = "{_sha(d / file)}"',
             f"size = {(d / file).stat().st_size}", f'task = "{task}"', f'decoder = "{decoder}"',
             f'labels = "{labels}"', f'edgetpu_file = "{tpu_file.name}"', 'license = "Apache-2.0"']
    if digest:
        lines += [f'edgetpu_sha256 = "{_sha(tpu_file)}"', f"edgetpu_size = {tpu_file.stat().st_size}"]
    (d / "manifest.toml").write_text("\n".join(lines) + "\n" + extra)
    return load_manifest(d)[name]


def motion_input(seed: int = 0) -> np.ndarray:
    shape = Model(MODELS / "motion.tflite").inputs[0].shape  # the shipped motion model's window
    return np.random.default_rng(seed).normal(0, 1, shape).astype(np.float32)


def cpu_result(x: np.ndarray) -> list[np.ndarray]:
    m = Model(MODELS / "motion.tflite")
    m.set_input(0, x)
    m.invoke()
    return [m.raw_output(i) for i in range(len(m.outputs))]


def run(model, x: np.ndarray) -> list[np.ndarray]:
    model.set_input(0, x)
    model.invoke()
    return [model.raw_output(i) for i in range(len(model.outputs))]


# -- the compiled model itself ------------------------------------------------------------------

def test_compiled_model_is_detected_and_refused_on_the_cpu(tmp_path):
    tpu = FakeEdgeTpu()
    path = tpu.compile(MODELS / "motion.tflite", tmp_path / "motion_edgetpu.tflite")
    assert custom_ops(path) == {EDGETPU_OP}
    for shipped in MODELS.glob("*.tflite"):
        assert EDGETPU_OP not in custom_ops(shipped), shipped
    # What the runtime itself says (the reason edged checks first): an unresolved custom op.
    interp = runtime().interpreter_cls(model_path=str(path))
    with pytest.raises(RuntimeError, match="unresolved custom op: edgetpu-custom-op"):
        interp.allocate_tensors()
    with pytest.raises(RuntimeUnavailable, match="compiled for the Edge TPU .*cannot run on the CPU"):
        Model(path)
    assert custom_ops(tmp_path / "missing.tflite") == set()
    (tmp_path / "junk.tflite").write_bytes(b"\x00" * 3)
    assert custom_ops(tmp_path / "junk.tflite") == set()


def test_manifest_file_that_is_compiled_is_refused_with_cpu(tmp_path):
    tpu = FakeEdgeTpu()
    entry = make_models(tmp_path, tpu)
    wrong = tmp_path / "models" / "motion.tflite"
    shutil.copy(entry.edgetpu_path, wrong)  # someone put the compiled model in `file`
    entry = entry.__class__(**{**entry.__dict__, "sha256": _sha(wrong), "size": wrong.stat().st_size})
    with pytest.raises(RuntimeUnavailable, match="compiled for the Edge TPU"):
        open_for_backend(entry, "cpu")


# -- success ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("accelerator, options, backend", [
    ("usb", {"device": "usb"}, "edgetpu:usb"),
    ("usb:0", {"device": "usb:0"}, "edgetpu:usb:0"),
    (":0", {"device": ":0"}, "edgetpu::0"),   # pycoral's "the first Edge TPU of any kind"
    ("auto", {}, "edgetpu"),
])
def test_model_runs_on_the_tpu_with_the_documented_delegate_options(tmp_path, accelerator, options, backend):
    tpu = FakeEdgeTpu("usb")
    calls = []
    real_load = tpu.load_delegate
    tpu.load_delegate = lambda lib, opts=None: calls.append((lib, opts)) or real_load(lib, opts)
    entry = make_models(tmp_path, tpu)
    model = open_for_backend(entry, accelerator, loader=tpu)
    assert calls == [("libedgetpu.so.1", options)]
    assert model.backend == backend and model.path == entry.edgetpu_path
    x = motion_input()
    for got, want in zip(run(model, x), cpu_result(x)):
        np.testing.assert_array_equal(got, want)
    assert tpu.invokes == 1
    assert model.stats == {"backend": backend, "tpu_failures": 0, "fallbacks": 0, "recoveries": 0}


def test_pci_device_on_a_pci_tpu(tmp_path):
    tpu = FakeEdgeTpu("pci")
    model = open_for_backend(make_models(tmp_path, tpu), "pci:0", loader=tpu)
    assert model.backend == "edgetpu:pci:0"


def test_cpu_setting_never_touches_the_delegate(tmp_path):
    tpu = FakeEdgeTpu()
    model = open_for_backend(make_models(tmp_path, tpu), "cpu", loader=tpu)
    run(model, motion_input())
    assert model.backend == "cpu" and tpu.loads == 0 and tpu.invokes == 0 and not model.wants_tpu


def test_model_without_edgetpu_file_runs_on_the_cpu(caplog):
    entry = load_manifest(MODELS)["motion"]
    assert entry.edgetpu_path is None
    tpu = FakeEdgeTpu()
    with caplog.at_level(logging.INFO, logger="edged.tpu"):
        model = open_for_backend(entry, "usb", loader=tpu)
    assert model.backend == "cpu" and tpu.loads == 0
    assert any("no edgetpu_file" in r.getMessage() for r in caplog.records)


# -- library missing, device missing ------------------------------------------------------------

def _warnings(caplog):
    return [r for r in caplog.records if r.name == "edged.tpu" and r.levelno >= logging.WARNING]


def test_library_missing_falls_back_with_one_line_and_the_install_command(tmp_path, caplog):
    tpu = FakeEdgeTpu(library=False)
    with caplog.at_level(logging.INFO, logger="edged.tpu"):
        model = open_for_backend(make_models(tmp_path, tpu), "usb", loader=tpu)
        x = motion_input(1)
        for got, want in zip(run(model, x), cpu_result(x)):
            np.testing.assert_array_equal(got, want)
    assert model.backend == "cpu" and model.wants_tpu
    (w,) = _warnings(caplog)
    error = w.fields["error"]
    assert "libedgetpu.so.1 is not installed" in error and "sudo apt install libedgetpu1-std" in error
    assert model.stats["fallbacks"] == 1 and model.stats["tpu_failures"] == 1


def test_library_missing_and_fallback_off_is_a_clear_error(tmp_path):
    tpu = FakeEdgeTpu(library=False)
    with pytest.raises(TpuError, match=r"fallback = false.*libedgetpu1-std"):
        open_for_backend(make_models(tmp_path, tpu), "usb", fallback=False, loader=tpu)


@pytest.mark.parametrize("kind, accelerator, hint", [
    ("usb", "usb", "plugdev"),       # nothing plugged in
    ("usb", "pci", "apex"),          # a USB TPU, but the config asks for PCIe
    ("pci", "usb:0", "1a6e:089a"),
])
def test_device_missing_falls_back_and_says_how_to_fix(tmp_path, caplog, kind, accelerator, hint):
    tpu = FakeEdgeTpu(kind, present=(kind != "usb" or accelerator != "usb"))
    with caplog.at_level(logging.INFO, logger="edged.tpu"):
        model = open_for_backend(make_models(tmp_path, tpu), accelerator, loader=tpu)
    assert model.backend == "cpu"
    (w,) = _warnings(caplog)
    assert f"no Edge TPU answers on device '{accelerator}'" in w.fields["error"]
    assert hint in w.fields["error"]


def test_auto_without_a_tpu_is_not_a_warning(tmp_path, caplog):
    tpu = FakeEdgeTpu(present=False)
    with caplog.at_level(logging.INFO, logger="edged.tpu"):
        model = open_for_backend(make_models(tmp_path, tpu), "auto", loader=tpu)
    assert model.backend == "cpu" and not _warnings(caplog)
    assert any("Edge TPU unavailable" in r.getMessage() for r in caplog.records)


def test_real_loader_on_a_machine_without_libedgetpu(tmp_path, caplog, capfd):
    from edged.tpu import library_loadable

    if library_loadable()[0]:
        pytest.skip("this machine has libedgetpu installed")
    entry = make_models(tmp_path, FakeEdgeTpu())
    with caplog.at_level(logging.INFO, logger="edged.tpu"):
        model = open_for_backend(entry, "usb")  # the process's own runtime and libedgetpu
    assert model.backend == "cpu"
    (w,) = _warnings(caplog)
    assert "libedgetpu.so.1 is not installed" in w.fields["error"]
    # LiteRT's half-built Delegate would print an ignored AttributeError; edged checks first.
    assert "Exception ignored" not in capfd.readouterr().err


# -- failure mid-run and recovery -------------------------------------------------------------------

def test_tpu_lost_mid_run_falls_back_without_losing_the_frame_then_recovers(tmp_path, caplog):
    tpu = FakeEdgeTpu("usb")
    clock = Clock()
    model = open_for_backend(make_models(tmp_path, tpu), "usb", loader=tpu, retry_s=30, clock=clock)
    x0, x1, x2, x3 = (motion_input(i) for i in range(4))
    run(model, x0)
    assert model.backend == "edgetpu:usb" and tpu.invokes == 1

    tpu.unplug()  # the USB device resets under the running interpreter
    with caplog.at_level(logging.INFO, logger="edged.tpu"):
        got = run(model, x1)
    for g, w in zip(got, cpu_result(x1)):  # the same input, answered by the CPU model
        np.testing.assert_array_equal(g, w)
    assert model.backend == "cpu"
    assert model.stats == {"backend": "cpu", "tpu_failures": 1, "fallbacks": 1, "recoveries": 0}
    (err,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "failed mid-run" in err.getMessage() and "USB transfer error" in err.fields["error"]

    clock.t += 10  # before retry_s: no attempt
    run(model, x2)
    assert tpu.loads == 1 and model.backend == "cpu"
    clock.t += 25  # due, but the TPU is still gone: quiet, counted, next try in another retry_s
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="edged.tpu"):
        run(model, x2)
    assert model.backend == "cpu" and model.stats["tpu_failures"] == 2
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    tpu.plug()
    clock.t += 29
    run(model, x2)
    assert model.backend == "cpu"  # not due yet
    clock.t += 2
    with caplog.at_level(logging.INFO, logger="edged.tpu"):
        got = run(model, x3)
    assert model.backend == "edgetpu:usb" and model.stats["recoveries"] == 1
    assert any("Edge TPU is back" in r.getMessage() for r in caplog.records)
    for g, w in zip(got, cpu_result(x3)):
        np.testing.assert_array_equal(g, w)
    assert tpu.invokes == 2 and tpu.loads == 2


def test_tpu_lost_mid_run_with_fallback_off_raises(tmp_path):
    tpu = FakeEdgeTpu("usb")
    model = open_for_backend(make_models(tmp_path, tpu), "usb", fallback=False, loader=tpu)
    run(model, motion_input())
    tpu.fail_next = 1
    with pytest.raises(TpuError, match="failed mid-run.*fallback = false"):
        run(model, motion_input())


def test_tpu_absent_at_start_is_picked_up_when_plugged_in(tmp_path):
    tpu = FakeEdgeTpu("usb", present=False)
    clock = Clock()
    model = open_for_backend(make_models(tmp_path, tpu), "usb", loader=tpu, retry_s=60, clock=clock)
    run(model, motion_input())
    assert model.backend == "cpu"
    tpu.plug()
    clock.t += 60
    run(model, motion_input())
    assert model.backend == "edgetpu:usb" and tpu.invokes == 1


def test_vision_stage_gives_the_same_faces_on_tpu_cpu_and_after_a_mid_run_fallback(tmp_path):
    from edged.stages.vision import VisionStage

    tpu = FakeEdgeTpu("usb")
    shipped = (MODELS / "manifest.toml").read_text()
    # the face entry's own sub-tables ([models.face.input], [models.face.params], ...), whatever follows them
    start = shipped.index("[models.face.input]")
    rest = re.search(r"^\[models\.(?!face\.)", shipped[start:], re.M)
    face_tables = shipped[start:start + rest.start()] if rest else shipped[start:]
    entry = make_models(tmp_path, tpu, name="face", file="face_detection_short_range.tflite",
                        labels="face.labels", task="vision", decoder="blazeface", extra=face_tables)
    image = decode_image(SAMPLES / "images" / "astronaut.jpg")
    cpu = VisionStage(Model(MODELS / "face_detection_short_range.tflite"), entry).detect(image)
    assert cpu and cpu[0].label == "face"
    stage = VisionStage(open_for_backend(entry, "usb", loader=tpu), entry)
    assert stage.detect(image) == cpu and stage.model.backend == "edgetpu:usb"
    tpu.unplug()
    assert stage.detect(image) == cpu and stage.model.backend == "cpu"


# -- the manifest's side --------------------------------------------------------------------------

def test_compiled_model_is_verified_against_the_manifest(tmp_path):
    tpu = FakeEdgeTpu()
    # The manifest loader refuses an edgetpu_file without its digest, naming the key.
    with pytest.raises(ModelError, match="models.motion: missing key 'edgetpu_sha256'"):
        make_models(tmp_path, tpu, digest=False)
    entry = make_models(tmp_path, tpu)
    with entry.edgetpu_path.open("r+b") as fh:
        fh.seek(100)
        fh.write(b"\xff\xfe")
    with pytest.raises(ModelError, match="does not match the manifest"):
        open_for_backend(entry, "usb", loader=tpu)


def test_compiled_model_must_match_its_cpu_fallback(tmp_path):
    tpu = FakeEdgeTpu()
    # the "compiled" model was made from another network than the CPU file
    entry = make_models(tmp_path, tpu, compile_from="face_detection_short_range.tflite")
    with pytest.raises(ModelError, match="differ .*the CPU fallback must be the int8 model"):
        open_for_backend(entry, "usb", loader=tpu)
    # without a fallback there is nothing to match
    assert open_for_backend(entry, "usb", fallback=False, loader=tpu).backend == "edgetpu:usb"


def test_bad_accelerator_value():
    with pytest.raises(TpuError, match="expected cpu, auto, :N, usb, usb:N, pci or pci:N"):
        open_for_backend(load_manifest(MODELS)["motion"], "tpu0")


# -- finding TPUs in sysfs ------------------------------------------------------------------------

def test_usb_and_pci_tpus_are_found_in_a_fake_sys_tree(tmp_path):
    usb = tmp_path / "sys/bus/usb/devices"
    for name, vid, pid in (("1-1", "1a6e", "089a"), ("2-1", "18d1", "9302"), ("1-2", "046d", "0825")):
        (usb / name).mkdir(parents=True)
        (usb / name / "idVendor").write_text(vid + "\n")
        (usb / name / "idProduct").write_text(pid + "\n")
    (usb / "usb1").mkdir()  # a root hub without ids files
    assert find_usb_tpus(tmp_path) == [("1-1", "Coral USB Accelerator (firmware not loaded yet) 1a6e:089a"),
                                       ("2-1", "Coral USB Accelerator 18d1:9302")]
    assert find_pci_tpus(tmp_path) == []
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/apex_0").write_text("")
    assert find_pci_tpus(tmp_path) == [str(tmp_path / "dev/apex_0")]


# -- which libedgetpu build goes with which interpreter ------------------------------------------------

DPKG = """Package: libusb-1.0-0
Status: install ok installed
Version: 2:1.0.26-1

Package: {pkg}
Status: {status}
Architecture: arm64
Version: {version}
Description: Support library for Edge TPU
 with a continuation line: Version: 99
"""


@pytest.mark.parametrize("version, tf", [("16.0", (2, 5)), ("16.0tf2.17.1-1", (2, 17)), ("16.0TF2.13.1-2", (2, 13)),
                                         ("15.0", None)])
def test_libedgetpu_versions_name_the_tensorflow_they_were_built_against(version, tf):
    assert libedgetpu_tf(version) == tf


def test_installed_libedgetpu_is_read_from_dpkg(tmp_path):
    status = tmp_path / "var/lib/dpkg/status"
    status.parent.mkdir(parents=True)
    status.write_text(DPKG.format(pkg="libedgetpu1-max", status="install ok installed", version="16.0tf2.17.1-1"))
    assert installed_libedgetpu(tmp_path) == ("libedgetpu1-max", "16.0tf2.17.1-1")
    status.write_text(DPKG.format(pkg="libedgetpu1-std", status="deinstall ok config-files", version="16.0"))
    assert installed_libedgetpu(tmp_path) is None
    assert installed_libedgetpu(tmp_path / "nowhere") is None


@pytest.mark.parametrize("rt, rt_version, lib, status", [
    ("tflite_runtime", "2.14.0", ("libedgetpu1-std", "16.0"), "mismatch"),        # Coral's TF 2.5 build
    ("tflite_runtime", "2.11.0", ("libedgetpu1-std", "16.0"), "match"),           # reported to work
    ("tflite_runtime", "2.17.1", ("libedgetpu1-std", "16.0tf2.17.1-1"), "match"),
    ("tflite_runtime", "2.14.1", ("libedgetpu1-std", "16.0tf2.13.1-2"), "match"),  # reported (edgetpu#812)
    ("tflite_runtime", "2.14.0", ("libedgetpu1-std", "16.0tf2.17.1-1"), "mismatch"),
    ("ai_edge_litert", "2.3.0", ("libedgetpu1-std", "16.0tf2.17.1-1"), "unknown"),
    ("tflite_runtime", "2.14.0", None, "unknown"),
])
def test_runtime_pairs(rt, rt_version, lib, status):
    got, text = abi_pair(rt, rt_version, lib)
    assert got == status, text
    if status == "mismatch":
        assert "segfault" in text


def test_the_abi_fix_names_the_steps_for_this_interpreter_and_architecture():
    pip = "/opt/edged/venv/bin/pip"
    # 32-bit: tflite-runtime 2.14 (the only one PyPI has for Python 3.11) and the build made for it
    fix = abi_fix("tflite_runtime", "2.14.0", "armv7l", pip)
    assert "libedgetpu1-std_16.0tf2.13.1-*_armhf.deb" in fix and "uninstall" not in fix
    status, _ = abi_pair("tflite_runtime", "2.14.0", ("libedgetpu1-std", "16.0tf2.13.1-2"))
    assert status == "match"                         # what the fix installs is a known pair
    # 64-bit: LiteRT has no libedgetpu; the interpreter changes first
    fix = abi_fix("ai_edge_litert", "2.3.0", "aarch64", pip)
    assert fix.startswith(f"{pip} uninstall -y ai-edge-litert && {pip} install tflite-runtime==2.14.0; then ")
    assert "_arm64.deb" in fix
    # an interpreter with a build of its own version
    assert "16.0tf2.17.1-*_arm64.deb" in abi_fix("tflite_runtime", "2.17.1", "aarch64", pip)
    # one that Coral's own package serves
    assert abi_fix("tflite_runtime", "2.11.0", "armv7l", pip).startswith("sudo apt install libedgetpu1-std")
    # docs/hardware.md shows the 32-bit line as the doctor prints it
    doc = (Path(__file__).resolve().parent.parent / "docs" / "hardware.md").read_text()
    assert "    fix: " + abi_fix("tflite_runtime", "2.14.0", "armv7l", pip) + "\n" in doc
