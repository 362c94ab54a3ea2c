//! The local engines behind duplex's provider traits: [`LocalStt`] (Whisper), [`LocalLlm`]
//! (a GGUF chat model), [`PiperTts`] and [`EspeakTts`].
//!
//! The traits want `open`/`stream` to return at once; inference is CPU-bound and blocking, so
//! every step runs on tokio's blocking pool and takes the shared [`ComputeGate`] first. Models
//! sit behind a `Mutex` (candle's models keep their caches inside): a second session waits for
//! the first one's step, and the gate keeps the order fair across engines.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use duplex_providers::usage::{Meter, UsageKind};
use duplex_providers::{
    LanguageModel, LlmEvent, LlmRequest, LlmStream, ProviderError, Role, SpeechToText, SttEvent,
    SttInput, SttParams, SttStream, TextToSpeech, TokenUsage, TtsEvent, TtsInput, TtsParams,
    TtsStream, send_chunk_audio,
};
use tokio::sync::mpsc;

use crate::batched::{BatchedLlama, GenEvent};
use crate::espeak::Espeak;
use crate::gate::{ComputeGate, Urgency};
use crate::llama::LlamaChat;
use crate::llm::{ChatModel, GenParams, GenStats, Speaker};
use crate::observe::{Engine, Observe, Observer};
use crate::piper::PiperVoice;
use crate::pool::{Pool, PoolStats, Priority};
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

/// Whisper instances (clones sharing the weights) transcribing at once. Two: a second
/// session's utterance starts without waiting for the whole of the first one's, and their
/// steps interleave through the gate. On 2 shared cores two at once took about as long as two
/// in a row (6.0-8.7 s against 5.7-11.2 s through the gate, three runs under other builds'
/// load), three at once made the mean wait worse
/// (`cargo bench -p duplex-local --bench engines concurrency`).
pub const WHISPER_INSTANCES: usize = 2;
/// Transcription jobs that may wait for an instance: a few sessions' finals and speculations;
/// beyond it the oldest waiting speculation is dropped (a final never is).
pub const STT_MAX_WAITING: usize = 8;

/// A spawned job that is aborted when dropped (a stale speculation, a closed stream): its
/// pool job is then removed from the queue or stopped at its next step.
struct Task<R>(tokio::task::JoinHandle<Result<R, crate::Error>>);

impl<R: Send + 'static> Task<R> {
    fn spawn(job: impl Future<Output = Result<R, crate::Error>> + Send + 'static) -> Task<R> {
        Task(tokio::spawn(job))
    }
}

impl<R> Drop for Task<R> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<R> Future for Task<R> {
    type Output = Result<R, crate::Error>;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx).map(|r| match r {
            Ok(r) => r,
            Err(e) if e.is_cancelled() => Err(crate::Error::Cancelled),
            Err(e) => Err(crate::Error::Panicked(e.to_string())),
        })
    }
}

/// A test hook: the next job of an engine panics inside inference.
#[derive(Clone, Default)]
struct PanicHook(Arc<AtomicBool>);

impl PanicHook {
    fn fire(&self) {
        if self.0.swap(false, Ordering::SeqCst) {
            panic!("injected panic (test hook)");
        }
    }
}

/// Whisper as a recognizer: buffers the utterance ([`UtteranceBuffer`]), transcribes it on
/// `Finalize`, or earlier, speculatively, when the speech pauses. Sessions share a pool of
/// [`WHISPER_INSTANCES`]; each transcription takes the [`ComputeGate`] per step (the encoder,
/// each decoder token).
#[derive(Clone)]
pub struct LocalStt {
    pool: Pool<WhisperModel>,
    gate: ComputeGate,
    observer: Observer,
    panic_hook: PanicHook,
}

impl LocalStt {
    pub fn new(model: WhisperModel, gate: ComputeGate) -> LocalStt {
        LocalStt::with_instances(model, WHISPER_INSTANCES, gate)
    }

    /// `instances` clones of `model` (at least one).
    pub fn with_instances(model: WhisperModel, instances: usize, gate: ComputeGate) -> LocalStt {
        let observer = Observer::none();
        let models = vec![model; instances.max(1)];
        LocalStt {
            pool: Pool::new(models, STT_MAX_WAITING, Engine::Stt, observer.clone()),
            gate,
            observer,
            panic_hook: PanicHook::default(),
        }
    }

    /// Reports queue waits and dropped speculations to `observe` (once).
    pub fn set_observer(&self, observe: Arc<dyn Observe>) -> bool {
        self.observer.set(observe)
    }

    /// The pool's counters (jobs started, speculations dropped, panics).
    pub fn pool_stats(&self) -> &PoolStats {
        self.pool.stats()
    }

    /// Test hook: the next transcription panics inside the engine.
    #[doc(hidden)]
    pub fn panic_on_next_job(&self) {
        self.panic_hook.0.store(true, Ordering::SeqCst);
    }

    /// Transcribes one utterance of 16 kHz samples on the blocking pool.
    pub async fn transcribe(&self, samples: Vec<i16>) -> Result<String, ProviderError> {
        self.transcribe_as(Priority::Needed, samples)
            .await
            .map_err(internal)
    }

    async fn transcribe_as(
        &self,
        priority: Priority,
        samples: Vec<i16>,
    ) -> Result<String, crate::Error> {
        let needed = Arc::new(AtomicBool::new(priority != Priority::Speculative));
        self.transcribe_flagged(priority, needed, samples).await
    }

    /// Transcribes `samples`; each step is a transcript's at the compute gate (ahead of the
    /// urgent LLM and speech steps) while `needed` is set (a final transcript; a speculation
    /// once a final waits for it).
    async fn transcribe_flagged(
        &self,
        priority: Priority,
        needed: Arc<AtomicBool>,
        samples: Vec<i16>,
    ) -> Result<String, crate::Error> {
        let gate = self.gate.clone();
        let hook = self.panic_hook.clone();
        self.pool
            .run(priority, move |model, cancel| {
                let audio: Vec<f32> = samples.iter().map(|&s| f32::from(s) / 32768.0).collect();
                hook.fire();
                let urgency = || {
                    if needed.load(Ordering::Relaxed) {
                        Urgency::Transcript
                    } else {
                        Urgency::Normal
                    }
                };
                let t = model
                    .transcribe_as(&audio, Some((&gate, &urgency)), &|| cancel.is_cancelled())?;
                if let Some(why) = t.guard {
                    tracing::debug!(why, "whisper decoding stopped by a guard");
                }
                Ok(t.text)
            })
            .await
    }

    /// A speculative transcription, and the flag that makes its steps urgent.
    fn spawn_speculation(&self, samples: Vec<i16>) -> Speculation {
        let stt = self.clone();
        let needed = Arc::new(AtomicBool::new(false));
        let flag = needed.clone();
        Speculation {
            task: Task::spawn(async move {
                stt.transcribe_flagged(Priority::Speculative, flag, samples)
                    .await
            }),
            needed,
        }
    }

    fn spawn_transcription(&self, priority: Priority, samples: Vec<i16>) -> Task<String> {
        let stt = self.clone();
        Task::spawn(async move { stt.transcribe_as(priority, samples).await })
    }

    /// The final transcript of an utterance whose speculation `speculation` covers: its
    /// result (its remaining steps now urgent: the user waits for it), or a transcription of
    /// `samples` if it was dropped from a full queue.
    fn finish_speculation(&self, speculation: Speculation, samples: Vec<i16>) -> Task<String> {
        let stt = self.clone();
        speculation.needed.store(true, Ordering::Relaxed);
        Task::spawn(async move {
            match speculation.task.await {
                Err(crate::Error::Cancelled) => stt.transcribe_as(Priority::Needed, samples).await,
                other => other,
            }
        })
    }
}

/// A running speculative transcription.
struct Speculation {
    task: Task<String>,
    /// Set when a final transcript waits for it.
    needed: Arc<AtomicBool>,
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
            // Transcriptions in the order of their `Finalize`s; audio of the next utterance
            // keeps arriving meanwhile, so the input channel never fills up while Whisper
            // works. Returning drops (aborts) every job still queued or running.
            let mut pending = FuturesOrdered::new();
            // The speculative transcription of the current utterance, if one runs.
            let mut speculation: Option<(u64, Speculation)> = None;
            loop {
                tokio::select! {
                    _ = task.cancel.cancelled() => return,
                    Some(done) = pending.next(), if !pending.is_empty() => {
                        let event = match done {
                            Ok(text) => SttEvent::Final { text },
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
                                // A newer snapshot makes a running speculation stale: it is
                                // dropped (cancelled), not awaited.
                                speculation = Some((id, this.spawn_speculation(samples)));
                            }
                        }
                        Some(SttInput::Finalize) => {
                            let job = match (buffer.finalize(), speculation.take()) {
                                (Final::UseSpeculation { id, samples }, Some((running, job))) if running == id => {
                                    this.finish_speculation(job, samples)
                                }
                                // A stale speculation is dropped here, cancelled.
                                (Final::UseSpeculation { samples, .. } | Final::Transcribe(samples), _) => {
                                    this.spawn_transcription(Priority::Needed, samples)
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
    /// `LlamaChat`). An async lock: a turn dropped while it waits leaves the queue at once,
    /// and a panic under it poisons nothing.
    Exclusive(Arc<tokio::sync::Mutex<Box<dyn ChatEngine>>>),
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
    observer: Observer,
    panic_hook: PanicHook,
}

impl LocalLlm {
    pub fn new(model: impl ChatEngine, gate: ComputeGate, params: GenParams) -> LocalLlm {
        LocalLlm {
            name: format!("local:{}", model.model_name()),
            model_name: model.model_name().to_owned(),
            backend: Backend::Exclusive(Arc::new(tokio::sync::Mutex::new(Box::new(model)))),
            gate,
            params,
            meter: Meter::none(),
            observer: Observer::none(),
            panic_hook: PanicHook::default(),
        }
    }

    /// The batched llama.cpp engine (it holds its own gate).
    pub fn batched(model: BatchedLlama, params: GenParams) -> LocalLlm {
        LocalLlm {
            name: format!("local:{}", model.name),
            model_name: model.name.clone(),
            observer: model.observer().clone(),
            backend: Backend::Batched(model),
            gate: ComputeGate::new(),
            params,
            meter: Meter::none(),
            panic_hook: PanicHook::default(),
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

    /// Reports queue waits, decode steps, tokens and running answers to `observe` (once).
    pub fn set_observer(&self, observe: Arc<dyn Observe>) -> bool {
        self.observer.set(observe)
    }

    /// Test hook: the next answer panics inside the engine.
    #[doc(hidden)]
    pub fn panic_on_next_job(&self) {
        match &self.backend {
            Backend::Batched(b) => b.panic_on_next_job(),
            Backend::Exclusive(_) => self.panic_hook.0.store(true, Ordering::SeqCst),
        }
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
    /// One generation on the blocking pool, holding the model for the whole answer. The turn
    /// waits for the model asynchronously: dropped meanwhile (barge-in), it never starts.
    fn stream_exclusive(
        &self,
        model: Arc<tokio::sync::Mutex<Box<dyn ChatEngine>>>,
        messages: Vec<(Speaker, String)>,
        params: GenParams,
        done: Finish,
    ) -> LlmStream {
        let (tx, mut rx) = mpsc::channel::<Result<LlmEvent, ProviderError>>(LLM_EVENT_CAPACITY);
        let gate = self.gate.clone();
        let observer = self.observer.clone();
        let hook = self.panic_hook.clone();
        tokio::spawn(async move {
            let queued = Instant::now();
            let mut model = tokio::select! {
                model = model.lock_owned() => model,
                () = tx.closed() => return,
            };
            observer.queue_wait(Engine::Llm, queued.elapsed());
            tokio::task::spawn_blocking(move || {
                let messages: Vec<(Speaker, &str)> =
                    messages.iter().map(|(w, t)| (*w, t.as_str())).collect();
                // Dropped in the instant between the lock and this thread: nothing to do.
                if tx.is_closed() {
                    return;
                }
                observer.llm_active(1);
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    hook.fire();
                    model.generate(&messages, &params, &gate, &mut |text| {
                        observer.llm_tokens(1);
                        if tx.is_closed() {
                            return false;
                        }
                        text.is_empty()
                            || tx
                                .blocking_send(Ok(LlmEvent::Delta(text.to_string())))
                                .is_ok()
                    })
                }));
                observer.llm_active(0);
                drop(model);
                let last = match result {
                    Ok(Ok(stats)) => Ok(done.done(stats)),
                    Ok(Err(e)) => Err(internal(e)),
                    Err(_) => {
                        tracing::error!("the local LLM panicked on an answer");
                        Err(internal("the LLM panicked on this answer"))
                    }
                };
                let _ = tx.blocking_send(last);
            });
        });
        Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }
}

// ---------------------------------------------------------------------------------------------
// Text to speech
// ---------------------------------------------------------------------------------------------

/// Piper sessions (ONNX Runtime sessions of the same voice) serving sentences at once: two,
/// so that a sentence never waits for another session's whole synthesis (phonemizing,
/// normalising); the model runs themselves take the gate in turn, since on 2 cores two runs
/// at once were no faster than two in a row (0.46-1.70 s against 0.85-1.5 s over three noisy
/// runs; `cargo bench -p duplex-local --bench engines concurrency`).
pub const PIPER_SESSIONS: usize = 2;
/// Intra-op threads of each Piper session: one was as fast as two per sentence on the busy
/// 2-core machine (0.26-0.69 s against 0.31-0.94 s) and leaves a core to the other engines.
pub const PIPER_THREADS: usize = 1;
/// Sentences that may wait for a voice: one per session speaking now, a few sessions.
const TTS_MAX_WAITING: usize = 16;

/// Something that turns a sentence into samples, blocking.
pub(crate) trait Voice: Send + 'static {
    fn sample_rate(&self) -> u32;
    /// Speaks `text`, holding `gate` (with `urgency`) while it computes.
    fn speak(
        &mut self,
        text: &str,
        gate: &ComputeGate,
        urgency: Urgency,
    ) -> Result<Vec<i16>, crate::Error>;
}

impl Voice for PiperVoice {
    fn sample_rate(&self) -> u32 {
        self.sample_rate
    }
    fn speak(
        &mut self,
        text: &str,
        gate: &ComputeGate,
        urgency: Urgency,
    ) -> Result<Vec<i16>, crate::Error> {
        self.synthesize_as(text, Some((gate, urgency)))
    }
}

impl Voice for Espeak {
    fn sample_rate(&self) -> u32 {
        self.sample_rate
    }
    fn speak(
        &mut self,
        text: &str,
        gate: &ComputeGate,
        urgency: Urgency,
    ) -> Result<Vec<i16>, crate::Error> {
        // espeak-ng synthesizes on one thread.
        let _turn = gate.enter_as(urgency, 1, 1);
        Espeak::speak(self, text)
    }
}

/// A pool of voices shared by every session, and the voice that speaks what they fail on.
#[derive(Clone)]
struct Voices {
    pool: Pool<Box<dyn Voice>>,
    fallback: Option<Pool<Box<dyn Voice>>>,
    gate: ComputeGate,
    observer: Observer,
    panic_hook: PanicHook,
}

impl Voices {
    fn new(voices: Vec<Box<dyn Voice>>, gate: ComputeGate) -> Voices {
        let observer = Observer::none();
        Voices {
            pool: Pool::new(voices, TTS_MAX_WAITING, Engine::Tts, observer.clone()),
            fallback: None,
            gate,
            observer,
            panic_hook: PanicHook::default(),
        }
    }

    async fn run(
        &self,
        pool: &Pool<Box<dyn Voice>>,
        priority: Priority,
        text: String,
    ) -> Result<(Vec<i16>, u32), crate::Error> {
        let (gate, hook) = (self.gate.clone(), self.panic_hook.clone());
        let urgency = match priority {
            Priority::First => Urgency::Urgent,
            Priority::Needed | Priority::Speculative => Urgency::Normal,
        };
        pool.run(priority, move |voice, _| {
            hook.fire();
            voice
                .speak(&text, &gate, urgency)
                .map(|samples| (samples, voice.sample_rate()))
        })
        .await
    }

    /// Speaks `text`, or has the fallback voice speak it if the voice fails (a panic too).
    /// An answer's first sentence (`Priority::First`) goes ahead of other answers' later ones.
    async fn speak(
        &self,
        priority: Priority,
        text: String,
    ) -> Result<(Vec<i16>, u32), crate::Error> {
        match self.run(&self.pool, priority, text.clone()).await {
            Err(e) if !matches!(e, crate::Error::Cancelled) => {
                let Some(fallback) = &self.fallback else {
                    return Err(e);
                };
                tracing::warn!(error = %e, "the voice failed on a sentence: the fallback voice speaks it");
                self.run(fallback, priority, text).await
            }
            other => other,
        }
    }
}

/// Runs a TTS stream over shared voices: one synthesis per text chunk, in order.
fn open_tts(voices: Voices) -> TtsStream {
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
            let result = tokio::select! {
                // A barge-in drops the stream: a sentence still queued never starts, the one
                // in progress finishes on its blocking thread, nothing more is sent.
                _ = task.cancel.cancelled() => return,
                // The first sentence of an answer: its user has heard nothing yet.
                r = voices.speak(if index == 0 { Priority::First } else { Priority::Needed }, text) => r,
            };
            let (samples, sample_rate) = match result {
                Ok(ok) => ok,
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

/// The Piper voice as a synthesizer: [`PIPER_SESSIONS`] ONNX Runtime sessions of the voice
/// speak several sessions' sentences at once, each holding the [`ComputeGate`] only while
/// the model runs.
#[derive(Clone)]
pub struct PiperTts {
    voices: Voices,
}

impl PiperTts {
    /// One pool entry per loaded voice (at least one).
    pub fn new(voices: Vec<PiperVoice>, gate: ComputeGate) -> PiperTts {
        let voices = voices
            .into_iter()
            .map(|v| Box::new(v) as Box<dyn Voice>)
            .collect();
        PiperTts {
            voices: Voices::new(voices, gate),
        }
    }

    /// Sentences Piper fails on are spoken by espeak-ng instead.
    pub fn with_fallback(mut self, espeak: &EspeakTts) -> PiperTts {
        self.voices.fallback = Some(espeak.voices.pool.clone());
        self
    }

    /// Reports queue waits to `observe` (once).
    pub fn set_observer(&self, observe: Arc<dyn Observe>) -> bool {
        self.voices.observer.set(observe)
    }

    pub fn pool_stats(&self) -> &PoolStats {
        self.voices.pool.stats()
    }

    /// Speaks one sentence: samples and their rate.
    pub async fn synthesize(&self, text: &str) -> Result<(Vec<i16>, u32), ProviderError> {
        self.voices
            .speak(Priority::Needed, text.to_owned())
            .await
            .map_err(internal)
    }

    /// Test hook: the next synthesis panics inside the engine.
    #[doc(hidden)]
    pub fn panic_on_next_job(&self) {
        self.voices.panic_hook.0.store(true, Ordering::SeqCst);
    }
}

impl TextToSpeech for PiperTts {
    fn name(&self) -> &str {
        "local-piper"
    }

    fn open(&self, _params: TtsParams) -> TtsStream {
        open_tts(self.voices.clone())
    }
}

/// espeak-ng as a synthesizer: robotic, clear, and instant.
#[derive(Clone)]
pub struct EspeakTts {
    voices: Voices,
}

/// Handles on the espeak-ng thread (it serialises the library's calls itself).
const ESPEAK_HANDLES: usize = 2;

impl EspeakTts {
    pub fn new(gate: ComputeGate) -> Result<EspeakTts, crate::Error> {
        let espeak = Espeak::global()?;
        let voices = (0..ESPEAK_HANDLES)
            .map(|_| Box::new(espeak.clone()) as Box<dyn Voice>)
            .collect();
        Ok(EspeakTts {
            voices: Voices::new(voices, gate),
        })
    }

    /// Reports queue waits to `observe` (once).
    pub fn set_observer(&self, observe: Arc<dyn Observe>) -> bool {
        self.voices.observer.set(observe)
    }
}

impl TextToSpeech for EspeakTts {
    fn name(&self) -> &str {
        "local-espeak"
    }

    fn open(&self, _params: TtsParams) -> TtsStream {
        open_tts(self.voices.clone())
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
        fn speak(
            &mut self,
            text: &str,
            _: &ComputeGate,
            _: Urgency,
        ) -> Result<Vec<i16>, crate::Error> {
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

    fn voices(working: bool) -> Voices {
        Voices::new(vec![Box::new(Fake(working))], ComputeGate::new())
    }

    #[tokio::test]
    async fn a_sentence_the_voice_fails_on_is_spoken_by_the_fallback() {
        let mut failing = voices(false);
        failing.fallback = Some(voices(true).pool);
        let events = speak(open_tts(failing.clone()), "hello").await;
        assert!(
            matches!(&events[0], TtsEvent::Audio { samples, .. } if samples.len() == 5),
            "{events:?}"
        );
        assert!(
            matches!(events.last(), Some(TtsEvent::Finished)),
            "{events:?}"
        );
        // A panic inside the voice is a failure like another: the fallback speaks.
        failing.panic_hook.0.store(true, Ordering::SeqCst);
        let events = speak(open_tts(failing.clone()), "hello").await;
        assert!(
            matches!(&events[0], TtsEvent::Audio { samples, .. } if samples.len() == 5),
            "{events:?}"
        );
        // Without a fallback the failure is the stream's error.
        failing.fallback = None;
        let events = speak(open_tts(failing), "hello").await;
        assert!(
            matches!(events.as_slice(), [TtsEvent::Error(_)]),
            "{events:?}"
        );
    }

    #[tokio::test]
    async fn a_panicking_voice_fails_its_sentence_and_speaks_the_next() {
        let working = voices(true);
        working.panic_hook.0.store(true, Ordering::SeqCst);
        let events = speak(open_tts(working.clone()), "hello").await;
        assert!(
            matches!(events.as_slice(), [TtsEvent::Error(_)]),
            "{events:?}"
        );
        let events = speak(open_tts(working.clone()), "hello").await;
        assert!(
            matches!(&events[0], TtsEvent::Audio { samples, .. } if samples.len() == 5),
            "{events:?}"
        );
        assert_eq!(working.pool.stats().panicked.load(Ordering::SeqCst), 1);
    }
}
