//! The duplex wire protocol, version 1 (`duplex.v1`): the serde types of every JSON message a
//! client and the server exchange over `/v1/conversation`, plus the close codes and error codes.
//!
//! `proto/PROTOCOL.md` is the prose specification and `proto/schema/` holds one JSON Schema per
//! message; this crate is the single owner of the Rust types, and its tests check that the
//! schemas, the examples in `proto/examples/` and these types agree.
//!
//! Binary WebSocket frames carry audio (PCM16LE or G.711 mu-law, mono) and have no Rust type.

use serde::{Deserialize, Serialize};

/// The WebSocket subprotocol name a client offers (`Sec-WebSocket-Protocol: duplex.v1`).
pub const SUBPROTOCOL: &str = "duplex.v1";
/// The protocol version accepted as `?v=1` on the WebSocket URL.
pub const VERSION: u32 = 1;
/// Input sample rates a client may stream at.
pub const SUPPORTED_SAMPLE_RATES: [u32; 5] = [8000, 16000, 24000, 44100, 48000];

/// WebSocket close codes the server uses (RFC 6455 codes plus the 4000-4999 private range).
pub mod close_code {
    /// The session ended normally (`session.end`, or the client closed).
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down and the grace period is over.
    pub const GOING_AWAY: u16 = 1001;
    /// A message broke the protocol so badly that the session cannot go on.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A message was larger than the server's `max_message_bytes`.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// An unexpected server fault.
    pub const INTERNAL_ERROR: u16 = 1011;
    /// No client message arrived within the idle timeout.
    pub const IDLE_TIMEOUT: u16 = 4000;
    /// The client did not read assistant audio fast enough; its queue hit the bound.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// The user's plan limit is reached; the session was told with `limit_exceeded`.
    pub const LIMIT_EXCEEDED: u16 = 4029;
}

/// Audio sample encodings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// Signed 16-bit little-endian PCM, mono.
    #[default]
    Pcm16,
    /// G.711 mu-law, 8 bits per sample, mono (telephony).
    Mulaw,
}

impl Encoding {
    /// Bytes per sample on the wire.
    pub fn bytes_per_sample(self) -> usize {
        match self {
            Encoding::Pcm16 => 2,
            Encoding::Mulaw => 1,
        }
    }

    /// Parses the wire name (`pcm16`, `mulaw`).
    pub fn parse(s: &str) -> Option<Encoding> {
        match s {
            "pcm16" | "linear16" => Some(Encoding::Pcm16),
            "mulaw" | "ulaw" => Some(Encoding::Mulaw),
            _ => None,
        }
    }
}

/// An audio format: encoding and sample rate, always mono.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AudioFormat {
    pub encoding: Encoding,
    pub sample_rate: u32,
}

// ---------------------------------------------------------------------------------------------
// Client -> server
// ---------------------------------------------------------------------------------------------

/// The parameters of a session. Sent as `session.start`, or given as query parameters on the
/// WebSocket URL (same names), in which case the session starts at upgrade.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionStart {
    /// Sample rate of the client's binary audio frames: 8000, 16000, 24000, 44100 or 48000.
    pub sample_rate: u32,
    /// Encoding of the client's binary audio frames.
    #[serde(default)]
    pub encoding: Encoding,
    /// BCP-47 language of the user's speech (e.g. `en`, `en-US`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// TTS voice name, provider specific.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voice: Option<String>,
    /// LLM model name, subject to the server's routing policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// System prompt for the assistant; the server's default applies when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    /// Sample rate of the assistant audio sent back; defaults to `sample_rate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_sample_rate: Option<u32>,
    /// Encoding of the assistant audio sent back; defaults to `encoding`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_encoding: Option<Encoding>,
}

/// A typed user turn, handled as if it had been spoken and transcribed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputText {
    pub text: String,
}

/// Explicit barge-in (e.g. a "stop" button): cancels the assistant's current turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ResponseInterrupt {}

/// How much assistant audio of a turn the client has actually played out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlaybackMark {
    pub turn_id: u64,
    /// Milliseconds of that turn's audio played so far.
    pub played_ms: u64,
}

/// The client ends the session; the server answers with a normal close.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SessionEnd {}

/// Keep-alive / round-trip probe; answered with `pong` carrying the same id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Ping {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// Every JSON message a client may send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ClientMessage {
    #[serde(rename = "session.start")]
    SessionStart(SessionStart),
    #[serde(rename = "input.text")]
    InputText(InputText),
    #[serde(rename = "response.interrupt")]
    ResponseInterrupt(ResponseInterrupt),
    #[serde(rename = "playback.mark")]
    PlaybackMark(PlaybackMark),
    #[serde(rename = "session.end")]
    SessionEnd(SessionEnd),
    #[serde(rename = "ping")]
    Ping(Ping),
}

impl ClientMessage {
    /// Every client message type name, in protocol order.
    pub const TYPES: [&'static str; 6] = [
        "session.start",
        "input.text",
        "response.interrupt",
        "playback.mark",
        "session.end",
        "ping",
    ];
}

// ---------------------------------------------------------------------------------------------
// Server -> client
// ---------------------------------------------------------------------------------------------

/// The limits of a plan. `None` means unlimited.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct PlanLimits {
    /// Seconds of conversation per UTC day.
    pub daily_seconds: Option<u64>,
    /// One-time trial allowance in seconds, if the plan has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trial_seconds: Option<u64>,
    /// TTS characters per calendar month.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monthly_tts_characters: Option<u64>,
    /// Assistant turns per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turns_per_minute: Option<u32>,
}

/// The user's plan as the server sees it at session start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanInfo {
    /// Plan name, e.g. `free`, `pro`, or `unmetered` when metering is off.
    pub name: String,
    pub limits: PlanLimits,
}

/// Names of the providers that serve this session. `scripted` and `echo` are test sets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProviderNames {
    pub stt: String,
    pub llm: String,
    pub tts: String,
}

/// The session is running: negotiated formats, plan and providers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionReady {
    pub session_id: String,
    /// Always `duplex.v1` in this version.
    pub protocol: String,
    /// Format of the client's binary frames.
    pub input: AudioFormat,
    /// Format of the assistant's binary frames.
    pub output: AudioFormat,
    /// Duration of each assistant audio frame in milliseconds.
    pub output_frame_ms: u32,
    pub plan: PlanInfo,
    pub providers: ProviderNames,
}

/// Voice activity started: the user began speaking.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpeechStarted {
    /// Position in the client's input audio stream, in ms since session start.
    pub audio_ms: u64,
}

/// Voice activity stopped: the endpointer declared the end of the user's turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpeechStopped {
    /// Position in the input audio stream where speech ended (before the trailing silence).
    pub audio_ms: u64,
}

/// A transcript of the user's speech; interim results may be revised, finals are not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserTranscript {
    pub text: String,
    pub is_final: bool,
}

/// Assistant text: deltas while the LLM streams, then the final text of the turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssistantMessage {
    pub turn_id: u64,
    /// New text since the previous message of this turn (absent on the final message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<String>,
    /// The complete text of the turn (present only when `is_final`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    pub is_final: bool,
}

/// The binary frames that follow are assistant audio of this turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssistantAudioStart {
    pub turn_id: u64,
    pub format: AudioFormat,
}

/// Why an assistant audio stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AudioEndReason {
    /// All of the turn's audio was sent.
    Complete,
    /// The user interrupted; the rest was dropped.
    Interrupted,
    /// A provider failed mid-turn; an `error` message says which.
    Error,
}

/// No more audio frames for this turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssistantAudioEnd {
    pub turn_id: u64,
    /// Milliseconds of audio sent for this turn.
    pub duration_ms: u64,
    pub reason: AudioEndReason,
}

/// The assistant's turn was cut short by the user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interrupted {
    pub turn_id: u64,
    /// Milliseconds of the turn's audio the user heard.
    pub played_ms: u64,
    /// The part of the assistant's text the user heard; history keeps only this.
    pub heard_text: String,
}

/// Usage of the user's plan so far (produced by the metering layer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageUpdate {
    pub plan: String,
    /// Seconds of conversation metered today (UTC), across all of the user's sessions.
    pub seconds_used_today: u64,
    /// Seconds left today, `null` when unlimited.
    pub seconds_remaining: Option<u64>,
    /// Seconds metered in this session.
    pub session_seconds: u64,
}

/// A plan limit was reached; no new assistant turn starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LimitExceeded {
    /// Which limit: `daily_seconds`, `trial_seconds`, `monthly_tts_characters`,
    /// `turns_per_minute`, `daily_spend`, or `generation_disabled`.
    pub limit: String,
    pub used: u64,
    pub allowed: u64,
    /// When the limit resets (RFC 3339), if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade_hint: Option<String>,
}

/// Machine-readable error codes of the `error` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A text frame was not valid JSON, or not a JSON object.
    MalformedJson,
    /// The message's `type` is missing, not a string, or not a known type.
    UnknownMessageType,
    /// A known message had missing, extra or wrongly typed fields.
    InvalidMessage,
    /// A message other than `session.start`/`ping` arrived before the session started.
    SessionNotStarted,
    /// Binary audio arrived before the session started.
    AudioBeforeSessionStart,
    /// `session.start` arrived while a session was already running.
    SessionAlreadyStarted,
    /// The requested sample rate is not one of the supported rates.
    UnsupportedSampleRate,
    /// The requested encoding is not `pcm16` or `mulaw`.
    UnsupportedEncoding,
    /// A PCM16 binary frame had an odd number of bytes.
    OddFrameLength,
    /// Binary audio arrived faster than real time beyond the allowance; the excess is dropped.
    AudioTooFast,
    /// A message exceeded the size limit; the connection closes with 1009.
    MessageTooLarge,
    /// A message arrived after `session.end`.
    SessionEnded,
    /// The client did not read audio fast enough; the connection closes with 4008.
    SlowConsumer,
    /// No message within the idle timeout; the connection closes with 4000.
    IdleTimeout,
    /// No session started within the pre-start timeout; the connection closes with 4000.
    StartTimeout,
    /// The speech recogniser failed.
    SttError,
    /// The language model failed.
    LlmError,
    /// Speech synthesis failed.
    TtsError,
    /// The server is shutting down.
    ServerShuttingDown,
    /// Assistant generation is switched off by the operator.
    GenerationDisabled,
    /// A limit was reached (details in `limit_exceeded`).
    LimitExceeded,
    /// Too many turns in a short time.
    RateLimited,
    /// An unexpected server fault.
    Internal,
}

impl ErrorCode {
    /// The wire name, e.g. `malformed_json` (also the `code` label of the errors metric).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MalformedJson => "malformed_json",
            ErrorCode::UnknownMessageType => "unknown_message_type",
            ErrorCode::InvalidMessage => "invalid_message",
            ErrorCode::SessionNotStarted => "session_not_started",
            ErrorCode::AudioBeforeSessionStart => "audio_before_session_start",
            ErrorCode::SessionAlreadyStarted => "session_already_started",
            ErrorCode::UnsupportedSampleRate => "unsupported_sample_rate",
            ErrorCode::UnsupportedEncoding => "unsupported_encoding",
            ErrorCode::OddFrameLength => "odd_frame_length",
            ErrorCode::AudioTooFast => "audio_too_fast",
            ErrorCode::MessageTooLarge => "message_too_large",
            ErrorCode::SessionEnded => "session_ended",
            ErrorCode::SlowConsumer => "slow_consumer",
            ErrorCode::IdleTimeout => "idle_timeout",
            ErrorCode::StartTimeout => "start_timeout",
            ErrorCode::SttError => "stt_error",
            ErrorCode::LlmError => "llm_error",
            ErrorCode::TtsError => "tts_error",
            ErrorCode::ServerShuttingDown => "server_shutting_down",
            ErrorCode::GenerationDisabled => "generation_disabled",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Internal => "internal",
        }
    }
}

/// Something went wrong. Unless `fatal`, the session keeps working.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorMessage {
    pub code: ErrorCode,
    pub message: String,
    pub fatal: bool,
}

/// Answer to `ping`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Pong {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// Every JSON message the server may send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ServerMessage {
    #[serde(rename = "session.ready")]
    SessionReady(SessionReady),
    #[serde(rename = "vad.speech_started")]
    SpeechStarted(SpeechStarted),
    #[serde(rename = "vad.speech_stopped")]
    SpeechStopped(SpeechStopped),
    #[serde(rename = "user_transcript")]
    UserTranscript(UserTranscript),
    #[serde(rename = "assistant_message")]
    AssistantMessage(AssistantMessage),
    #[serde(rename = "assistant_audio.start")]
    AssistantAudioStart(AssistantAudioStart),
    #[serde(rename = "assistant_audio.end")]
    AssistantAudioEnd(AssistantAudioEnd),
    #[serde(rename = "interrupted")]
    Interrupted(Interrupted),
    #[serde(rename = "usage_update")]
    UsageUpdate(UsageUpdate),
    #[serde(rename = "limit_exceeded")]
    LimitExceeded(LimitExceeded),
    #[serde(rename = "error")]
    Error(ErrorMessage),
    #[serde(rename = "pong")]
    Pong(Pong),
}

impl ServerMessage {
    /// Every server message type name, in protocol order.
    pub const TYPES: [&'static str; 12] = [
        "session.ready",
        "vad.speech_started",
        "vad.speech_stopped",
        "user_transcript",
        "assistant_message",
        "assistant_audio.start",
        "assistant_audio.end",
        "interrupted",
        "usage_update",
        "limit_exceeded",
        "error",
        "pong",
    ];

    /// Builds an `error` message.
    pub fn error(code: ErrorCode, message: impl Into<String>, fatal: bool) -> ServerMessage {
        ServerMessage::Error(ErrorMessage {
            code,
            message: message.into(),
            fatal,
        })
    }

    /// Serializes to the JSON text of a WebSocket text frame.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server messages contain only serializable data")
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing with precise errors
// ---------------------------------------------------------------------------------------------

/// Why a client text frame could not be turned into a [`ClientMessage`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParseError {
    /// Not JSON, or JSON that is not an object.
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    /// No string `type` field, or a type this protocol version does not define.
    #[error("unknown message type: {0}")]
    UnknownType(String),
    /// A known type whose fields do not match its schema.
    #[error("invalid {kind} message: {detail}")]
    Invalid { kind: String, detail: String },
}

impl ParseError {
    /// The `error.code` a server reports for this parse failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            ParseError::MalformedJson(_) => ErrorCode::MalformedJson,
            ParseError::UnknownType(_) => ErrorCode::UnknownMessageType,
            ParseError::Invalid { .. } => ErrorCode::InvalidMessage,
        }
    }
}

/// Longest piece of client text an error message quotes back (a `type`, a serde detail that
/// names a field): errors are sent to the client, and a client must not be able to make the
/// server queue copies of its own large strings.
pub const MAX_QUOTED_CHARS: usize = 64;

/// `s` cut to [`MAX_QUOTED_CHARS`] characters, with `…` when cut.
pub fn quote_capped(s: &str) -> String {
    match s.char_indices().nth(MAX_QUOTED_CHARS) {
        None => s.to_owned(),
        Some((i, _)) => format!("{}…", &s[..i]),
    }
}

/// Parses a client text frame, telling malformed JSON, unknown types and invalid fields apart.
pub fn parse_client_message(text: &str) -> Result<ClientMessage, ParseError> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| ParseError::MalformedJson(e.to_string()))?;
    let serde_json::Value::Object(map) = &value else {
        return Err(ParseError::MalformedJson(
            "a message must be a JSON object".into(),
        ));
    };
    let kind = match map.get("type") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(_) => return Err(ParseError::UnknownType("`type` must be a string".into())),
        None => return Err(ParseError::UnknownType("missing `type` field".into())),
    };
    if !ClientMessage::TYPES.contains(&kind.as_str()) {
        return Err(ParseError::UnknownType(format!(
            "`{}`",
            quote_capped(&kind)
        )));
    }
    serde_json::from_value(value).map_err(|e| ParseError::Invalid {
        kind,
        // serde quotes unknown field names and bad values: cap what goes back.
        detail: quote_capped_detail(&e.to_string()),
    })
}

/// A serde error message with room for its own words around a capped quote.
fn quote_capped_detail(detail: &str) -> String {
    match detail.char_indices().nth(4 * MAX_QUOTED_CHARS) {
        None => detail.to_owned(),
        Some((i, _)) => format!("{}…", &detail[..i]),
    }
}

/// Parses a server text frame (used by clients such as the replayer).
pub fn parse_server_message(text: &str) -> Result<ServerMessage, serde_json::Error> {
    serde_json::from_str(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client cannot make the server echo a large string of its own in an error.
    #[test]
    fn parse_errors_quote_at_most_a_capped_piece_of_client_text() {
        let huge = "x".repeat(250_000);
        let unknown = format!(r#"{{"type":"{huge}"}}"#);
        let e = parse_client_message(&unknown).unwrap_err();
        assert_eq!(e.code(), ErrorCode::UnknownMessageType);
        assert!(e.to_string().len() < 200, "{}", e.to_string().len());
        let field = format!(r#"{{"type":"ping","{huge}":1}}"#);
        let e = parse_client_message(&field).unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidMessage);
        assert!(e.to_string().len() < 400, "{}", e.to_string().len());
        // Short strings are quoted whole; multi-byte characters are cut on a boundary.
        assert_eq!(quote_capped("pong"), "pong");
        let cut = quote_capped(&"é".repeat(100));
        assert_eq!(cut.chars().count(), MAX_QUOTED_CHARS + 1);
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn parse_errors_are_told_apart() {
        assert_eq!(
            parse_client_message("{").unwrap_err().code(),
            ErrorCode::MalformedJson
        );
        assert_eq!(
            parse_client_message("[1]").unwrap_err().code(),
            ErrorCode::MalformedJson
        );
        assert_eq!(
            parse_client_message("{}").unwrap_err().code(),
            ErrorCode::UnknownMessageType
        );
        assert_eq!(
            parse_client_message(r#"{"type":"nope"}"#)
                .unwrap_err()
                .code(),
            ErrorCode::UnknownMessageType
        );
        assert_eq!(
            parse_client_message(r#"{"type":"input.text"}"#)
                .unwrap_err()
                .code(),
            ErrorCode::InvalidMessage
        );
        assert_eq!(
            parse_client_message(r#"{"type":"ping","id":"a"}"#).unwrap(),
            ClientMessage::Ping(Ping {
                id: Some("a".into())
            })
        );
    }

    #[test]
    fn session_start_defaults() {
        let m = parse_client_message(r#"{"type":"session.start","sample_rate":16000}"#).unwrap();
        let ClientMessage::SessionStart(s) = m else {
            panic!("wrong variant: {m:?}")
        };
        assert_eq!(s.encoding, Encoding::Pcm16);
        assert_eq!(s.output_sample_rate, None);
    }
}
