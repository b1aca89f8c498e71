# Den: the two commands are `make run` and `make test` (see README.md).
VENV     ?= .venv
PYTHON   ?= python3
DATA_DIR ?= /var/lib/den
HOST     ?= 127.0.0.1
PORT     ?= 8080
DEN      := $(VENV)/bin/den

.PHONY: run setup host agent images venv test lint bench clean-engine web test-deps bench-terminal \
        soak

## Set everything up (engine, gVisor, images, virtualenv) and run the server.
run: setup
	@$(DEN) admin migrate --data-dir $(DATA_DIR) >/dev/null
	@echo
	@echo "den: starting on http://$(HOST):$(PORT) with SQLite under $(DATA_DIR)"
	@echo "den: get the first API token in another shell with:"
	@echo "       $(CURDIR)/$(DEN) admin token --user admin --admin --data-dir $(DATA_DIR)"
	@echo "     and sign in to the web UI at http://$(HOST):$(PORT)/ with it"
	@echo
	DEN_DATA_DIR=$(DATA_DIR) exec $(DEN) serve --host $(HOST) --port $(PORT)

setup: host agent venv web

## The in-workspace agent (agent/, Go from Debian) into build/agent/den-agent.
agent:
	@bash scripts/build-agent.sh >/dev/null

## Docker engine, runsc, daemon.json, dockerd, workspace images (idempotent; needs root).
host:
	@bash scripts/setup-host.sh

images:
	@bash workspace_images/build.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

## The whole suite: lint, types, unit tests, and engine/PostgreSQL tests on the real things.
test: setup test-deps
	@bash scripts/test.sh

## The crash-consistency test with random kill -9 rounds besides its fault points.
SOAK_ROUNDS ?= 20
soak: setup
	DEN_CRASH_SOAK=$(SOAK_ROUNDS) $(VENV)/bin/python -m pytest -v tests/engine/test_crash.py

lint: venv
	$(VENV)/bin/ruff check server tests migrations
	$(VENV)/bin/mypy

bench: setup
	$(VENV)/bin/python -m tests.benchmarks.bench_workspaces
	$(VENV)/bin/python -m tests.benchmarks.bench_ssh
	$(VENV)/bin/python -m tests.benchmarks.bench_agent
	$(VENV)/bin/python -m tests.benchmarks.bench_load
	$(VENV)/bin/python -m tests.benchmarks.bench_network
	$(VENV)/bin/python -m tests.benchmarks.bench_dns
	$(VENV)/bin/python -m tests.benchmarks.bench_disk

## Remove every engine object left by test runs (names start with dentest-).
clean-engine:
	@docker ps -aq --filter name=dentest- | xargs -r docker rm -f >/dev/null
	@docker volume ls -q --filter name=dentest- | xargs -r docker volume rm -f >/dev/null
	@PYTHONPATH=$(CURDIR) $(VENV)/bin/python -c "import tests.conftest as c; c.remove_networks('dentest-'); c.unmount_disks('dentest-')"

## The web terminal's xterm.js from npm into web/node_modules (served by Den).
web:
	@bash scripts/setup-web.sh

## What the browser tests need besides: Chromium (Debian) and the test OpenID provider (npm).
test-deps:
	@bash scripts/setup-web.sh --test
	@bash scripts/setup-microvm.sh >/dev/null  # QEMU, a Debian kernel, the microVM root fs

## Keystroke-to-echo latency of the web terminal against docker exec -it.
bench-terminal: setup
	$(VENV)/bin/python -m tests.benchmarks.bench_terminal
