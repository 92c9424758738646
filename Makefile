# One command runs every check: `make test`. `make demo` shows coalmine at work.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test lint typecheck unit demo bench clean system-deps system-deps-prometheus \
	system-deps-postgresql browser-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check daemon tests bench
	$(BIN)/ruff format --check daemon tests bench

typecheck: $(STAMP)
	$(BIN)/mypy --strict

# The integration tests start a real Prometheus and a real PostgreSQL: Debian's packages,
# installed here when missing.
system-deps: system-deps-prometheus system-deps-postgresql

system-deps-prometheus:
	@if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then \
	  echo "Installing Debian's prometheus package for the integration tests..."; \
	  if [ "$$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo -n"; fi; \
	  if command -v apt-get >/dev/null 2>&1; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    $$sudo apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 || \
	    { $$sudo apt-get update -q >/dev/null && \
	      $$sudo apt-get install -y -q --no-install-recommends prometheus >/dev/null; } || \
	    echo "warning: could not install prometheus; its integration tests will be skipped"; \
	  else \
	    echo "warning: no apt-get; install Prometheus (prometheus, promtool) to run its integration tests"; \
	  fi; \
	fi

# The tests run their own server (initdb + pg_ctl in a temporary folder, a free loopback
# port), never the cluster the package may have set up.
system-deps-postgresql:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  echo "Installing Debian's postgresql package for the integration tests..."; \
	  if [ "$$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo -n"; fi; \
	  if command -v apt-get >/dev/null 2>&1; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    $$sudo apt-get install -y -q --no-install-recommends postgresql >/dev/null 2>&1 || \
	    { $$sudo apt-get update -q >/dev/null && \
	      $$sudo apt-get install -y -q --no-install-recommends postgresql >/dev/null; } || \
	    echo "warning: could not install postgresql; its integration tests will be skipped"; \
	  else \
	    echo "warning: no apt-get; install PostgreSQL (initdb, pg_ctl) to run its integration tests"; \
	  fi; \
	fi

# The status page's test renders it in a real headless browser: Debian's chromium, likewise.
browser-deps:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  echo "Installing Debian's chromium package for the status page's browser test..."; \
	  if [ "$$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo -n"; fi; \
	  if command -v apt-get >/dev/null 2>&1; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    $$sudo apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
	    echo "warning: could not install chromium; the status page's browser test will be skipped"; \
	  else \
	    echo "warning: no apt-get; install chromium to run the status page's browser test"; \
	  fi; \
	fi

unit: $(STAMP) system-deps browser-deps
	$(BIN)/pytest

test: lint typecheck unit

demo: $(STAMP) system-deps-prometheus
	$(BIN)/coalmine demo

bench: $(STAMP)
	$(BIN)/python bench/engine.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis build dist
