# Set-up and everyday commands. `make demo` and `make test` do all the set-up they need.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
PG_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/test

.PHONY: demo serve test test-sqlite test-postgres lint typecheck bench clean

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[server,dev]'
	@touch $@

demo: $(VENV)/.installed  ## start the service on embedded defaults with 30 days of demo data
	$(BIN)/metering serve --demo

serve: $(VENV)/.installed
	$(BIN)/metering serve

test: $(VENV)/.installed  ## the whole suite, on SQLite and on PostgreSQL
	$(MAKE) --no-print-directory test-sqlite
	$(MAKE) --no-print-directory test-postgres

test-sqlite: $(VENV)/.installed
	@echo "== test suite on SQLite + chDB =="
	$(BIN)/python -m pytest

test-postgres: $(VENV)/.installed
	@echo "== test suite on PostgreSQL + chDB =="
	@bash .ci/postgres-up
	METERING_TEST_DATABASE_URL=$(PG_URL) $(BIN)/python -m pytest -m "not slow"

lint: $(VENV)/.installed
	$(BIN)/ruff check metering billing migrations tests bench
	$(BIN)/ruff format --check metering billing migrations tests bench

typecheck: $(VENV)/.installed
	$(BIN)/mypy

bench: $(VENV)/.installed
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) data
