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

# Benchmarks print their figures and write them under bench-results/; they are not tests
# (no figure fails them). All of them take about 19 minutes (failover and fal_calls 2 each);
# each stops by itself and kills what it started. webhook_ingest needs wrk (Debian:
# apt-get install -y wrk); failover and fal_calls need PostgreSQL's server binaries (a
# throwaway server, as the tests use).
# webhook_ingest and poller_capacity run on SQLite here (figures comparable with earlier
# runs); `--database both` runs them on PostgreSQL too, with the ratio. Each one waits
# (boundedly) for other processes to go quiet and reports the load they added anyway.
bench: $(STAMP)
	$(BIN)/python bench/store_ingest.py --out bench-results/store_ingest.json
	$(BIN)/python bench/webhook_ingest.py --out bench-results/webhook_ingest.json
	$(BIN)/python bench/poller_capacity.py --out bench-results/poller_capacity.json
	$(BIN)/python bench/restart_recovery.py --out bench-results/restart_recovery.json
	$(BIN)/python bench/memory.py --out bench-results/memory.json
	$(BIN)/python bench/time_to_result.py --out bench-results/time_to_result.json
	$(BIN)/python bench/failover.py --out bench-results/failover.json
	$(BIN)/python bench/fal_calls.py --out bench-results/fal_calls.json

clean:
	rm -rf $(VENV) var build *.egg-info
