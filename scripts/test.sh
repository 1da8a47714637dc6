#!/bin/sh
# The project's test command: installs test dependencies, then runs every test.
set -eu
cd "$(dirname "$0")/.."
./scripts/install-test-deps.sh
# The benchmark's optional OVS-DPDK peer, so its peer tests run too (they skip without it).
./scripts/install-bench-peers.sh || echo "warning: OVS peer not installed; its tests will be skipped" >&2
cargo fmt --all -- --check || { echo "cargo fmt: run 'cargo fmt --all'" >&2; exit 1; }
# The benchmark harness tests start the vswitch binary, which `cargo test` does not build for
# another package's tests: build it with the test profile (it lands in target/debug).
cargo build --profile test -p vswitch --bin vswitch
# Tests that start testpmd busy-poll a CPU; the harness keeps them serial within a file.
cargo test --workspace --all-targets -- --test-threads=2
