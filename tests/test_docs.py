"""The docs against the code: every config block, every command line and every `edged …` the
README and docs/*.md show is checked here, so a claim in them cannot drift from what edged does.

- ```toml blocks that are edged configs parse with edged's own loader (a file they name may be
  missing here); the README's "All keys" block is a complete config whose values are the defaults;
- every `edged …` (in ```sh blocks and in `inline code`) names a real command and only options
  that command has; `make X` names a Makefile target; `scripts/X --flag` a script with that flag;
- the doctor example in docs/hardware.md shows the statuses and totals doctor really prints.
"""

from __future__ import annotations

import argparse
import re
import shlex
import tomllib
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

from conftest import REPO, free_port
from edged import config
from edged.cli import build_parser

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(lang: str) -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for m in FENCE.finditer(text):
            if m.group(1) == lang:
                out.append((f"{doc.name}:{text[:m.start()].count(chr(10)) + 1}", m.group(2)))
    return out


def inline_code(doc: Path) -> list[str]:
    text = FENCE.sub("", doc.read_text())
    return re.findall(r"`([^`\n]+)`", text)


# -------------------------------------------------------------------------------- configs

def config_blocks() -> list[tuple[str, str]]:
    """The toml blocks that are edged configs (not manifest tables such as [models.x])."""
    return [(where, body) for where, body in blocks("toml") if not re.search(r"^\[models\.", body, re.M)]


@pytest.mark.parametrize("where, body", config_blocks(), ids=[w for w, _ in config_blocks()])
def test_every_config_block_is_a_valid_config(where, body, tmp_path):
    try:
        if re.search(r"^\[(ingest|database)\]", body, re.M):  # the cloud worker's own file
            from edged.cloud import ingest

            path = tmp_path / "ingest.toml"
            path.write_text(body)
            ingest.load(path)
        else:
            config.parse(body, where)
    except config.ConfigError as exc:
        # Files an example names (certificates, footage) need not exist on this machine.
        real = [p for p in exc.problems if "file not found" not in p and ": not found:" not in p]
        assert not real, real


def _all_keys_block() -> str:
    readme = (REPO / "README.md").read_text()
    start = readme.index("All keys, with their defaults")
    return FENCE.search(readme, start).group(2)


def _schema_keys(cls=config.Config, prefix="") -> dict[str, object]:
    out = {}
    default = cls()
    for f in fields(cls):
        if f.metadata.get("internal"):
            continue
        value = getattr(default, f.name)
        if is_dataclass(value):
            out.update(_schema_keys(type(value), f"{f.name}."))
        else:
            out[prefix + f.name] = value
    return out


def test_readme_lists_every_key_with_its_default():
    block = _all_keys_block()
    doc = tomllib.loads(block)
    config.parse(block, "README.md")  # valid as it stands: it can be pasted
    shown, table, element_keys = set(), "", set()
    for line in block.splitlines():
        m = re.match(r"^\[(\w+)\]", line)
        if m:
            table = m.group(1) + "."
        m = re.match(r"^#?\s?\[\[(\w+)\.(\w+)\]\]", line)  # an array of tables, e.g. [[vision.stages]]
        if m:
            shown.add(f"{m.group(1)}.{m.group(2)}")
            table = None
            continue
        m = re.match(r"^#?\s?(\w+) = ", line)  # a key, set or commented out with an example
        if m:
            if table is None:
                element_keys.add(m.group(1))
            else:
                shown.add(table + m.group(1))
    assert element_keys <= {f.name for f in fields(config.VisionStageConfig)}, element_keys
    schema = _schema_keys()
    assert shown == set(schema), f"missing: {set(schema) - shown}, unknown: {shown - set(schema)}"
    for key, default in schema.items():
        table, _, leaf = key.rpartition(".")
        section = doc.get(table, {}) if table else doc
        if leaf in section:  # set in the block: it must be the real default
            assert section[leaf] == default, f"README.md says {key} = {section[leaf]!r}, the default is {default!r}"


def test_config_defaults_prints_a_config_check_config_accepts(tmp_path):
    from edged.cli import main

    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["config", "--defaults"]) == 0
    path = tmp_path / "defaults.toml"
    path.write_text(out.getvalue())
    cfg = config.load(path)
    cfg.source_path = config.Config().source_path
    assert cfg == config.Config()
    # And a file's config, every key filled in, reads back to the same config.
    small = tmp_path / "small.toml"
    small.write_text('device_id = "pi-kitchen"\n[mqtt]\nport = 8883\n[homeassistant]\nlabels = ["face"]\n'
                     '[[vision.stages]]\nname = "people"\nmodel = "person"\ntiles = 2\n'
                     '[[vision.stages]]\nname = "faces"\nmodel = "face"\ninput = "person@people"\n')
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["config", "--config", str(small)]) == 0
    path.write_text(out.getvalue())
    again, first = config.load(path), config.load(small)
    again.source_path = first.source_path
    assert again == first and [st.name for st in again.vision.stages] == ["people", "faces"]


# -------------------------------------------------------------------------------- commands

def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def check_edged_line(words: list[str]) -> str | None:
    """None when `edged WORDS…` names a real command with only options it has; else why not."""
    parser = build_parser()
    path = ["edged"]
    i = 0
    while i < len(words):
        subs = _subparsers(parser)
        if subs and not words[i].startswith("-") and words[i] in subs:
            parser = subs[words[i]]
            path.append(words[i])
            i += 1
            continue
        if subs and not words[i].startswith("-") and not _placeholder(words[i]):
            return f"{' '.join(path)}: no command {words[i]!r} (has {', '.join(subs)})"
        break
    if _subparsers(parser) and i == len(words) and path == ["edged"]:
        return None
    options = {s for a in parser._actions for s in a.option_strings}
    for w in words[i:]:
        flag = w.split("=", 1)[0]
        if flag.startswith("--") and flag not in options:
            return f"{' '.join(path)}: no option {flag} (has {', '.join(sorted(options))})"
    return None


def _placeholder(word: str) -> bool:
    return word.isupper() or word.endswith(("...", "…")) or word.startswith("<")


def _words(command: str) -> list[str]:
    command = command.replace("[", " ").replace("]", " ").replace("|", " ")
    try:
        return shlex.split(command, comments=True)
    except ValueError:
        return command.split()


EDGED = re.compile(r"^(?:sudo\s+(?:-u\s+\S+\s+)?)?(?:\S*/)?edged(?:\s|$)")


def command_lines() -> list[tuple[str, str]]:
    out = []
    for where, body in blocks("sh"):
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append((where, line))
    for doc in DOCS:
        for code in inline_code(doc):
            if (EDGED.match(code) and " / " not in code) or code.startswith(("make ", "scripts/")):
                out.append((doc.name, code))
    return out


def check_line(line: str) -> str | None:
    words = _words(line)
    while words and (words[0] == "sudo" or re.match(r"^\w+=", words[0])):
        words = words[1:]
    if not words:
        return None
    prog = words[0]
    if prog == "edged" or prog.endswith("/edged"):
        return check_edged_line(words[1:])
    if prog == "make":
        targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M))
        bad = [t for t in words[1:] if "=" not in t and t not in targets]
        return f"make: no target {bad}" if bad else None
    script = next((w for w in words[:3] if re.match(r"^(scripts|benchmarks)/", w)), None)
    if script:
        path = REPO / script
        if path.is_dir():
            return None
        if not path.is_file():
            return f"{script}: no such script"
        text = path.read_text()
        bad = [w.split("=", 1)[0] for w in words[words.index(script) + 1:]
               if w.startswith("--") and f'"{w.split("=", 1)[0]}"' not in text]
        return f"{script}: no option {bad}" if bad else None
    return None  # not ours (apt, systemctl, mosquitto_sub, …)


@pytest.mark.parametrize("where, line", command_lines(), ids=[f"{w}: {x[:60]}" for w, x in command_lines()])
def test_every_command_the_docs_show_exists(where, line):
    assert check_line(line) is None, f"{where}: {line}: {check_line(line)}"


def test_the_command_check_catches_what_it_should():
    """The checks above can fail: made-up commands, options and targets are caught."""
    assert check_line("edged signatures build sigs.jsonl --unknown-margin 2") is not None
    assert check_line("edged frobnicate") is not None
    assert check_line("make frobnicate") is not None
    assert check_line("scripts/provision --no-such-flag") is not None
    assert check_line("edged subscribe --host H --db FILE") is None
    assert check_line("sudo /opt/edged/venv/bin/edged check-config /etc/edged/edged.toml") is None


def test_signatures_build_defaults_are_the_librarys():
    from edged.cloud import signatures

    b = _subparsers(_subparsers(build_parser())["signatures"])["build"]
    defaults = {a.dest: a.default for a in b._actions}
    assert defaults["quantile"] == signatures.DEFAULT_QUANTILE
    assert defaults["margin"] == signatures.DEFAULT_MARGIN


# -------------------------------------------------------------------------------- doctor example

def test_doctor_example_shows_what_doctor_prints(tmp_path):
    from edged.service import doctor

    hw = (REPO / "docs" / "hardware.md").read_text()
    start = hw.index("$ edged doctor --config edged.toml")
    example = hw[start:hw.index("```", start)]
    cfg_text = FENCE.findall(hw[:start])[-1][1]  # the config shown just above it
    cfg = config.parse(f'state_dir = "{tmp_path / "state"}"\n' + cfg_text
                       + f"\n[mqtt]\nport = {free_port()}\n", "edged.toml")  # no broker there
    root = tmp_path / "root"
    for d in ("dev", "etc", "sys/bus/usb/devices"):
        (root / d).mkdir(parents=True)
    (root / "etc/group").write_text("root:x:0:\n")
    env = doctor.Env(root=root, user="root", uid=0, load_library=lambda name: (False, f"{name}: not here"))
    checks = doctor.run(cfg, config_path="edged.toml", env=env)
    real = [(c.status.upper() if c.status in ("fail", "warn") else c.status, c.name) for c in checks]
    shown = re.findall(r"^(ok|info|WARN|FAIL)\s+(\S+(?: nodes| buses)?)\s", example, re.M)
    assert shown == real
    fails, warns = (sum(c.status == s for c in checks) for s in ("fail", "warn"))
    assert f"{fails} failed, {warns} warning(s): not ready" in example


# -------------------------------------------------------------------------------- example code

def test_the_example_subscriber_in_mqtt_md_works(tmp_path, broker, daemon_factory):
    import subprocess
    import sys

    from conftest import wait_until, write_config

    examples = [body for where, body in blocks("python") if where.startswith("mqtt.md")]
    assert len(examples) == 1
    script = tmp_path / "example.py"
    script.write_text(examples[0])
    out = tmp_path / "example.out"
    proc = subprocess.Popen([sys.executable, str(script), broker.host, str(broker.port)],
                            stdout=out.open("w"), stderr=subprocess.STDOUT)
    try:
        cfg = write_config(tmp_path / "edged.toml", broker, extra="[camera]\nfps = 5\n[imu]\nspeed = 10\n",
                           mqtt='codec = "cbor"\n', vision="")  # the defaults: track events
        d = daemon_factory(cfg).start()
        # The example subscribes after it connects: once it has printed the device's status, it
        # prints what follows; wait for a face's track event and a motion line.
        assert wait_until(lambda: "test-dev is online" in out.read_text()
                          and re.search(r"^test-dev \d+ new face \d+$", out.read_text(), re.M)
                          and re.search(r"^test-dev \d+ (standing|walking|running|badminton) [\d.]+$",
                                        out.read_text(), re.M), 60), out.read_text() + d.output()
        assert d.stop() == 0
        assert wait_until(lambda: "test-dev is offline" in out.read_text(), 10), out.read_text()
        assert "Traceback" not in out.read_text()
    finally:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------ docs/hardware.md's figures

def hardware_claims() -> list[tuple[str, str]]:
    """(what docs/hardware.md says, where the code says it), each phrase built from the code."""
    from edged.fakes.imu import SimClock, make_factory
    from edged.sources.camera import v4l2
    from edged.sources.camera.live import MAX_FRAME_AGE_S
    from edged.sources.imu import SETUP_ATTEMPTS, bmi160, mpu6050
    from edged.sources.imu import source as imu_source
    from edged.sources.imu.position import SAVE_EVERY_S
    from edged.sources.imu.source import ImuSource

    frames = {c: ImuSource(smbus_factory=make_factory(c, clock=SimClock())).settings
              for c in ("mpu6050", "mpu6500", "bmi160", "lsm6ds3", "lsm6dsl", "lsm6dsox")}
    unit = (REPO / "systemd" / "edged.service").read_text()
    restart = re.search(r"^RestartSec=(\S+)$", unit, re.M).group(1)
    claims = [
        (f"sleeps until about {imu_source.BURST_S * 1000:.0f} ms of samples", "source.BURST_S"),
        (f"after {imu_source.RATE_BASELINE_S:g} s edged measures the real period", "source.RATE_BASELINE_S"),
        (f"(at most {imu_source.SLEW * 100:.0f} % of a period per sample)", "source.SLEW"),
        (f"If the FIFO stays empty for {imu_source.STALL_S:g} s", "source.STALL_S"),
        (f"after {SETUP_ATTEMPTS} setups edged refuses", "imu.SETUP_ATTEMPTS"),
        (f"gyroscope start-up {mpu6050.GYRO_STARTUP_S['mpu6050'] * 1000:.0f} ms (6050) / "
         f"{mpu6050.GYRO_STARTUP_S['mpu6500'] * 1000:.0f} ms (6500 family)", "mpu6050.GYRO_STARTUP_S"),
        (f"`RestartSec={restart}`", "systemd/edged.service"),
        ("(replaced atomically about once a second" if SAVE_EVERY_S == 1.0 else "?", "position.SAVE_EVERY_S"),
        (f"at least {v4l2.WAITED:.0%} of a camera period".replace("25%", "a quarter"), "v4l2.WAITED"),
        (f"within {v4l2.FRESH_PERIODS:g} camera periods of that delay", "v4l2.FRESH_PERIODS"),
        (f"at most {v4l2.DRAIN_MAX} times per\nread", "v4l2.DRAIN_MAX"),
        (f"more than {MAX_FRAME_AGE_S:g} s old is not\non the monotonic clock", "live.MAX_FRAME_AGE_S"),
        (f"≥ {bmi160.SUSPENDED_WRITE_GAP_S * 1e6 - 50:.0f} µs between register writes", "bmi160.SUSPENDED_WRITE_GAP_S (500 µs, 50 µs of margin)"),
        (f"the FIFO holds\n  {frames['mpu6050'].fifo_frames} samples on the MPU-6050 and BMI160 "
         f"({frames['mpu6050'].fifo_frames / frames['mpu6050'].rate_hz:.2f} s at 100 Hz), "
         f"{frames['mpu6500'].fifo_frames} on the MPU-6500/9250", "fifo_frames"),
        (f"for {frames['lsm6ds3'].fifo_frames} on the LSM6DS3/DSL and {frames['lsm6dsox'].fifo_frames} on the LSM6DSOX "
         f"({frames['lsm6ds3'].fifo_frames / frames['lsm6ds3'].rate_hz:.1f} s / "
         f"{frames['lsm6dsox'].fifo_frames / frames['lsm6dsox'].rate_hz:.1f} s at 104 Hz)", "fifo_frames"),
    ]
    assert frames["bmi160"].fifo_frames == frames["mpu6050"].fifo_frames
    assert frames["lsm6dsl"].fifo_frames == frames["lsm6ds3"].fifo_frames
    # the supported-chips table: "1024 B = 85 samples" per part
    for chip, size in (("mpu6050", "1024 B"), ("mpu6500", "512 B"), ("bmi160", "1024 B"), ("lsm6dsl", "4 kB")):
        claims.append((f"{size} = {frames[chip].fifo_frames} samples |", f"{chip} fifo_frames"))
    claims.append((f"planned as 512 words = {frames['lsm6dsox'].fifo_frames} samples |", "lsm6dsox fifo_frames"))
    return claims


def test_hardware_md_figures_are_the_codes():
    text = (REPO / "docs" / "hardware.md").read_text()
    flat = re.sub(r"\s+", " ", text)
    missing = [f"{phrase!r} ({where})" for phrase, where in hardware_claims()
               if re.sub(r"\s+", " ", phrase) not in flat]
    assert not missing, "docs/hardware.md does not say:\n" + "\n".join(missing)
