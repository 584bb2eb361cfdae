# The two commands of the README: `make demo` runs the main job, `make test` runs the tests.
# Both create the virtual environment they need on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo run test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet -e plugins/example_stale_alert
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/trainguard demo

run: $(STAMP)
	$(BIN)/trainguard run

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# Benchmarks print their figures and write them under bench-results/; they are not tests.
bench: $(STAMP)
	$(BIN)/python bench/store_ingest.py --out bench-results/store_ingest.json

clean:
	rm -rf $(VENV) var build *.egg-info
