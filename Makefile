PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-pagarme demo chaos lint format bench bench-quick clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Test processes in parallel (pytest-xdist): most tests wait on servers and subprocesses, not on the CPU.
TEST_PROCESSES ?= 3

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m tests.start_stack
	$(BIN)/pytest -n $(TEST_PROCESSES)

# The daily run's time-travel scenarios and money edge cases against the Pagar.me v5 emulator instead of
# the sandbox (`make test` already runs the gateway contract suite against both).
PAGARME_SCENARIOS := tests/integration/test_daily_run.py tests/integration/test_simulation.py \
	tests/integration/test_billing_run.py tests/integration/test_money_edges.py

test-pagarme: $(STAMP)
	$(BIN)/python -m tests.start_stack
	TEST_GATEWAY=pagarme $(BIN)/pytest -n $(TEST_PROCESSES) $(PAGARME_SCENARIOS)

# Months of billing on the embedded stack in about two minutes; `make demo ARGS=--keep` leaves it running.
demo: $(STAMP)
	$(BIN)/renova demo $(ARGS)

# The demo's customers while workers, Redis, PostgreSQL and the scheduler are killed; PASS or FAIL.
chaos: $(STAMP)
	$(BIN)/renova chaos $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench

# The same scenarios at a tenth of the sizes.
bench-quick: $(STAMP)
	$(BIN)/python -m bench --quick

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
