//! One WebSocket connection: a reader task and a writer task that only do IO, and the session
//! actor that owns the audio front end, the conversation core and the provider stages.
//!
//! ```text
//!  socket ─► reader ──Inbound (INBOUND_CAPACITY)──► session actor ──Outbound (OUTBOUND_CAPACITY)──► writer ─► socket
//!                                                   │  ▲   │  ▲   │  ▲
//!                                  SttInput (try_send) │   │  │   │  │ TtsEvent (read only while the core
//!                                                  SttEvent│  │   │  │  wants audio: backpressure)
//!                                                      LlmEvent   TtsInput
//! ```
//!
//! The actor never awaits a send: audio to STT and everything to the writer go by `try_send`.
//! A full STT queue drops (and counts) frames; a full writer queue means the client stopped
//! reading, and the session ends with `slow_consumer` instead of buffering without limit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use duplex_audio::{
    EndpointConfig, FrontEnd, FrontEndConfig, FrontEndEvent, OutputFrame, OutputStage, VadMode,
};
use duplex_core::conversation::{
    Conversation, ConversationConfig, Input, Output, Speaker, Stage, TurnId,
};
use duplex_proto::{
    self as proto, AudioEndReason, AudioFormat, ClientMessage, Encoding, ErrorCode, ServerMessage,
    SessionStart, close_code,
};
use duplex_providers::{
    ChatMessage, LlmEvent, LlmRequest, ProviderSet, Role, SttEvent, SttInput, SttParams, SttStream,
    TtsEvent, TtsInput, TtsParams, TtsStream,
};
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::config::{Config, ProviderMode};
use crate::metrics::Metrics;

/// Client messages queued from the reader to the actor: ~1.3 s of 20 ms frames, enough to
/// absorb a scheduling hiccup of the actor. Beyond it the reader waits and TCP pushes back on
/// the client, which is the right place for backpressure on input.
const INBOUND_CAPACITY: usize = 64;
/// Messages queued for the writer. Pacing keeps only `audio_lead / 20 ms` (~15) audio frames in
/// flight and JSON events are sparse, so a healthy client never gets near 256; a client that
/// stops reading fills it within seconds and is disconnected as a slow consumer.
const OUTBOUND_CAPACITY: usize = 256;
/// Token events of one LLM turn queued for the actor; tokens are small and the actor reads
/// them at once.
const LLM_EVENT_CAPACITY: usize = 32;
/// A single socket write blocked this long means the peer is gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// After `session.end` (or a fatal error), how long messages already in flight still get
/// answered (`session_ended`) before the close frame.
const END_LINGER: Duration = Duration::from_millis(250);
/// Outbound audio frames are 20 ms, like the inbound analysis frames.
const OUT_FRAME_MS: u32 = 20;
/// A failed STT stream is reopened after this, doubling with each consecutive failure up to
/// [`STT_REOPEN_MAX`] (with jitter), so that a bad key or a provider outage does not become a
/// reconnect loop per session. The first retry is quick: a single dropped stream should cost
/// the user at most a fraction of a second of speech.
const STT_REOPEN_FIRST: Duration = Duration::from_millis(100);
const STT_REOPEN_MAX: Duration = Duration::from_secs(10);
/// Longest `ping` `id` echoed in a `pong` (a client must not make the server queue copies of
/// its own large strings); longer ids get `invalid_message`.
const MAX_PING_ID_BYTES: usize = 128;
/// When the STT input queue is full of audio, a `Finalize` is retried this often until it
/// fits (the recognizer drains ~50 frames a second).
const FINALIZE_RETRY: Duration = Duration::from_millis(20);

/// What the reader hands the actor.
#[derive(Debug)]
enum Inbound {
    Text(String),
    Binary(Vec<u8>),
    /// The message exceeded `max_message_bytes`.
    TooLarge,
    /// The client closed, or the socket failed.
    Closed,
}

/// What the actor hands the writer.
#[derive(Debug)]
enum Outbound {
    Text(String),
    Binary(Vec<u8>),
    Close(u16, String),
}

/// Everything a session needs from the server.
#[derive(Clone)]
pub(crate) struct SessionContext {
    pub config: Arc<Config>,
    pub metrics: Metrics,
    pub providers: Option<ProviderSet>,
    pub shutdown: CancellationToken,
    pub store: duplex_store::Store,
    pub usage_routes: crate::metering::SessionUsage,
    pub turn_limiter: crate::metering::UserTurnLimiter,
    pub spend_cache: crate::metering::SpendCache,
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
        let (sink, stream) = socket.split();
        let (out_tx, out_rx) = mpsc::channel(OUTBOUND_CAPACITY);
        let (in_tx, in_rx) = mpsc::channel(INBOUND_CAPACITY);
        let kill = CancellationToken::new();
        let writer = tokio::spawn(writer(sink, out_rx, kill.clone()).in_current_span());
        let reader = tokio::spawn(reader(stream, in_tx, max_message_bytes).in_current_span());
        let mut session = Session::new(ctx.clone(), session_id, out_tx, kill, switches);
        if session.admit(&identity).await {
            if let Some(start) = start {
                match start {
                    Ok(s) => session.start(s),
                    Err((code, message)) => session.send_error(code, message, false),
                }
            }
            session.run(in_rx).await;
        }
        session.finish_metering().await;
        drop(session);
        reader.abort();
        let _ = writer.await;
        ctx.metrics.active_sessions.dec();
        info!("session closed");
    }
    .instrument(span)
    .await
}

async fn reader(
    mut stream: futures::stream::SplitStream<WebSocket>,
    tx: mpsc::Sender<Inbound>,
    max_message_bytes: usize,
) {
    while let Some(msg) = stream.next().await {
        let inbound = match msg {
            Ok(Message::Text(t)) if t.len() > max_message_bytes => Inbound::TooLarge,
            Ok(Message::Binary(b)) if b.len() > max_message_bytes => Inbound::TooLarge,
            Ok(Message::Text(t)) => Inbound::Text(t.to_string()),
            Ok(Message::Binary(b)) => Inbound::Binary(b.to_vec()),
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(Message::Close(_)) => Inbound::Closed,
            Err(e) => {
                if is_capacity_error(&e) {
                    Inbound::TooLarge
                } else {
                    debug!(error = %e, "socket read failed");
                    Inbound::Closed
                }
            }
        };
        let last = matches!(inbound, Inbound::Closed | Inbound::TooLarge);
        if tx.send(inbound).await.is_err() || last {
            return;
        }
    }
    let _ = tx.send(Inbound::Closed).await;
}

fn is_capacity_error(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(t) = err.downcast_ref::<tungstenite::Error>() {
            return matches!(t, tungstenite::Error::Capacity(_));
        }
        source = err.source();
    }
    false
}

async fn writer(
    mut sink: futures::stream::SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Outbound>,
    kill: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            biased;
            _ = kill.cancelled() => {
                // The queue is full because the client does not read: skip it and try to say why.
                let err = ServerMessage::error(
                    ErrorCode::SlowConsumer,
                    "client did not read audio fast enough",
                    true,
                );
                let _ = timeout(Duration::from_secs(1), async {
                    sink.send(Message::Text(err.to_json().into())).await?;
                    sink.send(close_message(close_code::SLOW_CONSUMER, "slow consumer")).await
                })
                .await;
                return;
            }
            next = rx.recv() => next,
        };
        let msg = match next {
            None => {
                let _ = timeout(WRITE_TIMEOUT, sink.close()).await;
                return;
            }
            Some(Outbound::Text(t)) => Message::Text(t.into()),
            Some(Outbound::Binary(b)) => Message::Binary(b.into()),
            Some(Outbound::Close(code, reason)) => {
                let _ = timeout(WRITE_TIMEOUT, sink.send(close_message(code, &reason))).await;
                return;
            }
        };
        // Feed without flushing while more is queued: one syscall for a burst of frames.
        let write = async {
            sink.feed(msg).await?;
            if rx.is_empty() {
                sink.flush().await
            } else {
                Ok(())
            }
        };
        match timeout(WRITE_TIMEOUT, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                debug!(error = %e, "socket write failed");
                return;
            }
            Err(_) => {
                warn!("socket write timed out");
                return;
            }
        }
    }
}

fn close_message(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.to_owned().into(),
    }))
}

/// An LLM turn in flight: its task forwards the provider's stream into `events`.
struct LlmTurn {
    turn: TurnId,
    events: mpsc::Receiver<Result<LlmEvent, duplex_providers::ProviderError>>,
    task: JoinHandle<()>,
}

impl Drop for LlmTurn {
    fn drop(&mut self) {
        // Aborting drops the provider stream, which closes its HTTP request.
        self.task.abort();
    }
}

/// A TTS turn in flight, with the conversion of its audio to the session's output format.
struct TtsTurn {
    turn: TurnId,
    stream: TtsStream,
    stage: OutputStage,
    frames: Vec<OutputFrame>,
}

impl TtsTurn {
    /// Hands the stage's finished frames to the core.
    fn deliver(&mut self, core: &mut Conversation, now: std::time::Instant) {
        for f in self.frames.drain(..) {
            core.handle_input(
                now,
                Input::TtsFrame {
                    turn: self.turn,
                    index: f.index,
                    duration: self.stage.duration_of(f.samples),
                    bytes: f.bytes,
                },
            );
        }
    }

    fn on_audio(
        &mut self,
        core: &mut Conversation,
        now: std::time::Instant,
        index: u32,
        samples: &[i16],
        rate: u32,
    ) {
        if let Err(e) = self.stage.push(index, samples, rate, &mut self.frames) {
            warn!(rate, error = %e, "TTS audio at an unsupported rate, dropped");
        }
        self.deliver(core, now);
    }

    /// Flushes the resampler and the last partial frame at the end of the turn's audio.
    fn finish(&mut self, core: &mut Conversation, now: std::time::Instant) {
        self.stage.finish(&mut self.frames);
        self.deliver(core, now);
    }
}

/// The running part of a session (after `session.start`).
struct Running {
    input: AudioFormat,
    frontend: FrontEnd,
    events: Vec<FrontEndEvent>,
    /// `None` in echo mode.
    core: Option<Conversation>,
    stt: Option<SttStream>,
    llm: Option<LlmTurn>,
    tts: Option<TtsTurn>,
    output: AudioFormat,
    voice: Option<String>,
    language: Option<String>,
    model: Option<String>,
    deadline: Option<Instant>,
    /// A `Finalize` that did not fit in the STT queue: retried at this time.
    finalize_retry: Option<Instant>,
    /// Consecutive STT stream failures (reset by the next transcript), and when the closed
    /// stream is reopened.
    stt_failures: u32,
    stt_reopen_at: Option<Instant>,
    /// The engines of this session, for the per-provider latency metric.
    names: proto::ProviderNames,
}

enum Phase {
    AwaitingStart,
    Running(Box<Running>),
}

/// Why the actor's loop woke up.
enum Wake {
    Shutdown,
    Inbound(Option<Inbound>),
    Stt(Option<SttEvent>),
    Llm(
        TurnId,
        Option<Result<LlmEvent, duplex_providers::ProviderError>>,
    ),
    Tts(TurnId, Option<TtsEvent>),
    Deadline,
    StartTimeout,
    RetryFinalize,
    ReopenStt,
    Idle,
    Drain,
    Close,
    MeterTick,
    Persisted(Option<(u64, PersistResult)>),
    Switches,
    ProviderUsage(Option<duplex_providers::UsageRecord>),
}

/// The outcome of one usage write (timed out or failed writes are retried by the meter).
type PersistResult = Result<duplex_metering::UsageTotals, String>;

/// Usage writes in flight per session: the meter keeps exactly one out at a time; 2 leaves
/// room for the final write's result while the actor is shutting down.
const PERSIST_CAPACITY: usize = 2;
/// A usage write that takes longer than this is treated as failed and retried later: the
/// meter must keep enforcing limits on fresh totals.
const PERSIST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closed session may spend writing its final usage.
const FINALIZE_TIMEOUT: Duration = Duration::from_secs(15);

/// Metering state of the session (see `crate::metering` and `duplex_metering`).
struct Metering {
    meter: duplex_metering::SessionMeter,
    account: Option<crate::metering::Account>,
    totals: Option<duplex_metering::UsageTotals>,
    started: bool,
    deadline: Option<Instant>,
    switches: tokio::sync::watch::Receiver<duplex_metering::Switches>,
    switches_open: bool,
    persist_tx: mpsc::Sender<(u64, PersistResult)>,
    persist_rx: mpsc::Receiver<(u64, PersistResult)>,
    usage_rx: Option<mpsc::Receiver<duplex_providers::UsageRecord>>,
    _usage_route: Option<crate::metering::UsageRoute>,
    decision: Option<(u64, duplex_metering::TurnDecision)>,
    close_reason: &'static str,
    /// The day's provider spend (all users) as of the last store read, for routing
    /// near-budget turns to cheaper models.
    spend_today_micros: u64,
}

struct Session {
    ctx: SessionContext,
    id: String,
    out: mpsc::Sender<Outbound>,
    kill: CancellationToken,
    phase: Phase,
    /// Last time the client sent anything.
    last_seen: Instant,
    /// When the connection was upgraded (the pre-start deadline counts from here).
    connected_at: Instant,
    /// Set on shutdown: the session closes when its turn ends, or at this deadline.
    drain_deadline: Option<Instant>,
    /// Set by `session.end` or a fatal error: close with this code at this time.
    closing: Option<(Instant, u16, &'static str)>,
    ended: bool,
    /// The writer is gone or killed: stop.
    dead: bool,
    metering: Metering,
}

impl Session {
    fn new(
        ctx: SessionContext,
        id: String,
        out: mpsc::Sender<Outbound>,
        kill: CancellationToken,
        switches: tokio::sync::watch::Receiver<duplex_metering::Switches>,
    ) -> Session {
        let (persist_tx, persist_rx) = mpsc::channel(PERSIST_CAPACITY);
        let meter = duplex_metering::SessionMeter::new(duplex_metering::MeterConfig {
            heartbeat: ctx.config.usage_heartbeat,
            ..duplex_metering::MeterConfig::default()
        });
        Session {
            metering: Metering {
                meter,
                account: None,
                totals: None,
                started: false,
                deadline: None,
                switches,
                switches_open: true,
                persist_tx,
                persist_rx,
                usage_rx: None,
                _usage_route: None,
                decision: None,
                close_reason: "closed",
                spend_today_micros: 0,
            },
            ctx,
            id,
            out,
            kill,
            phase: Phase::AwaitingStart,
            last_seen: Instant::now(),
            connected_at: Instant::now(),
            drain_deadline: None,
            closing: None,
            ended: false,
            dead: false,
        }
    }

    async fn run(&mut self, mut inbound: mpsc::Receiver<Inbound>) {
        loop {
            self.drive();
            self.drive_meter();
            if self.dead {
                return;
            }
            let idle_at = self.last_seen + self.ctx.config.idle_timeout;
            let start_by = self.connected_at + self.ctx.config.pre_start_timeout;
            let awaiting_start = matches!(self.phase, Phase::AwaitingStart);
            let wake = {
                let (stt, llm, tts, deadline, wants_audio, finalize_retry, stt_reopen_at) =
                    match &mut self.phase {
                        Phase::Running(r) => {
                            let wants = r.core.as_ref().is_none_or(|c| c.wants_tts_audio());
                            (
                                r.stt.as_mut(),
                                r.llm.as_mut(),
                                r.tts.as_mut(),
                                r.deadline,
                                wants,
                                r.finalize_retry,
                                r.stt_reopen_at,
                            )
                        }
                        Phase::AwaitingStart => (None, None, None, None, false, None, None),
                    };
                let llm_turn = llm.as_ref().map(|l| l.turn).unwrap_or(0);
                let tts_turn = tts.as_ref().map(|t| t.turn).unwrap_or(0);
                let draining = self.drain_deadline.is_some();
                let m = &mut self.metering;
                let switches_open = m.switches_open;
                // Biased, and the client's messages last: a client that floods the socket
                // must not starve its own deadlines, the meter (usage writes, limits) or the
                // provider streams. Timers only win when they are due, so the client is never
                // starved in turn.
                tokio::select! {
                    biased;
                    _ = self.ctx.shutdown.cancelled(), if !draining && self.closing.is_none() => Wake::Shutdown,
                    _ = sleep_until_opt(self.closing.map(|c| c.0)) => Wake::Close,
                    _ = sleep_until_opt(self.drain_deadline) => Wake::Drain,
                    _ = sleep_until_opt(m.deadline) => Wake::MeterTick,
                    r = m.persist_rx.recv() => Wake::Persisted(r),
                    c = m.switches.changed(), if switches_open => {
                        if c.is_err() { m.switches_open = false; }
                        Wake::Switches
                    }
                    u = recv_opt(m.usage_rx.as_mut()) => Wake::ProviderUsage(u),
                    _ = sleep_until_opt(deadline) => Wake::Deadline,
                    _ = sleep_until_opt(finalize_retry) => Wake::RetryFinalize,
                    _ = sleep_until_opt(stt_reopen_at) => Wake::ReopenStt,
                    _ = sleep_until(idle_at), if self.closing.is_none() => Wake::Idle,
                    _ = sleep_until(start_by), if awaiting_start && self.closing.is_none() => Wake::StartTimeout,
                    e = recv_opt(stt.map(|s| &mut s.events)) => Wake::Stt(e),
                    e = recv_opt(llm.map(|l| &mut l.events)) => Wake::Llm(llm_turn, e),
                    e = recv_opt(tts.filter(|_| wants_audio).map(|t| &mut t.stream.events)) => Wake::Tts(tts_turn, e),
                    m = inbound.recv() => Wake::Inbound(m),
                }
            };
            match wake {
                Wake::Shutdown => self.on_shutdown(),
                Wake::Close | Wake::Inbound(None) | Wake::Inbound(Some(Inbound::Closed)) => {
                    // The client left, or our close is due; say why if we were closing.
                    if let Some((_, code, reason)) = self.closing {
                        let _ = self.out.try_send(Outbound::Close(code, reason.to_owned()));
                    }
                    return;
                }
                Wake::Inbound(Some(m)) => {
                    self.last_seen = Instant::now();
                    self.on_inbound(m);
                }
                Wake::Stt(e) => self.on_stt(e),
                Wake::Llm(turn, e) => self.on_llm(turn, e),
                Wake::Tts(turn, e) => self.on_tts(turn, e),
                Wake::Deadline => self.core_input(Input::Tick),
                Wake::RetryFinalize => self.send_finalize(),
                Wake::ReopenStt => self.reopen_stt(),
                Wake::Idle => {
                    self.send_error(
                        ErrorCode::IdleTimeout,
                        "no message from the client within the idle timeout",
                        true,
                    );
                    self.close_soon(close_code::IDLE_TIMEOUT, "idle timeout", Duration::ZERO);
                }
                Wake::StartTimeout => {
                    info!("no session.start within the pre-start timeout: closing");
                    self.send_error(
                        ErrorCode::StartTimeout,
                        format!(
                            "no session started within {} s of connecting",
                            self.ctx.config.pre_start_timeout.as_secs()
                        ),
                        true,
                    );
                    self.close_soon(close_code::IDLE_TIMEOUT, "no session.start", Duration::ZERO);
                }
                Wake::Drain => {
                    self.close_soon(
                        close_code::GOING_AWAY,
                        "server shutting down",
                        Duration::ZERO,
                    );
                }
                Wake::MeterTick => self.meter_input(duplex_metering::MeterInput::Tick),
                Wake::Persisted(Some((seq, result))) => self.on_persisted(seq, result),
                Wake::Persisted(None) => {}
                Wake::Switches => {
                    let switches = self.metering.switches.borrow_and_update().clone();
                    self.meter_input(duplex_metering::MeterInput::Switches(switches));
                }
                Wake::ProviderUsage(Some(record)) => {
                    let usage = crate::metering::provider_usage(&record);
                    self.meter_input(duplex_metering::MeterInput::ProviderUsage(usage));
                }
                Wake::ProviderUsage(None) => self.metering.usage_rx = None,
            }
        }
    }

    // -- outputs ---------------------------------------------------------------------------

    fn push(&mut self, msg: Outbound) {
        if self.dead {
            return;
        }
        match self.out.try_send(msg) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                warn!("client is not reading: disconnecting as slow consumer");
                self.ctx
                    .metrics
                    .errors_total
                    .with_label_values(&[ErrorCode::SlowConsumer.as_str()])
                    .inc();
                self.kill.cancel();
                self.dead = true;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => self.dead = true,
        }
    }

    fn send(&mut self, msg: &ServerMessage) {
        if let ServerMessage::LimitExceeded(l) = msg {
            self.ctx
                .metrics
                .limit_exceeded_total
                .with_label_values(&[l.limit.as_str()])
                .inc();
        }
        if let ServerMessage::Error(e) = msg {
            self.ctx
                .metrics
                .errors_total
                .with_label_values(&[e.code.as_str()])
                .inc();
            debug!(code = e.code.as_str(), message = %e.message, "error event");
        }
        self.push(Outbound::Text(msg.to_json()));
    }

    fn send_error(&mut self, code: ErrorCode, message: impl Into<String>, fatal: bool) {
        self.send(&ServerMessage::error(code, message, fatal));
    }

    fn close_soon(&mut self, code: u16, reason: &'static str, after: Duration) {
        if self.closing.is_none() {
            self.closing = Some((Instant::now() + after, code, reason));
        }
    }

    // -- metering ----------------------------------------------------------------------------

    /// Resolves the user and decides whether this connection may start a session. `false`:
    /// the client was told why (`limit_exceeded` + 4029, or an error) and the session is over.
    async fn admit(&mut self, identity: &crate::auth::Identity) -> bool {
        let store = self.ctx.store.clone();
        let loaded = async {
            let account = crate::metering::load_account(&store, &self.ctx.config, identity).await?;
            let day = wall_clock().date();
            let spend = &self.ctx.spend_cache;
            let totals = crate::metering::totals(&store, spend, account.user.id, day).await?;
            Ok::<_, duplex_store::StoreError>((account, totals))
        };
        let (account, totals) = match timeout(PERSIST_TIMEOUT, loaded).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => return self.refuse_unavailable(&e.to_string()),
            Err(_) => return self.refuse_unavailable("timed out"),
        };
        let switches = self.metering.switches.borrow().clone();
        if let duplex_metering::Admission::Refused(limit) =
            duplex_metering::admission(&account.plan, &totals, &switches)
        {
            info!(user = %identity.user_id, limit = %limit.limit, "connection refused: limit");
            self.send(&ServerMessage::LimitExceeded(limit));
            self.push(Outbound::Close(
                close_code::LIMIT_EXCEEDED,
                "limit exceeded".into(),
            ));
            return false;
        }
        debug!(user = %identity.user_id, plan = %account.plan.name, "admitted");
        self.metering.spend_today_micros = totals.spend_today_micros;
        self.metering.account = Some(account);
        self.metering.totals = Some(totals);
        true
    }

    fn refuse_unavailable(&mut self, why: &str) -> bool {
        warn!(error = why, "usage store unavailable: refusing the session");
        self.send_error(
            ErrorCode::Internal,
            "the usage store is unavailable; try again shortly",
            true,
        );
        self.push(Outbound::Close(
            close_code::INTERNAL_ERROR,
            "usage store unavailable".into(),
        ));
        false
    }

    /// Metering starts at `session.ready`.
    fn start_metering(&mut self) {
        let m = &mut self.metering;
        let (Some(account), Some(totals)) = (m.account.as_ref(), m.totals.take()) else {
            return;
        };
        m.started = true;
        let (route, rx) = self.ctx.usage_routes.register(&self.id);
        m._usage_route = Some(route);
        m.usage_rx = Some(rx);
        let start = duplex_metering::MeterStart {
            plan: account.plan.clone(),
            totals,
            switches: m.switches.borrow().clone(),
            wall_clock: wall_clock(),
        };
        let user_id = account.user.id;
        m.meter.handle_input(
            Instant::now().into_std(),
            duplex_metering::MeterInput::Start(start),
        );
        let store = self.ctx.store.clone();
        let id = self.id.clone();
        tokio::spawn(
            async move {
                let at = time::OffsetDateTime::now_utc();
                if let Err(e) = store.session_started(&id, user_id, at).await {
                    warn!(error = %e, "could not record the session start");
                }
            }
            .in_current_span(),
        );
    }

    fn meter_input(&mut self, input: duplex_metering::MeterInput) {
        if self.metering.started {
            self.metering
                .meter
                .handle_input(Instant::now().into_std(), input);
        }
    }

    /// Asks the meter whether `turn` may start; `Some` is why not.
    fn request_turn(&mut self, turn: TurnId) -> Option<duplex_metering::Denial> {
        if !self.metering.started {
            return None;
        }
        self.meter_input(duplex_metering::MeterInput::TurnRequested { turn });
        self.drive_meter();
        if let Some((t, duplex_metering::TurnDecision::Denied(d))) = self.metering.decision.take()
            && t == turn
        {
            return Some(d);
        }
        // The meter limits this session's turns; the plan's rate is per user, across sessions.
        let account = self.metering.account.as_ref()?;
        let limit = account.plan.turns_per_minute?;
        let now = Instant::now().into_std();
        let (used, resets) = self
            .ctx
            .turn_limiter
            .try_acquire(account.user.id, limit, now)
            .err()?;
        let upgrade_hint = account.plan.upgrade_hint.clone();
        // The meter counted the turn as started: tell it the turn is over.
        self.meter_input(duplex_metering::MeterInput::TurnEnded { turn });
        let wall = wall_clock();
        let resets_at = duplex_metering::UnixMs(
            wall.0 + resets.saturating_duration_since(now).as_millis() as u64,
        );
        Some(duplex_metering::Denial {
            code: ErrorCode::RateLimited,
            message: format!("more than {limit} turns a minute across your sessions"),
            limit: proto::LimitExceeded {
                limit: "turns_per_minute".into(),
                used,
                allowed: u64::from(limit),
                resets_at: Some(resets_at.rfc3339()),
                upgrade_hint,
            },
        })
    }

    fn on_persisted(&mut self, seq: u64, result: PersistResult) {
        let input = match result {
            Ok(totals) => {
                self.metering.spend_today_micros = totals.spend_today_micros;
                duplex_metering::MeterInput::Persisted { seq, totals }
            }
            Err(e) => {
                warn!(error = %e, seq, "usage write failed; it will be retried");
                duplex_metering::MeterInput::PersistFailed { seq }
            }
        };
        self.meter_input(input);
    }

    fn spawn_persist(&self, delta: duplex_metering::UsageDelta) {
        let Some(account) = self.metering.account.as_ref() else {
            return;
        };
        let store = self.ctx.store.clone();
        let user_id = account.user.id;
        let session_id = self.id.clone();
        let tx = self.metering.persist_tx.clone();
        let spend = self.ctx.spend_cache.clone();
        tokio::spawn(
            async move {
                let r = timeout(
                    PERSIST_TIMEOUT,
                    crate::metering::persist(&store, &spend, &session_id, user_id, &delta),
                )
                .await;
                let r = match r {
                    Ok(Ok(totals)) => Ok(totals),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("timed out".to_owned()),
                };
                let _ = tx.send((delta.seq, r)).await;
            }
            .in_current_span(),
        );
    }

    /// Carries out what the meter asks for, and remembers its next deadline.
    fn drive_meter(&mut self) {
        use duplex_metering::MeterOutput;
        if !self.metering.started {
            return;
        }
        loop {
            match self.metering.meter.poll_output() {
                MeterOutput::Persist(delta) => self.spawn_persist(delta),
                MeterOutput::Usage(u) => self.send(&ServerMessage::UsageUpdate(u)),
                MeterOutput::LimitExceeded(l) => {
                    info!(limit = %l.limit, used = l.used, allowed = l.allowed, "limit exceeded");
                    self.send(&ServerMessage::LimitExceeded(l));
                }
                MeterOutput::Turn { turn, decision } => {
                    self.metering.decision = Some((turn, decision));
                }
                MeterOutput::StopNewTurns => info!("conversation time used up: no new turns"),
                MeterOutput::EndSession { close_code } => {
                    self.metering.close_reason = "limit exceeded";
                    self.ended = true;
                    if let Phase::Running(r) = &mut self.phase {
                        r.llm = None;
                        r.tts = None;
                    }
                    self.close_soon(close_code, "limit exceeded", Duration::ZERO);
                }
                MeterOutput::Finished => {}
                MeterOutput::Timeout(at) => {
                    self.metering.deadline = Some(Instant::from_std(at));
                    return;
                }
                MeterOutput::Idle => {
                    self.metering.deadline = None;
                    return;
                }
            }
        }
    }

    /// After the connection is done: writes the rest of the usage (bounded in time), and
    /// records the session's end.
    async fn finish_metering(&mut self) {
        use duplex_metering::{MeterInput, MeterOutput};
        if !self.metering.started {
            return;
        }
        let now = || Instant::now().into_std();
        self.metering.meter.handle_input(now(), MeterInput::Ending);
        let user_id = self.metering.account.as_ref().map(|a| a.user.id);
        let store = self.ctx.store.clone();
        let spend = self.ctx.spend_cache.clone();
        let session_id = self.id.clone();
        let work = async {
            loop {
                match self.metering.meter.poll_output() {
                    MeterOutput::Persist(delta) => {
                        let Some(user_id) = user_id else { return };
                        let r = timeout(
                            PERSIST_TIMEOUT,
                            crate::metering::persist(&store, &spend, &session_id, user_id, &delta),
                        )
                        .await;
                        let input = match r {
                            Ok(Ok(totals)) => MeterInput::Persisted {
                                seq: delta.seq,
                                totals,
                            },
                            _ => MeterInput::PersistFailed { seq: delta.seq },
                        };
                        self.metering.meter.handle_input(now(), input);
                    }
                    MeterOutput::Finished => return,
                    MeterOutput::Timeout(at) => sleep_until(Instant::from_std(at)).await,
                    // A write from the live session is still out: wait for its result.
                    MeterOutput::Idle => match self.metering.persist_rx.recv().await {
                        Some((seq, Ok(totals))) => self
                            .metering
                            .meter
                            .handle_input(now(), MeterInput::Persisted { seq, totals }),
                        Some((seq, Err(_))) => self
                            .metering
                            .meter
                            .handle_input(now(), MeterInput::PersistFailed { seq }),
                        None => return,
                    },
                    // The socket is closed: nothing more to tell the client.
                    _ => {}
                }
            }
        };
        if timeout(FINALIZE_TIMEOUT, work).await.is_err() {
            warn!(
                unpersisted = ?self.metering.meter.unpersisted(),
                "gave up writing the session's final usage"
            );
        }
        let reason = self.metering.close_reason;
        let id = self.id.clone();
        if let Err(e) = store
            .session_ended(&id, time::OffsetDateTime::now_utc(), reason)
            .await
        {
            warn!(error = %e, "could not record the session end");
        }
    }

    // -- lifecycle ---------------------------------------------------------------------------

    fn on_shutdown(&mut self) {
        let busy = matches!(&self.phase, Phase::Running(r) if r.core.as_ref().is_some_and(|c| c.current_turn().is_some()));
        self.send_error(
            ErrorCode::ServerShuttingDown,
            "the server is shutting down",
            true,
        );
        if busy {
            info!("shutdown: letting the current turn finish");
            self.drain_deadline = Some(Instant::now() + self.ctx.config.shutdown_grace);
        } else {
            self.close_soon(
                close_code::GOING_AWAY,
                "server shutting down",
                Duration::ZERO,
            );
        }
    }

    fn start(&mut self, s: SessionStart) {
        if let Err((code, msg)) = self.try_start(s) {
            self.send_error(code, msg, false);
        }
    }

    fn try_start(&mut self, s: SessionStart) -> Result<(), (ErrorCode, String)> {
        let rates = proto::SUPPORTED_SAMPLE_RATES;
        if !rates.contains(&s.sample_rate) {
            return Err((
                ErrorCode::UnsupportedSampleRate,
                format!(
                    "sample_rate {} is not supported; use one of {rates:?}",
                    s.sample_rate
                ),
            ));
        }
        let out_rate = s.output_sample_rate.unwrap_or(s.sample_rate);
        if !rates.contains(&out_rate) {
            return Err((
                ErrorCode::UnsupportedSampleRate,
                format!("output_sample_rate {out_rate} is not supported; use one of {rates:?}"),
            ));
        }
        let cfg = &self.ctx.config;
        let input = AudioFormat {
            encoding: s.encoding,
            sample_rate: s.sample_rate,
        };
        let output = AudioFormat {
            encoding: s.output_encoding.unwrap_or(s.encoding),
            sample_rate: out_rate,
        };
        let vad_mode = match cfg.vad_mode {
            0 => VadMode::Quality,
            1 => VadMode::LowBitrate,
            2 => VadMode::Aggressive,
            _ => VadMode::VeryAggressive,
        };
        let frontend = FrontEnd::new(FrontEndConfig {
            encoding: s.encoding,
            input_rate: s.sample_rate,
            vad_mode,
            endpoint: EndpointConfig {
                speech_start_ms: cfg.speech_start.as_millis() as u64,
                end_of_turn_ms: cfg.end_of_turn.as_millis() as u64,
                max_turn_ms: cfg.max_turn.as_millis() as u64,
                ..EndpointConfig::default()
            },
        })
        .map_err(|e| (ErrorCode::UnsupportedSampleRate, e.to_string()))?;
        let (core, stt, names) = match &self.ctx.providers {
            Some(p) => {
                let core = Conversation::new(ConversationConfig {
                    system_prompt: s
                        .system_prompt
                        .clone()
                        .unwrap_or_else(|| cfg.system_prompt.clone()),
                    audio_lead: cfg.audio_lead,
                    frame: Duration::from_millis(u64::from(OUT_FRAME_MS)),
                    output_format: output,
                    ..ConversationConfig::default()
                });
                let stt = p.stt.open(SttParams {
                    sample_rate: duplex_audio::INTERNAL_RATE,
                    language: s.language.clone(),
                    session_id: self.id.clone(),
                });
                let names = proto::ProviderNames {
                    stt: p.stt.name().to_owned(),
                    llm: p.llm.name().to_owned(),
                    tts: p.tts.name().to_owned(),
                };
                (Some(core), Some(stt), names)
            }
            None => {
                let echo = ProviderMode::Echo.as_str().to_owned();
                (
                    None,
                    None,
                    proto::ProviderNames {
                        stt: echo.clone(),
                        llm: echo.clone(),
                        tts: echo,
                    },
                )
            }
        };
        self.phase = Phase::Running(Box::new(Running {
            input,
            frontend,
            events: Vec::with_capacity(8),
            core,
            stt,
            llm: None,
            tts: None,
            output,
            voice: s.voice.clone(),
            language: s.language.clone(),
            model: s.model.clone(),
            deadline: None,
            finalize_retry: None,
            stt_failures: 0,
            stt_reopen_at: None,
            names: names.clone(),
        }));
        let ready = ServerMessage::SessionReady(proto::SessionReady {
            session_id: self.id.clone(),
            protocol: proto::SUBPROTOCOL.to_owned(),
            input,
            output,
            output_frame_ms: OUT_FRAME_MS,
            plan: self
                .metering
                .account
                .as_ref()
                .map(|a| a.plan.info())
                .unwrap_or_else(|| proto::PlanInfo {
                    name: duplex_metering::UNMETERED.into(),
                    limits: proto::PlanLimits::default(),
                }),
            providers: names,
        });
        self.send(&ready);
        self.start_metering();
        info!(sample_rate = s.sample_rate, encoding = ?s.encoding, "session started");
        Ok(())
    }

    // -- inbound -----------------------------------------------------------------------------

    fn on_inbound(&mut self, m: Inbound) {
        if self.ended {
            // Only errors for late messages; the close is already scheduled.
            if !matches!(m, Inbound::Closed) {
                self.send_error(ErrorCode::SessionEnded, "the session has ended", false);
            }
            return;
        }
        match m {
            Inbound::Closed => {}
            Inbound::TooLarge => {
                let limit = self.ctx.config.max_message_bytes;
                self.send_error(
                    ErrorCode::MessageTooLarge,
                    format!("message larger than the {limit}-byte limit"),
                    true,
                );
                self.close_soon(
                    close_code::MESSAGE_TOO_BIG,
                    "message too big",
                    Duration::ZERO,
                );
                self.ended = true;
            }
            Inbound::Text(text) => match proto::parse_client_message(&text) {
                Ok(msg) => self.on_message(msg),
                Err(e) => {
                    let code = refine_parse_error(&e, &text);
                    self.send_error(code, e.to_string(), false);
                }
            },
            Inbound::Binary(bytes) => self.on_audio(bytes),
        }
    }

    fn on_message(&mut self, msg: ClientMessage) {
        let running = matches!(self.phase, Phase::Running(_));
        match msg {
            ClientMessage::Ping(p) => {
                if p.id.as_ref().is_some_and(|id| id.len() > MAX_PING_ID_BYTES) {
                    self.send_error(
                        ErrorCode::InvalidMessage,
                        format!("ping id longer than {MAX_PING_ID_BYTES} bytes"),
                        false,
                    );
                } else {
                    self.send(&ServerMessage::Pong(proto::Pong { id: p.id }));
                }
            }
            ClientMessage::SessionStart(s) => {
                if running {
                    self.send_error(
                        ErrorCode::SessionAlreadyStarted,
                        "the session has already started",
                        false,
                    );
                } else {
                    self.start(s);
                }
            }
            ClientMessage::SessionEnd(_) => {
                info!("client ended the session");
                self.ended = true;
                if let Phase::Running(r) = &mut self.phase {
                    r.llm = None;
                    r.tts = None;
                }
                self.close_soon(close_code::NORMAL, "session ended", END_LINGER);
            }
            _ if !running => {
                self.send_error(
                    ErrorCode::SessionNotStarted,
                    "send session.start first",
                    false,
                );
            }
            ClientMessage::InputText(t) => {
                let max = self.ctx.config.max_input_text_chars;
                if t.text.chars().nth(max).is_some() {
                    self.send_error(
                        ErrorCode::InvalidMessage,
                        format!("input.text longer than {max} characters (MAX_INPUT_TEXT_CHARS)"),
                        false,
                    );
                } else {
                    self.core_input(Input::UserText { text: t.text });
                }
            }
            ClientMessage::ResponseInterrupt(_) => self.core_input(Input::Interrupt),
            ClientMessage::PlaybackMark(m) => self.core_input(Input::PlaybackMark {
                turn: m.turn_id,
                played_ms: m.played_ms,
            }),
        }
    }

    fn on_audio(&mut self, bytes: Vec<u8>) {
        self.ctx.metrics.frames_in_total.inc();
        let Phase::Running(r) = &mut self.phase else {
            self.send_error(
                ErrorCode::AudioBeforeSessionStart,
                "binary audio before session.start",
                false,
            );
            return;
        };
        r.events.clear();
        if let Err(e) = r.frontend.push(&bytes, &mut r.events) {
            let code = match e {
                duplex_audio::AudioError::OddLength(_) => ErrorCode::OddFrameLength,
                _ => ErrorCode::Internal,
            };
            self.send_error(code, e.to_string(), false);
            return;
        }
        let now = Instant::now().into_std();
        let mut events = std::mem::take(&mut r.events);
        let mut json = Vec::new();
        for ev in events.drain(..) {
            match ev {
                FrontEndEvent::Frame { samples, .. } => {
                    if let Some(stt) = &r.stt
                        && stt
                            .input
                            .try_send(SttInput::Audio(samples.to_vec()))
                            .is_err()
                    {
                        self.ctx.metrics.stt_frames_dropped_total.inc();
                    }
                }
                FrontEndEvent::SpeechStarted { audio_ms } => match r.core.as_mut() {
                    Some(core) => core.handle_input(now, Input::SpeechStarted { audio_ms }),
                    None => json.push(ServerMessage::SpeechStarted(proto::SpeechStarted {
                        audio_ms,
                    })),
                },
                FrontEndEvent::SpeechStopped { audio_ms } => {
                    let silence = r.frontend.audio_ms().saturating_sub(audio_ms);
                    self.ctx
                        .metrics
                        .stage_latency
                        .with_label_values(&["endpointing"])
                        .observe(silence as f64 / 1000.0);
                    match r.core.as_mut() {
                        Some(core) => core.handle_input(now, Input::SpeechStopped { audio_ms }),
                        None => json.push(ServerMessage::SpeechStopped(proto::SpeechStopped {
                            audio_ms,
                        })),
                    }
                }
            }
        }
        r.events = events;
        let echo = r.core.is_none();
        for m in json {
            self.send(&m);
        }
        if echo {
            // Echo mode: one frame back per frame in, after the whole front end ran on it.
            self.ctx.metrics.frames_out_total.inc();
            self.push(Outbound::Binary(bytes));
        }
    }

    // -- provider events ---------------------------------------------------------------------

    fn on_stt(&mut self, e: Option<SttEvent>) {
        let input = match e {
            Some(SttEvent::Interim { text }) => {
                self.stt_healthy();
                Input::SttInterim { text }
            }
            Some(SttEvent::Final { text }) => {
                self.stt_healthy();
                Input::SttFinal { text }
            }
            Some(SttEvent::SpeechStarted | SttEvent::UtteranceEnd) => return,
            Some(SttEvent::Error(err)) => {
                let retry = self.stt_failed();
                warn!(error = %err, retry_in_ms = retry.as_millis() as u64, "STT stream failed");
                Input::SttError {
                    message: format!(
                        "speech recognition failed: {err}; reconnecting in {} ms",
                        retry.as_millis()
                    ),
                }
            }
            None => {
                let retry = self.stt_failed();
                warn!(
                    retry_in_ms = retry.as_millis() as u64,
                    "STT stream ended unexpectedly"
                );
                Input::SttError {
                    message: format!(
                        "speech recognition stream ended; reconnecting in {} ms",
                        retry.as_millis()
                    ),
                }
            }
        };
        self.core_input(input);
    }

    /// The STT stream failed: close it and schedule its reopening with exponential backoff
    /// and jitter. Returns the delay.
    fn stt_failed(&mut self) -> Duration {
        let Phase::Running(r) = &mut self.phase else {
            return Duration::ZERO;
        };
        r.stt = None;
        r.finalize_retry = None;
        let exp = STT_REOPEN_FIRST.saturating_mul(1 << r.stt_failures.min(16));
        r.stt_failures = r.stt_failures.saturating_add(1);
        // Half to all of the exponential delay: sessions that failed together (a provider
        // outage) do not all reconnect in the same instant.
        let delay = exp
            .min(STT_REOPEN_MAX)
            .mul_f64(0.5 + rand::random::<f64>() * 0.5);
        r.stt_reopen_at = Some(Instant::now() + delay);
        delay
    }

    fn stt_healthy(&mut self) {
        if let Phase::Running(r) = &mut self.phase {
            r.stt_failures = 0;
        }
    }

    /// Reopens the closed STT stream (at the backoff deadline) so the next utterance is heard.
    fn reopen_stt(&mut self) {
        let (Phase::Running(r), Some(p)) = (&mut self.phase, &self.ctx.providers) else {
            return;
        };
        r.stt_reopen_at = None;
        r.stt = Some(p.stt.open(SttParams {
            sample_rate: duplex_audio::INTERNAL_RATE,
            language: r.language.clone(),
            session_id: self.id.clone(),
        }));
    }

    /// Asks the recognizer for the final transcript of the utterance. A full queue (audio the
    /// recognizer has not taken yet) gets the request again shortly, behind that audio; the
    /// actor never waits on it and spawns nothing for it.
    fn send_finalize(&mut self) {
        let Phase::Running(r) = &mut self.phase else {
            return;
        };
        r.finalize_retry = None;
        let Some(stt) = &r.stt else { return };
        match stt.input.try_send(SttInput::Finalize) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                r.finalize_retry = Some(Instant::now() + FINALIZE_RETRY);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    fn on_llm(
        &mut self,
        turn: TurnId,
        e: Option<Result<LlmEvent, duplex_providers::ProviderError>>,
    ) {
        let input = match e {
            Some(Ok(LlmEvent::Delta(text))) => Input::LlmDelta { turn, text },
            Some(Ok(LlmEvent::Done { usage, model })) => {
                debug!(?usage, model, "LLM turn done");
                if let Some(u) = usage {
                    let tokens = u64::from(u.prompt_tokens) + u64::from(u.completion_tokens);
                    self.meter_input(duplex_metering::MeterInput::ProviderUsage(
                        duplex_metering::ProviderUsage {
                            llm_tokens: tokens,
                            ..Default::default()
                        },
                    ));
                }
                self.clear_llm(turn);
                Input::LlmDone { turn }
            }
            Some(Err(err)) => {
                warn!(error = %err, "LLM failed");
                self.clear_llm(turn);
                Input::LlmError {
                    turn,
                    message: format!("language model failed: {err}"),
                }
            }
            None => {
                self.clear_llm(turn);
                Input::LlmError {
                    turn,
                    message: "language model stream ended without finishing".into(),
                }
            }
        };
        self.core_input(input);
    }

    fn clear_llm(&mut self, turn: TurnId) {
        if let Phase::Running(r) = &mut self.phase
            && r.llm.as_ref().is_some_and(|l| l.turn == turn)
        {
            r.llm = None;
        }
    }

    fn on_tts(&mut self, turn: TurnId, e: Option<TtsEvent>) {
        let Phase::Running(r) = &mut self.phase else {
            return;
        };
        let (Some(core), Some(tts)) = (r.core.as_mut(), r.tts.as_mut()) else {
            return;
        };
        if tts.turn != turn {
            return;
        }
        let now = Instant::now().into_std();
        let input = match e {
            Some(TtsEvent::Audio {
                index,
                samples,
                sample_rate,
            }) => {
                tts.on_audio(core, now, index, &samples, sample_rate);
                None
            }
            Some(TtsEvent::ChunkDone { index }) => Some(Input::TtsChunkDone { turn, index }),
            Some(TtsEvent::Finished) => {
                tts.finish(core, now);
                r.tts = None;
                Some(Input::TtsFinished { turn })
            }
            Some(TtsEvent::Error(err)) => {
                warn!(error = %err, "TTS failed");
                tts.finish(core, now);
                r.tts = None;
                Some(Input::TtsError {
                    turn,
                    message: format!("speech synthesis failed: {err}"),
                })
            }
            None => {
                tts.finish(core, now);
                r.tts = None;
                Some(Input::TtsError {
                    turn,
                    message: "speech synthesis stream ended early".into(),
                })
            }
        };
        if let Some(input) = input {
            self.core_input(input);
        }
    }

    // -- the core ----------------------------------------------------------------------------

    fn core_input(&mut self, input: Input) {
        if let Phase::Running(r) = &mut self.phase
            && let Some(core) = r.core.as_mut()
        {
            core.handle_input(Instant::now().into_std(), input);
        }
    }

    /// Carries out everything the core asks for, and remembers its next deadline.
    fn drive(&mut self) {
        loop {
            let Phase::Running(r) = &mut self.phase else {
                return;
            };
            let Some(core) = r.core.as_mut() else { return };
            match core.poll_output() {
                Output::Send(msg) => self.send(&msg),
                Output::Audio(bytes) => {
                    self.ctx.metrics.frames_out_total.inc();
                    self.push(Outbound::Binary(bytes));
                }
                Output::FinalizeStt => self.send_finalize(),
                Output::StartTurn {
                    turn,
                    system_prompt,
                    history,
                } => {
                    tracing::Span::current().record("turn_id", turn);
                    if let Some(denial) = self.request_turn(turn) {
                        info!(
                            turn,
                            code = denial.code.as_str(),
                            "turn refused by the plan"
                        );
                        self.send_error(denial.code, denial.message, false);
                        self.send(&ServerMessage::LimitExceeded(denial.limit));
                        self.core_input(Input::RejectTurn { turn });
                        continue;
                    }
                    self.ctx.metrics.turns_total.inc();
                    self.start_turn(turn, system_prompt, history);
                }
                Output::TtsText { turn, index, text } => {
                    let chars = text.chars().count() as u64;
                    if let Some(tts) = r.tts.as_ref().filter(|t| t.turn == turn)
                        && tts
                            .stream
                            .input
                            .try_send(TtsInput::Text { index, text })
                            .is_err()
                    {
                        warn!("TTS text queue full; chunk dropped");
                    }
                    self.meter_input(duplex_metering::MeterInput::ProviderUsage(
                        duplex_metering::ProviderUsage {
                            tts_characters: chars,
                            ..Default::default()
                        },
                    ));
                }
                Output::TtsEnd { turn } => {
                    if let Some(tts) = r.tts.as_ref().filter(|t| t.turn == turn) {
                        let _ = tts.stream.input.try_send(TtsInput::End);
                    }
                }
                Output::CancelTurn { turn } => {
                    if r.llm.as_ref().is_some_and(|l| l.turn == turn) {
                        r.llm = None;
                    }
                    if r.tts.as_ref().is_some_and(|t| t.turn == turn) {
                        r.tts = None;
                    }
                }
                Output::TurnEnded {
                    turn,
                    reason,
                    audio_ms,
                } => {
                    info!(turn, ?reason, audio_ms, "turn ended");
                    self.meter_input(duplex_metering::MeterInput::TurnEnded { turn });
                    let Phase::Running(r) = &mut self.phase else {
                        return;
                    };
                    if reason == AudioEndReason::Interrupted {
                        self.ctx.metrics.interruptions_total.inc();
                    }
                    if r.llm.as_ref().is_some_and(|l| l.turn == turn) {
                        r.llm = None;
                    }
                    if r.tts.as_ref().is_some_and(|t| t.turn == turn) {
                        r.tts = None;
                    }
                    if self.drain_deadline.is_some() {
                        self.close_soon(
                            close_code::GOING_AWAY,
                            "server shutting down",
                            Duration::ZERO,
                        );
                    }
                }
                Output::Latency { stage, value } => {
                    self.ctx
                        .metrics
                        .stage_latency
                        .with_label_values(&[stage.as_str()])
                        .observe(value.as_secs_f64());
                    let provider = match stage {
                        Stage::SttFinal => Some(&r.names.stt),
                        Stage::LlmFirstToken => Some(&r.names.llm),
                        Stage::TtsFirstAudio => Some(&r.names.tts),
                        Stage::VoiceToVoice => None,
                    };
                    if let Some(provider) = provider {
                        self.ctx
                            .metrics
                            .provider_latency
                            .with_label_values(&[stage.as_str(), provider.as_str()])
                            .observe(value.as_secs_f64());
                    }
                }
                Output::Timeout(at) => {
                    r.deadline = Some(Instant::from_std(at));
                    return;
                }
                Output::Idle => {
                    r.deadline = None;
                    return;
                }
            }
        }
    }

    fn start_turn(
        &mut self,
        turn: TurnId,
        system_prompt: String,
        history: Vec<duplex_core::conversation::HistoryEntry>,
    ) {
        let Phase::Running(r) = &mut self.phase else {
            return;
        };
        let providers = self
            .ctx
            .providers
            .as_ref()
            .expect("turns only start with providers");
        let mut messages = Vec::with_capacity(history.len() + 1);
        if !system_prompt.is_empty() {
            messages.push(ChatMessage::new(Role::System, system_prompt));
        }
        messages.extend(history.into_iter().map(|h| {
            let role = match h.speaker {
                Speaker::User => Role::User,
                Speaker::Assistant => Role::Assistant,
            };
            ChatMessage::new(role, h.text)
        }));
        // What the LLM router's policy sees: the user's plan, and what is left of the
        // service's daily spending cap (`MAX_DAILY_SPEND_USD`) when one is set.
        let plan = self.metering.account.as_ref().map(|a| a.plan.name.clone());
        let budget_remaining_usd = self
            .metering
            .switches
            .borrow()
            .max_daily_spend_micros
            .map(|cap| cap.saturating_sub(self.metering.spend_today_micros) as f64 / 1e6);
        let request = LlmRequest {
            session_id: self.id.clone(),
            model: r.model.clone(),
            messages,
            max_tokens: None,
            plan,
            budget_remaining_usd,
        };
        let mut stream = providers.llm.stream(request);
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
        r.llm = Some(LlmTurn {
            turn,
            events: rx,
            task,
        });
        let stream = providers.tts.open(TtsParams {
            session_id: self.id.clone(),
            voice: r.voice.clone(),
            language: r.language.clone(),
            preferred_sample_rate: r.output.sample_rate,
        });
        r.tts = Some(TtsTurn {
            turn,
            stream,
            stage: OutputStage::new(r.output.sample_rate, r.output.encoding, OUT_FRAME_MS)
                .expect("the output rate was validated at session.start"),
            frames: Vec::new(),
        });
        let _ = r.input;
    }
}

/// Gives `unsupported_encoding` for a `session.start` whose only fault is its encoding.
fn refine_parse_error(e: &proto::ParseError, text: &str) -> ErrorCode {
    if let proto::ParseError::Invalid { kind, .. } = e
        && kind == "session.start"
        && let Ok(v) = serde_json::from_str::<serde_json::Value>(text)
    {
        for field in ["encoding", "output_encoding"] {
            if let Some(enc) = v.get(field).and_then(|e| e.as_str())
                && Encoding::parse(enc).is_none()
            {
                return ErrorCode::UnsupportedEncoding;
            }
        }
    }
    e.code()
}

async fn recv_opt<T>(rx: Option<&mut mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The wall clock as the metering core takes it (read here, in the shell).
fn wall_clock() -> duplex_metering::UnixMs {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    duplex_metering::UnixMs(ms)
}
