# One command locally, the same in CI: `make run` starts the platform, `make test` checks it all.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# uv manages the workspace. It is installed into .tools/ (a private venv) on first use, so a
# fresh machine needs only python3.
PYTHON ?= python3
TOOLS := .tools
UV := $(TOOLS)/bin/uv
PY := $(UV) run --frozen

.PHONY: help bootstrap system browser console sync fixtures run test lint typecheck architecture schemas schemas-check pytest bench clean

help:
	@echo "make run    - install what is needed, start the whole platform (embedded NATS + 5 services)"
	@echo "make test   - install what is needed, then lint, types, architecture, schema drift, tests"
	@echo "make lint | typecheck | schemas | pytest | bench | console | clean"

bootstrap: $(UV)

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check "uv>=0.5,<1"

sync: bootstrap
	@$(UV) sync --frozen --quiet

# bubblewrap sandboxes function instances (and builds); slirp4netns gives them outbound network
# in their own network namespace; iptables (as root) keeps that traffic off this host's own
# and link-local addresses. Without them functions run unsandboxed / with no network, and say so.
SYSTEM_TOOLS := bwrap:bubblewrap slirp4netns:slirp4netns iptables:iptables git:git
system:
	$(call apt_install,$(SYSTEM_TOOLS),function sandbox and git sources,functions may run unsandboxed)

# $(call apt_install,COMMAND:PACKAGE ...,WHAT FOR,WHAT HAPPENS WITHOUT): the Debian packages of
# the commands not found, installed when root with apt-get, else a note.
define apt_install
	@missing=""; for tool in $(1); do \
		command -v $${tool%%:*} >/dev/null 2>&1 || [ -x /usr/sbin/$${tool%%:*} ] || missing="$$missing $${tool##*:}"; done; \
	[ -z "$$missing" ] || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing$$missing ($(2))"; \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) >/dev/null \
				|| echo "warning: could not install$$missing; $(3)"; \
		else echo "note: not installed:$$missing; $(3)"; fi; }
endef

# The examples' dependencies, fetched once, so that the tests build them with no network:
# a wheel directory for pip/uv (--no-index --find-links) and an npm cache (--offline).
FIXTURES := .cache/fixtures.stamp
fixtures: $(FIXTURES)

$(FIXTURES): examples/python-luna/requirements.txt examples/node/package.json | bootstrap
	@mkdir -p .cache/wheelhouse .cache/npm
	$(TOOLS)/bin/python -m pip download --quiet --disable-pip-version-check --only-binary=:all: --no-deps \
		-d .cache/wheelhouse -r examples/python-luna/requirements.txt
	@if command -v npm >/dev/null 2>&1; then \
		node -e 'const d=require("./examples/node/package.json").dependencies; for (const [n,v] of Object.entries(d)) console.log(n+"@"+v)' \
		| xargs -r npm cache add --cache .cache/npm --loglevel=error; fi
	@touch $@

# The web console (console/: plain ES modules, CodeMirror, uPlot) bundled by esbuild into the
# gateway's /ui/ files, which are not committed; npm ci installs exactly what the lockfile says.
CONSOLE_UI := services/gateway/src/lambdabus_gateway/ui/index.html
console: $(CONSOLE_UI)

# --ignore-scripts: no package's install script runs (esbuild needs none: npm installs its
# platform binary as an optional dependency).
console/node_modules/.package-lock.json: console/package-lock.json
	$(call apt_install,node:nodejs npm:npm,the web console's build,the console cannot be built)
	@command -v npm >/dev/null 2>&1 || { echo "error: the web console's build needs Node.js and npm (apt-get install nodejs npm)"; exit 1; }
	npm ci --prefix console --ignore-scripts --no-audit --no-fund --loglevel=error

$(CONSOLE_UI): console/node_modules/.package-lock.json console/build.mjs $(wildcard console/src/*)
	node console/build.mjs

# Debian's Chromium and ChromeDriver for the console's browser tests (driven by Playwright).
BROWSER_TOOLS := chromium:chromium chromedriver:chromium-driver
browser:
	$(call apt_install,$(BROWSER_TOOLS),the console's browser tests,the browser tests will be skipped)

run: sync system console
	$(PY) lambdabus up

test: sync system console browser lint typecheck architecture schemas-check pytest

lint: sync
	$(PY) ruff check .
	$(PY) ruff format --check .

typecheck: sync
	$(PY) mypy libs services tests bench tools

architecture: sync
	$(PY) lint-imports

schemas: sync
	$(PY) python -m lambdabus_events.schemagen
	$(PY) python -m lambdabus_gateway.openapi
	$(PY) python -m lambdabus_platform.eventapi
	$(PY) python tools/settingsdoc.py

schemas-check: sync
	$(PY) python -m lambdabus_events.schemagen --check
	$(PY) python -m lambdabus_gateway.openapi --check
	$(PY) python -m lambdabus_platform.eventapi --check
	$(PY) python tools/settingsdoc.py --check

pytest: sync fixtures
	$(PY) pytest

bench: sync
	@for b in bench/*.py; do echo "== $$b"; $(PY) python $$b || exit 1; done

clean:
	rm -rf .lambdabus .mypy_cache .ruff_cache .pytest_cache .cache $(TOOLS) console/node_modules services/gateway/src/lambdabus_gateway/ui
