# The targets are the truth: CI runs `make check test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test check fmt lint types buf gen gen-check imports bench bench-seed bench-bundles bench-rollouts bench-identity bench-group-commit bench-proxies clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## Run the control plane on its embedded default (SQLite + ./data, keys made on first start).
run: $(STAMP)
	$(BIN)/controlplane serve

## The whole test suite: unit, integration on SQLite and PostgreSQL, e2e with grpcurl and agents.
test: $(STAMP)
	$(BIN)/python -m tests.support.postgres
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

## Everything CI checks besides the tests.
check: lint types buf gen-check imports

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: $(STAMP)
	$(BIN)/mypy controlplane agent_stub migrations scripts tests bench

buf: $(STAMP)
	$(BIN)/buf lint

gen: $(STAMP)
	$(BIN)/python scripts/genproto.py

gen-check: $(STAMP)
	$(BIN)/python scripts/genproto.py --check

imports: $(STAMP)
	$(BIN)/lint-imports

## Benchmarks (docs/benchmarks.md): not tests; they print numbers and write .bench-out/.
bench-seed: $(STAMP)
	$(BIN)/python -m bench.seed --nodes 10000

bench: $(STAMP)
	$(BIN)/python -m bench.watch $(BENCH_ARGS)

bench-bundles: $(STAMP)
	$(BIN)/python -m bench.bundles $(BENCH_ARGS)

bench-rollouts: $(STAMP)
	$(BIN)/python -m bench.rollouts $(BENCH_ARGS)

bench-identity: $(STAMP)
	$(BIN)/python -m bench.identity $(BENCH_ARGS)

bench-group-commit: $(STAMP)
	$(BIN)/python -m bench.group_commit $(BENCH_ARGS)

bench-proxies: $(STAMP)
	$(BIN)/python -m bench.proxies $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
