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
    pub chunker: ChunkerConfig,
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
            chunker: ChunkerConfig::default(),
            output_format: proto::AudioFormat { encoding: proto::Encoding::Pcm16, sample_rate: 16000 },
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
    TtsFrame { turn: TurnId, index: u32, bytes: Vec<u8>, duration: Duration },
    /// TTS delivered all audio of chunk `index`.
    TtsChunkDone { turn: TurnId, index: u32 },
    /// TTS delivered all audio of the turn.
    TtsFinished { turn: TurnId },
    /// TTS failed.
    TtsError { turn: TurnId, message: String },
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
    StartTurn { turn: TurnId, system_prompt: String, history: Vec<HistoryEntry> },
    /// Speak this chunk in `turn`.
    TtsText { turn: TurnId, index: u32, text: String },
    /// No more text in `turn`.
    TtsEnd { turn: TurnId },
    /// Drop the LLM and TTS streams of `turn` now.
    CancelTurn { turn: TurnId },
    /// The turn ended (complete, interrupted or failed).
    TurnEnded { turn: TurnId, reason: AudioEndReason, audio_ms: u64 },
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
    /// When the user's turn ended (speech stop or typed input), for voice-to-voice latency.
    user_done_at: Instant,
    llm_started_at: Instant,
    first_token_seen: bool,
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
        self.turn.as_ref().is_none_or(|t| t.queued < self.config.max_queued_audio)
    }

    /// Feeds one input at time `now`.
    pub fn handle_input(&mut self, now: Instant, input: Input) {
        self.now = Some(now);
        match input {
            Input::SpeechStarted { audio_ms } => {
                self.user_speaking = true;
                self.emit(ServerMessage::SpeechStarted(proto::SpeechStarted { audio_ms }));
                self.interrupt(now);
            }
            Input::SpeechStopped { audio_ms } => {
                self.user_speaking = false;
                self.awaiting_final = true;
                self.speech_stopped_at = Some(now);
                self.emit(ServerMessage::SpeechStopped(proto::SpeechStopped { audio_ms }));
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
                if self.is_current(turn) {
                    self.emit(ServerMessage::error(ErrorCode::LlmError, message, false));
                    // Speak what was generated before the fault, then end the turn.
                    self.on_llm_done();
                }
            }
            Input::TtsFrame { turn, index, bytes, duration } => {
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
                    let t = self.turn.as_mut().expect("is_current checked the turn exists");
                    // Stop listening to the failed stream; what is queued still plays.
                    t.tts_done = true;
                    t.llm_done = true;
                    self.out.push_back(Output::CancelTurn { turn });
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
        let Some(now) = self.now else { return Output::Idle };
        let Some(turn) = self.turn.as_mut() else { return Output::Idle };
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
                self.out.push_back(Output::Send(ServerMessage::AssistantAudioStart(start)));
                self.out.push_back(Output::Audio(bytes));
                self.out.push_back(Output::Latency { stage: Stage::VoiceToVoice, value });
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
            self.turn = None;
            self.push_history(Speaker::Assistant, text);
            self.emit(ServerMessage::AssistantAudioEnd(proto::AssistantAudioEnd {
                turn_id: id,
                duration_ms: audio_ms,
                reason: AudioEndReason::Complete,
            }));
            self.out.push_back(Output::TurnEnded { turn: id, reason: AudioEndReason::Complete, audio_ms });
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
        self.push_history(Speaker::User, text);
        let id = self.next_turn;
        self.next_turn += 1;
        self.turn = Some(Turn {
            id,
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
            user_done_at,
            llm_started_at: now,
            first_token_seen: false,
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
            let value = now.saturating_duration_since(turn.llm_started_at);
            self.out.push_back(Output::Latency { stage: Stage::LlmFirstToken, value });
        }
        let turn = self.turn.as_mut().expect("caller checked is_current");
        turn.text.push_str(&text);
        let mut chunks = Vec::new();
        turn.chunker.push(&text, &mut chunks);
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
            turn.spans.push(ChunkSpan { index, text: text.clone(), start_ms: 0, len_ms: 0 });
            self.out.push_back(Output::TtsText { turn: turn.id, index, text });
        }
    }

    fn on_frame(&mut self, now: Instant, index: u32, bytes: Vec<u8>, duration: Duration) {
        let turn = self.turn.as_mut().expect("caller checked is_current");
        if !turn.first_tts_audio_seen {
            turn.first_tts_audio_seen = true;
            let from = turn.first_chunk_at.unwrap_or(now);
            let value = now.saturating_duration_since(from);
            self.out.push_back(Output::Latency { stage: Stage::TtsFirstAudio, value });
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
        let played = self.pacer.played(now).min(Duration::from_millis(turn.audio_total_ms));
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
