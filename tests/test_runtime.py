"""The in-process runtime: interpreter choice, buffer reuse, quantisation, model verification."""

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
