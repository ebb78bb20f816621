# `make demo` runs the main job, `make test` the tests. Both create .venv on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision are pinned to the CPU-usable wheels these machines carry on disk; see README.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[dev,vision,asr,ray]'
	# speech tests and the espeak benchmark: real LibriVox recordings, a speech synthesiser and sox; Fashion-MNIST
	# for the image benchmark (root in CI)
	if command -v apt-get >/dev/null; then dpkg -s pocketsphinx-testdata espeak-ng sox dataset-fashion-mnist >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq pocketsphinx-testdata espeak-ng sox dataset-fashion-mnist); fi
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/orthograd demo

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
