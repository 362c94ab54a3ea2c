//! The metering core of duplex: plans, usage accounting, limits and kill switches, as plain
//! `&mut self` code. No IO, no tasks, and the clock is never read: the shell passes `now`
//! (monotonic) with every input and the wall clock once, at session start.
//!
//! # What is metered
//!
//! **Metered seconds are the wall time of a live session**, from `session.ready` to close,
//! rounded up to a whole second once per session. Why wall time and not "user speech plus
//! assistant audio": an open session costs money whether anyone speaks or not (streaming STT is
//! billed per second of audio sent, silence included; the connection holds a server slot), the
//! number is one a user can check with a stopwatch, and it cannot be lowered by a client that
//! streams silence. Idle sessions do not run up a bill: the server closes a session silent for
//! `IDLE_TIMEOUT_SECS`. A session spanning UTC midnight is split at midnight; each day gets
//! its own seconds (the sub-second remainder moves to the new day, so the session is still
//! rounded up only once).
//!
//! # Plans and limits
//!
//! A [`Plan`] comes from the [`PlanTable`] (`PLAN_LIMITS`, `FREE_DAILY_LIMIT_SECONDS`,
//! `FREE_TRIAL_SECONDS`). Limits:
//!
//! - **daily seconds** per UTC day, reset at 00:00 UTC;
//! - **trial seconds**: a one-time allowance *on top of* the daily seconds. Each day's
//!   conversation first uses the daily allowance; only seconds beyond it are charged to the
//!   trial, until the trial is used up. So a new free user with 600 daily and 3,600 trial
//!   seconds can talk 4,200 s on day one and 600 s a day once the trial is spent, and a user
//!   who stays within the daily allowance keeps the trial for a day they need it.
//!   `FREE_DAILY_LIMIT_SECONDS=0` with a trial gives a pure one-time trial. `seconds_used_today`
//!   always counts every second of the day; `seconds_remaining` includes the unused trial.
//! - **monthly TTS characters** per UTC calendar month;
//! - **turns per minute**: assistant turns (each is one TTS request) in a rolling minute,
//!   counted per session here (the server adds a per-user count across a user's sessions).
//!
//! When conversation time runs out the meter emits `LimitExceeded` and `StopNewTurns`; the turn
//! in progress may finish (at most [`MeterConfig::limit_grace`]), then `EndSession` (close code
//! 4029). Other limits deny new turns ([`TurnDecision::Denied`]) with a `limit_exceeded` and an
//! `error` code, but keep the session open. The `daily_spend` limit reports `used`/`allowed`
//! in US cents.
//!
//! # Limits across sessions and servers
//!
//! Usage is written to the store in increments ([`MeterOutput::Persist`], every heartbeat,
//! default 5 s, and at the end), as atomic additions; every write answers with the user's new
//! totals for the day, which include the usage of all of the user's other sessions on any
//! server. The meter enforces against those totals plus its own unconfirmed usage. So limits
//! hold across sessions and servers, with an overshoot of at most one heartbeat per concurrent
//! session (each session learns of the others' seconds one write late). Trial seconds are
//! attributed by each session from the totals it knows, so concurrent sessions can under-charge
//! the trial by as much.
//!
//! A failed write loses nothing and counts once: a write that failed or timed out may have
//! committed anyway, so it is sent again unchanged, with the same `seq`
//! ([`UsageDelta::retried`]), before any newer usage; the store applies each (session, `seq`)
//! once, so a replay of a write that did commit adds nothing. Exactly one write is in flight
//! at a time, and `seq`s reach the store in increasing order. After
//! [`MeterInput::Ending`] the meter writes the rest (retrying failed writes every heartbeat)
//! and reports `Finished`; a crash loses at most the usage of one heartbeat.
//!
//! # Kill switches
//!
//! [`Switches`]: `AI_GENERATION_ENABLED=false` denies every turn and refuses new sessions
//! (`generation_disabled`); `FREE_TIER_ENABLED=false` refuses free users; `MAX_DAILY_SPEND_USD`
//! stops generation for everyone once the day's provider cost recorded in the store reaches
//! it. The server reloads them from `DUPLEX_SWITCHES_FILE` and passes changes in with
//! [`MeterInput::Switches`].
//!
//! # Driving it
//!
//! ```
//! use std::time::{Duration, Instant};
//! use duplex_metering::*;
//!
//! let plans = PlanTable::default();
//! let mut m = SessionMeter::new(MeterConfig::default());
//! let t0 = Instant::now(); // the shell's clock; the core never reads it
//! let wall = UnixMs(1_748_779_200_000); // 2025-06-01T12:00:00Z
//! m.handle_input(t0, MeterInput::Start(MeterStart {
//!     plan: plans.plan_or_free("free").clone(),
//!     totals: UsageTotals::zero(wall.date()),
//!     switches: Switches::default(),
//!     wall_clock: wall,
//! }));
//! assert!(matches!(m.poll_output(), MeterOutput::Usage(_)));
//! assert_eq!(m.poll_output(), MeterOutput::Timeout(t0 + Duration::from_secs(5)));
//! m.handle_input(t0 + Duration::from_secs(5), MeterInput::Tick);
//! let MeterOutput::Persist(delta) = m.poll_output() else { panic!() };
//! assert_eq!(delta.seconds, 5);
//! ```

mod limiter;
mod meter;
mod plan;
mod switches;
mod time;

pub use limiter::UserTurnLimiter;
pub use meter::{
    Admission, DEFAULT_HEARTBEAT, DEFAULT_LIMIT_GRACE, Denial, MeterConfig, MeterInput,
    MeterOutput, MeterStart, ProviderUsage, SessionMeter, TurnDecision, UsageDelta, UsageTotals,
    admission,
};
pub use plan::{DEFAULT_FREE_DAILY_SECONDS, DEFAULT_PLAN_LIMITS, FREE, Plan, PlanTable, UNMETERED};
pub use switches::{SWITCH_VARS, Switches};
pub use time::{UnixMs, UtcDate};

/// Errors of the metering configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// `PLAN_LIMITS` (or a free-plan variable) could not be parsed.
    #[error("invalid PLAN_LIMITS: {0}")]
    PlanLimits(String),
    /// A kill switch had a bad value or an unknown name.
    #[error("invalid {name}={value:?}: {reason}")]
    Switch {
        name: String,
        value: String,
        reason: String,
    },
}

#[cfg(test)]
mod tests;
