# The targets are the truth: CI runs `make check test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST := $(BIN)/python -m pytest -q --durations=15 $(PYTEST_ARGS)
# Two workers: each binds port 0 for its servers; the template database is per worker.
WORKERS ?= -n 2 --dist worksteal

.PHONY: lock run test test-unit test-integration test-e2e test-for kept check fmt lint types buf gen gen-check imports bench bench-seed bench-bundles bench-rollouts bench-notify bench-identity bench-failover bench-group-commit bench-etcd bench-ads bench-cli bench-proxies clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	# xds-protos ships an older copy of OpenTelemetry's protos: opentelemetry-proto's own win.
	$(BIN)/pip install --quiet -c constraints.txt --no-deps --force-reinstall opentelemetry-proto
	touch $(STAMP)

## Re-resolve the dev install from pyproject.toml in a scratch venv and pin it in constraints.txt.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip
	.lock-venv/bin/pip install --quiet -e '.[dev]'
	{ sed -n '1,2p' constraints.txt; .lock-venv/bin/pip freeze --exclude-editable | grep -v '^controlplane'; } > constraints.new
	mv constraints.new constraints.txt && rm -rf .lock-venv

## Run the control plane on its embedded default (SQLite + ./data, keys made on first start).
run: $(STAMP)
	$(BIN)/controlplane serve

## The whole test suite, every tier (what CI runs): unit, integration on SQLite and
## PostgreSQL, e2e with grpcurl, real agents and proxies. Full Hypothesis strength.
test: $(STAMP)
	$(BIN)/python -m tests.support.postgres
	HYPOTHESIS_PROFILE=ci $(PYTEST) tests/unit
	HYPOTHESIS_PROFILE=ci $(PYTEST) $(WORKERS) tests/integration
	HYPOTHESIS_PROFILE=ci $(PYTEST) $(WORKERS) tests/e2e

## One tier at a time (budgets in CONTRIBUTING.md).
test-unit: $(STAMP)
	$(PYTEST) tests/unit

test-integration: $(STAMP)
	$(BIN)/python -m tests.support.postgres
	$(PYTEST) $(WORKERS) tests/integration

test-e2e: $(STAMP)
	$(BIN)/python -m tests.support.postgres
	$(PYTEST) $(WORKERS) tests/e2e

## The unit and integration tests that import PKG (a path such as
## controlplane/domain/bundles), on SQLite only: a developer's loop.
test-for: $(STAMP)
	$(PYTEST) -m "not postgres" $$($(BIN)/python -m scripts.tests_for $(PKG))

## Everything CI checks besides the tests.
check: lint types buf gen-check imports kept

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec compose.yaml

types: $(STAMP)
	$(BIN)/mypy controlplane agent_stub migrations scripts tests bench

# The wire contract stays compatible with main's (FILE rules, buf.yaml); third-party protos
# are not ours to keep. BUF_AGAINST names another base (a tag, a commit).
BUF_AGAINST ?= .git\#branch=main
buf: $(STAMP)
	$(BIN)/buf lint
	$(BIN)/buf breaking --against '$(BUF_AGAINST)'

gen: $(STAMP)
	$(BIN)/python scripts/genproto.py

gen-check: $(STAMP)
	$(BIN)/python scripts/genproto.py --check

imports: $(STAMP)
	$(BIN)/lint-imports

## Every test id ever kept is still collected, or mapped to the test that covers it.
kept: $(STAMP)
	$(BIN)/python -m scripts.check_test_ids

## Benchmarks (docs/benchmarks.md): not tests; they print numbers and write .bench-out/.
bench-seed: $(STAMP)
	$(BIN)/python -m bench.seed --nodes 10000

bench: $(STAMP)
	$(BIN)/python -m bench.watch $(BENCH_ARGS)

## etcd, the control plane and a bare grpc.aio server under one Go load generator; needs
## Debian's etcd-server, golang-go, golang-google-grpc-dev and golang-etcd-server-dev.
bench-etcd: $(STAMP)
	$(BIN)/python -m bench.compare --nodes $(or $(BENCH_NODES),1000) $(BENCH_ARGS)

## ADS (delta and SotW) beside WatchBundles, Go load generator (docs/benchmarks.md).
bench-ads: $(STAMP)
	$(BIN)/python -m bench.ads --nodes $(or $(BENCH_NODES),1000) $(BENCH_ARGS)

bench-bundles: $(STAMP)
	$(BIN)/python -m bench.bundles $(BENCH_ARGS)

bench-rollouts: $(STAMP)
	$(BIN)/python -m bench.rollouts $(BENCH_ARGS)

## Notifications, analysis queries, and issue 13's overhead (BENCH_ARGS="--before DIR").
bench-notify: $(STAMP)
	$(BIN)/python -m bench.notify $(BENCH_ARGS)

bench-identity: $(STAMP)
	$(BIN)/python -m bench.identity $(BENCH_ARGS)

bench-failover: $(STAMP)
	$(BIN)/python -m bench.failover $(BENCH_ARGS)

## `controlplane` against grpcurl: start and call latency (docs/benchmarks.md).
bench-cli: $(STAMP)
	$(BIN)/python -m bench.cli $(BENCH_ARGS)

bench-group-commit: $(STAMP)
	$(BIN)/python -m bench.group_commit $(BENCH_ARGS)

bench-proxies: $(STAMP)
	$(BIN)/python -m bench.proxies $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
