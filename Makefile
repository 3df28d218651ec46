# cellgate: `make demo` shows it working, `make test` proves it. Both run `make setup` first.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest

.PHONY: setup run demo test test-unit test-kernel test-e2e lint typecheck clean install-cni

setup:            ## apt packages, kernel headers link, .venv with cellgate installed (idempotent)
	@bash .ci/setup.sh

run: setup        ## run the agent in the foreground
	$(VENV)/bin/cellgate agent

demo: setup       ## real dockerd + cellgate network + two containers talking
	@bash examples/demo.sh

test: setup       ## every tier: unit, kernel (netns + BPF), e2e (real dockerd)
	$(PYTEST) tests -q

test-unit: setup
	$(PYTEST) tests/unit -q

test-kernel: setup
	$(PYTEST) tests/kernel -q

test-e2e: setup
	$(PYTEST) tests/e2e -q

install-cni: setup  ## the cellgate-cni plugin into /opt/cni/bin (CNI_BIN_DIR=... to change)
	$(VENV)/bin/cellgate install-cni --dir $(or $(CNI_BIN_DIR),/opt/cni/bin)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
