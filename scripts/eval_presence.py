#!/usr/bin/env python3
"""How often Home Assistant's presence sensors flip on the demo: `edged run` on the shipped sample
photos (2 fps, looped) for a while, counting the changes of each label in the retained `state`
topic's `present` (what the `<label> present` binary sensors show) and in its `labels` (each
frame's, or the live tracks').

Runs each config given (default: the embedded defaults with homeassistant.hold_s = 5 and = 0, and
the single face model with the label-set policy, edged's default before the vision chain, with
hold_s = 5 and = 0), one after the other, each against its own mosquitto on a free port.

    .venv/bin/python scripts/eval_presence.py [--seconds 122]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

REPO = Path(__file__).resolve().parent.parent
CASES = {
    "default chain, events, hold 5 s": "",
    "default chain, events, hold 0": "[homeassistant]\nhold_s = 0\n",
    "face alone, label-set policy, hold 5 s": '[vision]\nmodel = "face"\npublish = "labels"\n',
    "face alone, label-set policy, hold 0": '[vision]\nmodel = "face"\npublish = "labels"\n[homeassistant]\nhold_s = 0\n',
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flips(states: list[dict], key: str) -> dict[str, int]:
    """Per label: how many times it appeared in or left `key` from one state to the next."""
    out: dict[str, int] = {}
    prev: set[str] = set(states[0].get(key) or ()) if states else set()
    for s in states[1:]:
        now = set(s.get(key) or ())
        for label in prev ^ now:
            out[label] = out.get(label, 0) + 1
        prev = now
    return out


def run(name: str, extra: str, seconds: float, work: Path) -> dict:
    port = free_port()
    (work / "mosquitto.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    broker = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(work / "mosquitto.conf")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    states: list[dict] = []
    got = threading.Event()

    def on_message(c, u, m):
        if m.payload:
            states.append(json.loads(m.payload))
            got.set()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    c.on_message = on_message
    for _ in range(100):
        try:
            c.connect("127.0.0.1", port)
            break
        except OSError:
            time.sleep(0.05)
    c.subscribe("edged/demo/state", qos=0)
    c.loop_start()
    cfg = work / "edged.toml"
    cfg.write_text(f'device_id = "demo"\nstate_dir = "{work / "state"}"\n{extra}\n[mqtt]\nport = {port}\n')
    daemon = subprocess.Popen([sys.executable, "-m", "edged", "run", "--config", str(cfg)], cwd=REPO,
                              stdout=(work / "daemon.log").open("wb"), stderr=subprocess.STDOUT)
    try:
        if not got.wait(60):
            raise SystemExit(f"{name}: no state within 60 s; see {work / 'daemon.log'}")
        n0 = len(states)
        time.sleep(seconds)
        window = states[n0 - 1:]
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(20)
        c.loop_stop()
        c.disconnect()
        broker.terminate()
        broker.wait(10)
    return {"case": name, "seconds": seconds, "states": len(window),
            "present_flips": flips(window, "present"), "labels_flips": flips(window, "labels")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=122.0)
    ap.add_argument("--cases", default=",".join(str(i) for i in range(len(CASES))),
                    help="which cases, by number (default: all)")
    args = ap.parse_args()
    names = list(CASES)
    for i in (int(x) for x in args.cases.split(",")):
        with tempfile.TemporaryDirectory(prefix="edged-presence-") as tmp:
            r = run(names[i], CASES[names[i]], args.seconds, Path(tmp))
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
