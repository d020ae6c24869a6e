"""Home Assistant discovery against a real mosquitto: what a Home Assistant connecting later
finds retained, removal of what the device no longer offers (after a restart with another
config, and after a reload), the state cleared on a clean stop, stats retained, presence held."""

from __future__ import annotations

import json
import signal

from conftest import FAST, Subscriber, wait_until, write_config
from edged import config
from edged.delivery import homeassistant as ha



def retained(broker, topic: str = "homeassistant/#", settle: str | None = None) -> dict[str, dict]:
    """Every retained config under `topic`, as a Home Assistant connecting now receives them.
    The broker sends retained messages right after the SUBACK; a marker published afterwards on
    the same connection arrives after all of them, so there is no waiting for "enough"."""
    sub = Subscriber(broker, topic)
    marker = "homeassistant/zz-marker/x/config" if settle is None else settle
    sub.client.subscribe(marker, qos=1)
    sub.client.publish(marker, b"m", qos=1)
    try:
        assert sub.wait(lambda: any(t == marker for t, _, _ in sub.messages), 10)
        return {t: _decode(p) for t, p, r in sub.messages if r and t != marker and p}
    finally:
        sub.close()


def _decode(payload: bytes):
    try:
        return json.loads(payload)
    except ValueError:
        return payload.decode()  # status: plain text


def test_a_late_home_assistant_finds_every_entity(tmp_path, broker, daemon_factory):
    cfg = write_config(tmp_path / "edged.toml", broker, extra=FAST, vision="")  # the embedded defaults
    d = daemon_factory(cfg).start()
    live = Subscriber(broker, "edged/test-dev/#")
    try:
        # Waited for, each: a motion label, a face held present (the default chain confirms a
        # track over a few frames, which a loaded machine makes slow), and stats.
        assert live.wait(lambda: any(json.loads(p)["motion"] for p in live.on("state") if p)
                         and any("face" in json.loads(p)["present"] for p in live.on("state") if p)
                         and live.on("stats"), 60), d.output()
        configs = retained(broker)
        objects = {t.split("/")[2:4][1] for t in configs}
        # The default chain's labels, and the track event entity of the default events policy.
        assert {"person_present", "person_count", "face_present", "face_count", "track", "objects", "motion",
                "fps", "inference_ms", "uptime", "backend", "skipped_frames", "published", "rejected",
                "outbox_depth", "dropped", "bandwidth_saved"} == objects
        for topic, c in configs.items():
            component, node, object_id = topic.split("/")[1:4]
            assert node == "test-dev"
            assert "object_id" not in c  # deprecated in HA 2025.10, gone in 2026.4
            assert c["default_entity_id"] == f"{component}.edged_test-dev_{object_id}"
            assert c["unique_id"] == f"edged_test-dev_{object_id}"
            assert c["origin"]["name"] == "edged" and c["device"]["identifiers"] == ["edged_test-dev"]
            status = c.get("availability_topic") or c["availability"][0]["topic"]
            assert status == "edged/test-dev/status"
        motion = configs["homeassistant/sensor/test-dev/motion/config"]
        assert motion["device_class"] == "enum"
        assert motion["options"] == ["standing", "walking", "running", "badminton"]
        # Unavailable while no motion is known (an enum's state must be one of its options).
        assert [a["topic"] for a in motion["availability"]] == ["edged/test-dev/status", "edged/test-dev/state"]
        assert motion["availability_mode"] == "all" and "availability_topic" not in motion
        assert configs["homeassistant/sensor/test-dev/inference_ms/config"]["device_class"] == "duration"
        assert configs["homeassistant/sensor/test-dev/uptime/config"]["entity_category"] == "diagnostic"
        # What the presence template reads is in the state, and a motion label is one of the options.
        state = [json.loads(p) for p in live.on("state") if p]
        assert any("face" in s["present"] for s in state)
        assert all(s["motion"] in motion["options"] for s in state if s["motion"])
        assert json.loads((tmp_path / "state" / "homeassistant.json").read_text())["topics"] == sorted(configs)
        assert d.stop() == 0
    finally:
        live.close()
    # A clean stop leaves no stale state (nothing in view, no motion); stats stay retained.
    after = retained(broker, "edged/test-dev/#", settle="edged/test-dev/zz-marker")
    last = after["edged/test-dev/state"]
    assert last["labels"] == last["present"] == [] and last["motion"] is None and last["counts"] == {}
    assert after.get("edged/test-dev/stats", {}).get("device_id") == "test-dev"


def test_what_the_device_no_longer_offers_is_removed(tmp_path, broker, daemon_factory):
    path = tmp_path / "edged.toml"
    write_config(path, broker, extra=FAST + '[homeassistant]\nlabels = ["face", "cat"]\n')
    d = daemon_factory(path).start()
    assert wait_until(lambda: "homeassistant/binary_sensor/test-dev/cat_present/config" in retained(broker), 60), \
        d.output()

    # A reload that drops a label and the motion stage: removed at once, no restart.
    no_imu = FAST.replace("[imu]\nspeed = 10\n", "[imu]\nenabled = false\n")
    write_config(path, broker, extra=no_imu + '[homeassistant]\nlabels = ["face", "dog"]\n')
    d.signal(signal.SIGHUP)
    dog = "homeassistant/binary_sensor/test-dev/dog_present/config"
    assert wait_until(lambda: dog in retained(broker), 60), d.output()
    now = retained(broker)
    assert "homeassistant/binary_sensor/test-dev/cat_present/config" not in now
    assert "homeassistant/sensor/test-dev/cat_count/config" not in now
    assert "homeassistant/sensor/test-dev/motion/config" not in now
    assert "homeassistant/binary_sensor/test-dev/face_present/config" in now
    assert d.stop() == 0

    # A restart under another device_id: the old device's entities go, the new one's come.
    write_config(path, broker, device_id="test-dev-2", extra=FAST)
    d = daemon_factory(path).start()
    assert wait_until(lambda: "homeassistant/sensor/test-dev-2/fps/config" in retained(broker), 60), d.output()
    assert not [t for t in retained(broker) if "/test-dev/" in t]
    assert d.stop() == 0

    # Discovery turned off: everything announced is removed.
    write_config(path, broker, device_id="test-dev-2", extra=FAST + "[homeassistant]\nenabled = false\n")
    d = daemon_factory(path).start()
    assert wait_until(lambda: not retained(broker), 60), d.output()
    assert d.stop() == 0
    assert json.loads((tmp_path / "state" / "homeassistant.json").read_text())["topics"] == []


def test_discovery_messages_offer_what_the_config_enables():
    cfg = config.parse('device_id = "pi"\n[commands]\nenabled = true\nsnapshot = true\n')
    msgs = dict(ha.discovery(cfg, ["face"], None, hw_version="Raspberry Pi 4 Model B Rev 1.4"))
    assert "homeassistant/sensor/pi/motion/config" not in msgs  # no motion stage: no motion entity
    snap = json.loads(msgs["homeassistant/button/pi/snapshot/config"])
    assert snap["command_topic"] == "edged/pi/cmd/snapshot" and json.loads(snap["payload_press"])
    assert json.loads(msgs["homeassistant/image/pi/snapshot/config"])["image_topic"] == "edged/pi/snapshot"
    assert json.loads(msgs["homeassistant/button/pi/reload/config"])["entity_category"] == "config"
    assert "entity_category" not in json.loads(msgs["homeassistant/button/pi/stats/config"])
    face = json.loads(msgs["homeassistant/binary_sensor/pi/face_present/config"])
    assert face["device"]["hw_version"] == "Raspberry Pi 4 Model B Rev 1.4"
    plain = dict(ha.discovery(config.parse('device_id = "pi"\n'), ["face"], ["walking"]))
    assert not [t for t in plain if "/button/" in t or "/image/" in t]
    assert ha.stale(list(msgs), list(plain)) == sorted(set(msgs) - set(plain))


def test_presence_is_held_after_the_last_sighting():
    p = ha.Presence(hold_s=5.0)
    assert p.update(["face"], 100.0) == ["face"]
    assert p.update([], 101.0) == ["face"]          # one missed frame: still present
    assert p.update(["face"], 102.0) == ["face"]
    assert p.update([], 106.9) == ["face"]
    assert p.update([], 107.1) == []                # 5 s without a sighting: gone
    assert ha.Presence(0.0).update(["face"], 1.0) == ["face"]
    none = ha.Presence(0.0)
    none.update(["face"], 1.0)
    assert none.update([], 1.2) == []


def test_the_pi_model_comes_from_the_device_tree(tmp_path):
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"Raspberry Pi Zero 2 W Rev 1.0\0")
    assert ha.pi_model(str(tmp_path)) == "Raspberry Pi Zero 2 W Rev 1.0"
    assert ha.pi_model(str(tmp_path / "nothing")) == ""
