"""Outbox throughput (issue 8, figure 4): durable appends per second, and the rate at which the
MQTT link drains stored rows to mosquitto at QoS 1 (a row counts once the broker's PUBACK has
come back and the row is deleted).

Appends go through `edged.delivery.outbox.Outbox.append` in batches the way the daemon's writer hands
them over — up to 256 results gathered per transaction when results pile up, one at a time
when they trickle — with the daemon's default `synchronous = full`, on the filesystem that
holds the benchmark's temporary directory (reported). The drain starts a real `edged.delivery.link.Link`
on an outbox pre-filled with detection-sized rows and times it from connect to empty.
Both run in a worker pinned to one core; the broker runs on the other.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.common import Broker, Figure, at_least, bench_config, run_worker, split_cpus, worker_main

# A detection as the JSON codec writes it (one face), ~160 bytes; `%d` is the seq.
PAYLOAD = (b'{"v":1,"device_id":"bench","seq":%d,"ts":1795000000.123,"objects":[{"label":"face",'
           b'"score":0.934,"box":[0.4312,0.0914,0.6027,0.2688]}],"inference_ms":1.21}')


def filesystem(path: Path) -> str:
    """'ext4 on /dev/vda' for the mount holding `path`."""
    best = ("", "?", "?")
    target = str(Path(path).resolve())
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, fstype, dev)
    except OSError:
        pass
    return f"{best[1]} on {best[2]}"


def _items(n: int, topic: str):
    return [(topic, lambda seq: PAYLOAD % seq) for _ in range(n)]


def append_worker(workdir: str, batch: int, seconds: float, synchronous: str) -> dict:
    from edged.delivery.outbox import Outbox

    path = Path(workdir) / f"append-{batch}-{synchronous}.db"
    ob = Outbox(path, synchronous=synchronous)
    items = _items(batch, "edged/bench/detections")
    ob.append(items)
    n = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while True:
        ob.append(items)
        n += batch
        now = time.perf_counter()
        if now >= end:
            break
    ob.close()
    return {"appends_per_s": n / (now - t0), "batches_per_s": n / batch / (now - t0)}


def drain_worker(workdir: str, host: str, port: int, rows: int, synchronous: str, keep: bool = False) -> dict:
    from edged.delivery.link import Link
    from edged.delivery.outbox import Outbox

    cfg = bench_config(Path(workdir) / f"drain-{synchronous}-{keep}", host, port, outbox={"synchronous": synchronous})
    o = cfg.outbox
    # keep: acknowledged rows move into `kept` (the daemon's default bounds) instead of going.
    ob = Outbox(cfg.outbox_path, synchronous=synchronous,
                **(dict(keep_rows=o.keep_acked_rows, keep_bytes=o.keep_acked_bytes, keep_s=o.keep_acked_s)
                   if keep else {}))
    topic = cfg.topic("detections")
    for i in range(0, rows, 256):
        ob.append(_items(min(256, rows - i), topic))
    link = Link(cfg, ob)
    link.start()
    if not link.connected.wait(10):
        raise RuntimeError("drain: the link did not connect to the benchmark broker")
    t0 = time.perf_counter()
    link.wake()
    deadline = t0 + 120
    while ob.depth and time.perf_counter() < deadline:
        time.sleep(0.002)
    elapsed = time.perf_counter() - t0
    left = ob.depth
    kept = ob.kept
    t0 = time.perf_counter()
    again = ob.resend([(1, rows)], 1000, topic_prefix=cfg.topic("")) if keep else None
    resend_ms = (time.perf_counter() - t0) * 1000
    link.stop(timeout=1.0)
    ob.close()
    return {"acked_per_s": (rows - left) / elapsed, "left": left, "seconds": elapsed,
            "window": cfg.mqtt.max_inflight, "kept": kept,
            "resend_ms": resend_ms if again and len(again.seqs) == 1000 else None}


WORKERS = {"append": append_worker, "drain": drain_worker}


def _worker(kind: str, **kwargs) -> dict:
    return WORKERS[kind](**kwargs)


def outbox(quick: bool = False, workdir: Path | None = None) -> list[Figure]:
    seconds, rows = (0.3, 300) if quick else (2.0, 10_000)
    own, helpers = split_cpus()
    figures = []
    with tempfile.TemporaryDirectory(prefix="edged-bench-") as tmp:
        work = Path(workdir or tmp)
        fs = filesystem(work)
        rates = {}
        for sync in ("full",) if quick else ("full", "normal"):
            for batch in (256, 16, 1):
                r = run_worker("storage", {"kind": "append", "workdir": str(work), "batch": batch,
                                           "seconds": seconds, "synchronous": sync}, own, timeout=60)
                rates[(sync, batch)] = r["appends_per_s"]
        full = rates[("full", 256)]
        note = (f"synchronous=full on {fs}: {full:.0f}/s in batches of 256, {rates[('full', 16)]:.0f}/s in 16s, "
                f"{rates[('full', 1)]:.0f}/s one at a time (one fsync each)")
        if ("normal", 256) in rates:
            note += (f"; synchronous=normal: {rates[('normal', 256)]:.0f}, {rates[('normal', 16)]:.0f}, "
                     f"{rates[('normal', 1)]:.0f}/s")
        figures.append(Figure("outbox", "durable appends, writer batches (≤ 256)", round(full), "/s",
                              "≥ 5000", at_least(full, 5000), note))
        figures.append(Figure("outbox", "durable appends, one per transaction", round(rates[("full", 1)]), "/s"))
        with Broker(work / "broker", cores=helpers) as broker:
            drains = {}
            for sync, keep in (("full", False), ("full", True)) if quick else (
                    ("full", False), ("full", True), ("normal", False)):
                drains[(sync, keep)] = run_worker("storage", {
                    "kind": "drain", "workdir": str(work), "host": broker.host, "port": broker.port, "rows": rows,
                    "synchronous": sync, "keep": keep}, own, timeout=180)
        kept = drains[("full", True)]
        drains = {sync: r for (sync, keep), r in drains.items() if not keep}
        d = drains["full"]
        note = (f"{rows} stored rows drained in {d['seconds']:.2f} s with {d['window']} in flight, "
                f"synchronous=full")
        if "normal" in drains:
            note += f"; synchronous=normal: {drains['normal']['acked_per_s']:.0f}/s"
        figures.append(Figure("outbox", "drain to mosquitto, QoS 1 acknowledged", round(d["acked_per_s"]), "/s",
                              "≥ 2000", at_least(d["acked_per_s"], 2000) and not d["left"], note))
        ratio = kept["acked_per_s"] / d["acked_per_s"]
        note = (f"acknowledged rows kept for a resend (the daemon's default): {kept['kept']} kept after the drain; "
                f"{kept['acked_per_s']:.0f}/s against {d['acked_per_s']:.0f}/s deleting them, the same run"
                + (f"; putting 1,000 kept rows back for a resend: {kept['resend_ms']:.1f} ms"
                   if kept["resend_ms"] is not None else ""))
        figures.append(Figure("outbox", "drain keeping acknowledged rows ÷ drain deleting them", round(ratio, 2), "×",
                              "≥ 0.5", ratio >= 0.5 and not kept["left"] and kept["kept"] == rows, note))
    return figures


if __name__ == "__main__":
    worker_main(_worker)
