# leanauth: `make serve` and `make test` work on a fresh clone (Python >= 3.11 on PATH).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: serve test lint format bench clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; sys.exit("leanauth needs Python >= 3.11") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[server]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed-run

## serve: install, prepare the SQLite database and keys, make a demo app, serve on 127.0.0.1:8000
serve: $(VENV)/.installed-run
	$(BIN)/leanauth init --demo
	exec $(BIN)/leanauth serve

## lint: ruff (lint + format check) and mypy --strict on src/
lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/mypy

## test: lint, then the test suite against real servers on loopback
test: lint
	$(BIN)/pytest

format: $(VENV)/.installed-test
	$(BIN)/ruff format src tests bench examples
	$(BIN)/ruff check --fix src tests bench examples

## bench: load POST /oauth2/token with wrk (installs wrk with apt-get when missing)
bench: $(VENV)/.installed-test
	bench/run.sh

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
