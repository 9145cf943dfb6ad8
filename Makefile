# Graft: `make test` sets up .venv and runs the tests; `make run` sets up and runs Graft.
PYTHON ?= python3.11
VENV ?= .venv
BIN = $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
# the tests run on this many processes (pytest-xdist), one test module per process at a time
TEST_PROCS ?= 2

.PHONY: setup chromium test run bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[worker,dev]'
	touch $@

setup: $(BIN)/.installed

# the browser tests drive Debian's Chromium (installed here when missing and when apt-get can run)
chromium:
	@test -x /usr/bin/chromium || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)); } || \
	  echo "warning: /usr/bin/chromium is missing and could not be installed: the browser tests will not run"

# linters first (ruff: pyflakes, pycodestyle, isort, bugbear, pyupgrade; mypy, strict on domain/), then the tests
test: setup chromium
	$(BIN)/ruff check .
	$(BIN)/mypy
	@# the single sign-on tests start a real OpenID provider (tests/support/oidc, npm package oidc-provider)
	@test -d tests/support/oidc/node_modules/oidc-provider || { command -v npm >/dev/null && \
	  (cd tests/support/oidc && npm ci --no-audit --no-fund >/dev/null); } || \
	  echo "warning: npm is missing or failed: the single sign-on tests will not run"
	$(BIN)/pytest -q -n $(TEST_PROCS) --dist loadfile

run: setup
	$(BIN)/graft serve --host $(HOST) --port $(PORT)

# every benchmark of docs/benchmarks.md (about 30 minutes on 2 quiet cores); e.g. BENCH_ARGS=--append-docs
# to add a dated section to the docs, or BENCH_ARGS=--quick to check the script in a few minutes
BENCH_ARGS ?=
bench: setup
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
