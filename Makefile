# edged: the two commands a newcomer needs are `make run` and `make test`.
# Both install what is missing (Debian packages, the venv, Python packages) on their own.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CONFIG ?=

.PHONY: run test bench deps venv broker clean

run: deps venv broker
	@echo "edged: watch the results with:  mosquitto_sub -v -t 'edged/#'"
	$(VENV)/bin/edged run $(if $(CONFIG),--config $(CONFIG))

test: deps venv
	$(PY) -m pytest -q

venv: $(VENV)/.installed

# Debian packages: the broker and its clients, and venv support for the system Python.
deps:
	@missing=""; \
	[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null || missing="$$missing mosquitto"; \
	command -v mosquitto_sub >/dev/null || missing="$$missing mosquitto-clients"; \
	$(PYTHON) -c 'import ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
		echo "edged: installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.installed: setup.cfg pyproject.toml
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

# A local broker on 127.0.0.1:1883 unless one already answers there (Debian's service does).
broker:
	@scripts/dev-broker

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
