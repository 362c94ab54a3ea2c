//! The provider boundary of duplex: the speech-to-text, language-model and text-to-speech
//! traits the session actor drives, and their implementations (one module per vendor).
//!
//! Every provider stage is a task with channels, not a method call: `open`/`stream` return at
//! once and spawn whatever IO the provider needs, so a slow or failing vendor never blocks the
//! session actor. Errors arrive as values on the stage's event channel. Dropping a stage's
//! handle cancels it: the handle owns a [`CancellationToken`] drop guard that every provider
//! task watches, so a barge-in stops network reads and synthesis within one frame.
//!
//! Implemented here: [`scripted`] (a deterministic test set that is not speech recognition,
//! not a language model and not a voice — it says so in its output); the cloud adapters
//! [`deepgram`] (live STT over WebSocket), [`openai`] (any OpenAI-compatible chat endpoint,
//! `/v1/audio/speech` TTS, `/v1/audio/transcriptions` STT), [`elevenlabs`] (stream-input TTS
//! over WebSocket) and [`azure`] (REST TTS); the [`router`] (an LLM over named endpoints with
//! routing, failover, circuit breakers, retries and a cache); and [`usage`] (cost accounting
//! that every adapter reports to).
//!
//! Each cloud vendor's wire protocol is a sans-IO codec in its module, driven by one shared
//! driver per transport: [`ws`] for the WebSocket vendors, [`http`] for request-per-chunk
//! synthesis. The drivers own the sockets and the clock; the codecs decide.

use std::fmt;
use std::pin::Pin;

use futures::Stream;
use tokio::sync::mpsc;
pub use tokio_util::sync::CancellationToken;
use tokio_util::sync::DropGuard;

pub mod azure;
pub mod deepgram;
pub mod elevenlabs;
pub mod http;
pub mod openai;
pub mod router;
pub mod scripted;
pub mod usage;
pub mod ws;

pub use usage::{Meter, PriceTable, UsageKind, UsageRecord, UsageSink};

/// Installs aws-lc-rs as the process-wide rustls crypto provider, once. reqwest and
/// tokio-tungstenite both use rustls; should another crate in the binary enable a second
/// provider (ring), rustls would refuse to pick one at the first TLS connect. Installing a
/// default makes the choice explicit. Safe to call many times.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Audio chunks queued from the session actor to an STT stream. 50 x 20 ms = 1 s of audio:
/// enough to ride out a network hiccup; beyond that frames are dropped (and counted) rather
/// than letting the actor block on a stalled provider.
pub const STT_AUDIO_CAPACITY: usize = 50;
/// Events from an STT stream. Transcripts are small and rare; 32 covers a burst of interims.
pub const STT_EVENT_CAPACITY: usize = 32;
/// Text chunks queued for a TTS stream: a reply is a handful of sentences.
pub const TTS_TEXT_CAPACITY: usize = 64;
/// Audio events from a TTS stream. Providers deliver audio in pieces of 20-200 ms; 64 pieces
/// keep a whole sentence in flight while the pacer holds the client's lead small. A full
/// channel makes the provider task wait, which is the backpressure we want.
pub const TTS_EVENT_CAPACITY: usize = 64;

/// A provider failure, reported as a value on the stage's channel.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProviderError {
    /// Could not reach the provider (DNS, TCP, TLS, WebSocket handshake).
    #[error("connect failed: {0}")]
    Connect(String),
    /// The provider answered with an HTTP error status.
    #[error("HTTP {status}: {body}")]
    Http { status: u16, body: String },
    /// The provider refused for rate reasons (HTTP 429 or equivalent).
    #[error("rate limited: {0}")]
    RateLimited(String),
    /// The provider sent something that does not follow its protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// No answer within the configured time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The provider closed the stream before finishing.
    #[error("stream closed early: {0}")]
    Closed(String),
    /// The request itself is not valid for this provider (unknown voice, bad model).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

// ---------------------------------------------------------------------------------------------
// Speech to text
// ---------------------------------------------------------------------------------------------

/// Parameters of one recognition stream (one per session).
#[derive(Debug, Clone, PartialEq)]
pub struct SttParams {
    /// Sample rate of the audio sent; the front end always delivers 16 kHz.
    pub sample_rate: u32,
    pub language: Option<String>,
    pub session_id: String,
}

/// What the session actor sends to a recognizer.
#[derive(Debug, Clone, PartialEq)]
pub enum SttInput {
    /// 16-bit mono samples at `SttParams::sample_rate`.
    Audio(Vec<i16>),
    /// The endpointer declared the end of the user's turn: produce the final transcript now.
    Finalize,
}

/// What a recognizer reports.
#[derive(Debug, Clone, PartialEq)]
pub enum SttEvent {
    /// A revisable hypothesis of the current utterance.
    Interim { text: String },
    /// The final transcript of an utterance (possibly empty when nothing was recognised).
    Final { text: String },
    /// The provider's own voice activity detector heard speech start.
    SpeechStarted,
    /// The provider's own end-of-utterance signal.
    UtteranceEnd,
    /// The stream failed; no more events follow.
    Error(ProviderError),
}

/// A running recognition stream. Dropping it cancels the provider task.
pub struct SttStream {
    pub input: mpsc::Sender<SttInput>,
    pub events: mpsc::Receiver<SttEvent>,
    _cancel: DropGuard,
}

impl SttStream {
    /// Builds the channels of a stream; the provider keeps the returned [`SttTask`] side.
    pub fn channel() -> (SttStream, SttTask) {
        let (input_tx, input_rx) = mpsc::channel(STT_AUDIO_CAPACITY);
        let (event_tx, event_rx) = mpsc::channel(STT_EVENT_CAPACITY);
        let cancel = CancellationToken::new();
        let stream = SttStream {
            input: input_tx,
            events: event_rx,
            _cancel: cancel.clone().drop_guard(),
        };
        (
            stream,
            SttTask {
                input: input_rx,
                events: event_tx,
                cancel,
            },
        )
    }
}

/// The provider's side of an [`SttStream`].
pub struct SttTask {
    pub input: mpsc::Receiver<SttInput>,
    pub events: mpsc::Sender<SttEvent>,
    /// Cancelled when the session drops the stream.
    pub cancel: CancellationToken,
}

/// A streaming speech recognizer.
pub trait SpeechToText: Send + Sync + 'static {
    /// Short provider name reported to clients and metrics (e.g. `deepgram`, `scripted`).
    fn name(&self) -> &str;
    /// Opens a recognition stream. Must not block: connection work happens in a spawned task,
    /// and failures are reported as [`SttEvent::Error`].
    fn open(&self, params: SttParams) -> SttStream;
}

// ---------------------------------------------------------------------------------------------
// Language model
// ---------------------------------------------------------------------------------------------

/// Role of a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

/// One message of the conversation history.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: Role, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role,
            content: content.into(),
        }
    }
}

/// One completion request: the whole history, system prompt first.
#[derive(Debug, Clone, PartialEq)]
pub struct LlmRequest {
    pub session_id: String,
    /// Requested model; `None` lets the provider or router choose.
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<u32>,
    /// The user's plan tier (e.g. `free`, `pro`), for routing; `None` when unknown.
    pub plan: Option<String>,
    /// What the user may still spend today, in USD, for routing; `None` when not metered.
    pub budget_remaining_usd: Option<f64>,
}

/// Token counts reported by the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenUsage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

/// One item of an LLM token stream.
#[derive(Debug, Clone, PartialEq)]
pub enum LlmEvent {
    /// More text.
    Delta(String),
    /// The completion ended normally.
    Done {
        usage: Option<TokenUsage>,
        model: String,
    },
}

/// A token stream. Dropping it cancels the request (and closes its HTTP stream).
pub type LlmStream = Pin<Box<dyn Stream<Item = Result<LlmEvent, ProviderError>> + Send>>;

/// A streaming language model.
pub trait LanguageModel: Send + Sync + 'static {
    fn name(&self) -> &str;
    /// Starts a completion. Must not block; errors come as stream items. The stream ends after
    /// `Done` or the first error.
    fn stream(&self, request: LlmRequest) -> LlmStream;
    /// Whether a session on `plan` may ask for `model` (`session.start` `model`); the `Err`
    /// says why, for the client. An engine that ignores the field accepts anything; the
    /// router accepts only the endpoints of the plan's routes ([`router::RouterCore::plan_endpoints`])
    /// and ignores any other name when it routes.
    fn check_model(&self, plan: Option<&str>, model: &str) -> Result<(), String> {
        let _ = (plan, model);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Text to speech
// ---------------------------------------------------------------------------------------------

/// Parameters of one synthesis stream (one per assistant turn).
#[derive(Debug, Clone, PartialEq)]
pub struct TtsParams {
    pub session_id: String,
    pub voice: Option<String>,
    pub language: Option<String>,
    /// The rate the session wants; providers may deliver another rate (the event says which)
    /// and the session resamples.
    pub preferred_sample_rate: u32,
}

/// What the session actor sends to a synthesizer.
#[derive(Debug, Clone, PartialEq)]
pub enum TtsInput {
    /// A speakable chunk (a sentence or clause) with its index within the turn.
    Text { index: u32, text: String },
    /// No more text in this turn: finish the audio and end with [`TtsEvent::Finished`].
    End,
}

/// What a synthesizer reports.
#[derive(Debug, Clone, PartialEq)]
pub enum TtsEvent {
    /// Audio of chunk `index`: 16-bit mono samples at `sample_rate`.
    Audio {
        index: u32,
        samples: Vec<i16>,
        sample_rate: u32,
    },
    /// All audio of chunk `index` has been delivered.
    ChunkDone { index: u32 },
    /// All chunks are done after [`TtsInput::End`].
    Finished,
    /// Synthesis failed; no more events follow.
    Error(ProviderError),
}

/// A running synthesis stream. Dropping it cancels synthesis.
pub struct TtsStream {
    pub input: mpsc::Sender<TtsInput>,
    pub events: mpsc::Receiver<TtsEvent>,
    _cancel: DropGuard,
}

impl TtsStream {
    /// Builds the channels of a stream; the provider keeps the returned [`TtsTask`] side.
    pub fn channel() -> (TtsStream, TtsTask) {
        let (input_tx, input_rx) = mpsc::channel(TTS_TEXT_CAPACITY);
        let (event_tx, event_rx) = mpsc::channel(TTS_EVENT_CAPACITY);
        let cancel = CancellationToken::new();
        let stream = TtsStream {
            input: input_tx,
            events: event_rx,
            _cancel: cancel.clone().drop_guard(),
        };
        (
            stream,
            TtsTask {
                input: input_rx,
                events: event_tx,
                cancel,
            },
        )
    }
}

/// The provider's side of a [`TtsStream`].
pub struct TtsTask {
    pub input: mpsc::Receiver<TtsInput>,
    pub events: mpsc::Sender<TtsEvent>,
    /// Cancelled when the session drops the stream.
    pub cancel: CancellationToken,
}

/// Delivers the whole synthesized audio of chunk `index` as [`TtsEvent::Audio`] pieces of
/// `piece` samples, then [`TtsEvent::ChunkDone`], for synthesizers that render a chunk at
/// once. Each send waits for room (backpressure); `false` when the session stopped listening.
pub async fn send_chunk_audio(
    events: &mpsc::Sender<TtsEvent>,
    index: u32,
    samples: &[i16],
    sample_rate: u32,
    piece: usize,
) -> bool {
    for part in samples.chunks(piece.max(1)) {
        let ev = TtsEvent::Audio {
            index,
            samples: part.to_vec(),
            sample_rate,
        };
        if events.send(ev).await.is_err() {
            return false;
        }
    }
    events.send(TtsEvent::ChunkDone { index }).await.is_ok()
}

/// A streaming speech synthesizer.
pub trait TextToSpeech: Send + Sync + 'static {
    fn name(&self) -> &str;
    /// Opens a synthesis stream for one assistant turn. Must not block.
    fn open(&self, params: TtsParams) -> TtsStream;
}

/// The three engines a session uses.
#[derive(Clone)]
pub struct ProviderSet {
    pub stt: std::sync::Arc<dyn SpeechToText>,
    pub llm: std::sync::Arc<dyn LanguageModel>,
    pub tts: std::sync::Arc<dyn TextToSpeech>,
}

impl fmt::Debug for ProviderSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderSet")
            .field("stt", &self.stt.name())
            .field("llm", &self.llm.name())
            .field("tts", &self.tts.name())
            .finish()
    }
}
