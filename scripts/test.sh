#!/usr/bin/env bash
# The README's test command: install the test dependencies, then check formatting and lints and run
# every test (unit, conformance kit, end-to-end with real daemons and QEMU), then fuzz every fuzz
# target for 10 s (docs/RELIABILITY.md, "Fuzzing": about 4 minutes with a cold build).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-test-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
bash scripts/fuzz.sh 10
