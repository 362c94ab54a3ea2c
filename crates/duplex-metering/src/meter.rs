//! [`SessionMeter`]: the metering state machine of one session, and [`admission`] for new
//! connections. See the crate docs for what is metered and how limits are enforced.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use duplex_proto::{self as proto, ErrorCode, close_code};

use crate::plan::{FREE, Plan};
use crate::switches::Switches;
use crate::time::{UnixMs, UtcDate};

/// Default `USAGE_HEARTBEAT_SECS`: a crash loses at most this much metered time, and concurrent
/// sessions of one user see each other's usage this late; 5 s is one small write per session
/// every 5 s (200 writes/s for 1,000 sessions), cheap for SQLite and PostgreSQL alike.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

/// Default [`MeterConfig::limit_grace`]: a turn in progress when conversation time runs out
/// may finish for this long (a long spoken answer is 20-30 s) before the session is ended.
pub const DEFAULT_LIMIT_GRACE: Duration = Duration::from_secs(30);

/// Window of the turn rate limit.
const RATE_WINDOW: Duration = Duration::from_secs(60);

/// Tunables of the meter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterConfig {
    /// How often usage is persisted (and fresh totals read back).
    pub heartbeat: Duration,
    /// How long the current turn may run on after conversation time is exhausted.
    pub limit_grace: Duration,
}

impl Default for MeterConfig {
    fn default() -> Self {
        MeterConfig {
            heartbeat: DEFAULT_HEARTBEAT,
            limit_grace: DEFAULT_LIMIT_GRACE,
        }
    }
}

/// A user's usage as the store reports it (at session start, and after every write).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageTotals {
    /// The UTC day `seconds_today` and `spend_today_micros` belong to.
    pub day: UtcDate,
    /// Seconds metered on `day`, across all of the user's sessions and servers.
    pub seconds_today: u64,
    /// Trial seconds used so far (lifetime).
    pub trial_seconds_used: u64,
    /// TTS characters in `day`'s calendar month.
    pub tts_characters_month: u64,
    /// The day's recorded provider cost across all users, micro-USD (for `MAX_DAILY_SPEND_USD`).
    pub spend_today_micros: u64,
}

impl UsageTotals {
    /// No usage at all on `day`.
    pub fn zero(day: UtcDate) -> UsageTotals {
        UsageTotals {
            day,
            seconds_today: 0,
            trial_seconds_used: 0,
            tts_characters_month: 0,
            spend_today_micros: 0,
        }
    }
}

/// What the shell knows when the session starts (at `session.ready`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterStart {
    pub plan: Plan,
    /// The user's totals for today from the store.
    pub totals: UsageTotals,
    pub switches: Switches,
    /// The wall clock at the `now` of this input; later wall times are derived from `now`.
    pub wall_clock: UnixMs,
}

/// Usage reported by providers; recorded, and TTS characters enforced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProviderUsage {
    pub tts_characters: u64,
    pub llm_tokens: u64,
    /// Milliseconds of audio sent to speech recognition.
    pub stt_ms: u64,
    /// Provider cost of these calls, micro-USD.
    pub cost_micros: u64,
}

/// Everything the shell tells the meter.
#[derive(Debug, Clone, PartialEq)]
pub enum MeterInput {
    /// The session started; metering begins at this `now`.
    Start(MeterStart),
    /// Time passed (the shell slept until the last `Timeout`).
    Tick,
    /// The conversation wants to start assistant turn `turn`; answered by [`MeterOutput::Turn`].
    TurnRequested {
        turn: u64,
    },
    /// Assistant turn `turn` finished (completed, interrupted or failed).
    TurnEnded {
        turn: u64,
    },
    ProviderUsage(ProviderUsage),
    /// The store applied write `seq`; `totals` are the user's totals after it (including other
    /// sessions' usage).
    Persisted {
        seq: u64,
        totals: UsageTotals,
    },
    /// Write `seq` failed; its usage is kept and sent again.
    PersistFailed {
        seq: u64,
    },
    /// The kill switches changed.
    Switches(Switches),
    /// The session is closing (any reason): stop the clock and persist everything.
    Ending,
}

/// Usage to add to the store: one write, for one UTC day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageDelta {
    /// Acknowledge with [`MeterInput::Persisted`] or [`MeterInput::PersistFailed`].
    pub seq: u64,
    pub day: UtcDate,
    pub seconds: u64,
    /// The part of `seconds` drawn from the trial allowance.
    pub trial_seconds: u64,
    pub tts_characters: u64,
    pub llm_tokens: u64,
    pub stt_ms: u64,
    pub cost_micros: u64,
    /// Written after [`MeterInput::Ending`] (the session's final usage).
    pub last: bool,
    /// A replay of a write whose outcome was unknown: same `seq`, same numbers. The store
    /// applies a `(session, seq)` once, so a replay of a write that did commit adds nothing.
    pub retried: bool,
}

/// Why a turn may not start.
#[derive(Debug, Clone, PartialEq)]
pub struct Denial {
    /// The `error` code to send: `limit_exceeded`, `rate_limited` or `generation_disabled`.
    pub code: ErrorCode,
    /// A human-readable message for the `error`.
    pub message: String,
    /// The `limit_exceeded` message to send with it.
    pub limit: proto::LimitExceeded,
}

/// The answer to [`MeterInput::TurnRequested`].
#[derive(Debug, Clone, PartialEq)]
pub enum TurnDecision {
    Allowed,
    Denied(Denial),
}

/// Everything the meter asks the shell to do.
#[derive(Debug, Clone, PartialEq)]
pub enum MeterOutput {
    /// Write this usage to the store, then report the result.
    Persist(UsageDelta),
    /// Send `usage_update`.
    Usage(proto::UsageUpdate),
    /// Send `limit_exceeded` (once per crossing).
    LimitExceeded(proto::LimitExceeded),
    /// The answer to a turn request.
    Turn { turn: u64, decision: TurnDecision },
    /// Conversation time is exhausted: start no new turn (the current one may finish).
    StopNewTurns,
    /// Close the session now with this close code (after sending what came before).
    EndSession { close_code: u16 },
    /// After [`MeterInput::Ending`]: all usage is persisted.
    Finished,
    /// Nothing more until this instant (or the next input).
    Timeout(Instant),
    /// Nothing scheduled: wait for an input (before start, while a final write is out, after
    /// `Finished`).
    Idle,
}

/// Whether a new connection may start a session.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    Allowed,
    /// Send this `limit_exceeded`, then close with [`close_code::LIMIT_EXCEEDED`].
    Refused(proto::LimitExceeded),
}

/// Decides whether a new connection of a user on `plan` with `usage` (today's totals from the
/// store) may start a session. Refused: free users while the free tier is off, everyone while
/// generation is off or the daily spend cap is reached, and users with no conversation time or
/// TTS characters left. The turn rate limit is not checked here (it is per session).
pub fn admission(plan: &Plan, usage: &UsageTotals, switches: &Switches) -> Admission {
    let view = Known::from_totals(usage);
    match gate(plan, &view, switches, usage.day) {
        Some(d) => Admission::Refused(d.limit),
        None => match time_remaining_ms(plan, &view) {
            Some(0) => Admission::Refused(time_limit(plan, &view, usage.day)),
            _ => Admission::Allowed,
        },
    }
}

/// Usage known to the meter, in ms where time is concerned.
#[derive(Debug, Clone, Copy)]
struct Known {
    day_ms: u64,
    trial_ms: u64,
    tts_month: u64,
    spend_micros: u64,
}

impl Known {
    fn from_totals(t: &UsageTotals) -> Known {
        Known {
            day_ms: t.seconds_today * 1000,
            trial_ms: t.trial_seconds_used * 1000,
            tts_month: t.tts_characters_month,
            spend_micros: t.spend_today_micros,
        }
    }
}

/// Milliseconds of conversation left today (daily allowance, then trial), `None` = unlimited.
fn time_remaining_ms(plan: &Plan, k: &Known) -> Option<u64> {
    let daily = plan.daily_seconds? * 1000;
    let trial = plan.trial_seconds.unwrap_or(0) * 1000;
    Some(daily.saturating_sub(k.day_ms) + trial.saturating_sub(k.trial_ms))
}

fn time_limit(plan: &Plan, k: &Known, day: UtcDate) -> proto::LimitExceeded {
    let daily = plan.daily_seconds.unwrap_or(0);
    let trial = plan.trial_seconds.unwrap_or(0);
    if daily == 0 && trial > 0 {
        // A pure trial: nothing comes back tomorrow.
        return proto::LimitExceeded {
            limit: "trial_seconds".into(),
            used: k.trial_ms / 1000,
            allowed: trial,
            resets_at: None,
            upgrade_hint: plan.upgrade_hint.clone(),
        };
    }
    // Today's allowance was the daily seconds plus the trial seconds spent today. Usage may
    // overshoot the allowance (a turn finishing, concurrent sessions), so `allowed` is the
    // plan's number, not the usage: with a trial, at most daily + trial.
    let seconds_today = k.day_ms / 1000;
    let allowed = if trial > 0 {
        seconds_today.clamp(daily, daily + trial)
    } else {
        daily
    };
    proto::LimitExceeded {
        limit: "daily_seconds".into(),
        used: seconds_today,
        allowed,
        resets_at: Some(day.next().start().rfc3339()),
        upgrade_hint: plan.upgrade_hint.clone(),
    }
}

/// The checks that do not depend on this session's turn history: kill switches and the
/// spend and TTS caps. `None` = generation may go on.
fn gate(plan: &Plan, k: &Known, switches: &Switches, day: UtcDate) -> Option<Denial> {
    let off = |message: &str, hint: Option<String>| Denial {
        code: ErrorCode::GenerationDisabled,
        message: message.to_owned(),
        limit: proto::LimitExceeded {
            limit: "generation_disabled".into(),
            used: 0,
            allowed: 0,
            resets_at: None,
            upgrade_hint: hint,
        },
    };
    if !switches.ai_generation_enabled {
        return Some(off(
            "assistant generation is switched off by the operator",
            None,
        ));
    }
    if !switches.free_tier_enabled && plan.name == FREE {
        return Some(off(
            "the free tier is switched off by the operator",
            plan.upgrade_hint.clone(),
        ));
    }
    if let Some(cap) = switches.max_daily_spend_micros
        && k.spend_micros >= cap
    {
        return Some(Denial {
            code: ErrorCode::LimitExceeded,
            message: "the service's daily spending cap is reached".into(),
            limit: spend_limit(k.spend_micros, cap, day),
        });
    }
    if let Some(cap) = plan.monthly_tts_characters
        && k.tts_month >= cap
    {
        return Some(Denial {
            code: ErrorCode::LimitExceeded,
            message: "the plan's monthly speech characters are used up".into(),
            limit: tts_limit(plan, k.tts_month, cap, day),
        });
    }
    None
}

/// `daily_spend` is reported in US cents (the protocol's fields are integers).
fn spend_limit(spend_micros: u64, cap_micros: u64, day: UtcDate) -> proto::LimitExceeded {
    proto::LimitExceeded {
        limit: "daily_spend".into(),
        used: spend_micros / 10_000,
        allowed: cap_micros / 10_000,
        resets_at: Some(day.next().start().rfc3339()),
        upgrade_hint: None,
    }
}

fn tts_limit(plan: &Plan, used: u64, cap: u64, day: UtcDate) -> proto::LimitExceeded {
    proto::LimitExceeded {
        limit: "monthly_tts_characters".into(),
        used,
        allowed: cap,
        resets_at: Some(day.first_of_next_month().start().rfc3339()),
        upgrade_hint: plan.upgrade_hint.clone(),
    }
}

/// Usage of one day not yet handed to the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Acc {
    ms: u64,
    trial_ms: u64,
    tts_characters: u64,
    llm_tokens: u64,
    stt_ms: u64,
    cost_micros: u64,
}

impl Acc {
    fn is_empty(&self) -> bool {
        *self == Acc::default()
    }

    /// A day's remainder as a session's last write: its time rounded up to whole seconds.
    fn final_delta(&self, seq: u64, day: UtcDate) -> UsageDelta {
        UsageDelta {
            seq,
            day,
            seconds: self.ms.div_ceil(1000),
            trial_seconds: self.trial_ms.div_ceil(1000),
            tts_characters: self.tts_characters,
            llm_tokens: self.llm_tokens,
            stt_ms: self.stt_ms,
            cost_micros: self.cost_micros,
            last: true,
            retried: false,
        }
    }

    fn add_delta(&mut self, d: &UsageDelta) {
        self.ms += d.seconds * 1000;
        self.trial_ms += d.trial_seconds * 1000;
        self.tts_characters += d.tts_characters;
        self.llm_tokens += d.llm_tokens;
        self.stt_ms += d.stt_ms;
        self.cost_micros += d.cost_micros;
    }
}

/// The session's clock anchor: `now` at start and the wall clock at that instant.
#[derive(Debug, Clone, Copy)]
struct Anchor {
    at: Instant,
    wall: UnixMs,
}

impl Anchor {
    fn wall(&self, now: Instant) -> UnixMs {
        UnixMs(self.wall.0 + now.saturating_duration_since(self.at).as_millis() as u64)
    }

    fn instant(&self, wall: UnixMs) -> Instant {
        self.at + Duration::from_millis(wall.0.saturating_sub(self.wall.0))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    Ending,
    Finished,
}

/// The metering state of one session. Drive it with [`Self::handle_input`], then drain
/// [`Self::poll_output`] until it returns `Timeout` or `Idle`.
#[derive(Debug)]
pub struct SessionMeter {
    config: MeterConfig,
    /// `None` until [`MeterInput::Start`].
    live: Option<Live>,
    out: VecDeque<MeterOutput>,
}

#[derive(Debug)]
struct Live {
    phase: Phase,
    anchor: Anchor,
    plan: Plan,
    switches: Switches,
    /// The UTC day being metered now.
    today: UtcDate,
    /// The store's totals for `today` after the last acknowledged write.
    acked: UsageTotals,
    /// Usage not yet handed to the store, per day (two days only around midnight).
    pending: BTreeMap<UtcDate, Acc>,
    /// The one write the store is working on.
    in_flight: Option<UsageDelta>,
    /// A write whose outcome is unknown (it failed or timed out, and may have committed
    /// anyway): sent again unchanged, same `seq`, before anything newer, so that the store's
    /// `(session, seq)` check can tell a replay from new usage.
    unacked: Option<UsageDelta>,
    next_seq: u64,
    /// Conversation time is metered up to here.
    accounted_to: Instant,
    session_ms: u64,
    next_heartbeat: Instant,
    /// After a failed final write: when to try again.
    retry_at: Option<Instant>,
    active_turn: Option<u64>,
    /// Start times of allowed turns within the last minute.
    recent_turns: VecDeque<Instant>,
    /// Conversation time ran out; the `limit_exceeded` that was sent.
    time_exhausted: Option<proto::LimitExceeded>,
    end_deadline: Option<Instant>,
    end_sent: bool,
    tts_notified: bool,
    spend_notified: bool,
}

impl SessionMeter {
    pub fn new(config: MeterConfig) -> SessionMeter {
        SessionMeter {
            config,
            live: None,
            out: VecDeque::new(),
        }
    }

    /// Feeds one input at `now` (a monotonic instant; the wall clock is derived from the one
    /// given at [`MeterInput::Start`]).
    pub fn handle_input(&mut self, now: Instant, input: MeterInput) {
        let out = &mut self.out;
        match (self.live.as_mut(), input) {
            (None, MeterInput::Start(start)) => {
                let live = self.live.insert(Live::new(now, start, &self.config));
                out.push_back(MeterOutput::Usage(live.usage_update()));
                live.check_limits(now, &self.config, out);
            }
            (Some(_), MeterInput::Start(_)) => {
                debug_assert!(false, "a session starts once");
            }
            (None, MeterInput::TurnRequested { turn }) => {
                // A shell bug; fail closed rather than generate unmetered.
                out.push_back(MeterOutput::Turn {
                    turn,
                    decision: TurnDecision::Denied(Denial {
                        code: ErrorCode::Internal,
                        message: "metering has not started".into(),
                        limit: proto::LimitExceeded {
                            limit: "generation_disabled".into(),
                            used: 0,
                            allowed: 0,
                            resets_at: None,
                            upgrade_hint: None,
                        },
                    }),
                });
            }
            (None, _) => {}
            (Some(live), input) => live.handle(now, input, &self.config, out),
        }
    }

    /// The next thing to do; `Timeout` or `Idle` when there is nothing until a later input.
    pub fn poll_output(&mut self) -> MeterOutput {
        if let Some(o) = self.out.pop_front() {
            return o;
        }
        match &self.live {
            None => MeterOutput::Idle,
            Some(live) => live
                .deadline()
                .map_or(MeterOutput::Idle, MeterOutput::Timeout),
        }
    }

    /// The `usage_update` as of the last input (`None` before start).
    pub fn usage(&self) -> Option<proto::UsageUpdate> {
        self.live.as_ref().map(Live::usage_update)
    }

    /// True once all usage is persisted after [`MeterInput::Ending`].
    pub fn is_finished(&self) -> bool {
        self.live
            .as_ref()
            .is_some_and(|l| l.phase == Phase::Finished)
    }

    /// Hands over every write the store has not acknowledged, and finishes: the write in
    /// flight or of unknown outcome as it was sent (same `seq`, marked `retried`, so a store
    /// that did commit it applies it once), then each unsent day as a new write with the next
    /// `seq`, `last` set. For a session that stops waiting for the store: whoever takes the
    /// writes (the server's backlog) must apply them, in order, until each is acknowledged.
    pub fn take_unpersisted(&mut self) -> Vec<UsageDelta> {
        let Some(live) = self.live.as_mut() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for mut d in live.in_flight.take().into_iter().chain(live.unacked.take()) {
            d.retried = true;
            out.push(d);
        }
        let days = std::mem::take(&mut live.pending);
        for (day, acc) in days {
            if acc.is_empty() {
                continue;
            }
            out.push(acc.final_delta(live.next_seq, day));
            live.next_seq += 1;
        }
        live.retry_at = None;
        live.phase = Phase::Finished;
        out
    }

    /// Usage not yet acknowledged by the store, summed over days (sent or not): what a crash
    /// now would lose. For logs when the shell gives up on a store that stays down.
    pub fn unpersisted(&self) -> Option<UsageDelta> {
        let live = self.live.as_ref()?;
        let mut acc = Acc::default();
        for a in live.pending.values() {
            acc.ms += a.ms;
            acc.trial_ms += a.trial_ms;
            acc.tts_characters += a.tts_characters;
            acc.llm_tokens += a.llm_tokens;
            acc.stt_ms += a.stt_ms;
            acc.cost_micros += a.cost_micros;
        }
        for d in live.in_flight.iter().chain(&live.unacked) {
            acc.add_delta(d);
        }
        Some(UsageDelta {
            seq: 0,
            day: live.today,
            seconds: acc.ms.div_ceil(1000),
            trial_seconds: acc.trial_ms.div_ceil(1000),
            tts_characters: acc.tts_characters,
            llm_tokens: acc.llm_tokens,
            stt_ms: acc.stt_ms,
            cost_micros: acc.cost_micros,
            last: live.phase != Phase::Running,
            retried: false,
        })
    }
}

impl Live {
    fn new(now: Instant, start: MeterStart, config: &MeterConfig) -> Live {
        let today = start.wall_clock.date();
        let t = start.totals;
        let acked = if t.day == today {
            t
        } else {
            // Totals of another day (the shell read them just before midnight): only the
            // lifetime trial and, within the same month, the TTS count carry over.
            UsageTotals {
                trial_seconds_used: t.trial_seconds_used,
                tts_characters_month: if t.day.month() == today.month() {
                    t.tts_characters_month
                } else {
                    0
                },
                ..UsageTotals::zero(today)
            }
        };
        Live {
            phase: Phase::Running,
            anchor: Anchor {
                at: now,
                wall: start.wall_clock,
            },
            plan: start.plan,
            switches: start.switches,
            today,
            acked,
            pending: BTreeMap::new(),
            in_flight: None,
            unacked: None,
            next_seq: 1,
            accounted_to: now,
            session_ms: 0,
            next_heartbeat: now + config.heartbeat,
            retry_at: None,
            active_turn: None,
            recent_turns: VecDeque::new(),
            time_exhausted: None,
            end_deadline: None,
            end_sent: false,
            tts_notified: false,
            spend_notified: false,
        }
    }

    fn handle(
        &mut self,
        now: Instant,
        input: MeterInput,
        config: &MeterConfig,
        out: &mut VecDeque<MeterOutput>,
    ) {
        self.advance(now, config, out);
        match input {
            MeterInput::Start(_) | MeterInput::Tick => {}
            MeterInput::TurnRequested { turn } => {
                let decision = self.decide(now);
                if decision == TurnDecision::Allowed {
                    self.active_turn = Some(turn);
                    self.recent_turns.push_back(now);
                }
                out.push_back(MeterOutput::Turn { turn, decision });
            }
            MeterInput::TurnEnded { turn } => {
                if self.active_turn == Some(turn) {
                    self.active_turn = None;
                }
                if self.phase == Phase::Running {
                    out.push_back(MeterOutput::Usage(self.usage_update()));
                    if self.time_exhausted.is_some() {
                        self.end(out);
                    }
                }
            }
            MeterInput::ProviderUsage(u) => {
                let acc = self.pending.entry(self.today).or_default();
                acc.tts_characters += u.tts_characters;
                acc.llm_tokens += u.llm_tokens;
                acc.stt_ms += u.stt_ms;
                acc.cost_micros += u.cost_micros;
                if self.phase != Phase::Running
                    && self.in_flight.is_none()
                    && self.unacked.is_none()
                {
                    // Late usage after the final writes: write it too.
                    self.phase = Phase::Ending;
                    self.send_final(out);
                }
            }
            MeterInput::Persisted { seq, totals } => {
                if self.in_flight.as_ref().map(|d| d.seq) != Some(seq) {
                    return; // not the write in flight: a stale or duplicate answer
                }
                let was_retry = self.in_flight.take().is_some_and(|d| d.retried);
                self.merge_totals(totals);
                match self.phase {
                    // A retry answered: the usage held back behind it goes out now rather
                    // than a heartbeat later.
                    Phase::Running if was_retry => self.heartbeat(out),
                    Phase::Running => out.push_back(MeterOutput::Usage(self.usage_update())),
                    Phase::Ending => self.send_final(out),
                    Phase::Finished => {}
                }
            }
            MeterInput::PersistFailed { seq } => {
                if self.in_flight.as_ref().map(|d| d.seq) != Some(seq) {
                    return;
                }
                // The write may have committed before it failed (a timeout after the commit):
                // keep it whole and send it again as it is, never merged into newer usage.
                self.unacked = self.in_flight.take();
                if self.phase == Phase::Ending {
                    self.retry_at = Some(now + config.heartbeat);
                }
            }
            MeterInput::Switches(s) => self.switches = s,
            MeterInput::Ending => {
                if self.phase == Phase::Running {
                    self.phase = Phase::Ending;
                    // Round the session's unsent fraction of a second up: each session is
                    // metered in whole seconds, rounded up once.
                    for acc in self.pending.values_mut() {
                        acc.ms = acc.ms.div_ceil(1000) * 1000;
                        acc.trial_ms = acc.trial_ms.div_ceil(1000) * 1000;
                    }
                    self.send_final(out);
                }
            }
        }
        self.check_limits(now, config, out);
    }

    fn ms_since_start(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.anchor.at).as_millis() as u64
    }

    /// Meters time up to `now` (splitting at UTC midnight), then runs what is due.
    fn advance(&mut self, now: Instant, config: &MeterConfig, out: &mut VecDeque<MeterOutput>) {
        match self.phase {
            Phase::Running => {}
            Phase::Ending => {
                if self.retry_at.is_some_and(|r| r <= now) {
                    self.retry_at = None;
                    self.send_final(out);
                }
                return;
            }
            Phase::Finished => return,
        }
        // Bounded: one iteration per midnight passed (a shell that slept for days would
        // still finish quickly).
        loop {
            let midnight = self.anchor.instant(self.today.next().start());
            let until = now.min(midnight);
            if until > self.accounted_to {
                let d = self.ms_since_start(until) - self.ms_since_start(self.accounted_to);
                self.account(d);
                self.accounted_to = until;
            }
            if now >= midnight {
                self.rollover(out);
            } else {
                break;
            }
        }
        if now >= self.next_heartbeat {
            while self.next_heartbeat <= now {
                self.next_heartbeat += config.heartbeat;
            }
            self.heartbeat(out);
        }
        if self.end_deadline.is_some_and(|d| d <= now) {
            self.end(out);
        }
    }

    /// Adds `d` ms of conversation today: from the daily allowance first, then the trial.
    fn account(&mut self, d: u64) {
        let k = self.known();
        let trial_part = match self.plan.daily_seconds {
            None => 0,
            Some(daily) => {
                let over = d - d.min((daily * 1000).saturating_sub(k.day_ms));
                let trial_left =
                    (self.plan.trial_seconds.unwrap_or(0) * 1000).saturating_sub(k.trial_ms);
                over.min(trial_left)
            }
        };
        let acc = self.pending.entry(self.today).or_default();
        acc.ms += d;
        acc.trial_ms += trial_part;
        self.session_ms += d;
    }

    fn rollover(&mut self, out: &mut VecDeque<MeterOutput>) {
        let old = self.today;
        self.today = old.next();
        // The sub-second remainder moves to the new day, so a session is still rounded up
        // once in total (its day split is exact to the second).
        if let Some(acc) = self.pending.get_mut(&old) {
            let (r, tr) = (acc.ms % 1000, acc.trial_ms % 1000);
            acc.ms -= r;
            acc.trial_ms -= tr;
            let new = self.pending.entry(self.today).or_default();
            new.ms += r;
            new.trial_ms += tr;
        }
        let same_month = old.month() == self.today.month();
        self.acked = UsageTotals {
            day: self.today,
            seconds_today: 0,
            trial_seconds_used: self.acked.trial_seconds_used,
            tts_characters_month: if same_month {
                self.acked.tts_characters_month
            } else {
                0
            },
            spend_today_micros: 0,
        };
        self.spend_notified = false;
        if !same_month {
            self.tts_notified = false;
        }
        out.push_back(MeterOutput::Usage(self.usage_update()));
    }

    /// A periodic write: whole seconds of the oldest unsent day (an empty write too: its
    /// answer brings the other sessions' usage).
    fn heartbeat(&mut self, out: &mut VecDeque<MeterOutput>) {
        if self.in_flight.is_some() {
            return; // the store is slow; the next heartbeat sends everything
        }
        if self.resend(out) {
            return;
        }
        let day = self
            .pending
            .keys()
            .next()
            .copied()
            .unwrap_or(self.today)
            .min(self.today);
        let acc = self.pending.entry(day).or_default();
        let (secs, trial) = (acc.ms / 1000, acc.trial_ms / 1000);
        acc.ms -= secs * 1000;
        acc.trial_ms -= trial * 1000;
        let delta = UsageDelta {
            seq: self.next_seq,
            day,
            seconds: secs,
            trial_seconds: trial,
            tts_characters: std::mem::take(&mut acc.tts_characters),
            llm_tokens: std::mem::take(&mut acc.llm_tokens),
            stt_ms: std::mem::take(&mut acc.stt_ms),
            cost_micros: std::mem::take(&mut acc.cost_micros),
            last: false,
            retried: false,
        };
        if acc.is_empty() && day != self.today {
            self.pending.remove(&day);
        }
        self.send(delta, out);
    }

    /// Sends the write of unknown outcome again, unchanged; `false` when there is none.
    fn resend(&mut self, out: &mut VecDeque<MeterOutput>) -> bool {
        let Some(mut d) = self.unacked.take() else {
            return false;
        };
        d.retried = true;
        self.in_flight = Some(d.clone());
        out.push_back(MeterOutput::Persist(d));
        true
    }

    fn send(&mut self, delta: UsageDelta, out: &mut VecDeque<MeterOutput>) {
        self.next_seq += 1;
        self.in_flight = Some(delta.clone());
        out.push_back(MeterOutput::Persist(delta));
    }

    /// After `Ending`: writes the unsent days one by one, then `Finished`.
    fn send_final(&mut self, out: &mut VecDeque<MeterOutput>) {
        if self.in_flight.is_some() || self.retry_at.is_some() {
            return;
        }
        if self.resend(out) {
            return;
        }
        self.pending.retain(|_, acc| !acc.is_empty());
        let Some((&day, _)) = self.pending.iter().next() else {
            if self.phase != Phase::Finished {
                self.phase = Phase::Finished;
                out.push_back(MeterOutput::Finished);
            }
            return;
        };
        let acc = self.pending.remove(&day).expect("found above");
        let delta = acc.final_delta(self.next_seq, day);
        self.send(delta, out);
    }

    fn merge_totals(&mut self, t: UsageTotals) {
        if t.day == self.today {
            self.acked = t;
            return;
        }
        // An answer for another day (a write of yesterday's remainder): only lifetime and
        // same-month counters apply today.
        self.acked.trial_seconds_used = self.acked.trial_seconds_used.max(t.trial_seconds_used);
        if t.day.month() == self.today.month() {
            self.acked.tts_characters_month =
                self.acked.tts_characters_month.max(t.tts_characters_month);
        }
    }

    /// The store's totals plus this session's usage the store has not confirmed.
    fn known(&self) -> Known {
        let mut k = Known::from_totals(&self.acked);
        let month = self.today.month();
        let mut add = |day: UtcDate, ms: u64, trial_ms: u64, tts: u64, cost: u64| {
            if day == self.today {
                k.day_ms += ms;
                k.spend_micros += cost;
            }
            if day.month() == month {
                k.tts_month += tts;
            }
            k.trial_ms += trial_ms;
        };
        for (&day, a) in &self.pending {
            add(day, a.ms, a.trial_ms, a.tts_characters, a.cost_micros);
        }
        for d in self.in_flight.iter().chain(&self.unacked) {
            add(
                d.day,
                d.seconds * 1000,
                d.trial_seconds * 1000,
                d.tts_characters,
                d.cost_micros,
            );
        }
        k
    }

    fn usage_update(&self) -> proto::UsageUpdate {
        let k = self.known();
        proto::UsageUpdate {
            plan: self.plan.name.clone(),
            seconds_used_today: k.day_ms / 1000,
            seconds_remaining: time_remaining_ms(&self.plan, &k).map(|ms| ms / 1000),
            session_seconds: self.session_ms / 1000,
        }
    }

    fn check_limits(
        &mut self,
        now: Instant,
        config: &MeterConfig,
        out: &mut VecDeque<MeterOutput>,
    ) {
        if self.phase != Phase::Running {
            return;
        }
        let k = self.known();
        if self.time_exhausted.is_none() && time_remaining_ms(&self.plan, &k) == Some(0) {
            let limit = time_limit(&self.plan, &k, self.today);
            self.time_exhausted = Some(limit.clone());
            out.push_back(MeterOutput::LimitExceeded(limit));
            out.push_back(MeterOutput::StopNewTurns);
            if self.active_turn.is_none() {
                self.end(out);
            } else {
                self.end_deadline = Some(now + config.limit_grace);
            }
        }
        if let Some(cap) = self.plan.monthly_tts_characters
            && !self.tts_notified
            && k.tts_month >= cap
        {
            self.tts_notified = true;
            let l = tts_limit(&self.plan, k.tts_month, cap, self.today);
            out.push_back(MeterOutput::LimitExceeded(l));
        }
        if let Some(cap) = self.switches.max_daily_spend_micros
            && !self.spend_notified
            && k.spend_micros >= cap
        {
            self.spend_notified = true;
            let l = spend_limit(k.spend_micros, cap, self.today);
            out.push_back(MeterOutput::LimitExceeded(l));
        }
    }

    fn end(&mut self, out: &mut VecDeque<MeterOutput>) {
        if !self.end_sent {
            self.end_sent = true;
            self.end_deadline = None;
            out.push_back(MeterOutput::EndSession {
                close_code: close_code::LIMIT_EXCEEDED,
            });
        }
    }

    fn decide(&mut self, now: Instant) -> TurnDecision {
        if let Some(limit) = &self.time_exhausted {
            return TurnDecision::Denied(Denial {
                code: ErrorCode::LimitExceeded,
                message: "the plan's conversation time is used up".into(),
                limit: limit.clone(),
            });
        }
        if self.phase != Phase::Running {
            return TurnDecision::Denied(Denial {
                code: ErrorCode::SessionEnded,
                message: "the session is ending".into(),
                limit: proto::LimitExceeded {
                    limit: "generation_disabled".into(),
                    used: 0,
                    allowed: 0,
                    resets_at: None,
                    upgrade_hint: None,
                },
            });
        }
        if let Some(d) = gate(&self.plan, &self.known(), &self.switches, self.today) {
            return TurnDecision::Denied(d);
        }
        if let Some(n) = self.plan.turns_per_minute {
            while self
                .recent_turns
                .front()
                .is_some_and(|&t| t + RATE_WINDOW <= now)
            {
                self.recent_turns.pop_front();
            }
            if self.recent_turns.len() >= n as usize {
                let resets = self
                    .recent_turns
                    .front()
                    .map(|&t| self.anchor.wall(t + RATE_WINDOW).rfc3339());
                return TurnDecision::Denied(Denial {
                    code: ErrorCode::RateLimited,
                    message: format!("more than {n} turns a minute"),
                    limit: proto::LimitExceeded {
                        limit: "turns_per_minute".into(),
                        used: self.recent_turns.len() as u64,
                        allowed: u64::from(n),
                        resets_at: resets,
                        upgrade_hint: self.plan.upgrade_hint.clone(),
                    },
                });
            }
        }
        TurnDecision::Allowed
    }

    fn deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Running => {
                let mut t = self
                    .next_heartbeat
                    .min(self.anchor.instant(self.today.next().start()));
                if self.time_exhausted.is_none()
                    && let Some(ms) = time_remaining_ms(&self.plan, &self.known())
                {
                    t = t.min(self.accounted_to + Duration::from_millis(ms));
                }
                if let Some(d) = self.end_deadline.filter(|_| !self.end_sent) {
                    t = t.min(d);
                }
                Some(t)
            }
            Phase::Ending => self.retry_at,
            Phase::Finished => None,
        }
    }
}
