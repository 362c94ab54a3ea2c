//! [`Session`]: the machine. See the crate docs for its place between the shell and the pure
//! parts it composes.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use duplex_audio::{
    EndpointConfig, FrontEnd, FrontEndConfig, FrontEndEvent, OutputFrame, OutputStage,
};
use duplex_core::conversation::{
    Conversation, ConversationConfig, Input as CoreInput, Output as CoreOutput, Stage, TurnId,
};
use duplex_metering::{
    Admission, Denial, MeterConfig, MeterInput, MeterOutput, MeterStart, SessionMeter, Switches,
    TurnDecision, UnixMs, UsageTotals, UserTurnLimiter,
};
use duplex_proto::{
    self as proto, AudioEndReason, AudioFormat, ClientMessage, Encoding, ErrorCode, ServerMessage,
    SessionStart, close_code,
};
use tracing::{debug, info, warn};

use crate::rng::Jitter;
use crate::{
    Account, Admitted, ClientIn, Command, DRAIN_WRITE_RESERVE, END_LINGER, FINALIZE_RETRY, Input,
    LlmIn, MAX_PING_ID_BYTES, OUT_FRAME_MS, Observation, STT_REOPEN_FIRST, STT_REOPEN_MAX,
    SessionConfig, SttIn, TtsIn, TurnRequest,
};

/// Where the connection is in its life.
enum Phase {
    /// Waiting for the store's answer about the user ([`Input::Admission`]).
    Admitting,
    /// Admitted; waiting for `session.start`.
    AwaitingStart,
    Running(Box<Running>),
}

/// The running part of a session (after `session.start`).
struct Running {
    input: AudioFormat,
    /// Audio time received, against the time since `session.ready` (the rate bound).
    audio: AudioClock,
    frontend: FrontEnd,
    events: Vec<FrontEndEvent>,
    /// `None` in echo mode.
    core: Option<Conversation>,
    core_deadline: Option<Instant>,
    stt: Stt,
    /// The turn whose LLM stream is open.
    llm: Option<TurnId>,
    tts: Option<TtsTurn>,
    output: AudioFormat,
    voice: Option<String>,
    language: Option<String>,
    model: Option<String>,
}

/// How much audio the client sent, against the wall time since the session started.
struct AudioClock {
    since: Instant,
    received_us: u64,
    last_error: Option<Instant>,
}

impl AudioClock {
    /// Counts a frame of `len` bytes in `input`'s format received at `now`, or refuses it: it
    /// would put the audio received more than `ahead` beyond the time since the start. `Err`
    /// carries how far ahead it would be (ms) when the client should be told (at most once per
    /// [`crate::AUDIO_TOO_FAST_ERROR_EVERY`]).
    fn admit(
        &mut self,
        now: Instant,
        input: AudioFormat,
        len: usize,
        ahead: Duration,
    ) -> Result<(), Option<u64>> {
        let samples = match input.encoding {
            Encoding::Pcm16 => len / 2,
            Encoding::Mulaw => len,
        } as u64;
        let frame_us = samples * 1_000_000 / u64::from(input.sample_rate.max(1));
        let elapsed_us = now.saturating_duration_since(self.since).as_micros() as u64;
        let allowed_us = elapsed_us + ahead.as_micros() as u64;
        if self.received_us + frame_us <= allowed_us {
            self.received_us += frame_us;
            return Ok(());
        }
        let tell = self
            .last_error
            .is_none_or(|at| now >= at + crate::AUDIO_TOO_FAST_ERROR_EVERY);
        if !tell {
            return Err(None);
        }
        self.last_error = Some(now);
        Err(Some((self.received_us + frame_us - elapsed_us) / 1000))
    }
}

/// The speech recognition stream's state (conversation mode).
#[derive(Default)]
struct Stt {
    open: bool,
    /// Consecutive failures (reset by the next transcript).
    failures: u32,
    /// The closed stream is reopened at this time.
    reopen_at: Option<Instant>,
    /// A `Finalize` that did not fit in the queue is retried at this time.
    finalize_retry: Option<Instant>,
}

/// A TTS turn in flight, with the conversion of its audio to the session's output format.
struct TtsTurn {
    turn: TurnId,
    stage: OutputStage,
    frames: Vec<OutputFrame>,
}

impl TtsTurn {
    /// Hands the stage's finished frames to the core.
    fn deliver(&mut self, core: &mut Conversation, now: Instant) {
        for f in self.frames.drain(..) {
            core.handle_input(
                now,
                CoreInput::TtsFrame {
                    turn: self.turn,
                    index: f.index,
                    duration: self.stage.duration_of(f.samples),
                    bytes: f.bytes,
                },
            );
        }
    }

    /// Flushes the resampler and the last partial frame at the end of the turn's audio.
    fn finish(&mut self, core: &mut Conversation, now: Instant) {
        self.stage.finish(&mut self.frames);
        self.deliver(core, now);
    }
}

/// Metering state of the session.
struct Metering {
    meter: SessionMeter,
    account: Option<Account>,
    /// Today's totals from admission, handed to the meter at `session.ready`.
    totals: Option<UsageTotals>,
    /// The meter runs (from `session.ready` on).
    started: bool,
    deadline: Option<Instant>,
    switches: Switches,
    /// The meter's answer to the last turn request.
    decision: Option<(TurnId, TurnDecision)>,
    /// Why the session ended, as recorded in the store.
    close_reason: &'static str,
    /// The day's provider spend (all users) as of the last store read, for routing
    /// near-budget turns to cheaper models.
    spend_today_micros: u64,
    /// The meter had an input since its outputs were last taken (most inputs of a session,
    /// audio frames above all, concern only the conversation: the meter is not polled then).
    dirty: bool,
}

/// The connection is over; the final usage is being written.
struct Finishing {
    give_up_at: Instant,
}

/// The rules of one connection. See the crate docs.
pub struct Session {
    config: SessionConfig,
    limiter: UserTurnLimiter,
    /// The wall clock at `anchor` (later wall times are derived from the monotonic `now`).
    anchor: (Instant, UnixMs),
    phase: Phase,
    metering: Metering,
    commands: VecDeque<Command>,
    jitter: Jitter,
    /// Last time the client sent anything.
    last_seen: Instant,
    /// When the connection was upgraded (the pre-start deadline counts from here).
    connected_at: Instant,
    /// Set on shutdown during a turn: the session closes when its turn ends, or at this time.
    drain_deadline: Option<Instant>,
    /// `Shutdown` was handled; everything (the final usage included) must be done by then.
    shutdown_by: Option<Instant>,
    /// Set by `session.end` or a fatal error: close with this code at this time.
    closing: Option<(Instant, u16, &'static str)>,
    /// Only `session_ended` errors answer client messages from now on.
    ended: bool,
    /// Nothing more reaches the client.
    writer_gone: bool,
    finishing: Option<Finishing>,
    done: bool,
}

impl Session {
    /// A connection upgraded at `now` (when the wall clock read `wall`). Feed
    /// [`Input::Admission`] first.
    pub fn new(
        config: SessionConfig,
        limiter: UserTurnLimiter,
        now: Instant,
        wall: UnixMs,
    ) -> Session {
        let meter = SessionMeter::new(MeterConfig {
            heartbeat: config.usage_heartbeat,
            ..MeterConfig::default()
        });
        Session {
            jitter: Jitter::new(config.jitter_seed),
            config,
            limiter,
            anchor: (now, wall),
            phase: Phase::Admitting,
            metering: Metering {
                meter,
                account: None,
                totals: None,
                started: false,
                deadline: None,
                switches: Switches::default(),
                decision: None,
                close_reason: "closed",
                spend_today_micros: 0,
                dirty: false,
            },
            commands: VecDeque::new(),
            last_seen: now,
            connected_at: now,
            drain_deadline: None,
            shutdown_by: None,
            closing: None,
            ended: false,
            writer_gone: false,
            finishing: None,
            done: false,
        }
    }

    /// The next command for the shell, in order.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// When [`Session::handle_timeout`] is due next; `None`: only inputs matter now.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.done {
            return None;
        }
        if let Some(f) = &self.finishing {
            return min_opt(Some(f.give_up_at), self.metering.deadline);
        }
        let mut at = min_opt(self.closing.map(|c| c.0), self.drain_deadline);
        at = min_opt(at, self.metering.deadline);
        if self.closing.is_none() {
            at = min_opt(at, Some(self.last_seen + self.config.idle_timeout));
            if matches!(self.phase, Phase::AwaitingStart | Phase::Admitting) {
                at = min_opt(at, Some(self.connected_at + self.config.pre_start_timeout));
            }
        }
        if let Phase::Running(r) = &self.phase {
            at = min_opt(at, r.core_deadline);
            at = min_opt(at, r.stt.reopen_at);
            at = min_opt(at, r.stt.finalize_retry);
        }
        at
    }

    /// Whether the shell should read the TTS stream now: `false` while enough assistant audio
    /// is queued (backpressure reaches the provider instead of growing memory).
    pub fn wants_tts_audio(&self) -> bool {
        match &self.phase {
            Phase::Running(r) => r.core.as_ref().is_none_or(|c| c.wants_tts_audio()),
            _ => false,
        }
    }

    /// The connection is over and the final usage is being written (or done).
    pub fn is_finishing(&self) -> bool {
        self.finishing.is_some() || self.done
    }

    /// Everything is finished.
    pub fn is_done(&self) -> bool {
        self.done
    }

    pub fn handle_input(&mut self, now: Instant, input: Input) {
        if self.done {
            return;
        }
        match input {
            Input::Persisted { seq, result } => self.on_persisted(now, seq, result),
            Input::Shutdown => self.on_shutdown(now),
            Input::WriterGone { slow } => {
                self.writer_gone = true;
                if slow {
                    info!("client is not reading: disconnected as slow consumer");
                }
                self.finish(now);
            }
            _ if self.finishing.is_some() => {}
            Input::Admission(a) => self.admit(now, a),
            Input::UrlStart(Ok(s)) => {
                if matches!(self.phase, Phase::AwaitingStart) {
                    self.start(now, s);
                }
            }
            Input::UrlStart(Err((code, message))) => self.send_error(code, message, false),
            Input::Client(m) => self.on_client(now, m),
            Input::Stt(e) => self.on_stt(now, e),
            Input::SttFinalizeDeferred => {
                if let Phase::Running(r) = &mut self.phase
                    && r.stt.open
                {
                    r.stt.finalize_retry = Some(now + FINALIZE_RETRY);
                }
            }
            Input::Llm { turn, event } => self.on_llm(now, turn, event),
            Input::Tts { turn, event } => self.on_tts(now, turn, event),
            Input::Switches(s) => {
                self.metering.switches = s.clone();
                self.meter_input(now, MeterInput::Switches(s));
            }
            Input::ProviderUsage(u) => self.meter_input(now, MeterInput::ProviderUsage(u)),
        }
        self.drive(now);
    }

    /// Time passed: handles whatever deadline is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.done {
            return;
        }
        if let Some(f) = &self.finishing {
            if f.give_up_at <= now {
                let deltas = self.metering.meter.take_unpersisted();
                if let (Some(a), false) = (&self.metering.account, deltas.is_empty()) {
                    let seconds: u64 = deltas.iter().map(|d| d.seconds).sum();
                    warn!(
                        writes = deltas.len(),
                        seconds,
                        "the store did not acknowledge the session's final usage in time: handing it to the server's backlog"
                    );
                    self.commands.push_back(Command::HandOff {
                        user_id: a.user_id,
                        deltas,
                    });
                }
                self.end(now);
                return;
            }
            if due(self.metering.deadline, now) {
                self.feed_meter(now, MeterInput::Tick);
                self.drive_meter(now);
            }
            return;
        }
        if due(self.drain_deadline, now) {
            self.drain_deadline = None;
            self.close_soon(
                now,
                close_code::GOING_AWAY,
                "server shutting down",
                Duration::ZERO,
            );
        }
        if due(self.metering.deadline, now) {
            self.meter_input(now, MeterInput::Tick);
        }
        if let Phase::Running(r) = &mut self.phase {
            if due(r.core_deadline, now)
                && let Some(core) = r.core.as_mut()
            {
                r.core_deadline = None;
                core.handle_input(now, CoreInput::Tick);
            }
            if due(r.stt.finalize_retry, now) {
                r.stt.finalize_retry = None;
                self.finalize_stt();
            }
        }
        if let Phase::Running(r) = &mut self.phase
            && due(r.stt.reopen_at, now)
        {
            r.stt.reopen_at = None;
            r.stt.open = true;
            let language = r.language.clone();
            self.commands.push_back(Command::OpenStt { language });
        }
        if self.closing.is_none() {
            if now >= self.last_seen + self.config.idle_timeout {
                self.send_error(
                    ErrorCode::IdleTimeout,
                    "no message from the client within the idle timeout",
                    true,
                );
                self.close_soon(
                    now,
                    close_code::IDLE_TIMEOUT,
                    "idle timeout",
                    Duration::ZERO,
                );
            } else if matches!(self.phase, Phase::AwaitingStart | Phase::Admitting)
                && now >= self.connected_at + self.config.pre_start_timeout
            {
                info!("no session.start within the pre-start timeout: closing");
                let secs = self.config.pre_start_timeout.as_secs();
                self.send_error(
                    ErrorCode::StartTimeout,
                    format!("no session started within {secs} s of connecting"),
                    true,
                );
                self.close_soon(
                    now,
                    close_code::IDLE_TIMEOUT,
                    "no session.start",
                    Duration::ZERO,
                );
            }
        }
        self.drive(now);
    }

    // -- outputs ---------------------------------------------------------------------------

    fn send(&mut self, msg: ServerMessage) {
        if let ServerMessage::Error(e) = &msg {
            debug!(code = e.code.as_str(), message = %e.message, "error event");
        }
        if !self.writer_gone {
            self.commands.push_back(Command::Send(msg));
        }
    }

    fn send_error(&mut self, code: ErrorCode, message: impl Into<String>, fatal: bool) {
        self.send(ServerMessage::error(code, message, fatal));
    }

    fn observe(&mut self, o: Observation) {
        self.commands.push_back(Command::Observe(o));
    }

    fn close_soon(&mut self, now: Instant, code: u16, reason: &'static str, after: Duration) {
        if self.closing.is_none() {
            self.closing = Some((now + after, code, reason));
        }
    }

    /// Sends the scheduled close frame if it is due, and finishes.
    fn close_if_due(&mut self, now: Instant) {
        if let Some((at, code, reason)) = self.closing
            && at <= now
            && self.finishing.is_none()
        {
            if !self.writer_gone {
                self.commands.push_back(Command::Close { code, reason });
            }
            self.finish(now);
        }
    }

    /// Drops the streams of the turn in flight.
    fn cancel_streams(&mut self) {
        if let Phase::Running(r) = &mut self.phase {
            let turns = [r.llm.take(), r.tts.take().map(|t| t.turn)];
            let mut last = None;
            for turn in turns.into_iter().flatten() {
                if last != Some(turn) {
                    self.commands.push_back(Command::CancelTurn { turn });
                }
                last = Some(turn);
            }
        }
    }

    /// The connection is over: release everything and write the final usage.
    fn finish(&mut self, now: Instant) {
        if self.finishing.is_some() {
            return;
        }
        self.cancel_streams();
        self.commands.push_back(Command::Release);
        let mut give_up_at = now + self.config.final_write_timeout;
        if let Some(by) = self.shutdown_by {
            give_up_at = give_up_at.min(by.max(now));
        }
        self.finishing = Some(Finishing { give_up_at });
        if self.metering.started {
            self.feed_meter(now, MeterInput::Ending);
            self.drive_meter(now);
        } else {
            self.end(now);
        }
    }

    fn end(&mut self, _now: Instant) {
        if self.done {
            return;
        }
        if self.metering.started {
            self.commands.push_back(Command::RecordEnd {
                reason: self.metering.close_reason,
            });
        }
        self.metering.deadline = None;
        self.done = true;
        self.commands.push_back(Command::Done);
    }

    fn wall(&self, now: Instant) -> UnixMs {
        let (at, wall) = self.anchor;
        UnixMs(wall.0 + now.saturating_duration_since(at).as_millis() as u64)
    }

    // -- admission and start -----------------------------------------------------------------

    fn admit(&mut self, now: Instant, a: Result<Admitted, String>) {
        if !matches!(self.phase, Phase::Admitting) {
            return;
        }
        let a = match a {
            Ok(a) => a,
            Err(why) => {
                warn!(error = %why, "usage store unavailable: refusing the session");
                self.send_error(
                    ErrorCode::Internal,
                    "the usage store is unavailable; try again shortly",
                    true,
                );
                self.close_soon(
                    now,
                    close_code::INTERNAL_ERROR,
                    "usage store unavailable",
                    Duration::ZERO,
                );
                return;
            }
        };
        self.metering.switches = a.switches.clone();
        if let Admission::Refused(limit) =
            duplex_metering::admission(&a.account.plan, &a.totals, &a.switches)
        {
            info!(user = a.account.user_id, limit = %limit.limit, "connection refused: limit");
            self.send(ServerMessage::LimitExceeded(limit));
            self.close_soon(
                now,
                close_code::LIMIT_EXCEEDED,
                "limit exceeded",
                Duration::ZERO,
            );
            return;
        }
        debug!(user = a.account.user_id, plan = %a.account.plan.name, "admitted");
        self.metering.spend_today_micros = a.totals.spend_today_micros;
        self.metering.account = Some(a.account);
        self.metering.totals = Some(a.totals);
        self.phase = Phase::AwaitingStart;
    }

    fn start(&mut self, now: Instant, s: SessionStart) {
        if let Err((code, msg)) = self.try_start(now, s) {
            self.send_error(code, msg, false);
        }
    }

    fn try_start(&mut self, now: Instant, s: SessionStart) -> Result<(), (ErrorCode, String)> {
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
        let cfg = &self.config;
        let input = AudioFormat {
            encoding: s.encoding,
            sample_rate: s.sample_rate,
        };
        let output = AudioFormat {
            encoding: s.output_encoding.unwrap_or(s.encoding),
            sample_rate: out_rate,
        };
        let frontend = FrontEnd::new(FrontEndConfig {
            encoding: s.encoding,
            input_rate: s.sample_rate,
            vad_mode: cfg.vad_mode,
            endpoint: EndpointConfig {
                speech_start_ms: cfg.speech_start.as_millis() as u64,
                end_of_turn_ms: cfg.end_of_turn.as_millis() as u64,
                max_turn_ms: cfg.max_turn.as_millis() as u64,
                ..EndpointConfig::default()
            },
        })
        .map_err(|e| (ErrorCode::UnsupportedSampleRate, e.to_string()))?;
        let echo = "echo".to_owned();
        let (core, names) = match &cfg.engines {
            Some(names) => {
                let core = Conversation::new(ConversationConfig {
                    system_prompt: s
                        .system_prompt
                        .clone()
                        .unwrap_or_else(|| cfg.system_prompt.clone()),
                    audio_lead: cfg.audio_lead,
                    first_chunk_wait: cfg.first_chunk_wait,
                    frame: Duration::from_millis(u64::from(OUT_FRAME_MS)),
                    output_format: output,
                    ..ConversationConfig::default()
                });
                (Some(core), names.clone())
            }
            None => (
                None,
                proto::ProviderNames {
                    stt: echo.clone(),
                    llm: echo.clone(),
                    tts: echo,
                },
            ),
        };
        let conversation = core.is_some();
        // A client may only choose among its plan's models; another name is ignored (the
        // plan's default applies) and the client is told why.
        let plan_name = self.metering.account.as_ref().map(|a| a.plan.name.clone());
        let mut model = s.model.clone();
        let mut model_refused = None;
        if let (Some(m), Some(check)) = (model.as_deref(), &cfg.model_check)
            && let Err(why) = check.check(plan_name.as_deref(), m)
        {
            model_refused = Some(why);
            model = None;
        }
        self.phase = Phase::Running(Box::new(Running {
            input,
            audio: AudioClock {
                since: now,
                received_us: 0,
                last_error: None,
            },
            frontend,
            events: Vec::with_capacity(8),
            core,
            core_deadline: None,
            stt: Stt {
                open: conversation,
                ..Stt::default()
            },
            llm: None,
            tts: None,
            output,
            voice: s.voice.clone(),
            language: s.language.clone(),
            model,
        }));
        if conversation {
            self.commands.push_back(Command::OpenStt {
                language: s.language.clone(),
            });
        }
        let plan = self
            .metering
            .account
            .as_ref()
            .map(|a| a.plan.info())
            .unwrap_or_else(|| proto::PlanInfo {
                name: duplex_metering::UNMETERED.into(),
                limits: proto::PlanLimits::default(),
            });
        self.send(ServerMessage::SessionReady(proto::SessionReady {
            session_id: self.config.session_id.clone(),
            protocol: proto::SUBPROTOCOL.to_owned(),
            input,
            output,
            output_frame_ms: OUT_FRAME_MS,
            plan,
            providers: names,
        }));
        if let Some(why) = model_refused {
            self.send_error(ErrorCode::InvalidMessage, why, false);
        }
        self.start_metering(now);
        info!(sample_rate = s.sample_rate, encoding = ?s.encoding, "session started");
        Ok(())
    }

    // -- metering ----------------------------------------------------------------------------

    /// Metering starts at `session.ready`.
    fn start_metering(&mut self, now: Instant) {
        let wall = self.wall(now);
        let m = &mut self.metering;
        let (Some(account), Some(totals)) = (m.account.as_ref(), m.totals.take()) else {
            return;
        };
        m.started = true;
        let start = MeterStart {
            plan: account.plan.clone(),
            totals,
            switches: m.switches.clone(),
            wall_clock: wall,
        };
        let user_id = account.user_id;
        self.feed_meter(now, MeterInput::Start(start));
        self.commands
            .push_back(Command::MeteringStarted { user_id });
    }

    fn meter_input(&mut self, now: Instant, input: MeterInput) {
        if self.metering.started {
            self.feed_meter(now, input);
        }
    }

    fn feed_meter(&mut self, now: Instant, input: MeterInput) {
        self.metering.meter.handle_input(now, input);
        self.metering.dirty = true;
    }

    fn on_persisted(&mut self, now: Instant, seq: u64, result: Result<UsageTotals, String>) {
        let input = match result {
            Ok(totals) => {
                self.metering.spend_today_micros = totals.spend_today_micros;
                MeterInput::Persisted { seq, totals }
            }
            Err(e) => {
                warn!(error = %e, seq, "usage write failed; it will be retried");
                MeterInput::PersistFailed { seq }
            }
        };
        if self.metering.started {
            self.feed_meter(now, input);
        }
        if self.finishing.is_some() {
            self.drive_meter(now);
        }
    }

    /// Asks the meter whether `turn` may start; `Some` is why not.
    fn request_turn(&mut self, now: Instant, turn: TurnId) -> Option<Denial> {
        if !self.metering.started {
            return None;
        }
        self.meter_input(now, MeterInput::TurnRequested { turn });
        self.drive_meter(now);
        if let Some((t, TurnDecision::Denied(d))) = self.metering.decision.take()
            && t == turn
        {
            return Some(d);
        }
        // The meter limits this session's turns; the plan's rate is per user, across sessions.
        let account = self.metering.account.as_ref()?;
        let limit = account.plan.turns_per_minute?;
        let (used, resets) = self
            .limiter
            .try_acquire(account.user_id, limit, now)
            .err()?;
        let upgrade_hint = account.plan.upgrade_hint.clone();
        // The meter counted the turn as started: tell it the turn is over.
        self.meter_input(now, MeterInput::TurnEnded { turn });
        let resets_at = self.wall(resets);
        Some(Denial {
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

    /// Carries out what the meter asks for, and remembers its next deadline.
    fn drive_meter(&mut self, now: Instant) {
        if !self.metering.started || !self.metering.dirty {
            return;
        }
        self.metering.dirty = false;
        loop {
            match self.metering.meter.poll_output() {
                MeterOutput::Persist(delta) => {
                    if let Some(a) = &self.metering.account {
                        let user_id = a.user_id;
                        self.commands.push_back(Command::Persist { user_id, delta });
                    }
                }
                MeterOutput::Usage(u) => {
                    if self.finishing.is_none() {
                        self.send(ServerMessage::UsageUpdate(u));
                    }
                }
                MeterOutput::LimitExceeded(l) => {
                    if self.finishing.is_none() {
                        info!(limit = %l.limit, used = l.used, allowed = l.allowed, "limit exceeded");
                        self.send(ServerMessage::LimitExceeded(l));
                    }
                }
                MeterOutput::Turn { turn, decision } => {
                    self.metering.decision = Some((turn, decision));
                }
                MeterOutput::StopNewTurns => info!("conversation time used up: no new turns"),
                MeterOutput::EndSession { close_code } => {
                    if self.finishing.is_none() {
                        self.metering.close_reason = "limit exceeded";
                        self.ended = true;
                        self.cancel_streams();
                        self.close_soon(now, close_code, "limit exceeded", Duration::ZERO);
                    }
                }
                MeterOutput::Finished => {
                    if self.finishing.is_some() {
                        self.end(now);
                        return;
                    }
                }
                MeterOutput::Timeout(at) => {
                    self.metering.deadline = Some(at);
                    return;
                }
                MeterOutput::Idle => {
                    self.metering.deadline = None;
                    return;
                }
            }
        }
    }

    // -- lifecycle ---------------------------------------------------------------------------

    fn on_shutdown(&mut self, now: Instant) {
        if self.shutdown_by.is_some() {
            return;
        }
        let grace = self.config.shutdown_grace;
        self.shutdown_by = Some(now + grace);
        if let Some(f) = &mut self.finishing {
            // Already writing the final usage: it must be done within the grace period.
            f.give_up_at = f.give_up_at.min(now + grace);
            return;
        }
        if self.closing.is_some() {
            return;
        }
        let busy = matches!(&self.phase, Phase::Running(r) if r.core.as_ref().is_some_and(|c| c.current_turn().is_some()));
        self.send_error(
            ErrorCode::ServerShuttingDown,
            "the server is shutting down",
            true,
        );
        if busy {
            info!("shutdown: letting the current turn finish");
            // The turn gets the grace period minus the time kept for the final usage write.
            let reserve = DRAIN_WRITE_RESERVE.min(grace / 2);
            self.drain_deadline = Some(now + grace - reserve);
        } else {
            self.close_soon(
                now,
                close_code::GOING_AWAY,
                "server shutting down",
                Duration::ZERO,
            );
        }
    }

    // -- client messages ---------------------------------------------------------------------

    fn on_client(&mut self, now: Instant, m: ClientIn) {
        if matches!(m, ClientIn::Closed) {
            // The client left; say why if we were closing.
            if let Some((_, code, reason)) = self.closing
                && !self.writer_gone
            {
                self.commands.push_back(Command::Close { code, reason });
            }
            self.finish(now);
            return;
        }
        self.last_seen = now;
        if self.ended {
            // Only errors for late messages; the close is already scheduled.
            self.send_error(ErrorCode::SessionEnded, "the session has ended", false);
            return;
        }
        match m {
            ClientIn::Closed => {}
            ClientIn::TooLarge => {
                let limit = self.config.max_message_bytes;
                self.send_error(
                    ErrorCode::MessageTooLarge,
                    format!("message larger than the {limit}-byte limit"),
                    true,
                );
                self.close_soon(
                    now,
                    close_code::MESSAGE_TOO_BIG,
                    "message too big",
                    Duration::ZERO,
                );
                self.ended = true;
            }
            ClientIn::Text(text) => match proto::parse_client_message(&text) {
                Ok(msg) => self.on_message(now, msg),
                Err(e) => {
                    let code = refine_parse_error(&e, &text);
                    self.send_error(code, e.to_string(), false);
                }
            },
            ClientIn::Binary(bytes) => self.on_audio(now, bytes),
        }
    }

    fn on_message(&mut self, now: Instant, msg: ClientMessage) {
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
                    self.send(ServerMessage::Pong(proto::Pong { id: p.id }));
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
                    self.start(now, s);
                }
            }
            ClientMessage::SessionEnd(_) => {
                info!("client ended the session");
                self.ended = true;
                self.cancel_streams();
                self.close_soon(now, close_code::NORMAL, "session ended", END_LINGER);
            }
            _ if !running => {
                self.send_error(
                    ErrorCode::SessionNotStarted,
                    "send session.start first",
                    false,
                );
            }
            ClientMessage::InputText(t) => {
                let max = self.config.max_input_text_chars;
                if t.text.chars().nth(max).is_some() {
                    self.send_error(
                        ErrorCode::InvalidMessage,
                        format!("input.text longer than {max} characters (MAX_INPUT_TEXT_CHARS)"),
                        false,
                    );
                } else {
                    self.core_input(now, CoreInput::UserText { text: t.text });
                }
            }
            ClientMessage::ResponseInterrupt(_) => self.core_input(now, CoreInput::Interrupt),
            ClientMessage::PlaybackMark(m) => self.core_input(
                now,
                CoreInput::PlaybackMark {
                    turn: m.turn_id,
                    played_ms: m.played_ms,
                },
            ),
        }
    }

    fn on_audio(&mut self, now: Instant, bytes: bytes::Bytes) {
        let Phase::Running(r) = &mut self.phase else {
            self.send_error(
                ErrorCode::AudioBeforeSessionStart,
                "binary audio before session.start",
                false,
            );
            return;
        };
        if let Some(ahead) = self.config.max_audio_ahead
            && let Err(answer) = r.audio.admit(now, r.input, bytes.len(), ahead)
        {
            self.observe(Observation::AudioTooFast);
            if let Some(ahead_ms) = answer {
                self.send_error(
                    ErrorCode::AudioTooFast,
                    format!(
                        "audio is arriving faster than real time ({ahead_ms} ms ahead; the allowance is {} ms): frames beyond it are dropped",
                        ahead.as_millis()
                    ),
                    false,
                );
            }
            return;
        }
        r.events.clear();
        if let Err(e) = r.frontend.push(&bytes, &mut r.events) {
            let code = match e {
                duplex_audio::AudioError::OddLength(_) => ErrorCode::OddFrameLength,
                _ => ErrorCode::Internal,
            };
            self.send_error(code, e.to_string(), false);
            return;
        }
        let mut events = std::mem::take(&mut r.events);
        for ev in events.drain(..) {
            match ev {
                FrontEndEvent::Frame { samples, .. } => {
                    if r.stt.open {
                        self.commands.push_back(Command::FeedStt(samples.to_vec()));
                    }
                }
                FrontEndEvent::SpeechStarted { audio_ms } => match r.core.as_mut() {
                    Some(core) => core.handle_input(now, CoreInput::SpeechStarted { audio_ms }),
                    None => self
                        .commands
                        .push_back(Command::Send(ServerMessage::SpeechStarted(
                            proto::SpeechStarted { audio_ms },
                        ))),
                },
                FrontEndEvent::SpeechStopped { audio_ms } => {
                    let silence = r.frontend.audio_ms().saturating_sub(audio_ms);
                    self.commands
                        .push_back(Command::Observe(Observation::Endpointing(
                            Duration::from_millis(silence),
                        )));
                    match r.core.as_mut() {
                        Some(core) => core.handle_input(now, CoreInput::SpeechStopped { audio_ms }),
                        None => {
                            self.commands
                                .push_back(Command::Send(ServerMessage::SpeechStopped(
                                    proto::SpeechStopped { audio_ms },
                                )))
                        }
                    }
                }
            }
        }
        r.events = events;
        if r.core.is_none() {
            // Echo mode: one frame back per frame in, after the whole front end ran on it.
            self.commands.push_back(Command::SendAudio(bytes));
        }
    }

    // -- provider events ---------------------------------------------------------------------

    fn on_stt(&mut self, now: Instant, e: SttIn) {
        let Phase::Running(r) = &mut self.phase else {
            return;
        };
        if !r.stt.open {
            return;
        }
        let input = match e {
            SttIn::Interim(text) => {
                r.stt.failures = 0;
                CoreInput::SttInterim { text }
            }
            SttIn::Final(text) => {
                r.stt.failures = 0;
                CoreInput::SttFinal { text }
            }
            SttIn::Error(err) => {
                let retry = self.stt_failed(now);
                warn!(error = %err, retry_in_ms = retry.as_millis() as u64, "STT stream failed");
                CoreInput::SttError {
                    message: format!(
                        "speech recognition failed: {err}; reconnecting in {} ms",
                        retry.as_millis()
                    ),
                }
            }
            SttIn::Ended => {
                let retry = self.stt_failed(now);
                warn!(
                    retry_in_ms = retry.as_millis() as u64,
                    "STT stream ended unexpectedly"
                );
                CoreInput::SttError {
                    message: format!(
                        "speech recognition stream ended; reconnecting in {} ms",
                        retry.as_millis()
                    ),
                }
            }
        };
        self.core_input(now, input);
    }

    /// The STT stream failed: close it and schedule its reopening with exponential backoff
    /// and jitter. Returns the delay.
    fn stt_failed(&mut self, now: Instant) -> Duration {
        let Phase::Running(r) = &mut self.phase else {
            return Duration::ZERO;
        };
        r.stt.open = false;
        r.stt.finalize_retry = None;
        self.commands.push_back(Command::CloseStt);
        let exp = STT_REOPEN_FIRST.saturating_mul(1 << r.stt.failures.min(16));
        r.stt.failures = r.stt.failures.saturating_add(1);
        // Half to all of the exponential delay: sessions that failed together (a provider
        // outage) do not all reconnect in the same instant.
        let delay = exp
            .min(STT_REOPEN_MAX)
            .mul_f64(0.5 + self.jitter.next_unit() * 0.5);
        r.stt.reopen_at = Some(now + delay);
        delay
    }

    /// Asks the recognizer for the final transcript of the utterance.
    fn finalize_stt(&mut self) {
        if let Phase::Running(r) = &mut self.phase
            && r.stt.open
        {
            r.stt.finalize_retry = None;
            self.commands.push_back(Command::FinalizeStt);
        }
    }

    fn on_llm(&mut self, now: Instant, turn: TurnId, e: LlmIn) {
        let Phase::Running(r) = &mut self.phase else {
            return;
        };
        if r.llm != Some(turn) {
            return;
        }
        let input = match e {
            LlmIn::Delta(text) => CoreInput::LlmDelta { turn, text },
            LlmIn::Done { tokens } => {
                debug!(?tokens, "LLM turn done");
                r.llm = None;
                if let Some(tokens) = tokens {
                    self.meter_input(
                        now,
                        MeterInput::ProviderUsage(duplex_metering::ProviderUsage {
                            llm_tokens: tokens,
                            ..Default::default()
                        }),
                    );
                }
                CoreInput::LlmDone { turn }
            }
            LlmIn::Error(err) => {
                warn!(error = %err, "LLM failed");
                r.llm = None;
                CoreInput::LlmError {
                    turn,
                    message: format!("language model failed: {err}"),
                }
            }
            LlmIn::Ended => {
                r.llm = None;
                CoreInput::LlmError {
                    turn,
                    message: "language model stream ended without finishing".into(),
                }
            }
        };
        self.core_input(now, input);
    }

    fn on_tts(&mut self, now: Instant, turn: TurnId, e: TtsIn) {
        let Phase::Running(r) = &mut self.phase else {
            return;
        };
        let (Some(core), Some(tts)) = (r.core.as_mut(), r.tts.as_mut()) else {
            return;
        };
        if tts.turn != turn {
            return;
        }
        let input = match e {
            TtsIn::Audio {
                index,
                samples,
                sample_rate,
            } => {
                if let Err(e) = tts
                    .stage
                    .push(index, &samples, sample_rate, &mut tts.frames)
                {
                    warn!(rate = sample_rate, error = %e, "TTS audio at an unsupported rate, dropped");
                }
                tts.deliver(core, now);
                None
            }
            TtsIn::ChunkDone { index } => Some(CoreInput::TtsChunkDone { turn, index }),
            TtsIn::Finished => {
                tts.finish(core, now);
                r.tts = None;
                Some(CoreInput::TtsFinished { turn })
            }
            TtsIn::Error(err) => {
                warn!(error = %err, "TTS failed");
                tts.finish(core, now);
                r.tts = None;
                Some(CoreInput::TtsError {
                    turn,
                    message: format!("speech synthesis failed: {err}"),
                })
            }
            TtsIn::Ended => {
                tts.finish(core, now);
                r.tts = None;
                Some(CoreInput::TtsError {
                    turn,
                    message: "speech synthesis stream ended early".into(),
                })
            }
        };
        if let Some(input) = input {
            self.core_input(now, input);
        }
    }

    // -- the core ----------------------------------------------------------------------------

    fn core_input(&mut self, now: Instant, input: CoreInput) {
        if let Phase::Running(r) = &mut self.phase
            && let Some(core) = r.core.as_mut()
        {
            core.handle_input(now, input);
        }
    }

    /// Carries out everything the core and the meter ask for.
    fn drive(&mut self, now: Instant) {
        if self.finishing.is_none() {
            self.drive_core(now);
            self.drive_meter(now);
            self.close_if_due(now);
        }
    }

    fn drive_core(&mut self, now: Instant) {
        loop {
            let Phase::Running(r) = &mut self.phase else {
                return;
            };
            let Some(core) = r.core.as_mut() else { return };
            match core.poll_output() {
                CoreOutput::Send(msg) => self.send(msg),
                CoreOutput::Audio(bytes) => {
                    if !self.writer_gone {
                        self.commands.push_back(Command::SendAudio(bytes.into()));
                    }
                }
                CoreOutput::FinalizeStt => self.finalize_stt(),
                CoreOutput::StartTurn {
                    turn,
                    system_prompt,
                    history,
                } => {
                    if let Some(denial) = self.request_turn(now, turn) {
                        info!(
                            turn,
                            code = denial.code.as_str(),
                            "turn refused by the plan"
                        );
                        self.send_error(denial.code, denial.message, false);
                        self.send(ServerMessage::LimitExceeded(denial.limit));
                        self.core_input(now, CoreInput::RejectTurn { turn });
                        continue;
                    }
                    self.observe(Observation::TurnStarted);
                    self.start_turn(now, turn, system_prompt, history);
                }
                CoreOutput::TtsText { turn, index, text } => {
                    let chars = text.chars().count() as u64;
                    if r.tts.as_ref().is_some_and(|t| t.turn == turn) {
                        self.commands
                            .push_back(Command::TtsText { turn, index, text });
                    }
                    self.meter_input(
                        now,
                        MeterInput::ProviderUsage(duplex_metering::ProviderUsage {
                            tts_characters: chars,
                            ..Default::default()
                        }),
                    );
                }
                CoreOutput::TtsEnd { turn } => {
                    if r.tts.as_ref().is_some_and(|t| t.turn == turn) {
                        self.commands.push_back(Command::TtsEnd { turn });
                    }
                }
                CoreOutput::CancelTurn { turn } => self.cancel_turn(turn),
                CoreOutput::TurnEnded {
                    turn,
                    reason,
                    audio_ms,
                } => {
                    info!(turn, ?reason, audio_ms, "turn ended");
                    self.meter_input(now, MeterInput::TurnEnded { turn });
                    if reason == AudioEndReason::Interrupted {
                        self.observe(Observation::Interrupted);
                    }
                    self.cancel_turn(turn);
                    if self.drain_deadline.is_some() {
                        self.close_soon(
                            now,
                            close_code::GOING_AWAY,
                            "server shutting down",
                            Duration::ZERO,
                        );
                    }
                }
                CoreOutput::Latency { stage, value } => {
                    let names = self.config.engines.as_ref();
                    let provider = match stage {
                        Stage::SttFinal => names.map(|n| n.stt.clone()),
                        Stage::LlmFirstToken => names.map(|n| n.llm.clone()),
                        Stage::TtsFirstAudio => names.map(|n| n.tts.clone()),
                        Stage::VoiceToVoice => None,
                    };
                    self.observe(Observation::Latency {
                        stage,
                        provider,
                        value,
                    });
                }
                CoreOutput::Timeout(at) => {
                    r.core_deadline = Some(at);
                    return;
                }
                CoreOutput::Idle => {
                    r.core_deadline = None;
                    return;
                }
            }
        }
    }

    /// Drops the LLM and TTS streams of `turn` if they are open.
    fn cancel_turn(&mut self, turn: TurnId) {
        if let Phase::Running(r) = &mut self.phase {
            let llm = r.llm == Some(turn);
            let tts = r.tts.as_ref().is_some_and(|t| t.turn == turn);
            if llm {
                r.llm = None;
            }
            if tts {
                r.tts = None;
            }
            if llm || tts {
                self.commands.push_back(Command::CancelTurn { turn });
            }
        }
    }

    fn start_turn(
        &mut self,
        now: Instant,
        turn: TurnId,
        system_prompt: String,
        history: Vec<duplex_core::conversation::HistoryEntry>,
    ) {
        // What the LLM router's policy sees: the user's plan, and what is left of the
        // service's daily spending cap (`MAX_DAILY_SPEND_USD`) when one is set.
        let plan = self.metering.account.as_ref().map(|a| a.plan.name.clone());
        let budget_remaining_usd = self
            .metering
            .switches
            .max_daily_spend_micros
            .map(|cap| cap.saturating_sub(self.metering.spend_today_micros) as f64 / 1e6);
        let Phase::Running(r) = &mut self.phase else {
            return;
        };
        let Ok(stage) = OutputStage::new(r.output.sample_rate, r.output.encoding, OUT_FRAME_MS)
        else {
            // The output format was validated at session.start; a stage that cannot be built
            // is a bug, reported to the client as such rather than a panic.
            self.send_error(
                ErrorCode::Internal,
                "cannot convert speech to the output format",
                false,
            );
            self.core_input(now, CoreInput::RejectTurn { turn });
            return;
        };
        let request = TurnRequest {
            system_prompt,
            history,
            model: r.model.clone(),
            plan,
            budget_remaining_usd,
        };
        r.llm = Some(turn);
        r.tts = Some(TtsTurn {
            turn,
            stage,
            frames: Vec::new(),
        });
        let open_tts = Command::OpenTts {
            turn,
            voice: r.voice.clone(),
            language: r.language.clone(),
            preferred_sample_rate: r.output.sample_rate,
        };
        self.commands.push_back(Command::StartLlm { turn, request });
        self.commands.push_back(open_tts);
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

fn min_opt(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

fn due(at: Option<Instant>, now: Instant) -> bool {
    at.is_some_and(|at| at <= now)
}
