//! The rules of one duplex connection as one pure state machine, [`Session`].
//!
//! A session composes the pure parts of duplex — the audio front end (`duplex_audio::FrontEnd`)
//! and its mirror for assistant audio (`OutputStage`), the conversation core
//! (`duplex_core::Conversation`) and the meter (`duplex_metering::SessionMeter`) — with what
//! ties them together: the connection's lifecycle (admission, waiting for `session.start`, the
//! pre-start and idle deadlines, drain on shutdown, close, writing the final usage), start
//! validation, turn admission (the plan's meter and the per-user rate limit), prompt and budget
//! assembly, STT failure backoff and every answer to bad input.
//!
//! It does no IO and reads no clock, in the style of sans-IO protocol machines:
//!
//! ```text
//!   Input (client message, audio frame,        ┌─────────┐   Command (send JSON/audio, close,
//!   transcript, token, synthesized audio,  ──► │ Session │ ──► feed/finalize STT, start/cancel
//!   store reply, switches, shutdown) + now     └─────────┘     a turn, synthesize, persist, …)
//!                                                   │
//!                                 poll_timeout() ◄──┘ handle_timeout(now)
//! ```
//!
//! The shell (duplex-server's `session` module) owns the socket, the provider streams and the
//! store; it feeds every event in with [`Session::handle_input`], sleeps until
//! [`Session::poll_timeout`], and carries out every [`Command`] from
//! [`Session::poll_command`]. The timeline tests in `tests.rs` drive the machine with a made-up
//! clock: every cross-machine rule (barge-in during a metered turn, limit reached while the
//! assistant speaks, drain during a turn, STT failure mid-utterance, a slow consumer during a
//! turn) and every bad input is tested there without sockets or a runtime.

mod machine;
mod rng;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

pub use duplex_audio::VadMode;
pub use duplex_core::conversation::{HistoryEntry, Speaker, Stage, TurnId};
pub use duplex_metering::{
    Plan, ProviderUsage, Switches, UnixMs, UsageDelta, UsageTotals, UserTurnLimiter,
};
pub use machine::Session;

/// Outbound audio frames are 20 ms, like the inbound analysis frames.
pub const OUT_FRAME_MS: u32 = 20;
/// Longest `ping` `id` echoed in a `pong` (a client must not make the server queue copies of
/// its own large strings); longer ids get `invalid_message`.
pub const MAX_PING_ID_BYTES: usize = 128;
/// After `session.end`, how long messages already in flight still get answered
/// (`session_ended`) before the close frame.
pub const END_LINGER: Duration = Duration::from_millis(250);
/// A failed STT stream is reopened after this, doubling with each consecutive failure up to
/// [`STT_REOPEN_MAX`] (with jitter), so that a bad key or a provider outage does not become a
/// reconnect loop per session. The first retry is quick: a single dropped stream should cost
/// the user at most a fraction of a second of speech.
pub const STT_REOPEN_FIRST: Duration = Duration::from_millis(100);
pub const STT_REOPEN_MAX: Duration = Duration::from_secs(10);
/// When the STT input queue is full of audio, a `Finalize` is retried this often until it
/// fits (the recognizer drains ~50 frames a second).
pub const FINALIZE_RETRY: Duration = Duration::from_millis(20);
/// On shutdown, the part of the grace period kept for writing the final usage after the turn
/// in progress (at most half the grace period): the server waits for its sessions only that
/// long, and usage written after it would be lost.
pub const DRAIN_WRITE_RESERVE: Duration = Duration::from_secs(2);
/// At most one `audio_too_fast` error per this interval (the excess frames are all dropped
/// and counted, but the client is not answered frame by frame).
pub const AUDIO_TOO_FAST_ERROR_EVERY: Duration = Duration::from_secs(1);
/// Default [`SessionConfig::final_write_timeout`].
pub const DEFAULT_FINAL_WRITE_TIMEOUT: Duration = Duration::from_secs(15);

/// Everything a session is configured with (from the server's configuration and the engines).
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub session_id: String,
    /// The engines' names (announced in `session.ready`, labels of latency metrics); `None`:
    /// echo mode (every binary frame back after the front end ran on it, no conversation).
    pub engines: Option<duplex_proto::ProviderNames>,
    /// Used when `session.start` brings none.
    pub system_prompt: String,
    /// How far assistant audio may run ahead of the client's playhead.
    pub audio_lead: Duration,
    /// See `duplex_core::ConversationConfig::first_chunk_wait`.
    pub first_chunk_wait: Option<Duration>,
    pub vad_mode: VadMode,
    /// Voiced audio needed to declare speech.
    pub speech_start: Duration,
    /// Silence that ends the user's turn.
    pub end_of_turn: Duration,
    /// Longest user turn before it is ended anyway.
    pub max_turn: Duration,
    /// No client message for this long closes the session.
    pub idle_timeout: Duration,
    /// No `session.start` within this long of connecting closes the connection.
    pub pre_start_timeout: Duration,
    /// On shutdown, how long a turn in progress may run before the close.
    pub shutdown_grace: Duration,
    /// For the `message_too_large` error's text (the reader enforces the limit).
    pub max_message_bytes: usize,
    /// Longest accepted `input.text`, in characters.
    pub max_input_text_chars: usize,
    /// How far the client's audio may run ahead of the time since `session.ready` (a burst
    /// after a network stall); beyond it frames are dropped with `audio_too_fast`. `None`: no
    /// bound.
    pub max_audio_ahead: Option<Duration>,
    /// Whether the plan (its name) offers the model a client asks for in `session.start`;
    /// `Err` says why not (the plan's default then applies). `None`: any name is passed on.
    pub model_check: Option<ModelCheck>,
    /// How often usage is persisted.
    pub usage_heartbeat: Duration,
    /// After the connection ends, how long writing the final usage may take.
    pub final_write_timeout: Duration,
    /// Seed of the jitter of STT reconnect delays (sessions that failed together must not all
    /// reconnect in the same instant; tests use a fixed seed).
    pub jitter_seed: u64,
}

/// The LLM engine's answer to "may this plan use this model?" (a lookup in its routing table,
/// no IO).
#[derive(Clone)]
pub struct ModelCheck(Arc<ModelCheckFn>);

/// `(plan, model) -> Ok, or why not`.
type ModelCheckFn = dyn Fn(Option<&str>, &str) -> Result<(), String> + Send + Sync;

impl ModelCheck {
    pub fn new(
        f: impl Fn(Option<&str>, &str) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        ModelCheck(Arc::new(f))
    }

    pub fn check(&self, plan: Option<&str>, model: &str) -> Result<(), String> {
        (self.0)(plan, model)
    }
}

impl std::fmt::Debug for ModelCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ModelCheck")
    }
}

/// The user a session is metered against.
#[derive(Debug, Clone, PartialEq)]
pub struct Account {
    pub user_id: i64,
    pub plan: Plan,
}

/// What the store said about the user when the connection arrived.
#[derive(Debug, Clone, PartialEq)]
pub struct Admitted {
    pub account: Account,
    /// The user's totals for today.
    pub totals: UsageTotals,
    /// The kill switches at this moment.
    pub switches: Switches,
}

/// A message from the client's socket.
#[derive(Debug)]
pub enum ClientIn {
    Text(String),
    /// An audio frame (shared, not copied: echo mode sends the same buffer back).
    Binary(bytes::Bytes),
    /// The message exceeded the server's `max_message_bytes`.
    TooLarge,
    /// The client closed, or the socket failed.
    Closed,
}

/// An event of the session's speech recognition stream.
#[derive(Debug, Clone, PartialEq)]
pub enum SttIn {
    Interim(String),
    Final(String),
    /// The stream failed (it is closed now).
    Error(String),
    /// The stream ended without an error.
    Ended,
}

/// An event of the LLM stream of one turn.
#[derive(Debug, Clone, PartialEq)]
pub enum LlmIn {
    Delta(String),
    /// The answer is complete; `tokens` = prompt + completion tokens when the provider says.
    Done {
        tokens: Option<u64>,
    },
    Error(String),
    /// The stream ended without `Done`.
    Ended,
}

/// An event of the TTS stream of one turn.
#[derive(Debug, Clone, PartialEq)]
pub enum TtsIn {
    /// Synthesized audio of text chunk `index`, mono PCM at `sample_rate`.
    Audio {
        index: u32,
        samples: Vec<i16>,
        sample_rate: u32,
    },
    ChunkDone {
        index: u32,
    },
    Finished,
    Error(String),
    /// The stream ended without `Finished`.
    Ended,
}

/// Everything the shell tells the session.
#[derive(Debug)]
pub enum Input {
    /// The store's answer about the connection's user: the first input of every session.
    /// `Err` is why the store could not answer (the session is refused as unavailable).
    Admission(Result<Admitted, String>),
    /// A `session.start` carried by the upgrade request's URL (`Err`: it was malformed).
    UrlStart(Result<duplex_proto::SessionStart, (duplex_proto::ErrorCode, String)>),
    Client(ClientIn),
    Stt(SttIn),
    /// A [`Command::FinalizeStt`] did not fit in the recognizer's full input queue.
    SttFinalizeDeferred,
    Llm {
        turn: TurnId,
        event: LlmIn,
    },
    Tts {
        turn: TurnId,
        event: TtsIn,
    },
    /// A [`Command::Persist`] finished: the user's new totals, or why it failed.
    Persisted {
        seq: u64,
        result: Result<UsageTotals, String>,
    },
    Switches(Switches),
    /// Usage a provider reported for this session (cost, STT seconds).
    ProviderUsage(ProviderUsage),
    /// The server is shutting down.
    Shutdown,
    /// The way to the client is gone: the client stopped reading (`slow`, the shell already told it
    /// `slow_consumer`) or the socket failed. Nothing more reaches the client.
    WriterGone {
        slow: bool,
    },
}

/// What the session asks the shell to do.
#[derive(Debug, PartialEq)]
pub enum Command {
    /// Send this JSON message to the client.
    Send(duplex_proto::ServerMessage),
    /// Send this binary audio frame to the client.
    SendAudio(bytes::Bytes),
    /// Send a close frame with this code and reason; nothing is sent after it.
    Close { code: u16, reason: &'static str },
    /// Open the speech recognition stream (16 kHz PCM).
    OpenStt { language: Option<String> },
    /// One 20 ms frame of 16 kHz audio for STT (dropped, and counted, if its queue is full).
    FeedStt(Vec<i16>),
    /// Ask STT for the final transcript of the utterance; answer
    /// [`Input::SttFinalizeDeferred`] if its queue is full.
    FinalizeStt,
    /// Drop the STT stream (it failed; a later `OpenStt` replaces it).
    CloseStt,
    /// Start the LLM stream of `turn`.
    StartLlm { turn: TurnId, request: TurnRequest },
    /// Open the TTS stream of `turn`.
    OpenTts {
        turn: TurnId,
        voice: Option<String>,
        language: Option<String>,
        preferred_sample_rate: u32,
    },
    /// Speak this text chunk in `turn`.
    TtsText {
        turn: TurnId,
        index: u32,
        text: String,
    },
    /// No more text in `turn`.
    TtsEnd { turn: TurnId },
    /// Drop the LLM and TTS streams of `turn` now (barge-in, limit, end).
    CancelTurn { turn: TurnId },
    /// Metering started: record the session's start in the store and route this session's
    /// provider usage records here as [`Input::ProviderUsage`].
    MeteringStarted { user_id: i64 },
    /// Write this usage delta; answer with [`Input::Persisted`].
    Persist { user_id: i64, delta: UsageDelta },
    /// The session stopped waiting for the store (its final write's deadline passed): these
    /// writes were never acknowledged. Hand them to something that outlives the session and
    /// applies them in order until each is acknowledged (the store applies a `(session, seq)`
    /// once, so a replay of a write that did commit adds nothing). No answer comes back.
    HandOff {
        user_id: i64,
        deltas: Vec<UsageDelta>,
    },
    /// The connection is over: drop every provider stream, stop reading the client, and let
    /// the socket finish writing what is queued. Only [`Input::Persisted`] and deadlines matter now.
    Release,
    /// Record the session's end in the store (after its start record).
    RecordEnd { reason: &'static str },
    /// Nothing is left to do: the shell returns.
    Done,
    /// A figure for the metrics.
    Observe(Observation),
}

/// What a turn's LLM request is made of.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnRequest {
    /// Empty: no system message.
    pub system_prompt: String,
    /// Oldest first; the new user entry last.
    pub history: Vec<HistoryEntry>,
    /// The client's choice (`session.start` `model`), subject to the router's policy.
    pub model: Option<String>,
    /// The user's plan, for the router's policy.
    pub plan: Option<String>,
    /// What is left of the service's daily spending cap, when one is set.
    pub budget_remaining_usd: Option<f64>,
}

/// Figures for the metrics (the shell owns the registry).
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    /// A stage's latency; `provider` is the engine measured, when the stage has one.
    Latency {
        stage: Stage,
        provider: Option<String>,
        value: Duration,
    },
    /// Silence between the end of speech and the endpointer's decision.
    Endpointing(Duration),
    /// An assistant turn started (admitted by the plan).
    TurnStarted,
    /// An assistant turn was interrupted by the user.
    Interrupted,
    /// A client audio frame was dropped: it ran ahead of real time beyond the allowance.
    AudioTooFast,
}
