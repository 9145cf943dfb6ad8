# Graft: `make test` sets up .venv and runs the tests; `make run` sets up and runs Graft.
PYTHON ?= python3.11
VENV ?= .venv
BIN = $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup test run bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[worker,dev]'
	touch $@

setup: $(BIN)/.installed

test: setup
	$(BIN)/pytest -q

run: setup
	$(BIN)/graft serve --host $(HOST) --port $(PORT)

bench: setup
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) runs .pytest_cache
