#!/bin/sh
# The project's test command: installs test dependencies, then runs every test.
set -eu
cd "$(dirname "$0")/.."
./scripts/install-test-deps.sh
# Open vSwitch: the Geneve test runs against its userspace datapath, and the benchmark peer
# tests against its DPDK build.
./scripts/install-bench-peers.sh
cargo fmt --all -- --check || { echo "cargo fmt: run 'cargo fmt --all'" >&2; exit 1; }
# The benchmark harness tests start the vswitch binary, which `cargo test` does not build for
# another package's tests: build it with the test profile (it lands in target/debug).
cargo build --profile test -p vswitch --bin vswitch
# Tests that start testpmd busy-poll a CPU; the harness keeps them serial within a file.
cargo test --workspace --all-targets -- --test-threads=2
