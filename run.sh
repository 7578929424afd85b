#!/usr/bin/env bash
# Set up and run: installs what is missing (cmake), builds release, and starts tqproxy in the
# foreground with conf/tqproxy.yaml (proxy on 127.0.0.1:8080, admin on 127.0.0.1:8090).
# Extra arguments go to `tqproxy run` (e.g. ./run.sh --watch).
set -euo pipefail
cd "$(dirname "$0")"
scripts/deps.sh
cargo build --release
target/release/tqproxy -c conf/tqproxy.yaml check
exec target/release/tqproxy -c conf/tqproxy.yaml run "$@"
