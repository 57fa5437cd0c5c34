# edgesync developer entry points. Every target installs or builds what it needs, idempotently,
# with results cached (Kubernetes binaries under $${XDG_CACHE_HOME:-$$HOME/.cache}/edgesync/).
SHELL := /bin/bash
CARGO ?= cargo
QUICK ?= 0

.PHONY: demo test bench arm fmt-check clippy unit fuzz deps k8s mosquitto sparkplug promtool crds

## demo: the whole system end to end on this machine (control plane, controller, agent with its embedded broker, simulated machines)
demo: k8s
	$(CARGO) run -q -p edgesync-e2e --bin edgesync-demo

## test: everything CI runs: formatting, lints, every test against real Mosquitto and kube-apiserver, and a smoke run of every benchmark
test: deps arm fmt-check clippy
	hack/run-tests.sh
	$(MAKE) bench QUICK=1

## bench: every benchmark, written to BENCHMARKS.md with the machine, the commands and each aim met or missed: agent ingest vs the broker alone and SQLite alone, the embedded broker and the controller under attack, controller ingest, the API server's write ceiling, publish -> status freshness (and for an idle plant, measured from outside, stage by stage), a DeviceRollout over 10,000 machines (waves, halt on refusals), a 100,000-Device fleet. QUICK=1: a smoke run (about two minutes) into target/BENCHMARKS-quick.md
bench: deps arm
	QUICK=$(QUICK) CARGO=$(CARGO) hack/bench.sh

## arm: the agent for aarch64 and armv7 (release-small profile, built on its own) into target/cross/<triple>/release-small/, plus the boot images the emulated ARM tests run (Debian kernel + busybox initramfs); installs the cross toolchain and QEMU on first use
arm:
	CARGO=$(CARGO) hack/build-arm.sh

## deps: build/cache kube-apiserver, kubectl, etcd, install mosquitto if missing, make the pysparkplug environment the Sparkplug B tests drive, and build promtool (alert rules check)
deps: k8s mosquitto sparkplug promtool

k8s:
	@hack/ensure-k8s.sh >/dev/null

mosquitto:
	@hack/ensure-mosquitto.sh

sparkplug:
	@hack/ensure-pysparkplug.sh >/dev/null

promtool:
	@hack/ensure-promtool.sh >/dev/null

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## unit: every test that needs neither a broker nor an API server (each crate's own tests: pure logic, the embedded broker's router, the store on a temporary SQLite file), in under a minute once built
unit:
	$(CARGO) test --workspace --lib --bins

## fuzz: the decoders (MQTT packets into the embedded broker, Sparkplug B, KubeEdge twin) and the broker's router under many more generated inputs than `make test` runs (FUZZ_CASES, default 100000 each); a failure prints the smallest input that breaks it
FUZZ_CASES ?= 100000
fuzz:
	PROPTEST_CASES=$(FUZZ_CASES) $(CARGO) test --release -p edgesync-protocol -p edgesync-agent --lib -- fuzz_ the_router_keeps_its_promises

## crds: regenerate crds/*.yaml from the Rust types
crds:
	$(CARGO) run -q -p edgesync-crds --bin edgesync-crdgen
