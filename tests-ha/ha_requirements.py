"""Print the Python requirements of the integrations a Home Assistant started by tests-ha loads
(its default set, the frontend, onboarding, the config API and MQTT, with their dependencies),
one per line, for `make test-ha` to install before Home Assistant runs with --skip-pip.
Run with the Home Assistant venv's python."""

import json
from pathlib import Path

import homeassistant.bootstrap as bootstrap
import homeassistant.components as components

ROOT = Path(components.__file__).parent
wanted = set(bootstrap.CORE_INTEGRATIONS) | set(bootstrap.DEFAULT_INTEGRATIONS) \
    | set(bootstrap.DEFAULT_INTEGRATIONS_RECOVERY_MODE) | set(bootstrap.FRONTEND_INTEGRATIONS) \
    | set(bootstrap.LOGGING_INTEGRATIONS) | {"api", "config", "onboarding", "mqtt", "http"}
seen, reqs, todo = set(), set(), list(wanted)
while todo:
    domain = todo.pop()
    if domain in seen:
        continue
    seen.add(domain)
    manifest = ROOT / domain / "manifest.json"
    if not manifest.is_file():
        continue
    m = json.loads(manifest.read_text())
    reqs.update(m.get("requirements", []))
    todo += m.get("dependencies", []) + m.get("after_dependencies", [])
print("\n".join(sorted(reqs)))
