//! One WebSocket connection: the IO shell around the pure session machine
//! (`duplex_session::Session`), which holds every rule of a session.
//!
//! ```text
//!  socket ◄─► (read, and written, in the shell's loop) ─ClientIn─► shell ──Outbound (OUTBOUND_CAPACITY)──┐
//!                                                  │  ▲  │ ▲  │ ▲   ▲ persists (JoinSet)                 │
//!                                  SttInput (try_send) │  │ │  │ │   │          queued in the shell's Socket ┘
//!                                                  SttEvent │ │  │ TtsEvent (read only while the
//!                                                     LlmEvent  TtsInput     machine wants audio)
//! ```
//!
//! The shell reads one clock (tokio's, so paused-time tests stay consistent), turns every
//! event into a `duplex_session::Input`, sleeps until the machine's next deadline, and carries
//! out its `Command`s. It never awaits a send: audio to STT goes by `try_send`, and what the
//! client gets is queued in the shell's [`Socket`] and written when the loop next polls it
//! (its last branch: hand what is queued to the WebSocket, read, and flush once nothing is
//! left to read, so a shell catching up on several frames answers them with one write). A full STT queue drops (and counts)
//! frames; a full socket queue (256 messages or `OUTBOUND_BYTES`, whichever comes first) means
//! the client stopped reading, and the session ends with `slow_consumer` instead of buffering
//! without limit. Reading and writing the socket in the shell's own loop saves, per frame, a
//! reader task, a writer task, their channel hops and cross-thread wake-ups, and the lock
//! between two halves of a split socket; a busy shell does not read, so TCP pushes back on
//! the client. Every task it spawns (the socket's closing task at release, the LLM forwarder,
//! usage writes, the start record) is owned here and ended with the session.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::WebSocket;
use duplex_proto::{ErrorCode, ServerMessage, SessionStart};
use duplex_providers::{
    ChatMessage, LlmEvent, LlmRequest, ProviderError, ProviderSet, Role, SttEvent, SttInput,
    SttParams, SttStream, TtsEvent, TtsInput, TtsParams, TtsStream,
};
use duplex_session::{
    ClientIn, Command, Input, LlmIn, Observation, Session, SessionConfig, Speaker, SttIn, TtsIn,
    TurnId, TurnRequest, UsageTotals,
};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::config::Config;
use crate::metrics::Metrics;

mod socket;

use socket::{Outbound, PushError, Socket, SocketEvent, client_in};

/// Messages queued for the socket. Pacing keeps only `audio_lead / 20 ms` (~15) audio frames in
/// flight and JSON events are sparse, so a healthy client never gets near 256; a client that
/// stops reading fills it within seconds and is disconnected as a slow consumer.
const OUTBOUND_CAPACITY: usize = 256;
/// Bytes queued for the socket, whatever the number of messages: a client that stops reading
/// cannot make the server hold more than this for it (a message-count bound alone would let
/// large messages pin megabytes). ~5 s of 48 kHz PCM16 audio, far beyond the pacer's lead.
const OUTBOUND_BYTES: usize = 512 * 1024;
/// Token events of one LLM turn queued for the shell; tokens are small and read at once.
const LLM_EVENT_CAPACITY: usize = 32;
/// A store call (admission, a usage write, the session records) that takes longer than this
/// is treated as failed (usage writes are retried by the meter).
pub(crate) const STORE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything a session needs from the server.
#[derive(Clone)]
pub(crate) struct SessionContext {
    pub config: Arc<Config>,
    pub metrics: Metrics,
    pub providers: Option<ProviderSet>,
    pub shutdown: CancellationToken,
    pub store: duplex_store::Store,
    pub usage_routes: crate::metering::SessionUsage,
    pub turn_limiter: duplex_metering::UserTurnLimiter,
    pub spend_cache: crate::metering::SpendCache,
    pub usage_backlog: crate::metering::UsageBacklog,
}

/// The session machine's settings from the server's configuration.
fn session_config(config: &Config, id: &str, providers: Option<&ProviderSet>) -> SessionConfig {
    SessionConfig {
        session_id: id.to_owned(),
        engines: providers.map(|p| duplex_proto::ProviderNames {
            stt: p.stt.name().to_owned(),
            llm: p.llm.name().to_owned(),
            tts: p.tts.name().to_owned(),
        }),
        system_prompt: config.assistant.system_prompt.clone(),
        audio_lead: config.assistant.audio_lead,
        first_chunk_wait: config.assistant.first_chunk_wait,
        vad_mode: config.turns.vad_mode,
        speech_start: config.turns.speech_start,
        end_of_turn: config.turns.end_of_turn,
        max_turn: config.turns.max_turn,
        idle_timeout: config.limits.idle_timeout,
        pre_start_timeout: config.limits.pre_start_timeout,
        shutdown_grace: config.limits.shutdown_grace,
        max_message_bytes: config.limits.max_message_bytes,
        max_input_text_chars: config.limits.max_input_text_chars,
        max_audio_ahead: config.limits.max_audio_ahead,
        model_check: providers.map(|p| {
            let llm = p.llm.clone();
            duplex_session::ModelCheck::new(move |plan, model| llm.check_model(plan, model))
        }),
        usage_heartbeat: config.metering.usage_heartbeat,
        final_write_timeout: duplex_session::DEFAULT_FINAL_WRITE_TIMEOUT,
        jitter_seed: rand::random(),
    }
}

/// Runs one connection to its end.
pub(crate) async fn run(
    socket: WebSocket,
    ctx: SessionContext,
    start: Option<Result<SessionStart, (ErrorCode, String)>>,
    peer: SocketAddr,
    max_message_bytes: usize,
    identity: crate::auth::Identity,
    switches: tokio::sync::watch::Receiver<duplex_metering::Switches>,
) {
    let session_id = uuid::Uuid::new_v4().simple().to_string();
    let span =
        tracing::info_span!("session", session_id = %session_id, turn_id = tracing::field::Empty);
    async move {
        info!(%peer, "session connected");
        ctx.metrics.sessions_total.inc();
        ctx.metrics.active_sessions.inc();
        let config = session_config(&ctx.config, &session_id, ctx.providers.as_ref());
        let machine = Session::new(config, ctx.turn_limiter.clone(), now(), wall_clock());
        let mut shell = Shell {
            ctx: ctx.clone(),
            id: session_id,
            machine,
            socket: Some(Socket::new(socket, OUTBOUND_CAPACITY, OUTBOUND_BYTES)),
            writer_gone: false,
            closing: None,
            max_message_bytes,
            timer: Box::pin(tokio::time::sleep_until(Instant::now())),
            timer_at: None,
            shutdown: Box::pin(ctx.shutdown.clone().cancelled_owned()),
            stt: None,
            llm: None,
            tts: None,
            persists: JoinSet::new(),
            start_record: None,
            usage: None,
            switches,
            switches_open: true,
            shutdown_seen: false,
        };
        shell.run(&identity, start).await;
        if let Some(socket) = shell.socket.take() {
            socket.finish().await;
        }
        if let Some(closing) = shell.closing.take() {
            let _ = closing.await;
        }
        drop(shell);
        ctx.metrics.active_sessions.dec();
        info!("session closed");
    }
    .instrument(span)
    .await
}

/// The one clock of the shell.
fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// The wall clock, read once per connection (the machine derives later wall times from `now`).
fn wall_clock() -> duplex_metering::UnixMs {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    duplex_metering::UnixMs(ms)
}

/// An LLM turn in flight: its task forwards the provider's stream into `events`.
struct LlmTurn {
    turn: TurnId,
    events: mpsc::Receiver<Result<LlmEvent, ProviderError>>,
    task: JoinHandle<()>,
}

impl Drop for LlmTurn {
    fn drop(&mut self) {
        // Aborting drops the provider stream, which closes its HTTP request.
        self.task.abort();
    }
}

/// The outcome of one usage write.
type PersistResult = Result<UsageTotals, String>;

/// The IO side of one session.
struct Shell {
    ctx: SessionContext,
    id: String,
    machine: Session,
    /// Read and written in this task; handed to `closing` at release.
    socket: Option<Socket>,
    /// The socket failed or its client stopped reading: nothing more is queued for it.
    writer_gone: bool,
    /// At release, the socket writes what is left and closes in its own task, so that the
    /// final usage write and the session's end record do not hold up the client's close.
    closing: Option<JoinHandle<()>>,
    max_message_bytes: usize,
    /// One timer for the machine's deadlines, reset only when the deadline moves.
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    timer_at: Option<std::time::Instant>,
    shutdown: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    stt: Option<SttStream>,
    llm: Option<LlmTurn>,
    tts: Option<(TurnId, TtsStream)>,
    /// Usage writes in flight (the meter keeps at most one out at a time).
    persists: JoinSet<(u64, PersistResult)>,
    /// The store record of the session's start, awaited before its end is recorded.
    start_record: Option<JoinHandle<()>>,
    /// This session's provider usage records, while metering runs.
    usage: Option<(
        crate::metering::UsageRoute,
        mpsc::Receiver<duplex_providers::UsageRecord>,
    )>,
    switches: tokio::sync::watch::Receiver<duplex_metering::Switches>,
    switches_open: bool,
    shutdown_seen: bool,
}

/// Why the shell's loop woke up.
enum Wake {
    Shutdown,
    Timeout,
    Persisted(Option<Result<(u64, PersistResult), tokio::task::JoinError>>),
    Switches,
    ProviderUsage(Option<duplex_providers::UsageRecord>),
    Stt(Option<SttEvent>),
    Llm(TurnId, Option<Result<LlmEvent, ProviderError>>),
    Tts(TurnId, Option<TtsEvent>),
    Client(Option<Result<axum::extract::ws::Message, axum::Error>>),
    WriteFailed,
}

impl Shell {
    async fn run(
        &mut self,
        identity: &crate::auth::Identity,
        start: Option<Result<SessionStart, (ErrorCode, String)>>,
    ) {
        let admitted = load_account(&self.ctx, identity, &self.switches).await;
        self.input(Input::Admission(admitted));
        if let Some(start) = start {
            self.input(Input::UrlStart(start));
        }
        self.execute().await;
        while !self.machine.is_done() {
            let wake = self.wait().await;
            let now = now();
            match wake {
                Wake::Shutdown => {
                    self.shutdown_seen = true;
                    self.machine.handle_input(now, Input::Shutdown);
                }
                Wake::Timeout => self.machine.handle_timeout(now),
                Wake::Persisted(Some(Ok((seq, result)))) => {
                    self.machine
                        .handle_input(now, Input::Persisted { seq, result });
                }
                // A write task cannot panic short of a bug in the store; the meter keeps the
                // usage and gives up at its deadline rather than waiting for an answer forever.
                Wake::Persisted(Some(Err(e))) => warn!(error = %e, "usage write task failed"),
                Wake::Persisted(None) => {}
                Wake::Switches => {
                    let switches = self.switches.borrow_and_update().clone();
                    self.machine.handle_input(now, Input::Switches(switches));
                }
                Wake::ProviderUsage(Some(record)) => {
                    let usage = crate::metering::provider_usage(&record);
                    self.machine.handle_input(now, Input::ProviderUsage(usage));
                }
                Wake::ProviderUsage(None) => self.usage = None,
                Wake::Stt(e) => self.on_stt(now, e),
                Wake::Llm(turn, e) => self.on_llm(now, turn, e),
                Wake::Tts(turn, e) => self.on_tts(now, turn, e),
                Wake::WriteFailed => {
                    self.socket = None;
                    self.writer_gone = true;
                    self.machine
                        .handle_input(now, Input::WriterGone { slow: false });
                }
                Wake::Client(m) => {
                    let Some(m) = client_in(m, self.max_message_bytes) else {
                        continue;
                    };
                    if matches!(m, ClientIn::Binary(_)) {
                        self.ctx.metrics.frames_in_total.inc();
                    }
                    self.machine.handle_input(now, Input::Client(m));
                }
            }
            self.execute().await;
        }
    }

    /// Waits for the next thing to happen. Biased, and the client's messages last: a client
    /// that floods the socket must not starve its own deadlines, the meter (usage writes,
    /// limits) or the provider streams. Timers only win when they are due, so the client is
    /// never starved in turn.
    async fn wait(&mut self) -> Wake {
        let finishing = self.machine.is_finishing();
        let deadline = self.machine.poll_timeout();
        if deadline != self.timer_at {
            self.timer_at = deadline;
            if let Some(at) = deadline {
                self.timer.as_mut().reset(Instant::from_std(at));
            }
        }
        let timer_armed = deadline.is_some();
        let socket = self.socket.as_mut();
        let wants_audio = self.machine.wants_tts_audio();
        let llm_turn = self.llm.as_ref().map(|l| l.turn).unwrap_or(0);
        let tts_turn = self.tts.as_ref().map(|t| t.0).unwrap_or(0);
        let stt = self.stt.as_mut().map(|s| &mut s.events);
        let llm = self.llm.as_mut().map(|l| &mut l.events);
        let tts = self
            .tts
            .as_mut()
            .filter(|_| wants_audio)
            .map(|t| &mut t.1.events);
        let usage = self.usage.as_mut().map(|u| &mut u.1);
        let persisting = !self.persists.is_empty();
        let switches = &mut self.switches;
        let switches_open = self.switches_open && !finishing;
        // Also while finishing: the final usage write must then end within the grace period.
        let shutdown = !self.shutdown_seen;
        tokio::select! {
            biased;
            _ = self.shutdown.as_mut(), if shutdown => Wake::Shutdown,
            _ = self.timer.as_mut(), if timer_armed => {
                // Fired: the next wait re-arms it for whatever deadline comes next.
                self.timer_at = None;
                Wake::Timeout
            }
            r = self.persists.join_next(), if persisting => Wake::Persisted(r),
            c = switches.changed(), if switches_open => {
                if c.is_err() { self.switches_open = false; }
                Wake::Switches
            }
            u = recv_opt(usage), if !finishing => Wake::ProviderUsage(u),
            e = recv_opt(stt) => Wake::Stt(e),
            e = recv_opt(llm) => Wake::Llm(llm_turn, e),
            e = recv_opt(tts) => Wake::Tts(tts_turn, e),
            // Last: writes what the shell queued since the last wake-up (in this wake-up, not
            // another task's), then reads the client's next message unless finishing.
            e = socket_io(socket, !finishing) => match e {
                SocketEvent::Message(m) => Wake::Client(m),
                SocketEvent::WriteFailed => Wake::WriteFailed,
            },
        }
    }

    fn input(&mut self, input: Input) {
        self.machine.handle_input(now(), input);
    }

    // -- provider events ---------------------------------------------------------------------

    fn on_stt(&mut self, now: std::time::Instant, e: Option<SttEvent>) {
        let event = match e {
            Some(SttEvent::Interim { text }) => SttIn::Interim(text),
            Some(SttEvent::Final { text }) => SttIn::Final(text),
            Some(SttEvent::SpeechStarted | SttEvent::UtteranceEnd) => return,
            Some(SttEvent::Error(err)) => {
                self.stt = None;
                SttIn::Error(err.to_string())
            }
            None => {
                self.stt = None;
                SttIn::Ended
            }
        };
        self.machine.handle_input(now, Input::Stt(event));
    }

    fn on_llm(
        &mut self,
        now: std::time::Instant,
        turn: TurnId,
        e: Option<Result<LlmEvent, ProviderError>>,
    ) {
        let event = match e {
            Some(Ok(LlmEvent::Delta(text))) => LlmIn::Delta(text),
            Some(Ok(LlmEvent::Done { usage, model })) => {
                debug!(?usage, model, "LLM turn done");
                LlmIn::Done {
                    tokens: usage
                        .map(|u| u64::from(u.prompt_tokens) + u64::from(u.completion_tokens)),
                }
            }
            Some(Err(err)) => LlmIn::Error(err.to_string()),
            None => LlmIn::Ended,
        };
        if !matches!(event, LlmIn::Delta(_)) {
            self.llm = None;
        }
        self.machine.handle_input(now, Input::Llm { turn, event });
    }

    fn on_tts(&mut self, now: std::time::Instant, turn: TurnId, e: Option<TtsEvent>) {
        let event = match e {
            Some(TtsEvent::Audio {
                index,
                samples,
                sample_rate,
            }) => TtsIn::Audio {
                index,
                samples,
                sample_rate,
            },
            Some(TtsEvent::ChunkDone { index }) => TtsIn::ChunkDone { index },
            Some(TtsEvent::Finished) => TtsIn::Finished,
            Some(TtsEvent::Error(err)) => TtsIn::Error(err.to_string()),
            None => TtsIn::Ended,
        };
        if matches!(event, TtsIn::Finished | TtsIn::Error(_) | TtsIn::Ended) {
            self.tts = None;
        }
        self.machine.handle_input(now, Input::Tts { turn, event });
    }

    // -- commands ----------------------------------------------------------------------------

    /// Carries out everything the machine asks for.
    async fn execute(&mut self) {
        while let Some(command) = self.machine.poll_command() {
            match command {
                Command::Send(msg) => self.send(&msg),
                Command::SendAudio(bytes) => {
                    self.ctx.metrics.frames_out_total.inc();
                    self.push(Outbound::Binary(bytes));
                }
                Command::Close { code, reason } => {
                    self.push(Outbound::Close(code, reason.to_owned()));
                }
                Command::OpenStt { language } => {
                    if let Some(p) = &self.ctx.providers {
                        self.stt = Some(p.stt.open(SttParams {
                            sample_rate: duplex_audio::INTERNAL_RATE,
                            language,
                            session_id: self.id.clone(),
                        }));
                    }
                }
                Command::FeedStt(samples) => {
                    if let Some(stt) = &self.stt
                        && stt.input.try_send(SttInput::Audio(samples)).is_err()
                    {
                        self.ctx.metrics.stt_frames_dropped_total.inc();
                    }
                }
                Command::FinalizeStt => {
                    if let Some(stt) = &self.stt
                        && let Err(mpsc::error::TrySendError::Full(_)) =
                            stt.input.try_send(SttInput::Finalize)
                    {
                        self.input(Input::SttFinalizeDeferred);
                    }
                }
                Command::CloseStt => self.stt = None,
                Command::StartLlm { turn, request } => self.start_llm(turn, request),
                Command::OpenTts {
                    turn,
                    voice,
                    language,
                    preferred_sample_rate,
                } => {
                    if let Some(p) = &self.ctx.providers {
                        let stream = p.tts.open(TtsParams {
                            session_id: self.id.clone(),
                            voice,
                            language,
                            preferred_sample_rate,
                        });
                        self.tts = Some((turn, stream));
                    }
                }
                Command::TtsText { turn, index, text } => {
                    if let Some((t, tts)) = &self.tts
                        && *t == turn
                        && tts.input.try_send(TtsInput::Text { index, text }).is_err()
                    {
                        warn!("TTS text queue full; chunk dropped");
                    }
                }
                Command::TtsEnd { turn } => {
                    if let Some((t, tts)) = &self.tts
                        && *t == turn
                    {
                        let _ = tts.input.try_send(TtsInput::End);
                    }
                }
                Command::CancelTurn { turn } => {
                    if self.llm.as_ref().is_some_and(|l| l.turn == turn) {
                        self.llm = None;
                    }
                    if self.tts.as_ref().is_some_and(|t| t.0 == turn) {
                        self.tts = None;
                    }
                }
                Command::MeteringStarted { user_id } => self.metering_started(user_id),
                Command::Persist { user_id, delta } => {
                    let store = self.ctx.store.clone();
                    let spend = self.ctx.spend_cache.clone();
                    let session_id = self.id.clone();
                    let write = async move {
                        let r = timeout(
                            STORE_TIMEOUT,
                            crate::metering::persist(&store, &spend, &session_id, user_id, &delta),
                        )
                        .await;
                        let r = match r {
                            Ok(Ok(totals)) => Ok(totals),
                            Ok(Err(e)) => Err(e.to_string()),
                            Err(_) => Err("timed out".to_owned()),
                        };
                        (delta.seq, r)
                    };
                    self.persists.spawn(write.in_current_span());
                }
                Command::HandOff { user_id, deltas } => {
                    self.ctx.usage_backlog.hand_off(&self.id, user_id, deltas);
                }
                Command::Release => {
                    self.stt = None;
                    self.llm = None;
                    self.tts = None;
                    self.usage = None;
                    // The socket writes what is queued, then closes, in its own task.
                    if let Some(socket) = self.socket.take() {
                        self.closing = Some(tokio::spawn(socket.finish().in_current_span()));
                    }
                }
                Command::RecordEnd { reason } => self.record_end(reason).await,
                Command::Done => {}
                Command::Observe(o) => self.observe(o),
            }
        }
    }

    fn push(&mut self, msg: Outbound) {
        if self.writer_gone {
            return;
        }
        let Some(socket) = self.socket.as_mut() else {
            return;
        };
        match socket.push(msg) {
            Ok(()) => {}
            Err(PushError::SlowConsumer) => {
                warn!("client is not reading: disconnecting as slow consumer");
                self.ctx
                    .metrics
                    .errors_total
                    .with_label_values(&[ErrorCode::SlowConsumer.as_str()])
                    .inc();
                // Only the error and the close frame are left to write, briefly.
                socket.slow_consumer();
                self.writer_gone = true;
                self.input(Input::WriterGone { slow: true });
            }
        }
    }

    fn send(&mut self, msg: &ServerMessage) {
        match msg {
            ServerMessage::LimitExceeded(l) => self
                .ctx
                .metrics
                .limit_exceeded_total
                .with_label_values(&[l.limit.as_str()])
                .inc(),
            ServerMessage::Error(e) => self
                .ctx
                .metrics
                .errors_total
                .with_label_values(&[e.code.as_str()])
                .inc(),
            _ => {}
        }
        self.push(Outbound::Text(msg.to_json()));
    }

    fn observe(&self, o: Observation) {
        let m = &self.ctx.metrics;
        match o {
            Observation::Latency {
                stage,
                provider,
                value,
            } => {
                m.stage_latency
                    .with_label_values(&[stage.as_str()])
                    .observe(value.as_secs_f64());
                if let Some(provider) = provider {
                    m.provider_latency
                        .with_label_values(&[stage.as_str(), provider.as_str()])
                        .observe(value.as_secs_f64());
                }
            }
            Observation::Endpointing(silence) => m
                .stage_latency
                .with_label_values(&["endpointing"])
                .observe(silence.as_secs_f64()),
            Observation::TurnStarted => m.turns_total.inc(),
            Observation::Interrupted => m.interruptions_total.inc(),
            Observation::AudioTooFast => m.audio_too_fast_total.inc(),
        }
    }

    fn start_llm(&mut self, turn: TurnId, request: TurnRequest) {
        let Some(providers) = &self.ctx.providers else {
            return;
        };
        tracing::Span::current().record("turn_id", turn);
        let mut messages = Vec::with_capacity(request.history.len() + 1);
        if !request.system_prompt.is_empty() {
            messages.push(ChatMessage::new(Role::System, request.system_prompt));
        }
        messages.extend(request.history.into_iter().map(|h| {
            let role = match h.speaker {
                Speaker::User => Role::User,
                Speaker::Assistant => Role::Assistant,
            };
            ChatMessage::new(role, h.text)
        }));
        let mut stream = providers.llm.stream(LlmRequest {
            session_id: self.id.clone(),
            model: request.model,
            messages,
            max_tokens: None,
            plan: request.plan,
            budget_remaining_usd: request.budget_remaining_usd,
        });
        let (tx, rx) = mpsc::channel(LLM_EVENT_CAPACITY);
        let task = tokio::spawn(
            async move {
                while let Some(item) = stream.next().await {
                    let last = !matches!(item, Ok(LlmEvent::Delta(_)));
                    if tx.send(item).await.is_err() || last {
                        return;
                    }
                }
            }
            .in_current_span(),
        );
        self.llm = Some(LlmTurn {
            turn,
            events: rx,
            task,
        });
    }

    /// Records the session's start and routes its provider usage records here.
    fn metering_started(&mut self, user_id: i64) {
        self.usage = Some(self.ctx.usage_routes.register(&self.id));
        let store = self.ctx.store.clone();
        let id = self.id.clone();
        self.start_record = Some(tokio::spawn(
            async move {
                let at = time::OffsetDateTime::now_utc();
                match timeout(STORE_TIMEOUT, store.session_started(&id, user_id, at)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => warn!(error = %e, "could not record the session start"),
                    Err(_) => warn!("recording the session start timed out"),
                }
            }
            .in_current_span(),
        ));
    }

    /// Records the session's end, after its start record (so the store never sees an end
    /// before the start).
    async fn record_end(&mut self, reason: &'static str) {
        if let Some(start) = self.start_record.take() {
            let _ = start.await;
        }
        let at = time::OffsetDateTime::now_utc();
        match timeout(
            STORE_TIMEOUT,
            self.ctx.store.session_ended(&self.id, at, reason),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(error = %e, "could not record the session end"),
            Err(_) => warn!("recording the session end timed out"),
        }
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        if let Some(start) = self.start_record.take() {
            start.abort();
        }
    }
}

/// What the store says about the connection's user (bounded in time).
async fn load_account(
    ctx: &SessionContext,
    identity: &crate::auth::Identity,
    switches: &tokio::sync::watch::Receiver<duplex_metering::Switches>,
) -> Result<duplex_session::Admitted, String> {
    let store = &ctx.store;
    let loaded = async {
        let account = crate::metering::load_account(store, &ctx.config.metering, identity).await?;
        let day = wall_clock().date();
        let spend = &ctx.spend_cache;
        let totals = crate::metering::totals(store, spend, &account.user, day).await?;
        Ok::<_, duplex_store::StoreError>((account, totals))
    };
    let (account, totals) = match timeout(STORE_TIMEOUT, loaded).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("timed out".into()),
    };
    Ok(duplex_session::Admitted {
        account: duplex_session::Account {
            user_id: account.user.id,
            plan: account.plan,
        },
        totals,
        switches: switches.borrow().clone(),
    })
}

async fn recv_opt<T>(rx: Option<&mut mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn socket_io(socket: Option<&mut Socket>, read: bool) -> SocketEvent {
    match socket {
        Some(s) => std::future::poll_fn(|cx| s.poll_io(cx, read)).await,
        None => std::future::pending().await,
    }
}
