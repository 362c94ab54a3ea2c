//! The local engines behind duplex's provider traits: [`LocalStt`] (Whisper), [`LocalLlm`]
//! (a GGUF chat model), [`PiperTts`] and [`EspeakTts`].
//!
//! The traits want `open`/`stream` to return at once; inference is CPU-bound and blocking, so
//! every step runs on tokio's blocking pool and takes the shared [`ComputeGate`] first. Models
//! sit behind a `Mutex` (candle's models keep their caches inside): a second session waits for
//! the first one's step, and the gate keeps the order fair across engines.

use std::sync::{Arc, Mutex};

use duplex_providers::usage::{Meter, UsageKind};
use duplex_providers::{
    LanguageModel, LlmEvent, LlmRequest, LlmStream, ProviderError, Role, SpeechToText, SttEvent,
    SttInput, SttParams, SttStream, TextToSpeech, TokenUsage, TtsEvent, TtsInput, TtsParams,
    TtsStream, send_chunk_audio,
};
use tokio::sync::mpsc;

use crate::batched::{BatchedLlama, GenEvent};
use crate::espeak::Espeak;
use crate::gate::ComputeGate;
use crate::llama::LlamaChat;
use crate::llm::{ChatModel, GenParams, GenStats, Speaker};
use crate::piper::PiperVoice;
use crate::utterance::{Final, Push, UtteranceBuffer};
use crate::whisper::WhisperModel;
use futures::StreamExt;
use futures::stream::FuturesOrdered;

/// Tokens queued from the generating thread to the session: the session reads them as they
/// come; a full queue makes the generator wait (no unbounded buffering).
const LLM_EVENT_CAPACITY: usize = 32;
/// Longest audio piece sent in one `TtsEvent::Audio`: the trait asks for 20-200 ms pieces.
const TTS_PIECE_MS: usize = 200;
/// The system prompt used when a request carries none: the answer is spoken aloud.
pub const SPOKEN_SYSTEM_PROMPT: &str = "You are a friendly voice assistant. Your answers are \
    spoken aloud, so reply in one to three short sentences of plain text: no lists, no \
    markdown, no code and no emoji.";

fn internal(e: impl std::fmt::Display) -> ProviderError {
    ProviderError::Protocol(format!("local engine: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Speech to text
// ---------------------------------------------------------------------------------------------

/// A transcription running on the blocking pool.
type Transcription = tokio::task::JoinHandle<Result<String, ProviderError>>;

/// Whisper as a recognizer: buffers the utterance ([`UtteranceBuffer`]), transcribes it on
/// `Finalize`, or earlier, speculatively, when the speech pauses.
#[derive(Clone)]
pub struct LocalStt {
    model: Arc<Mutex<WhisperModel>>,
    gate: ComputeGate,
}

impl LocalStt {
    pub fn new(model: WhisperModel, gate: ComputeGate) -> LocalStt {
        LocalStt {
            model: Arc::new(Mutex::new(model)),
            gate,
        }
    }

    fn spawn_transcription(&self, samples: Vec<i16>) -> Transcription {
        let stt = self.clone();
        tokio::spawn(async move { stt.transcribe(samples).await })
    }

    /// Transcribes one utterance of 16 kHz samples on the blocking pool.
    pub async fn transcribe(&self, samples: Vec<i16>) -> Result<String, ProviderError> {
        let model = self.model.clone();
        let gate = self.gate.clone();
        tokio::task::spawn_blocking(move || {
            let audio: Vec<f32> = samples.iter().map(|&s| f32::from(s) / 32768.0).collect();
            let _turn = gate.enter();
            let mut model = model
                .lock()
                .expect("whisper lock: inference does not panic");
            model.transcribe(&audio).map(|t| {
                if let Some(why) = t.guard {
                    tracing::debug!(why, "whisper decoding stopped by a guard");
                }
                t.text
            })
        })
        .await
        .map_err(internal)?
        .map_err(internal)
    }
}

impl SpeechToText for LocalStt {
    fn name(&self) -> &str {
        "local-whisper"
    }

    fn open(&self, params: SttParams) -> SttStream {
        let (stream, mut task) = SttStream::channel();
        let this = self.clone();
        tokio::spawn(async move {
            if params.sample_rate != 16_000 {
                let _ = task
                    .events
                    .send(SttEvent::Error(ProviderError::InvalidRequest(format!(
                        "local Whisper needs 16 kHz audio, got {} Hz",
                        params.sample_rate
                    ))))
                    .await;
                return;
            }
            let mut buffer = UtteranceBuffer::default();
            // Transcriptions in the order of their `Finalize`s (each waits for the model in
            // turn); audio of the next utterance keeps arriving meanwhile, so the input
            // channel never fills up while Whisper works.
            let mut pending = FuturesOrdered::new();
            // The speculative transcription of the current utterance, if one runs.
            let mut speculation: Option<(u64, Transcription)> = None;
            loop {
                tokio::select! {
                    _ = task.cancel.cancelled() => return,
                    Some(done) = pending.next(), if !pending.is_empty() => {
                        let event = match done {
                            Ok(Ok(text)) => SttEvent::Final { text },
                            Ok(Err(e)) => SttEvent::Error(e),
                            Err(e) => SttEvent::Error(internal(e)),
                        };
                        let failed = matches!(event, SttEvent::Error(_));
                        if task.events.send(event).await.is_err() || failed {
                            return;
                        }
                    }
                    input = task.input.recv() => match input {
                        None => return,
                        Some(SttInput::Audio(samples)) => {
                            if let Push::Speculate { id, samples } = buffer.push(&samples) {
                                // One at a time: a stale speculation still running keeps the
                                // model busy, and `Finalize` falls back to a full decode.
                                let busy = speculation.as_ref().is_some_and(|(_, h)| !h.is_finished());
                                if !busy && pending.is_empty() {
                                    speculation = Some((id, this.spawn_transcription(samples)));
                                }
                            }
                        }
                        Some(SttInput::Finalize) => {
                            let job = match (buffer.finalize(), speculation.take()) {
                                (Final::UseSpeculation { id, .. }, Some((running, job))) if running == id => job,
                                (Final::UseSpeculation { samples, .. } | Final::Transcribe(samples), _) => {
                                    this.spawn_transcription(samples)
                                }
                            };
                            pending.push_back(job);
                        }
                    }
                }
            }
        });
        stream
    }
}

// ---------------------------------------------------------------------------------------------
// Language model
// ---------------------------------------------------------------------------------------------

/// A chat model engine: candle's ([`ChatModel`]) or llama.cpp's ([`LlamaChat`]).
pub trait ChatEngine: Send + 'static {
    fn model_name(&self) -> &str;
    fn generate(
        &mut self,
        messages: &[(Speaker, &str)],
        params: &GenParams,
        gate: &ComputeGate,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<GenStats, crate::Error>;
}

impl ChatEngine for ChatModel {
    fn model_name(&self) -> &str {
        &self.name
    }
    fn generate(
        &mut self,
        messages: &[(Speaker, &str)],
        params: &GenParams,
        gate: &ComputeGate,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<GenStats, crate::Error> {
        ChatModel::generate(self, messages, params, gate, on_text)
    }
}

impl ChatEngine for LlamaChat {
    fn model_name(&self) -> &str {
        &self.name
    }
    fn generate(
        &mut self,
        messages: &[(Speaker, &str)],
        params: &GenParams,
        gate: &ComputeGate,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<GenStats, crate::Error> {
        LlamaChat::generate(self, messages, params, gate, on_text)
    }
}

/// How the model is shared by sessions.
#[derive(Clone)]
enum Backend {
    /// One generation at a time holds the model for its whole answer (candle, and
    /// `LlamaChat`).
    Exclusive(Arc<Mutex<dyn ChatEngine>>),
    /// llama.cpp with continuous batching: every session's answer runs at once.
    Batched(BatchedLlama),
}

/// A GGUF chat model as a streaming language model.
#[derive(Clone)]
pub struct LocalLlm {
    backend: Backend,
    /// `local:<model>`, the provider's name.
    name: String,
    /// The model's own name, as usage records carry it.
    model_name: String,
    gate: ComputeGate,
    params: GenParams,
    meter: Meter,
}

impl LocalLlm {
    pub fn new(model: impl ChatEngine, gate: ComputeGate, params: GenParams) -> LocalLlm {
        LocalLlm {
            name: format!("local:{}", model.model_name()),
            model_name: model.model_name().to_owned(),
            backend: Backend::Exclusive(Arc::new(Mutex::new(model))),
            gate,
            params,
            meter: Meter::none(),
        }
    }

    /// The batched llama.cpp engine (it holds its own gate).
    pub fn batched(model: BatchedLlama, params: GenParams) -> LocalLlm {
        LocalLlm {
            name: format!("local:{}", model.name),
            model_name: model.name.clone(),
            backend: Backend::Batched(model),
            gate: ComputeGate::new(),
            params,
            meter: Meter::none(),
        }
    }

    /// The batched engine's counters (queue length, running answers), if it is batched.
    pub fn batch_stats(&self) -> Option<&crate::batched::BatchStats> {
        match &self.backend {
            Backend::Batched(b) => Some(b.stats()),
            Backend::Exclusive(_) => None,
        }
    }

    /// Reports each answer's prompt and completion tokens (provider `local`, price 0 unless
    /// `PROVIDER_PRICES` sets one).
    pub fn with_meter(mut self, meter: Meter) -> LocalLlm {
        self.meter = meter;
        self
    }

    /// No generation is running (none holds the model) or waiting.
    pub fn is_idle(&self) -> bool {
        match &self.backend {
            Backend::Exclusive(model) => model.try_lock().is_ok(),
            Backend::Batched(b) => b.is_idle(),
        }
    }
}

impl LanguageModel for LocalLlm {
    fn name(&self) -> &str {
        &self.name
    }

    fn stream(&self, request: LlmRequest) -> LlmStream {
        let mut params = self.params.clone();
        if let Some(max) = request.max_tokens {
            params.max_tokens = params.max_tokens.min(max as usize);
        }
        // Vary the sampling seed per request so that a repeated question is not answered
        // word for word.
        params.seed = params.seed.wrapping_add(rand::random::<u64>());
        let mut messages: Vec<(Speaker, String)> = Vec::new();
        if !request.messages.iter().any(|m| m.role == Role::System) {
            messages.push((Speaker::System, SPOKEN_SYSTEM_PROMPT.to_owned()));
        }
        for m in &request.messages {
            let who = match m.role {
                Role::System => Speaker::System,
                Role::User => Speaker::User,
                Role::Assistant => Speaker::Assistant,
            };
            messages.push((who, m.content.clone()));
        }
        let done = Finish {
            meter: self.meter.clone(),
            session_id: request.session_id.clone(),
            model_name: self.model_name.clone(),
            name: self.name.clone(),
        };
        match &self.backend {
            Backend::Batched(engine) => {
                let mut generation = engine.generate(&request.session_id, messages, params);
                // Dropping the stream drops the generation: the scheduler ends the answer at
                // its next step.
                Box::pin(
                    futures::stream::poll_fn(move |cx| {
                        let event = std::task::ready!(generation.poll_recv(cx));
                        std::task::Poll::Ready(event.map(|e| match e {
                            GenEvent::Text(text) => Ok(LlmEvent::Delta(text)),
                            GenEvent::Done(stats) => Ok(done.done(stats)),
                            GenEvent::Failed(e) => Err(internal(e)),
                        }))
                    })
                    .filter(|e| {
                        // Tokens that complete no character yet are not sent on.
                        let empty = matches!(e, Ok(LlmEvent::Delta(t)) if t.is_empty());
                        std::future::ready(!empty)
                    }),
                )
            }
            Backend::Exclusive(model) => {
                self.stream_exclusive(model.clone(), messages, params, done)
            }
        }
    }
}

/// What ends an answer: its usage, metered and reported.
struct Finish {
    meter: Meter,
    session_id: String,
    model_name: String,
    name: String,
}

impl Finish {
    fn done(&self, stats: GenStats) -> LlmEvent {
        let (model, sid) = (self.model_name.as_str(), &self.session_id);
        let prompt = stats.prompt_tokens as f64;
        self.meter
            .record(sid, "local", model, UsageKind::LlmPromptTokens, prompt);
        let completion = stats.completion_tokens as f64;
        self.meter.record(
            sid,
            "local",
            model,
            UsageKind::LlmCompletionTokens,
            completion,
        );
        LlmEvent::Done {
            usage: Some(TokenUsage {
                prompt_tokens: stats.prompt_tokens as u32,
                completion_tokens: stats.completion_tokens as u32,
            }),
            model: self.name.clone(),
        }
    }
}

impl LocalLlm {
    /// One generation on the blocking pool, holding the model for the whole answer.
    fn stream_exclusive(
        &self,
        model: Arc<Mutex<dyn ChatEngine>>,
        messages: Vec<(Speaker, String)>,
        params: GenParams,
        done: Finish,
    ) -> LlmStream {
        let (tx, mut rx) = mpsc::channel::<Result<LlmEvent, ProviderError>>(LLM_EVENT_CAPACITY);
        let gate = self.gate.clone();
        tokio::task::spawn_blocking(move || {
            let messages: Vec<(Speaker, &str)> =
                messages.iter().map(|(w, t)| (*w, t.as_str())).collect();
            // The session dropped the stream (barge-in) before we started: nothing to do.
            if tx.is_closed() {
                return;
            }
            let mut model = model.lock().expect("LLM lock: inference does not panic");
            let result = model.generate(&messages, &params, &gate, &mut |text| {
                if tx.is_closed() {
                    return false;
                }
                text.is_empty()
                    || tx
                        .blocking_send(Ok(LlmEvent::Delta(text.to_string())))
                        .is_ok()
            });
            drop(model);
            let last = match result {
                Ok(stats) => Ok(done.done(stats)),
                Err(e) => Err(internal(e)),
            };
            let _ = tx.blocking_send(last);
        });
        Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }
}

// ---------------------------------------------------------------------------------------------
// Text to speech
// ---------------------------------------------------------------------------------------------

/// Something that turns a sentence into samples, blocking.
trait Voice: Send + 'static {
    fn sample_rate(&self) -> u32;
    fn speak(&mut self, text: &str) -> Result<Vec<i16>, crate::Error>;
}

impl Voice for PiperVoice {
    fn sample_rate(&self) -> u32 {
        self.sample_rate
    }
    fn speak(&mut self, text: &str) -> Result<Vec<i16>, crate::Error> {
        self.synthesize(text)
    }
}

impl Voice for Espeak {
    fn sample_rate(&self) -> u32 {
        self.sample_rate
    }
    fn speak(&mut self, text: &str) -> Result<Vec<i16>, crate::Error> {
        Espeak::speak(self, text)
    }
}

/// A voice shared by every session.
type SharedVoice = Arc<Mutex<dyn Voice>>;

/// Speaks `text` with `voice`, or with `fallback` if `voice` fails (blocking).
fn speak_with_fallback(
    voice: &SharedVoice,
    fallback: Option<&SharedVoice>,
    text: &str,
) -> Result<(Vec<i16>, u32), crate::Error> {
    let mut v = voice.lock().expect("voice lock: synthesis does not panic");
    match v.speak(text) {
        Ok(samples) => Ok((samples, v.sample_rate())),
        Err(e) => {
            drop(v);
            let Some(fallback) = fallback else {
                return Err(e);
            };
            tracing::warn!(error = %e, "the voice failed on a sentence: the fallback voice speaks it");
            let mut f = fallback
                .lock()
                .expect("voice lock: synthesis does not panic");
            f.speak(text).map(|s| (s, f.sample_rate()))
        }
    }
}

/// Runs a TTS stream over a shared voice: one blocking synthesis per text chunk, in order; a
/// chunk the voice cannot speak goes to the fallback voice, if there is one.
fn open_tts(voice: SharedVoice, fallback: Option<SharedVoice>, gate: ComputeGate) -> TtsStream {
    let (stream, mut task) = TtsStream::channel();
    tokio::spawn(async move {
        loop {
            let input = tokio::select! {
                _ = task.cancel.cancelled() => return,
                input = task.input.recv() => input,
            };
            let (index, text) = match input {
                None => return,
                Some(TtsInput::End) => {
                    let _ = task.events.send(TtsEvent::Finished).await;
                    return;
                }
                Some(TtsInput::Text { index, text }) => (index, text),
            };
            let voice = voice.clone();
            let fallback = fallback.clone();
            let gate = gate.clone();
            let job = tokio::task::spawn_blocking(move || {
                let _turn = gate.enter();
                speak_with_fallback(&voice, fallback.as_ref(), &text)
            });
            let result = tokio::select! {
                // A barge-in drops the stream: the sentence in progress finishes on its
                // blocking thread, but nothing more is synthesized or sent.
                _ = task.cancel.cancelled() => return,
                r = job => r,
            };
            let (samples, sample_rate) = match result {
                Ok(Ok(ok)) => ok,
                Ok(Err(e)) => {
                    let _ = task.events.send(TtsEvent::Error(internal(e))).await;
                    return;
                }
                Err(e) => {
                    let _ = task.events.send(TtsEvent::Error(internal(e))).await;
                    return;
                }
            };
            let piece = (sample_rate as usize * TTS_PIECE_MS / 1000).max(1);
            if !send_chunk_audio(&task.events, index, &samples, sample_rate, piece).await {
                return;
            }
        }
    });
    stream
}

/// The Piper voice as a synthesizer.
#[derive(Clone)]
pub struct PiperTts {
    voice: SharedVoice,
    fallback: Option<SharedVoice>,
    gate: ComputeGate,
}

impl PiperTts {
    pub fn new(voice: PiperVoice, gate: ComputeGate) -> PiperTts {
        PiperTts {
            voice: Arc::new(Mutex::new(voice)),
            fallback: None,
            gate,
        }
    }

    /// Sentences Piper fails on are spoken by espeak-ng instead.
    pub fn with_fallback(mut self, espeak: &EspeakTts) -> PiperTts {
        self.fallback = Some(espeak.voice.clone());
        self
    }
}

impl TextToSpeech for PiperTts {
    fn name(&self) -> &str {
        "local-piper"
    }

    fn open(&self, _params: TtsParams) -> TtsStream {
        open_tts(self.voice.clone(), self.fallback.clone(), self.gate.clone())
    }
}

/// espeak-ng as a synthesizer: robotic, clear, and instant.
#[derive(Clone)]
pub struct EspeakTts {
    voice: SharedVoice,
    gate: ComputeGate,
}

impl EspeakTts {
    pub fn new(gate: ComputeGate) -> Result<EspeakTts, crate::Error> {
        Ok(EspeakTts {
            voice: Arc::new(Mutex::new(Espeak::global()?)),
            gate,
        })
    }
}

impl TextToSpeech for EspeakTts {
    fn name(&self) -> &str {
        "local-espeak"
    }

    fn open(&self, _params: TtsParams) -> TtsStream {
        open_tts(self.voice.clone(), None, self.gate.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A voice that fails on every sentence, or speaks one sample per character.
    struct Fake(bool);

    impl Voice for Fake {
        fn sample_rate(&self) -> u32 {
            16_000
        }
        fn speak(&mut self, text: &str) -> Result<Vec<i16>, crate::Error> {
            if self.0 {
                Ok(vec![7; text.len()])
            } else {
                Err(crate::Error::Inference("no phonemes".into()))
            }
        }
    }

    async fn speak(tts: TtsStream, text: &str) -> Vec<TtsEvent> {
        let mut tts = tts;
        tts.input
            .send(TtsInput::Text {
                index: 0,
                text: text.into(),
            })
            .await
            .unwrap();
        tts.input.send(TtsInput::End).await.unwrap();
        let mut events = Vec::new();
        while let Some(e) = tts.events.recv().await {
            let done = matches!(e, TtsEvent::Finished | TtsEvent::Error(_));
            events.push(e);
            if done {
                break;
            }
        }
        events
    }

    #[tokio::test]
    async fn a_sentence_the_voice_fails_on_is_spoken_by_the_fallback() {
        let failing: SharedVoice = Arc::new(Mutex::new(Fake(false)));
        let working: SharedVoice = Arc::new(Mutex::new(Fake(true)));
        let gate = ComputeGate::new();
        let events = speak(
            open_tts(failing.clone(), Some(working), gate.clone()),
            "hello",
        )
        .await;
        assert!(
            matches!(&events[0], TtsEvent::Audio { samples, .. } if samples.len() == 5),
            "{events:?}"
        );
        assert!(
            matches!(events.last(), Some(TtsEvent::Finished)),
            "{events:?}"
        );
        // Without a fallback the failure is the stream's error.
        let events = speak(open_tts(failing, None, gate), "hello").await;
        assert!(
            matches!(events.as_slice(), [TtsEvent::Error(_)]),
            "{events:?}"
        );
    }
}
