# The two commands of the README: `make run` (the main job) and `make test` (the whole test suite).
# Each creates the environment from uv.lock when it is missing or stale.

PYTHON ?= python3
UV_VERSION := 0.13.8
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
STAMP := $(VENV)/.synced-$(shell cat uv.lock pyproject.toml | cksum | cut -d' ' -f1)

export UV_PYTHON := $(PYTHON)
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: run test lint env bench ui clean

run: $(STAMP)
	$(VENV)/bin/conveyor run

test: $(STAMP) lint
	$(VENV)/bin/pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(VENV)/bin/python -m bench.pipeline

ui: $(STAMP)
	$(VENV)/bin/conveyor ui

env: $(STAMP)

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --upgrade pip
	$(TOOLS)/bin/python -m pip install --quiet uv==$(UV_VERSION)

# --locked: install exactly what uv.lock says, and fail if pyproject.toml and the lock disagree.
$(STAMP): $(UV) uv.lock pyproject.toml
	$(UV) sync --locked
	rm -f $(VENV)/.synced-*
	touch $@

clean:
	rm -rf artifacts .conveyor
