#!/usr/bin/env bash
# Builds and starts the duplex server with its embedded defaults (no API keys needed).
# Usage: scripts/run.sh [duplex flags], e.g. scripts/run.sh --port 8080
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }

log "building duplex (release)"
cargo build --release --locked -p duplex-server
log "starting duplex (port: --port, else \$PORT, else 10000; Ctrl-C stops it)"
export LOG_FORMAT="${LOG_FORMAT:-pretty}"
exec ./target/release/duplex "$@"
