//! Prometheus metrics of the server. The registry is built once in [`Metrics::new`] (from
//! `main` or a test) and passed down; nothing registers globally.

use prometheus::{
    CounterVec, Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// Every metric the server exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub active_sessions: IntGauge,
    pub sessions_total: IntCounter,
    pub connections_rejected: IntCounterVec,
    pub turns_total: IntCounter,
    pub interruptions_total: IntCounter,
    pub errors_total: IntCounterVec,
    pub stage_latency: HistogramVec,
    pub frames_in_total: IntCounter,
    pub frames_out_total: IntCounter,
    pub stt_frames_dropped_total: IntCounter,
    /// Provider consumption by provider, model and kind (seconds, tokens, characters).
    pub provider_usage_total: CounterVec,
    /// Estimated provider cost in USD (from the price table; see `duplex_providers::usage`).
    pub provider_cost_usd_total: CounterVec,
    /// The server's resident memory, read at each scrape (the local engines' models are most
    /// of it).
    pub resident_memory_bytes: IntGauge,
}

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
        for c in [
            Box::new(active_sessions.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(resident_memory_bytes.clone()),
            Box::new(provider_usage_total.clone()),
            Box::new(provider_cost_usd_total.clone()),
            Box::new(sessions_total.clone()),
            Box::new(connections_rejected.clone()),
            Box::new(turns_total.clone()),
            Box::new(interruptions_total.clone()),
            Box::new(errors_total.clone()),
            Box::new(stage_latency.clone()),
            Box::new(frames_in_total.clone()),
            Box::new(frames_out_total.clone()),
            Box::new(stt_frames_dropped_total.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Metrics {
            registry,
            active_sessions,
            sessions_total,
            connections_rejected,
            turns_total,
            interruptions_total,
            errors_total,
            stage_latency,
            frames_in_total,
            frames_out_total,
            stt_frames_dropped_total,
            provider_usage_total,
            provider_cost_usd_total,
            resident_memory_bytes,
        }
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
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("Prometheus text is UTF-8")
    }
}

/// Provider usage as Prometheus counters; the metering store is another sink beside this one
/// (`duplex_providers::usage::FanOut`).
impl duplex_providers::UsageSink for Metrics {
    fn record(&self, r: duplex_providers::UsageRecord) {
        self.provider_usage_total
            .with_label_values(&[r.provider.as_str(), r.model.as_str(), r.kind.as_str()])
            .inc_by(r.quantity);
        if r.cost_usd > 0.0 {
            self.provider_cost_usd_total
                .with_label_values(&[r.provider.as_str(), r.model.as_str()])
                .inc_by(r.cost_usd);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
