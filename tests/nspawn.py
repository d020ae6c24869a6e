"""A Debian 12 container with systemd as its PID 1, for `make test-systemd`.

The root is debootstrapped once (minbase, plus systemd and python3: what a plain Debian install
has and a new user would start from) into a cache outside the checkout, then copied afresh for
each run and booted with `systemd-nspawn -b --register=no --keep-unit`, which needs neither
systemd nor machined on the host. Commands run inside through nsenter into the container's
namespaces; files are reached from the host through /proc/<init>/root.

The container shares the host's network, so the daemon inside reaches a broker the test starts on
the host's loopback. Python packages come from a wheelhouse built on the host (the container's
pip would need the host's certificate setup to reach the index); apt inside fetches from the
same Debian mirror as the host and keeps its downloads in the cache.
No pytest in here.
"""

from __future__ import annotations

import configparser
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUITE = "bookworm"
# minbase has no init; systemd-sysv makes systemd PID 1. python3: scripts/provision needs it.
INCLUDE = ("systemd", "systemd-sysv", "python3")
WHEELHOUSE = "/var/cache/edged-wheels"  # inside the container
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ContainerError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("EDGED_SYSTEMD_CACHE", "/var/cache/edged/test-systemd"))


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (DEBIAN_MIRROR overrides)."""
    if os.environ.get("DEBIAN_MIRROR"):
        return os.environ["DEBIAN_MIRROR"]
    texts = []
    for p in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if p.is_file() and p.suffix in ("", ".list", ".sources"):
            texts.append((p.suffix, p.read_text(errors="replace")))
    for suffix, text in texts:
        if suffix == ".sources":  # deb822: URIs: and Suites: in one stanza
            for stanza in re.split(r"\n\s*\n", text):
                uris = re.search(r"^URIs:\s*(.+)$", stanza, re.M)
                suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
                if uris and suites and SUITE in suites.group(1).split():
                    return uris.group(1).split()[0]
        else:
            for m in re.finditer(rf"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+{SUITE}\s", text, re.M):
                return m.group(1)
    raise ContainerError(f"no {SUITE} mirror in /etc/apt/sources.list*; set DEBIAN_MIRROR")


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def base_root(say=print) -> Path:
    """The cached pristine root, debootstrapped on first use."""
    root = cache_dir() / f"{SUITE}-minbase"
    done = root / ".edged-complete"
    with _locked(cache_dir() / ".lock"):
        if done.is_file():
            return root
        if root.exists():
            shutil.rmtree(root)  # a debootstrap that did not finish
        mirror = debian_mirror()
        say(f"debootstrap {SUITE} minbase from {mirror} into {root} (once; a few minutes)")
        res = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}",
                              SUITE, str(root), mirror], capture_output=True, text=True)
        if res.returncode != 0:
            raise ContainerError(f"debootstrap failed ({res.returncode}): {res.stdout[-1500:]}{res.stderr[-1500:]}")
        # apt in the container keeps what it downloads (cache bind-mounted over the archives).
        (root / "etc/apt/apt.conf.d/01edged-keep-debs").write_text('Binary::apt::APT::Keep-Downloaded-Packages "true";\n')
        done.write_text(mirror + "\n")
    return root


def requirements() -> list[str]:
    """What `pip install edged[pi]` needs, less systemd-python (Debian's python3-systemd, which
    provisioning installs, provides it) and plus the build backend."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    reqs = [line.strip() for line in
            cfg["options"]["install_requires"].splitlines() + cfg["options.extras_require"]["pi"].splitlines()]
    reqs = [r for r in reqs if r and not r.startswith("#") and not r.startswith("systemd-python")]
    build = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    return list(build) + reqs


def wheelhouse(say=print) -> Path:
    reqs = requirements()
    key = hashlib.sha256("\n".join(reqs + [sys.version]).encode()).hexdigest()[:12]
    d = cache_dir() / f"wheels-{key}"
    with _locked(cache_dir() / ".lock"):
        if (d / ".edged-complete").is_file():
            return d
        say(f"pip download into {d}: {' '.join(reqs)}")
        res = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                              "--only-binary=:all:", "-d", str(d), *reqs], capture_output=True, text=True)
        if res.returncode != 0:
            raise ContainerError(f"pip download failed: {res.stderr[-2000:]}")
        (d / ".edged-complete").write_text("\n".join(reqs) + "\n")
    return d


def source_files() -> list[str]:
    """The checkout as it is (tracked and new files, not ignored ones)."""
    res = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others",
                          "--exclude-standard"], capture_output=True, check=True)
    return [f for f in res.stdout.decode().split("\0") if f and (REPO / f).is_file()]


class Container:
    """One booted container. `run()` executes inside; `path()` reaches its files."""

    def __init__(self, workdir: Path, say=print) -> None:
        self.say = say
        self.workdir = workdir
        self.root = workdir / "root"
        self.console = workdir / "console.log"
        self.name = f"edged-test-{os.getpid()}"
        self.proc: subprocess.Popen | None = None
        self.leader: int | None = None

    def prepare(self) -> None:
        base = base_root(self.say)
        wheels = wheelhouse(self.say)
        self.workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(self.root)], check=True)
        dest = self.root / "root/edged"
        for f in source_files():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dest / f)
        self.wheels = wheels
        self.say(f"container root copied in {time.monotonic() - t0:.1f} s")

    def boot(self, timeout: float = 120.0) -> None:
        apt_cache = cache_dir() / "apt-archives"
        (apt_cache / "partial").mkdir(parents=True, exist_ok=True)
        argv = ["systemd-nspawn", "--quiet", "-D", str(self.root), "-b", "--register=no", "--keep-unit",
                f"--machine={self.name}", "--console=read-only",
                f"--bind-ro={self.wheels}:{WHEELHOUSE}", f"--bind={apt_cache}:/var/cache/apt/archives"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.console.open("wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while self.leader is None:
            if self.proc.poll() is not None:
                raise ContainerError(f"systemd-nspawn exited with {self.proc.returncode}: "
                                     f"{self.console.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                raise ContainerError("the container's init did not appear")
            for child in _children(self.proc.pid):
                if _comm(child) == "systemd":
                    self.leader = child
            time.sleep(0.05)
        # systemctl talks to PID 1 through its private socket, which appears early in the boot.
        while not self.path("/run/systemd/private").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise ContainerError(f"systemd in the container did not come up: "
                                     f"{self.console.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)
        state = self.run(["systemctl", "is-system-running", "--wait"], timeout=timeout, check=False)
        if state.stdout.strip() not in ("running", "degraded"):
            raise ContainerError(f"boot did not finish: {state.stdout.strip()} {state.stderr.strip()}")
        if state.stdout.strip() == "degraded":
            failed = self.run(["systemctl", "--failed", "--no-legend", "--plain"], check=False).stdout
            self.say(f"container booted degraded; failed units: {failed.strip()}")

    def run(self, argv: list[str], *, timeout: float = 120.0, check: bool = True, env: dict | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:
        environment = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", "SYSTEMD_PAGER": "",
                       "SYSTEMD_COLORS": "0", **(env or {})}
        cmd = ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-p", "-C", "--",
               "env", "-i", *(f"{k}={v}" for k, v in environment.items()), *argv]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
        if check and res.returncode != 0:
            raise ContainerError(f"{' '.join(argv)}: exit {res.returncode}: {res.stdout[-2000:]}{res.stderr[-2000:]}")
        return res

    def path(self, inside: str) -> Path:
        return Path(f"/proc/{self.leader}/root") / inside.lstrip("/")

    def shutdown(self, timeout: float = 60.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to power off
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def remove(self) -> None:
        if self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def tools_missing() -> list[str]:
    return [t for t in ("systemd-nspawn", "debootstrap", "nsenter") if not shutil.which(t)]
