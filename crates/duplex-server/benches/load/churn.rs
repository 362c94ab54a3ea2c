//! The churn driver of the soak: `sessions` concurrent conversations against a running server,
//! each a short life of spoken turns with pauses, some barging in, ended by a clean close or an
//! abrupt TCP close (no close frame), and replaced by a new connection at once, so the number
//! of open sessions stays about constant until the caller cancels `stop`.
//!
//! Shared by the `soak` scenario of the load bench (`benches/load/soak.rs`) and the short soak
//! test (`tests/soak`), which include this file with `#[path]`. Per session it records the
//! time the client held it — from `session.ready` to the moment it sent its close frame, dropped
//! the socket, or saw the server's close — which the callers compare with the seconds the store
//! metered.
//!
//! Audio is PCM16 at 16 kHz sent in real time in 100 ms messages (an open microphone: speech,
//! then silence while waiting and pausing). 100 ms rather than 20 ms keeps the client's own CPU
//! low enough to run hundreds of sessions on the machine under test.
#![allow(dead_code)] // each includer uses a different part of the report

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use duplex_proto::{AudioEndReason, Encoding, ServerMessage, SessionStart};
use duplex_replay::client::{Client, EventKind};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The client's input rate: the server's internal rate, no resampling.
pub const RATE: u32 = 16_000;
/// One audio message: 100 ms of PCM16 at [`RATE`].
pub const CHUNK: Duration = Duration::from_millis(100);
const CHUNK_BYTES: usize = (RATE as usize / 10) * 2;
/// `session.ready` normally comes within milliseconds; on a saturated machine it may take
/// seconds, beyond this the attempt counts as `not_ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Pause before the next connection attempt after a failed one, so a refusing server is not
/// hammered in a tight loop.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// How the sessions behave. Durations are drawn uniformly from the ranges.
#[derive(Clone)]
pub struct ChurnConfig {
    pub url: String,
    /// Concurrent sessions (slots); a gone session is replaced at once.
    pub sessions: usize,
    /// Slots start evenly over this ramp.
    pub ramp: Duration,
    /// PCM16 little-endian bytes at [`RATE`] of one utterance (with its leading silence).
    pub speech: Arc<Vec<u8>>,
    /// How long one session lives from `session.ready` before it ends itself.
    pub life: (Duration, Duration),
    /// Silence between the end of a reply and the next utterance.
    pub pause: (Duration, Duration),
    /// The chance that the user speaks again while a reply is playing (a barge-in), once
    /// `barge_after` of it has arrived.
    pub barge_in: f64,
    pub barge_after: (Duration, Duration),
    /// The chance that a session ends with a TCP close (no close frame) instead of a clean
    /// close. Its end time is random, so it is usually mid-turn.
    pub abrupt: f64,
    /// A reply not finished this long after the utterance ended counts as timed out and the
    /// user speaks again.
    pub reply_timeout: Duration,
    pub seed: u64,
}

/// Counters the caller may read while the run goes on.
#[derive(Default)]
pub struct ChurnStats {
    pub connects: AtomicU64,
    pub connect_failed: AtomicU64,
    /// Connected but no `session.ready` within [`READY_TIMEOUT`] (or an error instead).
    pub not_ready: AtomicU64,
    /// Sessions that got `session.ready` and are not yet finished.
    pub open: AtomicU64,
    /// Sessions that got `session.ready` and ended, by any of the three ways below.
    pub completed: AtomicU64,
    pub clean_closes: AtomicU64,
    pub abrupt_closes: AtomicU64,
    /// The server closed first (its close code and reason in [`ChurnStats::server_close_codes`]).
    pub server_closes: AtomicU64,
    pub turns_spoken: AtomicU64,
    pub replies_complete: AtomicU64,
    pub replies_timed_out: AtomicU64,
    /// Utterances started while the assistant was speaking.
    pub barge_ins: AtomicU64,
    /// `interrupted` messages received.
    pub interrupted: AtomicU64,
    pub errors_received: AtomicU64,
    /// Sum over finished sessions of the time the client held them, in microseconds.
    pub held_us: AtomicU64,
    pub server_close_codes: Mutex<BTreeMap<String, u64>>,
    pub error_codes: Mutex<BTreeMap<String, u64>>,
}

impl ChurnStats {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    pub fn held_secs(&self) -> f64 {
        Self::get(&self.held_us) as f64 / 1e6
    }

    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    fn count(map: &Mutex<BTreeMap<String, u64>>, key: String) {
        *map.lock()
            .expect("never poisoned: no panics while held")
            .entry(key)
            .or_default() += 1;
    }

    /// A one-line summary.
    pub fn line(&self) -> String {
        let g = Self::get;
        format!(
            "connects {} (failed {}, not ready {}), completed {} (clean {}, abrupt {}, by server {}), \
             turns {} (replies {}, timed out {}), barge-ins {} (interrupted {}), errors {}",
            g(&self.connects),
            g(&self.connect_failed),
            g(&self.not_ready),
            g(&self.completed),
            g(&self.clean_closes),
            g(&self.abrupt_closes),
            g(&self.server_closes),
            g(&self.turns_spoken),
            g(&self.replies_complete),
            g(&self.replies_timed_out),
            g(&self.barge_ins),
            g(&self.interrupted),
            g(&self.errors_received),
        )
    }

    pub fn map_line(map: &Mutex<BTreeMap<String, u64>>) -> String {
        let map = map.lock().expect("never poisoned");
        if map.is_empty() {
            return "none".into();
        }
        map.iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// SplitMix64: a seeded generator for the sessions' choices (a run replays its plan).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    fn between(&mut self, (lo, hi): (Duration, Duration)) -> Duration {
        lo + (hi.saturating_sub(lo)).mul_f64(self.unit())
    }
}

/// Runs every slot until `stop` is cancelled, then closes the open sessions cleanly and
/// returns once all have ended (each close is bounded by the client's close timeout).
pub async fn run(cfg: ChurnConfig, stats: Arc<ChurnStats>, stop: CancellationToken) {
    let cfg = Arc::new(cfg);
    let mut slots = tokio::task::JoinSet::new();
    for slot in 0..cfg.sessions {
        let (cfg, stats, stop) = (Arc::clone(&cfg), Arc::clone(&stats), stop.clone());
        slots.spawn(async move {
            let offset = cfg.ramp.mul_f64(slot as f64 / cfg.sessions.max(1) as f64);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(offset) => {}
            }
            let mut rng = Rng(cfg.seed ^ (slot as u64).wrapping_mul(0xA24B_AED4_963E_E407));
            while !stop.is_cancelled() {
                one_session(&cfg, &stats, &mut rng, &stop).await;
            }
        });
    }
    while let Some(r) = slots.join_next().await {
        r.expect("a churn slot does not panic");
    }
}

enum Phase {
    /// Sending the utterance; the next chunk starts at this byte.
    Speaking(usize),
    /// Utterance sent, silence; `barge` is when to speak over the reply (after that much of
    /// its audio arrived), if this turn barges in.
    Waiting {
        since: Instant,
        barge: Option<Duration>,
        audio_ms: u64,
    },
    Pausing(Instant),
}

enum End {
    Clean,
    Abrupt,
    /// The server closed (or the socket failed) at this instant.
    Server(Instant, String),
}

async fn one_session(
    cfg: &ChurnConfig,
    stats: &ChurnStats,
    rng: &mut Rng,
    stop: &CancellationToken,
) {
    ChurnStats::add(&stats.connects, 1);
    let start = SessionStart {
        sample_rate: RATE,
        encoding: Encoding::Pcm16,
        language: None,
        voice: None,
        model: None,
        system_prompt: None,
        output_sample_rate: None,
        output_encoding: None,
    };
    let mut client = match Client::connect(&cfg.url, Some(start)).await {
        Ok(c) => c,
        Err(_) => {
            ChurnStats::add(&stats.connect_failed, 1);
            tokio::time::sleep(RETRY_PAUSE).await;
            return;
        }
    };
    client.set_keep_log(false);
    let ready_at = match client.next_event(READY_TIMEOUT).await {
        Ok(Some(e)) if matches!(e.json(), Some(ServerMessage::SessionReady(_))) => e.at,
        other => {
            ChurnStats::add(&stats.not_ready, 1);
            let why = match &other {
                Ok(Some(e)) => match e.json() {
                    Some(ServerMessage::Error(err)) => {
                        format!("before ready: {}", err.code.as_str())
                    }
                    _ => format!("before ready: {}", e.label()),
                },
                Ok(None) => "no session.ready in time".into(),
                Err(_) => "closed before session.ready".into(),
            };
            ChurnStats::count(&stats.error_codes, why);
            drop(client);
            tokio::time::sleep(RETRY_PAUSE).await;
            return;
        }
    };
    ChurnStats::add(&stats.open, 1);
    let life_end = ready_at + rng.between(cfg.life);
    let abrupt = rng.chance(cfg.abrupt);
    let silence = vec![0u8; CHUNK_BYTES];
    let mut phase = Phase::Pausing(ready_at + rng.between(cfg.pause));
    let mut tick = tokio::time::interval_at(ready_at, CHUNK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let end = loop {
        tokio::select! {
            _ = stop.cancelled() => break End::Clean,
            event = client.recv_event() => {
                let Ok(event) = event else {
                    break End::Server(Instant::now(), "socket gone".into());
                };
                match &event.kind {
                    EventKind::Close(c) => {
                        let why = c.as_ref().map_or("no close frame".into(), |(code, r)| format!("{code} {r}"));
                        break End::Server(event.at, why);
                    }
                    EventKind::Audio(frame) => {
                        if let Phase::Waiting { audio_ms, .. } = &mut phase {
                            // 20 ms of PCM16 at 16 kHz is 640 bytes.
                            *audio_ms += frame.len() as u64 / 32;
                        }
                    }
                    EventKind::Json(m) => match m {
                        ServerMessage::AssistantAudioEnd(end) => {
                            // Also ends a turn that meant to barge in but whose reply was
                            // shorter than `barge_after`.
                            if matches!(phase, Phase::Waiting { .. }) {
                                if end.reason == AudioEndReason::Complete {
                                    ChurnStats::add(&stats.replies_complete, 1);
                                }
                                phase = Phase::Pausing(Instant::now() + rng.between(cfg.pause));
                            }
                        }
                        ServerMessage::Interrupted(_) => ChurnStats::add(&stats.interrupted, 1),
                        ServerMessage::Error(e) => {
                            ChurnStats::add(&stats.errors_received, 1);
                            ChurnStats::count(&stats.error_codes, e.code.as_str().to_owned());
                        }
                        _ => {}
                    },
                }
            }
            at = tick.tick() => {
                if at >= life_end {
                    break if abrupt { End::Abrupt } else { End::Clean };
                }
                let chunk: &[u8] = match &mut phase {
                    Phase::Speaking(pos) => {
                        let from = *pos;
                        let to = (from + CHUNK_BYTES).min(cfg.speech.len());
                        *pos = to;
                        if to == cfg.speech.len() {
                            let barge = rng.chance(cfg.barge_in).then(|| rng.between(cfg.barge_after));
                            phase = Phase::Waiting { since: at, barge, audio_ms: 0 };
                        }
                        &cfg.speech[from..to]
                    }
                    Phase::Waiting { since, barge, audio_ms } => {
                        if barge.is_some_and(|b| *audio_ms >= b.as_millis() as u64) {
                            ChurnStats::add(&stats.barge_ins, 1);
                            ChurnStats::add(&stats.turns_spoken, 1);
                            phase = Phase::Speaking(0);
                        } else if at.duration_since(*since) > cfg.reply_timeout {
                            ChurnStats::add(&stats.replies_timed_out, 1);
                            phase = Phase::Pausing(at);
                        }
                        &silence
                    }
                    Phase::Pausing(until) => {
                        if at >= *until {
                            ChurnStats::add(&stats.turns_spoken, 1);
                            phase = Phase::Speaking(0);
                        }
                        &silence
                    }
                };
                if client.send_audio(chunk).await.is_err() {
                    break End::Server(Instant::now(), "send failed".into());
                }
            }
        }
    };
    let held = match end {
        End::Clean => {
            let at = Instant::now();
            let _ = client.close().await;
            ChurnStats::add(&stats.clean_closes, 1);
            at - ready_at
        }
        End::Abrupt => {
            let at = Instant::now();
            // Dropping the client aborts its reader and drops both halves of the socket: a
            // TCP FIN without a WebSocket close frame.
            drop(client);
            ChurnStats::add(&stats.abrupt_closes, 1);
            at - ready_at
        }
        End::Server(at, why) => {
            ChurnStats::add(&stats.server_closes, 1);
            ChurnStats::count(&stats.server_close_codes, why);
            at - ready_at
        }
    };
    ChurnStats::add(&stats.held_us, held.as_micros() as u64);
    ChurnStats::add(&stats.completed, 1);
    stats.open.fetch_sub(1, Ordering::Relaxed);
}
