# The README's two commands: `make up` (run Trace here) and `make test` (the whole suite).
# Both do their own set-up on a fresh machine: virtual environment, install, services.

VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: up test install docker images tools bench soak lint clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test,bench]"
	touch $@

install: $(STAMP)

## Run the whole platform on this machine (embedded PostgreSQL and Redis, API, worker, beat).
up: install
	$(BIN)/trace up

## A Docker engine that answers (installs and starts Debian's docker.io as root when none does).
docker:
	deploy/ensure-docker.sh
	deploy/ensure-tools.sh

## The chain node the chain tests and benchmarks run against (anvil, from npm).
tools:
	deploy/ensure-anvil.sh

## The sandbox runtime images, built locally (debootstrap + docker import when no registry answers).
images: docker
	deploy/images/build.sh all

## The whole test suite over real PostgreSQL, Redis, Celery workers and Docker.
test: install images tools
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/pytest

## Benchmarks: each prints its figures beside a baseline measured in the same run.
bench: install
	$(BIN)/python benchmarks/dispatch.py && $(BIN)/python benchmarks/sandbox.py && $(BIN)/python benchmarks/query.py && $(BIN)/python benchmarks/publish.py && $(BIN)/python benchmarks/chain.py && $(BIN)/python benchmarks/fairness.py && $(BIN)/python benchmarks/ingest.py

SOAK_MINUTES ?= 10
soak: install  # random reorgs during live ingestion; ends with 0 mismatches, duplicates, gaps
	$(BIN)/python benchmarks/ingest.py soak --minutes $(SOAK_MINUTES)

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .trace .pytest_cache .ruff_cache .mypy_cache
