"""The cloud side at fleet scale: simulated devices → mosquitto → `edged ingest` workers →
PostgreSQL (fsync on), all on this machine.

1. fleet: N simulated devices (each its own MQTT connection; one motion window a second and a
   detection every 5 s each, payloads from the project's codec, half JSON, half CBOR) for S
   seconds into two workers of one group. Figures: missing rows (goal 0), duplicate rows (goal
   0), latency from a result's device `ts` to its committed row (`received_at`), worker CPU per
   1,000 results, worker peak memory.
2. throughput: a backlog queued on the broker for one worker, then for two workers of one group
   (their sessions exist, the workers are stopped while it is published), drained as fast as
   they go. Figures: results/s for one worker, for two, and the ratio; PostgreSQL rows/s.

Sizes: EDGED_BENCH_DEVICES (default 1000) and EDGED_BENCH_SECONDS (default 60) for the fleet;
EDGED_BENCH_BACKLOG (default 30000) for the throughput runs. --quick shrinks all three.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, Broker, Figure, at_least, at_most, proc_cpu_s, rss_kb, run_queue_wait_s

if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))
from pgserver import Postgres  # noqa: E402

# What docs/cloud.md tells an operator to set on mosquitto for ingest.
BROKER_CONF = "max_queued_messages 0\nmax_inflight_messages 1000\n"


class _Worker:
    def __init__(self, work: Path, broker: Broker, url: str, client_id: str, group: str) -> None:
        self.args = [sys.executable, "-m", "edged", "ingest", "--db", url, "--host", broker.host,
                     "--port", str(broker.port), "--client-id", client_id, "--group", group]
        self.log = work / f"{client_id}.log"
        self.proc: subprocess.Popen | None = None
        self.cpu_s = 0.0
        self.wait_s = 0.0  # runnable but not running (a CPU was busy elsewhere)
        self.hwm_kb = 0

    def start(self) -> "_Worker":
        self._mark = self.subscriptions()
        self.proc = subprocess.Popen(self.args, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                     cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        return self

    def subscriptions(self) -> int:
        return self.log.read_text(errors="replace").count("msg=subscribed") if self.log.exists() else 0

    def ready(self) -> bool:
        """The broker granted this run's subscriptions."""
        return self.subscriptions() > self._mark

    def sample(self) -> None:
        """Remember CPU and peak memory (read before the process ends)."""
        if self.proc and self.proc.poll() is None:
            self.cpu_s = proc_cpu_s(self.proc.pid)
            self.wait_s = run_queue_wait_s(self.proc.pid)
            self.hwm_kb = max(self.hwm_kb, rss_kb(self.proc.pid)[1])

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.sample()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _q(url: str, sql: str):
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql).fetchall()


def _count(url: str) -> int:
    return _q(url, "SELECT count(*) FROM results")[0][0]


def _wait(pred, timeout: float, interval: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    return pred()


def _database(pg: Postgres, name: str) -> str:
    import psycopg

    from edged.cloud import store

    url = pg.create_database(name)
    with psycopg.connect(url, autocommit=True) as conn:
        store.migrate(conn)
        store.retention_pass(conn, 30, time.time(), set())
    return url


def _sessions(workers: list[_Worker], broker: Broker) -> None:
    """Start and stop each worker once so the broker holds its session and subscriptions."""
    for w in workers:
        w.start()
    _wait(lambda: all(w.ready() for w in workers), 60)
    for w in workers:
        w.stop()


def _backlog(broker: Broker, n: int) -> None:
    """Publish n results (200 devices, JSON and CBOR) and wait for the broker's PUBACKs."""
    import paho.mqtt.client as mqtt

    from edged.delivery import codec
    from edged.records import MotionSignature

    codecs = (codec.JSON, codec.get("cbor"))
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-backlog-{time.monotonic_ns()}",
                    protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect(broker.host, broker.port)
    c.loop_start()
    infos = []
    now = time.time()
    for i in range(n):
        dev, seq = f"bl-{i % 200:04d}", i // 200 + 1
        sig = MotionSignature(ts=now, label="walking", score=0.9, signature=tuple((i + k) % 256 - 128 for k in range(16)),
                              window_s=3.0, inference_ms=0.3)
        infos.append(c.publish(f"edged/{dev}/motion", codecs[i % 2].motion(sig, dev, seq), qos=1))
    for info in infos:
        info.wait_for_publish(60)
    c.loop_stop()
    c.disconnect()


def _drain(work: Path, broker: Broker, pg: Postgres, n_workers: int, backlog: int) -> tuple[float, float, str]:
    """(results/s, worker CPU s per 1,000, where the time went) draining a backlog with
    n_workers of one group."""
    url = _database(pg, f"drain{n_workers}")
    group = f"drain{n_workers}"
    workers = [_Worker(work, broker, url, f"{group}-{i}", group) for i in range(n_workers)]
    _sessions(workers, broker)
    _backlog(broker, backlog)
    t_start = time.monotonic()
    broker0 = proc_cpu_s(broker.proc.pid)
    for w in workers:
        w.start()
    # The rate counts from the first stored row, leaving out the workers' start-up, unless the
    # backlog was too small to see much after it (the quick budget).
    first = _wait(lambda: _count(url) > 0 and time.monotonic(), 60, 0.02)
    c0 = _count(url)
    done = _wait(lambda: _count(url) >= backlog and time.monotonic(), 600, 0.05)
    for w in workers:
        w.sample()
    cpu = sum(w.cpu_s for w in workers)  # from process start: includes start-up
    waited = sum(w.wait_s for w in workers)
    broker_cpu = proc_cpu_s(broker.proc.pid) - broker0
    for w in workers:
        w.stop()
    if not done or not first:
        raise RuntimeError(f"{n_workers} worker(s) stored {_count(url)} of {backlog}")
    if backlog - c0 >= backlog // 2 and done > first:
        rate = (backlog - c0) / (done - first)
    else:
        rate = backlog / (done - t_start)
    wall = done - t_start
    return rate, 1000 * cpu / backlog, (f"each worker's threads waited for a CPU {waited / wall / n_workers:.2f} s "
                                        f"per second, mosquitto ran {100 * broker_cpu / wall:.0f} % of a core")


def ingest(quick: bool = False) -> list[Figure]:
    devices = 20 if quick else int(os.environ.get("EDGED_BENCH_DEVICES", "1000"))
    seconds = 3.0 if quick else float(os.environ.get("EDGED_BENCH_SECONDS", "60"))
    backlog = 1000 if quick else int(os.environ.get("EDGED_BENCH_BACKLOG", "30000"))
    from edged.cloud.fleet import Fleet

    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="edged-bench-ingest-") as tmp:
        work = Path(tmp)
        with Broker(work / "broker", listener_conf=BROKER_CONF) as broker, Postgres(fsync=True) as pg:
            # 1. the fleet
            url = _database(pg, "fleet")
            workers = [_Worker(work, broker, url, f"fleet-{i}", "fleet").start() for i in range(2)]
            _wait(lambda: all(w.ready() for w in workers), 60)
            fleet = Fleet(broker.host, broker.port, devices, motion_hz=1.0, detection_every_s=5.0,
                          stats_every_s=60.0).start(timeout=120)
            t0 = time.monotonic()
            sim0 = time.process_time()  # this process is the simulator (one selector thread)
            simwait0 = run_queue_wait_s()
            cpu0 = 0.0
            for w in workers:
                w.sample()
                cpu0 += w.cpu_s
            while time.monotonic() - t0 < seconds:  # the run's length, not a synchronisation
                time.sleep(1.0)
                for w in workers:
                    w.sample()
            fleet.pause()
            elapsed = time.monotonic() - t0
            sim_share = (time.process_time() - sim0) / elapsed
            sim_wait = (run_queue_wait_s() - simwait0) / elapsed
            _wait(fleet.acked_all, 120)
            made = sum(fleet.last_seqs().values())
            _wait(lambda: _count(url) >= made, 120)
            for w in workers:
                w.sample()
            cpu = sum(w.cpu_s for w in workers) - cpu0
            fleet.stop()
            stored, distinct = _q(url, "SELECT count(*), count(DISTINCT (device_id, seq)) FROM results")[0]
            p50, p99 = _q(url, "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY x), "
                               "percentile_cont(0.99) WITHIN GROUP (ORDER BY x) FROM "
                               "(SELECT extract(epoch FROM received_at - ts) * 1000 AS x FROM results) s")[0]
            gaps = _q(url, "SELECT coalesce(sum(missing), 0) FROM gaps")[0][0]
            for w in workers:
                w.stop()
            rate = made / elapsed
            schedule = devices * (1.0 + 1 / 5.0)
            figures += [
                Figure("ingest", f"fleet: {devices} devices × {seconds:.0f} s, results/s offered", round(rate, 1), "/s",
                       note=f"the schedule asks {schedule:.0f}/s; the simulator ran {100 * sim_share:.0f} % of the "
                            f"time and waited for a CPU {100 * sim_wait:.0f} % (one Python thread: running near "
                            "100 %, it limits the rate; waiting, the machine does)"),
                Figure("ingest", "fleet: missing rows", made - distinct, "", "= 0", made == distinct,
                       f"{made} results made and acknowledged by the broker, {distinct} in results; gaps view: {gaps}"),
                Figure("ingest", "fleet: duplicate rows", stored - distinct, "", "= 0", stored == distinct),
                Figure("ingest", "fleet: device ts → committed row, p50", round(p50, 1), "ms"),
                Figure("ingest", "fleet: device ts → committed row, p99", round(p99, 1), "ms"),
                Figure("ingest", "fleet: worker CPU per 1,000 results", round(1000 * cpu / made, 3), "s",
                       note="two workers together, user + system"),
                Figure("ingest", "fleet: worker peak RSS", round(max(w.hwm_kb for w in workers) / 1024, 1), "MB"),
            ]
            # 2. throughput
            one, cpu1, where1 = _drain(work, broker, pg, 1, backlog)
            two, cpu2, where2 = _drain(work, broker, pg, 2, backlog)
            cores = len(os.sched_getaffinity(0))
            figures += [
                Figure("ingest", "one worker, results/s (drain)", round(one), "/s", "≥ 1200", at_least(one, 1200),
                       f"backlog of {backlog} queued on the broker; CPU {cpu1:.3f} s per 1,000; {where1}"),
                Figure("ingest", "two workers, results/s (drain) = PostgreSQL rows/s", round(two), "/s",
                       note=f"CPU {cpu2:.3f} s per 1,000; {where2}"),
                Figure("ingest", "scale-out: two workers ÷ one", round(two / one, 2), "×",
                       "≥ 1.8" if cores >= 4 else "", at_least(two / one, 1.8) if cores >= 4 else None,
                       f"{cores} cores shared by the broker, PostgreSQL and the workers"),
            ]
    return figures
