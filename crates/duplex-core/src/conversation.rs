//! The conversation state machine of one session: who is speaking, which assistant turn is
//! current, what the user heard, and what the history says.
//!
//! Sans-IO in the str0m style: the session actor feeds [`Input`]s with the current time through
//! [`Conversation::handle_input`], then drains [`Conversation::poll_output`] until it returns
//! [`Output::Timeout`] (sleep until then, or until the next input) or [`Output::Idle`].
//!
//! Barge-in is a generation counter: every assistant turn has a [`TurnId`]; an interruption
//! ends the current turn and emits [`Output::CancelTurn`]; inputs tagged with any other turn
//! are dropped here, so a late token or audio frame of a cancelled turn can never be sent.
//!
//! Outbound audio passes through here so that pacing and interruption are decided in one
//! place: the shell hands in encoded frames ([`Input::TtsFrame`]) and sends what
//! [`Output::Audio`] gives back, at most a configured lead ahead of the client's playhead.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use duplex_proto as proto;
use proto::{AudioEndReason, ErrorCode, ServerMessage};

use crate::chunker::{ChunkerConfig, SentenceChunker};
use crate::pacer::Pacer;

/// Identifies one assistant turn; increases by one per turn, starting at 1.
pub type TurnId = u64;

/// Who said a history entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaker {
    User,
    Assistant,
}

/// One entry of the conversation history (the system prompt is kept apart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    pub speaker: Speaker,
    pub text: String,
}

/// The default of [`ConversationConfig::max_history_bytes`].
pub const DEFAULT_MAX_HISTORY_BYTES: usize = 32 * 1024;

/// The default of [`ConversationConfig::first_chunk_wait`]: about ten tokens of a 0.5B model
/// on two busy cores, three to four seconds of speech from an LLM answering at cloud speed
/// (where the first sentence has usually ended by then).
pub const DEFAULT_FIRST_CHUNK_WAIT: Duration = Duration::from_millis(400);

/// Tunables of the conversation core.
#[derive(Debug, Clone)]
pub struct ConversationConfig {
    pub system_prompt: String,
    /// How far assistant audio may run ahead of the client's playhead.
    pub audio_lead: Duration,
    /// Duration of one outbound audio frame.
    pub frame: Duration,
    /// Past this much queued audio the shell should stop reading TTS output (backpressure
    /// reaches the provider instead of growing memory here).
    pub max_queued_audio: Duration,
    /// Oldest entries are dropped past this many history entries.
    pub max_history: usize,
    /// Oldest entries are dropped while the history's text is longer than this many bytes
    /// (UTF-8), and a single entry longer than this keeps only its newest part. The system
    /// prompt is kept apart and always sent whole.
    pub max_history_bytes: usize,
    pub chunker: ChunkerConfig,
    /// Once the answer's first text is this old and its first chunk has not ended (no
    /// sentence end or clause boundary yet), the first chunk ends at its last word boundary
    /// ([`SentenceChunker::cut_first_at_word`]), so a long first sentence written slowly (a
    /// local LLM on a busy CPU) is spoken in two pieces instead of after a silence. Checked as
    /// text arrives. `None`: first chunks end only at their natural boundaries.
    pub first_chunk_wait: Option<Duration>,
    /// Format of the outbound audio, announced in `assistant_audio.start`.
    pub output_format: proto::AudioFormat,
}

impl Default for ConversationConfig {
    fn default() -> Self {
        ConversationConfig {
            system_prompt: String::new(),
            audio_lead: Duration::from_millis(300),
            frame: Duration::from_millis(20),
            // Two seconds: a provider faster than real time keeps a sentence buffered here.
            max_queued_audio: Duration::from_secs(2),
            // 40 entries = 20 exchanges: enough context for a voice chat, bounded prompt size.
            max_history: 40,
            // 32 KiB, about 8,000 tokens: half an hour of spoken exchanges, and every turn
            // sends all of it, so it bounds each request's prompt cost and the memory held.
            max_history_bytes: DEFAULT_MAX_HISTORY_BYTES,
            chunker: ChunkerConfig::default(),
            first_chunk_wait: Some(DEFAULT_FIRST_CHUNK_WAIT),
            output_format: proto::AudioFormat {
                encoding: proto::Encoding::Pcm16,
                sample_rate: 16000,
            },
        }
    }
}

/// Everything the session actor tells the core.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The endpointer heard the user start speaking (`audio_ms` into the input stream).
    SpeechStarted { audio_ms: u64 },
    /// The endpointer declared the end of the user's turn.
    SpeechStopped { audio_ms: u64 },
    /// A revisable transcript from STT.
    SttInterim { text: String },
    /// A final transcript segment from STT.
    SttFinal { text: String },
    /// The STT stream failed.
    SttError { message: String },
    /// A typed user turn (`input.text`).
    UserText { text: String },
    /// Explicit barge-in (`response.interrupt`).
    Interrupt,
    /// The client's playback position (`playback.mark`).
    PlaybackMark { turn: TurnId, played_ms: u64 },
    /// A token from the LLM.
    LlmDelta { turn: TurnId, text: String },
    /// The LLM finished the turn.
    LlmDone { turn: TurnId },
    /// The LLM failed.
    LlmError { turn: TurnId, message: String },
    /// One encoded outbound audio frame of text chunk `index` (exactly `frame` long, the last
    /// one of a turn may be shorter).
    TtsFrame {
        turn: TurnId,
        index: u32,
        bytes: Vec<u8>,
        duration: Duration,
    },
    /// TTS delivered all audio of chunk `index`.
    TtsChunkDone { turn: TurnId, index: u32 },
    /// TTS delivered all audio of the turn.
    TtsFinished { turn: TurnId },
    /// TTS failed.
    TtsError { turn: TurnId, message: String },
    /// The shell refused to run `turn` (a plan limit, a rate limit, a kill switch): end it
    /// silently; the shell tells the client why.
    RejectTurn { turn: TurnId },
    /// Nothing happened but time passed (a deadline fired).
    Tick,
}

/// Stages whose latency the core measures, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// End of speech (endpointer) -> final transcript.
    SttFinal,
    /// LLM request -> first token.
    LlmFirstToken,
    /// First text chunk sent to TTS -> first audio frame from TTS.
    TtsFirstAudio,
    /// End of speech (endpointer) or typed input -> first audio frame sent to the client.
    VoiceToVoice,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::SttFinal => "stt_final",
            Stage::LlmFirstToken => "llm_first_token",
            Stage::TtsFirstAudio => "tts_first_audio",
            Stage::VoiceToVoice => "voice_to_voice",
        }
    }
}

/// Everything the core asks the session actor to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send this JSON message to the client.
    Send(ServerMessage),
    /// Send this binary audio frame to the client.
    Audio(Vec<u8>),
    /// Ask STT for the final transcript of the utterance that just ended.
    FinalizeStt,
    /// Start an assistant turn: open a TTS stream and request a completion of this history
    /// (system prompt first, then entries oldest first, the new user entry last).
    StartTurn {
        turn: TurnId,
        system_prompt: String,
        history: Vec<HistoryEntry>,
    },
    /// Speak this chunk in `turn`.
    TtsText {
        turn: TurnId,
        index: u32,
        text: String,
    },
    /// No more text in `turn`.
    TtsEnd { turn: TurnId },
    /// Drop the LLM and TTS streams of `turn` now.
    CancelTurn { turn: TurnId },
    /// The turn ended (complete, interrupted or failed).
    TurnEnded {
        turn: TurnId,
        reason: AudioEndReason,
        audio_ms: u64,
    },
    /// A measured latency.
    Latency { stage: Stage, value: Duration },
    /// Nothing to do until this instant (or the next input).
    Timeout(Instant),
    /// Nothing to do until the next input.
    Idle,
}

/// Audio of one text chunk in the turn's audio timeline.
#[derive(Debug, Clone)]
struct ChunkSpan {
    index: u32,
    text: String,
    /// Position of the chunk's first audio in the turn, ms.
    start_ms: u64,
    /// Audio queued so far for this chunk, ms.
    len_ms: u64,
}

/// The assistant turn in progress.
#[derive(Debug)]
struct Turn {
    id: TurnId,
    /// What the user said for this turn, as added to the history: taken back out if the turn
    /// is rejected or fails before answering anything.
    user_text: String,
    text: String,
    chunker: SentenceChunker,
    next_chunk: u32,
    spans: Vec<ChunkSpan>,
    queue: VecDeque<(Vec<u8>, Duration)>,
    queued: Duration,
    audio_total_ms: u64,
    llm_done: bool,
    tts_done: bool,
    audio_started: bool,
    /// A provider failed during this turn.
    failed: bool,
    /// When the user's turn ended (speech stop or typed input), for voice-to-voice latency.
    user_done_at: Instant,
    llm_started_at: Instant,
    first_token_seen: bool,
    /// When the answer's first text came.
    first_token_at: Option<Instant>,
    first_chunk_at: Option<Instant>,
    first_tts_audio_seen: bool,
}

/// The conversation core of one session.
#[derive(Debug)]
pub struct Conversation {
    config: ConversationConfig,
    history: VecDeque<HistoryEntry>,
    next_turn: TurnId,
    turn: Option<Turn>,
    pacer: Pacer,
    out: VecDeque<Output>,
    /// The user is speaking (between speech started and stopped).
    user_speaking: bool,
    /// Finalize was requested and the final transcript has not come yet.
    awaiting_final: bool,
    /// When the endpointer last declared end of speech.
    speech_stopped_at: Option<Instant>,
    /// Final segments of the current utterance received before the endpoint.
    pending_user_text: String,
    now: Option<Instant>,
}

impl Conversation {
    pub fn new(config: ConversationConfig) -> Conversation {
        let pacer = Pacer::new(config.audio_lead);
        Conversation {
            config,
            history: VecDeque::new(),
            next_turn: 1,
            turn: None,
            pacer,
            out: VecDeque::new(),
            user_speaking: false,
            awaiting_final: false,
            speech_stopped_at: None,
            pending_user_text: String::new(),
            now: None,
        }
    }

    /// The history as it would be sent with the next turn.
    pub fn history(&self) -> impl Iterator<Item = &HistoryEntry> {
        self.history.iter()
    }

    /// The current assistant turn, if one is running.
    pub fn current_turn(&self) -> Option<TurnId> {
        self.turn.as_ref().map(|t| t.id)
    }

    /// Whether the shell should read more audio from TTS now (queued audio is below the cap).
    pub fn wants_tts_audio(&self) -> bool {
        self.turn
            .as_ref()
            .is_none_or(|t| t.queued < self.config.max_queued_audio)
    }

    /// Feeds one input at time `now`.
    pub fn handle_input(&mut self, now: Instant, input: Input) {
        self.now = Some(now);
        match input {
            Input::SpeechStarted { audio_ms } => {
                self.user_speaking = true;
                self.emit(ServerMessage::SpeechStarted(proto::SpeechStarted {
                    audio_ms,
                }));
                self.interrupt(now);
            }
            Input::SpeechStopped { audio_ms } => {
                self.user_speaking = false;
                self.awaiting_final = true;
                self.speech_stopped_at = Some(now);
                self.emit(ServerMessage::SpeechStopped(proto::SpeechStopped {
                    audio_ms,
                }));
                self.out.push_back(Output::FinalizeStt);
            }
            Input::SttInterim { text } => {
                if !text.trim().is_empty() {
                    self.emit(ServerMessage::UserTranscript(proto::UserTranscript {
                        text,
                        is_final: false,
                    }));
                }
            }
            Input::SttFinal { text } => self.on_final(now, text),
            Input::SttError { message } => {
                self.awaiting_final = false;
                self.pending_user_text.clear();
                self.emit(ServerMessage::error(ErrorCode::SttError, message, false));
            }
            Input::UserText { text } => {
                if text.trim().is_empty() {
                    return;
                }
                self.interrupt(now);
                self.emit(ServerMessage::UserTranscript(proto::UserTranscript {
                    text: text.clone(),
                    is_final: true,
                }));
                self.start_turn(now, now, text);
            }
            Input::Interrupt => self.interrupt(now),
            Input::PlaybackMark { turn, played_ms } => {
                if self.is_current(turn) {
                    self.pacer.on_mark(now, Duration::from_millis(played_ms));
                }
            }
            Input::LlmDelta { turn, text } => {
                if self.is_current(turn) {
                    self.on_delta(now, text);
                }
            }
            Input::LlmDone { turn } => {
                if self.is_current(turn) {
                    self.on_llm_done();
                }
            }
            Input::LlmError { turn, message } => {
                if let Some(t) = self.turn.as_mut().filter(|t| t.id == turn) {
                    t.failed = true;
                    if t.text.is_empty() {
                        // Nothing was answered: forget the question too, so that the user's
                        // retry is not merged with it into a doubled prompt.
                        let asked = std::mem::take(&mut t.user_text);
                        self.unpush_user(&asked);
                    }
                    self.emit(ServerMessage::error(ErrorCode::LlmError, message, false));
                    // Speak what was generated before the fault, then end the turn.
                    self.on_llm_done();
                }
            }
            Input::TtsFrame {
                turn,
                index,
                bytes,
                duration,
            } => {
                if self.is_current(turn) {
                    self.on_frame(now, index, bytes, duration);
                }
            }
            Input::TtsChunkDone { .. } => {}
            Input::TtsFinished { turn } => {
                if let Some(t) = self.turn.as_mut().filter(|t| t.id == turn) {
                    t.tts_done = true;
                }
            }
            Input::TtsError { turn, message } => {
                if self.is_current(turn) {
                    self.emit(ServerMessage::error(ErrorCode::TtsError, message, false));
                    let t = self
                        .turn
                        .as_mut()
                        .expect("is_current checked the turn exists");
                    t.failed = true;
                    // Stop listening to the failed stream; what is queued still plays.
                    t.tts_done = true;
                    t.llm_done = true;
                    self.out.push_back(Output::CancelTurn { turn });
                }
            }
            Input::RejectTurn { turn } => {
                if self.is_current(turn) {
                    // The turn never ran (the user was told why): its question is not part
                    // of the conversation, and must not ride along with the next one.
                    let t = self
                        .turn
                        .take()
                        .expect("is_current checked the turn exists");
                    self.unpush_user(&t.user_text);
                    self.out.push_back(Output::CancelTurn { turn });
                    self.out.push_back(Output::TurnEnded {
                        turn,
                        reason: AudioEndReason::Error,
                        audio_ms: 0,
                    });
                }
            }
            Input::Tick => {}
        }
    }

    /// The next thing to do. Call until it returns [`Output::Timeout`] or [`Output::Idle`].
    pub fn poll_output(&mut self) -> Output {
        if let Some(o) = self.out.pop_front() {
            return o;
        }
        let Some(now) = self.now else {
            return Output::Idle;
        };
        let Some(turn) = self.turn.as_mut() else {
            return Output::Idle;
        };
        if let Some((_, duration)) = turn.queue.front() {
            let duration = *duration;
            if let Some(at) = self.pacer.ready_at(now, duration) {
                return Output::Timeout(at);
            }
            let (bytes, _) = turn.queue.pop_front().expect("front() was Some");
            turn.queued = turn.queued.saturating_sub(duration);
            self.pacer.on_sent(now, duration);
            if !turn.audio_started {
                turn.audio_started = true;
                let value = now.saturating_duration_since(turn.user_done_at);
                let start = proto::AssistantAudioStart {
                    turn_id: turn.id,
                    format: self.config.output_format,
                };
                self.out
                    .push_back(Output::Send(ServerMessage::AssistantAudioStart(start)));
                self.out.push_back(Output::Audio(bytes));
                self.out.push_back(Output::Latency {
                    stage: Stage::VoiceToVoice,
                    value,
                });
                return self.out.pop_front().expect("just pushed");
            }
            return Output::Audio(bytes);
        }
        if turn.llm_done && turn.tts_done {
            // Everything was sent. The turn ends with its last frame: the client may still
            // hold up to `audio_lead` of it, which a later barge-in no longer truncates.
            let id = turn.id;
            let audio_ms = turn.audio_total_ms;
            let text = turn.text.clone();
            let reason = if turn.failed {
                AudioEndReason::Error
            } else {
                AudioEndReason::Complete
            };
            let audio_started = turn.audio_started;
            self.turn = None;
            self.push_history(Speaker::Assistant, text);
            if audio_started {
                self.emit(ServerMessage::AssistantAudioEnd(proto::AssistantAudioEnd {
                    turn_id: id,
                    duration_ms: audio_ms,
                    reason,
                }));
            }
            self.out.push_back(Output::TurnEnded {
                turn: id,
                reason,
                audio_ms,
            });
            return self.out.pop_front().expect("just pushed");
        }
        Output::Idle
    }

    fn emit(&mut self, msg: ServerMessage) {
        self.out.push_back(Output::Send(msg));
    }

    fn is_current(&self, turn: TurnId) -> bool {
        self.turn.as_ref().is_some_and(|t| t.id == turn)
    }

    fn on_final(&mut self, now: Instant, text: String) {
        let text = text.trim();
        if !text.is_empty() {
            if !self.pending_user_text.is_empty() {
                self.pending_user_text.push(' ');
            }
            self.pending_user_text.push_str(text);
        }
        if !self.awaiting_final {
            // A segment before the endpoint: keep collecting until speech stops.
            return;
        }
        self.awaiting_final = false;
        let stopped_at = self.speech_stopped_at.unwrap_or(now);
        self.out.push_back(Output::Latency {
            stage: Stage::SttFinal,
            value: now.saturating_duration_since(stopped_at),
        });
        let text = std::mem::take(&mut self.pending_user_text);
        if text.is_empty() {
            return;
        }
        self.emit(ServerMessage::UserTranscript(proto::UserTranscript {
            text: text.clone(),
            is_final: true,
        }));
        if self.user_speaking {
            // The user already started the next utterance; it will carry this one along.
            self.pending_user_text = text;
            return;
        }
        self.start_turn(now, stopped_at, text);
    }

    fn start_turn(&mut self, now: Instant, user_done_at: Instant, text: String) {
        self.push_history(Speaker::User, text.clone());
        let id = self.next_turn;
        self.next_turn += 1;
        self.turn = Some(Turn {
            id,
            user_text: text,
            text: String::new(),
            chunker: SentenceChunker::new(self.config.chunker.clone()),
            next_chunk: 0,
            spans: Vec::new(),
            queue: VecDeque::new(),
            queued: Duration::ZERO,
            audio_total_ms: 0,
            llm_done: false,
            tts_done: false,
            audio_started: false,
            failed: false,
            user_done_at,
            llm_started_at: now,
            first_token_seen: false,
            first_token_at: None,
            first_chunk_at: None,
            first_tts_audio_seen: false,
        });
        self.pacer.start_turn();
        self.out.push_back(Output::StartTurn {
            turn: id,
            system_prompt: self.config.system_prompt.clone(),
            history: self.history.iter().cloned().collect(),
        });
    }

    fn on_delta(&mut self, now: Instant, text: String) {
        let turn = self.turn.as_mut().expect("caller checked is_current");
        if !turn.first_token_seen {
            turn.first_token_seen = true;
            turn.first_token_at = Some(now);
            let value = now.saturating_duration_since(turn.llm_started_at);
            self.out.push_back(Output::Latency {
                stage: Stage::LlmFirstToken,
                value,
            });
        }
        let turn = self.turn.as_mut().expect("caller checked is_current");
        turn.text.push_str(&text);
        let mut chunks = Vec::new();
        turn.chunker.push(&text, &mut chunks);
        let slow_first_chunk = turn.next_chunk == 0
            && chunks.is_empty()
            && self.config.first_chunk_wait.is_some_and(|wait| {
                turn.first_token_at
                    .is_some_and(|at| now.saturating_duration_since(at) >= wait)
            });
        if slow_first_chunk {
            turn.chunker.cut_first_at_word(&mut chunks);
        }
        let id = turn.id;
        self.emit(ServerMessage::AssistantMessage(proto::AssistantMessage {
            turn_id: id,
            delta: Some(text),
            text: None,
            is_final: false,
        }));
        self.queue_chunks(now, chunks);
    }

    fn on_llm_done(&mut self) {
        let now = self.now.expect("handle_input sets now");
        let turn = self.turn.as_mut().expect("caller checked is_current");
        if turn.llm_done {
            return;
        }
        turn.llm_done = true;
        let mut chunks = Vec::new();
        turn.chunker.finish(&mut chunks);
        let id = turn.id;
        let text = turn.text.clone();
        self.emit(ServerMessage::AssistantMessage(proto::AssistantMessage {
            turn_id: id,
            delta: None,
            text: Some(text),
            is_final: true,
        }));
        self.queue_chunks(now, chunks);
        let turn = self.turn.as_mut().expect("still current");
        if turn.next_chunk == 0 {
            // Nothing to speak: no audio will come.
            turn.tts_done = true;
        }
        self.out.push_back(Output::TtsEnd { turn: id });
    }

    fn queue_chunks(&mut self, now: Instant, chunks: Vec<String>) {
        let turn = self.turn.as_mut().expect("caller checked is_current");
        for text in chunks {
            let index = turn.next_chunk;
            turn.next_chunk += 1;
            if turn.first_chunk_at.is_none() {
                turn.first_chunk_at = Some(now);
            }
            turn.spans.push(ChunkSpan {
                index,
                text: text.clone(),
                start_ms: 0,
                len_ms: 0,
            });
            self.out.push_back(Output::TtsText {
                turn: turn.id,
                index,
                text,
            });
        }
    }

    fn on_frame(&mut self, now: Instant, index: u32, bytes: Vec<u8>, duration: Duration) {
        let turn = self.turn.as_mut().expect("caller checked is_current");
        if !turn.first_tts_audio_seen {
            turn.first_tts_audio_seen = true;
            let from = turn.first_chunk_at.unwrap_or(now);
            let value = now.saturating_duration_since(from);
            self.out.push_back(Output::Latency {
                stage: Stage::TtsFirstAudio,
                value,
            });
        }
        let turn = self.turn.as_mut().expect("caller checked is_current");
        let ms = duration.as_millis() as u64;
        if let Some(span) = turn.spans.iter_mut().find(|s| s.index == index) {
            if span.len_ms == 0 {
                span.start_ms = turn.audio_total_ms;
            }
            span.len_ms += ms;
        }
        turn.audio_total_ms += ms;
        turn.queued += duration;
        turn.queue.push_back((bytes, duration));
    }

    /// Barge-in: ends the current assistant turn, if any, keeping only what the user heard.
    fn interrupt(&mut self, now: Instant) {
        let Some(turn) = self.turn.take() else { return };
        let played = self
            .pacer
            .played(now)
            .min(Duration::from_millis(turn.audio_total_ms));
        let played_ms = played.as_millis() as u64;
        let heard = heard_text(&turn.spans, played_ms);
        self.out.push_back(Output::CancelTurn { turn: turn.id });
        self.emit(ServerMessage::Interrupted(proto::Interrupted {
            turn_id: turn.id,
            played_ms,
            heard_text: heard.clone(),
        }));
        if turn.audio_started {
            self.emit(ServerMessage::AssistantAudioEnd(proto::AssistantAudioEnd {
                turn_id: turn.id,
                duration_ms: played_ms.min(self.pacer.sent().as_millis() as u64),
                reason: AudioEndReason::Interrupted,
            }));
        }
        self.out.push_back(Output::TurnEnded {
            turn: turn.id,
            reason: AudioEndReason::Interrupted,
            audio_ms: played_ms,
        });
        self.push_history(Speaker::Assistant, heard);
    }

    fn push_history(&mut self, speaker: Speaker, text: String) {
        if text.trim().is_empty() {
            return;
        }
        // Consecutive entries of one speaker are merged (e.g. two user utterances around an
        // interruption that left nothing heard), as chat APIs expect alternating roles.
        if let Some(last) = self.history.back_mut().filter(|e| e.speaker == speaker) {
            last.text.push(' ');
            last.text.push_str(&text);
        } else {
            self.history.push_back(HistoryEntry { speaker, text });
        }
        while self.history.len() > self.config.max_history {
            self.history.pop_front();
        }
        self.cap_history_bytes();
    }

    /// Drops the oldest entries while the history is over `max_history_bytes`; an entry that
    /// is over the cap by itself (the newest, since the others went first) keeps its end.
    fn cap_history_bytes(&mut self) {
        let cap = self.config.max_history_bytes;
        let mut total: usize = self.history.iter().map(|e| e.text.len()).sum();
        while total > cap && self.history.len() > 1 {
            let dropped = self.history.pop_front().expect("len > 1");
            total -= dropped.text.len();
        }
        if let Some(only) = self.history.front_mut().filter(|e| e.text.len() > cap) {
            let mut cut = only.text.len() - cap;
            while !only.text.is_char_boundary(cut) {
                cut += 1;
            }
            // Start at a word if there is one close by, not in the middle of one.
            if let Some(space) = only.text[cut..].find(' ').filter(|&i| i < 64) {
                cut += space + 1;
            }
            only.text.drain(..cut);
            if only.text.is_empty() {
                self.history.clear();
            }
        }
    }

    /// Takes a turn's user text back out of the history: the end of the newest user entry
    /// (it may have been merged with an earlier unanswered utterance), or the whole entry.
    fn unpush_user(&mut self, text: &str) {
        let text = text.trim();
        if text.is_empty() {
            return;
        }
        let Some(last) = self
            .history
            .back_mut()
            .filter(|e| e.speaker == Speaker::User)
        else {
            return;
        };
        match last.text.strip_suffix(text) {
            Some(rest) if !rest.trim().is_empty() => {
                let keep = rest.trim_end().len();
                last.text.truncate(keep);
            }
            _ => {
                self.history.pop_back();
            }
        }
    }
}

/// The text of the chunks the user heard by `played_ms`: whole chunks whose audio finished,
/// plus the words of the chunk being played in proportion to how much of it was played.
fn heard_text(spans: &[ChunkSpan], played_ms: u64) -> String {
    let mut heard = Vec::new();
    for span in spans {
        if span.len_ms == 0 || played_ms <= span.start_ms {
            break;
        }
        let end = span.start_ms + span.len_ms;
        if played_ms >= end {
            heard.push(span.text.clone());
        } else {
            let words: Vec<&str> = span.text.split_whitespace().collect();
            let n = (words.len() as u64 * (played_ms - span.start_ms) / span.len_ms) as usize;
            if n > 0 {
                heard.push(words[..n].join(" "));
            }
            break;
        }
    }
    heard.join(" ")
}

#[cfg(test)]
mod tests {
    //! Timeline tests: a script of timed inputs in, a printed timeline of outputs out.
    //!
    //! Script lines: `<ms> <input> [args]`. Inputs: `speech_started`, `speech_stopped`,
    //! `interim <text>`, `final <text>`, `text <text>`, `interrupt`, `mark <turn> <ms>`,
    //! `delta <turn> <text>` (`_` stands for a space), `done <turn>`, `llm_error <turn>`,
    //! `frames <turn> <chunk> <n>` (n frames of 20 ms), `tts_finished <turn>`,
    //! `tts_error <turn>`, `tick`. Time only moves forward; after each line the outputs are
    //! drained, and `run` to `<ms>` follows pacing deadlines until then.

    use super::*;
    use expect_test::{Expect, expect};

    fn frame_bytes() -> Vec<u8> {
        vec![0u8; 640]
    }

    fn describe(o: &Output) -> String {
        match o {
            Output::Send(m) => format!("send {}", m.to_json()),
            Output::Audio(b) => format!("audio {}B", b.len()),
            Output::StartTurn { turn, history, .. } => {
                let h: Vec<String> = history
                    .iter()
                    .map(|e| format!("{:?}:{}", e.speaker, e.text))
                    .collect();
                format!("start_turn {turn} history={h:?}")
            }
            Output::Latency { stage, value } => {
                format!("latency {} {}ms", stage.as_str(), value.as_millis())
            }
            other => format!("{other:?}"),
        }
    }

    fn check(script: &str, expect: Expect) {
        check_with(ConversationConfig::default(), script, expect);
    }

    pub(super) fn check_with_config(config: ConversationConfig, script: &str, expect: Expect) {
        check_with(config, script, expect);
    }

    fn check_with(config: ConversationConfig, script: &str, expect: Expect) {
        let base = Instant::now();
        let at = |ms: u64| base + Duration::from_millis(ms);
        let mut c = Conversation::new(ConversationConfig {
            system_prompt: "be brief".into(),
            ..config
        });
        let mut log = String::new();
        let mut now_ms = 0u64;
        let mut deadline: Option<Instant> = None;
        let drain = |c: &mut Conversation, log: &mut String, t: u64| -> Option<Instant> {
            let mut audio = 0;
            loop {
                let o = c.poll_output();
                if let Output::Audio(_) = o {
                    audio += 1;
                    continue;
                }
                if audio > 0 {
                    log.push_str(&format!("{t:>5} audio x{audio}\n"));
                    audio = 0;
                }
                match o {
                    Output::Timeout(d) => return Some(d),
                    Output::Idle => return None,
                    o => log.push_str(&format!("{t:>5} {}\n", describe(&o))),
                }
            }
        };
        for line in script.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let mut parts = line.splitn(3, ' ');
            let ms: u64 = parts.next().unwrap().parse().unwrap();
            let cmd = parts.next().unwrap();
            let rest = parts.next().unwrap_or("");
            // Follow pacing deadlines up to this line's time.
            while let Some(d) = deadline.filter(|d| *d <= at(ms)) {
                let t = (d - base).as_millis() as u64;
                c.handle_input(d, Input::Tick);
                deadline = drain(&mut c, &mut log, t);
            }
            assert!(ms >= now_ms, "time goes forward");
            now_ms = ms;
            let arg = |i: usize| rest.split(' ').nth(i).unwrap().to_owned();
            let num = |i: usize| arg(i).parse::<u64>().unwrap();
            let text_after = |i: usize| rest.splitn(i + 1, ' ').nth(i).unwrap().replace('_', " ");
            let input = match cmd {
                "speech_started" => Input::SpeechStarted { audio_ms: ms },
                "speech_stopped" => Input::SpeechStopped { audio_ms: ms },
                "interim" => Input::SttInterim { text: rest.into() },
                "final" => Input::SttFinal { text: rest.into() },
                "text" => Input::UserText { text: rest.into() },
                "interrupt" => Input::Interrupt,
                "mark" => Input::PlaybackMark {
                    turn: num(0),
                    played_ms: num(1),
                },
                "delta" => Input::LlmDelta {
                    turn: num(0),
                    text: text_after(1),
                },
                "done" => Input::LlmDone { turn: num(0) },
                "llm_error" => Input::LlmError {
                    turn: num(0),
                    message: "boom".into(),
                },
                "tts_finished" => Input::TtsFinished { turn: num(0) },
                "tts_error" => Input::TtsError {
                    turn: num(0),
                    message: "boom".into(),
                },
                "reject" => Input::RejectTurn { turn: num(0) },
                "tick" | "run" => Input::Tick,
                "frames" => {
                    let (turn, index, n) = (num(0), num(1) as u32, num(2));
                    for _ in 0..n {
                        c.handle_input(
                            at(ms),
                            Input::TtsFrame {
                                turn,
                                index,
                                bytes: frame_bytes(),
                                duration: Duration::from_millis(20),
                            },
                        );
                    }
                    log.push_str(&format!("{ms:>5} < {cmd} {rest}\n"));
                    deadline = drain(&mut c, &mut log, ms);
                    continue;
                }
                other => panic!("unknown script command {other}"),
            };
            if cmd != "run" {
                log.push_str(&format!("{ms:>5} < {}\n", line.split_once(' ').unwrap().1));
            }
            c.handle_input(at(ms), input);
            deadline = drain(&mut c, &mut log, ms);
        }
        let history: Vec<String> = c
            .history()
            .map(|e| format!("{:?}: {}", e.speaker, e.text))
            .collect();
        log.push_str(&format!("history: {history:?}\n"));
        expect.assert_eq(&log);
    }

    #[test]
    fn a_full_spoken_turn() {
        check(
            r#"
            0 speech_started
            900 speech_stopped
            950 interim hello
            1000 final hello there
            1150 delta 1 Hi!_How
            1170 delta 1 _can_I_help?
            1180 done 1
            1250 frames 1 0 30
            1260 tts_finished 1
            2000 run
            "#,
            expect![[r#"
                    0 < speech_started
                    0 send {"type":"vad.speech_started","audio_ms":0}
                  900 < speech_stopped
                  900 send {"type":"vad.speech_stopped","audio_ms":900}
                  900 FinalizeStt
                  950 < interim hello
                  950 send {"type":"user_transcript","text":"hello","is_final":false}
                 1000 < final hello there
                 1000 latency stt_final 100ms
                 1000 send {"type":"user_transcript","text":"hello there","is_final":true}
                 1000 start_turn 1 history=["User:hello there"]
                 1150 < delta 1 Hi!_How
                 1150 latency llm_first_token 150ms
                 1150 send {"type":"assistant_message","turn_id":1,"delta":"Hi! How","is_final":false}
                 1150 TtsText { turn: 1, index: 0, text: "Hi!" }
                 1170 < delta 1 _can_I_help?
                 1170 send {"type":"assistant_message","turn_id":1,"delta":" can I help?","is_final":false}
                 1180 < done 1
                 1180 send {"type":"assistant_message","turn_id":1,"text":"Hi! How can I help?","is_final":true}
                 1180 TtsText { turn: 1, index: 1, text: "How can I help?" }
                 1180 TtsEnd { turn: 1 }
                 1250 < frames 1 0 30
                 1250 latency tts_first_audio 100ms
                 1250 send {"type":"assistant_audio.start","turn_id":1,"format":{"encoding":"pcm16","sample_rate":16000}}
                 1250 audio x1
                 1250 latency voice_to_voice 350ms
                 1250 audio x14
                 1260 < tts_finished 1
                 1270 audio x1
                 1290 audio x1
                 1310 audio x1
                 1330 audio x1
                 1350 audio x1
                 1370 audio x1
                 1390 audio x1
                 1410 audio x1
                 1430 audio x1
                 1450 audio x1
                 1470 audio x1
                 1490 audio x1
                 1510 audio x1
                 1530 audio x1
                 1550 audio x1
                 1550 send {"type":"assistant_audio.end","turn_id":1,"duration_ms":600,"reason":"complete"}
                 1550 TurnEnded { turn: 1, reason: Complete, audio_ms: 600 }
                history: ["User: hello there", "Assistant: Hi! How can I help?"]
            "#]],
        );
    }

    /// An answer whose long first sentence is written slowly.
    const SLOW_FIRST_SENTENCE: &str = r#"
            0 text how far is the moon
            1100 delta 1 The_Moon
            1400 delta 1 _is_approximately_38
            1500 delta 1 4,4
            1600 delta 1 00_kilometers_away,_on_average.
            1700 delta 1 _Yes
            "#;

    #[test]
    fn a_slow_first_sentence_is_spoken_from_its_last_word_boundary() {
        // The first text comes at 1100; by 1400 (300 ms) the first chunk may still wait for
        // its sentence end; the delta at 1500 (400 ms, `first_chunk_wait`) cuts it at its last
        // whitespace, keeping the word being written. Later chunks end at sentence ends.
        check(
            &format!("{SLOW_FIRST_SENTENCE}\n1750 done 1"),
            expect![[r#"
                    0 < text how far is the moon
                    0 send {"type":"user_transcript","text":"how far is the moon","is_final":true}
                    0 start_turn 1 history=["User:how far is the moon"]
                 1100 < delta 1 The_Moon
                 1100 latency llm_first_token 1100ms
                 1100 send {"type":"assistant_message","turn_id":1,"delta":"The Moon","is_final":false}
                 1400 < delta 1 _is_approximately_38
                 1400 send {"type":"assistant_message","turn_id":1,"delta":" is approximately 38","is_final":false}
                 1500 < delta 1 4,4
                 1500 send {"type":"assistant_message","turn_id":1,"delta":"4,4","is_final":false}
                 1500 TtsText { turn: 1, index: 0, text: "The Moon is approximately" }
                 1600 < delta 1 00_kilometers_away,_on_average.
                 1600 send {"type":"assistant_message","turn_id":1,"delta":"00 kilometers away, on average.","is_final":false}
                 1700 < delta 1 _Yes
                 1700 send {"type":"assistant_message","turn_id":1,"delta":" Yes","is_final":false}
                 1700 TtsText { turn: 1, index: 1, text: "384,400 kilometers away, on average." }
                 1750 < done 1
                 1750 send {"type":"assistant_message","turn_id":1,"text":"The Moon is approximately 384,400 kilometers away, on average. Yes","is_final":true}
                 1750 TtsText { turn: 1, index: 2, text: "Yes" }
                 1750 TtsEnd { turn: 1 }
                history: ["User: how far is the moon"]
            "#]],
        );
        // Without the wait, the first chunk is the whole first sentence.
        check_with(
            ConversationConfig {
                first_chunk_wait: None,
                ..ConversationConfig::default()
            },
            SLOW_FIRST_SENTENCE,
            expect![[r#"
                    0 < text how far is the moon
                    0 send {"type":"user_transcript","text":"how far is the moon","is_final":true}
                    0 start_turn 1 history=["User:how far is the moon"]
                 1100 < delta 1 The_Moon
                 1100 latency llm_first_token 1100ms
                 1100 send {"type":"assistant_message","turn_id":1,"delta":"The Moon","is_final":false}
                 1400 < delta 1 _is_approximately_38
                 1400 send {"type":"assistant_message","turn_id":1,"delta":" is approximately 38","is_final":false}
                 1500 < delta 1 4,4
                 1500 send {"type":"assistant_message","turn_id":1,"delta":"4,4","is_final":false}
                 1600 < delta 1 00_kilometers_away,_on_average.
                 1600 send {"type":"assistant_message","turn_id":1,"delta":"00 kilometers away, on average.","is_final":false}
                 1600 TtsText { turn: 1, index: 0, text: "The Moon is approximately 384,400 kilometers away," }
                 1700 < delta 1 _Yes
                 1700 send {"type":"assistant_message","turn_id":1,"delta":" Yes","is_final":false}
                 1700 TtsText { turn: 1, index: 1, text: "on average." }
                history: ["User: how far is the moon"]
            "#]],
        );
    }

    #[test]
    fn barge_in_cuts_audio_and_keeps_only_what_was_heard() {
        check(
            r#"
            0 text tell me a story
            100 delta 1 Once_upon_a_time_there_was_a_king.
            110 delta 1 _He_had_three_sons_and_a_very_old_horse.
            120 done 1
            200 frames 1 0 50
            210 frames 1 1 50
            700 speech_started
            710 delta 1 late_token
            720 frames 1 1 5
            730 tts_finished 1
            1500 run
            "#,
            expect![[r#"
                    0 < text tell me a story
                    0 send {"type":"user_transcript","text":"tell me a story","is_final":true}
                    0 start_turn 1 history=["User:tell me a story"]
                  100 < delta 1 Once_upon_a_time_there_was_a_king.
                  100 latency llm_first_token 100ms
                  100 send {"type":"assistant_message","turn_id":1,"delta":"Once upon a time there was a king.","is_final":false}
                  110 < delta 1 _He_had_three_sons_and_a_very_old_horse.
                  110 send {"type":"assistant_message","turn_id":1,"delta":" He had three sons and a very old horse.","is_final":false}
                  110 TtsText { turn: 1, index: 0, text: "Once upon a time there was a king." }
                  120 < done 1
                  120 send {"type":"assistant_message","turn_id":1,"text":"Once upon a time there was a king. He had three sons and a very old horse.","is_final":true}
                  120 TtsText { turn: 1, index: 1, text: "He had three sons and a very old horse." }
                  120 TtsEnd { turn: 1 }
                  200 < frames 1 0 50
                  200 latency tts_first_audio 90ms
                  200 send {"type":"assistant_audio.start","turn_id":1,"format":{"encoding":"pcm16","sample_rate":16000}}
                  200 audio x1
                  200 latency voice_to_voice 200ms
                  200 audio x14
                  210 < frames 1 1 50
                  220 audio x1
                  240 audio x1
                  260 audio x1
                  280 audio x1
                  300 audio x1
                  320 audio x1
                  340 audio x1
                  360 audio x1
                  380 audio x1
                  400 audio x1
                  420 audio x1
                  440 audio x1
                  460 audio x1
                  480 audio x1
                  500 audio x1
                  520 audio x1
                  540 audio x1
                  560 audio x1
                  580 audio x1
                  600 audio x1
                  620 audio x1
                  640 audio x1
                  660 audio x1
                  680 audio x1
                  700 audio x1
                  700 < speech_started
                  700 send {"type":"vad.speech_started","audio_ms":700}
                  700 CancelTurn { turn: 1 }
                  700 send {"type":"interrupted","turn_id":1,"played_ms":500,"heard_text":"Once upon a time"}
                  700 send {"type":"assistant_audio.end","turn_id":1,"duration_ms":500,"reason":"interrupted"}
                  700 TurnEnded { turn: 1, reason: Interrupted, audio_ms: 500 }
                  710 < delta 1 late_token
                  720 < frames 1 1 5
                  730 < tts_finished 1
                history: ["User: tell me a story", "Assistant: Once upon a time"]
            "#]],
        );
    }

    #[test]
    fn playback_mark_corrects_what_was_heard() {
        check(
            r#"
            0 text hi
            100 delta 1 One_two_three_four.
            110 done 1
            120 frames 1 0 50
            500 mark 1 100
            520 interrupt
            "#,
            expect![[r#"
                    0 < text hi
                    0 send {"type":"user_transcript","text":"hi","is_final":true}
                    0 start_turn 1 history=["User:hi"]
                  100 < delta 1 One_two_three_four.
                  100 latency llm_first_token 100ms
                  100 send {"type":"assistant_message","turn_id":1,"delta":"One two three four.","is_final":false}
                  110 < done 1
                  110 send {"type":"assistant_message","turn_id":1,"text":"One two three four.","is_final":true}
                  110 TtsText { turn: 1, index: 0, text: "One two three four." }
                  110 TtsEnd { turn: 1 }
                  120 < frames 1 0 50
                  120 latency tts_first_audio 10ms
                  120 send {"type":"assistant_audio.start","turn_id":1,"format":{"encoding":"pcm16","sample_rate":16000}}
                  120 audio x1
                  120 latency voice_to_voice 120ms
                  120 audio x14
                  140 audio x1
                  160 audio x1
                  180 audio x1
                  200 audio x1
                  220 audio x1
                  240 audio x1
                  260 audio x1
                  280 audio x1
                  300 audio x1
                  320 audio x1
                  340 audio x1
                  360 audio x1
                  380 audio x1
                  400 audio x1
                  420 audio x1
                  440 audio x1
                  460 audio x1
                  480 audio x1
                  500 audio x1
                  500 < mark 1 100
                  520 < interrupt
                  520 CancelTurn { turn: 1 }
                  520 send {"type":"interrupted","turn_id":1,"played_ms":120,"heard_text":""}
                  520 send {"type":"assistant_audio.end","turn_id":1,"duration_ms":120,"reason":"interrupted"}
                  520 TurnEnded { turn: 1, reason: Interrupted, audio_ms: 120 }
                history: ["User: hi"]
            "#]],
        );
    }

    #[test]
    fn typed_input_while_speaking_starts_a_new_turn() {
        check(
            r#"
            0 text first question
            100 delta 1 First_answer.
            110 done 1
            120 frames 1 0 20
            300 text second question
            310 delta 1 stale
            320 delta 2 Second_answer.
            330 done 2
            "#,
            expect![[r#"
                    0 < text first question
                    0 send {"type":"user_transcript","text":"first question","is_final":true}
                    0 start_turn 1 history=["User:first question"]
                  100 < delta 1 First_answer.
                  100 latency llm_first_token 100ms
                  100 send {"type":"assistant_message","turn_id":1,"delta":"First answer.","is_final":false}
                  110 < done 1
                  110 send {"type":"assistant_message","turn_id":1,"text":"First answer.","is_final":true}
                  110 TtsText { turn: 1, index: 0, text: "First answer." }
                  110 TtsEnd { turn: 1 }
                  120 < frames 1 0 20
                  120 latency tts_first_audio 10ms
                  120 send {"type":"assistant_audio.start","turn_id":1,"format":{"encoding":"pcm16","sample_rate":16000}}
                  120 audio x1
                  120 latency voice_to_voice 120ms
                  120 audio x14
                  140 audio x1
                  160 audio x1
                  180 audio x1
                  200 audio x1
                  220 audio x1
                  300 < text second question
                  300 CancelTurn { turn: 1 }
                  300 send {"type":"interrupted","turn_id":1,"played_ms":180,"heard_text":""}
                  300 send {"type":"assistant_audio.end","turn_id":1,"duration_ms":180,"reason":"interrupted"}
                  300 TurnEnded { turn: 1, reason: Interrupted, audio_ms: 180 }
                  300 send {"type":"user_transcript","text":"second question","is_final":true}
                  300 start_turn 2 history=["User:first question second question"]
                  310 < delta 1 stale
                  320 < delta 2 Second_answer.
                  320 latency llm_first_token 20ms
                  320 send {"type":"assistant_message","turn_id":2,"delta":"Second answer.","is_final":false}
                  330 < done 2
                  330 send {"type":"assistant_message","turn_id":2,"text":"Second answer.","is_final":true}
                  330 TtsText { turn: 2, index: 0, text: "Second answer." }
                  330 TtsEnd { turn: 2 }
                history: ["User: first question second question"]
            "#]],
        );
    }

    #[test]
    fn provider_faults_end_the_turn_with_an_error() {
        check(
            r#"
            0 text one
            200 llm_error 1
            300 text two
            400 delta 2 Some_words_here.
            410 done 2
            420 frames 2 0 3
            430 tts_error 2
            600 run
            "#,
            expect![[r#"
                    0 < text one
                    0 send {"type":"user_transcript","text":"one","is_final":true}
                    0 start_turn 1 history=["User:one"]
                  200 < llm_error 1
                  200 send {"type":"error","code":"llm_error","message":"boom","fatal":false}
                  200 send {"type":"assistant_message","turn_id":1,"text":"","is_final":true}
                  200 TtsEnd { turn: 1 }
                  200 TurnEnded { turn: 1, reason: Error, audio_ms: 0 }
                  300 < text two
                  300 send {"type":"user_transcript","text":"two","is_final":true}
                  300 start_turn 2 history=["User:two"]
                  400 < delta 2 Some_words_here.
                  400 latency llm_first_token 100ms
                  400 send {"type":"assistant_message","turn_id":2,"delta":"Some words here.","is_final":false}
                  410 < done 2
                  410 send {"type":"assistant_message","turn_id":2,"text":"Some words here.","is_final":true}
                  410 TtsText { turn: 2, index: 0, text: "Some words here." }
                  410 TtsEnd { turn: 2 }
                  420 < frames 2 0 3
                  420 latency tts_first_audio 10ms
                  420 send {"type":"assistant_audio.start","turn_id":2,"format":{"encoding":"pcm16","sample_rate":16000}}
                  420 audio x1
                  420 latency voice_to_voice 120ms
                  420 audio x2
                  430 < tts_error 2
                  430 send {"type":"error","code":"tts_error","message":"boom","fatal":false}
                  430 CancelTurn { turn: 2 }
                  430 send {"type":"assistant_audio.end","turn_id":2,"duration_ms":60,"reason":"error"}
                  430 TurnEnded { turn: 2, reason: Error, audio_ms: 60 }
                history: ["User: two", "Assistant: Some words here."]
            "#]],
        );
    }

    #[test]
    fn a_rejected_turn_ends_silently_and_drops_late_output() {
        check(
            r#"
            0 text over the limit
            1 reject 1
            100 delta 1 Too_late.
            200 text again
            "#,
            expect![[r#"
                    0 < text over the limit
                    0 send {"type":"user_transcript","text":"over the limit","is_final":true}
                    0 start_turn 1 history=["User:over the limit"]
                    1 < reject 1
                    1 CancelTurn { turn: 1 }
                    1 TurnEnded { turn: 1, reason: Error, audio_ms: 0 }
                  100 < delta 1 Too_late.
                  200 < text again
                  200 send {"type":"user_transcript","text":"again","is_final":true}
                  200 start_turn 2 history=["User:again"]
                history: ["User: again"]
            "#]],
        );
    }

    #[test]
    fn empty_or_early_finals() {
        check(
            r#"
            0 speech_started
            400 speech_stopped
            450 final
            1000 speech_started
            1100 final first part
            1500 speech_stopped
            1550 final second part
            "#,
            expect![[r#"
                    0 < speech_started
                    0 send {"type":"vad.speech_started","audio_ms":0}
                  400 < speech_stopped
                  400 send {"type":"vad.speech_stopped","audio_ms":400}
                  400 FinalizeStt
                  450 < final
                  450 latency stt_final 50ms
                 1000 < speech_started
                 1000 send {"type":"vad.speech_started","audio_ms":1000}
                 1100 < final first part
                 1500 < speech_stopped
                 1500 send {"type":"vad.speech_stopped","audio_ms":1500}
                 1500 FinalizeStt
                 1550 < final second part
                 1550 latency stt_final 50ms
                 1550 send {"type":"user_transcript","text":"first part second part","is_final":true}
                 1550 start_turn 1 history=["User:first part second part"]
                history: ["User: first part second part"]
            "#]],
        );
    }
}

#[cfg(test)]
mod history_tests {
    //! The history's bounds and what stays out of it, as timelines (see `tests`).

    use super::tests::check_with_config as check_with;
    use super::*;
    use expect_test::expect;

    #[test]
    fn history_is_capped_in_bytes_oldest_first() {
        // Turn 3 drops the oldest entries until the rest fit in 100 bytes; turn 4 interrupts
        // turn 3 before anything was heard, so the two questions merge into one entry longer
        // than the cap, which keeps its newest words.
        let config = ConversationConfig {
            max_history_bytes: 100,
            ..ConversationConfig::default()
        };
        check_with(
            config,
            r#"
            0 text first question here
            10 delta 1 First_answer.
            20 done 1
            30 tts_finished 1
            100 text second question here
            110 delta 2 Second_answer.
            120 done 2
            130 tts_finished 2
            200 text one very long question that is far longer than half of the cap
            300 text and a second one, merged with it because nothing of the answer was heard
            "#,
            expect![[r#"
                    0 < text first question here
                    0 send {"type":"user_transcript","text":"first question here","is_final":true}
                    0 start_turn 1 history=["User:first question here"]
                   10 < delta 1 First_answer.
                   10 latency llm_first_token 10ms
                   10 send {"type":"assistant_message","turn_id":1,"delta":"First answer.","is_final":false}
                   20 < done 1
                   20 send {"type":"assistant_message","turn_id":1,"text":"First answer.","is_final":true}
                   20 TtsText { turn: 1, index: 0, text: "First answer." }
                   20 TtsEnd { turn: 1 }
                   30 < tts_finished 1
                   30 TurnEnded { turn: 1, reason: Complete, audio_ms: 0 }
                  100 < text second question here
                  100 send {"type":"user_transcript","text":"second question here","is_final":true}
                  100 start_turn 2 history=["User:first question here", "Assistant:First answer.", "User:second question here"]
                  110 < delta 2 Second_answer.
                  110 latency llm_first_token 10ms
                  110 send {"type":"assistant_message","turn_id":2,"delta":"Second answer.","is_final":false}
                  120 < done 2
                  120 send {"type":"assistant_message","turn_id":2,"text":"Second answer.","is_final":true}
                  120 TtsText { turn: 2, index: 0, text: "Second answer." }
                  120 TtsEnd { turn: 2 }
                  130 < tts_finished 2
                  130 TurnEnded { turn: 2, reason: Complete, audio_ms: 0 }
                  200 < text one very long question that is far longer than half of the cap
                  200 send {"type":"user_transcript","text":"one very long question that is far longer than half of the cap","is_final":true}
                  200 start_turn 3 history=["User:second question here", "Assistant:Second answer.", "User:one very long question that is far longer than half of the cap"]
                  300 < text and a second one, merged with it because nothing of the answer was heard
                  300 CancelTurn { turn: 3 }
                  300 send {"type":"interrupted","turn_id":3,"played_ms":0,"heard_text":""}
                  300 TurnEnded { turn: 3, reason: Interrupted, audio_ms: 0 }
                  300 send {"type":"user_transcript","text":"and a second one, merged with it because nothing of the answer was heard","is_final":true}
                  300 start_turn 4 history=["User:than half of the cap and a second one, merged with it because nothing of the answer was heard"]
                history: ["User: than half of the cap and a second one, merged with it because nothing of the answer was heard"]
            "#]],
        );
    }

    #[test]
    fn a_rejected_question_stays_out_even_after_an_unheard_answer() {
        check_with(
            ConversationConfig::default(),
            r#"
            0 text first question
            100 text second question
            101 reject 2
            200 text third question
            210 llm_error 3
            300 text fourth
            "#,
            expect![[r#"
                    0 < text first question
                    0 send {"type":"user_transcript","text":"first question","is_final":true}
                    0 start_turn 1 history=["User:first question"]
                  100 < text second question
                  100 CancelTurn { turn: 1 }
                  100 send {"type":"interrupted","turn_id":1,"played_ms":0,"heard_text":""}
                  100 TurnEnded { turn: 1, reason: Interrupted, audio_ms: 0 }
                  100 send {"type":"user_transcript","text":"second question","is_final":true}
                  100 start_turn 2 history=["User:first question second question"]
                  101 < reject 2
                  101 CancelTurn { turn: 2 }
                  101 TurnEnded { turn: 2, reason: Error, audio_ms: 0 }
                  200 < text third question
                  200 send {"type":"user_transcript","text":"third question","is_final":true}
                  200 start_turn 3 history=["User:first question third question"]
                  210 < llm_error 3
                  210 send {"type":"error","code":"llm_error","message":"boom","fatal":false}
                  210 send {"type":"assistant_message","turn_id":3,"text":"","is_final":true}
                  210 TtsEnd { turn: 3 }
                  210 TurnEnded { turn: 3, reason: Error, audio_ms: 0 }
                  300 < text fourth
                  300 send {"type":"user_transcript","text":"fourth","is_final":true}
                  300 start_turn 4 history=["User:first question fourth"]
                history: ["User: first question fourth"]
            "#]],
        );
    }
}
