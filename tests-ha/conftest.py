"""`make test-ha`: edged against a real Home Assistant Core (see test_home_assistant_core.py).
Not part of `make test`: it needs Home Assistant installed in its own venv (the Makefile does that).
The fixtures and helpers are the main suite's (tests/conftest.py), loaded under another name."""

import importlib.util
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))
_spec = importlib.util.spec_from_file_location("edged_suite_conftest", TESTS / "conftest.py")
_suite = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_suite)

broker = _suite.broker
daemon_factory = _suite.daemon_factory
free_port, wait_until, write_config = _suite.free_port, _suite.wait_until, _suite.write_config
