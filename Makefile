# The two commands a new user needs: `make demo` (whole pipeline, embedded pair) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test install lint dvc-pull dvc-commit sync-dvc bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## Run the whole pipeline on the embedded default pair (offline, CPU).
demo: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/snakemake --cores all
	@echo
	@echo "Results:  results/ (see README: 'What each target produces')"
	@echo "Report:   file://$(CURDIR)/results/report/toy/index.html"

## Run the test suite (unit, rule-level and one end-to-end run on the tiny preset).
test: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest

lint: $(STAMP)
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

## After an ad-hoc `snakemake TARGET`: record its outputs in dvc.lock and the DVC cache.
dvc-commit: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc commit -f

clean:
	rm -rf results/* .snakemake
