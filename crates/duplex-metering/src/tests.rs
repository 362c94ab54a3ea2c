//! Timeline tests: sessions driven through scripted inputs against a fake store that applies
//! deltas atomically (like the real one), printed as a timeline and compared with snapshots.
//! `<-` lines are inputs, `->` lines outputs; times are seconds since the first session start.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write;
use std::time::{Duration, Instant};

use expect_test::expect;

use crate::*;

/// 2025-06-01T12:00:00Z.
const NOON: u64 = 1_748_779_200_000;

/// The store of one user: atomic additions, totals after each write.
#[derive(Default)]
struct Store {
    seconds: BTreeMap<UtcDate, u64>,
    trial: u64,
    tts: BTreeMap<(i32, u32), u64>,
    /// Provider cost of all users per day (other users' spend is seeded directly).
    spend: BTreeMap<UtcDate, u64>,
    down: bool,
    /// Writes commit but their answers are lost (a timeout after the commit): the meter
    /// sees a failure.
    answers_lost: bool,
    /// Writes applied, by (session, seq): like the real store, a replay adds nothing.
    applied: BTreeSet<(&'static str, u64)>,
    /// Hold writes until `release` (a slow store).
    hold: bool,
}

impl Store {
    fn totals(&self, day: UtcDate) -> UsageTotals {
        UsageTotals {
            day,
            seconds_today: self.seconds.get(&day).copied().unwrap_or(0),
            trial_seconds_used: self.trial,
            tts_characters_month: self.tts.get(&day.month()).copied().unwrap_or(0),
            spend_today_micros: self.spend.get(&day).copied().unwrap_or(0),
        }
    }

    fn add(&mut self, session: &'static str, d: &UsageDelta) -> UsageTotals {
        if !self.applied.insert((session, d.seq)) {
            return self.totals(d.day);
        }
        *self.seconds.entry(d.day).or_default() += d.seconds;
        self.trial += d.trial_seconds;
        *self.tts.entry(d.day.month()).or_default() += d.tts_characters;
        *self.spend.entry(d.day).or_default() += d.cost_micros;
        self.totals(d.day)
    }
}

struct Session {
    name: &'static str,
    meter: SessionMeter,
    deadline: Option<Instant>,
}

struct Sim {
    t0: Instant,
    wall0: u64,
    now: Instant,
    config: MeterConfig,
    store: Store,
    switches: Switches,
    sessions: Vec<Session>,
    held: VecDeque<(usize, UsageDelta)>,
    log: String,
}

impl Sim {
    fn new(wall0: u64) -> Sim {
        // A fixed base instant: the core only ever sees differences.
        let t0 = Instant::now();
        Sim {
            t0,
            wall0,
            now: t0,
            config: MeterConfig::default(),
            store: Store::default(),
            switches: Switches::default(),
            sessions: Vec::new(),
            held: VecDeque::new(),
            log: String::new(),
        }
    }

    fn at(&self, secs: f64) -> Instant {
        self.t0 + Duration::from_secs_f64(secs)
    }

    fn wall(&self, t: Instant) -> UnixMs {
        UnixMs(self.wall0 + (t - self.t0).as_millis() as u64)
    }

    fn line(&mut self, name: &str, text: String) {
        let t = (self.now - self.t0).as_secs_f64();
        writeln!(self.log, "{t:<9.3} {name} {text}").unwrap();
    }

    /// Starts a session at `at` with the store's current totals.
    fn start(&mut self, at: f64, name: &'static str, plan: &Plan) -> usize {
        self.run_until(at);
        let wall = self.wall(self.now);
        let totals = self.store.totals(wall.date());
        self.line(
            name,
            format!(
                "<- start {} at {} (today {}s, trial used {}s, tts {})",
                plan.name,
                wall.rfc3339(),
                totals.seconds_today,
                totals.trial_seconds_used,
                totals.tts_characters_month
            ),
        );
        let mut meter = SessionMeter::new(self.config.clone());
        meter.handle_input(
            self.now,
            MeterInput::Start(MeterStart {
                plan: plan.clone(),
                totals,
                switches: self.switches.clone(),
                wall_clock: wall,
            }),
        );
        self.sessions.push(Session {
            name,
            meter,
            deadline: None,
        });
        let i = self.sessions.len() - 1;
        self.drain(i);
        i
    }

    fn input(&mut self, at: f64, i: usize, input: MeterInput) {
        self.run_until(at);
        let text = match &input {
            MeterInput::TurnRequested { turn } => format!("turn {turn} requested"),
            MeterInput::TurnEnded { turn } => format!("turn {turn} ended"),
            MeterInput::ProviderUsage(u) => format!(
                "provider usage tts={} cost={}",
                u.tts_characters, u.cost_micros
            ),
            MeterInput::Switches(s) => format!("switches {s:?}"),
            MeterInput::Ending => "ending".into(),
            other => format!("{other:?}"),
        };
        self.line(self.sessions[i].name, format!("<- {text}"));
        self.sessions[i].meter.handle_input(self.now, input);
        self.drain(i);
    }

    fn switches(&mut self, at: f64, s: Switches) {
        self.switches = s.clone();
        for i in 0..self.sessions.len() {
            self.input(at, i, MeterInput::Switches(s.clone()));
        }
    }

    /// Answers the held writes, in order.
    fn release(&mut self, at: f64) {
        self.run_until(at);
        self.store.hold = false;
        while let Some((i, d)) = self.held.pop_front() {
            self.answer(i, d);
        }
    }

    /// Fires every deadline up to `at`, in time order.
    fn run_until(&mut self, at: f64) {
        let end = self.at(at);
        // Bounded: each step moves a session past a deadline; 100,000 is far beyond any test.
        for _ in 0..100_000 {
            let next = self
                .sessions
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.deadline.map(|d| (d, i)))
                .filter(|(d, _)| *d <= end)
                .min();
            let Some((d, i)) = next else {
                self.now = self.now.max(end);
                return;
            };
            self.now = self.now.max(d);
            self.sessions[i]
                .meter
                .handle_input(self.now, MeterInput::Tick);
            self.drain(i);
        }
        panic!("run_until did not converge");
    }

    fn answer(&mut self, i: usize, d: UsageDelta) {
        let name = self.sessions[i].name;
        let input = if self.store.down {
            self.line(name, format!("<- persist #{} failed", d.seq));
            MeterInput::PersistFailed { seq: d.seq }
        } else if self.store.answers_lost {
            self.store.add(name, &d);
            self.line(name, format!("<- persist #{} timed out (committed)", d.seq));
            MeterInput::PersistFailed { seq: d.seq }
        } else {
            let t = self.store.add(name, &d);
            self.line(
                name,
                format!(
                    "<- persisted #{}: {} {}s, trial {}s, tts {}, spend {}",
                    d.seq,
                    t.day,
                    t.seconds_today,
                    t.trial_seconds_used,
                    t.tts_characters_month,
                    t.spend_today_micros
                ),
            );
            MeterInput::Persisted {
                seq: d.seq,
                totals: t,
            }
        };
        self.sessions[i].meter.handle_input(self.now, input);
        self.drain(i);
    }

    fn drain(&mut self, i: usize) {
        let name = self.sessions[i].name;
        // Bounded: a meter yields a handful of outputs per input.
        for _ in 0..100 {
            let o = self.sessions[i].meter.poll_output();
            let text = match o {
                MeterOutput::Timeout(d) => {
                    self.sessions[i].deadline = Some(d);
                    return;
                }
                MeterOutput::Idle => {
                    self.sessions[i].deadline = None;
                    return;
                }
                MeterOutput::Persist(d) => {
                    let text = format!(
                        "persist #{} {} +{}s trial+{}s tts+{} cost+{}{}{}",
                        d.seq,
                        d.day,
                        d.seconds,
                        d.trial_seconds,
                        d.tts_characters,
                        d.cost_micros,
                        if d.last { " (last)" } else { "" },
                        if d.retried { " (again)" } else { "" }
                    );
                    self.line(name, format!("-> {text}"));
                    if self.store.hold {
                        self.held.push_back((i, d));
                    } else {
                        self.answer(i, d);
                    }
                    continue;
                }
                MeterOutput::Usage(u) => format!(
                    "usage today={} remaining={} session={}",
                    u.seconds_used_today,
                    u.seconds_remaining
                        .map_or("unlimited".into(), |s| s.to_string()),
                    u.session_seconds
                ),
                MeterOutput::LimitExceeded(l) => format!("limit_exceeded {}", limit(&l)),
                MeterOutput::Turn { turn, decision } => match decision {
                    TurnDecision::Allowed => format!("turn {turn} allowed"),
                    TurnDecision::Denied(d) => format!(
                        "turn {turn} denied {}: {} [{}]",
                        d.code.as_str(),
                        d.message,
                        limit(&d.limit)
                    ),
                },
                MeterOutput::StopNewTurns => "stop new turns".into(),
                MeterOutput::EndSession { close_code } => {
                    // What the shell does: close the socket, then tell the meter.
                    self.line(name, format!("-> end session {close_code}"));
                    self.line(name, "<- ending".into());
                    self.sessions[i]
                        .meter
                        .handle_input(self.now, MeterInput::Ending);
                    continue;
                }
                MeterOutput::Finished => "finished".into(),
            };
            self.line(name, format!("-> {text}"));
        }
        panic!("meter produced more than 100 outputs for one input");
    }
}

fn limit(l: &duplex_proto::LimitExceeded) -> String {
    let mut s = format!("{} used={} allowed={}", l.limit, l.used, l.allowed);
    if let Some(r) = &l.resets_at {
        write!(s, " resets={r}").unwrap();
    }
    if l.upgrade_hint.is_some() {
        s.push_str(" +hint");
    }
    s
}

fn plans(free_daily: u64, free_trial: u64) -> PlanTable {
    PlanTable::parse(
        "free:turns_per_minute=3,monthly_tts_characters=100",
        Some(free_daily),
        Some(free_trial),
    )
    .unwrap()
}

#[test]
fn daily_limit_reached_mid_session() {
    let plans = plans(20, 0);
    let free = plans.get("free").unwrap();
    let mut sim = Sim::new(NOON);
    sim.store.seconds.insert(UnixMs(NOON).date(), 8);
    let a = sim.start(0.0, "A", free);
    sim.input(3.0, a, MeterInput::TurnRequested { turn: 1 });
    sim.input(6.0, a, MeterInput::TurnEnded { turn: 1 });
    sim.input(10.0, a, MeterInput::TurnRequested { turn: 2 });
    sim.input(13.0, a, MeterInput::TurnRequested { turn: 3 });
    sim.input(15.0, a, MeterInput::TurnEnded { turn: 2 });
    expect![[r#"
        0.000     A <- start free at 2025-06-01T12:00:00Z (today 8s, trial used 0s, tts 0)
        0.000     A -> usage today=8 remaining=12 session=0
        3.000     A <- turn 1 requested
        3.000     A -> turn 1 allowed
        5.000     A -> persist #1 2025-06-01 +5s trial+0s tts+0 cost+0
        5.000     A <- persisted #1: 2025-06-01 13s, trial 0s, tts 0, spend 0
        5.000     A -> usage today=13 remaining=7 session=5
        6.000     A <- turn 1 ended
        6.000     A -> usage today=14 remaining=6 session=6
        10.000    A -> persist #2 2025-06-01 +5s trial+0s tts+0 cost+0
        10.000    A <- persisted #2: 2025-06-01 18s, trial 0s, tts 0, spend 0
        10.000    A -> usage today=18 remaining=2 session=10
        10.000    A <- turn 2 requested
        10.000    A -> turn 2 allowed
        12.000    A -> limit_exceeded daily_seconds used=20 allowed=20 resets=2025-06-02T00:00:00Z +hint
        12.000    A -> stop new turns
        13.000    A <- turn 3 requested
        13.000    A -> turn 3 denied limit_exceeded: the plan's conversation time is used up [daily_seconds used=20 allowed=20 resets=2025-06-02T00:00:00Z +hint]
        15.000    A -> persist #3 2025-06-01 +5s trial+0s tts+0 cost+0
        15.000    A <- persisted #3: 2025-06-01 23s, trial 0s, tts 0, spend 0
        15.000    A -> usage today=23 remaining=0 session=15
        15.000    A <- turn 2 ended
        15.000    A -> usage today=23 remaining=0 session=15
        15.000    A -> end session 4029
        15.000    A <- ending
        15.000    A -> finished
    "#]]
    .assert_eq(&sim.log);
    assert!(sim.sessions[a].meter.is_finished());
}

#[test]
fn two_sessions_share_the_daily_limit_through_persisted_totals() {
    let plans = plans(30, 0);
    let free = plans.get("free").unwrap();
    let mut sim = Sim::new(NOON);
    let a = sim.start(0.0, "A", free);
    let b = sim.start(2.5, "B", free);
    sim.run_until(30.0);
    expect![[r#"
        0.000     A <- start free at 2025-06-01T12:00:00Z (today 0s, trial used 0s, tts 0)
        0.000     A -> usage today=0 remaining=30 session=0
        2.500     B <- start free at 2025-06-01T12:00:02Z (today 0s, trial used 0s, tts 0)
        2.500     B -> usage today=0 remaining=30 session=0
        5.000     A -> persist #1 2025-06-01 +5s trial+0s tts+0 cost+0
        5.000     A <- persisted #1: 2025-06-01 5s, trial 0s, tts 0, spend 0
        5.000     A -> usage today=5 remaining=25 session=5
        7.500     B -> persist #1 2025-06-01 +5s trial+0s tts+0 cost+0
        7.500     B <- persisted #1: 2025-06-01 10s, trial 0s, tts 0, spend 0
        7.500     B -> usage today=10 remaining=20 session=5
        10.000    A -> persist #2 2025-06-01 +5s trial+0s tts+0 cost+0
        10.000    A <- persisted #2: 2025-06-01 15s, trial 0s, tts 0, spend 0
        10.000    A -> usage today=15 remaining=15 session=10
        12.500    B -> persist #2 2025-06-01 +5s trial+0s tts+0 cost+0
        12.500    B <- persisted #2: 2025-06-01 20s, trial 0s, tts 0, spend 0
        12.500    B -> usage today=20 remaining=10 session=10
        15.000    A -> persist #3 2025-06-01 +5s trial+0s tts+0 cost+0
        15.000    A <- persisted #3: 2025-06-01 25s, trial 0s, tts 0, spend 0
        15.000    A -> usage today=25 remaining=5 session=15
        17.500    B -> persist #3 2025-06-01 +5s trial+0s tts+0 cost+0
        17.500    B <- persisted #3: 2025-06-01 30s, trial 0s, tts 0, spend 0
        17.500    B -> usage today=30 remaining=0 session=15
        17.500    B -> limit_exceeded daily_seconds used=30 allowed=30 resets=2025-06-02T00:00:00Z +hint
        17.500    B -> stop new turns
        17.500    B -> end session 4029
        17.500    B <- ending
        17.500    B -> finished
        20.000    A -> persist #4 2025-06-01 +5s trial+0s tts+0 cost+0
        20.000    A <- persisted #4: 2025-06-01 35s, trial 0s, tts 0, spend 0
        20.000    A -> limit_exceeded daily_seconds used=30 allowed=30 resets=2025-06-02T00:00:00Z +hint
        20.000    A -> stop new turns
        20.000    A -> end session 4029
        20.000    A <- ending
        20.000    A -> usage today=35 remaining=0 session=20
        20.000    A -> finished
    "#]]
    .assert_eq(&sim.log);
    let day = UnixMs(NOON).date();
    // 30 s allowed; each session overshoots by at most what it could not see of the other
    // (one heartbeat), and both ended as soon as their view crossed the limit.
    let total = sim.store.seconds[&day];
    assert!((30..=30 + 5).contains(&total), "{total}");
    assert!(sim.sessions[a].meter.is_finished() && sim.sessions[b].meter.is_finished());
}

#[test]
fn trial_extends_the_daily_allowance_until_used_up() {
    let plans = plans(10, 15);
    let free = plans.get("free").unwrap();
    let mut sim = Sim::new(NOON);
    // Day 1: 10 daily + 15 trial seconds.
    let a = sim.start(0.0, "A", free);
    sim.run_until(30.0);
    // Day 2: the trial is spent, only the daily allowance is left.
    let b = sim.start(86_400.0, "B", free);
    sim.run_until(86_420.0);
    assert!(sim.sessions[a].meter.is_finished() && sim.sessions[b].meter.is_finished());
    expect![[r#"
        0.000     A <- start free at 2025-06-01T12:00:00Z (today 0s, trial used 0s, tts 0)
        0.000     A -> usage today=0 remaining=25 session=0
        5.000     A -> persist #1 2025-06-01 +5s trial+0s tts+0 cost+0
        5.000     A <- persisted #1: 2025-06-01 5s, trial 0s, tts 0, spend 0
        5.000     A -> usage today=5 remaining=20 session=5
        10.000    A -> persist #2 2025-06-01 +5s trial+0s tts+0 cost+0
        10.000    A <- persisted #2: 2025-06-01 10s, trial 0s, tts 0, spend 0
        10.000    A -> usage today=10 remaining=15 session=10
        15.000    A -> persist #3 2025-06-01 +5s trial+5s tts+0 cost+0
        15.000    A <- persisted #3: 2025-06-01 15s, trial 5s, tts 0, spend 0
        15.000    A -> usage today=15 remaining=10 session=15
        20.000    A -> persist #4 2025-06-01 +5s trial+5s tts+0 cost+0
        20.000    A <- persisted #4: 2025-06-01 20s, trial 10s, tts 0, spend 0
        20.000    A -> usage today=20 remaining=5 session=20
        25.000    A -> persist #5 2025-06-01 +5s trial+5s tts+0 cost+0
        25.000    A <- persisted #5: 2025-06-01 25s, trial 15s, tts 0, spend 0
        25.000    A -> limit_exceeded daily_seconds used=25 allowed=25 resets=2025-06-02T00:00:00Z +hint
        25.000    A -> stop new turns
        25.000    A -> end session 4029
        25.000    A <- ending
        25.000    A -> usage today=25 remaining=0 session=25
        25.000    A -> finished
        86400.000 B <- start free at 2025-06-02T12:00:00Z (today 0s, trial used 15s, tts 0)
        86400.000 B -> usage today=0 remaining=10 session=0
        86405.000 B -> persist #1 2025-06-02 +5s trial+0s tts+0 cost+0
        86405.000 B <- persisted #1: 2025-06-02 5s, trial 15s, tts 0, spend 0
        86405.000 B -> usage today=5 remaining=5 session=5
        86410.000 B -> persist #2 2025-06-02 +5s trial+0s tts+0 cost+0
        86410.000 B <- persisted #2: 2025-06-02 10s, trial 15s, tts 0, spend 0
        86410.000 B -> limit_exceeded daily_seconds used=10 allowed=10 resets=2025-06-03T00:00:00Z +hint
        86410.000 B -> stop new turns
        86410.000 B -> end session 4029
        86410.000 B <- ending
        86410.000 B -> usage today=10 remaining=0 session=10
        86410.000 B -> finished
    "#]]
    .assert_eq(&sim.log);
    assert_eq!(sim.store.trial, 15);

    // A pure trial (no daily seconds): once spent it never resets.
    let pure = PlanTable::parse("", Some(0), Some(60)).unwrap();
    let day = UnixMs(NOON).date();
    let mut used = UsageTotals::zero(day);
    assert_eq!(
        admission(pure.get("free").unwrap(), &used, &Switches::default()),
        Admission::Allowed
    );
    used.trial_seconds_used = 60;
    expect![[r#"
        Refused(
            LimitExceeded {
                limit: "trial_seconds",
                used: 60,
                allowed: 60,
                resets_at: None,
                upgrade_hint: Some(
                    "Upgrade to pro: 7200 seconds a day, 50000 TTS characters a month, 30 turns a minute.",
                ),
            },
        )
    "#]]
    .assert_debug_eq(&admission(
        pure.get("free").unwrap(),
        &used,
        &Switches::default(),
    ));
}

#[test]
fn a_session_across_midnight_splits_its_usage_between_days() {
    let table = PlanTable::default();
    let pro = table.get("pro").unwrap();
    // 2025-06-01T23:59:52.500Z
    let mut sim = Sim::new(NOON + 12 * 3_600_000 - 7_500);
    sim.store.seconds.insert(UnixMs(NOON).date(), 7_000);
    let a = sim.start(0.0, "A", pro);
    sim.run_until(16.0);
    sim.input(16.2, a, MeterInput::Ending);
    expect![[r#"
        0.000     A <- start pro at 2025-06-01T23:59:52Z (today 7000s, trial used 0s, tts 0)
        0.000     A -> usage today=7000 remaining=200 session=0
        5.000     A -> persist #1 2025-06-01 +5s trial+0s tts+0 cost+0
        5.000     A <- persisted #1: 2025-06-01 7005s, trial 0s, tts 0, spend 0
        5.000     A -> usage today=7005 remaining=195 session=5
        7.500     A -> usage today=0 remaining=7199 session=7
        10.000    A -> persist #2 2025-06-01 +2s trial+0s tts+0 cost+0
        10.000    A <- persisted #2: 2025-06-01 7007s, trial 0s, tts 0, spend 0
        10.000    A -> usage today=3 remaining=7197 session=10
        15.000    A -> persist #3 2025-06-02 +8s trial+0s tts+0 cost+0
        15.000    A <- persisted #3: 2025-06-02 8s, trial 0s, tts 0, spend 0
        15.000    A -> usage today=8 remaining=7192 session=15
        16.200    A <- ending
        16.200    A -> persist #4 2025-06-02 +2s trial+0s tts+0 cost+0 (last)
        16.200    A <- persisted #4: 2025-06-02 10s, trial 0s, tts 0, spend 0
        16.200    A -> finished
    "#]]
    .assert_eq(&sim.log);
    let d1 = UnixMs(NOON).date();
    // 16.2 s in total, rounded up once: 7.5 s on the first day (7 whole seconds, the half
    // second moved), 9 s on the second.
    assert_eq!(sim.store.seconds[&d1], 7_007);
    assert_eq!(sim.store.seconds[&d1.next()], 10);
}

#[test]
fn monthly_tts_cap_resets_with_the_month() {
    let plans = plans(3_600, 0);
    let free = plans.get("free").unwrap();
    // 2025-06-30T23:59:50Z
    let june30 = UtcDate::from_ymd(2025, 6, 30).unwrap();
    let mut sim = Sim::new(june30.next().start().0 - 10_000);
    sim.store.tts.insert((2025, 6), 90);
    let a = sim.start(0.0, "A", free);
    sim.input(1.0, a, MeterInput::TurnRequested { turn: 1 });
    sim.input(
        2.0,
        a,
        MeterInput::ProviderUsage(ProviderUsage {
            tts_characters: 12,
            cost_micros: 300,
            ..ProviderUsage::default()
        }),
    );
    sim.input(3.0, a, MeterInput::TurnEnded { turn: 1 });
    sim.input(4.0, a, MeterInput::TurnRequested { turn: 2 });
    sim.input(11.0, a, MeterInput::TurnRequested { turn: 3 });
    sim.input(12.0, a, MeterInput::Ending);
    expect![[r#"
        0.000     A <- start free at 2025-06-30T23:59:50Z (today 0s, trial used 0s, tts 90)
        0.000     A -> usage today=0 remaining=3600 session=0
        1.000     A <- turn 1 requested
        1.000     A -> turn 1 allowed
        2.000     A <- provider usage tts=12 cost=300
        2.000     A -> limit_exceeded monthly_tts_characters used=102 allowed=100 resets=2025-07-01T00:00:00Z +hint
        3.000     A <- turn 1 ended
        3.000     A -> usage today=3 remaining=3597 session=3
        4.000     A <- turn 2 requested
        4.000     A -> turn 2 denied limit_exceeded: the plan's monthly speech characters are used up [monthly_tts_characters used=102 allowed=100 resets=2025-07-01T00:00:00Z +hint]
        5.000     A -> persist #1 2025-06-30 +5s trial+0s tts+12 cost+300
        5.000     A <- persisted #1: 2025-06-30 5s, trial 0s, tts 102, spend 300
        5.000     A -> usage today=5 remaining=3595 session=5
        10.000    A -> usage today=0 remaining=3600 session=10
        10.000    A -> persist #2 2025-06-30 +5s trial+0s tts+0 cost+0
        10.000    A <- persisted #2: 2025-06-30 10s, trial 0s, tts 102, spend 300
        10.000    A -> usage today=0 remaining=3600 session=10
        11.000    A <- turn 3 requested
        11.000    A -> turn 3 allowed
        12.000    A <- ending
        12.000    A -> persist #3 2025-07-01 +2s trial+0s tts+0 cost+0 (last)
        12.000    A <- persisted #3: 2025-07-01 2s, trial 0s, tts 0, spend 0
        12.000    A -> finished
    "#]]
    .assert_eq(&sim.log);
}

#[test]
fn turn_rate_limit() {
    let plans = plans(3_600, 0);
    let free = plans.get("free").unwrap();
    let mut sim = Sim::new(NOON);
    sim.config.heartbeat = Duration::from_secs(60);
    let a = sim.start(0.0, "A", free);
    for (i, t) in [1.0, 10.0, 20.0, 30.0, 61.0].into_iter().enumerate() {
        let turn = i as u64 + 1;
        sim.input(t, a, MeterInput::TurnRequested { turn });
        sim.input(t + 2.0, a, MeterInput::TurnEnded { turn });
    }
    expect![[r#"
        0.000     A <- start free at 2025-06-01T12:00:00Z (today 0s, trial used 0s, tts 0)
        0.000     A -> usage today=0 remaining=3600 session=0
        1.000     A <- turn 1 requested
        1.000     A -> turn 1 allowed
        3.000     A <- turn 1 ended
        3.000     A -> usage today=3 remaining=3597 session=3
        10.000    A <- turn 2 requested
        10.000    A -> turn 2 allowed
        12.000    A <- turn 2 ended
        12.000    A -> usage today=12 remaining=3588 session=12
        20.000    A <- turn 3 requested
        20.000    A -> turn 3 allowed
        22.000    A <- turn 3 ended
        22.000    A -> usage today=22 remaining=3578 session=22
        30.000    A <- turn 4 requested
        30.000    A -> turn 4 denied rate_limited: more than 3 turns a minute [turns_per_minute used=3 allowed=3 resets=2025-06-01T12:01:01Z +hint]
        32.000    A <- turn 4 ended
        32.000    A -> usage today=32 remaining=3568 session=32
        60.000    A -> persist #1 2025-06-01 +60s trial+0s tts+0 cost+0
        60.000    A <- persisted #1: 2025-06-01 60s, trial 0s, tts 0, spend 0
        60.000    A -> usage today=60 remaining=3540 session=60
        61.000    A <- turn 5 requested
        61.000    A -> turn 5 allowed
        63.000    A <- turn 5 ended
        63.000    A -> usage today=63 remaining=3537 session=63
    "#]]
    .assert_eq(&sim.log);
}

#[test]
fn kill_switches() {
    let plans = plans(3_600, 0);
    let (free, pro) = (plans.get("free").unwrap(), plans.get("pro").unwrap());
    let mut sim = Sim::new(NOON);
    sim.config.heartbeat = Duration::from_secs(60);
    let day = UnixMs(NOON).date();
    // Other users already spent $9.999 today.
    sim.store.spend.insert(day, 9_999_000);
    sim.switches.max_daily_spend_micros = Some(10_000_000);
    let f = sim.start(0.0, "F", free);
    let p = sim.start(0.0, "P", pro);
    let off = Switches {
        ai_generation_enabled: false,
        ..sim.switches.clone()
    };
    sim.switches(1.0, off);
    sim.input(2.0, p, MeterInput::TurnRequested { turn: 1 });
    let on = Switches {
        ai_generation_enabled: true,
        free_tier_enabled: false,
        max_daily_spend_micros: Some(10_000_000),
    };
    sim.switches(3.0, on);
    sim.input(4.0, f, MeterInput::TurnRequested { turn: 1 });
    sim.input(4.0, p, MeterInput::TurnRequested { turn: 2 });
    sim.input(
        5.0,
        p,
        MeterInput::ProviderUsage(ProviderUsage {
            cost_micros: 2_000,
            llm_tokens: 120,
            ..ProviderUsage::default()
        }),
    );
    sim.input(6.0, p, MeterInput::TurnEnded { turn: 2 });
    sim.input(7.0, p, MeterInput::TurnRequested { turn: 3 });
    expect![[r#"
        0.000     F <- start free at 2025-06-01T12:00:00Z (today 0s, trial used 0s, tts 0)
        0.000     F -> usage today=0 remaining=3600 session=0
        0.000     P <- start pro at 2025-06-01T12:00:00Z (today 0s, trial used 0s, tts 0)
        0.000     P -> usage today=0 remaining=7200 session=0
        1.000     F <- switches Switches { ai_generation_enabled: false, free_tier_enabled: true, max_daily_spend_micros: Some(10000000) }
        1.000     P <- switches Switches { ai_generation_enabled: false, free_tier_enabled: true, max_daily_spend_micros: Some(10000000) }
        2.000     P <- turn 1 requested
        2.000     P -> turn 1 denied generation_disabled: assistant generation is switched off by the operator [generation_disabled used=0 allowed=0]
        3.000     F <- switches Switches { ai_generation_enabled: true, free_tier_enabled: false, max_daily_spend_micros: Some(10000000) }
        3.000     P <- switches Switches { ai_generation_enabled: true, free_tier_enabled: false, max_daily_spend_micros: Some(10000000) }
        4.000     F <- turn 1 requested
        4.000     F -> turn 1 denied generation_disabled: the free tier is switched off by the operator [generation_disabled used=0 allowed=0 +hint]
        4.000     P <- turn 2 requested
        4.000     P -> turn 2 allowed
        5.000     P <- provider usage tts=0 cost=2000
        5.000     P -> limit_exceeded daily_spend used=1000 allowed=1000 resets=2025-06-02T00:00:00Z
        6.000     P <- turn 2 ended
        6.000     P -> usage today=6 remaining=7194 session=6
        7.000     P <- turn 3 requested
        7.000     P -> turn 3 denied limit_exceeded: the service's daily spending cap is reached [daily_spend used=1000 allowed=1000 resets=2025-06-02T00:00:00Z]
    "#]]
    .assert_eq(&sim.log);

    // New connections.
    let sw = |f: fn(&mut Switches)| {
        let mut s = Switches::default();
        f(&mut s);
        s
    };
    let fresh = UsageTotals::zero(day);
    let spent = UsageTotals {
        seconds_today: 3_600,
        ..fresh.clone()
    };
    let results = [
        admission(free, &fresh, &Switches::default()),
        admission(free, &fresh, &sw(|s| s.free_tier_enabled = false)),
        admission(pro, &fresh, &sw(|s| s.free_tier_enabled = false)),
        admission(pro, &fresh, &sw(|s| s.ai_generation_enabled = false)),
        admission(
            pro,
            &UsageTotals {
                spend_today_micros: 10_000_000,
                ..fresh.clone()
            },
            &sim.switches,
        ),
        admission(free, &spent, &Switches::default()),
    ];
    expect![[r#"
        [
            Allowed,
            Refused(
                LimitExceeded {
                    limit: "generation_disabled",
                    used: 0,
                    allowed: 0,
                    resets_at: None,
                    upgrade_hint: Some(
                        "Upgrade to pro: 7200 seconds a day, 50000 TTS characters a month, 30 turns a minute.",
                    ),
                },
            ),
            Allowed,
            Refused(
                LimitExceeded {
                    limit: "generation_disabled",
                    used: 0,
                    allowed: 0,
                    resets_at: None,
                    upgrade_hint: None,
                },
            ),
            Refused(
                LimitExceeded {
                    limit: "daily_spend",
                    used: 1000,
                    allowed: 1000,
                    resets_at: Some(
                        "2025-06-02T00:00:00Z",
                    ),
                    upgrade_hint: None,
                },
            ),
            Refused(
                LimitExceeded {
                    limit: "daily_seconds",
                    used: 3600,
                    allowed: 3600,
                    resets_at: Some(
                        "2025-06-02T00:00:00Z",
                    ),
                    upgrade_hint: Some(
                        "Upgrade to pro: 7200 seconds a day, 50000 TTS characters a month, 30 turns a minute.",
                    ),
                },
            ),
        ]
    "#]]
    .assert_debug_eq(&results);
}

#[test]
fn store_failure_then_recovery_loses_nothing() {
    let plans = plans(3_600, 0);
    let free = plans.get("free").unwrap();
    let mut sim = Sim::new(NOON);
    let a = sim.start(0.0, "A", free);
    sim.run_until(4.0);
    sim.store.down = true;
    sim.input(
        6.0,
        a,
        MeterInput::ProviderUsage(ProviderUsage {
            tts_characters: 40,
            llm_tokens: 200,
            stt_ms: 6_000,
            cost_micros: 1_500,
        }),
    );
    sim.run_until(17.0);
    // Three heartbeats failed: everything since 0 s is still held (up to the last wake-up).
    assert_eq!(sim.sessions[a].meter.unpersisted().unwrap().seconds, 15);
    sim.store.down = false;
    sim.run_until(21.0);
    sim.input(22.3, a, MeterInput::Ending);
    expect![[r#"
        0.000     A <- start free at 2025-06-01T12:00:00Z (today 0s, trial used 0s, tts 0)
        0.000     A -> usage today=0 remaining=3600 session=0
        5.000     A -> persist #1 2025-06-01 +5s trial+0s tts+0 cost+0
        5.000     A <- persist #1 failed
        6.000     A <- provider usage tts=40 cost=1500
        10.000    A -> persist #1 2025-06-01 +5s trial+0s tts+0 cost+0 (again)
        10.000    A <- persist #1 failed
        15.000    A -> persist #1 2025-06-01 +5s trial+0s tts+0 cost+0 (again)
        15.000    A <- persist #1 failed
        20.000    A -> persist #1 2025-06-01 +5s trial+0s tts+0 cost+0 (again)
        20.000    A <- persisted #1: 2025-06-01 5s, trial 0s, tts 0, spend 0
        20.000    A -> persist #2 2025-06-01 +15s trial+0s tts+40 cost+1500
        20.000    A <- persisted #2: 2025-06-01 20s, trial 0s, tts 40, spend 1500
        20.000    A -> usage today=20 remaining=3580 session=20
        22.300    A <- ending
        22.300    A -> persist #3 2025-06-01 +3s trial+0s tts+0 cost+0 (last)
        22.300    A <- persisted #3: 2025-06-01 23s, trial 0s, tts 40, spend 1500
        22.300    A -> finished
    "#]]
    .assert_eq(&sim.log);
    let day = UnixMs(NOON).date();
    assert_eq!(sim.store.seconds[&day], 23, "ceil(22.3 s)");
    assert_eq!(sim.store.tts[&day.month()], 40);
    assert_eq!(sim.store.spend[&day], 1_500);
}

#[test]
fn finalize_on_close_waits_for_the_write_in_flight_and_retries() {
    let plans = plans(3_600, 0);
    let free = plans.get("free").unwrap();
    let mut sim = Sim::new(NOON);
    sim.store.hold = true;
    let a = sim.start(0.0, "A", free);
    sim.run_until(5.0);
    sim.input(6.5, a, MeterInput::Ending);
    // A turn requested while ending is refused.
    sim.input(6.5, a, MeterInput::TurnRequested { turn: 9 });
    sim.store.down = true;
    sim.release(7.0);
    sim.store.down = false;
    sim.run_until(20.0);
    expect![[r#"
        0.000     A <- start free at 2025-06-01T12:00:00Z (today 0s, trial used 0s, tts 0)
        0.000     A -> usage today=0 remaining=3600 session=0
        5.000     A -> persist #1 2025-06-01 +5s trial+0s tts+0 cost+0
        6.500     A <- ending
        6.500     A <- turn 9 requested
        6.500     A -> turn 9 denied session_ended: the session is ending [generation_disabled used=0 allowed=0]
        7.000     A <- persist #1 failed
        12.000    A -> persist #1 2025-06-01 +5s trial+0s tts+0 cost+0 (again)
        12.000    A <- persisted #1: 2025-06-01 5s, trial 0s, tts 0, spend 0
        12.000    A -> persist #2 2025-06-01 +2s trial+0s tts+0 cost+0 (last)
        12.000    A <- persisted #2: 2025-06-01 7s, trial 0s, tts 0, spend 0
        12.000    A -> finished
    "#]]
    .assert_eq(&sim.log);
    assert!(sim.sessions[a].meter.is_finished());
    assert_eq!(sim.store.seconds[&UnixMs(NOON).date()], 7, "ceil(6.5 s)");
}

#[test]
fn a_write_that_committed_but_timed_out_is_not_counted_twice() {
    let plans = plans(3_600, 0);
    let free = plans.get("free").unwrap();
    let mut sim = Sim::new(NOON);
    let a = sim.start(0.0, "A", free);
    sim.input(
        2.0,
        a,
        MeterInput::ProviderUsage(ProviderUsage {
            tts_characters: 40,
            llm_tokens: 200,
            stt_ms: 2_000,
            cost_micros: 1_500,
        }),
    );
    sim.store.answers_lost = true;
    sim.run_until(6.0);
    sim.store.answers_lost = false;
    sim.input(
        7.0,
        a,
        MeterInput::ProviderUsage(ProviderUsage {
            tts_characters: 10,
            llm_tokens: 0,
            stt_ms: 0,
            cost_micros: 100,
        }),
    );
    sim.run_until(11.0);
    sim.input(12.0, a, MeterInput::Ending);
    expect![[r#"
        0.000     A <- start free at 2025-06-01T12:00:00Z (today 0s, trial used 0s, tts 0)
        0.000     A -> usage today=0 remaining=3600 session=0
        2.000     A <- provider usage tts=40 cost=1500
        5.000     A -> persist #1 2025-06-01 +5s trial+0s tts+40 cost+1500
        5.000     A <- persist #1 timed out (committed)
        7.000     A <- provider usage tts=10 cost=100
        10.000    A -> persist #1 2025-06-01 +5s trial+0s tts+40 cost+1500 (again)
        10.000    A <- persisted #1: 2025-06-01 5s, trial 0s, tts 40, spend 1500
        10.000    A -> persist #2 2025-06-01 +5s trial+0s tts+10 cost+100
        10.000    A <- persisted #2: 2025-06-01 10s, trial 0s, tts 50, spend 1600
        10.000    A -> usage today=10 remaining=3590 session=10
        12.000    A <- ending
        12.000    A -> persist #3 2025-06-01 +2s trial+0s tts+0 cost+0 (last)
        12.000    A <- persisted #3: 2025-06-01 12s, trial 0s, tts 50, spend 1600
        12.000    A -> finished
    "#]]
    .assert_eq(&sim.log);
    let day = UnixMs(NOON).date();
    assert_eq!(sim.store.seconds[&day], 12);
    assert_eq!(sim.store.tts[&day.month()], 50);
    assert_eq!(sim.store.spend[&day], 1_600);
}

#[test]
fn a_session_that_stops_waiting_hands_over_every_unacknowledged_write_and_replays_apply_once() {
    let plans = plans(3_600, 0);
    let free = plans.get("free").unwrap();
    let mut sim = Sim::new(NOON);
    let a = sim.start(0.0, "A", free);
    sim.run_until(7.0);
    // The 10 s heartbeat's write commits but its answer is lost; later writes fail outright.
    sim.store.answers_lost = true;
    sim.run_until(10.5);
    sim.store.answers_lost = false;
    sim.store.down = true;
    sim.input(12.3, a, MeterInput::Ending);
    sim.run_until(14.0);
    let before = sim.store.seconds.values().sum::<u64>();
    let deltas = sim.sessions[a].meter.take_unpersisted();
    assert!(sim.sessions[a].meter.is_finished());
    assert!(sim.sessions[a].meter.take_unpersisted().is_empty());
    // The write of unknown outcome first, unchanged and marked as a replay; then the rest.
    assert!(deltas[0].retried, "{deltas:?}");
    let seqs: Vec<u64> = deltas.iter().map(|d| d.seq).collect();
    let mut sorted = seqs.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(seqs, sorted, "in order, no seq twice: {deltas:?}");
    // Whoever takes them applies them all once the store is back: the store then holds the
    // session's 12.3 s rounded up, no second twice.
    sim.store.down = false;
    for d in &deltas {
        sim.store.add("A", d);
    }
    let after = sim.store.seconds.values().sum::<u64>();
    assert!(before >= 5, "the 5 s heartbeat was acknowledged: {before}");
    assert_eq!(after, 13, "before {before}, deltas {deltas:?}");
}
