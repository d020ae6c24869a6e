"""Processes that the tests and the benchmarks both run next to edged: a real mosquitto on a free
loopback port, and a socket standing in for systemd's notify socket.

No pytest in here: `make bench` runs these without the test extras installed.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto_bin() -> str:
    found = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.access(found, os.X_OK):
        raise RuntimeError("mosquitto is not installed (make test and make bench install it: "
                           "apt-get install mosquitto)")
    return found


class Broker:
    """A mosquitto process on 127.0.0.1, which can be stopped and started again on the same port.

    persistent: sessions and queued QoS 1 messages survive a restart (saved on stop).
    listener_conf: extra lines for the listener, e.g. cafile/certfile/keyfile for TLS.
    cores: CPUs to pin the broker to (benchmarks keep it off the daemon's core).
    """

    def __init__(self, workdir: Path, port: int | None = None, *, persistent: bool = False,
                 listener_conf: str = "", cores: set[int] | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        # A port picked here may be taken by another process (another test process, too) before
        # mosquitto binds it: then the first start picks another one.
        self._repick = port is None
        self.cores = cores
        self.proc: subprocess.Popen | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        persistence = (f"persistence true\npersistence_location {workdir}/\n" if persistent
                       else "persistence false\n")
        self._conf_tail = (f"{listener_conf}allow_anonymous true\n"
                           f"{persistence}user {pwd.getpwuid(os.getuid()).pw_name}\n")
        self._write_conf()

    def _write_conf(self) -> None:
        self.conf.write_text(f"listener {self.port} 127.0.0.1\n{self._conf_tail}")

    def _runs(self) -> int:
        """How many times a mosquitto has come up with this log (it logs "running" once its
        listener is bound)."""
        try:
            return self.log.read_text(errors="replace").count(" running\n")
        except FileNotFoundError:
            return 0

    def start(self) -> "Broker":
        for _ in range(5):
            if self._start_once():
                self._repick = False
                return self
            if not self._repick:
                break
            self.port = free_port()
            self._write_conf()
        raise RuntimeError(f"mosquitto did not start on port {self.port}: {self.log.read_text()[-500:]}")

    def _start_once(self) -> bool:
        runs = self._runs()
        self.proc = subprocess.Popen([mosquitto_bin(), "-c", str(self.conf)],
                                     stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        if self.cores:
            os.sched_setaffinity(self.proc.pid, self.cores)
        end = time.monotonic() + 10
        while time.monotonic() < end and self.proc.poll() is None:
            # Ours is up (not some other process that took the port) when it logged that it
            # runs and answers on the port.
            if self._runs() > runs and self.listening():
                return True
            time.sleep(0.05)
        self.stop()
        return False

    def listening(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                # A clean stop is where a persistent broker saves its sessions and queues: a loaded
                # machine must not turn it into a kill, which loses what it held in memory.
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "Broker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class NotifySocket:
    """A datagram socket standing in for systemd's notify socket; records every message with
    its `time.monotonic()` arrival."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._rx, daemon=True)
        self._t.start()

    def _rx(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def keys(self) -> list[str]:
        """Every KEY=VALUE line, in order."""
        return [line for _, m in self.messages for line in m.splitlines()]

    def count(self, line: str) -> int:
        return self.keys().count(line)

    def first(self, line: str) -> float | None:
        """When the first message with this KEY=VALUE line arrived, or None."""
        return next((t for t, m in self.messages if line in m.splitlines()), None)

    def close(self) -> None:
        self._stop.set()
        self._t.join(1)
        self.sock.close()


class TcpProxy:
    """A loopback TCP proxy in front of a broker, for cutting connections under a client.

    `refuse(True)` makes the broker look down. `hold(True)` stops forwarding in both directions (what is sent meanwhile is kept back, and
    lost at the next cut, as on a network that went quiet before it dropped); `cut()` closes
    every proxied connection at once; new connections are accepted at once afterwards."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.host = "127.0.0.1"
        self.target = (target_host, target_port)
        self._srv = socket.socket()
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind((self.host, 0))
        self._srv.listen(16)
        self.port = self._srv.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._hold = threading.Event()
        self._refuse = threading.Event()
        self._closed = threading.Event()
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            if self._refuse.is_set():
                client.close()  # the broker is "down", yet its port stays ours
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._pairs.append((client, upstream))
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        held = b""
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                break
            if not data:
                break
            if self._hold.is_set():
                held += data
                continue
            try:
                dst.sendall(held + data)
            except OSError:
                break
            held = b""
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def refuse(self, on: bool) -> None:
        """While on, connections are closed as soon as they are made (and open ones are cut):
        a broker that is down, on a port no other process can take meanwhile."""
        (self._refuse.set if on else self._refuse.clear)()
        if on:
            self.cut()

    def hold(self, on: bool) -> None:
        (self._hold.set if on else self._hold.clear)()

    def cut(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._closed.set()
        self._srv.close()
        self.cut()
