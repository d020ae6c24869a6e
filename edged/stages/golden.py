"""Golden self-test vectors for a release, from real inputs through the stages' own preprocessing.

`edged release add` measures them here (the cloud package may not import the stages): the
inputs are exactly what this edged feeds its models — shipped sample photos through the vision
preprocessing, windows of the shipped IMU recording through the motion windowing — and the
outputs are the model's for them on this machine's runtime. The format and the device's check
are `edged.selftest`.
"""

from __future__ import annotations

from pathlib import Path

from edged.selftest import DEFAULT_TOLERANCE, Golden, SelfTestError, measure

VECTORS = 3  # golden inputs measured per release


def measure_release(model: Path, inputs: list[Path] | None = None,
                    tolerance: float = DEFAULT_TOLERANCE) -> Golden:
    """Golden vectors for model file `model` (an entry of the manifest beside it) from real inputs:
    images (vision) or an IMU CSV (motion), by default the shipped samples, fed through the
    device's own preprocessing to the model as it takes them."""
    from edged.config import _samples_dir
    from edged.models import ModelError, load_manifest
    from edged.runtime import Model

    model = Path(model)
    entry = next((e for e in load_manifest(model.parent).values() if e.path.name == model.name), None)
    if entry is None:
        raise ModelError(f"{model}: not listed in the manifest beside it ({model.parent / 'manifest.toml'})")
    m = Model(model, threads=1)
    samples = _samples_dir()
    vectors: list = []
    if entry.task == "vision":
        import numpy as np
        from PIL import Image

        from edged.stages.vision import VisionStage

        stage = VisionStage(m, entry)
        paths = inputs or sorted((samples / "images").glob("*.jpg"))[:VECTORS]
        for p in paths:
            try:
                with Image.open(p) as im:
                    image = np.asarray(im.convert("RGB"))
            except OSError as exc:
                raise SelfTestError(f"{p}: cannot read image: {exc}") from None
            stage.detect(image)
            vectors.append(m.input_buffer(0).copy())
    else:
        vectors = _motion_vectors(m, entry, (inputs or [samples / "imu" / "basicmotions_demo.csv"])[0])
    if not vectors:
        raise SelfTestError(f"{model}: no self-test inputs could be made (give --inputs)")
    return measure(m, vectors, tolerance)


def _motion_vectors(m, entry, csv: Path) -> list:
    import numpy as np

    from edged.records import ImuBatch
    from edged.stages.motion import MotionStage

    try:
        rows = np.loadtxt(csv, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
    except (OSError, ValueError) as exc:
        raise SelfTestError(f"{csv}: cannot read IMU CSV: {exc}") from None
    stage = MotionStage(m, entry)
    windows = []
    for i in range(0, len(rows), 50):
        chunk = rows[i:i + 50]
        if stage.push(ImuBatch(chunk[:, 0].copy(), chunk[:, 1:7].astype(np.float32))):
            windows.append(m.input_buffer(0).copy())
    step = max(1, len(windows) // VECTORS)
    return windows[::step][:VECTORS]
