"""The MQTT side against a real mosquitto: codecs and schemas, MQTT 3.1.1 and 5, Home Assistant
discovery, commands, TLS and mutual TLS with certificates made here, and a broker that never
acknowledges."""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import sqlite3
import threading
import time
from pathlib import Path

import jsonschema
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from conftest import FAST, REPO, Broker, Subscriber, free_port, last_seq, wait_until, write_config
from edged.cloud.subscriber import Collector

SCHEMAS = {p.name.split(".")[0]: json.loads(p.read_text()) for p in (REPO / "docs" / "schemas").glob("*.json")}


def validate(kind: str, obj) -> None:
    jsonschema.validate(obj, SCHEMAS[kind])


def outbox_rows(state: Path) -> list[int]:
    db = sqlite3.connect(state / "outbox.db")
    try:
        return [r[0] for r in db.execute("SELECT seq FROM outbox ORDER BY seq")]
    finally:
        db.close()


def spooled_and_last_seq(state: Path) -> tuple[int, int]:
    """(rows in the outbox, the last seq given) from one snapshot: the daemon appends meanwhile,
    so two separate reads can see a result in one and not the other."""
    db = sqlite3.connect(state / "outbox.db", isolation_level=None)
    try:
        db.execute("BEGIN")
        rows = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        seq = db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0]
        db.execute("COMMIT")
        return rows, seq
    finally:
        db.close()


# -- codecs, schemas, protocol versions -------------------------------------------------------------

@pytest.mark.parametrize("codec, protocol", [("json", "5"), ("cbor", "5"), ("json", "3.1.1")])
def test_every_published_message_matches_its_schema(tmp_path, broker, daemon_factory, codec, protocol):
    raw: list = []
    col = Collector(broker.host, broker.port).start()
    sub = Subscriber(broker, "#")
    # Both vision policies, so that every kind of result is published: track events (the
    # default) and the label-set detections.
    cfg = write_config(tmp_path / "edged.toml", broker, extra=FAST + '[vision]\npublish = "both"\n',
                       mqtt=f'codec = "{codec}"\nprotocol = "{protocol}"\n')
    d = daemon_factory(cfg).start()
    try:
        assert wait_until(lambda: len(col.results("test-dev", "motion")) >= 3
                          and any(r["objects"] for r in col.results("test-dev", "detections"))
                          and col.results("test-dev", "events") and sub.on("stats"), 60), d.output()
        assert d.stop() == 0
        time.sleep(0.3)
        for leaf in ("detections", "motion", "events"):
            for r in col.results("test-dev", leaf):
                validate(leaf, r)
        for topic, payload, _ in sub.messages:
            leaf = topic.rsplit("/", 1)[-1]
            if topic.startswith("homeassistant/"):
                assert json.loads(payload)["unique_id"].startswith("edged_test-dev_")
            elif leaf == "status":
                validate("status", payload.decode())
            elif leaf in ("stats", "state"):
                validate(leaf, json.loads(payload))  # always JSON, whatever the codec
            elif leaf in ("detections", "motion", "events"):
                raw.append(payload)
                if codec == "json":
                    validate(leaf, json.loads(payload))
                else:
                    assert payload[:1] != b"{"  # really CBOR on the wire
        summary = col.summary()["test-dev"]
        assert summary["gaps"] == [] and summary["undecodable"] == 0
        assert summary["last_seq"] == last_seq(tmp_path / "state")
        if codec == "cbor":
            # The same results are smaller than their JSON form.
            from edged.delivery.codec import JSON, decode

            json_size = sum(len(JSON.dumps(decode(p))) for p in raw)
            assert sum(map(len, raw)) < 0.8 * json_size
    finally:
        col.stop()
        sub.close()


def test_mqtt5_properties_on_results(tmp_path, broker, daemon_factory):
    seen: list = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_message = lambda cl, u, m: seen.append(m)
    c.connect(broker.host, broker.port)
    c.subscribe("edged/+/motion", qos=1)
    c.loop_start()
    cfg = write_config(tmp_path / "edged.toml", broker, extra=FAST, mqtt='codec = "cbor"\nmessage_expiry_s = 600\n')
    d = daemon_factory(cfg).start()
    try:
        assert wait_until(lambda: seen, 30), d.output()
        props = seen[0].properties
        assert props.ContentType == "application/cbor"
        assert 0 < props.MessageExpiryInterval <= 600
    finally:
        c.loop_stop()
        c.disconnect()


# -- Home Assistant ----------------------------------------------------------------------------------

def test_home_assistant_discovery_and_state(tmp_path, broker, daemon_factory):
    cfg = write_config(tmp_path / "edged.toml", broker, extra=FAST)
    d = daemon_factory(cfg).start()
    sub = Subscriber(broker, "#")
    try:
        assert sub.wait(lambda: any(json.loads(p)["labels"] == ["face"] for p in sub.on("state"))
                        and any(json.loads(p)["motion"] for p in sub.on("state")), 60), d.output()
        # A Home Assistant that connects while it runs gets the current state, retained.
        state = Subscriber(broker, "edged/test-dev/state")
        assert state.wait(lambda: state.messages, 5)
        current = json.loads(state.messages[0][1])
        validate("state", current)
        assert state.messages[0][2] is True  # retained
        state.close()
        assert d.stop() == 0
    finally:
        sub.close()
    # A Home Assistant that starts later finds the discovery retained.
    late = Subscriber(broker, "homeassistant/#")
    wanted = {"homeassistant/binary_sensor/test-dev/face_present/config", "homeassistant/sensor/test-dev/objects/config",
              "homeassistant/sensor/test-dev/motion/config", "homeassistant/sensor/test-dev/fps/config",
              "homeassistant/sensor/test-dev/dropped/config"}
    try:
        # Waited for by name: the retained configs arrive one by one, and a count of "enough"
        # could be reached before the last of those asserted below (seen once under load).
        assert late.wait(lambda: wanted <= {t for t, _, r in late.messages if r}, 10), [t for t, _, _ in late.messages]
        configs = {t: json.loads(p) for t, p, retained in late.messages if retained}
        face = configs["homeassistant/binary_sensor/test-dev/face_present/config"]
        assert face["state_topic"] == "edged/test-dev/state"
        assert face["availability_topic"] == "edged/test-dev/status"
        assert face["device"]["identifiers"] == ["edged_test-dev"]
        assert {"homeassistant/sensor/test-dev/objects/config", "homeassistant/sensor/test-dev/motion/config",
                "homeassistant/sensor/test-dev/fps/config", "homeassistant/sensor/test-dev/dropped/config"} <= set(configs)
        assert len({c["unique_id"] for c in configs.values()}) == len(configs)
        # The value template reads the held presence of a real state message.
        assert "'face' in value_json.present" in face["value_template"] and "face" in current["present"]
    finally:
        late.close()


# -- commands ---------------------------------------------------------------------------------------

def _command(broker, topic: str, payload: bytes, *, response_topic: str | None = None,
             correlation: bytes | None = None, listen: str = "edged/test-dev/#", wait_for=None, timeout=10):
    got: list = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    ready = threading.Event()
    c.on_subscribe = lambda *a: ready.set()
    c.on_message = lambda cl, u, m: got.append(m)
    c.connect(broker.host, broker.port)
    c.subscribe(listen, qos=1)
    if response_topic:
        c.subscribe(response_topic, qos=1)
    c.loop_start()
    assert ready.wait(60), "the command client could not subscribe"
    props = None
    if response_topic:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = response_topic
        if correlation:
            props.CorrelationData = correlation
    c.publish(topic, payload, qos=1, properties=props)
    wait_until(lambda: wait_for(got) if wait_for else False, timeout)
    c.loop_stop()
    c.disconnect()
    return got


def responses(msgs, topic="edged/test-dev/response"):
    return [json.loads(m.payload) for m in msgs if m.topic == topic]


def _listening_for_commands(broker, d, leaf: str = "motion") -> None:
    """Wait until the broker has the daemon's command subscription. The daemon subscribes in its
    on-connect, before it publishes its first result, and a broker handles one connection's
    packets in order: so a result seen here proves the subscription is in place (the log's
    "connected" line comes before the SUBSCRIBE is even sent). A detection also means the vision
    stage has a frame, which a snapshot needs."""
    sub = Subscriber(broker, f"edged/test-dev/{leaf}")
    try:
        assert sub.wait(lambda: sub.messages, 60), d.output()
    finally:
        sub.close()


def test_commands_are_off_by_default(tmp_path, broker, daemon_factory):
    cfg = write_config(tmp_path / "edged.toml", broker, extra=FAST)
    d = daemon_factory(cfg).start()
    _listening_for_commands(broker, d)
    got = _command(broker, "edged/test-dev/cmd/stats", b"", wait_for=lambda g: responses(g), timeout=3)
    assert responses(got) == []
    assert d.proc.poll() is None


def test_commands_when_enabled(tmp_path, broker, daemon_factory):
    cfg = write_config(tmp_path / "edged.toml", broker, extra=FAST.replace("interval_s = 1", "interval_s = 3600")
                       + '[commands]\nenabled = true\nreply_prefix = "client"\n')
    d = daemon_factory(cfg).start()
    _listening_for_commands(broker, d)

    got = _command(broker, "edged/test-dev/cmd/stats", b'{"id": 7}',
                   wait_for=lambda g: responses(g) and any(m.topic == "edged/test-dev/stats" for m in g))
    r = responses(got)
    assert r == [{"cmd": "stats", "ok": True, "id": 7}]
    validate("response", r[0])
    validate("stats", json.loads(next(m.payload for m in got if m.topic == "edged/test-dev/stats")))

    for topic, payload, error in [
        ("edged/test-dev/cmd/selfdestruct", b"", "unknown command 'selfdestruct'"),
        ("edged/test-dev/cmd/stats", b"{not json", "payload is not JSON"),
        ("edged/test-dev/cmd/stats", b"[1, 2]", "payload must be a JSON object"),
        ("edged/test-dev/cmd/snapshot", b"", "snapshots are disabled"),
    ]:
        got = _command(broker, topic, payload, wait_for=lambda g: responses(g))
        r = responses(got)
        assert len(r) == 1 and r[0]["ok"] is False and error in r[0]["error"], (topic, r)
        validate("response", r[0])

    # MQTT 5 request/response: the reply goes where the requester asked (under commands.reply_prefix),
    # with its correlation data.
    got = _command(broker, "edged/test-dev/cmd/stats", b"", response_topic="client/42/replies",
                   correlation=b"abc", wait_for=lambda g: any(m.topic == "client/42/replies" for m in g))
    reply = next(m for m in got if m.topic == "client/42/replies")
    assert json.loads(reply.payload)["ok"] is True
    assert reply.properties.CorrelationData == b"abc"

    got = _command(broker, "edged/test-dev/cmd/reload", b"", wait_for=lambda g: responses(g))
    assert responses(got)[0]["ok"] is True
    assert d.proc.poll() is None and "msg=reloaded" in d.output()
    assert d.stop() == 0


def test_snapshot_command_size_limited(tmp_path, broker, daemon_factory):
    cfg = write_config(tmp_path / "edged.toml", broker, extra=FAST
                       + "[commands]\nenabled = true\nsnapshot = true\nsnapshot_max_bytes = 20000\n")
    d = daemon_factory(cfg).start()
    _listening_for_commands(broker, d, "detections")
    got = _command(broker, "edged/test-dev/cmd/snapshot", b"",
                   wait_for=lambda g: responses(g) and any(m.topic == "edged/test-dev/snapshot" for m in g))
    r = responses(got)[0]
    assert r["ok"] is True and r["topic"] == "edged/test-dev/snapshot"
    jpeg = next(m.payload for m in got if m.topic == "edged/test-dev/snapshot")
    assert jpeg[:2] == b"\xff\xd8" and len(jpeg) == r["bytes"] <= 20000
    import io

    from PIL import Image

    assert Image.open(io.BytesIO(jpeg)).mode == "RGB"
    assert d.stop() == 0


# -- TLS -------------------------------------------------------------------------------------------

class Pki:
    """Certificates made on the spot with `cryptography`: a CA, server and client certificates,
    an expired server certificate and a second, unrelated CA."""

    def __init__(self, root: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.root = root
        now = datetime.datetime.now(datetime.timezone.utc)
        self._x509, self._hashes, self._ser, self._ec, self._oid = x509, hashes, serialization, ec, NameOID

        def key():
            return ec.generate_private_key(ec.SECP256R1())

        def name(cn):
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

        def ca(cn):
            k = key()
            cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn))
                    .public_key(k.public_key()).serial_number(x509.random_serial_number())
                    .not_valid_before(now - datetime.timedelta(days=1))
                    .not_valid_after(now + datetime.timedelta(days=30))
                    .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                    .sign(k, hashes.SHA256()))
            return k, cert

        def leaf(cn, issuer, *, server: bool, expired: bool = False):
            ik, icert = issuer
            k = key()
            b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(icert.subject)
                 .public_key(k.public_key()).serial_number(x509.random_serial_number()))
            if expired:
                b = b.not_valid_before(now - datetime.timedelta(days=30)).not_valid_after(now - datetime.timedelta(days=1))
            else:
                b = b.not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            if server:
                b = b.add_extension(x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
            return k, b.sign(ik, hashes.SHA256())

        self.ca = ca("edged test CA")
        self.other_ca = ca("some other CA")
        self.files = {}
        self._write("ca", self.ca)
        self._write("other_ca", self.other_ca)
        self._write("server", leaf("127.0.0.1", self.ca, server=True))
        self._write("expired_server", leaf("127.0.0.1", self.ca, server=True, expired=True))
        self._write("client", leaf("pi-kitchen", self.ca, server=False))
        self._write("rogue_client", leaf("pi-kitchen", self.other_ca, server=False))

    def _write(self, stem: str, pair) -> None:
        k, cert = pair
        ser = self._ser
        crt = self.root / f"{stem}.crt"
        key = self.root / f"{stem}.key"
        crt.write_bytes(cert.public_bytes(ser.Encoding.PEM))
        key.write_bytes(k.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
        self.files[stem] = (crt, key)

    def listener(self, server: str = "server", require_client_cert: bool = False) -> str:
        crt, key = self.files[server]
        return (f"cafile {self.files['ca'][0]}\ncertfile {crt}\nkeyfile {key}\n"
                f"require_certificate {'true' if require_client_cert else 'false'}\n")

    def mqtt(self, ca: str = "ca", client: str | None = None) -> str:
        lines = f'tls = true\nca_file = "{self.files[ca][0]}"\n'
        if client:
            crt, key = self.files[client]
            lines += f'cert_file = "{crt}"\nkey_file = "{key}"\n'
        return lines


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"))


def _tls_run(tmp_path, daemon_factory, pki, *, server="server", require=False, ca="ca", client=None):
    broker = Broker(tmp_path, listener_conf=pki.listener(server, require)).start()
    cfg = write_config(tmp_path / "edged.toml", broker, extra=FAST, mqtt=pki.mqtt(ca, client))
    return broker, daemon_factory(cfg).start()


def test_tls_and_mutual_tls_deliver(tmp_path, daemon_factory, pki):
    broker, d = _tls_run(tmp_path, daemon_factory, pki, require=True, client="client")
    try:
        crt, key = pki.files["client"]
        col = Collector(broker.host, broker.port, ca_file=str(pki.files["ca"][0]),
                        cert_file=str(crt), key_file=str(key)).start()
        assert wait_until(lambda: len(col.seqs("test-dev")) >= 5, 60), d.output()
        assert "tls=True" in d.output()
        col.stop()
    finally:
        d.kill()
        broker.stop()


@pytest.mark.parametrize("case, expected", [
    (dict(ca="other_ca"), "the broker's certificate is not trusted"),
    (dict(server="expired_server"), "the broker's certificate has expired"),
    (dict(require=True, client="rogue_client"), "the broker rejected the client certificate"),
    (dict(require=True), "the broker requires a client certificate"),
])
def test_tls_failures_give_one_clear_error_and_keep_spooling(tmp_path, daemon_factory, pki, case, expected):
    broker, d = _tls_run(tmp_path, daemon_factory, pki, **case)
    state = tmp_path / "state"
    try:
        assert wait_until(lambda: (state / "outbox.db").exists() and last_seq(state) >= 6, 60), d.output()
        time.sleep(3)  # several reconnect attempts (backoff at most 2 s here)
        out = d.output()
        errors = [ln for ln in out.splitlines() if "cannot connect to the broker" in ln]
        assert len(errors) == 1, out  # one line per kind of failure, not one per retry
        assert expected in errors[0]
        assert "Traceback" not in out
        assert d.proc.poll() is None
        rows, seq = spooled_and_last_seq(state)
        assert rows == seq  # everything is still spooled
    finally:
        d.kill()
        broker.stop()


# -- a broker that never acknowledges ------------------------------------------------------------

class SilentBroker:
    """Speaks just enough MQTT to accept a client and its publishes, and never sends a PUBACK."""

    def __init__(self) -> None:
        self.port = free_port()
        self.host = "127.0.0.1"
        self.publishes = 0
        self.topics: list[str] = []
        self._srv = socket.create_server((self.host, self.port))
        self._srv.settimeout(0.2)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._serve, daemon=True)
        self._t.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._srv.accept()
            except socket.timeout:
                continue
            except OSError:  # closed by stop()
                return
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    @staticmethod
    def _read_packet(conn) -> tuple[int, bytes] | None:
        head = conn.recv(1)
        if not head:
            return None
        mult, length = 1, 0
        while True:
            b = conn.recv(1)[0]
            length += (b & 0x7F) * mult
            mult *= 128
            if not b & 0x80:
                break
        body = b""
        while len(body) < length:
            chunk = conn.recv(length - len(body))
            if not chunk:
                return None
            body += chunk
        return head[0], body

    def _client(self, conn) -> None:
        conn.settimeout(0.5)
        v5 = False
        while not self._stop.is_set():
            try:
                pkt = self._read_packet(conn)
            except (socket.timeout, IndexError):
                continue
            except OSError:
                return
            if pkt is None:
                return
            kind = pkt[0] >> 4
            if kind == 1:  # CONNECT: protocol level is the byte after the protocol name
                v5 = pkt[1][6] == 5
                conn.sendall(b"\x20\x03\x00\x00\x00" if v5 else b"\x20\x02\x00\x00")
            elif kind == 3:
                self.publishes += 1  # and no PUBACK, ever
                n = int.from_bytes(pkt[1][:2], "big")
                self.topics.append(pkt[1][2:2 + n].decode())
            elif kind == 8:  # SUBSCRIBE → SUBACK granting QoS 1
                mid = pkt[1][:2]
                conn.sendall(b"\x90\x04" + mid + b"\x00\x01" if v5 else b"\x90\x03" + mid + b"\x01")
            elif kind == 12:
                conn.sendall(b"\xd0\x00")

    def stop(self) -> None:
        self._stop.set()
        self._srv.close()


def test_broker_that_never_acknowledges_deletes_nothing(tmp_path, daemon_factory):
    silent = SilentBroker()
    cfg = write_config(tmp_path / "edged.toml", silent, extra=FAST, mqtt="max_inflight = 8\n")
    d = daemon_factory(cfg).start()
    state = tmp_path / "state"
    try:
        results = lambda: [t for t in silent.topics if t.endswith(("/events", "/detections", "/motion"))]  # noqa: E731
        assert wait_until(lambda: len(results()) >= 8 and last_seq(state) >= 15, 60), d.output()
        assert d.stop() == 0
        last = last_seq(state)
        assert outbox_rows(state) == list(range(1, last + 1))  # nothing deleted without a PUBACK
        # The in-flight window holds: no more than max_inflight results were handed out
        # without an acknowledgement.
        assert len(results()) == 8
    finally:
        silent.stop()
