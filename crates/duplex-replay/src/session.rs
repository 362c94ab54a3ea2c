//! `run_session`: one scripted session against a server, measured.
//!
//! Conversation mode plays one WAV per user turn, paced like a microphone, and keeps sending
//! silence between turns (real clients never stop sending audio). It plays the assistant's
//! audio back on a virtual clock, reporting progress with `playback.mark` every
//! [`MARK_INTERVAL`], and starts the next turn when playback is over, or, in barge-in mode,
//! as soon as enough assistant audio has arrived. Echo mode measures the transport alone.
//!
//! Every latency is measured from the moment the turn's last speech frame was handed to the
//! socket ("end of user speech"); barge-in latencies from the moment the interrupting speech's
//! first frame was.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use duplex_proto::{
    AudioEndReason, AudioFormat, ClientMessage, Encoding, PlaybackMark, ServerMessage, SessionEnd,
    SessionStart,
};
use serde::Serialize;
use tokio::time::{Instant, sleep_until};

use crate::client::{Client, Event, EventKind};
use crate::error::{Error, Result};
use crate::wav::{FRAME_MS, Wav, silence_frame_as};

/// How often the virtual player reports its position while assistant audio plays.
pub const MARK_INTERVAL: Duration = Duration::from_millis(100);
/// Most frames sent in one go when the sender fell behind its clock (a stalled task): enough
/// to catch up a second of audio quickly, few enough that inbound events keep being read.
const MAX_CATCH_UP_FRAMES: usize = 50;

/// What a session exercises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// User turns, assistant replies, latencies per turn.
    Conversation,
    /// Frames against a `--providers echo` server: per-frame round trip only.
    Echo,
}

/// How to run one session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// `ws://HOST:PORT/v1/conversation`, query parameters allowed.
    pub url: String,
    pub mode: Mode,
    /// Encoding of the binary frames sent (and asked for in `session.start`).
    pub encoding: Encoding,
    /// Speech is sent at real time × `speed` (>= 1); 0 sends speech as fast as possible.
    /// Silence and virtual playback run at real time × `speed` (real time when 0).
    pub speed: f64,
    /// Barge-in mode: once this much assistant audio of a turn has arrived, send the next
    /// turn's speech at once.
    pub barge_in_after_ms: Option<u64>,
    /// User turns (conversation) or passes over the WAVs (echo); WAVs are used in a cycle.
    pub turns: usize,
    /// Longest wait from end of user speech to the end of the assistant's turn.
    pub turn_timeout: Duration,
    /// After a final `assistant_message` with no `assistant_audio.start` yet, how long to
    /// wait for audio before calling the turn text-only.
    pub no_audio_grace: Duration,
    /// Longest wait for `session.ready` after connecting.
    pub ready_timeout: Duration,
    /// The session stops (cleanly, unfinished turns marked `cut`) after this long.
    pub max_duration: Option<Duration>,
    /// Extra `session.start` fields (voice, model...); `sample_rate` is always the WAVs'.
    pub start: Option<SessionStart>,
    /// Keep a timeline of every event per turn (off for large load runs).
    pub record_timeline: bool,
    /// The virtual player plays assistant audio at real time × this (>= 1); `None`: at the
    /// pace of `speed`. Faster playback shortens a run without changing any latency measured
    /// from the end of speech to the first audio (the server's answer is complete by then).
    pub playback_speed: Option<f64>,
    /// Speak on a fixed beat: user turn k starts no earlier than `first + k × interval`
    /// (later if the previous answer is still playing). Sessions given the same schedule ask
    /// their questions together.
    pub schedule: Option<TurnSchedule>,
}

/// A fixed beat for the user turns of a session (see [`SessionConfig::schedule`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TurnSchedule {
    /// When the first turn's speech starts.
    pub first: Instant,
    pub interval: Duration,
}

impl TurnSchedule {
    /// The earliest moment user turn `k` (from 0) may start speaking.
    pub fn turn_at(&self, k: usize) -> Instant {
        self.first
            + self
                .interval
                .saturating_mul(u32::try_from(k).unwrap_or(u32::MAX))
    }
}

impl SessionConfig {
    /// Defaults: conversation, real time, one turn, 30 s turn timeout.
    pub fn new(url: impl Into<String>) -> SessionConfig {
        SessionConfig {
            url: url.into(),
            mode: Mode::Conversation,
            encoding: Encoding::Pcm16,
            speed: 1.0,
            barge_in_after_ms: None,
            turns: 1,
            // A real pipeline answers in 1-3 s; 30 s only trips on a stuck turn.
            turn_timeout: Duration::from_secs(30),
            // TTS first byte follows the final text by well under a second on any provider.
            no_audio_grace: Duration::from_secs(2),
            ready_timeout: Duration::from_secs(10),
            max_duration: None,
            start: None,
            record_timeline: true,
            playback_speed: None,
            schedule: None,
        }
    }

    /// Checks the configuration against the WAVs it will stream.
    pub fn validate(&self, wavs: &[Wav]) -> Result<()> {
        if !(self.speed == 0.0 || self.speed >= 1.0) || !self.speed.is_finite() {
            return Err(Error::Config(format!(
                "speed must be 0 (as fast as possible) or at least 1, got {}",
                self.speed
            )));
        }
        if self.turns == 0 {
            return Err(Error::Config("turns must be at least 1".into()));
        }
        let Some(first) = wavs.first() else {
            return Err(Error::Config("at least one WAV is needed".into()));
        };
        if let Some(other) = wavs.iter().find(|w| w.sample_rate != first.sample_rate) {
            return Err(Error::Config(format!(
                "all WAVs of a session must share one sample rate: {} is {} Hz, {} is {} Hz",
                first.name, first.sample_rate, other.name, other.sample_rate
            )));
        }
        if wavs.iter().any(|w| w.samples.is_empty()) {
            return Err(Error::Config("a WAV has no samples".into()));
        }
        if let Some(p) = self.playback_speed
            && !(p >= 1.0 && p.is_finite())
        {
            return Err(Error::Config(format!(
                "playback speed must be at least 1, got {p}"
            )));
        }
        if self.schedule.is_some_and(|s| s.interval.is_zero()) {
            return Err(Error::Config("turn interval must be above 0".into()));
        }
        Ok(())
    }

    fn pace(&self) -> f64 {
        if self.speed == 0.0 { 1.0 } else { self.speed }
    }
}

/// How a user turn ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TurnOutcome {
    /// The assistant's audio (or text-only answer) completed.
    Completed,
    /// The assistant's turn was interrupted (barge-in).
    Interrupted,
    /// The assistant's audio ended with reason `error`.
    Failed,
    /// No end of the assistant's turn within the turn timeout.
    TimedOut,
    /// The session ended (max duration, connection loss) before the turn did.
    Cut,
}

/// Latencies of one turn in milliseconds, from end of user speech unless noted. A value is
/// `None` when the event never came; it may be negative when it came before speech ended.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TurnMetrics {
    pub speech_stopped_ms: Option<f64>,
    pub final_transcript_ms: Option<f64>,
    pub first_text_ms: Option<f64>,
    pub first_audio_ms: Option<f64>,
    pub turn_total_ms: Option<f64>,
    /// From the first frame of the interrupting speech to `interrupted`.
    pub interrupt_ms: Option<f64>,
    /// From the first frame of the interrupting speech to the last assistant audio frame
    /// (0 when no audio arrived after it).
    pub audio_stop_ms: Option<f64>,
}

/// One line of a turn's timeline: `at_ms` relative to end of user speech. Client actions
/// start with `>`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimelineEntry {
    pub at_ms: f64,
    pub what: String,
}

/// What happened in one user turn.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TurnReport {
    pub index: usize,
    pub wav: String,
    pub assistant_turn_id: Option<u64>,
    pub outcome: TurnOutcome,
    pub audio_end_reason: Option<AudioEndReason>,
    /// Whether the next turn's speech was sent while this turn's audio was arriving.
    pub barged_in: bool,
    pub user_transcript: Option<String>,
    pub assistant_text: Option<String>,
    /// Milliseconds of assistant audio received for this turn.
    pub assistant_audio_ms: u64,
    /// The server's `interrupted` message for this turn, if it was interrupted.
    pub interrupted: Option<duplex_proto::Interrupted>,
    pub metrics: TurnMetrics,
    pub timeline: Vec<TimelineEntry>,
}

/// The outcome of one session.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SessionReport {
    pub session_id: Option<String>,
    /// No failure, no protocol error, no server error, no timed-out turn.
    pub ok: bool,
    /// Why the session could not run to the end, if it could not.
    pub failure: Option<String>,
    pub turns: Vec<TurnReport>,
    pub frames_sent: u64,
    /// Binary frames received, including those that arrive while the session closes.
    pub frames_received: u64,
    /// Echo mode: round trip of each frame, in order.
    pub echo_rtt_ms: Vec<f64>,
    /// Echo mode: when each frame of `echo_rtt_ms` was sent, in milliseconds since
    /// [`epoch`] (shared by every session of the process), for latency-over-time views.
    #[serde(skip)]
    pub echo_sent_ms: Vec<f64>,
    /// Counts by code: server `error` codes (`stt_error`...), `limit_exceeded`,
    /// `protocol.*` violations, `turn_timeout`, `echo.missing_replies`.
    pub errors: BTreeMap<String, u64>,
    /// Violations of the protocol by the server (invalid JSON, audio outside a turn...).
    pub protocol_errors: u64,
    /// `error` and `limit_exceeded` messages received.
    pub server_errors: u64,
    /// The server's close frame, if one arrived.
    pub close: Option<(u16, String)>,
    pub duration_ms: f64,
}

impl SessionReport {
    fn count(&mut self, code: &str) {
        self.count_n(code, 1);
    }

    fn count_n(&mut self, code: &str, n: u64) {
        *self.errors.entry(code.to_string()).or_default() += n;
    }

    fn protocol_error(&mut self, code: &str) {
        self.protocol_errors += 1;
        self.count(&format!("protocol.{code}"));
    }

    fn fail(&mut self, why: impl Into<String>) {
        // The first failure is the cause; later ones are consequences.
        if self.failure.is_none() {
            self.failure = Some(why.into());
        }
    }

    fn finish(&mut self, started: Instant) {
        self.duration_ms = ms(started.elapsed());
        self.ok = self.failure.is_none() && self.errors.is_empty();
    }
}

/// Runs one session to its end; never panics on server misbehaviour and never hangs (every
/// wait is bounded by the config's timeouts). Failures land in the report.
pub async fn run_session(cfg: &SessionConfig, wavs: &[Wav]) -> SessionReport {
    let started = Instant::now();
    let mut report = SessionReport::default();
    if let Err(e) = cfg.validate(wavs) {
        report.fail(e.to_string());
        report.finish(started);
        return report;
    }
    let deadline = cfg.max_duration.map(|d| started + d);
    let rate = wavs[0].sample_rate;
    let mut start = cfg.start.clone().unwrap_or(SessionStart {
        sample_rate: rate,
        encoding: Default::default(),
        language: None,
        voice: None,
        model: None,
        system_prompt: None,
        output_sample_rate: None,
        output_encoding: None,
    });
    start.sample_rate = rate;
    start.encoding = cfg.encoding;

    let mut client = match Client::connect(&cfg.url, Some(start)).await {
        Ok(c) => c,
        Err(e) => {
            report.count("connect_failed");
            report.fail(e.to_string());
            report.finish(started);
            return report;
        }
    };
    client.set_keep_log(false);

    let ready = match client.wait_ready(cfg.ready_timeout).await {
        Ok(r) => r,
        Err(e) => {
            match &e {
                Error::NotReady(_) | Error::BadServerJson { .. } => {
                    report.protocol_error("missing_session_ready")
                }
                _ => report.count("no_session_ready"),
            }
            report.fail(e.to_string());
            // An `error` explaining the refusal usually follows or is the reason: keep it.
            drain_errors(&mut client, &mut report).await;
            report.finish(started);
            return report;
        }
    };
    report.session_id = Some(ready.session_id.clone());

    match cfg.mode {
        Mode::Conversation => {
            let mut run = Conversation::new(cfg, wavs, deadline, &mut report);
            run.run(&mut client).await;
            report.turns = run.into_reports();
        }
        Mode::Echo => run_echo(cfg, wavs, deadline, &mut client, &mut report).await,
    }

    if report.close.is_none() && report.failure.is_none() {
        end_session(&mut client, &mut report).await;
    }
    report.finish(started);
    if let Some(why) = &report.failure {
        tracing::debug!(session_id = ?report.session_id, %why, "session failed");
    }
    report
}

/// Sends `session.end` and waits (bounded) for the server's normal close.
async fn end_session(client: &mut Client, report: &mut SessionReport) {
    if client
        .send_json(&ClientMessage::SessionEnd(SessionEnd {}))
        .await
        .is_err()
    {
        return;
    }
    let deadline = Instant::now() + crate::client::CLOSE_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.next_event(left).await {
            Ok(Some(Event {
                kind: EventKind::Close(c),
                ..
            })) => {
                report.close = c;
                return;
            }
            // Audio already on its way when the session ended (the server keeps up to its
            // audio lead in flight) still arrived: count it, so that frames received can be
            // compared with what the server says it sent.
            Ok(Some(Event {
                kind: EventKind::Audio(_),
                ..
            })) => report.frames_received += 1,
            Ok(Some(ev)) => count_error_event(&ev, report),
            Err(Error::BadServerJson { .. }) => report.protocol_error("bad_json"),
            Ok(None) | Err(_) => return,
        }
    }
}

/// After a failed start, collects the `error` messages already on their way (briefly).
async fn drain_errors(client: &mut Client, report: &mut SessionReport) {
    // The server sends its error and closes at once; 200 ms is plenty on loopback and short
    // enough not to matter when nothing comes.
    let deadline = Instant::now() + Duration::from_millis(200);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.next_event(left).await {
            Ok(Some(Event {
                kind: EventKind::Close(c),
                ..
            })) => {
                report.close = c;
                return;
            }
            Ok(Some(ev)) => count_error_event(&ev, report),
            Err(Error::BadServerJson { .. }) => report.protocol_error("bad_json"),
            Ok(None) | Err(_) => return,
        }
    }
}

/// Counts `error` / `limit_exceeded` messages; a fatal error fails the session.
fn count_error_event(ev: &Event, report: &mut SessionReport) {
    match ev.json() {
        Some(ServerMessage::Error(e)) => {
            report.server_errors += 1;
            report.count(e.code.as_str());
            if e.fatal {
                report.fail(format!("fatal error {}: {}", e.code.as_str(), e.message));
            }
        }
        Some(ServerMessage::LimitExceeded(l)) => {
            report.server_errors += 1;
            report.count("limit_exceeded");
            report.fail(format!(
                "limit exceeded: {} ({} of {})",
                l.limit, l.used, l.allowed
            ));
        }
        _ => {}
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Signed milliseconds from `reference` to `at`.
/// The process-wide reference instant of [`SessionReport::echo_sent_ms`]: set by the first
/// call.
pub fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn rel(at: Instant, reference: Instant) -> f64 {
    if at >= reference {
        ms(at - reference)
    } else {
        -ms(reference - at)
    }
}

fn bytes_per_ms(format: AudioFormat) -> f64 {
    f64::from(format.sample_rate) * format.encoding.bytes_per_sample() as f64 / 1000.0
}

// ---------------------------------------------------------------------------------------------
// Conversation mode
// ---------------------------------------------------------------------------------------------

/// Everything observed about one user turn, as instants; turned into a report at the end.
#[derive(Default)]
struct Turn {
    wav: usize,
    started_at: Option<Instant>,
    speech_end_at: Option<Instant>,
    assistant_id: Option<u64>,
    speech_stopped_at: Option<Instant>,
    final_transcript_at: Option<Instant>,
    first_text_at: Option<Instant>,
    final_text_at: Option<Instant>,
    audio_start_at: Option<Instant>,
    first_audio_at: Option<Instant>,
    last_audio_at: Option<Instant>,
    audio_end_at: Option<Instant>,
    interrupted_at: Option<Instant>,
    interrupted: Option<duplex_proto::Interrupted>,
    audio_end_reason: Option<AudioEndReason>,
    audio_bytes: u64,
    bytes_per_ms: f64,
    barge_at: Option<Instant>,
    done: Option<(Instant, TurnOutcome)>,
    playback_done: bool,
    next_mark_at: Option<Instant>,
    last_mark_ms: Option<u64>,
    transcript: Option<String>,
    text: Option<String>,
    timeline: Vec<(Instant, String)>,
}

impl Turn {
    fn audio_ms(&self) -> u64 {
        if self.bytes_per_ms > 0.0 {
            (self.audio_bytes as f64 / self.bytes_per_ms) as u64
        } else {
            0
        }
    }

    /// Milliseconds the virtual player has played at `now`.
    fn played_ms(&self, now: Instant, pace: f64) -> u64 {
        match self.first_audio_at {
            Some(first) => ((ms(now - first) * pace) as u64).min(self.audio_ms()),
            None => 0,
        }
    }
}

/// The speech currently being sent.
struct Speech {
    turn: usize,
    frames: Vec<Vec<u8>>,
    next: usize,
    /// The turn this speech barges in on, stamped when the first frame goes out.
    barges_in_on: Option<usize>,
}

struct Conversation<'a> {
    cfg: &'a SessionConfig,
    wavs: &'a [Wav],
    report: &'a mut SessionReport,
    deadline: Option<Instant>,
    turns: Vec<Turn>,
    /// The latest user turn started: VAD and transcript events belong to it.
    current: usize,
    speech: Option<Speech>,
    silence: Vec<u8>,
    next_send: Instant,
    speech_period: Duration,
    silence_period: Duration,
    /// Virtual playback runs at real time × this.
    playback_pace: f64,
    /// The assistant audio stream open now: its turn id and the user turn it answers (None
    /// for an extra response the runner cannot place).
    active_audio: Option<(u64, Option<usize>)>,
    finished: bool,
}

impl<'a> Conversation<'a> {
    fn new(
        cfg: &'a SessionConfig,
        wavs: &'a [Wav],
        deadline: Option<Instant>,
        report: &'a mut SessionReport,
    ) -> Self {
        let frame = Duration::from_millis(u64::from(FRAME_MS));
        let pace = cfg.pace();
        let playback_pace = cfg.playback_speed.unwrap_or(pace);
        Conversation {
            cfg,
            wavs,
            report,
            deadline,
            turns: Vec::new(),
            current: 0,
            speech: None,
            silence: silence_frame_as(wavs[0].sample_rate, cfg.encoding),
            next_send: Instant::now(),
            speech_period: if cfg.speed == 0.0 {
                Duration::ZERO
            } else {
                frame.div_f64(pace)
            },
            silence_period: frame.div_f64(pace),
            playback_pace,
            active_audio: None,
            finished: false,
        }
    }

    fn begin_turn(&mut self, barges_in_on: Option<usize>) {
        let index = self.turns.len();
        let wav = index % self.wavs.len();
        self.turns.push(Turn {
            wav,
            ..Turn::default()
        });
        self.current = index;
        self.speech = Some(Speech {
            turn: index,
            frames: self.wavs[wav].frames_as(self.cfg.encoding),
            next: 0,
            barges_in_on,
        });
        // Speech replaces the silence stream from the next frame slot on; a barge-in starts now.
        if barges_in_on.is_some() {
            self.next_send = Instant::now();
        }
    }

    async fn run(&mut self, client: &mut Client) {
        if let Some(s) = self.cfg.schedule
            && let Err(e) = self.silence_until(client, s.turn_at(0)).await
        {
            self.report.fail(format!("send failed: {e}"));
            self.finished = true;
        }
        if !self.finished {
            self.begin_turn(None);
        }
        while !self.finished {
            let wake = self.next_wake();
            tokio::select! {
                ev = client.recv_event() => self.on_event(ev),
                _ = sleep_until(wake) => {}
            }
            if self.finished {
                break;
            }
            if let Err(e) = self.send_due(client).await {
                self.report.fail(format!("send failed: {e}"));
                break;
            }
            if let Err(e) = self.send_marks(client).await {
                self.report.fail(format!("send failed: {e}"));
                break;
            }
            self.advance();
        }
        // Whatever is still open did not finish: connection loss or deadline.
        let now = Instant::now();
        for t in &mut self.turns {
            if t.done.is_none() {
                t.done = Some((now, TurnOutcome::Cut));
            }
        }
    }

    /// Before the first turn of a schedule: silence on the frame grid until `until` (or the
    /// deadline). Events wait in the client's queue and are read once the turn has begun.
    async fn silence_until(&mut self, client: &mut Client, until: Instant) -> Result<()> {
        let until = self.deadline.map_or(until, |d| until.min(d));
        while self.next_send < until {
            sleep_until(self.next_send).await;
            client.send_audio(&self.silence).await?;
            self.report.frames_sent += 1;
            self.next_send += self.silence_period;
        }
        sleep_until(until).await;
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            self.finished = true;
        }
        Ok(())
    }

    /// Whether user turn `k` may start now (always, without a schedule).
    fn turn_due(&self, k: usize, now: Instant) -> bool {
        self.cfg.schedule.is_none_or(|s| now >= s.turn_at(k))
    }

    fn next_wake(&self) -> Instant {
        let mut wake = self.next_send;
        for t in &self.turns {
            if let Some(m) = t.next_mark_at {
                wake = wake.min(m);
            }
        }
        if let Some(d) = self.deadline {
            wake = wake.min(d);
        }
        wake
    }

    fn note(&mut self, turn: usize, at: Instant, what: impl Into<String>) {
        if self.cfg.record_timeline {
            self.turns[turn].timeline.push((at, what.into()));
        }
    }

    /// The user turn an assistant turn id belongs to: the one already carrying it, else the
    /// current user turn if it has none yet. `None`: an extra response (counted, not placed).
    fn attribute(&mut self, turn_id: u64) -> Option<usize> {
        if let Some(i) = self
            .turns
            .iter()
            .position(|t| t.assistant_id == Some(turn_id))
        {
            return Some(i);
        }
        let cur = &mut self.turns[self.current];
        if cur.assistant_id.is_none() {
            cur.assistant_id = Some(turn_id);
            return Some(self.current);
        }
        None
    }

    fn on_event(&mut self, ev: Result<Event>) {
        let ev = match ev {
            Ok(ev) => ev,
            Err(Error::BadServerJson { text, .. }) => {
                self.report.protocol_error("bad_json");
                let cur = self.current;
                self.note(cur, Instant::now(), format!("invalid server JSON: {text}"));
                return;
            }
            Err(e) => {
                self.report.fail(format!("connection lost: {e}"));
                self.finished = true;
                return;
            }
        };
        let at = ev.at;
        let cur = self.current;
        match ev.kind {
            EventKind::Audio(bytes) => {
                self.report.frames_received += 1;
                match self.active_audio {
                    Some((_, Some(i))) => {
                        let t = &mut self.turns[i];
                        t.first_audio_at.get_or_insert(at);
                        t.last_audio_at = Some(at);
                        t.audio_bytes += bytes.len() as u64;
                        if t.next_mark_at.is_none() && !t.playback_done {
                            t.next_mark_at = Some(at + MARK_INTERVAL);
                        }
                        if self.cfg.record_timeline {
                            let what = format!("audio({})", bytes.len());
                            self.note(i, at, what);
                        }
                    }
                    Some((_, None)) => {}
                    None => {
                        self.report.protocol_error("audio_outside_turn");
                        self.note(cur, at, "audio outside assistant_audio.start/end");
                    }
                }
            }
            EventKind::Close(c) => {
                let what = match &c {
                    Some((code, reason)) => format!("server closed the session: {code} {reason}"),
                    None => "server closed the session".to_string(),
                };
                self.note(cur, at, what.clone());
                self.report.close = c;
                self.report.fail(what);
                self.finished = true;
            }
            EventKind::Json(msg) => self.on_message(at, msg),
        }
    }

    fn on_message(&mut self, at: Instant, msg: ServerMessage) {
        let cur = self.current;
        let label = crate::client::message_type(&msg);
        let mut place = cur;
        match &msg {
            ServerMessage::SessionReady(_) => self.report.protocol_error("duplicate_session_ready"),
            ServerMessage::SpeechStarted(_)
            | ServerMessage::UsageUpdate(_)
            | ServerMessage::Pong(_) => {}
            ServerMessage::SpeechStopped(_) => {
                self.turns[cur].speech_stopped_at.get_or_insert(at);
            }
            ServerMessage::UserTranscript(t) => {
                if t.is_final {
                    let turn = &mut self.turns[cur];
                    turn.final_transcript_at.get_or_insert(at);
                    turn.transcript = Some(t.text.clone());
                }
            }
            ServerMessage::AssistantMessage(m) => {
                if let Some(i) = self.attribute(m.turn_id) {
                    place = i;
                    let t = &mut self.turns[i];
                    if m.delta.is_some() {
                        t.first_text_at.get_or_insert(at);
                    }
                    if m.is_final {
                        t.final_text_at.get_or_insert(at);
                        t.text = m.text.clone();
                    }
                }
            }
            ServerMessage::AssistantAudioStart(s) => {
                if self.active_audio.is_some() {
                    self.report.protocol_error("audio_start_while_active");
                }
                let placed = self.attribute(s.turn_id);
                if let Some(i) = placed {
                    place = i;
                    let t = &mut self.turns[i];
                    t.audio_start_at.get_or_insert(at);
                    t.bytes_per_ms = bytes_per_ms(s.format);
                }
                self.active_audio = Some((s.turn_id, placed));
            }
            ServerMessage::AssistantAudioEnd(e) => match self.active_audio {
                Some((id, placed)) if id == e.turn_id => {
                    self.active_audio = None;
                    if let Some(i) = placed {
                        place = i;
                        let t = &mut self.turns[i];
                        t.audio_end_at.get_or_insert(at);
                        t.audio_end_reason = Some(e.reason);
                        if e.reason == AudioEndReason::Interrupted {
                            // The server dropped the rest: the player stops where it is.
                            t.playback_done = true;
                            t.next_mark_at = None;
                        }
                    }
                }
                _ => self.report.protocol_error("audio_end_without_start"),
            },
            ServerMessage::Interrupted(x) => {
                if let Some(i) = self.attribute(x.turn_id) {
                    place = i;
                    let t = &mut self.turns[i];
                    t.interrupted_at.get_or_insert(at);
                    t.interrupted.get_or_insert_with(|| x.clone());
                    // The player stops at once: no further marks for this turn.
                    t.playback_done = true;
                    t.next_mark_at = None;
                }
            }
            ServerMessage::Error(_) | ServerMessage::LimitExceeded(_) => {
                let ev = Event {
                    at,
                    kind: EventKind::Json(msg.clone()),
                };
                count_error_event(&ev, self.report);
            }
        }
        if self.cfg.record_timeline {
            let what = match &msg {
                ServerMessage::Error(e) => format!("error {}", e.code.as_str()),
                ServerMessage::AssistantAudioEnd(e) => format!("{label} {:?}", e.reason),
                ServerMessage::UserTranscript(t) if t.is_final => format!("{label} final"),
                ServerMessage::AssistantMessage(m) if m.is_final => format!("{label} final"),
                _ => label.to_string(),
            };
            self.note(place, at, what);
        }
    }

    /// Sends the frames whose time has come: speech if a turn is speaking, else silence.
    async fn send_due(&mut self, client: &mut Client) -> Result<()> {
        let mut sent = 0;
        while Instant::now() >= self.next_send && sent < MAX_CATCH_UP_FRAMES {
            sent += 1;
            let Some(sp) = &self.speech else {
                client.send_audio(&self.silence).await?;
                self.next_send += self.silence_period;
                self.report.frames_sent += 1;
                continue;
            };
            client.send_audio(&sp.frames[sp.next]).await?;
            let now = Instant::now();
            let (turn, first, last) = (sp.turn, sp.next == 0, sp.next + 1 == sp.frames.len());
            let barged = sp.barges_in_on;
            self.report.frames_sent += 1;
            if first {
                self.turns[turn].started_at = Some(now);
                self.note(turn, now, "> speech start");
                if let Some(b) = barged {
                    self.turns[b].barge_at = Some(now);
                    self.note(b, now, "> barge-in speech start");
                }
            }
            if last {
                self.turns[turn].speech_end_at = Some(now);
                self.note(turn, now, "> speech end");
                self.speech = None;
            } else if let Some(sp) = &mut self.speech {
                sp.next += 1;
            }
            self.next_send += self.speech_period;
            if self.speech_period.is_zero() {
                // As fast as possible, but one frame per loop turn so events are read.
                self.next_send = now;
                break;
            }
        }
        Ok(())
    }

    /// Sends the `playback.mark`s that are due and closes finished playbacks.
    async fn send_marks(&mut self, client: &mut Client) -> Result<()> {
        let now = Instant::now();
        for i in 0..self.turns.len() {
            let t = &mut self.turns[i];
            let Some(turn_id) = t.assistant_id else {
                continue;
            };
            if t.playback_done || t.first_audio_at.is_none() {
                continue;
            }
            let played = t.played_ms(now, self.playback_pace);
            let all_arrived = t.audio_end_at.is_some();
            let finished = all_arrived && played >= t.audio_ms();
            let due = t.next_mark_at.is_some_and(|m| now >= m);
            if (due || finished) && t.last_mark_ms != Some(played) {
                t.last_mark_ms = Some(played);
                client
                    .send_json(&ClientMessage::PlaybackMark(PlaybackMark {
                        turn_id,
                        played_ms: played,
                    }))
                    .await?;
                self.note(i, now, format!("> playback.mark {played}"));
            }
            let t = &mut self.turns[i];
            if due {
                // Stay on the 100 ms grid from the first frame, skipping slots missed.
                let mut next = t.next_mark_at.expect("due implies a mark time") + MARK_INTERVAL;
                while next <= now {
                    next += MARK_INTERVAL;
                }
                t.next_mark_at = Some(next);
            }
            if finished {
                t.playback_done = true;
                t.next_mark_at = None;
            }
        }
        Ok(())
    }

    /// Closes turns that ended, starts the next turn or barges in, ends the session.
    fn advance(&mut self) {
        let now = Instant::now();
        if self.deadline.is_some_and(|d| now >= d) {
            self.finished = true;
            return;
        }
        for i in 0..self.turns.len() {
            let t = &self.turns[i];
            if t.done.is_some() {
                continue;
            }
            let Some(speech_end) = t.speech_end_at else {
                continue;
            };
            let done = if let Some(end) = t.audio_end_at {
                Some((
                    end,
                    match t.audio_end_reason {
                        Some(AudioEndReason::Interrupted) => TurnOutcome::Interrupted,
                        Some(AudioEndReason::Error) => TurnOutcome::Failed,
                        _ => TurnOutcome::Completed,
                    },
                ))
            } else if let (Some(x), None) = (t.interrupted_at, t.audio_start_at) {
                Some((x, TurnOutcome::Interrupted))
            } else if let (Some(f), None) = (t.final_text_at, t.audio_start_at) {
                (now >= f + self.cfg.no_audio_grace).then_some((f, TurnOutcome::Completed))
            } else if now >= speech_end + self.cfg.turn_timeout {
                self.report.count("turn_timeout");
                Some((now, TurnOutcome::TimedOut))
            } else {
                None
            };
            if let Some((at, outcome)) = done {
                let t = &mut self.turns[i];
                t.done = Some((at, outcome));
                if t.first_audio_at.is_none() || outcome == TurnOutcome::TimedOut {
                    t.playback_done = true;
                    t.next_mark_at = None;
                }
                let what = format!("turn {outcome:?}");
                self.note(i, at, what);
            }
        }

        let cur = &self.turns[self.current];
        let more = self.turns.len() < self.cfg.turns;
        if self.speech.is_none()
            && more
            && cur.done.is_none()
            && cur.barge_at.is_none()
            && let Some(after) = self.cfg.barge_in_after_ms
            && cur.first_audio_at.is_some()
            && cur.audio_ms() >= after
        {
            let on = self.current;
            self.begin_turn(Some(on));
            return;
        }
        let cur = &self.turns[self.current];
        if self.speech.is_none() && cur.done.is_some() && cur.playback_done {
            if more {
                if self.turn_due(self.turns.len(), now) {
                    self.begin_turn(None);
                }
            } else if self.turns.iter().all(|t| t.done.is_some()) {
                self.finished = true;
            }
        }
    }

    fn into_reports(self) -> Vec<TurnReport> {
        let wavs = self.wavs;
        self.turns
            .into_iter()
            .enumerate()
            .map(|(index, t)| {
                let (_, outcome) = t.done.expect("run() closes every turn");
                let reference = t.speech_end_at.or(t.started_at);
                let since_end = |x: Option<Instant>| Some(rel(x?, t.speech_end_at?));
                let since_barge = |x: Option<Instant>| Some(rel(x?, t.barge_at?));
                let ended = matches!(
                    outcome,
                    TurnOutcome::Completed | TurnOutcome::Interrupted | TurnOutcome::Failed
                );
                let metrics = TurnMetrics {
                    speech_stopped_ms: since_end(t.speech_stopped_at),
                    final_transcript_ms: since_end(t.final_transcript_at),
                    first_text_ms: since_end(t.first_text_at),
                    first_audio_ms: since_end(t.first_audio_at),
                    turn_total_ms: if ended {
                        since_end(t.done.map(|d| d.0))
                    } else {
                        None
                    },
                    interrupt_ms: since_barge(t.interrupted_at),
                    audio_stop_ms: t.barge_at.map(|b| match t.last_audio_at {
                        Some(last) => rel(last, b).max(0.0),
                        None => 0.0,
                    }),
                };
                let mut timeline: Vec<TimelineEntry> = t
                    .timeline
                    .iter()
                    .map(|(at, what)| TimelineEntry {
                        at_ms: reference.map_or(0.0, |r| rel(*at, r)),
                        what: what.clone(),
                    })
                    .collect();
                // Entries are noted when handled, not when they happened: order by time.
                timeline.sort_by(|a, b| a.at_ms.total_cmp(&b.at_ms));
                TurnReport {
                    index,
                    wav: wavs[t.wav].name.clone(),
                    assistant_turn_id: t.assistant_id,
                    outcome,
                    audio_end_reason: t.audio_end_reason,
                    barged_in: t.barge_at.is_some(),
                    user_transcript: t.transcript.clone(),
                    assistant_text: t.text.clone(),
                    assistant_audio_ms: t.audio_ms(),
                    interrupted: t.interrupted.clone(),
                    metrics,
                    timeline,
                }
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Echo mode
// ---------------------------------------------------------------------------------------------

/// Streams every frame of the WAVs (`turns` passes) and matches each binary reply to the
/// oldest unanswered frame.
async fn run_echo(
    cfg: &SessionConfig,
    wavs: &[Wav],
    deadline: Option<Instant>,
    client: &mut Client,
    report: &mut SessionReport,
) {
    let frame = Duration::from_millis(u64::from(FRAME_MS));
    let period = if cfg.speed == 0.0 {
        Duration::ZERO
    } else {
        frame.div_f64(cfg.speed)
    };
    let passes: Vec<Vec<Vec<u8>>> = wavs.iter().map(|w| w.frames_as(cfg.encoding)).collect();
    let mut order = (0..cfg.turns).flat_map(|i| passes[i % passes.len()].iter());
    let mut pending: VecDeque<Instant> = VecDeque::with_capacity(64);
    let mut next_send = Instant::now();
    // `validate` guarantees at least one non-empty WAV, so there is a first frame.
    let mut sending = true;
    // Replies still missing this long after the last frame count as lost.
    let mut drain_until: Option<Instant> = None;

    loop {
        let now = Instant::now();
        if !sending && pending.is_empty() {
            break;
        }
        if drain_until.is_some_and(|d| now >= d) {
            report.count_n("echo.missing_replies", pending.len() as u64);
            report.fail(format!("{} echo replies missing", pending.len()));
            break;
        }
        if sending && deadline.is_some_and(|d| now >= d) {
            sending = false;
            drain_until = Some(now + cfg.turn_timeout);
        }
        let wake = if sending {
            next_send
        } else {
            drain_until.unwrap_or(now)
        };
        tokio::select! {
            ev = client.recv_event() => match ev {
                Ok(Event { at, kind: EventKind::Audio(_) }) => {
                    report.frames_received += 1;
                    match pending.pop_front() {
                        Some(sent) => {
                            report.echo_rtt_ms.push(rel(at, sent));
                            report.echo_sent_ms.push(rel(sent, epoch()));
                        }
                        None => report.protocol_error("unexpected_echo"),
                    }
                }
                Ok(Event { kind: EventKind::Close(c), .. }) => {
                    report.fail(format!("server closed the session: {c:?}"));
                    report.close = c;
                    break;
                }
                Ok(ev) => count_error_event(&ev, report),
                Err(Error::BadServerJson { .. }) => report.protocol_error("bad_json"),
                Err(e) => {
                    report.fail(format!("connection lost: {e}"));
                    break;
                }
            },
            _ = sleep_until(wake) => {
                if !sending {
                    continue;
                }
                let sent_at = Instant::now();
                let Some(bytes) = order.next() else {
                    sending = false;
                    drain_until = Some(sent_at + cfg.turn_timeout);
                    continue;
                };
                if let Err(e) = client.send_audio(bytes).await {
                    report.fail(format!("send failed: {e}"));
                    break;
                }
                pending.push_back(sent_at);
                report.frames_sent += 1;
                next_send = if period.is_zero() { Instant::now() } else { next_send + period };
            }
        }
    }
}
