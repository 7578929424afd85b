#!/usr/bin/env bash
# Runs every test: installs what is missing, builds release (the shipped configuration runs
# release binaries and is validated with `tqproxy check`), then unit and integration tests
# against the real binary, real worker processes and real cgroups (run as root for the
# sandbox tests).
set -euo pipefail
cd "$(dirname "$0")"
scripts/deps.sh --test
cargo build --release
target/release/tqproxy -c conf/tqproxy.yaml check
cargo test --all-targets "$@"
