"""A real PostgreSQL server for the tests and the benchmarks: Debian's `postgresql` package,
a fresh cluster in a temporary directory, listening on a free loopback port.

PostgreSQL refuses to run as root, so when we are root the cluster belongs to the `postgres`
user (which the package creates) and its programs run through `runuser -u postgres`.

No pytest in here: `make bench` uses it without the test extras installed.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from harness import free_port


def pg_bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise RuntimeError("PostgreSQL is not installed (make test and make bench install it: "
                           "apt-get install postgresql)")
    return Path(found[-1]).parent


class Postgres:
    """One PostgreSQL cluster: `start()`, `stop()`, `restart()`, `url(db)`, `create_database()`.

    fsync: off by default (tests do not check PostgreSQL's own durability); the benchmark turns
    it on to measure what a real server would sustain.
    """

    def __init__(self, *, port: int | None = None, fsync: bool = False) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self._repick = port is None  # see start()
        self.bindir = pg_bindir()
        self.fsync = fsync
        self.user = "postgres" if os.getuid() == 0 else pwd.getpwuid(os.getuid()).pw_name
        # Not under pytest's tmp_path: that is root's and closed to the postgres user.
        self.dir = Path(tempfile.mkdtemp(prefix="edged-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        if os.getuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                  "--locale=C.UTF-8", "--no-sync")

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / tool), *args]
        if os.getuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd="/")
        if check and proc.returncode != 0:
            tail = self.log.read_text(errors="replace")[-800:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} failed ({proc.returncode}): {proc.stderr.strip()[-800:]} {tail}")
        return proc

    def start(self) -> "Postgres":
        # A port picked by free_port() may be taken by another process (another test process,
        # too) before the server binds it: then the first start tries another one.
        for attempt in range(5):
            opts = (f"-p {self.port} -k {self.dir} -c listen_addresses={self.host} "
                    f"-c fsync={'on' if self.fsync else 'off'} -c max_connections=100 "
                    f"-c shared_buffers=64MB")
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", opts, "start")
            except RuntimeError as exc:
                if not self._repick or attempt == 4 or "could not bind" not in str(exc):
                    raise
                self.port = free_port()
                continue
            self._repick = False
            return self
        raise AssertionError("unreachable")

    def stop(self, mode: str = "fast") -> None:
        """mode: fast (clients disconnected, clean shutdown) or immediate (as if it crashed)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Postgres":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
