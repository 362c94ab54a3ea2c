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
# --levels runs concurrent conversations instead: for each level N (default 1,2,3,4,6,8) and
# each LLM engine (`llama-serial`, one answer at a time, the engine before batching, then
# `llama`, batched; the order alternates from level to level so that drift in the machine's
# load does not favour one), a fresh server and N sessions that ask the same Piper questions
# on one beat, so the N questions end together. One row per (engine, level): end of speech ->
# first audio p50/p95/max, answers/questions, WER, tokens/s (from /metrics; n/a where the
# server does not expose the counter), the server's CPU over the level (% of one core) and
# its peak RSS; then the largest N whose p95 stays under 3 s with every question answered.
# JSON reports stay in $LEVELS_OUT (default: a dated folder under the target directory).
# Knobs (environment): LEVEL_ENGINES ("llama-serial llama"; `llama:off` is `llama` with
# LOCAL_OVERLAP_STEPS=off, every engine step taking the whole machine, `llama:on` with the
# steps sharing the cores, the default; a suffix `@name` runs the server binary given in
# $LEVEL_BIN_name instead of this build's, e.g. `llama:on@before` with
# LEVEL_BIN_before=/path/to/an/earlier/duplex), LEVEL_ROUNDS (1: passes over
# all levels), LEVEL_TURNS (3 questions per session), LEVEL_INTERVAL_S (beat between
# questions: 6 + 2.5 x N s, the slowest answers of a level have to be played by then),
# LEVEL_PLAYBACK_SPEED (4: answers are "listened to" 4x faster than real time, which
# shortens the run and changes no latency measured: each answer is complete before the next
# question), LEVEL_MAX_S (30 s + questions x beat: bound per level).
#
# Usage: scripts/bench-local.sh [--engines-only | --server-only | --levels [1,2,3,4,6,8]]
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

what="${1:-all}"
levels="${2:-1,2,3,4,6,8}"
case "$what" in all|--engines-only|--server-only|--levels) ;; *) echo "usage: $0 [--engines-only | --server-only | --levels [1,2,3,4,6,8]]" >&2; exit 2 ;; esac
scripts/setup-models.sh --test-data
export DUPLEX_MODELS_DIR="${DUPLEX_MODELS_DIR:-$PWD/models}"
bin="${CARGO_TARGET_DIR:-$PWD/target}/release"

questions=("What is the capital of France?" "Can you suggest something to cook for dinner tonight?"
           "How far away is the moon?" "Tell me a fun fact about octopuses.")
# Questions in the Piper voice, each with its text next to it (the replayer's WER reference).
make_questions() {
  local i=0 q
  for q in "${questions[@]}"; do
    i=$((i + 1))
    "$bin/examples/say" "$q" "$1/q$i.wav"
    printf '%s\n' "$q" >"$1/q$i.txt"
  done
}

# Starts duplex on the local engines in the background (extra env as arguments), sets
# $server and $port, waits until ready.
start_server() {
  port=$((20000 + RANDOM % 10000))
  env "$@" DUPLEX_PROVIDERS=local PORT=$port BIND_ADDR=127.0.0.1 \
    DATABASE_URL="sqlite://$work/db-$port.sqlite?mode=rwc" LOG_FORMAT=json RUST_LOG=warn \
    "${server_bin:-$bin/duplex}" >"$work/server-$port.log" 2>&1 &
  server=$!
  for _ in $(seq 1 240); do
    curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && return 0
    kill -0 "$server" 2>/dev/null || { cat "$work/server-$port.log"; exit 1; }
    sleep 0.5
  done
  echo "duplex did not become ready in 120 s" >&2; exit 1
}
stop_server() { kill -TERM "$server"; wait "$server" || true; server=; }

# One table row from a `duplex-replay --json` report of a level run.
row_filter='
  def ms: if . == null then "-" else (. / 1000 * 100 | round / 100 | tostring) + " s" end;
  def na(f): if . == null then "n/a" else (. * 10 | round / 10 | tostring) + f end;
  (.turns_completed + .turns_interrupted + .turns_failed + .turns_timed_out + .turns_cut) as $asked
  | [$engine, ($n | tostring), (.metrics.first_audio_ms | .p50 | ms), (.metrics.first_audio_ms | .p95 | ms),
     (.metrics.first_audio_ms | .max | ms), "\(.metrics.first_audio_ms.count)/\($asked)",
     (if .wer then (.wer.rate * 100 | na(" %")) else "n/a" end),
     (.server.llm_tokens_per_s | na("")), (.server.answer_tokens_per_s | na("")),
     (.server.cpu_percent | na(" %")), (.server.peak_rss_mib | na(" MiB"))]
  | "| " + join(" | ") + " |"'
table_head='| engine | N | first audio p50 | p95 | max | answered | WER | tokens/s | answer tokens/s | server CPU | peak RSS |
|---|---|---|---|---|---|---|---|---|---|---|'

if [ "$what" = --levels ]; then
  log "building duplex, duplex-replay and the say example (release)"
  cargo build --release --locked -p duplex-server -p duplex-replay
  cargo build --release --locked -p duplex-local --example say
  work="$(mktemp -d)"
  trap '[ -n "${server:-}" ] && kill "$server" 2>/dev/null; rm -rf "$work"' EXIT
  out="${LEVELS_OUT:-${CARGO_TARGET_DIR:-$PWD/target}/bench-levels/$(date -u +%Y%m%dT%H%M%SZ)}"
  mkdir -p "$out"
  make_questions "$work"
  read -r -a engines <<<"${LEVEL_ENGINES:-llama-serial llama}"
  turns="${LEVEL_TURNS:-3}"
  playback="${LEVEL_PLAYBACK_SPEED:-4}"
  log "levels $levels, engines ${engines[*]}, $turns questions per session; uptime: $(uptime)"
  uptime >"$out/uptime-before"
  flip=0
  for round in $(seq 1 "${LEVEL_ROUNDS:-1}"); do
    for n in ${levels//,/ }; do
      order=("${engines[@]}")
      if [ $((flip % 2)) = 1 ]; then order=(); for e in "${engines[@]}"; do order=("$e" "${order[@]}"); done; fi
      flip=$((flip + 1))
      interval="${LEVEL_INTERVAL_S:-$(awk -v n="$n" 'BEGIN { print 6 + 2.5 * n }')}"
      max_s="${LEVEL_MAX_S:-$(awk -v i="$interval" -v t="$turns" 'BEGIN { printf "%d", 30 + t * i }')}"
      for engine in "${order[@]}"; do
        # `engine:off` / `engine:on`: that LLM engine with the engines' steps taking the whole
        # machine one at a time / sharing the cores (LOCAL_OVERLAP_STEPS).
        # `spec@label`: the server binary in $LEVEL_BIN_label (another build, for a before and
        # after in one sitting).
        spec="${engine%@*}" server_bin=
        if [ "$spec" != "$engine" ]; then
          var="LEVEL_BIN_${engine##*@}"
          server_bin="${!var:?$var is not set (engine $engine)}"
        fi
        case "$spec" in
          *:*) start_server LOCAL_LLM_ENGINE="${spec%%:*}" LOCAL_OVERLAP_STEPS="${spec#*:}" ;;
          *) start_server LOCAL_LLM_ENGINE="$spec" ;;
        esac
        report="$out/$engine-n$n-r$round.json"
        log "round $round, $engine, $n conversations at once (beat ${interval} s, at most ${max_s} s)"
        "$bin/duplex-replay" --url "ws://127.0.0.1:$port/v1/conversation" --sessions "$n" \
          --turns "$turns" --turn-interval-ms "$(awk -v i="$interval" 'BEGIN { printf "%d", i * 1000 }')" \
          --playback-speed "$playback" --duration-s "$max_s" --turn-timeout-s 60 \
          --server-pid "$server" --metrics-url "http://127.0.0.1:$port/metrics" \
          --json "$work"/q*.wav >"$report" || true
        stop_server
        printf '%s\n' "$table_head" >&2
        jq -r --arg engine "$engine" --argjson n "$n" "$row_filter" "$report" | tee -a "$out/rows.md" >&2
      done
    done
  done
  uptime >"$out/uptime-after"
  log "all levels ($out); uptime before: $(cat "$out/uptime-before"); after: $(uptime)"
  printf '%s\n' "$table_head"
  for engine in "${engines[@]}"; do grep -F "| $engine |" "$out/rows.md" | sort -t'|' -k3,3n -s; done
  # The largest N at which every round had every question answered with p95 < 3 s (and so
  # did every smaller level).
  for engine in "${engines[@]}"; do
    best=$(for f in "$out/$engine"-n*-r*.json; do
             n="${f##*-n}"; n="${n%%-r*}"
             jq -r --argjson n "$n" '(.turns_completed + .turns_interrupted + .turns_failed + .turns_timed_out + .turns_cut) as $asked
               | "\($n) \(if .metrics.first_audio_ms.count == $asked and $asked > 0 and .metrics.first_audio_ms.p95 < 3000 then 1 else 0 end)"' "$f"
           done | sort -n | awk '{ if (!($1 in ok)) { order[++k] = $1; ok[$1] = 1 } if ($2 == 0) ok[$1] = 0 }
                           END { best = 0; for (i = 1; i <= k; i++) { if (!ok[order[i]]) break; best = order[i] } print best }')
    echo "$engine: largest N with p95 of end of speech -> first audio under 3 s: $best"
  done
  exit 0
fi

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
  make_questions "$work"

  port=$((20000 + RANDOM % 10000))
  log "starting duplex on 127.0.0.1:$port (local engines)"
  DUPLEX_PROVIDERS=local PORT=$port BIND_ADDR=127.0.0.1 DATABASE_URL="sqlite://$work/db.sqlite?mode=rwc" \
    LOG_FORMAT=json RUST_LOG=warn "$bin/duplex" >"$work/server.log" 2>&1 &
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
  "$bin/duplex-replay" --url "$url" --turn-timeout-s 60 "$work"/q*.wav || true
  log "recorded speech (LibriVox), one session"
  "$bin/duplex-replay" --url "$url" --turn-timeout-s 60 "$work"/rec-*.wav || true
  log "server resident memory after the runs: $(rss)"
  kill -TERM "$server"; wait "$server" || true
fi

if [ "$what" != --server-only ]; then
  log "each engine alone (cargo bench -p duplex-local)"
  cargo bench --locked -p duplex-local --bench engines
  log "the LLM with 1-4 questions at once, batched and one at a time (cargo bench -p duplex-local --bench llm_concurrency)"
  cargo bench --locked -p duplex-local --bench llm_concurrency
fi
