"""The in-process runtime: interpreter choice, buffer reuse, quantisation, model verification."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, SAMPLES
from edged.models import ModelError, load_manifest, open_model, verify
from edged.runtime import Model, runtime


def test_runtime_is_litert_by_default():
    rt = runtime()
    assert rt.name in ("ai_edge_litert", "tflite_runtime")
    assert rt.version


# Run in a fresh process, so that no other test's interpreter in this one maps the same files.
_RELEASE_CHECK = r"""
import json, os, sys
import numpy as np
from PIL import Image
from edged.models import load_manifest
from edged.runtime import Model, release_start_pages, runtime

def resident_kb(path=None, under=None):
    # Resident kB of each mapping (/proc/self/smaps) of the file `path`, or of the executable
    # mappings of the files under the directory `under`.
    target, found, name, perms = path and os.path.realpath(path), [], None, ""
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split(None, 5)
            if len(head) >= 5 and "-" in head[0] and len(head[1]) == 4:
                name, perms = (head[5].strip() if len(head) > 5 else ""), head[1]
            elif line.startswith("Rss:") and (name == target if path else
                                              name.startswith(under + os.sep) and "x" in perms):
                found.append(int(line.split()[1]))
    return found

entry, rt, out = load_manifest()[sys.argv[1]], runtime(), {}
ref = rt.interpreter_cls(model_path=str(entry.path), num_threads=1)
ref.allocate_tensors()
out["file_before"], out["code_before"] = resident_kb(entry.path), sum(resident_kb(under=rt.libdir))
spec = ref.get_input_details()[0]
image = np.asarray(Image.open(sys.argv[2]).convert("RGB").resize(tuple(spec["shape"][2:0:-1])))
data = image[None].astype(spec["dtype"]) if np.issubdtype(spec["dtype"], np.integer) \
    else (image[None].astype(np.float32) / 127.5 - 1.0)
ref.set_tensor(spec["index"], data)
ref.invoke()
expected = [ref.get_tensor(o["index"]) for o in ref.get_output_details()]
m = Model(entry.path, threads=1)
out["file_after"], out["code_after"] = resident_kb(entry.path), sum(resident_kb(under=rt.libdir))
m.set_input(0, data)
m.invoke()
out["model_same"] = all(np.array_equal(m.raw_output(i), want) for i, want in enumerate(expected))
ref.invoke()  # the interpreter whose pages were dropped under it reads what it needs back
out["ref_same"] = all(np.array_equal(ref.get_tensor(o["index"]), want)
                      for o, want in zip(ref.get_output_details(), expected))
out["unmapped"] = release_start_pages(os.path.join(sys.argv[2] + ".no-such-model"), "")
print(json.dumps(out))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux's /proc/self/smaps")
@pytest.mark.parametrize("name", ["person", "face_full_range", "face"])
def test_an_opened_model_keeps_no_page_of_its_file_mapped_and_invokes_as_before(name):
    """The runtime maps the model file and reads all of it while it builds the interpreter
    (XNNPack copies the weights); Model drops those pages from this process afterwards, and
    those of the runtime's code that building ran (release_start_pages). The outputs are those of
    an interpreter that keeps them."""
    run = subprocess.run([sys.executable, "-c", _RELEASE_CHECK, name, str(SAMPLES / "images" / "astronaut.jpg")],
                         capture_output=True, text=True, env={"PYTHONPATH": str(REPO)}, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.splitlines()[-1])
    assert max(out["file_before"]) > 0 and out["code_before"] > 0  # the file was read, the code ran
    assert len(out["file_after"]) == 2 and not any(out["file_after"])  # both interpreters' mappings
    assert out["code_after"] < out["code_before"] / 2
    assert out["model_same"] and out["ref_same"]
    assert out["unmapped"] == 0  # nothing of a file that is not mapped


def test_quantised_output_dequantises_without_int8_wraparound():
    manifest = load_manifest()
    int8_models = [e for e in manifest.values() if Model(e.path).outputs[0].quantized]
    assert int8_models, "the shipped models include an int8 one"
    m = Model(int8_models[0].path)
    rng = np.random.default_rng(0)
    spec = m.inputs[0]
    m.set_input(0, rng.normal(size=spec.shape).astype(np.float32))
    m.invoke()
    for i, o in enumerate(m.outputs):
        if not o.quantized:
            continue
        raw = m.raw_output(i).astype(np.float64)
        expected = (raw - o.zero_point) * o.scale
        np.testing.assert_allclose(m.output(i), expected, rtol=1e-6, atol=1e-6)


def test_quantised_input_is_rounded_and_clipped():
    manifest = load_manifest()
    for e in manifest.values():
        m = Model(e.path)
        spec = m.inputs[0]
        if not spec.quantized:
            continue
        big = np.full(spec.shape, 1e6, np.float32)
        m.set_input(0, big)
        assert (m.input_buffer(0) == np.iinfo(spec.dtype).max).all()
        buf = m.input_buffer(0)
        m.set_input(0, np.zeros(spec.shape, np.float32))
        assert m.input_buffer(0) is buf  # reused, not reallocated
        assert (buf == spec.zero_point).all()
        return
    pytest.fail("no shipped model has a quantised input")


def test_truncated_or_modified_model_is_refused(tmp_path):
    entry = load_manifest()["face"]
    bad = tmp_path / entry.path.name
    shutil.copy(entry.path, bad)
    with open(bad, "r+b") as fh:
        fh.truncate(entry.size - 10)
    with pytest.raises(ModelError, match="truncated or replaced"):
        verify(entry, bad)
    shutil.copy(entry.path, bad)
    with open(bad, "r+b") as fh:
        fh.seek(1000)
        fh.write(b"\xff\xfe")
    with pytest.raises(ModelError, match="does not match the manifest"):
        verify(entry, bad)
    verify(entry)  # the shipped file itself is fine
    assert open_model(entry).inputs


def test_missing_runtime_says_what_to_install():
    code = ("import sys; sys.modules['ai_edge_litert'] = None; sys.modules['tflite_runtime'] = None; "
            "from edged.cli import main; sys.exit(main(['detect', sys.argv[1]]))")
    r = subprocess.run([sys.executable, "-c", code, str(SAMPLES / "images" / "astronaut.jpg")],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 69  # unavailable, not a config error: systemd retries
    assert r.stderr.strip().splitlines() == [
        "edged: no TFLite runtime is installed: on 64-bit Pi OS or x86_64 run 'pip install ai-edge-litert'; "
        "on 32-bit Pi OS run \"pip install tflite-runtime 'numpy<2'\""]
