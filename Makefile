# Two commands do all the set-up on a fresh machine with Python 3.11+:
#   make serve   installs Tally and starts it on the embedded SQLite store
#   make test    installs the test tools and runs ruff, mypy and the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test lint lock clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Runtime dependencies only, pinned with hashes.
$(VENV)/.main: $(BIN)/python requirements/main.lock pyproject.toml
	$(BIN)/pip install --quiet --require-hashes -r requirements/main.lock
	$(BIN)/pip install --quiet --no-deps -e .
	@touch $@

# Runtime and test dependencies, pinned with hashes.
$(VENV)/.dev: $(BIN)/python requirements/dev.lock pyproject.toml
	$(BIN)/pip install --quiet --require-hashes -r requirements/dev.lock
	$(BIN)/pip install --quiet --no-deps -e .
	@touch $@ $(VENV)/.main

# The OpenAPI client generator the tests run (tests/e2e/test_generated_client.py), in an
# environment of its own: it pins typer below the version the tally CLI runs on.
CODEGEN := $(VENV)/codegen
$(CODEGEN)/.installed: $(BIN)/python requirements/codegen.lock
	$(BIN)/python -m venv $(CODEGEN)
	$(CODEGEN)/bin/pip install --quiet --require-hashes -r requirements/codegen.lock
	@touch $@

serve: $(VENV)/.main
	$(BIN)/tally serve --host $(HOST) --port $(PORT)

lint: $(VENV)/.dev
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy

test: lint $(CODEGEN)/.installed
	$(BIN)/pytest $(PYTEST_ARGS)

# The benchmark harness (bench/README.md): options pass through, e.g.
#   make bench BENCH_ARGS="--quick"     make bench BENCH_ARGS="--only single,batch --duration 5"
bench: $(VENV)/.dev
	$(BIN)/python -m bench $(BENCH_ARGS)

# Re-pin after changing dependencies in pyproject.toml.
lock: $(BIN)/python
	$(BIN)/pip install --quiet pip-tools
	$(BIN)/pip-compile --quiet --generate-hashes --strip-extras --allow-unsafe -o requirements/main.lock pyproject.toml
	$(BIN)/pip-compile --quiet --generate-hashes --strip-extras --allow-unsafe --extra dev -o requirements/dev.lock pyproject.toml
	$(BIN)/pip-compile --quiet --generate-hashes --strip-extras --allow-unsafe -o requirements/codegen.lock requirements/codegen.in

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
