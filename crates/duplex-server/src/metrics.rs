//! Prometheus metrics of the server. The registry is built once in [`Metrics::new`] (from
//! `main` or a test) and passed down; nothing registers globally.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
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
}

/// Latency buckets in seconds: 10 ms to 10 s, dense where voice latency lives (0.1-1.5 s).
const LATENCY_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0,
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
        for c in [
            Box::new(active_sessions.clone()) as Box<dyn prometheus::core::Collector>,
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
        }
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("Prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
