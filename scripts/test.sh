#!/usr/bin/env bash
# Runs every test of duplex on a fresh Debian machine: installs what the tests need (espeak-ng
# to synthesize test speech), then builds and runs the whole workspace's tests.
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

need_apt=()
command -v espeak-ng >/dev/null || need_apt+=(espeak-ng)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing ${need_apt[*]} (apt)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }

# Reuse a build cache outside the clone when one exists (CI reruns on the same machine);
# nothing depends on it: a fresh machine builds from scratch.
if [ -z "${CARGO_TARGET_DIR:-}" ] && [ -n "${CI:-}" ]; then
  export CARGO_TARGET_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/duplex-target"
fi

log "building and running all tests"
cargo test --workspace --locked "$@"
