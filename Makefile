PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo chaos lint format bench bench-quick clean

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
