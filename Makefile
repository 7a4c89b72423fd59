# One command locally, the same in CI: `make run` starts the platform, `make test` checks it all.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# uv manages the workspace. It is installed into .tools/ (a private venv) on first use, so a
# fresh machine needs only python3.
PYTHON ?= python3
TOOLS := .tools
UV := $(TOOLS)/bin/uv
PY := $(UV) run --frozen

.PHONY: help bootstrap sync run test lint typecheck architecture schemas schemas-check pytest bench clean

help:
	@echo "make run    - install what is needed, start the whole platform (embedded NATS + 5 services)"
	@echo "make test   - install what is needed, then lint, types, architecture, schema drift, tests"
	@echo "make lint | typecheck | schemas | pytest | bench | clean"

bootstrap: $(UV)

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check "uv>=0.5,<1"

sync: bootstrap
	@$(UV) sync --frozen --quiet

run: sync
	$(PY) lambdabus up

test: sync lint typecheck architecture schemas-check pytest

lint: sync
	$(PY) ruff check .
	$(PY) ruff format --check .

typecheck: sync
	$(PY) mypy libs services tests bench

architecture: sync
	$(PY) lint-imports

schemas: sync
	$(PY) python -m lambdabus_events.schemagen
	$(PY) python -m lambdabus_gateway.openapi

schemas-check: sync
	$(PY) python -m lambdabus_events.schemagen --check
	$(PY) python -m lambdabus_gateway.openapi --check

pytest: sync
	$(PY) pytest

bench: sync
	@for b in bench/*.py; do echo "== $$b"; $(PY) python $$b || exit 1; done

clean:
	rm -rf .lambdabus .mypy_cache .ruff_cache .pytest_cache $(TOOLS)
