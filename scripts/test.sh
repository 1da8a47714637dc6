#!/bin/sh
# The project's test command: installs test dependencies, then runs every test.
set -eu
cd "$(dirname "$0")/.."
./scripts/install-test-deps.sh
cargo fmt --all -- --check || { echo "cargo fmt: run 'cargo fmt --all'" >&2; exit 1; }
# Tests that start testpmd busy-poll a CPU; the harness keeps them serial within a file.
cargo test --workspace --all-targets -- --test-threads=2
