"""Is there an MQTT broker at host:port? Ask it: send an MQTT CONNECT and read the CONNACK.

An open TCP port proves nothing (any service may hold 1883); only a CONNACK does. `edged doctor`
uses this, and so does `scripts/dev-broker` (`python3 -m edged.delivery.probe HOST PORT`), which
is why this module needs nothing beyond the standard library.

The CONNECT is MQTT 3.1.1 (every broker edged supports answers it), clean session, with the
config's user name and password when set; a DISCONNECT follows an accepted one at once.
"""

from __future__ import annotations

import socket
import ssl
import struct
import sys
from dataclasses import dataclass

# MQTT 3.1.1 CONNACK return codes (OASIS MQTT 3.1.1, section 3.2.2.3).
REFUSED = {
    1: "refused: unacceptable protocol version",
    2: "refused: client identifier rejected",
    3: "refused: server unavailable",
    4: "refused: bad user name or password",
    5: "refused: not authorised",
}


@dataclass(frozen=True)
class Answer:
    ok: bool            # a CONNACK accepting the connection
    reachable: bool     # something accepted the TCP connection
    detail: str         # what happened, in words
    tls: str = ""       # the TLS version, when TLS was used
    peer_cn: str = ""   # the broker certificate's common name, when TLS was used


class TlsRefused(Exception):
    """The TLS handshake failed (certificate not trusted, or no TLS on that port)."""

    def __init__(self, message: str, untrusted: bool) -> None:
        super().__init__(message)
        self.untrusted = untrusted


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(client_id: str, username: str = "", password: str = "", keepalive: int = 10) -> bytes:
    flags = 0x02  # clean session
    payload = _string(client_id)
    if username:
        flags |= 0x80
        payload += _string(username)
        if password:
            flags |= 0x40
            payload += _string(password)
    variable = _string("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive)
    body = variable + payload
    return bytes([0x10]) + _remaining_length(len(body)) + body


def _read(sock, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def ask(host: str, port: int, *, timeout: float = 3.0, username: str = "", password: str = "",
        tls: ssl.SSLContext | None = None, client_id: str = "edged-probe") -> Answer:
    """Connect, send CONNECT, read CONNACK. Raises TlsRefused for a failed TLS handshake."""
    where = f"{host}:{port}"
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        return Answer(False, False, f"cannot connect to {where}: {reason}")
    version = cn = ""
    with raw:
        sock = raw
        if tls is not None:
            try:
                sock = tls.wrap_socket(raw, server_hostname=host)
            except ssl.SSLCertVerificationError as exc:
                raise TlsRefused(f"{where}: TLS certificate not trusted: {exc.verify_message}", True) from None
            except (ssl.SSLError, OSError) as exc:
                raise TlsRefused(f"{where}: TLS handshake failed: {exc}", False) from None
            version = sock.version() or ""
            subject = dict(x[0] for x in (sock.getpeercert() or {}).get("subject", ()) if x)
            cn = subject.get("commonName", "?")
        try:
            sock.sendall(connect_packet(client_id, username, password))
            head = _read(sock, 4)
        except socket.timeout:
            return Answer(False, True, f"{where} accepts TCP connections but sent no MQTT CONNACK within "
                                       f"{timeout:g} s: not an MQTT broker?", version, cn)
        except OSError as exc:
            return Answer(False, True, f"{where} accepts TCP connections but broke off the MQTT CONNECT "
                                       f"({exc.strerror or exc}): not an MQTT broker?", version, cn)
        if len(head) < 4 or head[0] != 0x20 or head[1] != 0x02:
            if len(head) == 4:  # show a little more of what it said: a banner names the service
                try:
                    sock.settimeout(min(timeout, 0.5))
                    head += sock.recv(28)
                except OSError:
                    pass
            shown = repr(head[:32]) if head else "nothing"
            return Answer(False, True, f"{where} accepts TCP connections but answered MQTT CONNECT with "
                                       f"{shown}: not an MQTT broker", version, cn)
        code = head[3]
        if code:
            return Answer(False, True, f"{where}: the MQTT broker {REFUSED.get(code, f'refused: code {code}')}",
                          version, cn)
        try:
            sock.sendall(b"\xe0\x00")  # DISCONNECT
        except OSError:
            pass
    return Answer(True, True, f"{where}: an MQTT broker accepted CONNECT", version, cn)


def main(argv: list[str]) -> int:
    """`python3 -m edged.delivery.probe HOST PORT`: exit 0 for a broker, 1 for nothing there,
    3 for something that is not an MQTT broker (or refuses us); the answer in words on stdout."""
    host, port = argv[0], int(argv[1])
    answer = ask(host, port, timeout=float(argv[2]) if len(argv) > 2 else 3.0)
    print(answer.detail)
    return 0 if answer.ok else (3 if answer.reachable else 1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
