"""`edged reload`, the unit's ExecReload=: it signals the real daemon and waits for its outcome,
so `systemctl reload` returns once the new config is in service and fails when it was refused.

The daemon runs as systemd starts it, with RUNTIME_DIRECTORY set (RuntimeDirectory= in the
unit); `edged reload` runs as systemd runs ExecReload=, with the same variable and --pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

from conftest import ONE_MODEL, REPO, wait_until, write_config

from edged.service.reload import ReloadError, ReloadReporter, read_record, request_reload

FAST = "[camera]\nfps = 5\n[imu]\nspeed = 10\n"


def edged_reload(pid: int, runtime: os.PathLike, *extra: str, env_extra: dict | None = None):
    env = dict(os.environ, RUNTIME_DIRECTORY=str(runtime), **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "edged", "reload", "--pid", str(pid), *extra],
                          capture_output=True, text=True, timeout=120, env=env, cwd=REPO)


def start(cfg, log, runtime):
    env = dict(os.environ, PYTHONUNBUFFERED="1", RUNTIME_DIRECTORY=str(runtime))
    env.pop("NOTIFY_SOCKET", None)
    return subprocess.Popen([sys.executable, "-m", "edged", "run", "--config", str(cfg)],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env, cwd=REPO)


def test_reload_waits_for_the_daemon_and_tells_the_outcome(tmp_path, broker, subscriber):
    models = tmp_path / "models"
    shutil.copytree(REPO / "models", models)
    cfg = write_config(tmp_path / "edged.toml", broker, extra=f'models_dir = "{models}"\n' + ONE_MODEL + FAST)
    base = cfg.read_text()
    runtime = tmp_path / "run"
    runtime.mkdir()
    log = tmp_path / "daemon.log"
    proc = start(cfg, log, runtime)
    labels = lambda: {o["label"] for m in subscriber.json("detections") for o in m["objects"]}  # noqa: E731
    try:
        assert subscriber.wait(lambda: "face" in labels(), 60), log.read_text()
        rec = read_record(runtime)
        assert rec is not None and rec.pid == proc.pid and rec.begun == 0

        # A good change: when `edged reload` returns, the daemon has already swapped it in.
        cfg.write_text(base.replace('model = "face"', 'model = "person"'))
        res = edged_reload(proc.pid, runtime)
        assert res.returncode == 0, res.stderr
        assert "the new configuration is in service" in res.stdout
        assert log.read_text().count("msg=reloaded") == 1  # written before the outcome was recorded
        assert subscriber.wait(lambda: "person" in labels(), 30)

        # A config edged refuses: exit 1 with the reason, the running pipeline untouched.
        cfg.write_text(base.replace('model = "face"', 'model = "person"\nscore_threshold = 7'))
        res = edged_reload(proc.pid, runtime)
        assert res.returncode == 1
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("edged: reload: reload refused"), res.stderr
        assert "score_threshold" in lines[0]
        # A damaged model: refused the same way.
        person = models / "person_ssdlite_int8.tflite"
        person.write_bytes(person.read_bytes()[:-100])
        cfg.write_text(base.replace('model = "face"', 'model = "person"\nthreads = 1'))
        res = edged_reload(proc.pid, runtime)
        assert res.returncode == 1 and "truncated or replaced" in res.stderr, res.stderr
        n = len(subscriber.json("detections"))
        assert subscriber.wait(lambda: len(subscriber.json("detections")) >= n + 2, 20)
        assert proc.poll() is None and log.read_text().count("msg=starting") == 1

        rec = read_record(runtime)
        assert (rec.begun, rec.finished, rec.ok) == (3, 3, False)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)


def test_a_daemon_that_goes_away_is_not_waited_for(tmp_path):
    runtime = tmp_path / "run"
    runtime.mkdir()
    # A process that takes SIGHUP and exits, as a crash during reload would look.
    child = subprocess.Popen([sys.executable, "-c", "import signal, time\n"
                              "signal.signal(signal.SIGHUP, lambda *a: exit(3))\n"
                              "print('up', flush=True)\ntime.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "up\n"
        res = edged_reload(child.pid, runtime, "--timeout", "60")
        assert res.returncode == 1
        assert res.stderr.strip() == f"edged: reload: process {child.pid} exited during the reload"
    finally:
        child.kill()
        child.wait()
    res = edged_reload(child.pid, runtime)
    assert res.returncode == 1 and f"no process {child.pid} to reload" in res.stderr


def test_a_stale_record_from_an_earlier_daemon_is_ignored(tmp_path):
    runtime = tmp_path / "run"
    runtime.mkdir()
    old = ReloadReporter(runtime, pid=os.getpid() + 1_000_000)  # a restarted service's predecessor
    old.begin()
    old.finish(False, "old news")
    # This process plays the daemon: SIGHUP -> a reload that succeeds.
    me = ReloadReporter(runtime)

    def on_hup(signum, frame):
        me.begin()
        me.finish(True)

    previous = signal.signal(signal.SIGHUP, on_hup)
    try:
        assert request_reload(os.getpid(), runtime, timeout=30).ok
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_no_answer_is_a_failure_not_a_success(tmp_path):
    runtime = tmp_path / "run"
    runtime.mkdir()
    previous = signal.signal(signal.SIGHUP, lambda *a: None)  # ignores reloads entirely
    try:
        try:
            request_reload(os.getpid(), runtime, timeout=0.5)
        except ReloadError as exc:
            assert "no reload outcome" in str(exc) and "reload.json" in str(exc)
        else:
            raise AssertionError("a daemon that never answers was taken for a reload")
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_without_the_runtime_directory_it_says_what_to_do():
    env = {k: v for k, v in os.environ.items() if k != "RUNTIME_DIRECTORY"}
    res = subprocess.run([sys.executable, "-m", "edged", "reload", "--pid", str(os.getpid())],
                         capture_output=True, text=True, timeout=60, env=env, cwd=REPO)
    assert res.returncode == 2
    assert "RUNTIME_DIRECTORY is not set" in res.stderr and "systemctl reload edged" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_a_damaged_record_reads_as_no_record(tmp_path):
    (tmp_path / "reload.json").write_text('{"pid": 12, "begun": ')
    assert read_record(tmp_path) is None
    (tmp_path / "reload.json").write_text('{"pid": "x", "begun": 1, "finished": 1, "ok": true}')
    assert read_record(tmp_path) is None
