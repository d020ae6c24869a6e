"""The MQTT link's own logic: reconnect backoff and how connection errors are worded."""

import random
import socket
import ssl

from edged import config
from edged.delivery.link import Link, describe_drop_before_connack, describe_error, describe_error_text
from edged.delivery.outbox import Outbox


def make_link(tmp_path, **mqtt):
    cfg = config.Config()
    for k, v in mqtt.items():
        setattr(cfg.mqtt, k, v)
    return Link(cfg, Outbox(tmp_path / "o.db"))


def test_backoff_doubles_with_jitter_up_to_the_cap(tmp_path):
    link = make_link(tmp_path, reconnect_min_s=1.0, reconnect_max_s=60.0)
    link._rng = random.Random(7)
    link._attempt = 0
    delays = [link._next_delay() for _ in range(12)]
    for n, d in enumerate(delays):
        base = min(60.0, 2.0 ** n)
        assert base / 2 <= d <= base, (n, d)
    assert max(delays) <= 60.0 and delays[-1] >= 30.0
    # Jitter: two devices that lost the same broker do not retry in lockstep.
    other = make_link(tmp_path / "b", reconnect_min_s=1.0, reconnect_max_s=60.0)
    other._rng = random.Random(8)
    other._attempt = 0
    assert [other._next_delay() for _ in range(12)] != delays
    # paho is told to wait exactly our delay.
    assert link.client._reconnect_min_delay == link.client._reconnect_max_delay == delays[-1]


def test_connection_errors_in_words():
    assert "is the broker running" in describe_error(ConnectionRefusedError(111, "Connection refused"))
    assert "cannot resolve" in describe_error(socket.gaierror(-2, "Name or service not known"))
    assert "unreachable" in describe_error(TimeoutError("timed out"))
    exc = ssl.SSLCertVerificationError(1, "certificate verify failed")
    exc.verify_message = "certificate has expired"
    assert describe_error(exc).startswith("the broker's certificate has expired")
    exc.verify_message = "unable to get local issuer certificate"
    assert "check mqtt.ca_file" in describe_error(exc)
    assert "requires a client certificate" in describe_error_text(
        "failed to receive on socket: [SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required")
    assert "rejected the client certificate" in describe_error_text("[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca")


def test_a_tls_hang_up_before_connack_without_a_client_certificate_names_the_certificate():
    # A broker that requires a client certificate ends the connection after the handshake; the
    # client reads either its alert or, when the close comes first, only the hang-up. Both name
    # the missing certificate; with one set, or without TLS, a hang-up is not taken for that.
    eof = "failed to receive on socket: EOF occurred in violation of protocol (_ssl.c:2427)"
    alert = "failed to receive on socket: [SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required"
    for text in (eof, alert, "failed to receive on socket: [Errno 104] Connection reset by peer"):
        got = describe_drop_before_connack(text, tls=True, client_cert=False)
        assert "the broker requires a client certificate" in got and "mqtt.cert_file" in got, got
    assert "requires a client certificate" not in describe_drop_before_connack(eof, tls=True, client_cert=True)
    assert describe_drop_before_connack(eof, tls=False, client_cert=False) == describe_error_text(eof)
    unknown_ca = "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca"
    assert "rejected the client certificate" in describe_drop_before_connack(unknown_ca, tls=True, client_cert=True)
