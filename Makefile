# sluice: `make test` runs every check against a local Kafka and Redis;
# `make demo` runs the main job on real input.

CARGO ?= cargo
DEFAULT_INPUT := ../shared/data/gharchive-min-2019-09-26-h00/events.ndjson
INPUT ?= $(wildcard $(DEFAULT_INPUT))

.PHONY: test demo stack-up stack-down stack-status lint unit deploy-check bench

stack-up:
	bash deploy/local/stack.sh up

stack-down:
	bash deploy/local/stack.sh down

stack-status:
	bash deploy/local/stack.sh status

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit:
	$(CARGO) test --workspace --lib --bins

# Offline checks of docker-compose.yml and deploy/k8s against the binary.
deploy-check:
	$(CARGO) build --workspace --bins
	python3 deploy/check.py --sluice target/debug/sluice

# The integration tests run the real `sluice` binary, so it is built first.
test: stack-up lint deploy-check
	$(CARGO) test --workspace

# Benchmark against raw rdkafka; writes target/bench/summary.json.
bench: stack-up
	$(CARGO) build --release --bins
	target/release/sluice-bench --sluice target/release/sluice $(if $(INPUT),--input "$(INPUT)",)

demo: stack-up
	@if [ -z "$(INPUT)" ]; then \
		echo "no input: $(DEFAULT_INPUT) is missing; run make demo INPUT=path/to/events.ndjson (see README: Demo input)" >&2; \
		exit 2; \
	fi
	$(CARGO) build --release --bins
	target/release/sluice-demo --input "$(INPUT)" --sluice target/release/sluice --config deploy/demo/demo.toml
