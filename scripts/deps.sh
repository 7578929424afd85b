#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build (and, with --test, to test) tqproxy.
# Idempotent: only missing packages are installed. Needs root (or sudo) for apt-get.
set -euo pipefail

want=()
command -v cmake >/dev/null 2>&1 || want+=(cmake)          # pingora-core builds zlib-ng
command -v python3 >/dev/null 2>&1 || want+=(python3)      # the py example worker
if [[ "${1:-}" == "--test" ]]; then
  command -v chromium >/dev/null 2>&1 || want+=(chromium)  # the status page test runs a real browser
fi
if ((${#want[@]})); then
  echo "installing: ${want[*]}" >&2
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }
