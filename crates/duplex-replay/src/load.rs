//! `run_load`: many sessions at once, started evenly over a ramp-up, aggregated into one
//! `LoadReport` (percentiles per metric, errors by code) printable as a table or JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use duplex_proto::{Encoding, SessionStart};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

use crate::session::{Mode, SessionConfig, SessionReport, TurnOutcome, TurnSchedule, run_session};
use crate::stats::Summary;
use crate::wav::Wav;

/// Failure reasons kept verbatim in a report; beyond that only the counts grow.
const MAX_FAILURES_LISTED: usize = 20;
/// Extra time a session gets past `max_duration` to close cleanly before it is abandoned.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// With a turn interval, the first question starts this long after its session does:
/// connecting and `session.ready` take milliseconds on loopback, so one second lets every
/// session of a loaded server be ready before the first beat.
pub const SCHEDULE_LEAD: Duration = Duration::from_secs(1);

/// A load run: `sessions` concurrent sessions running the same script.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub url: String,
    pub sessions: usize,
    /// Session k starts at `k * ramp_up / sessions`.
    pub ramp_up: Duration,
    /// One user turn each, cycled; all at one sample rate.
    pub wavs: Vec<Wav>,
    /// See [`SessionConfig::speed`].
    pub speed: f64,
    pub barge_in_after_ms: Option<u64>,
    /// User turns per session (passes over the WAVs in echo mode).
    pub turns: usize,
    pub mode: Mode,
    /// Encoding of the binary frames sent.
    pub encoding: Encoding,
    /// The whole run stops after this long, measured from its start.
    pub max_duration: Option<Duration>,
    pub turn_timeout: Duration,
    /// Extra `session.start` fields (voice, model...).
    pub start: Option<SessionStart>,
    /// Keep every session's report (with per-turn timelines) in the load report.
    pub keep_sessions: bool,
    /// See [`SessionConfig::playback_speed`].
    pub playback_speed: Option<f64>,
    /// Every session speaks on one beat: user turn k of every session starts no earlier than
    /// `SCHEDULE_LEAD + k × interval` after the session starts (see
    /// [`SessionConfig::schedule`]); without a ramp-up the sessions ask together.
    pub turn_interval: Option<Duration>,
}

impl LoadConfig {
    /// One session, one pass over `wavs`, real time, no ramp-up.
    pub fn new(url: impl Into<String>, wavs: Vec<Wav>) -> LoadConfig {
        let defaults = SessionConfig::new("");
        LoadConfig {
            url: url.into(),
            sessions: 1,
            ramp_up: Duration::ZERO,
            turns: wavs.len().max(1),
            wavs,
            speed: defaults.speed,
            barge_in_after_ms: None,
            mode: Mode::Conversation,
            encoding: Encoding::Pcm16,
            max_duration: None,
            turn_timeout: defaults.turn_timeout,
            start: None,
            keep_sessions: false,
            playback_speed: None,
            turn_interval: None,
        }
    }

    /// The configuration each session runs with.
    pub fn session_config(&self) -> SessionConfig {
        SessionConfig {
            mode: self.mode,
            encoding: self.encoding,
            speed: self.speed,
            barge_in_after_ms: self.barge_in_after_ms,
            turns: self.turns,
            turn_timeout: self.turn_timeout,
            max_duration: self.max_duration,
            start: self.start.clone(),
            record_timeline: self.keep_sessions,
            playback_speed: self.playback_speed,
            ..SessionConfig::new(self.url.clone())
        }
    }

    /// Checks the configuration before anything connects.
    pub fn validate(&self) -> crate::Result<()> {
        if self.sessions == 0 {
            return Err(crate::Error::Config("sessions must be at least 1".into()));
        }
        if self.turn_interval.is_some_and(|i| i.is_zero()) {
            return Err(crate::Error::Config("turn interval must be above 0".into()));
        }
        self.session_config().validate(&self.wavs)
    }
}

/// Runs every session to its end and aggregates. Bounded: each session stops by itself (turn
/// timeouts, `max_duration`), and one that overruns `max_duration` is abandoned as failed.
pub async fn run_load(cfg: &LoadConfig) -> LoadReport {
    let started = Instant::now();
    let wavs: Arc<[Wav]> = cfg.wavs.clone().into();
    let base = cfg.session_config();
    let mut tasks = JoinSet::new();
    for k in 0..cfg.sessions {
        let offset = cfg.ramp_up.mul_f64(k as f64 / cfg.sessions as f64);
        let mut session = base.clone();
        session.max_duration = cfg.max_duration.map(|d| d.saturating_sub(offset));
        session.schedule = cfg.turn_interval.map(|interval| TurnSchedule {
            first: started + offset + SCHEDULE_LEAD,
            interval,
        });
        let wavs = Arc::clone(&wavs);
        let span = tracing::debug_span!("session", k);
        let task = async move {
            tokio::time::sleep_until(started + offset).await;
            let run = run_session(&session, &wavs);
            let report = match session.max_duration {
                Some(d) => match tokio::time::timeout(d + STOP_GRACE, run).await {
                    Ok(r) => r,
                    Err(_) => failed_report("session did not stop within max duration"),
                },
                None => run.await,
            };
            (k, report)
        };
        tasks.spawn(task.instrument(span));
    }
    let mut reports: Vec<(usize, SessionReport)> = Vec::with_capacity(cfg.sessions);
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(r) => reports.push(r),
            Err(e) => reports.push((
                usize::MAX,
                failed_report(&format!("session task died: {e}")),
            )),
        }
    }
    reports.sort_by_key(|(k, _)| *k);
    let reports: Vec<SessionReport> = reports.into_iter().map(|(_, r)| r).collect();
    let mut report = LoadReport::from_sessions(cfg.mode, &reports, started.elapsed());
    report.wer = WerSummary::from_sessions(&reports, &cfg.wavs);
    if cfg.keep_sessions {
        report.session_reports = reports;
    }
    report
}

fn failed_report(why: &str) -> SessionReport {
    SessionReport {
        failure: Some(why.to_string()),
        ..SessionReport::default()
    }
}

/// Percentile summaries of every latency, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MetricSummaries {
    pub speech_stopped_ms: Summary,
    pub final_transcript_ms: Summary,
    pub first_text_ms: Summary,
    pub first_audio_ms: Summary,
    pub turn_total_ms: Summary,
    pub interrupt_ms: Summary,
    pub audio_stop_ms: Summary,
    pub echo_rtt_ms: Summary,
}

impl MetricSummaries {
    /// Name and summary of each metric, in pipeline order.
    pub fn rows(&self) -> [(&'static str, &Summary); 8] {
        [
            ("speech_stopped_ms", &self.speech_stopped_ms),
            ("final_transcript_ms", &self.final_transcript_ms),
            ("first_text_ms", &self.first_text_ms),
            ("first_audio_ms", &self.first_audio_ms),
            ("turn_total_ms", &self.turn_total_ms),
            ("interrupt_ms", &self.interrupt_ms),
            ("audio_stop_ms", &self.audio_stop_ms),
            ("echo_rtt_ms", &self.echo_rtt_ms),
        ]
    }
}

/// The aggregate of a load run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LoadReport {
    pub mode: Option<Mode>,
    pub sessions: usize,
    pub sessions_ok: usize,
    pub sessions_failed: usize,
    pub turns_completed: usize,
    pub turns_interrupted: usize,
    pub turns_failed: usize,
    pub turns_timed_out: usize,
    pub turns_cut: usize,
    /// Turns in which the replayer barged in.
    pub barge_ins: usize,
    pub frames_sent: u64,
    pub frames_received: u64,
    pub protocol_errors: u64,
    pub server_errors: u64,
    /// Counts by code over all sessions (see [`SessionReport::errors`]).
    pub errors: BTreeMap<String, u64>,
    pub metrics: MetricSummaries,
    /// Word error rate of the server's final transcripts over the turns whose WAV has a
    /// reference text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wer: Option<WerSummary>,
    /// The first failure reasons, `session K: why`.
    pub failures: Vec<String>,
    pub wall_ms: f64,
    /// The server's CPU, memory and counters over the run, when it was watched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<crate::server::ServerReport>,
    /// Every session's report, when asked for.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub session_reports: Vec<SessionReport>,
}

/// Recognition accuracy over the turns with a reference text.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct WerSummary {
    pub turns: usize,
    pub reference_words: usize,
    pub word_errors: usize,
    /// `word_errors / reference_words`.
    pub rate: f64,
}

impl WerSummary {
    /// Compares each turn's final transcript (none counts as empty) with its WAV's reference.
    pub fn from_sessions(reports: &[SessionReport], wavs: &[Wav]) -> Option<WerSummary> {
        let mut w = WerSummary::default();
        for turn in reports.iter().flat_map(|s| &s.turns) {
            let Some(reference) = wavs
                .iter()
                .find(|wav| wav.name == turn.wav)
                .and_then(|wav| wav.reference.as_deref())
            else {
                continue;
            };
            let heard = turn.user_transcript.as_deref().unwrap_or_default();
            w.turns += 1;
            w.reference_words += crate::wer::words(reference).len();
            w.word_errors += crate::wer::word_errors(reference, heard);
        }
        (w.turns > 0).then(|| WerSummary {
            rate: w.word_errors as f64 / w.reference_words.max(1) as f64,
            ..w
        })
    }
}

impl LoadReport {
    /// Aggregates session reports.
    pub fn from_sessions(mode: Mode, reports: &[SessionReport], wall: Duration) -> LoadReport {
        let mut r = LoadReport {
            mode: Some(mode),
            sessions: reports.len(),
            wall_ms: wall.as_secs_f64() * 1000.0,
            ..LoadReport::default()
        };
        let mut samples: [Vec<f64>; 8] = Default::default();
        for (k, s) in reports.iter().enumerate() {
            if s.ok {
                r.sessions_ok += 1;
            } else {
                r.sessions_failed += 1;
                if r.failures.len() < MAX_FAILURES_LISTED {
                    let why = s.failure.clone().unwrap_or_else(|| {
                        let codes: Vec<String> =
                            s.errors.iter().map(|(c, n)| format!("{c} x{n}")).collect();
                        format!("errors: {}", codes.join(", "))
                    });
                    r.failures.push(format!("session {k}: {why}"));
                }
            }
            r.frames_sent += s.frames_sent;
            r.frames_received += s.frames_received;
            r.protocol_errors += s.protocol_errors;
            r.server_errors += s.server_errors;
            for (code, n) in &s.errors {
                *r.errors.entry(code.clone()).or_default() += n;
            }
            samples[7].extend_from_slice(&s.echo_rtt_ms);
            for t in &s.turns {
                match t.outcome {
                    TurnOutcome::Completed => r.turns_completed += 1,
                    TurnOutcome::Interrupted => r.turns_interrupted += 1,
                    TurnOutcome::Failed => r.turns_failed += 1,
                    TurnOutcome::TimedOut => r.turns_timed_out += 1,
                    TurnOutcome::Cut => r.turns_cut += 1,
                }
                r.barge_ins += usize::from(t.barged_in);
                let m = &t.metrics;
                let values = [
                    m.speech_stopped_ms,
                    m.final_transcript_ms,
                    m.first_text_ms,
                    m.first_audio_ms,
                    m.turn_total_ms,
                    m.interrupt_ms,
                    m.audio_stop_ms,
                ];
                for (bucket, v) in samples.iter_mut().zip(values) {
                    bucket.extend(v);
                }
            }
        }
        let [a, b, c, d, e, f, g, h] = samples.map(|s| Summary::of(&s));
        r.metrics = MetricSummaries {
            speech_stopped_ms: a,
            final_transcript_ms: b,
            first_text_ms: c,
            first_audio_ms: d,
            turn_total_ms: e,
            interrupt_ms: f,
            audio_stop_ms: g,
            echo_rtt_ms: h,
        };
        r
    }

    /// True when every session ran cleanly: no failure, no protocol or server error.
    pub fn success(&self) -> bool {
        self.sessions_failed == 0 && self.protocol_errors == 0 && self.sessions > 0
    }

    /// The report as JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("reports hold plain data")
    }

    /// A human-readable table.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let mode = match self.mode {
            Some(Mode::Echo) => "echo",
            _ => "conversation",
        };
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "duplex-replay, {mode} mode: {} sessions ({} ok, {} failed) in {:.1} s",
            self.sessions,
            self.sessions_ok,
            self.sessions_failed,
            self.wall_ms / 1000.0
        );
        if mode == "conversation" {
            let _ = writeln!(
                out,
                "turns: {} completed, {} interrupted, {} failed, {} timed out, {} cut; {} barge-ins",
                self.turns_completed,
                self.turns_interrupted,
                self.turns_failed,
                self.turns_timed_out,
                self.turns_cut,
                self.barge_ins
            );
        }
        let _ = writeln!(
            out,
            "frames: {} sent, {} received; protocol errors: {}, server errors: {}",
            self.frames_sent, self.frames_received, self.protocol_errors, self.server_errors
        );
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<20} {:>8} {:>10} {:>10} {:>10} {:>10}",
            "metric (ms)", "count", "p50", "p95", "p99", "max"
        );
        let cell = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
        for (name, s) in self.metrics.rows() {
            if s.count == 0 {
                continue;
            }
            let name = name.trim_end_matches("_ms");
            let _ = writeln!(
                out,
                "{:<20} {:>8} {:>10} {:>10} {:>10} {:>10}",
                name,
                s.count,
                cell(s.p50),
                cell(s.p95),
                cell(s.p99),
                cell(s.max)
            );
        }
        if let Some(w) = &self.wer {
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "word error rate: {:.1} % ({} errors over {} reference words, {} turns)",
                w.rate * 100.0,
                w.word_errors,
                w.reference_words,
                w.turns
            );
        }
        if let Some(s) = &self.server {
            let na = |v: Option<f64>, unit: &str| {
                v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.1}{unit}"))
            };
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "server over {:.1} s: CPU {} of one core, peak RSS {}, LLM tokens/s {}, answer tokens/s {}",
                s.wall_s,
                na(s.cpu_percent, " %"),
                na(s.peak_rss_mib, " MiB"),
                na(s.llm_tokens_per_s, ""),
                na(s.answer_tokens_per_s, ""),
            );
            for (engine, ms) in &s.queue_wait_mean_ms {
                let _ = writeln!(out, "  mean queue wait, {engine}: {ms:.1} ms");
            }
        }
        if !self.errors.is_empty() {
            let _ = writeln!(out);
            let _ = writeln!(out, "{:<32} {:>8}", "error", "count");
            for (code, n) in &self.errors {
                let _ = writeln!(out, "{code:<32} {n:>8}");
            }
        }
        if !self.failures.is_empty() {
            let _ = writeln!(out);
            let _ = writeln!(out, "failures:");
            for f in &self.failures {
                let _ = writeln!(out, "  {f}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{TurnMetrics, TurnReport};

    fn turn(wav: &str, heard: Option<&str>) -> TurnReport {
        TurnReport {
            index: 0,
            wav: wav.into(),
            assistant_turn_id: None,
            outcome: TurnOutcome::Completed,
            audio_end_reason: None,
            barged_in: false,
            user_transcript: heard.map(Into::into),
            assistant_text: None,
            assistant_audio_ms: 0,
            interrupted: None,
            metrics: TurnMetrics::default(),
            timeline: Vec::new(),
        }
    }

    #[test]
    fn word_error_rate_covers_the_turns_with_a_reference() {
        let mut a = Wav::from_samples("a.wav", 16_000, vec![0; 320]).unwrap();
        a.reference = Some("what is the capital of France".into());
        let b = Wav::from_samples("b.wav", 16_000, vec![0; 320]).unwrap();
        let sessions = [SessionReport {
            turns: vec![
                turn("a.wav", Some("What is the capital and friends?")),
                turn("b.wav", Some("no reference: not counted")),
                // No transcript at all: every reference word is an error.
                turn("a.wav", None),
            ],
            ..SessionReport::default()
        }];
        let w = WerSummary::from_sessions(&sessions, &[a, b.clone()]).unwrap();
        assert_eq!((w.turns, w.reference_words, w.word_errors), (2, 12, 2 + 6));
        assert!((w.rate - 8.0 / 12.0).abs() < 1e-9);
        assert_eq!(WerSummary::from_sessions(&sessions, &[b]), None);
    }
}
