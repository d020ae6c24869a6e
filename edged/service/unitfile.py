"""What the installed systemd unit hands the daemon, read from the unit file: the user it runs as
and the directories systemd creates and exports to it ($STATE_DIRECTORY, $RUNTIME_DIRECTORY,
$CONFIGURATION_DIRECTORY).

`edged doctor` applies these before it loads the config, so that the outbox it checks is the one
the service writes (/var/lib/edged/outbox.db with StateDirectory=edged), not the XDG default of
whoever runs the doctor. Drop-ins (edged.service.d/*.conf) are read after the unit, as systemd
does; an empty assignment clears a list.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

INSTALLED_UNIT = Path("/etc/systemd/system/edged.service")

# Where a system unit's directories live (systemd.exec(5), "RuntimeDirectory=, StateDirectory=, ...").
_BASES = {"StateDirectory": ("/var/lib", "STATE_DIRECTORY"),
          "RuntimeDirectory": ("/run", "RUNTIME_DIRECTORY"),
          "ConfigurationDirectory": ("/etc", "CONFIGURATION_DIRECTORY"),
          "CacheDirectory": ("/var/cache", "CACHE_DIRECTORY"),
          "LogsDirectory": ("/var/log", "LOGS_DIRECTORY")}


@dataclass
class UnitEnv:
    path: Path
    user: str = ""  # empty: root
    directories: dict[str, list[str]] = field(default_factory=dict)  # StateDirectory -> [abs paths]

    def environ(self) -> dict[str, str]:
        """The variables systemd sets for these directories."""
        return {_BASES[key][1]: ":".join(paths) for key, paths in self.directories.items() if paths}

    @property
    def state_dir(self) -> str | None:
        paths = self.directories.get("StateDirectory") or []
        return paths[0] if paths else None


def _assignments(text: str):
    """(key, value) of the [Service] section, continuation lines joined."""
    section, pending = "", ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        if section == "Service" and "=" in line:
            key, _, value = line.partition("=")
            yield key.strip(), value.strip()


def read_unit(path: Path) -> UnitEnv:
    """The unit at `path` and its drop-ins. Raises OSError when the unit cannot be read."""
    texts = [path.read_text()]
    dropins = sorted(Path(f"{path}.d").glob("*.conf"), key=lambda p: p.name)
    texts += [p.read_text() for p in dropins if p.is_file()]
    unit = UnitEnv(path)
    for text in texts:
        for key, value in _assignments(text):
            if key == "User":
                unit.user = value
            elif key in _BASES:
                base = _BASES[key][0]
                paths = unit.directories.setdefault(key, [])
                if not value:
                    paths.clear()
                    continue
                # "name" or "name:symlink" (systemd ≥ 250): the first part is the directory.
                paths += [os.path.join(base, entry.split(":")[0]) for entry in re.split(r"\s+", value)]
    return unit


def installed(path: str | Path | None = None) -> UnitEnv | None:
    """The installed unit (or the one at `path`), or None when there is none."""
    p = Path(path) if path else INSTALLED_UNIT
    try:
        return read_unit(p)
    except OSError:
        return None


def apply(unit: UnitEnv, environ: dict | None = None) -> dict[str, str]:
    """Set the unit's directory variables in `environ` (default os.environ) where they are not
    set already (under systemd they are); returns the ones it set."""
    env = os.environ if environ is None else environ
    added = {k: v for k, v in unit.environ().items() if not env.get(k)}
    env.update(added)
    return added
