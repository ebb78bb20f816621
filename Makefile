# `make demo` runs the main job, `make test` the tests. Both create .venv on a fresh machine, each installing what it
# needs into the same .venv, in either order.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet
# The demo needs no torchvision: a CPU-only torch (this project's machines carry the 2.13.0+cpu wheel on disk, a
# fifth of the CUDA build's size). An installed torch is kept, so a .venv set up by `make test` serves the demo.
DEMO_TORCH ?= torch==2.13.0
# Tests and image benchmarks need torchvision, whose wheels import only beside the torch they were built for.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# speech tests and the espeak benchmark: LibriVox recordings, a speech synthesiser, sox; the Fashion-MNIST benchmark
APT_PACKAGES := pocketsphinx-testdata espeak-ng sox dataset-fashion-mnist
FAST := not slow and not asr and not ray and not distributed
DEMO_STAMP := $(VENV)/.demo-installed
DEV_STAMP := $(VENV)/.dev-installed

.PHONY: demo test test-fast lint typecheck install debian-packages clean

demo: $(DEMO_STAMP)
	$(VENV)/bin/orthograd demo

test: $(DEV_STAMP) debian-packages lint typecheck
	$(PY) -m pytest

test-fast: $(DEV_STAMP) lint typecheck
	$(PY) -m pytest -m "$(FAST)"

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

# mypy over src/ as pyproject's [tool.mypy] configures it (strict for the core); an error fails the build
typecheck: $(DEV_STAMP)
	$(VENV)/bin/mypy

install: $(DEV_STAMP) debian-packages

$(VENV)/bin/python:
	python3 -m venv $(VENV)

$(DEMO_STAMP): pyproject.toml Makefile | $(VENV)/bin/python
	$(PY) -c "import torch" 2>/dev/null || $(PIP) $(DEMO_TORCH)
	$(PIP) -e .
	touch $@

$(DEV_STAMP): pyproject.toml Makefile | $(VENV)/bin/python
	$(PIP) $(TORCH_PINS)
	$(PIP) -e '.[dev,vision,asr,ray,llm,hf]'
	touch $@

# apt-get only as root (or through password-less sudo); otherwise say what to install and stop.
debian-packages:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null; then echo "make: no apt-get here; install the equivalents of:" $$missing; exit 1; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo"; \
	else echo "make: the tests need the Debian packages:" $$missing; \
		echo "make: install them as root (apt-get install" $$missing"), or run 'make test-fast' without them"; exit 1; fi; \
	$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
