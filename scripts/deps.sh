#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build (and, with --test, to test; with --bench, to run
# load-tests/bench and idle-conns; with --fleet, load-tests/fleet) tqproxy.
# Idempotent: only missing packages are installed. Needs root (or sudo) for apt-get.
set -euo pipefail

want=()
command -v cmake >/dev/null 2>&1 || want+=(cmake)          # pingora-core builds zlib-ng
command -v python3 >/dev/null 2>&1 || want+=(python3)      # the py example worker
# External state (README): the shipped config runs workers/redis (Debian's redis-server) and
# workers/sessions (Debian's /usr/bin/python3, which a sandboxed user can read); the sessions
# test runs both. Debian's own Redis service is not wanted: policy-rc.d keeps it stopped.
[[ -x /usr/bin/python3 ]] || want+=(python3)
if [[ ! -x /usr/bin/redis-server ]]; then
  want+=(redis-server)
  if [[ $(id -u) -eq 0 && ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
fi
if [[ "${1:-}" == "--test" ]]; then
  command -v chromium >/dev/null 2>&1 || want+=(chromium)  # the status page test runs a real browser
  command -v curl >/dev/null 2>&1 || want+=(curl)          # the edge tests' HTTP/2 and TLS client
  command -v openssl >/dev/null 2>&1 || want+=(openssl)    # s_client: the TLS session resumption tests
  # The framework workers' tests (workers/gunicorn, workers/node, workers/go): Debian's own.
  [[ -x /usr/bin/gunicorn ]] || want+=(gunicorn)
  [[ -x /usr/bin/node ]] || want+=(nodejs)
  [[ -x /usr/bin/go ]] || want+=(golang-go)
  [[ -x /usr/bin/pebble && -x /usr/bin/pebble-challtestsrv ]] || want+=(pebble)  # tests/it/acme.rs: the ACME CA and its mock DNS
  command -v tmux >/dev/null 2>&1 || want+=(tmux)          # `tqproxy top` is tested in a real tmux
  command -v pip3 >/dev/null 2>&1 || want+=(python3-pip)   # kubernetes-validate, below
fi
if [[ "${1:-}" == "--fleet" ]]; then                       # load-tests/fleet: 3 netns nodes behind HAProxy
  command -v wrk >/dev/null 2>&1 || want+=(wrk)
  command -v rsync >/dev/null 2>&1 || want+=(rsync)        # the fleet's config distribution
  command -v ip >/dev/null 2>&1 || want+=(iproute2)
  [[ -x /usr/sbin/haproxy ]] || want+=(haproxy)
  [[ -x /usr/sbin/ipvsadm ]] || want+=(ipvsadm)            # the optional IPVS pass
fi
if [[ "${1:-}" == "--bench" ]]; then                       # load-tests/bench and idle-conns (they also do this)
  command -v wrk >/dev/null 2>&1 || want+=(wrk)
  command -v h2load >/dev/null 2>&1 || want+=(nghttp2-client)  # h2load: the HTTP/2 and TLS scenarios
  command -v openssl >/dev/null 2>&1 || want+=(openssl)
  [[ -x /usr/sbin/haproxy ]] || want+=(haproxy)
  # Debian's nginx has the http2 and ssl modules; keep Debian from starting it on :80 (policy-rc.d).
  if [[ ! -x /usr/sbin/nginx ]]; then
    want+=(nginx)
    if [[ $(id -u) -eq 0 && ! -e /usr/sbin/policy-rc.d ]]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
      trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
  fi
fi
if ((${#want[@]})); then
  echo "installing: ${want[*]}" >&2
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }
# The package test (tests/it/package.rs) builds the .deb with cargo-deb.
if [[ "${1:-}" == "--test" ]] && ! cargo deb --version >/dev/null 2>&1; then
  echo "installing: cargo-deb" >&2
  cargo install cargo-deb --locked --quiet
fi
# The Kubernetes manifest's schema check (tests/it/fleet.rs): kubernetes-validate from PyPI, which
# ships the schemas (nothing is fetched at test time).
if [[ "${1:-}" == "--test" ]] && ! command -v kubernetes-validate >/dev/null 2>&1; then
  echo "installing: kubernetes-validate (pip)" >&2
  pip3 install -q kubernetes-validate 2>/dev/null || pip3 install -q --break-system-packages kubernetes-validate
fi
