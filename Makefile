# Set-up and everyday commands. `make demo` and `make test` do all the set-up they need.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
PG_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/test
# pytest-xdist workers per database run (`make test TEST_WORKERS=0`: one process, no xdist).
# Each worker is a process with its own chDB path, tmp dirs and migrated templates
# (tests/conftest.py); figures in bench/RESULTS.md ("test suite wall time").
TEST_WORKERS ?= 2
PYTEST_PARALLEL := $(if $(filter 0,$(TEST_WORKERS)),-p no:xdist,-n $(TEST_WORKERS) --dist worksteal)

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

# Debian's Chromium, which the dashboard's browser test drives (tests/dashboard/test_browser.py).
CHROMIUM ?= /usr/bin/chromium
$(CHROMIUM):
	@echo "installing Debian's chromium for the dashboard's browser test"
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
	  $$SUDO apt-get install -y -q chromium >/dev/null 2>&1 \
	  || { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium >/dev/null; }

test-sqlite: $(VENV)/.installed $(CHROMIUM)
	@echo "== test suite on SQLite + chDB =="
	$(BIN)/python -m pytest $(PYTEST_PARALLEL)

test-postgres: $(VENV)/.installed
	@echo "== test suite on PostgreSQL + chDB =="
	@bash .ci/postgres-up
	METERING_TEST_DATABASE_URL=$(PG_URL) $(BIN)/python -m pytest $(PYTEST_PARALLEL) -m "not slow"

lint: $(VENV)/.installed
	$(BIN)/ruff check metering billing migrations tests bench
	$(BIN)/ruff format --check metering billing migrations tests bench

typecheck: $(VENV)/.installed
	$(BIN)/mypy

bench: $(VENV)/.installed
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) data
