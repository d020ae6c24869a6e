"""scripts/fetch-models, run as a program against a real HTTP server on 127.0.0.1.

Coral's files cannot be downloaded here, so the server serves models built by the test:
- `tiny.tflite`: a real detector whose graph ends in TFLite_Detection_PostProcess, the op Coral's
  SSD models end in. Its class scores are the input pixels (green = person, blue = bicycle, red =
  the background column) over an 8x8 grid of anchors, so what it finds depends on the image and
  the real op in the real runtime does the box decoding and NMS;
- `tiny_edgetpu.tflite`: that model run through `FakeEdgeTpu.compile` (a real flatbuffer shaped like
  edgetpu_compiler's output, with `edgetpu-custom-op`), which the fake TPU runs as the CPU model;
- `tiny.labels`.
The written manifest is then loaded by edged itself and the vision stage runs the fetched model.
"""

from __future__ import annotations

import hashlib
import http.server
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edged.models import ModelError, load_manifest, open_model

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "fetch-models"
GRID = 8

schema = pytest.importorskip("ai_edge_litert.schema_py_generated",
                             reason="building the test models needs LiteRT's flatbuffer schema")


def _load_script():
    loader = importlib.machinery.SourceFileLoader("fetch_models", str(SCRIPT))
    spec = importlib.util.spec_from_loader("fetch_models", loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fetch_models"] = module  # dataclasses look their module up while being built
    loader.exec_module(module)
    return module


fm = _load_script()


# --------------------------------------------------------------------------- the served files

def build_postprocess_model() -> bytes:
    """uint8 image [1, 8, 8, 3] → DEQUANTIZE → RESHAPE [1, 64, 3] as class scores → the
    TFLite_Detection_PostProcess op with zero box encodings and one anchor per grid cell."""
    import flatbuffers
    from flatbuffers import flexbuffers

    n = GRID * GRID

    def buffer(array=None):
        b = schema.BufferT()
        b.data = None if array is None else list(np.ascontiguousarray(array).tobytes())
        return b

    def tensor(shape, ttype, buf, name, quant=None):
        t = schema.TensorT()
        t.shape, t.type, t.buffer, t.name = list(shape), ttype, buf, name
        if quant:
            t.quantization = schema.QuantizationParametersT()
            t.quantization.scale, t.quantization.zeroPoint = [quant[0]], [quant[1]]
        return t

    def op(code, inputs, outputs):
        o = schema.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = code, inputs, outputs
        return o

    centres = (np.arange(GRID) + 0.5) / GRID
    yc, xc = np.meshgrid(centres, centres, indexing="ij")
    anchors = np.stack([yc.ravel(), xc.ravel(), np.full(n, 1 / GRID), np.full(n, 1 / GRID)], 1)
    f32, T = schema.TensorType.FLOAT32, schema.TensorType
    model = schema.ModelT()
    model.version = 3
    model.buffers = [buffer(), buffer(), buffer(np.array([1, n, 3], np.int32)),
                     buffer(np.zeros((1, n, 4), np.float32)), buffer(anchors.astype(np.float32))]
    model.buffers += [buffer() for _ in range(6)]
    graph = schema.SubGraphT()
    graph.tensors = [
        tensor([1, GRID, GRID, 3], T.UINT8, 1, "image", (1 / 255, 0)),
        tensor([3], T.INT32, 2, "scores_shape"),
        tensor([1, n, 3], f32, 5, "scores"),
        tensor([1, n, 4], f32, 3, "box_encodings"),
        tensor([n, 4], f32, 4, "anchors"),
        tensor([1, GRID, GRID, 3], f32, 6, "pixels"),
        tensor([1, 10, 4], f32, 7, "TFLite_Detection_PostProcess"),
        tensor([1, 10], f32, 8, "TFLite_Detection_PostProcess:1"),
        tensor([1, 10], f32, 9, "TFLite_Detection_PostProcess:2"),
        tensor([1], f32, 10, "TFLite_Detection_PostProcess:3"),
    ]
    graph.inputs, graph.outputs = [0], [6, 7, 8, 9]
    codes = []
    for builtin, custom in ((schema.BuiltinOperator.DEQUANTIZE, None), (schema.BuiltinOperator.RESHAPE, None),
                            (schema.BuiltinOperator.CUSTOM, "TFLite_Detection_PostProcess")):
        c = schema.OperatorCodeT()
        c.builtinCode, c.deprecatedBuiltinCode, c.customCode, c.version = builtin, builtin, custom, 1
        codes.append(c)
    post = op(2, [3, 2, 4], [6, 7, 8, 9])
    post.customOptions = list(flexbuffers.Dumps({
        "max_detections": 10, "max_classes_per_detection": 1, "detections_per_class": 100,
        "use_regular_nms": False, "nms_score_threshold": 0.3, "nms_iou_threshold": 0.5,
        "num_classes": 2, "y_scale": 10.0, "x_scale": 10.0, "h_scale": 5.0, "w_scale": 5.0}))
    post.customOptionsFormat = schema.CustomOptionsFormat.FLEXBUFFERS
    graph.operators = [op(0, [0], [5]), op(1, [5, 1], [2]), post]
    model.operatorCodes, model.subgraphs = codes, [graph]
    builder = flatbuffers.Builder(4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


class Files:
    """What the server serves: path → bytes, plus ways to misbehave."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.cut_at: dict[str, int] = {}    # send the full Content-Length, then hang up here
        self.stall: set[str] = set()         # send the headers, then nothing for 2 s
        self.requests: list[str] = []


def serve(files: Files):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            name = self.path.lstrip("/")
            files.requests.append(name)
            body = files.data.get(name)
            if body is None:
                self.send_error(404, "Not Found")
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if name in files.stall:
                self.wfile.flush()
                time.sleep(2)
            self.wfile.write(body[:files.cut_at.get(name, len(body))])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from edged.fakes.tpu import FakeEdgeTpu

    d = tmp_path_factory.mktemp("built")
    (d / "tiny.tflite").write_bytes(build_postprocess_model())
    tpu = FakeEdgeTpu("usb")
    tpu.compile(d / "tiny.tflite", d / "tiny_edgetpu.tflite")
    (d / "tiny.labels").write_text("person\nbicycle\n")
    return {p.name: p.read_bytes() for p in d.iterdir()}, tpu


@pytest.fixture
def server(built):
    files = Files()
    files.data.update(built[0])
    srv, url = serve(files)
    files.url = url
    yield files
    srv.shutdown()
    srv.server_close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_table(role: str, name: str, data: bytes | None, verify: str = "sha256", **over) -> str:
    t = {"file": name, "verify": verify,
         "sha256": sha(data) if verify == "sha256" else "", "size": len(data) if data else 0}
    if role == "cpu":
        t["ops"] = ["TFLite_Detection_PostProcess"]
    if role == "edgetpu":
        t["ops"] = ["edgetpu-custom-op"]
    t.update(over)
    return f"[models.{{model}}.{role}]\n" + "".join(f"{k} = {fm._toml_value(v)}\n" for k, v in t.items())


def catalogue(tmp_path, files: Files, *, model="tiny", base=None, cpu=None, edgetpu=None, labels=None,
              extra="", input_shape=(1, GRID, GRID, 3)) -> Path:
    d = files.data
    cpu = cpu or file_table("cpu", "tiny.tflite", d["tiny.tflite"])
    edgetpu = edgetpu if edgetpu is not None else file_table("edgetpu", "tiny_edgetpu.tflite",
                                                             d["tiny_edgetpu.tflite"])
    labels = labels or file_table("labels", "tiny.labels", d["tiny.labels"])
    text = (f'base_url = "{base or files.url}"\n\n[models.{model}]\ntask = "vision"\n'
            f'decoder = "tflite_detection_postprocess"\nlicense = "Apache-2.0"\nsource = "built by the test"\n'
            + "\n".join(t.format(model=model) for t in (cpu, edgetpu, labels))
            + f"\n[models.{model}.tensors]\ninput_shape = {list(input_shape)}\ninput_type = \"uint8\"\n"
              f"outputs = 4\n[models.{model}.input]\nletterbox = false\nresize = \"bilinear\"\n"
              f"[models.{model}.params]\nscore_threshold = 0.5\nlabel_offset = 0\n" + extra)
    path = tmp_path / f"catalogue-{model}.toml"
    path.write_text(text)
    return path


def run(*args, catalogue_path: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), *map(str, args)]
    if catalogue_path is not None:
        cmd += ["--catalogue", str(catalogue_path)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


def one_error_line(res: subprocess.CompletedProcess) -> str:
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("fetch-models: ")
    return lines[0]


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.rglob("*") if p.name.endswith((".part", ".tmp")))


def image_with(cells: dict[tuple[int, int], tuple[int, int, int]], size: int = 240) -> np.ndarray:
    """A black frame with solid colour squares on the model's 8x8 grid (row, col) → RGB."""
    img = np.zeros((size, size, 3), np.uint8)
    step = size // GRID
    for (r, c), rgb in cells.items():
        img[r * step:(r + 1) * step, c * step:(c + 1) * step] = rgb
    return img


# --------------------------------------------------------------------------- fetching

def test_fetches_verifies_and_edged_runs_the_fetched_model(tmp_path, server, built):
    from edged.tpu import open_for_backend
    from edged.stages.vision import VisionStage

    dest = tmp_path / "models"
    res = run("--dest", dest, catalogue_path=catalogue(tmp_path, server))
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    for name in ("tiny.tflite", "tiny_edgetpu.tflite", "tiny.labels"):
        assert (dest / name).read_bytes() == server.data[name]
        assert f"tiny: {name}: ok" in res.stdout
    assert leftovers(dest) == []
    assert sorted(server.requests) == ["tiny.labels", "tiny.tflite", "tiny_edgetpu.tflite"]

    entry = load_manifest(dest)["tiny"]
    assert entry.path == dest / "tiny.tflite" and entry.sha256 == sha(server.data["tiny.tflite"])
    assert entry.edgetpu_path == dest / "tiny_edgetpu.tflite"
    assert entry.edgetpu_sha256 == sha(server.data["tiny_edgetpu.tflite"])
    assert entry.edgetpu_size == len(server.data["tiny_edgetpu.tflite"])
    assert entry.decoder == "tflite_detection_postprocess" and entry.labels == ["person", "bicycle"]
    assert entry.params == {"score_threshold": 0.5, "label_offset": 0}
    assert "fetched by scripts/fetch-models from " + server.url in entry.source
    assert "tiny.tflite sha256 pinned" in entry.source

    # The real TFLite_Detection_PostProcess op decodes the fetched model's output; the stage maps
    # its [ymin, xmin, ymax, xmax] to frame boxes and its class ids to labels.
    stage = VisionStage(open_model(entry), entry)
    found = stage.detect(image_with({(2, 5): (0, 255, 0), (6, 1): (0, 0, 220)}))
    assert [(o.label, round(o.score, 2)) for o in found] == [("person", 1.0), ("bicycle", 0.86)]
    assert np.allclose(found[0].box, (5 / 8, 2 / 8, 6 / 8, 3 / 8))
    assert np.allclose(found[1].box, (1 / 8, 6 / 8, 2 / 8, 7 / 8))
    assert stage.detect(image_with({})) == ()
    assert stage.detect(image_with({(4, 4): (255, 0, 0)})) == ()  # the background column

    # The compiled twin runs on the (fake) Edge TPU and finds the same.
    tpu = built[1]
    on_tpu = VisionStage(open_for_backend(entry, "usb", loader=tpu), entry)
    assert on_tpu.model.backend == "edgetpu:usb"
    assert on_tpu.detect(image_with({(2, 5): (0, 255, 0), (6, 1): (0, 0, 220)})) == found


def test_fetched_models_load_beside_the_shipped_ones(tmp_path, server):
    dest = tmp_path / "models"
    shutil.copytree(REPO / "models", dest, ignore=shutil.ignore_patterns("*.tflite", "*.npy"))
    before = (dest / "manifest.toml").read_bytes()
    res = run("--dest", dest, catalogue_path=catalogue(tmp_path, server))
    assert res.returncode == 0, res.stderr
    assert (dest / "manifest.toml").read_bytes() == before  # only manifest.d/ is written
    assert (dest / "manifest.d" / "tiny.toml").is_file()
    assert {"face", "person", "motion", "tiny"} <= set(load_manifest(dest))


def test_second_run_downloads_nothing(tmp_path, server):
    dest = tmp_path / "models"
    cat = catalogue(tmp_path, server)
    assert run("--dest", dest, catalogue_path=cat).returncode == 0
    drop_in = dest / "manifest.d" / "tiny.toml"
    stamp = drop_in.stat().st_mtime_ns
    server.requests.clear()
    res = run("--dest", dest, catalogue_path=cat)
    assert res.returncode == 0, res.stderr
    assert server.requests == []
    assert res.stdout.count("already present and verified") == 3
    assert "is up to date" in res.stdout and drop_in.stat().st_mtime_ns == stamp


def test_a_damaged_file_is_fetched_again(tmp_path, server):
    dest = tmp_path / "models"
    cat = catalogue(tmp_path, server)
    assert run("--dest", dest, catalogue_path=cat).returncode == 0
    (dest / "tiny.tflite").write_bytes(server.data["tiny.tflite"][:-10])
    server.requests.clear()
    res = run("--dest", dest, catalogue_path=cat)
    assert res.returncode == 0, res.stderr
    assert server.requests == ["tiny.tflite"]
    assert (dest / "tiny.tflite").read_bytes() == server.data["tiny.tflite"]


def test_cpu_only_skips_the_edge_tpu_variant(tmp_path, server):
    dest = tmp_path / "models"
    res = run("--dest", dest, "--cpu-only", catalogue_path=catalogue(tmp_path, server))
    assert res.returncode == 0, res.stderr
    assert "tiny_edgetpu.tflite" not in server.requests and not (dest / "tiny_edgetpu.tflite").exists()
    assert load_manifest(dest)["tiny"].edgetpu_path is None


def test_dry_run_writes_and_downloads_nothing(tmp_path, server):
    dest = tmp_path / "models"
    res = run("--dest", dest, "--dry-run", catalogue_path=catalogue(tmp_path, server))
    assert res.returncode == 0, res.stderr
    assert not dest.exists() and server.requests == []
    assert "tiny: tiny.tflite: would fetch" in res.stdout
    assert f"would write {dest / 'manifest.d' / 'tiny.toml'}" in res.stdout
    # once fetched, a dry run finds everything in place
    run("--dest", dest, catalogue_path=catalogue(tmp_path, server))
    listing = sorted(p.name for p in dest.rglob("*"))
    server.requests.clear()
    res = run("--dest", dest, "--dry-run", catalogue_path=catalogue(tmp_path, server))
    assert res.returncode == 0 and server.requests == []
    assert "is up to date" in res.stdout and sorted(p.name for p in dest.rglob("*")) == listing


# --------------------------------------------------------------------------- refusals

def test_wrong_sha256_is_refused_and_nothing_is_kept(tmp_path, server):
    dest = tmp_path / "models"
    wrong = file_table("cpu", "tiny.tflite", server.data["tiny.tflite"], sha256="0" * 64)
    res = run("--dest", dest, catalogue_path=catalogue(tmp_path, server, cpu=wrong))
    assert res.returncode == 1
    line = one_error_line(res)
    assert "tiny: tiny.tflite: sha256 " in line and "does not match the catalogue's 0000" in line
    assert not (dest / "tiny.tflite").exists() and not (dest / "manifest.d").exists()
    assert leftovers(dest) == []


def test_connection_closed_early_is_a_truncated_download(tmp_path, server):
    dest = tmp_path / "models"
    server.cut_at["tiny.tflite"] = 1000
    res = run("--dest", dest, catalogue_path=catalogue(tmp_path, server))
    assert res.returncode == 1
    assert "tiny: tiny.tflite: truncated download" in one_error_line(res)
    assert not (dest / "tiny.tflite").exists() and leftovers(dest) == []


def test_truncated_file_is_refused_by_its_size(tmp_path, server):
    dest = tmp_path / "models"
    server.data["tiny.tflite"] = server.data["tiny.tflite"][:-100]
    full = file_table("cpu", "tiny.tflite", server.data["tiny.tflite"] + b"x" * 100)
    res = run("--dest", dest, catalogue_path=catalogue(tmp_path, server, cpu=full))
    assert res.returncode == 1
    assert "bytes, the catalogue says" in one_error_line(res) and ": truncated" in res.stderr
    assert not (dest / "tiny.tflite").exists() and leftovers(dest) == []


def test_a_web_page_instead_of_a_model_is_refused(tmp_path, server):
    dest = tmp_path / "models"
    server.data["tiny.tflite"] = b"<!DOCTYPE html><html><body>Sign in to the network</body></html>"
    unpinned = file_table("cpu", "tiny.tflite", None, verify="size-and-structure")
    res = run("--dest", dest, catalogue_path=catalogue(tmp_path, server, cpu=unpinned))
    assert res.returncode == 1
    line = one_error_line(res)
    assert "not a TFLite model: no 'TFL3' identifier" in line and "web page" in line
    assert not (dest / "tiny.tflite").exists() and leftovers(dest) == []


def test_an_uncompiled_file_named_edgetpu_is_refused(tmp_path, server):
    dest = tmp_path / "models"
    server.data["tiny_edgetpu.tflite"] = server.data["tiny.tflite"]
    unpinned = file_table("edgetpu", "tiny_edgetpu.tflite", None, verify="size-and-structure")
    res = run("--dest", dest, catalogue_path=catalogue(tmp_path, server, edgetpu=unpinned))
    assert res.returncode == 1
    assert "named _edgetpu but contains no edgetpu-custom-op" in one_error_line(res)
    assert not (dest / "tiny_edgetpu.tflite").exists() and not (dest / "manifest.d").exists()


def test_a_model_with_other_tensors_is_refused(tmp_path, server):
    dest = tmp_path / "models"
    res = run("--dest", dest, catalogue_path=catalogue(tmp_path, server, input_shape=(1, 300, 300, 3)))
    assert res.returncode == 1
    assert "input 'image' is uint8[1, 8, 8, 3], the catalogue expects uint8[1, 300, 300, 3]" in one_error_line(res)


def test_a_stalled_server_times_out(tmp_path, server):
    dest = tmp_path / "models"
    server.stall.add("tiny.tflite")
    res = run("--dest", dest, "--timeout", "0.5", catalogue_path=catalogue(tmp_path, server))
    assert res.returncode == 1
    assert one_error_line(res).endswith(f"no data from {server.url}/tiny.tflite for 0.5 s (after 0 bytes)")
    assert leftovers(dest) == []


def test_http_error_is_one_line(tmp_path, server):
    cat = catalogue(tmp_path, server)
    del server.data["tiny.labels"]
    res = run("--dest", tmp_path / "models", catalogue_path=cat)
    assert res.returncode == 1
    assert one_error_line(res).endswith(f"HTTP 404 Not Found from {server.url}/tiny.labels")


def test_one_failing_model_does_not_stop_the_others(tmp_path, server):
    dest = tmp_path / "models"
    good = catalogue(tmp_path, server).read_text()
    bad = catalogue(tmp_path, server, model="broken",
                    labels=file_table("labels", "missing.labels", b"x\n")).read_text()
    both = tmp_path / "both.toml"
    both.write_text(good + bad.split("\n", 1)[1])  # one base_url line
    res = run("--dest", dest, catalogue_path=both)
    assert res.returncode == 1
    assert "broken: missing.labels: HTTP 404" in one_error_line(res)
    assert set(load_manifest(dest)) == {"tiny"}


# --------------------------------------------------------------------------- what is pinned

def test_unpinned_files_are_checked_and_their_sha256_is_printed(tmp_path, server):
    dest = tmp_path / "models"
    unpinned = file_table("cpu", "tiny.tflite", None, verify="size-and-structure")
    cat = catalogue(tmp_path, server, cpu=unpinned)
    res = run("--dest", dest, catalogue_path=cat)
    assert res.returncode == 0, res.stderr
    digest = sha(server.data["tiny.tflite"])
    assert f"NOT pinned: its sha256 is {digest}" in res.stdout
    assert load_manifest(dest)["tiny"].sha256 == digest
    # the sha256 recorded in the manifest is what makes the file count as present next time
    server.requests.clear()
    assert run("--dest", dest, catalogue_path=cat).returncode == 0 and server.requests == []


def test_git_blob_pin(tmp_path, server):
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    (tmp_path / "tiny.tflite").write_bytes(server.data["tiny.tflite"])
    blob = subprocess.run([git, "hash-object", str(tmp_path / "tiny.tflite")], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert fm.digests(server.data["tiny.tflite"])[1] == blob
    dest = tmp_path / "models"
    pinned = file_table("cpu", "tiny.tflite", server.data["tiny.tflite"], verify="git-blob", git_blob=blob)
    res = run("--dest", dest, catalogue_path=catalogue(tmp_path, server, cpu=pinned))
    assert res.returncode == 0, res.stderr
    assert f"upstream git blob id {blob[:12]}… matches" in res.stdout
    wrong = file_table("cpu", "tiny.tflite", server.data["tiny.tflite"], verify="git-blob", git_blob="1" * 40)
    res = run("--dest", tmp_path / "other", catalogue_path=catalogue(tmp_path, server, cpu=wrong))
    assert res.returncode == 1 and "does not match upstream's 1111" in one_error_line(res)
    # upstream's blob id outranks a wrong sha256 in the catalogue: the message says which is wrong
    bad_sha = file_table("cpu", "tiny.tflite", server.data["tiny.tflite"], sha256="2" * 64, git_blob=blob)
    res = run("--dest", tmp_path / "third", catalogue_path=catalogue(tmp_path, server, cpu=bad_sha))
    assert res.returncode == 1
    assert "matches upstream's git blob id but not the catalogue's sha256/size: fix" in one_error_line(res)


def test_shipped_catalogue_pins_every_file():
    models = fm.load_catalogue(REPO / "models" / "catalogue.toml")
    assert {"coco", "coco_mobiledet"} <= set(models)
    for m in models.values():
        assert m.decoder == "tflite_detection_postprocess" and m.task == "vision"
        assert set(m.files) == {"cpu", "edgetpu", "labels"}
        assert m.base_url.startswith("https://raw.githubusercontent.com/google-coral/test_data/")
        commit = m.base_url.rsplit("/", 1)[1]
        assert len(commit) == 40, "files must come from a fixed upstream commit, not a branch"
        for r in m.files.values():
            assert r.verify == "sha256" and len(r.sha256) == 64 and len(r.git_blob) == 40
        assert m.files["edgetpu"].name == m.files["cpu"].name.replace(".tflite", "_edgetpu.tflite")
        assert "edgetpu-custom-op" in m.files["edgetpu"].ops
        assert "TFLite_Detection_PostProcess" in m.files["cpu"].ops
    assert models["coco"].files["labels"] == models["coco_mobiledet"].files["labels"]


def test_list_shows_the_shipped_catalogue():
    res = run("--list")
    assert res.returncode == 0, res.stderr
    assert "coco  vision/tflite_detection_postprocess  input uint8[1, 300, 300, 3]" in res.stdout
    assert ("https://raw.githubusercontent.com/google-coral/test_data/104342d2d3480b3e66203073dac24f4e2dbb4c41/"
            "ssd_mobilenet_v2_coco_quant_postprocess_edgetpu.tflite") in res.stdout


# --------------------------------------------------------------------------- options and mistakes

def test_base_url_overrides_the_catalogue(tmp_path, server):
    cat = catalogue(tmp_path, server, base="http://127.0.0.1:9")  # the discard port: nothing answers
    res = run("--dest", tmp_path / "a", "--base-url", server.url, catalogue_path=cat)
    assert res.returncode == 0, res.stderr
    # a local directory (files carried over on a USB stick) works as a mirror too
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name, data in server.data.items():
        (mirror / name).write_bytes(data)
    server.requests.clear()
    res = run("--dest", tmp_path / "b", "--base-url", mirror, catalogue_path=cat)
    assert res.returncode == 0, res.stderr
    assert server.requests == [] and (tmp_path / "b" / "tiny_edgetpu.tflite").is_file()
    res = run("--dest", tmp_path / "c", catalogue_path=cat)
    assert res.returncode == 1 and "cannot reach http://127.0.0.1:9/" in one_error_line(res)


def test_catalogue_mistakes_are_one_line(tmp_path, server):
    cat = catalogue(tmp_path, server)
    text = cat.read_text()
    cat.write_text(text.replace('verify = "sha256"', 'verify = "size-and-structure"', 1))
    res = run("--dest", tmp_path / "m", catalogue_path=cat)
    assert res.returncode == 2
    assert "models.tiny.cpu: verify = \"size-and-structure\" means nothing is pinned" in one_error_line(res)
    cat.write_text(text.replace('decoder = "tflite_detection_postprocess"\n', ""))
    res = run("--dest", tmp_path / "m", catalogue_path=cat)
    assert res.returncode == 2 and one_error_line(res).endswith("models.tiny: missing key 'decoder'")
    res = run("--dest", tmp_path / "m", "nosuch", catalogue_path=catalogue(tmp_path, server))
    assert res.returncode == 2 and "unknown model 'nosuch'" in one_error_line(res)
    res = run("--catalogue", tmp_path / "absent.toml", "--list")
    assert res.returncode == 2 and "absent.toml: catalogue not found" in one_error_line(res)


def test_unusable_destination_is_one_line(tmp_path, server):
    blocker = tmp_path / "file"
    blocker.write_text("")
    res = run("--dest", blocker, catalogue_path=catalogue(tmp_path, server))
    assert res.returncode == 2 and one_error_line(res).endswith(f"{blocker}: not a directory")
    res = run("--dest", blocker / "sub", catalogue_path=catalogue(tmp_path, server))
    assert res.returncode == 2 and "cannot write there" in one_error_line(res)


def test_default_destination_is_the_configs_models_dir(tmp_path, server):
    config = tmp_path / "edged.toml"
    config.write_text(f'models_dir = "{tmp_path / "configured"}"\n')
    res = run("--config", config, catalogue_path=catalogue(tmp_path, server))
    assert res.returncode == 0, res.stderr
    assert "tiny" in load_manifest(tmp_path / "configured")


# --------------------------------------------------------------------------- pieces

def test_tflite_reader_agrees_with_the_runtime_and_survives_corruption():
    from edged.runtime import Model

    for name in ("person_ssdlite_int8.tflite", "motion.tflite", "face_detection_short_range.tflite"):
        data = (REPO / "models" / name).read_bytes()
        info = fm.inspect_tflite(data)
        model = Model(REPO / "models" / name)
        assert [t.shape for t in info.inputs] == [tuple(t.shape) for t in model.inputs]
        assert [t.name for t in info.outputs] == [t.name for t in model.outputs]
    data = (REPO / "models" / "motion.tflite").read_bytes()
    rng = np.random.default_rng(3)
    for i in range(400):
        bad = bytearray(data[: rng.integers(8, len(data))] if i % 2 else data)
        for at in rng.integers(0, len(bad), 4):
            bad[at] = int(rng.integers(0, 256))
        try:
            fm.inspect_tflite(bytes(bad))
        except ValueError:
            pass  # the only way it may fail


def test_manifest_writer_round_trips():
    table = {"file": 'we"ird\\name.tflite', "size": 3, "input": {"range": [-1.0, 1.0], "letterbox": False},
             "params": {"anchors": {"strides": [8, 16]}, "label": "über", "t": 0.1}}
    assert fm.manifest_text("m", table).startswith("# Written by scripts/fetch-models")


def test_drop_in_problems_name_their_file(tmp_path, server):
    dest = tmp_path / "models"
    assert run("--dest", dest, catalogue_path=catalogue(tmp_path, server)).returncode == 0
    twin = dest / "manifest.d" / "zz-twin.toml"
    twin.write_text((dest / "manifest.d" / "tiny.toml").read_text())
    with pytest.raises(ModelError, match=r"zz-twin.toml: models.tiny: model 'tiny' is already defined in .*tiny.toml"):
        load_manifest(dest)
    twin.write_text("[models.x\n")
    with pytest.raises(ModelError, match=r"manifest.d/zz-twin.toml: "):
        load_manifest(dest)
    twin.unlink()
    (dest / "manifest.d" / ".tiny.toml").write_text("[broken")  # hidden: e.g. an editor's or a partial write
    assert set(load_manifest(dest)) == {"tiny"}


def test_help_describes_every_option():
    res = run("--help")
    assert res.returncode == 0
    for option in ("--dest", "--config", "--catalogue", "--base-url", "--list", "--dry-run", "--cpu-only",
                   "--timeout"):
        assert option in res.stdout
