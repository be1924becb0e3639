# Set-up and the everyday commands. `make demo` and `make test` install everything they need first.
PYTHON ?= python3
VENV ?= .venv
DATA_DIR ?= ./data
# The CPU wheel of torch lies on this machine kind's disk; install it before the project so the
# project's torch range is already met (elsewhere pip fetches this version from PyPI).
TORCH_SPEC ?= torch==2.13.0

PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench server-stop clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/fineweb-modal demo --data-dir $(DATA_DIR)

test: install
	$(PY) -m pytest

bench: install
	$(PY) -m benchmarks.chunk
	$(PY) -m benchmarks.orchestration
	$(PY) -m benchmarks.embed
	$(PY) -m benchmarks.host
	$(PY) -m benchmarks.fp8
	$(PY) -m benchmarks.memory
	$(PY) -m benchmarks.report

server-stop: install
	$(VENV)/bin/fineweb-modal server stop

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
