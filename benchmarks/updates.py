"""Model updates (issue 13): what the updater costs a device, and how fast a rollout reaches a fleet.

A repository built by `edged.cloud.releases` is served by a plain HTTP server on loopback.

- bytes per metadata refresh: what one update check downloads when nothing changed (the
  timestamp; snapshot and targets come from the device's trusted cache), and the first check of a
  new device (root, timestamp, snapshot, targets, channel);
- CPU per check and memory: the process's CPU time over a run of checks, and the resident memory
  that python-tuf and one check add to an interpreter that already has edged's model stack loaded
  (a subprocess, so that nothing else in this process counts);
- bytes for a small artefact: what one device (motion only) fetches to install the shipped motion
  centroids released alone (`edged release artefact`), metadata included;
- time to 100 %: N simulated devices — each the real `Updater` with its own state directory and
  device id, its background thread polling; the daemon's swap is acknowledged at once, since only
  the fetch, verify and self-test path is being measured — from `rollout --percent 100` until every
  device has the release staged and self-tested: polling (each device's timer, started at random
  phases) and announced (every device poked at once, as `cmd/update` does).
"""

from __future__ import annotations

import functools
import http.server
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import REPO, Figure

FACE = REPO / "models" / "face_detection_short_range.tflite"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _serve(root: Path) -> http.server.ThreadingHTTPServer:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def _config(state: Path, url: str, root_json: Path, device_id: str, poll_s: float):
    from edged import config

    return config.parse(f'device_id = "{device_id}"\nstate_dir = "{state}"\n[imu]\nenabled = false\n'
                        f'[updates]\nurl = "{url}"\nroot_json = "{root_json}"\npoll_interval_s = {poll_s}\n',
                        "bench.toml")


class _SimDevice:
    """The real updater with its swap acknowledged at once (no pipeline is being measured)."""

    def __init__(self, cfg, version: int) -> None:
        from edged.service.updater import Updater

        self.version = version  # the release whose arrival is timed
        self.up = Updater(cfg)
        self.up.on_start()
        self.done_at: float | None = None
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._service, daemon=True)

    def start(self) -> None:
        self.up.start()
        self._t.start()

    def _service(self) -> None:
        while not self._stop.is_set():
            try:
                staged = self.up._staged.get(timeout=0.05)
            except Exception:
                continue
            if staged.version == self.version:
                self.done_at = time.monotonic()
            staged.ok = True
            staged.done.set()

    def stop(self) -> None:
        self._stop.set()
        self.up.stop(clean=True)


def _fleet_time(repo, url: str, work: Path, n: int, poll_s: float, announce: bool, version: int,
                timeout: float) -> float:
    devices = [_SimDevice(_config(work / f"dev{i}", url, repo.path / "root.json", f"sim-{i:03d}", poll_s),
                          version) for i in range(n)]
    rng = random.Random(13)
    try:
        for d in devices:  # random phases, as devices that booted at different times
            d.start()
            time.sleep(rng.uniform(0, poll_s / n))
        end = time.monotonic() + timeout
        while any(d.up.checks < 1 for d in devices) and time.monotonic() < end:
            time.sleep(0.05)
        repo.rollout("face", version, 100.0)
        repo.publish()
        t0 = time.monotonic()
        if announce:
            for d in devices:
                d.up.poke()
        while any(d.done_at is None for d in devices) and time.monotonic() < end:
            time.sleep(0.05)
        missing = sum(d.done_at is None for d in devices)
        if missing:
            raise RuntimeError(f"{missing} of {n} devices did not update within {timeout:.0f} s")
        return max(d.done_at for d in devices) - t0
    finally:
        for d in devices:
            d.stop()


def _artefact_bytes(repo, url: str, work: Path) -> int:
    """Bytes one motion device fetches for a centroids release, from a check that finds it
    offered to the swap acknowledged (metadata refresh, channel, descriptor and file)."""
    from edged import config

    cfg = config.parse(f'device_id = "art"\nstate_dir = "{work / "art"}"\n[camera]\nenabled = false\n'
                       f'[updates]\nurl = "{url}"\nroot_json = "{repo.path / "root.json"}"\n'
                       'poll_interval_s = 3600\n', "bench.toml")
    d = _SimDevice(cfg, 1)
    d.up.check()  # the device knows the repository already
    before = d.up.bytes_fetched
    repo.add_artefact(REPO / "models" / "motion.centroids.json", "centroids", version=1)
    repo.rollout("motion", 1, 100.0, kind="centroids")
    repo.publish()
    d.start()  # its first round finds the centroids
    end = time.monotonic() + 60
    while d.done_at is None and time.monotonic() < end:
        time.sleep(0.02)
    d.stop()
    if d.done_at is None:
        raise RuntimeError("the centroids release was not installed within 60 s")
    return d.up.bytes_fetched - before


def _memory_kb(url: str, root_json: Path, state: Path) -> tuple[int, int]:
    """(resident memory with edged's model stack loaded, the same after python-tuf and one check), KiB."""
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import paho.mqtt.client, sqlite3\n"  # what the daemon has loaded anyway (paho brings ssl)
        "from edged.runtime import Model\n"
        f"m = Model({str(FACE)!r}, threads=1)\n"
        "def rss():\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:'))\n"
        "before = rss()\n"
        "from edged import config\n"
        "from edged.service.updater import Updater\n"
        f"cfg = config.parse('device_id = \"mem\"\\nstate_dir = \"{state}\"\\n[imu]\\nenabled = false\\n"
        f"[updates]\\nurl = \"{url}\"\\nroot_json = \"{root_json}\"\\n', 'bench.toml')\n"
        "up = Updater(cfg); up.on_start(); up.check()\n"
        "print(before, rss())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    before, after = out.stdout.split()
    return int(before), int(after)


def updates(quick: bool = False, workdir: Path | None = None) -> list[Figure]:
    from edged.cloud.releases import Repository
    from edged.service.updater import Updater
    from edged.stages.golden import measure_release

    n, poll_s, checks = (5, 2.0, 5) if quick else (50, 10.0, 50)
    with tempfile.TemporaryDirectory(prefix="edged-bench-") as tmp:
        work = Path(workdir or tmp)
        repo = Repository.init(work / "repo")
        golden = measure_release(FACE)
        repo.add(FACE, version=2, golden=golden)
        repo.add(FACE, version=3, golden=golden)
        repo.rollout("face", 2, 0.0)  # a channel, offering nothing yet
        repo.publish()
        httpd = _serve(repo.public)
        url = f"http://127.0.0.1:{httpd.server_port}"
        try:
            up = Updater(_config(work / "one", url, repo.path / "root.json", "bench-1", 3600))
            up.on_start()
            up.check()
            first = up.bytes_fetched
            c0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.monotonic()
            for _ in range(checks):
                up.check()
            c1 = resource.getrusage(resource.RUSAGE_SELF)
            wall = time.monotonic() - t0
            per_check = (up.bytes_fetched - first) / checks
            cpu_ms = ((c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)) / checks * 1000
            before_kb, after_kb = _memory_kb(url, repo.path / "root.json", work / "mem")
            artefact = _artefact_bytes(repo, url, work)
            polled = _fleet_time(repo, url, work / "poll", n, poll_s, False, 2, timeout=poll_s * 3 + 120)
            announced = _fleet_time(repo, url, work / "announce", n, poll_s, True, 3, timeout=poll_s * 3 + 120)
        finally:
            httpd.shutdown()
            httpd.server_close()
            shutil.rmtree(work / "poll", ignore_errors=True)
    idle_share = cpu_ms / 1000 / 3600 * 100  # at the default poll interval of an hour
    return [
        Figure("updates", "bytes per metadata refresh, nothing new", round(per_check), "B",
               note=f"mean of {checks} checks; the first check of a new device: {first} B"),
        Figure("updates", "bytes to install a centroids release", artefact, "B",
               note="the shipped motion centroids released alone: metadata refresh, channel, descriptor, file"),
        Figure("updates", "CPU per update check, nothing new", round(cpu_ms, 1), "ms",
               note=f"{checks} checks in {wall:.2f} s; at poll_interval_s = 3600 that is "
                    f"{idle_share:.5f} % of a core"),
        Figure("updates", "memory added by the updater", round((after_kb - before_kb) / 1024, 1), "MiB",
               note=f"resident {before_kb / 1024:.1f} MiB with paho, sqlite3 and the face model loaded, "
                    f"{after_kb / 1024:.1f} MiB after importing python-tuf and one check"),
        Figure("updates", f"rollout to 100 % of {n} devices, polling every {poll_s:g} s", round(polled, 1), "s",
               note="real updaters (fetch, verify, self-test) with their swap acknowledged"),
        Figure("updates", f"rollout to 100 % of {n} devices, announced", round(announced, 1), "s",
               note="every device poked at once, as cmd/update does; one machine serves and runs all"),
    ]
