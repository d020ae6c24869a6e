# edged: the two commands a newcomer needs are `make run` and `make test`.
# Both install what is missing (Debian packages, the venv, Python packages) on their own.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?=

.PHONY: run test fuzz test-systemd test-ha check-aarch64 bench deps test-deps cloud-deps systemd-deps venv test-venv cloud-venv broker stop clean

run: deps venv broker
	@echo "edged: watch the results with:  mosquitto_sub -v -t 'edged/#'"
	$(VENV)/bin/edged run $(if $(CONFIG),--config $(CONFIG))

# In TEST_JOBS parallel processes (pytest-xdist): most tests wait on a daemon, a broker or a
# database rather than use a core, so 4 finish sooner than 1 even on 2 cores. Tests that share a
# module-scoped fixture stay in one process (--dist loadgroup; tests/conftest.py marks them).
# TEST_JOBS=0 runs everything in this one process.
TEST_JOBS ?= 4
test: deps test-deps test-venv
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist loadgroup)

# The property tests of every parser that takes outside input (tests/test_fuzz.py) with a long
# budget: 3000 examples each instead of `make test`'s 60 (a few minutes on a Pi 4).
fuzz: deps test-deps test-venv
	HYPOTHESIS_PROFILE=fuzz nice -n 10 $(PY) -m pytest -q -p no:cacheprovider tests/test_fuzz.py

# The provisioned unit under a real systemd: a Debian 12 minbase container booted with
# systemd-nspawn (root; about 4 minutes, the first run also debootstraps the cached root).
# Not part of `make test`. docs/deploy.md, "Checked under a real systemd", says what it checks.
test-systemd: deps test-deps systemd-deps test-venv
	$(PY) -m pytest -q -s -p no:cacheprovider tests/boot_systemd.py

# The compiled resampler library built for aarch64 (the Pi's architecture) and checked there under
# qemu user emulation: its resampling and decoding against numpy (scripts/check-aarch64 says what
# it fetches and runs; root or sudo; no model runs there, nothing is timed). Not part of `make test`.
check-aarch64: deps test-deps test-venv
	scripts/check-aarch64

# Optional, not in CI: edged against a real Home Assistant Core (tests-ha/), installed from PyPI
# into its own venv. 2024.3.3 is the newest release that runs on Python 3.11 (Debian 12's);
# HA runs with --skip-pip, so the requirements of the integrations it loads (frontend, onboarding,
# MQTT, ...: tests-ha/ha_requirements.py lists them) are installed here, under HA's own pins.
HA_VENV    ?= .ha-venv
HA_VERSION ?= 2024.3.3
test-ha: deps test-deps test-venv $(HA_VENV)/.installed
	EDGED_HA_PYTHON=$(HA_VENV)/bin/python $(PY) -m pytest -q -p no:cacheprovider tests-ha

# HA is installed under its own pins (package_constraints.txt in its wheel) from the start: its
# loose requirements alone send pip backtracking for a long time through newer Bluetooth packages.
$(HA_VENV)/.installed:
	@[ -x $(HA_VENV)/bin/python ] || $(PYTHON) -m venv $(HA_VENV)
	$(HA_VENV)/bin/pip download --disable-pip-version-check -q --no-deps -d $(HA_VENV)/wheel homeassistant==$(HA_VERSION)
	$(HA_VENV)/bin/python -c 'import sys, zipfile; w = zipfile.ZipFile(sys.argv[1]); \
		sys.stdout.write(w.read("homeassistant/package_constraints.txt").decode())' \
		$(HA_VENV)/wheel/homeassistant-$(HA_VERSION)-py3-none-any.whl > $(HA_VENV)/constraints.txt
	$(HA_VENV)/bin/pip install --disable-pip-version-check homeassistant==$(HA_VERSION) -c $(HA_VENV)/constraints.txt
	$(HA_VENV)/bin/python tests-ha/ha_requirements.py > $(HA_VENV)/requirements.txt
	@# josepy 2 dropped what the acme package under HA 2024.3's cloud integration imports.
	$(HA_VENV)/bin/pip install --disable-pip-version-check -r $(HA_VENV)/requirements.txt 'josepy<2' \
		-c $(HA_VENV)/constraints.txt
	@touch $@

bench: deps cloud-deps cloud-venv
	$(PY) benchmarks/run.py

venv: $(VENV)/.installed
test-venv: $(VENV)/.installed-test
cloud-venv: $(VENV)/.installed-cloud

# Debian packages `make run` needs: the broker and its clients, venv support for the system Python,
# and a C compiler with the C library's headers, which build the compiled resampler when edged is
# installed (edged/stages/vision/_resample.c; without them edged installs and uses the slower
# numpy resampler).
deps:
	@scripts/apt-ensure mosquitto:/usr/sbin/mosquitto mosquitto-clients:mosquitto_sub \
		python3-venv:'$(PYTHON) -c "import ensurepip"' gcc:gcc 'libc6-dev:test -e /usr/include/stdint.h'

# What the tests need beyond that: systemd's tools (the unit is checked with systemd-analyze)
# and what systemd-python builds against; util-linux's setpriv and mount for the outbox fault tests
# (file permissions as the service user sees them; a real 1 MiB filesystem).
test-deps: cloud-deps
	@scripts/apt-ensure systemd:systemd-analyze 'libsystemd-dev:pkg-config --exists libsystemd' \
		pkg-config:pkg-config gcc:gcc util-linux:setpriv \
		python3-dev:'$(PYTHON) -c "import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()[\"include\"], \"Python.h\")))"'

# `make test-systemd`: the container manager and the tool that builds its Debian root.
systemd-deps:
	@scripts/apt-ensure systemd-container:/usr/bin/systemd-nspawn debootstrap:/usr/sbin/debootstrap

# Not -q: the first install takes a while, and pip's own lines show it is working.
$(VENV)/.installed: setup.cfg setup.py pyproject.toml edged/stages/vision/_resample.c
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	@echo "edged: installing edged and its Python packages into $(VENV) (first run only)"
	$(PY) -m pip install --disable-pip-version-check -e .
	@touch $@

# The cloud half (edged ingest) runs against PostgreSQL: the tests and the benchmarks start a
# server of their own from Debian's package (its service need not run).
cloud-deps:
	@scripts/apt-ensure 'postgresql:ls /usr/lib/postgresql/*/bin/pg_ctl'

$(VENV)/.installed-cloud: $(VENV)/.installed setup.cfg
	$(PY) -m pip install -q --disable-pip-version-check -e '.[cloud]'
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed setup.cfg
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

# A local broker on 127.0.0.1:1883 unless one already answers there (Debian's service does).
broker:
	@scripts/dev-broker

# Stops the broker `make run` started (scripts/dev-broker records its pid); not a system one.
stop:
	@if [ -f run/mosquitto.pid ] && kill -0 "$$(cat run/mosquitto.pid)" 2>/dev/null; then \
		kill "$$(cat run/mosquitto.pid)" && rm -f run/mosquitto.pid && echo "edged: stopped the mosquitto make run started"; \
	else \
		rm -f run/mosquitto.pid; echo "edged: no broker started by make run is running"; \
	fi

clean: stop
	rm -rf $(VENV) $(HA_VENV) build *.egg-info .pytest_cache run
	@echo "edged: kept the outbox and state (state_dir, default ~/.local/state/edged): results not yet delivered live there"
