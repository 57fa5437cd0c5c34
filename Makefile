# edgesync developer entry points. Every target installs or builds what it needs, idempotently,
# with results cached (Kubernetes binaries under $${XDG_CACHE_HOME:-$$HOME/.cache}/edgesync/).
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: demo test bench fmt-check clippy unit deps k8s mosquitto crds

## demo: the whole system end to end on this machine (control plane, controller, agent with its embedded broker, simulated machines)
demo: k8s
	$(CARGO) run -q -p edgesync-e2e --bin edgesync-demo

## test: everything CI runs: formatting, lints, and every test against real Mosquitto and kube-apiserver
test: deps fmt-check clippy
	hack/run-tests.sh

## bench: agent ingest vs the broker alone and SQLite alone; good devices' ingest under attacks on the embedded broker; controller ingest vs a real kube-apiserver; a good agent's batches under attacks on the controller; publish -> status freshness end to end; the API server's write ceiling per write form
bench: deps
	$(CARGO) bench -p edgesync-e2e --bench agent_ingest
	$(CARGO) bench -p edgesync-e2e --bench broker_attacks
	$(CARGO) bench -p edgesync-e2e --bench controller_ingest
	$(CARGO) bench -p edgesync-e2e --bench controller_attacks
	$(CARGO) bench -p edgesync-e2e --bench freshness
	$(CARGO) bench -p edgesync-e2e --bench apiserver_ceiling

## deps: build/cache kube-apiserver, kubectl, etcd and install mosquitto if missing
deps: k8s mosquitto

k8s:
	@hack/ensure-k8s.sh >/dev/null

mosquitto:
	@hack/ensure-mosquitto.sh

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## unit: only the tests that need neither broker nor apiserver
unit:
	$(CARGO) test -p edgesync-protocol -p edgesync-crds -p edgesync-examples

## crds: regenerate crds/*.yaml from the Rust types
crds:
	$(CARGO) run -q -p edgesync-crds --bin edgesync-crdgen
