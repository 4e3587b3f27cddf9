# clipscale: `make train` (the CPU demo) and `make test` work on a fresh clone; both install first.
SHELL := /bin/bash
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.clipscale-installed
TORCH := torch==2.14.1 torchvision==0.29.1
ARGS ?=

.PHONY: help install train test test-slow test-nodes test-full bench lint format docker clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv with torch and clipscale[dev] (skipped when up to date)

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q $(TORCH)
	$(PYTHON) -m pip install -q -e ".[dev]"
	touch $(STAMP)

train: install ## train the embedded demo on CPU (extra Hydra overrides: make train ARGS="...")
	$(PYTHON) -m clipscale.train $(ARGS)

test: install ## run the test suite, without the tests marked slow or slurm (CI runs those: .ci/run)
	$(PYTHON) -m pytest -m "not slow and not slurm" --durations=15 $(ARGS)

test-slow: install ## the tests marked slow, SLURM's aside (CI runs them after make test: .ci/run)
	$(PYTHON) -m pytest -m "slow and not slurm" --durations=15 $(ARGS)

test-nodes: install ## every test on a real SLURM (one node, two nodes, losing a node); root
	$(PYTHON) -m pytest -m slurm --durations=10 $(ARGS)

test-full: install ## run every test, slow ones included
	$(PYTHON) -m pytest --durations=15 $(ARGS)

bench: install ## run benchmarks/ and print their ratio tables
	$(PYTHON) benchmarks/run_all.py $(ARGS)

lint: install ## ruff lint and format check
	$(VENV)/bin/ruff check clipscale tests benchmarks
	$(VENV)/bin/ruff format --check clipscale tests benchmarks

format: install ## ruff format and autofix
	$(VENV)/bin/ruff format clipscale tests benchmarks
	$(VENV)/bin/ruff check --fix clipscale tests benchmarks

docker: ## build the GPU image (needs a Docker engine)
	docker build -f docker/Dockerfile -t clipscale .

clean: ## remove the venv and run outputs
	rm -rf $(VENV) runs outputs
