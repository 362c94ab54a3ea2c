//! Metering and limits end to end: real sessions over real sockets (and, where the point is
//! several processes or a crash, the real `duplex` binary), usage checked in the store.
//!
//! What is covered: a free user running out of daily seconds mid-session (`limit_exceeded`,
//! no new turn, close 4029) and being refused on the next connection; concurrent sessions of
//! one user sharing the limit, in one process and in two processes on one PostgreSQL; a
//! SIGKILL mid-session losing at most one heartbeat of usage; the kill switches at startup, from
//! the daily spend cap and from the reloaded switches file; the plan in `session.ready` and
//! `usage_update`. Day rollover is the meter's unit tests' business (`duplex-metering`).
//!
//! Every server writes usage every second (`USAGE_HEARTBEAT_SECS=1`) and the limits are a few
//! seconds, so each test runs a few seconds of wall time; each is bounded by [`TEST_TIMEOUT`].
//! The PostgreSQL test follows `duplex_store::testing`: skipped loudly without
//! `DATABASE_URL_POSTGRES` outside CI, failed in CI.

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use duplex_metering::PlanTable;
use duplex_proto::{
    ClientMessage, ErrorCode, InputText, LimitExceeded, ServerMessage, SessionReady, UsageUpdate,
    close_code,
};
use duplex_replay::client::{Client, Event, EventKind};
use duplex_server::Config;
use duplex_server::auth::Secret;
use duplex_store::testing::{TestDb, each_backend, postgres_url};
use duplex_store::{Store, UsageDelta, day_key};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use time::{Date, OffsetDateTime};
use tokio::time::Instant;

use super::{TestServer, WAIT, still_alive, test_config};

const SECRET: &str = "metering-integration-secret";
/// The user most tests talk as.
const USER: &str = "user_metered";
/// `USAGE_HEARTBEAT_SECS` of every test server: usage reaches the store (and other sessions
/// learn of it) each second, so a limit of a few seconds is reached and shared in seconds.
const HEARTBEAT_SECS: u64 = 1;
/// Upper bound of one test; the slowest (a turn finishing after the limit) needs ~15 s.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);
/// 100 ms of 16 kHz PCM16 silence: what an open microphone in a quiet room sends.
const SILENCE: [u8; 3200] = [0; 3200];
const SILENCE_EVERY: Duration = Duration::from_millis(100);
/// Measurement slack of the timing assertions: events are timestamped by the client, a few
/// milliseconds after the server acted, on a 2-core machine shared with other tests.
const SLACK: Duration = Duration::from_millis(400);

async fn bounded(fut: impl Future<Output = ()>) {
    tokio::time::timeout(TEST_TIMEOUT, fut)
        .await
        .expect("test finished in time");
}

/// Auth on (so users are token subjects, new ones on `free`), `free_daily_seconds` a day, usage
/// written every [`HEARTBEAT_SECS`].
fn metered_config(free_daily_seconds: u64) -> Config {
    let mut c = test_config();
    c.auth.jwt_secret = Some(Secret(SECRET.into()));
    c.metering.plans =
        PlanTable::parse("", Some(free_daily_seconds), None).expect("valid plan limits");
    c.metering.usage_heartbeat = Duration::from_secs(HEARTBEAT_SECS);
    c
}

fn token(sub: &str) -> String {
    let exp = jsonwebtoken::get_current_timestamp() + 600;
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({"sub": sub, "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("the token encodes")
}

fn today() -> Date {
    OffsetDateTime::now_utc().date()
}

/// The `resets_at` of a daily limit reached today: next midnight, UTC.
fn next_midnight() -> String {
    let tomorrow = today().next_day().expect("not the end of time");
    format!("{}T00:00:00Z", day_key(tomorrow))
}

/// Connects as `sub` (token in the query, as browsers do) and sends `session.start`.
async fn connect_as(base_url: &str, sub: &str) -> Client {
    let url = format!("{base_url}?token={}", token(sub));
    Client::connect(&url, Some(super::start(16000)))
        .await
        .unwrap_or_else(|e| panic!("{sub} cannot connect: {e}"))
}

async fn ready_as(base_url: &str, sub: &str) -> (Client, SessionReady) {
    let mut c = connect_as(base_url, sub).await;
    match c.wait_ready(WAIT).await {
        Ok(ready) => (c, ready),
        Err(e) => panic!("{sub}: no session.ready: {e}\n{}", timeline(c.events())),
    }
}

async fn send_text(c: &mut Client, text: &str) {
    c.send_json(&ClientMessage::InputText(InputText { text: text.into() }))
        .await
        .expect("input.text is sent");
}

/// Streams silence like a live microphone while reading events, until `stop` matches one
/// (returned), the connection ends or `timeout` passes (`None`). Every event read lands in the
/// client's log.
async fn talk_until(
    c: &mut Client,
    timeout: Duration,
    mut stop: impl FnMut(&Event) -> bool,
) -> Option<Event> {
    let deadline = Instant::now() + timeout;
    let mut mic = tokio::time::interval(SILENCE_EVERY);
    mic.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut mic_open = true;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return None,
            r = c.recv_event() => match r {
                Ok(e) if stop(&e) => return Some(e),
                Ok(_) => {}
                Err(e @ duplex_replay::Error::BadServerJson { .. }) => {
                    panic!("{e}\n{}", timeline(c.events()))
                }
                Err(_) => return None,
            },
            _ = mic.tick(), if mic_open => {
                // Once the server closed, sends fail: the microphone stops, reading goes on.
                if c.send_audio(&SILENCE).await.is_err() {
                    mic_open = false;
                }
            }
        }
    }
}

fn is_close(e: &Event) -> bool {
    matches!(e.kind, EventKind::Close(_))
}

fn is_limit(e: &Event) -> bool {
    matches!(e.json(), Some(ServerMessage::LimitExceeded(_)))
}

fn limits(events: &[Event]) -> Vec<(Instant, &LimitExceeded)> {
    events
        .iter()
        .filter_map(|e| match e.json() {
            Some(ServerMessage::LimitExceeded(l)) => Some((e.at, l)),
            _ => None,
        })
        .collect()
}

fn usage_updates(events: &[Event]) -> Vec<(Instant, &UsageUpdate)> {
    events
        .iter()
        .filter_map(|e| match e.json() {
            Some(ServerMessage::UsageUpdate(u)) => Some((e.at, u)),
            _ => None,
        })
        .collect()
}

/// The turn id of an assistant message or audio start.
fn assistant_turn(e: &Event) -> Option<u64> {
    match e.json() {
        Some(ServerMessage::AssistantMessage(m)) => Some(m.turn_id),
        Some(ServerMessage::AssistantAudioStart(s)) => Some(s.turn_id),
        _ => None,
    }
}

fn close_of(events: &[Event]) -> Option<(Instant, Option<u16>)> {
    events.iter().find_map(|e| match &e.kind {
        EventKind::Close(c) => Some((e.at, c.as_ref().map(|(code, _)| *code))),
        _ => None,
    })
}

/// Every event but audio frames (counted), with ms since the first event: failure context.
fn timeline(events: &[Event]) -> String {
    let Some(t0) = events.first().map(|e| e.at) else {
        return "  (no events)".into();
    };
    let mut out = String::new();
    let mut audio = 0;
    for e in events {
        if let EventKind::Audio(_) = e.kind {
            audio += 1;
            continue;
        }
        if audio > 0 {
            out.push_str(&format!("  ({audio} audio frames)\n"));
            audio = 0;
        }
        let what = match &e.kind {
            EventKind::Json(m) => serde_json::to_string(m).unwrap_or_else(|_| e.label()),
            _ => e.label(),
        };
        let ms = e.at.saturating_duration_since(t0).as_millis();
        out.push_str(&format!("  +{ms:>6} ms {what}\n"));
    }
    if audio > 0 {
        out.push_str(&format!("  ({audio} audio frames)\n"));
    }
    out
}

/// The `limit_exceeded` named `name` that accompanies a denial: already read (among the events
/// from index `from` on) or arriving shortly (the protocol does not order it against the
/// `error`).
async fn expect_limit_since(c: &mut Client, from: usize, name: &str) -> LimitExceeded {
    let seen = limits(&c.events()[from..])
        .into_iter()
        .find(|(_, l)| l.limit == name)
        .map(|(_, l)| l.clone());
    if let Some(l) = seen {
        return l;
    }
    let next = c
        .wait_for(
            |e| matches!(e.json(), Some(ServerMessage::LimitExceeded(l)) if l.limit == name),
            Duration::from_secs(2),
        )
        .await;
    match next.as_ref().map(|e| e.json()) {
        Ok(Some(ServerMessage::LimitExceeded(l))) => l.clone(),
        _ => panic!(
            "no limit_exceeded {name} with the denial:\n{}",
            timeline(c.events())
        ),
    }
}

/// Connects as `sub`, expecting a refusal: `limit_exceeded`, then close 4029, and no
/// `session.ready` ever. Returns the `limit_exceeded`.
async fn expect_refused(base_url: &str, sub: &str) -> LimitExceeded {
    let mut c = connect_as(base_url, sub).await;
    let _ = c.wait_for(is_close, WAIT).await;
    let events = c.events();
    let tl = timeline(events);
    assert!(
        !events
            .iter()
            .any(|e| matches!(e.json(), Some(ServerMessage::SessionReady(_)))),
        "{sub}: a refused connection must not start a session:\n{tl}"
    );
    let limit_at = events
        .iter()
        .position(is_limit)
        .unwrap_or_else(|| panic!("{sub}: no limit_exceeded before the close:\n{tl}"));
    let close_at = events
        .iter()
        .position(is_close)
        .unwrap_or_else(|| panic!("{sub}: no close frame:\n{tl}"));
    assert!(
        limit_at < close_at,
        "{sub}: limit_exceeded after the close:\n{tl}"
    );
    assert_eq!(
        events[close_at].close_code(),
        Some(close_code::LIMIT_EXCEEDED),
        "{sub}:\n{tl}"
    );
    limits(events)[0].1.clone()
}

/// The user's stored conversation time over `days` (the day a test started and today, in
/// case it ran over midnight).
async fn stored_ms(store: &Store, sub: &str, days: &[Date]) -> i64 {
    let user = store
        .user_by_external_id(sub)
        .await
        .expect("the store answers")
        .unwrap_or_else(|| panic!("user {sub} was never created"));
    let mut days = days.to_vec();
    days.dedup();
    let mut total = 0;
    for day in days {
        total += store
            .usage_for_day(user.id, day)
            .await
            .expect("the store answers")
            .conversation_ms;
    }
    total
}

/// The user's stored conversation time once the sessions' final writes are in: waits until it
/// reaches `at_least` (bounded), then a little longer for writes still in flight.
async fn settled_ms(store: &Store, sub: &str, day0: Date, at_least: i64) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ms = stored_ms(store, sub, &[day0, today()]).await;
        if ms >= at_least || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(HEARTBEAT_SECS) + SLACK).await;
    stored_ms(store, sub, &[day0, today()]).await
}

async fn stop(ts: TestServer) {
    ts.server.shutdown_token().cancel();
    ts.server.wait().await;
}

// ---------------------------------------------------------------------------------------------
// One user's daily limit
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn free_user_runs_out_mid_session_and_is_refused_afterwards() {
    bounded(async {
        let day0 = today();
        let ts = TestServer::start(metered_config(3)).await;
        let (mut c, ready) = ready_as(&ts.url(), USER).await;
        assert_eq!(ready.plan.name, "free");
        assert_eq!(ready.plan.limits.daily_seconds, Some(3));
        let ready_at = c.events()[0].at;

        // A turn that is still speaking when the time runs out (the scripted reply is a few
        // seconds of audio).
        talk_until(&mut c, Duration::from_millis(1500), |_| false).await;
        send_text(&mut c, "tell me something long").await;
        let limit = talk_until(&mut c, Duration::from_secs(10), is_limit).await;
        let limit_at = limit
            .unwrap_or_else(|| panic!("no limit_exceeded:\n{}", timeline(c.events())))
            .at;
        // Asking for another turn after the limit must not start one.
        send_text(&mut c, "and one more thing").await;
        talk_until(&mut c, Duration::from_secs(40), is_close).await;
        let events = c.take_events();
        let tl = timeline(&events);

        // usage_update at start, then with each heartbeat's totals.
        let usage = usage_updates(&events);
        let before: Vec<_> = usage.iter().filter(|(at, _)| *at < limit_at).collect();
        assert!(before.len() >= 2, "usage_updates before the limit:\n{tl}");
        let (first_at, first) = before[0];
        assert!(
            first_at.duration_since(ready_at) < Duration::from_secs(HEARTBEAT_SECS),
            "the first usage_update is sent at start:\n{tl}"
        );
        assert_eq!(
            (
                first.plan.as_str(),
                first.seconds_used_today,
                first.seconds_remaining,
                first.session_seconds
            ),
            ("free", 0, Some(3), 0),
            "{tl}"
        );
        for w in usage.windows(2) {
            let (a, b) = (w[0].1, w[1].1);
            assert!(
                b.seconds_used_today >= a.seconds_used_today
                    && b.session_seconds >= a.session_seconds,
                "usage went backwards:\n{tl}"
            );
        }

        // The limit: which, how much, when it resets; reached after 3 s of conversation.
        let (_, l) = limits(&events)[0];
        assert_eq!(l.limit, "daily_seconds", "{tl}");
        assert_eq!(l.allowed, 3, "{tl}");
        assert!(l.used >= 3, "{tl}");
        assert_eq!(
            l.resets_at.as_deref(),
            Some(next_midnight().as_str()),
            "{tl}"
        );
        assert!(
            l.upgrade_hint.is_some(),
            "free users are told how to get more: {l:?}"
        );
        let ran = limit_at.duration_since(ready_at);
        assert!(
            ran + SLACK >= Duration::from_secs(3) && ran <= Duration::from_secs(3) + 3 * SLACK,
            "limit_exceeded after {ran:?} of a 3 s allowance:\n{tl}"
        );

        // The turn in progress may finish; no new turn starts.
        let first_turn = events
            .iter()
            .find_map(assistant_turn)
            .unwrap_or_else(|| panic!("the turn before the limit never started:\n{tl}"));
        let new_turns: Vec<u64> = events
            .iter()
            .filter(|e| e.at >= limit_at)
            .filter_map(assistant_turn)
            .filter(|t| *t != first_turn)
            .collect();
        assert!(
            new_turns.is_empty(),
            "turns {new_turns:?} started after limit_exceeded:\n{tl}"
        );

        // Then the session closes with 4029.
        let (closed_at, code) =
            close_of(&events).unwrap_or_else(|| panic!("the session was not closed:\n{tl}"));
        assert_eq!(code, Some(close_code::LIMIT_EXCEEDED), "{tl}");
        assert!(closed_at >= limit_at);

        // The store has the day's seconds: at least the allowance, at most what the session
        // lasted (rounded up once).
        let store = ts.server.store().clone();
        let stored = settled_ms(&store, USER, day0, 3000).await;
        let lasted = closed_at.duration_since(ready_at).as_secs_f64();
        assert!(stored >= 3000, "stored {stored} ms:\n{tl}");
        assert!(
            stored as f64 <= (lasted.ceil() + 1.0) * 1000.0,
            "stored {stored} ms for a session of {lasted:.2} s"
        );

        // The next connection of this user is told and closed, without a session.
        // `allowed` is the plan's 3 s even though the turn's grace took the day past them.
        let l = expect_refused(&ts.url(), USER).await;
        assert!(l.used >= 3, "{l:?}");
        assert_eq!(
            (l.limit.as_str(), l.allowed),
            ("daily_seconds", 3),
            "{l:?} (stored {stored} ms)"
        );
        stop(ts).await;
    })
    .await;
}

#[tokio::test]
async fn over_the_limit_connections_are_refused_before_a_session_starts() {
    bounded(async {
        let ts = TestServer::start(metered_config(3)).await;
        let store = ts.server.store().clone();
        let seed = |sub: &'static str, ms: i64| {
            let store = store.clone();
            async move {
                let user = store.ensure_user(sub).await.unwrap();
                let delta = UsageDelta {
                    conversation_ms: ms,
                    ..Default::default()
                };
                store.add_usage(user.id, today(), delta).await.unwrap();
            }
        };
        seed("user_spent", 3000).await;
        seed("user_almost", 2000).await;
        // Yesterday's seconds do not count today.
        let user = store.ensure_user("user_yesterday").await.unwrap();
        let yesterday = today().previous_day().unwrap();
        let delta = UsageDelta {
            conversation_ms: 3000,
            ..Default::default()
        };
        store.add_usage(user.id, yesterday, delta).await.unwrap();

        let l = expect_refused(&ts.url(), "user_spent").await;
        assert_eq!(
            (l.limit.as_str(), l.used, l.allowed),
            ("daily_seconds", 3, 3),
            "{l:?}"
        );
        assert_eq!(l.resets_at.as_deref(), Some(next_midnight().as_str()));

        // Users with time left are admitted on the same server.
        for sub in ["user_almost", "user_yesterday", "user_new"] {
            let (_c, ready) = ready_as(&ts.url(), sub).await;
            assert_eq!(ready.plan.name, "free", "{sub}");
        }
        stop(ts).await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// The limit across sessions and servers
// ---------------------------------------------------------------------------------------------

/// One session run to its close.
struct Run {
    /// Where it ran, for failure messages (e.g. the server's log file).
    label: String,
    events: Vec<Event>,
}

impl Run {
    fn ready_at(&self) -> Instant {
        self.events[0].at
    }
}

async fn talk_to_close(label: String, mut c: Client) -> Run {
    talk_until(&mut c, Duration::from_secs(30), is_close).await;
    Run {
        label,
        events: c.take_events(),
    }
}

/// Sessions of one user that together have `limit` seconds a day: each must be stopped well
/// before `limit` seconds (alone it would get them all), but not before the user as a whole
/// used them.
fn assert_shared_limit(runs: &[Run], limit: Duration) {
    let mut first_limit: Option<Instant> = None;
    for r in runs {
        let tl = timeline(&r.events);
        let (at, l) = *limits(&r.events)
            .first()
            .unwrap_or_else(|| panic!("{}: no limit_exceeded:\n{tl}", r.label));
        assert_eq!(l.limit, "daily_seconds", "{}:\n{tl}", r.label);
        let (_, code) =
            close_of(&r.events).unwrap_or_else(|| panic!("{}: not closed:\n{tl}", r.label));
        assert_eq!(code, Some(close_code::LIMIT_EXCEEDED), "{}:\n{tl}", r.label);
        let ran = at.duration_since(r.ready_at());
        assert!(
            ran + SLACK < limit,
            "{}: limit_exceeded after {ran:?}; alone this session may run {limit:?}, so the \
             sessions did not share the limit:\n{tl}",
            r.label
        );
        first_limit = Some(first_limit.map_or(at, |f| f.min(at)));
    }
    let first = first_limit.expect("at least one run");
    let used: Duration = runs
        .iter()
        .map(|r| first.saturating_duration_since(r.ready_at()))
        .sum();
    assert!(
        used + Duration::from_secs(1) >= limit,
        "the first limit_exceeded came when the sessions together had run only {used:?} of \
         {limit:?}"
    );
}

#[tokio::test]
async fn concurrent_sessions_of_one_user_share_the_daily_limit() {
    bounded(each_backend("metering_concurrent", |db| async move {
        let day0 = today();
        let mut config = metered_config(4);
        config.store.database_url = db.url.clone();
        let ts = TestServer::start(config).await;
        let (a, _) = ready_as(&ts.url(), USER).await;
        let (b, _) = ready_as(&ts.url(), USER).await;
        let (a, b) = tokio::join!(talk_to_close("a".into(), a), talk_to_close("b".into(), b));
        assert_shared_limit(&[a, b], Duration::from_secs(4));
        // Each session learns the other's seconds at most one heartbeat late and rounds its
        // own up once: at most two heartbeats over per session.
        let stored = settled_ms(ts.server.store(), USER, day0, 4000).await;
        let most = (4 + 2 * 2 * HEARTBEAT_SECS) as i64 * 1000;
        assert!(
            (4000..=most).contains(&stored),
            "stored {stored} ms; expected 4000..={most}"
        );
        stop(ts).await;
    }))
    .await;
}

/// A `duplex` server process (killed on drop), its stderr in a log file.
struct ServerProcess {
    child: Child,
    addr: SocketAddr,
    log_path: PathBuf,
}

impl ServerProcess {
    /// Starts the binary on a free loopback port with scripted providers, auth by [`SECRET`],
    /// the store at `database_url`, one-second heartbeats and `env`; returns once it accepts
    /// connections.
    async fn start(label: &str, database_url: &str, env: &[(&str, &str)]) -> ServerProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log_path = std::env::temp_dir().join(format!(
            "duplex-metering-test-{}-{label}-{port}.log",
            std::process::id()
        ));
        let log = std::fs::File::create(&log_path).expect("server log file");
        let heartbeat = HEARTBEAT_SECS.to_string();
        // A clean environment: a developer's OPENAI_API_KEY must not swap in a cloud model.
        let child = Command::new(env!("CARGO_BIN_EXE_duplex"))
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--providers", "scripted"])
            .env_clear()
            .env("DATABASE_URL", database_url)
            .env("JWT_SECRET", SECRET)
            .env("USAGE_HEARTBEAT_SECS", &heartbeat)
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .env("CONNECT_RATE_PER_MIN", "0")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the duplex binary starts");
        let mut server = ServerProcess {
            child,
            addr,
            log_path,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!(
                    "server {label} exited during startup ({status}):\n{}",
                    server.log()
                );
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "server {label} did not listen within 30 s:\n{}",
                server.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn url(&self) -> String {
        format!("ws://{}/v1/conversation", self.addr)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// SIGKILL: no drain, no final write.
    fn kill(&mut self) -> ExitStatus {
        self.child.kill().expect("the server process is killed");
        self.child.wait().expect("the killed server is reaped")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test keeps the log for inspection (its messages name the file).
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log_path);
        }
    }
}

#[tokio::test]
async fn two_server_processes_on_one_postgres_share_the_daily_limit() {
    bounded(async {
        // Skips loudly outside CI without a PostgreSQL; panics in CI.
        let Some(admin) = postgres_url() else { return };
        let day0 = today();
        let db = TestDb::postgres(&admin, "metering_two_procs").await;
        let env = [("FREE_DAILY_LIMIT_SECONDS", "4")];
        let one = ServerProcess::start("pg_one", &db.url, &env).await;
        let two = ServerProcess::start("pg_two", &db.url, &env).await;
        let (a, _) = ready_as(&one.url(), USER).await;
        let (b, _) = ready_as(&two.url(), USER).await;
        let (a, b) = tokio::join!(
            talk_to_close(format!("server one (log {})", one.log_path.display()), a),
            talk_to_close(format!("server two (log {})", two.log_path.display()), b)
        );
        assert_shared_limit(&[a, b], Duration::from_secs(4));
        let store = Store::connect(&db.url).await.expect("the test database");
        let stored = settled_ms(&store, USER, day0, 4000).await;
        let most = (4 + 2 * 2 * HEARTBEAT_SECS) as i64 * 1000;
        assert!(
            (4000..=most).contains(&stored),
            "stored {stored} ms; expected 4000..={most}"
        );
        store.close().await;
        drop((one, two));
        db.remove().await;
    })
    .await;
}

#[tokio::test]
async fn killing_the_server_mid_session_loses_at_most_one_heartbeat() {
    bounded(async {
        let day0 = today();
        let db = TestDb::sqlite("metering_crash");
        let mut server =
            ServerProcess::start("crash", &db.url, &[("FREE_DAILY_LIMIT_SECONDS", "600")]).await;
        let (mut c, _) = ready_as(&server.url(), USER).await;
        let ready_at = c.events()[0].at;
        let ended = talk_until(&mut c, Duration::from_millis(3500), is_close).await;
        assert!(
            ended.is_none(),
            "the session ended before the crash:\n{}",
            timeline(c.events())
        );
        let elapsed = ready_at.elapsed();
        let status = server.kill();
        assert_eq!(
            status.signal(),
            Some(9),
            "the server must die by SIGKILL (no drain, no final write): {status}"
        );
        drop(c);

        let store = Store::open(&db.url)
            .await
            .expect("the store opens after a crash");
        let stored = stored_ms(&store, USER, &[day0, today()]).await;
        let may_lose = Duration::from_secs(HEARTBEAT_SECS) + Duration::from_secs(1);
        assert!(
            stored as u128 + may_lose.as_millis() >= elapsed.as_millis(),
            "stored {stored} ms of a session killed after {elapsed:?}: more than one heartbeat \
             lost\n{}",
            server.log()
        );
        assert!(
            stored as u128 <= elapsed.as_millis() + 1000,
            "stored {stored} ms of a session killed after {elapsed:?}"
        );
        // The crashed server's session row is still open; the next server (here reaping rows
        // silent for 2 s) closes it at start-up.
        assert_eq!(
            store
                .stale_sessions(time::OffsetDateTime::now_utc())
                .await
                .unwrap()
                .len(),
            1
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        let next =
            ServerProcess::start("reaper", &db.url, &[("SESSION_REAP_AFTER_SECS", "2")]).await;
        let mut open = 1;
        for _ in 0..100 {
            open = store
                .stale_sessions(time::OffsetDateTime::now_utc())
                .await
                .unwrap()
                .len();
            if open == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            open,
            0,
            "the next server closes the dead one's session\n{}",
            next.log()
        );
        drop(next);
        store.close().await;
        drop(server);
        db.remove().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Kill switches
// ---------------------------------------------------------------------------------------------

async fn set_plan(store: &Store, sub: &str, plan: &str) {
    let user = store.ensure_user(sub).await.unwrap();
    store
        .set_plan(user.id, plan, "test", OffsetDateTime::now_utc())
        .await
        .unwrap();
}

async fn expect_audio_start(c: &mut Client, what: &str) {
    let started = c
        .wait_for(
            |e| matches!(e.json(), Some(ServerMessage::AssistantAudioStart(_))),
            WAIT,
        )
        .await;
    if let Err(e) = started {
        panic!("{what}: {e}\n{}", timeline(c.events()));
    }
}

/// With `AI_GENERATION_ENABLED=false` at startup the server refuses new sessions (the meter's
/// `admission`, and the variable's documentation: "denies every assistant turn and refuses new
/// sessions"); with `FREE_TIER_ENABLED=false` only free users are refused.
#[tokio::test]
async fn kill_switches_at_startup_refuse_new_sessions() {
    bounded(async {
        let mut config = metered_config(600);
        config.metering.switches.ai_generation_enabled = false;
        let ts = TestServer::start(config).await;
        set_plan(ts.server.store(), "user_pro", "pro").await;
        for sub in ["user_free", "user_pro"] {
            let l = expect_refused(&ts.url(), sub).await;
            assert_eq!(l.limit, "generation_disabled", "{sub}: {l:?}");
        }
        stop(ts).await;

        let mut config = metered_config(600);
        config.metering.switches.free_tier_enabled = false;
        let ts = TestServer::start(config).await;
        set_plan(ts.server.store(), "user_pro", "pro").await;
        let l = expect_refused(&ts.url(), "user_free").await;
        assert_eq!(l.limit, "generation_disabled", "{l:?}");
        assert!(
            l.upgrade_hint.is_some(),
            "free users are told to upgrade: {l:?}"
        );
        let (mut c, ready) = ready_as(&ts.url(), "user_pro").await;
        assert_eq!(ready.plan.name, "pro");
        send_text(&mut c, "hello").await;
        expect_audio_start(&mut c, "a paying user's turn while the free tier is off").await;
        stop(ts).await;
    })
    .await;
}

#[tokio::test]
async fn daily_spend_cap_denies_turns_and_keeps_the_session_open() {
    bounded(async {
        let mut config = metered_config(600);
        config.metering.switches.max_daily_spend_micros = Some(1_000_000); // USD 1
        let ts = TestServer::start(config).await;
        let store = ts.server.store().clone();
        let (mut c, _) = ready_as(&ts.url(), USER).await;
        send_text(&mut c, "hello").await;
        expect_audio_start(&mut c, "a turn under the spending cap").await;

        // Another user's provider calls bring today's recorded cost to the cap.
        let other = store.ensure_user("user_expensive").await.unwrap();
        let cost = UsageDelta {
            cost_micro_usd: 1_000_000,
            ..Default::default()
        };
        store.add_usage(other.id, today(), cost).await.unwrap();
        let seeded = c.events().len();
        // The session learns the day's spend with its heartbeats' totals.
        talk_until(
            &mut c,
            Duration::from_secs(2 * HEARTBEAT_SECS) + SLACK,
            |_| false,
        )
        .await;
        let asked = c.events().len();
        send_text(&mut c, "are you still there?").await;
        let denied = talk_until(&mut c, WAIT, |e| e.error_code().is_some()).await;
        let tl = timeline(c.events());
        let Some(Event {
            kind: EventKind::Json(ServerMessage::Error(err)),
            ..
        }) = denied
        else {
            panic!("the turn over the spending cap was not denied:\n{tl}");
        };
        assert_eq!(err.code, ErrorCode::LimitExceeded, "{tl}");
        assert!(!err.fatal, "{tl}");
        let spend = expect_limit_since(&mut c, seeded, "daily_spend").await;
        assert_eq!(spend.allowed, 100, "in US cents: {spend:?}");
        still_alive(&mut c).await;
        assert!(
            !c.events()[asked..]
                .iter()
                .any(|e| matches!(e.json(), Some(ServerMessage::AssistantAudioStart(_)))),
            "a denied turn spoke:\n{}",
            timeline(c.events())
        );
        // New sessions are refused while the cap holds.
        let l = expect_refused(&ts.url(), "user_new").await;
        assert_eq!((l.limit.as_str(), l.allowed), ("daily_spend", 100), "{l:?}");
        stop(ts).await;
    })
    .await;
}

#[tokio::test]
async fn switches_file_turns_generation_off_without_a_restart() {
    bounded(async {
        let dir = std::env::temp_dir().join(format!(
            "duplex-metering-switches-{}-{}",
            std::process::id(),
            OffsetDateTime::now_utc().unix_timestamp_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("switches.env");
        let mut config = metered_config(600);
        config.metering.switches_file = Some(file.clone());
        let ts = TestServer::start(config).await;
        // pro: 30 turns a minute, so the probes below stay clear of the turn rate limit.
        set_plan(ts.server.store(), USER, "pro").await;
        let (mut c, _) = ready_as(&ts.url(), USER).await;
        send_text(&mut c, "hello").await;
        expect_audio_start(&mut c, "a turn before the switch").await;

        std::fs::write(&file, "# incident 42\nAI_GENERATION_ENABLED=false\n").unwrap();
        let written = Instant::now();
        let from = c.events().len();
        // The file is re-read every 5 s: a probe a second until a turn is denied.
        let within = Duration::from_secs(7);
        let denied = loop {
            send_text(&mut c, "still on?").await;
            if let Some(e) =
                talk_until(&mut c, Duration::from_secs(1), |e| e.error_code().is_some()).await
            {
                break e;
            }
            assert!(
                written.elapsed() < within,
                "turns still allowed {within:?} after the switches file said \
                 AI_GENERATION_ENABLED=false:\n{}",
                timeline(c.events())
            );
        };
        let tl = timeline(c.events());
        assert_eq!(
            denied.error_code(),
            Some(ErrorCode::GenerationDisabled),
            "{tl}"
        );
        expect_limit_since(&mut c, from, "generation_disabled").await;
        // The session stays open, and new sessions are refused.
        still_alive(&mut c).await;
        let l = expect_refused(&ts.url(), "user_other").await;
        assert_eq!(l.limit, "generation_disabled", "{l:?}");
        stop(ts).await;
        let _ = std::fs::remove_dir_all(dir);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// What the client is told
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn session_ready_carries_the_plan_and_a_plan_change_shows_on_the_next_connection() {
    bounded(async {
        let ts = TestServer::start(metered_config(600)).await;
        let store = ts.server.store().clone();
        let (mut c, ready) = ready_as(&ts.url(), USER).await;
        assert_eq!(ready.plan.name, "free");
        let l = &ready.plan.limits;
        assert_eq!(
            (
                l.daily_seconds,
                l.monthly_tts_characters,
                l.turns_per_minute
            ),
            (Some(600), Some(5000), Some(5))
        );
        let u = c
            .wait_for(
                |e| matches!(e.json(), Some(ServerMessage::UsageUpdate(_))),
                WAIT,
            )
            .await
            .expect("a usage_update at start");
        assert!(matches!(u.json(), Some(ServerMessage::UsageUpdate(u)) if u.plan == "free"));
        let _ = c.close().await;

        let user = store
            .user_by_external_id(USER)
            .await
            .unwrap()
            .expect("the session created the user");
        assert_eq!(user.plan, "free");
        set_plan(&store, USER, "pro").await;
        let (mut c, ready) = ready_as(&ts.url(), USER).await;
        assert_eq!(ready.plan.name, "pro");
        let l = &ready.plan.limits;
        assert_eq!(
            (
                l.daily_seconds,
                l.monthly_tts_characters,
                l.turns_per_minute
            ),
            (Some(7200), Some(50000), Some(30))
        );
        let u = c
            .wait_for(
                |e| matches!(e.json(), Some(ServerMessage::UsageUpdate(_))),
                WAIT,
            )
            .await
            .expect("a usage_update at start");
        let Some(ServerMessage::UsageUpdate(u)) = u.json() else {
            unreachable!()
        };
        assert_eq!(u.plan, "pro");
        assert!(u.seconds_remaining.is_some_and(|s| s <= 7200), "{u:?}");
        stop(ts).await;

        // Anonymous dev mode: ANONYMOUS_PLAN, `unmetered` by default.
        let ts = TestServer::start(test_config()).await;
        let mut c = Client::connect(&ts.url(), Some(super::start(16000)))
            .await
            .unwrap();
        let ready = c.wait_ready(WAIT).await.expect("session.ready");
        assert_eq!(ready.plan.name, "unmetered");
        let l = &ready.plan.limits;
        assert_eq!(
            (
                l.daily_seconds,
                l.monthly_tts_characters,
                l.turns_per_minute
            ),
            (None, None, None)
        );
        stop(ts).await;
    })
    .await;
}

#[tokio::test]
async fn a_usage_update_follows_each_turn() {
    bounded(async {
        let mut config = metered_config(600);
        // No heartbeat within the test: every usage_update after the first is a turn's.
        config.metering.usage_heartbeat = Duration::from_secs(600);
        let ts = TestServer::start(config).await;
        let (mut c, _) = ready_as(&ts.url(), USER).await;
        c.wait_for(
            |e| matches!(e.json(), Some(ServerMessage::UsageUpdate(_))),
            WAIT,
        )
        .await
        .expect("a usage_update at start");
        for turn in 1..=2 {
            let from = c.events().len();
            send_text(&mut c, "hello").await;
            let ended = c
                .wait_for(
                    |e| matches!(e.json(), Some(ServerMessage::AssistantAudioEnd(_))),
                    Duration::from_secs(20),
                )
                .await;
            if let Err(e) = ended {
                panic!("turn {turn} did not end: {e}\n{}", timeline(c.events()));
            }
            if usage_updates(&c.events()[from..]).is_empty() {
                let update = c
                    .wait_for(
                        |e| matches!(e.json(), Some(ServerMessage::UsageUpdate(_))),
                        Duration::from_secs(5),
                    )
                    .await;
                if let Err(e) = update {
                    panic!(
                        "no usage_update after turn {turn} ended: {e}\n{}",
                        timeline(c.events())
                    );
                }
            }
        }
        stop(ts).await;
    })
    .await;
}

#[tokio::test]
async fn the_turn_rate_limit_holds_across_a_users_sessions() {
    bounded(async {
        let mut config = metered_config(600);
        config.metering.plans = PlanTable::parse("free:turns_per_minute=2", Some(600), None)
            .expect("valid plan limits");
        let ts = TestServer::start(config).await;
        let (mut a, _) = ready_as(&ts.url(), USER).await;
        let (mut b, _) = ready_as(&ts.url(), USER).await;
        // Two turns, one in each session: both within the plan's 2 a minute.
        for c in [&mut a, &mut b] {
            send_text(c, "hello").await;
            expect_audio_start(c, "an allowed turn").await;
        }
        // A third turn of the same user, in either session, is refused.
        let from = a.events().len();
        send_text(&mut a, "and again").await;
        let err = a
            .wait_for(|e| e.error_code().is_some(), WAIT)
            .await
            .unwrap_or_else(|e| {
                panic!("no error for the third turn: {e}\n{}", timeline(a.events()))
            });
        assert_eq!(err.error_code(), Some(ErrorCode::RateLimited), "{err:?}");
        let limit = expect_limit_since(&mut a, from, "turns_per_minute").await;
        assert_eq!((limit.used, limit.allowed), (2, 2), "{limit:?}");
        assert!(limit.resets_at.is_some(), "{limit:?}");
        // The session stays open; another user is not affected.
        still_alive(&mut a).await;
        let (mut other, _) = ready_as(&ts.url(), "another_user").await;
        send_text(&mut other, "hi").await;
        expect_audio_start(&mut other, "another user's turn").await;
        stop(ts).await;
    })
    .await;
}
