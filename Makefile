# Pledge custody: one-command set-up.
#   make test   - install what is missing (apt, .venv, btcd), then run the test suite
#   make demo   - same set-up, then the regtest end-to-end demo
#   make up     - same set-up, then the console on regtest with a demo data set, until Ctrl-C
# Set-up is idempotent and cheap when everything is already there (scripts/bootstrap.sh).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
VENV := $(ROOT)/.venv
PYTHON_VENV := $(VENV)/bin/python
BTCD_VERSION := 0.26.0
# Tests and the demo find btcd through $BTCD (override on the command line: make test BTCD=...).
BTCD := $(ROOT)/.cache/btcd/v$(BTCD_VERSION)/bin/btcd
export BTCD BTCD_VERSION

# tests/ and bench/ are linted and type-checked as strictly as the product.
LINT_PATHS := pledge pledge_hwi custody hsm regtest tests bench

.PHONY: help bootstrap bootstrap-venv test lint demo up bench clean distclean

help:
	@echo "make test       set up (apt, .venv, btcd) and run pytest -n 2 over tests/"
	@echo "make demo       set up and run the regtest demo (python -m regtest.demo)"
	@echo "make up         set up, then the console on regtest (python -m regtest.up) until Ctrl-C"
	@echo "make lint       ruff + mypy on $(LINT_PATHS), then lint-imports (layer contracts)"
	@echo "make bench      run the benchmarks"
	@echo "make bootstrap  only the set-up"
	@echo "make clean      remove caches (.cache incl. btcd and Go modules, tool caches)"
	@echo "make distclean  clean + remove .venv"

bootstrap:
	@$(ROOT)/scripts/bootstrap.sh system venv btcd

bootstrap-venv:
	@$(ROOT)/scripts/bootstrap.sh venv

# pytest exit 5 = "no tests collected": a suite that ran nothing must not pass.
test: bootstrap
	@rc=0; $(VENV)/bin/pytest -n 2 tests/ || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests - failing" >&2; fi; \
	exit $$rc

# lint-imports checks the [tool.importlinter] contracts of pyproject.toml (ARCHITECTURE.md);
# it runs from the repository root, which it puts on sys.path (bench/ and tests/ are not
# installed). Its graph cache lives under .cache/ (git-ignored, removed by `make clean`).
lint: bootstrap-venv
	cd $(ROOT) && $(VENV)/bin/ruff check $(LINT_PATHS)
	cd $(ROOT) && $(VENV)/bin/mypy $(LINT_PATHS)
	cd $(ROOT) && $(VENV)/bin/lint-imports --no-logo --cache-dir $(ROOT)/.cache/import-linter

# The test kit (regtest/) and bench/ are in no wheel: they are imported from the repository
# root, which `python -m` puts on sys.path when run from there.
demo: bootstrap
	cd $(ROOT) && $(PYTHON_VENV) -m regtest.demo

# btcd, the service's four processes on SQLite, a data set; prints the console's URL and
# one invitation link per role (regtest/up.py).
up: bootstrap
	cd $(ROOT) && $(PYTHON_VENV) -m regtest.up

bench: bootstrap
	@cd $(ROOT); if [ -f bench/__main__.py ]; then \
		$(PYTHON_VENV) -m bench; \
	elif [ -f bench/run.py ]; then \
		$(PYTHON_VENV) bench/run.py; \
	else \
		echo "make bench: no bench/ yet" >&2; exit 1; \
	fi

# Go's module cache is read-only by default; make it writable before deleting.
clean:
	@if [ -d .cache/go ]; then chmod -R u+w .cache/go; fi
	rm -rf .cache .pytest_cache .mypy_cache .ruff_cache .demo build dist
	find . -path ./.venv -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) *.egg-info
