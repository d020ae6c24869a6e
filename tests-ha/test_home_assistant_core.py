"""edged and a real Home Assistant Core, through Home Assistant's own REST API.

Home Assistant runs from the venv `make test-ha` made (`EDGED_HA_PYTHON`), with a fresh config
directory: onboarding makes a user and a token, MQTT is set up through its config flow against a
test mosquitto, then the daemon runs. Checked through the API: the device's entities exist and
update, go unavailable when the daemon stops, and are removed when the config no longer offers
them; and Home Assistant logs nothing about edged at warning level or above.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port, wait_until, write_config

HA_PYTHON = os.environ.get("EDGED_HA_PYTHON", "")
FAST = "[camera]\nfps = 5\n[imu]\nspeed = 10\n[stats]\ninterval_s = 2\n"
CLIENT = "http://127.0.0.1/"


class HomeAssistant:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "ha-config"
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "home-assistant.log"
        self.token = ""
        (self.dir / "configuration.yaml").write_text(
            "homeassistant:\n  name: edged test\n  time_zone: UTC\n  unit_system: metric\n"
            "  latitude: 0\n  longitude: 0\n  elevation: 0\n  currency: EUR\n  country: DE\n"
            f"http:\n  server_host: 127.0.0.1\n  server_port: {self.port}\n"
            "api:\nconfig:\nonboarding:\nlogger:\n  default: info\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "HomeAssistant":
        self.proc = subprocess.Popen([HA_PYTHON, "-m", "homeassistant", "-c", str(self.dir), "--skip-pip",
                                      "--log-file", str(self.log)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        assert wait_until(self._up, 300), self.log_text()[-3000:]
        assert self.proc.poll() is None, self.log_text()[-3000:]
        return self

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            return True  # exited: start() reports it
        if "Starting in recovery mode" in self.log_text():
            raise AssertionError("Home Assistant started in recovery mode (a requirement is missing?):\n"
                                 + self.log_text()[-3000:])
        try:
            with urllib.request.urlopen(f"{self.url}/api/onboarding", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def request(self, method: str, path: str, body=None, *, form: bool = False, auth: bool = True):
        data = None
        headers = {}
        if body is not None:
            if form:
                data = urllib.parse.urlencode(body).encode()
                headers["Content-Type"] = "application/x-www-form-urlencoded"
            else:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
        if auth and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read().decode()
        return json.loads(text) if text else None

    def onboard(self) -> None:
        user = self.request("POST", "/api/onboarding/users", {
            "client_id": CLIENT, "name": "edged", "username": "edged", "password": "edged-test-pw",
            "language": "en"}, auth=False)
        token = self.request("POST", "/auth/token", {"grant_type": "authorization_code",
                                                     "code": user["auth_code"], "client_id": CLIENT},
                             form=True, auth=False)
        self.token = token["access_token"]

    def set_up_mqtt(self, host: str, port: int) -> None:
        flow = self.request("POST", "/api/config/config_entries/flow", {"handler": "mqtt"})
        while flow.get("type") == "form":
            flow = self.request("POST", f"/api/config/config_entries/flow/{flow['flow_id']}",
                                {"broker": host, "port": port})
        assert flow.get("type") == "create_entry", flow

    def template(self, text: str) -> str:
        req = urllib.request.Request(self.url + "/api/template", data=json.dumps({"template": text}).encode(),
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read().decode()

    def edged_entities(self) -> dict[str, dict]:
        """Every MQTT entity of the edged device, with its state."""
        ids = json.loads(self.template("{{ integration_entities('mqtt') | list | tojson }}"))
        states = {s["entity_id"]: s for s in self.request("GET", "/api/states")}
        return {e: states.get(e, {}) for e in ids if "edged" in e}

    # Warnings about the test set-up itself, not about edged: pip skipped on purpose, Python 3.11
    # deprecated from 2024.4, and the camera integration (needs numpy in HA's venv; edged has no
    # camera entity).
    ABOUT_THE_SET_UP = ("Skipping pip installation", "Support for the running Python version",
                        "Setup failed for 'camera'")

    def complaints(self) -> list[str]:
        """Every WARNING or ERROR line in Home Assistant's log, but those about the set-up: a
        template that fails on edged's payloads logs under homeassistant.helpers.template, not
        under edged's name, so nothing is filtered by name."""
        return [line for line in self.log_text().splitlines()
                if (" WARNING " in line or " ERROR " in line or " CRITICAL " in line)
                and not any(s in line for s in self.ABOUT_THE_SET_UP)]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def home_assistant(tmp_path, broker):
    if not HA_PYTHON:
        pytest.fail("EDGED_HA_PYTHON is not set: run these through `make test-ha`")
    ha = HomeAssistant(tmp_path).start()
    try:
        ha.onboard()
        ha.set_up_mqtt(broker.host, broker.port)
        yield ha
    finally:
        ha.stop()


def test_home_assistant_shows_updates_and_removes_edged_entities(tmp_path, broker, daemon_factory,
                                                                 home_assistant):
    ha = home_assistant
    path = tmp_path / "edged.toml"
    write_config(path, broker, extra=FAST + '[homeassistant]\nlabels = ["face", "cat"]\n')
    d = daemon_factory(path).start()
    # 2 labels x (presence, count) + objects + motion + 10 diagnostics
    assert wait_until(lambda: len(ha.edged_entities()) == 16, 120), (ha.edged_entities(), d.output())

    def value(suffix: str) -> str:
        hits = [s.get("state") for e, s in ha.edged_entities().items() if e.endswith(suffix)]
        return hits[0] if hits else ""

    assert wait_until(lambda: value("face_present") == "on", 60), ha.edged_entities()
    assert wait_until(lambda: value("motion") in ("standing", "walking", "running", "badminton"), 60), \
        ha.edged_entities()
    assert wait_until(lambda: value("frames_per_second") not in ("", "unknown", "unavailable"), 60)
    assert d.stop() == 0
    assert wait_until(lambda: all(s.get("state") == "unavailable" for s in ha.edged_entities().values()), 60), \
        ha.edged_entities()

    # The config drops a label: its two entities are removed from Home Assistant.
    write_config(path, broker, extra=FAST + '[homeassistant]\nlabels = ["face"]\n')
    d = daemon_factory(path).start()
    assert wait_until(lambda: len(ha.edged_entities()) == 14
                      and not [e for e in ha.edged_entities() if "cat" in e], 120), ha.edged_entities()
    assert d.stop() == 0
    assert ha.complaints() == [], "\n".join(ha.complaints())


def test_track_events_fire_the_event_entity_with_their_attributes(tmp_path, broker, daemon_factory,
                                                                  home_assistant):
    """The `track` event entity of the events policy: the daemon's own track events (faces on
    the demo photos) fire it with their label and id; and its template, rendered by Home
    Assistant itself, passes a person's posture on (a fall) and leaves it out where a track has none."""
    ha = home_assistant
    path = tmp_path / "edged.toml"
    write_config(path, broker, extra=FAST, vision='[vision]\nmodel = "face"\npublish = "events"\n')
    d = daemon_factory(path).start()

    def track() -> dict:
        hits = [s for e, s in ha.edged_entities().items() if e.startswith("event.") and e.endswith("_track")]
        return hits[0] if hits else {}

    assert wait_until(lambda: track().get("attributes", {}).get("label") == "face", 120), \
        (ha.edged_entities(), d.output())
    fired = track()["attributes"]
    assert fired["event_type"] in ("new", "update", "end") and isinstance(fired["id"], int), fired
    assert "posture" not in fired, fired

    config = json.loads(_retained(broker, "homeassistant/event/test-dev/track/config"))
    for payload, want in (({"type": "update", "id": 7, "label": "person", "dwell_s": 12.5, "posture": "fallen"},
                           {"event_type": "update", "label": "person", "id": 7, "dwell_s": 12.5, "posture": "fallen"}),
                          ({"type": "new", "id": 8, "label": "face", "dwell_s": 0.0, "parent": 7},
                           {"event_type": "new", "label": "face", "id": 8, "dwell_s": 0.0})):
        text = "{% set value_json = " + json.dumps(payload) + " %}" + config["value_template"]
        assert json.loads(ha.template(text)) == want
    assert d.stop() == 0
    assert ha.complaints() == [], "\n".join(ha.complaints())


def _retained(broker, topic: str) -> bytes:
    """The retained message on `topic`, read with mosquitto_sub."""
    r = subprocess.run(["mosquitto_sub", "-h", broker.host, "-p", str(broker.port), "-t", topic, "-C", "1",
                        "-W", "10"], capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout
