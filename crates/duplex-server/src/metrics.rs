//! Prometheus metrics of the server. The registry is built once in [`Metrics::new`] (from
//! `main` or a test) and passed down; nothing registers globally.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::{
    Counter, CounterVec, Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Stages of `duplex_stage_latency_seconds` (`duplex_core::Stage` plus the endpointer's
/// trailing silence), created at startup so that every series exists before the first turn.
pub const STAGES: &[&str] = &[
    "endpointing",
    "stt_final",
    "llm_first_token",
    "tts_first_audio",
    "voice_to_voice",
];
/// Reasons of `duplex_connections_rejected_total` (the `reject` calls in `http.rs`,
/// `AuthError::label`, and `pending`: a TCP connection closed at accept by
/// `MAX_PENDING_CONNECTIONS` in `serve.rs`).
pub const REJECT_REASONS: &[&str] = &[
    "pending",
    "shutting_down",
    "bad_version",
    "no_version",
    "connect_rate",
    "origin",
    "unauthorized",
    "auth_unavailable",
    "capacity",
    "per_ip",
];
/// Codes of `duplex_errors_total` created at startup: every `duplex_proto::ErrorCode` (a code
/// added later appears at its first use; a test checks that these are codes).
pub const ERROR_CODES: &[&str] = &[
    "malformed_json",
    "unknown_message_type",
    "invalid_message",
    "session_not_started",
    "audio_before_session_start",
    "session_already_started",
    "unsupported_sample_rate",
    "unsupported_encoding",
    "odd_frame_length",
    "message_too_large",
    "session_ended",
    "slow_consumer",
    "idle_timeout",
    "stt_error",
    "llm_error",
    "tts_error",
    "server_shutting_down",
    "generation_disabled",
    "limit_exceeded",
    "rate_limited",
    "internal",
];
/// Limits of `duplex_limit_exceeded_total` (`LimitExceeded::limit` in the protocol).
pub const LIMITS: &[&str] = &[
    "daily_seconds",
    "trial_seconds",
    "monthly_tts_characters",
    "turns_per_minute",
    "daily_spend",
    "generation_disabled",
];
/// Linux reports process CPU time in clock ticks of `USER_HZ`, which is 100 on every
/// architecture Linux runs on (the kernel ABI fixes it, unlike `HZ`).
const USER_HZ: f64 = 100.0;

/// Every metric the server exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub active_sessions: IntGauge,
    /// Tasks alive on the tokio runtime that serves `/metrics`, sampled at each scrape: a
    /// count that stays above its idle baseline once every session is gone is a task leak.
    runtime_alive_tasks: IntGauge,
    pub sessions_total: IntCounter,
    pub connections_rejected: IntCounterVec,
    pub turns_total: IntCounter,
    pub interruptions_total: IntCounter,
    pub errors_total: IntCounterVec,
    pub stage_latency: HistogramVec,
    pub frames_in_total: IntCounter,
    pub frames_out_total: IntCounter,
    pub stt_frames_dropped_total: IntCounter,
    /// Client audio frames dropped because they ran ahead of real time (`audio_too_fast`).
    pub audio_too_fast_total: IntCounter,
    /// Open session rows closed because their server stopped writing (crashed or killed).
    pub sessions_reaped_total: IntCounter,
    /// Usage writes of ended sessions that the store did not acknowledge in time, waiting in
    /// the server's backlog (applied in order as the store answers).
    pub usage_backlog_writes: IntGauge,
    /// Seconds of conversation the server could not write at all (backlog full, or still
    /// queued when the server exited): each is also logged at error level.
    pub usage_lost_seconds_total: IntCounter,
    /// Provider consumption by provider, model and kind (seconds, tokens, characters).
    pub provider_usage_total: CounterVec,
    /// Estimated provider cost in USD (from the price table; see `duplex_providers::usage`).
    pub provider_cost_usd_total: CounterVec,
    /// The server's resident memory, read at each scrape (the local engines' models are most
    /// of it).
    pub resident_memory_bytes: IntGauge,
    /// CPU time of the process (user + system), read at each scrape.
    pub cpu_seconds_total: Counter,
    /// Serialises scrapes' updates of `cpu_seconds_total` (a counter moves by deltas).
    cpu_lock: Arc<Mutex<()>>,
    /// Per-stage latency by the provider that caused it (STT final, LLM first token, TTS first
    /// audio), to tell a slow vendor from a slow server.
    pub provider_latency: HistogramVec,
    /// `limit_exceeded` events sent to clients, by limit.
    pub limit_exceeded_total: IntCounterVec,
    /// LLM failovers: an endpoint failed before its first token and the router moved on.
    pub llm_failovers_total: IntCounterVec,
    /// Stripe webhook requests answered with an error, by reason
    /// (`duplex_billing::WebhookError::label`; `unknown_price`: a subscription price missing
    /// from `STRIPE_PRICE_PLANS`, which the operator must map).
    pub stripe_webhook_errors_total: IntCounterVec,
    /// 1 while an LLM endpoint's circuit breaker is open (or half-open), else 0.
    pub llm_breaker_open: IntGaugeVec,
    /// 1 while `/readyz` answers 200, 0 once draining began.
    pub ready: IntGauge,
    /// The UTC day's recorded provider spend across all users and servers, as last read from
    /// the store (by a session's heartbeat: it does not move while no session runs).
    pub daily_spend_usd: Gauge,
    /// `MAX_DAILY_SPEND_USD` as currently in force (switches file included); 0 when unset.
    pub max_daily_spend_usd: Gauge,
    /// The highest conversation seconds of one user on the current UTC day, among the users
    /// whose usage this server wrote today (abuse detection without a per-user label).
    pub busiest_user_seconds_today: IntGauge,
    /// The day `busiest_user_seconds_today` belongs to (days since the epoch).
    busiest_day: Arc<AtomicI64>,
    /// SQLite's group-commit writer: transactions committed, writes they held, and the most
    /// one held (all zero on PostgreSQL, which commits each write alone). Read from the store
    /// at each scrape ([`Metrics::observe_store_writer`]).
    pub store_batches_total: IntCounter,
    pub store_batched_writes_total: IntCounter,
    pub store_largest_batch: IntGauge,
    /// Serialises scrapes' updates of the store counters (they move by deltas).
    store_lock: Arc<Mutex<()>>,
    /// Local engines: time a job waited for an engine instance (STT, TTS) or an LLM sequence.
    pub local_queue_wait: HistogramVec,
    /// Local LLM answers being generated now.
    pub local_llm_active_sequences: IntGauge,
    /// Tokens the local LLM generated (its rate is tokens/s).
    pub local_llm_tokens_total: IntCounter,
    /// Answers per local LLM decode step (the batch size).
    pub local_llm_batch_size: Histogram,
    /// Speculative transcriptions dropped from the local recognizer's full queue.
    pub local_stt_queue_dropped_total: IntCounter,
}

/// Answers per decode step: 1 to the largest `LOCAL_LLM_MAX_SEQUENCES` worth running on a
/// few cores.
const BATCH_SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0];

/// Latency buckets in seconds: 1 ms to 10 s, dense where voice latency lives (0.1-1.5 s);
/// the millisecond buckets resolve in-process stages (a streaming STT's final after the
/// endpoint), and 0.7 s matches the default end-of-turn silence.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 1.0,
    1.5, 2.0, 3.0, 5.0, 10.0,
];

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let active_sessions =
            IntGauge::new("duplex_active_sessions", "WebSocket sessions open now")
                .expect("valid metric");
        let runtime_alive_tasks = IntGauge::new(
            "duplex_runtime_alive_tasks",
            "Tasks alive on the server's tokio runtime, sampled when /metrics is scraped",
        )
        .expect("valid metric");
        let sessions_total =
            IntCounter::new("duplex_sessions_total", "WebSocket sessions accepted")
                .expect("valid metric");
        let connections_rejected = IntCounterVec::new(
            Opts::new(
                "duplex_connections_rejected_total",
                "Upgrades refused, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let turns_total =
            IntCounter::new("duplex_turns_total", "Assistant turns started").expect("valid metric");
        let interruptions_total = IntCounter::new(
            "duplex_interruptions_total",
            "Assistant turns cut by barge-in",
        )
        .expect("valid metric");
        let errors_total = IntCounterVec::new(
            Opts::new(
                "duplex_errors_total",
                "Error events sent to clients, by code",
            ),
            &["code"],
        )
        .expect("valid metric");
        let stripe_webhook_errors_total = IntCounterVec::new(
            Opts::new(
                "duplex_stripe_webhook_errors_total",
                "Stripe webhook requests answered with an error (Stripe retries them), by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        for reason in duplex_billing::WebhookError::LABELS {
            stripe_webhook_errors_total.with_label_values(&[reason]);
        }
        let stage_latency = HistogramVec::new(
            HistogramOpts::new(
                "duplex_stage_latency_seconds",
                "Per-stage latency of a turn",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["stage"],
        )
        .expect("valid metric");
        let frames_in_total = IntCounter::new(
            "duplex_audio_frames_in_total",
            "Binary audio frames received",
        )
        .expect("valid metric");
        let frames_out_total =
            IntCounter::new("duplex_audio_frames_out_total", "Binary audio frames sent")
                .expect("valid metric");
        let usage_backlog_writes = IntGauge::new(
            "duplex_usage_backlog_writes",
            "Usage writes of ended sessions waiting for the store in the server's backlog",
        )
        .expect("valid metric");
        let usage_lost_seconds_total = IntCounter::new(
            "duplex_usage_lost_seconds_total",
            "Seconds of conversation never written to the store (backlog full or server exited first)",
        )
        .expect("valid metric");
        let store_batches_total = IntCounter::new(
            "duplex_store_batches_total",
            "Transactions the store's group-commit writer committed (SQLite; 0 on PostgreSQL)",
        )
        .expect("valid metric");
        let store_batched_writes_total = IntCounter::new(
            "duplex_store_batched_writes_total",
            "Writes (usage, session start and end) those transactions held: writes per batch is this over duplex_store_batches_total",
        )
        .expect("valid metric");
        let store_largest_batch = IntGauge::new(
            "duplex_store_largest_batch",
            "The most writes one group-commit transaction held since the server started",
        )
        .expect("valid metric");
        let sessions_reaped_total = IntCounter::new(
            "duplex_sessions_reaped_total",
            "Open session rows closed by the reaper: no usage write for a long time (their server died)",
        )
        .expect("valid metric");
        let audio_too_fast_total = IntCounter::new(
            "duplex_audio_frames_too_fast_total",
            "Client audio frames dropped because they ran ahead of real time beyond MAX_AUDIO_AHEAD_MS.",
        )
        .expect("valid metric");
        let stt_frames_dropped_total = IntCounter::new(
            "duplex_stt_frames_dropped_total",
            "Audio frames dropped because the STT stream was backed up",
        )
        .expect("valid metric");
        let provider_usage_total = CounterVec::new(
            Opts::new(
                "duplex_provider_usage_total",
                "Provider consumption: STT seconds, LLM tokens, TTS characters",
            ),
            &["provider", "model", "kind"],
        )
        .expect("valid metric");
        let provider_cost_usd_total = CounterVec::new(
            Opts::new(
                "duplex_provider_cost_usd_total",
                "Estimated provider cost in USD, from the price table",
            ),
            &["provider", "model"],
        )
        .expect("valid metric");
        let resident_memory_bytes = IntGauge::new(
            "duplex_process_resident_memory_bytes",
            "Resident memory of the server process (VmRSS), read at each scrape",
        )
        .expect("valid metric");
        let cpu_seconds_total = Counter::new(
            "duplex_process_cpu_seconds_total",
            "CPU time of the server process (user + system) in seconds, read at each scrape",
        )
        .expect("valid metric");
        let provider_latency = HistogramVec::new(
            HistogramOpts::new(
                "duplex_provider_latency_seconds",
                "Time to first byte of a provider within a turn: stt_final (end of speech to \
                 final transcript), llm_first_token, tts_first_audio; by provider",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["stage", "provider"],
        )
        .expect("valid metric");
        let limit_exceeded_total = IntCounterVec::new(
            Opts::new(
                "duplex_limit_exceeded_total",
                "limit_exceeded events sent to clients, by limit",
            ),
            &["limit"],
        )
        .expect("valid metric");
        let llm_failovers_total = IntCounterVec::new(
            Opts::new(
                "duplex_llm_failovers_total",
                "LLM endpoints that failed before the first token (the router tried the next)",
            ),
            &["endpoint"],
        )
        .expect("valid metric");
        let llm_breaker_open = IntGaugeVec::new(
            Opts::new(
                "duplex_llm_breaker_open",
                "1 while the LLM endpoint's circuit breaker is open or half-open",
            ),
            &["endpoint"],
        )
        .expect("valid metric");
        let ready = IntGauge::new(
            "duplex_ready",
            "1 while /readyz answers 200, 0 once draining began",
        )
        .expect("valid metric");
        let daily_spend_usd = Gauge::new(
            "duplex_daily_spend_usd",
            "Recorded provider spend of the UTC day across all users, as last read from the store",
        )
        .expect("valid metric");
        let max_daily_spend_usd = Gauge::new(
            "duplex_max_daily_spend_usd",
            "MAX_DAILY_SPEND_USD in force (0: unset)",
        )
        .expect("valid metric");
        let busiest_user_seconds_today = IntGauge::new(
            "duplex_busiest_user_seconds_today",
            "Most conversation seconds of one user on the UTC day, among users this server metered today",
        )
        .expect("valid metric");
        let local_queue_wait = HistogramVec::new(
            HistogramOpts::new(
                "duplex_local_queue_wait_seconds",
                "Time a local engine's job waited before it started: a free Whisper or Piper \
                 instance (stt, tts), a sequence of the LLM (llm)",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["engine"],
        )
        .expect("valid metric");
        for engine in ["stt", "llm", "tts"] {
            local_queue_wait.with_label_values(&[engine]);
        }
        let local_llm_active_sequences = IntGauge::new(
            "duplex_local_llm_active_sequences",
            "Answers the local LLM is generating now (prefilling or decoding)",
        )
        .expect("valid metric");
        let local_llm_tokens_total = IntCounter::new(
            "duplex_local_llm_tokens_total",
            "Tokens generated by the local LLM (rate: tokens/s)",
        )
        .expect("valid metric");
        let local_llm_batch_size = Histogram::with_opts(
            HistogramOpts::new(
                "duplex_local_llm_batch_size",
                "Answers (sequences) in each local LLM decode step",
            )
            .buckets(BATCH_SIZE_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let local_stt_queue_dropped_total = IntCounter::new(
            "duplex_local_stt_queue_dropped_total",
            "Speculative transcriptions dropped from the local recognizer's full queue",
        )
        .expect("valid metric");
        for stage in STAGES {
            stage_latency.with_label_values(&[stage]);
        }
        for reason in REJECT_REASONS {
            connections_rejected.with_label_values(&[reason]);
        }
        for code in ERROR_CODES {
            errors_total.with_label_values(&[code]);
        }
        for limit in LIMITS {
            limit_exceeded_total.with_label_values(&[limit]);
        }
        for c in [
            Box::new(cpu_seconds_total.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(local_queue_wait.clone()),
            Box::new(local_llm_active_sequences.clone()),
            Box::new(local_llm_tokens_total.clone()),
            Box::new(local_llm_batch_size.clone()),
            Box::new(local_stt_queue_dropped_total.clone()),
            Box::new(provider_latency.clone()),
            Box::new(limit_exceeded_total.clone()),
            Box::new(llm_failovers_total.clone()),
            Box::new(llm_breaker_open.clone()),
            Box::new(ready.clone()),
            Box::new(daily_spend_usd.clone()),
            Box::new(max_daily_spend_usd.clone()),
            Box::new(busiest_user_seconds_today.clone()),
            Box::new(active_sessions.clone()),
            Box::new(runtime_alive_tasks.clone()),
            Box::new(resident_memory_bytes.clone()),
            Box::new(provider_usage_total.clone()),
            Box::new(provider_cost_usd_total.clone()),
            Box::new(sessions_total.clone()),
            Box::new(connections_rejected.clone()),
            Box::new(turns_total.clone()),
            Box::new(interruptions_total.clone()),
            Box::new(errors_total.clone()),
            Box::new(stripe_webhook_errors_total.clone()),
            Box::new(stage_latency.clone()),
            Box::new(frames_in_total.clone()),
            Box::new(frames_out_total.clone()),
            Box::new(stt_frames_dropped_total.clone()),
            Box::new(audio_too_fast_total.clone()),
            Box::new(sessions_reaped_total.clone()),
            Box::new(usage_backlog_writes.clone()),
            Box::new(usage_lost_seconds_total.clone()),
            Box::new(store_batches_total.clone()),
            Box::new(store_batched_writes_total.clone()),
            Box::new(store_largest_batch.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Metrics {
            registry,
            active_sessions,
            runtime_alive_tasks,
            sessions_total,
            connections_rejected,
            turns_total,
            interruptions_total,
            errors_total,
            stage_latency,
            frames_in_total,
            frames_out_total,
            stt_frames_dropped_total,
            audio_too_fast_total,
            sessions_reaped_total,
            usage_backlog_writes,
            usage_lost_seconds_total,
            provider_usage_total,
            provider_cost_usd_total,
            resident_memory_bytes,
            cpu_seconds_total,
            cpu_lock: Arc::default(),
            provider_latency,
            limit_exceeded_total,
            llm_failovers_total,
            stripe_webhook_errors_total,
            llm_breaker_open,
            ready,
            daily_spend_usd,
            max_daily_spend_usd,
            busiest_user_seconds_today,
            busiest_day: Arc::new(AtomicI64::new(i64::MIN)),
            store_batches_total,
            store_batched_writes_total,
            store_largest_batch,
            store_lock: Arc::default(),
            local_queue_wait,
            local_llm_active_sequences,
            local_llm_tokens_total,
            local_llm_batch_size,
            local_stt_queue_dropped_total,
        }
    }

    /// Creates the per-provider series of a provider set (so that they exist before the
    /// first turn).
    pub fn init_providers(&self, stt: &str, llm: &str, tts: &str) {
        for (stage, provider) in [
            ("stt_final", stt),
            ("llm_first_token", llm),
            ("tts_first_audio", tts),
        ] {
            self.provider_latency.with_label_values(&[stage, provider]);
        }
    }

    /// A user's conversation seconds on `day` (days since the epoch), as a usage write
    /// returned them: raises the busiest-user gauge, or restarts it on a new day.
    pub fn observe_user_day(&self, day: i64, seconds: u64) {
        let seconds = i64::try_from(seconds).unwrap_or(i64::MAX);
        let current = self.busiest_day.load(Ordering::Relaxed);
        if day > current {
            // A new day: the first write of the day sets the gauge (a race between two
            // sessions here costs at most one heartbeat of accuracy).
            self.busiest_day.store(day, Ordering::Relaxed);
            self.busiest_user_seconds_today.set(seconds);
        } else if day == current && seconds > self.busiest_user_seconds_today.get() {
            self.busiest_user_seconds_today.set(seconds);
        }
    }

    /// The store writer's figures since it opened, as `Store::writer_stats` reads them: the
    /// counters move up to them (never down; a scrape that raced another changes nothing).
    pub fn observe_store_writer(&self, stats: duplex_store::WriterStats) {
        let _guard = self
            .store_lock
            .lock()
            .expect("never poisoned: no panics while held");
        for (counter, now) in [
            (&self.store_batches_total, stats.batches),
            (&self.store_batched_writes_total, stats.writes),
        ] {
            if let Some(delta) = now.checked_sub(counter.get()).filter(|&d| d > 0) {
                counter.inc_by(delta);
            }
        }
        self.store_largest_batch
            .set(i64::try_from(stats.largest).unwrap_or(i64::MAX));
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        if let Some(kib) = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
            })
        {
            self.resident_memory_bytes.set(kib * 1024);
        }
        // Fields 14 and 15 of /proc/self/stat (utime, stime), counted after the command
        // name's closing parenthesis, which may itself contain spaces.
        if let Some(ticks) = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| {
                let rest = s.rsplit_once(')')?.1;
                let f: Vec<&str> = rest.split_whitespace().collect();
                Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
            })
        {
            let _guard = self
                .cpu_lock
                .lock()
                .expect("never poisoned: no panics while held");
            let delta = ticks / USER_HZ - self.cpu_seconds_total.get();
            if delta > 0.0 {
                self.cpu_seconds_total.inc_by(delta);
            }
        }
        // Outside a runtime (a unit test rendering directly) the gauge keeps its last value.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let alive = handle.metrics().num_alive_tasks();
            self.runtime_alive_tasks
                .set(i64::try_from(alive).unwrap_or(i64::MAX));
        }
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("Prometheus text is UTF-8")
    }
}

/// The LLM router's failovers and breaker states as Prometheus series.
impl duplex_providers::router::RouterObserver for Metrics {
    fn endpoints(&self, names: &[String]) {
        for n in names {
            self.llm_failovers_total.with_label_values(&[n.as_str()]);
            self.llm_breaker_open
                .with_label_values(&[n.as_str()])
                .set(0);
        }
    }

    fn failover(&self, endpoint: &str) {
        self.llm_failovers_total
            .with_label_values(&[endpoint])
            .inc();
    }

    fn breaker(&self, endpoint: &str, open: bool) {
        self.llm_breaker_open
            .with_label_values(&[endpoint])
            .set(i64::from(open));
    }
}

/// The local engines' queues, steps and tokens as Prometheus series.
impl duplex_local::observe::Observe for Metrics {
    fn queue_wait(&self, engine: duplex_local::observe::Engine, wait: std::time::Duration) {
        self.local_queue_wait
            .with_label_values(&[engine.label()])
            .observe(wait.as_secs_f64());
    }

    fn dropped(&self, engine: duplex_local::observe::Engine) {
        if engine == duplex_local::observe::Engine::Stt {
            self.local_stt_queue_dropped_total.inc();
        }
    }

    fn llm_step(&self, sequences: usize) {
        self.local_llm_batch_size.observe(sequences as f64);
    }

    fn llm_tokens(&self, tokens: u64) {
        self.local_llm_tokens_total.inc_by(tokens);
    }

    fn llm_active(&self, sequences: usize) {
        self.local_llm_active_sequences.set(sequences as i64);
    }
}

/// Provider usage as Prometheus counters; the metering store is another sink beside this one
/// (`duplex_providers::usage::FanOut`).
impl duplex_providers::UsageSink for Metrics {
    fn record(&self, r: duplex_providers::UsageRecord) {
        self.provider_usage_total
            .with_label_values(&[r.provider.as_str(), r.model.as_str(), r.kind.as_str()])
            .inc_by(r.quantity);
        // Also free engines (local, scripted): their series shows $0 instead of nothing.
        self.provider_cost_usd_total
            .with_label_values(&[r.provider.as_str(), r.model.as_str()])
            .inc_by(r.cost_usd.max(0.0));
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_error_codes_are_protocol_codes() {
        for code in ERROR_CODES {
            let parsed: Result<duplex_proto::ErrorCode, _> =
                serde_json::from_value(serde_json::Value::String((*code).to_owned()));
            assert_eq!(parsed.map(|c| c.as_str()).ok(), Some(*code));
        }
    }

    #[test]
    fn every_family_is_exported_before_any_traffic() {
        let text = Metrics::new().render();
        for family in [
            "duplex_stage_latency_seconds",
            "duplex_errors_total",
            "duplex_stripe_webhook_errors_total",
            "duplex_connections_rejected_total",
            "duplex_limit_exceeded_total",
            "duplex_process_cpu_seconds_total",
            "duplex_process_resident_memory_bytes",
            "duplex_ready",
            "duplex_daily_spend_usd",
            "duplex_busiest_user_seconds_today",
            "duplex_runtime_alive_tasks",
            "duplex_store_batches_total",
            "duplex_store_batched_writes_total",
            "duplex_store_largest_batch",
        ] {
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{family} in {text}"
            );
        }
        assert!(text.contains("duplex_process_cpu_seconds_total "), "{text}");
    }

    /// The store writer's counters follow its figures and never go back.
    #[test]
    fn store_writer_figures_become_counters() {
        let m = Metrics::new();
        let stats = |batches, writes, largest| duplex_store::WriterStats {
            batches,
            writes,
            largest,
        };
        m.observe_store_writer(stats(3, 40, 20));
        m.observe_store_writer(stats(5, 70, 30));
        // A stale reading (a scrape that read before the one above) moves nothing back.
        m.observe_store_writer(stats(4, 50, 30));
        let text = m.render();
        assert!(text.contains("\nduplex_store_batches_total 5\n"), "{text}");
        assert!(
            text.contains("\nduplex_store_batched_writes_total 70\n"),
            "{text}"
        );
        assert!(text.contains("\nduplex_store_largest_batch 30\n"), "{text}");
    }

    /// The gauge follows the runtime: tasks started before a scrape are counted, and gone
    /// again at the next scrape once they ended.
    #[tokio::test(flavor = "current_thread")]
    async fn the_alive_tasks_gauge_counts_the_runtime_tasks_at_each_scrape() {
        fn alive(text: &str) -> i64 {
            text.lines()
                .find_map(|l| l.strip_prefix("duplex_runtime_alive_tasks "))
                .expect("the gauge is rendered")
                .parse()
                .expect("a whole number")
        }
        let m = Metrics::new();
        let before = alive(&m.render());
        let (release, wait) = tokio::sync::watch::channel(false);
        let tasks: Vec<_> = (0..5)
            .map(|_| {
                let mut wait = wait.clone();
                tokio::spawn(async move {
                    let _ = wait.wait_for(|go| *go).await;
                })
            })
            .collect();
        assert_eq!(alive(&m.render()), before + 5);
        release.send(true).expect("the tasks hold receivers");
        for t in tasks {
            t.await.expect("the task ends");
        }
        assert_eq!(alive(&m.render()), before);
    }

    #[test]
    fn the_busiest_user_gauge_restarts_each_day() {
        let m = Metrics::new();
        m.observe_user_day(100, 50);
        m.observe_user_day(100, 30);
        assert_eq!(m.busiest_user_seconds_today.get(), 50);
        m.observe_user_day(101, 10);
        assert_eq!(m.busiest_user_seconds_today.get(), 10);
        m.observe_user_day(100, 500); // a late write for yesterday
        assert_eq!(m.busiest_user_seconds_today.get(), 10);
    }
}
