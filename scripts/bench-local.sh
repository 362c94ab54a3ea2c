#!/usr/bin/env bash
# Benchmarks the server on its local engines, end to end, as a client sees it: builds the
# release binaries, starts `duplex` on a loopback port, replays real recorded speech (Debian
# pocketsphinx-testdata, with its transcripts) and questions spoken by the Piper voice through
# `duplex-replay`, and prints per-turn latencies (end of speech -> vad.speech_stopped -> final
# transcript -> first assistant text -> first assistant audio), the word error rate of the
# transcripts, and the server's resident memory. Then `cargo bench -p duplex-local` measures
# each engine alone (WER, tokens/s, synthesis speed) and the LLM under 1-4 concurrent
# questions, batched and one at a time. Figures only; nothing is asserted.
#
# Usage: scripts/bench-local.sh [--engines-only | --server-only]
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

what="${1:-all}"
scripts/setup-models.sh --test-data
export DUPLEX_MODELS_DIR="${DUPLEX_MODELS_DIR:-$PWD/models}"

if [ "$what" != --engines-only ]; then
  log "building duplex, duplex-replay and the say example (release)"
  cargo build --release --locked -p duplex-server -p duplex-replay
  cargo build --release --locked -p duplex-local --example say
  work="$(mktemp -d)"
  trap 'kill "${server:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
  # Recorded speech with its reference transcripts.
  data=/usr/share/pocketsphinx/test/data/librivox
  while read -r line; do
    id="${line##*(}"; id="${id%)}"
    text="${line#<s> }"; text="${text%% </s>*}"
    cp "$data/$id.wav" "$work/rec-$id.wav"
    printf '%s\n' "$text" >"$work/rec-$id.txt"
  done <"$data/transcription"
  # Questions in the Piper voice.
  i=0
  for q in "What is the capital of France?" "Can you suggest something to cook for dinner tonight?" \
           "How far away is the moon?" "Tell me a fun fact about octopuses."; do
    i=$((i + 1))
    target/release/examples/say "$q" "$work/q$i.wav"
  done

  port=$((20000 + RANDOM % 10000))
  log "starting duplex on 127.0.0.1:$port (local engines)"
  DUPLEX_PROVIDERS=local PORT=$port BIND_ADDR=127.0.0.1 DATABASE_URL="sqlite://$work/db.sqlite?mode=rwc" \
    LOG_FORMAT=json RUST_LOG=warn target/release/duplex >"$work/server.log" 2>&1 &
  server=$!
  for _ in $(seq 1 120); do
    curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
    kill -0 "$server" 2>/dev/null || { cat "$work/server.log"; exit 1; }
    sleep 0.5
  done
  rss() { awk '/VmRSS/ {printf "%.0f MiB", $2 / 1024}' "/proc/$server/status"; }
  log "server ready; resident memory $(rss)"
  url="ws://127.0.0.1:$port/v1/conversation"
  log "questions in the Piper voice, one session, one after the other"
  target/release/duplex-replay --url "$url" --turn-timeout-s 60 "$work"/q*.wav || true
  log "recorded speech (LibriVox), one session"
  target/release/duplex-replay --url "$url" --turn-timeout-s 60 "$work"/rec-*.wav || true
  log "server resident memory after the runs: $(rss)"
  kill -TERM "$server"; wait "$server" || true
fi

if [ "$what" != --server-only ]; then
  log "each engine alone (cargo bench -p duplex-local)"
  cargo bench --locked -p duplex-local --bench engines
  log "the LLM with 1-4 questions at once, batched and one at a time (cargo bench -p duplex-local --bench llm_concurrency)"
  cargo bench --locked -p duplex-local --bench llm_concurrency
fi
