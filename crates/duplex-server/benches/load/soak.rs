//! The `soak` scenario: many sessions with churn for a long time against one server process,
//! checking that nothing accumulates and no usage is lost.
//!
//! `BENCH_SCENARIOS=soak BENCH_SOAK_SESSIONS=500 BENCH_SOAK_SECS=1800 cargo bench -p
//! duplex-server --bench load`. The server runs the scripted providers; the churn driver
//! (`load/churn.rs`) keeps `BENCH_SOAK_SESSIONS` sessions open, each living 20-90 s of spoken
//! turns with pauses, 30 % of turns barging in, 30 % of sessions ending with a TCP close
//! without a close frame and the rest with a clean close, each replaced by a new connection.
//!
//! Every `BENCH_SOAK_REPORT_SECS` (60) it prints the server's RSS, `duplex_runtime_alive_tasks`,
//! `duplex_active_sessions`, the sessions completed, the server's CPU and the machine's load.
//! At the end it stops the clients, waits for the active-session gauge to reach 0 and for the
//! task gauge to come back to the baseline measured before the first session, stops the server
//! with SIGTERM, opens its SQLite store and compares the conversation seconds stored with the
//! seconds the clients held their sessions. It prints PASS or FAIL for three checks:
//! - RSS flat after warm-up: RSS at the end of the load within [`RSS_DRIFT_TOLERANCE`] of RSS
//!   at the end of the warm-up (`BENCH_SOAK_WARMUP_SECS`, default 300, at most a third of the
//!   run); the least-squares slope after warm-up is printed too;
//! - tasks back to baseline, within [`TASK_TOLERANCE`];
//! - zero lost usage: |stored - held| at most one heartbeat (`USAGE_HEARTBEAT_SECS`) per
//!   session. Each session's stored time is rounded up to a whole second once, so stored is
//!   normally a little above held (about +0.5 s a session).
//!
//! A fourth line counts, from the server's log, the usage the server lost ("USAGE LOST": what
//! its usage backlog could not write) and the final writes sessions handed to that backlog
//! because the store did not acknowledge them in time: the aggregate check above can pass
//! while single sessions lost more than a heartbeat.

use std::sync::Arc;
use std::time::{Duration, Instant};

use duplex_replay::Wav;
use tokio_util::sync::CancellationToken;

use crate::churn::{self, ChurnConfig, ChurnStats};
use crate::{ServerProcess, clock_ticks_per_sec, cpu_ticks, http_get, parse_prometheus, rss_kib};

/// Tasks the idle server may have beyond its baseline when the run is over: the connection
/// task of the `/metrics` scrape itself is in both figures, so this only absorbs a keep-alive
/// connection or a store timer task that happens to be alive at one of the two scrapes.
pub const TASK_TOLERANCE: i64 = 3;
/// RSS at the end of the load may exceed RSS at the end of the warm-up by this fraction: the
/// allocator keeps freed pages and the number of open sessions varies by a few percent.
pub const RSS_DRIFT_TOLERANCE: f64 = 0.10;
/// The server's usage heartbeat in this scenario (the default of `USAGE_HEARTBEAT_SECS`).
const HEARTBEAT_SECS: u64 = 5;
/// RSS and gauges are sampled this often (printed every report interval).
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Bounds of the wind-down: open sessions close within the client's close timeout (2 s) and
/// the server's final usage writes within seconds.
const WIND_DOWN: Duration = Duration::from_secs(60);

pub struct SoakSettings {
    sessions: usize,
    secs: u64,
    report_secs: u64,
    warmup_secs: u64,
}

impl SoakSettings {
    pub fn from_env() -> SoakSettings {
        let num = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.trim().is_empty())
                .map_or(default, |v| {
                    v.trim()
                        .parse()
                        .unwrap_or_else(|_| panic!("{name}: expected a whole number, got {v:?}"))
                })
        };
        let secs = num("BENCH_SOAK_SECS", 1800).max(10);
        SoakSettings {
            sessions: num("BENCH_SOAK_SESSIONS", 500) as usize,
            secs,
            report_secs: num("BENCH_SOAK_REPORT_SECS", 60).max(1),
            warmup_secs: num("BENCH_SOAK_WARMUP_SECS", 300).min(secs / 3),
        }
    }
}

/// The session plan of the soak (the CI test uses the same driver with shorter lives).
fn churn_config(url: String, sessions: usize, speech: &Wav) -> ChurnConfig {
    ChurnConfig {
        url,
        sessions,
        // 20 ms a session: 500 sessions connect over 10 s.
        ramp: Duration::from_millis(20 * sessions as u64),
        speech: Arc::new(
            speech
                .samples
                .iter()
                .flat_map(|s| s.to_le_bytes())
                .collect(),
        ),
        life: (Duration::from_secs(20), Duration::from_secs(90)),
        pause: (Duration::from_millis(500), Duration::from_secs(4)),
        barge_in: 0.3,
        barge_after: (Duration::from_millis(300), Duration::from_millis(1500)),
        abrupt: 0.3,
        reply_timeout: Duration::from_secs(20),
        seed: 0x5EED_50A4,
    }
}

struct Sample {
    at: f64,
    rss_kib: u64,
    tasks: i64,
    active: i64,
}

async fn scrape(addr: std::net::SocketAddr) -> Option<(i64, i64)> {
    match http_get(addr, "/metrics").await {
        Ok((200, body)) => {
            let m = parse_prometheus(&body);
            Some((
                m.value("duplex_runtime_alive_tasks", &[]) as i64,
                m.value("duplex_active_sessions", &[]) as i64,
            ))
        }
        _ => None,
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Least-squares slope of `(x, y)` in y per x.
fn slope(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 2 {
        return None;
    }
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

pub async fn run(settings: &SoakSettings, speech: &Wav) {
    let wall = Instant::now();
    let mut server = ServerProcess::start("soak", "scripted").await;
    tokio::time::sleep(crate::SETTLE).await;
    let pid = server.pid();
    let addr = server.addr;
    let day0 = time::OffsetDateTime::now_utc().date();
    // The idle task count: a few scrapes, the smallest (a scrape may overlap the previous
    // scrape's connection winding down).
    let mut tasks_baseline = i64::MAX;
    for _ in 0..5 {
        if let Some((t, _)) = scrape(addr).await {
            tasks_baseline = tasks_baseline.min(t);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rss_baseline = rss_kib(&pid).unwrap_or(0);
    println!(
        "\n=== scenario soak (--providers scripted): {} sessions for {} s, warm-up {} s, heartbeat {} s ===",
        settings.sessions, settings.secs, settings.warmup_secs, HEARTBEAT_SECS
    );
    println!(
        "  baseline: RSS {}, duplex_runtime_alive_tasks {tasks_baseline}, load {}",
        mib(rss_baseline),
        loadavg()
    );

    let stats = Arc::new(ChurnStats::default());
    let stop = CancellationToken::new();
    let url = format!("ws://{addr}/v1/conversation");
    let cfg = churn_config(url, settings.sessions, speech);
    let driver = tokio::spawn(churn::run(cfg, Arc::clone(&stats), stop.clone()));

    let ticks = clock_ticks_per_sec();
    let t0 = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let mut next_report = Duration::from_secs(settings.report_secs);
    let mut cpu_prev = (cpu_ticks(&pid).unwrap_or(0), Instant::now());
    println!(
        "  {:>6} {:>11} {:>7} {:>7} {:>7} {:>10} {:>8} {:>16}",
        "t (s)", "RSS", "tasks", "active", "client", "completed", "srv CPU", "load 1/5/15"
    );
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.tick().await;
    loop {
        tick.tick().await;
        let at = t0.elapsed();
        let (tasks, active) = scrape(addr).await.unwrap_or((-1, -1));
        let rss = rss_kib(&pid).unwrap_or(0);
        samples.push(Sample {
            at: at.as_secs_f64(),
            rss_kib: rss,
            tasks,
            active,
        });
        if at >= next_report || at.as_secs() >= settings.secs {
            next_report += Duration::from_secs(settings.report_secs);
            let cpu = cpu_ticks(&pid).unwrap_or(0);
            let cpu_pct = (cpu.saturating_sub(cpu_prev.0)) as f64
                / ticks
                / cpu_prev.1.elapsed().as_secs_f64()
                * 100.0;
            cpu_prev = (cpu, Instant::now());
            println!(
                "  {:>6} {:>11} {:>7} {:>7} {:>7} {:>10} {:>7.0}% {:>16}",
                at.as_secs(),
                mib(rss),
                tasks,
                active,
                ChurnStats::get(&stats.open),
                ChurnStats::get(&stats.completed),
                cpu_pct,
                loadavg()
            );
        }
        if at.as_secs() >= settings.secs {
            break;
        }
    }
    let rss_end_of_load = rss_kib(&pid).unwrap_or(0);
    println!("  clients: {}", stats.line());

    // Wind down: clients close cleanly, then the server's sessions and tasks must be gone.
    stop.cancel();
    let down = Instant::now();
    match tokio::time::timeout(WIND_DOWN, driver).await {
        Ok(r) => r.expect("the churn driver does not panic"),
        Err(_) => println!(
            "  the clients did not finish within {} s",
            WIND_DOWN.as_secs()
        ),
    }
    let clients_done = down.elapsed();
    let mut last = (i64::MAX, i64::MAX);
    while down.elapsed() < WIND_DOWN {
        if let Some(s) = scrape(addr).await {
            last = s;
            if s.1 == 0 && s.0 <= tasks_baseline + TASK_TOLERANCE {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (tasks_after, active_after) = last;
    let rss_after = rss_kib(&pid).unwrap_or(0);
    println!(
        "  wind-down: clients closed in {:.1} s; active sessions {active_after}, tasks {tasks_after} after {:.1} s",
        clients_done.as_secs_f64(),
        down.elapsed().as_secs_f64()
    );
    let metrics = match http_get(addr, "/metrics").await {
        Ok((200, body)) => Some(parse_prometheus(&body)),
        _ => None,
    };

    let exit = server.terminate(Duration::from_secs(30));
    println!("  server stopped by SIGTERM: {exit}");
    let store_ms = stored_conversation_ms(&server.data_dir, day0).await;
    let store_secs = store_ms as f64 / 1000.0;
    let held_secs = stats.held_secs();
    let sessions = ChurnStats::get(&stats.completed);
    let slack = (sessions * HEARTBEAT_SECS) as f64;
    let diff = store_secs - held_secs;

    let warm = samples
        .iter()
        .find(|s| s.at >= settings.warmup_secs as f64)
        .map_or(rss_baseline, |s| s.rss_kib);
    let after_warmup: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.at >= settings.warmup_secs as f64 && s.rss_kib > 0)
        .map(|s| (s.at / 3600.0, s.rss_kib as f64 / 1024.0))
        .collect();
    let drift_kib = rss_end_of_load as i64 - warm as i64;
    let rss_peak = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let active_mean = {
        let a: Vec<i64> = samples
            .iter()
            .map(|s| s.active)
            .filter(|a| *a >= 0)
            .collect();
        a.iter().sum::<i64>() as f64 / a.len().max(1) as f64
    };

    let row = |k: &str, v: String| println!("  {k:<60} {v:>18}");
    println!();
    row(
        "sessions completed (session.ready, then ended)",
        sessions.to_string(),
    );
    row(
        "  clean closes / abrupt TCP closes / closed by server",
        format!(
            "{} / {} / {}",
            ChurnStats::get(&stats.clean_closes),
            ChurnStats::get(&stats.abrupt_closes),
            ChurnStats::get(&stats.server_closes)
        ),
    );
    row(
        "  server close codes",
        ChurnStats::map_line(&stats.server_close_codes),
    );
    row(
        "connects / failed / no session.ready",
        format!(
            "{} / {} / {}",
            ChurnStats::get(&stats.connects),
            ChurnStats::get(&stats.connect_failed),
            ChurnStats::get(&stats.not_ready)
        ),
    );
    row(
        "turns spoken / replies complete / timed out",
        format!(
            "{} / {} / {}",
            ChurnStats::get(&stats.turns_spoken),
            ChurnStats::get(&stats.replies_complete),
            ChurnStats::get(&stats.replies_timed_out)
        ),
    );
    row(
        "barge-ins (client) / interrupted (server)",
        format!(
            "{} / {}",
            ChurnStats::get(&stats.barge_ins),
            ChurnStats::get(&stats.interrupted)
        ),
    );
    row(
        "errors received by code",
        ChurnStats::map_line(&stats.error_codes),
    );
    if let Some(m) = &metrics {
        row(
            "server: sessions accepted (duplex_sessions_total)",
            format!("{:.0}", m.value("duplex_sessions_total", &[])),
        );
        row(
            "server: errors{code=slow_consumer}",
            format!(
                "{:.0}",
                m.value("duplex_errors_total", &[("code", "slow_consumer")])
            ),
        );
        row(
            "server: turns / interruptions",
            format!(
                "{:.0} / {:.0}",
                m.value("duplex_turns_total", &[]),
                m.value("duplex_interruptions_total", &[])
            ),
        );
    }
    row(
        "active sessions (server gauge, mean of samples)",
        format!("{active_mean:.0}"),
    );
    row(
        "duplex_runtime_alive_tasks peak during the load",
        samples
            .iter()
            .map(|s| s.tasks)
            .max()
            .unwrap_or(-1)
            .to_string(),
    );
    row(
        "RSS baseline / warm-up / end of load / after / peak",
        format!(
            "{} / {} / {} / {} / {}",
            mib(rss_baseline),
            mib(warm),
            mib(rss_end_of_load),
            mib(rss_after),
            mib(rss_peak)
        ),
    );
    row(
        "RSS drift after warm-up (end of load - warm-up)",
        format!(
            "{:+.1} MiB ({:+.1} %)",
            drift_kib as f64 / 1024.0,
            drift_kib as f64 / warm.max(1) as f64 * 100.0
        ),
    );
    row(
        "RSS slope after warm-up (least squares)",
        slope(&after_warmup).map_or("-".into(), |s| format!("{s:+.1} MiB/h")),
    );
    row(
        "stored conversation seconds (SQLite usage_daily)",
        format!("{store_secs:.1}"),
    );
    row(
        "seconds the clients held (session.ready -> close)",
        format!("{held_secs:.1}"),
    );
    row(
        "stored - held",
        format!(
            "{diff:+.1} s ({:+.3} s/session)",
            diff / sessions.max(1) as f64
        ),
    );
    row(
        "allowed slack (one heartbeat per session)",
        format!("{slack:.0} s"),
    );
    row(
        "wall time",
        format!("{:.0} s", wall.elapsed().as_secs_f64()),
    );
    println!();
    let verdict = |ok: bool| if ok { "PASS" } else { "FAIL" };
    let rss_ok = (drift_kib as f64) <= warm as f64 * RSS_DRIFT_TOLERANCE;
    let tasks_ok = active_after == 0 && tasks_after <= tasks_baseline + TASK_TOLERANCE;
    let usage_ok = diff.abs() <= slack && sessions > 0;
    println!(
        "  {} RSS flat after warm-up: drift {:+.1} MiB, tolerance {:.0} % of {}",
        verdict(rss_ok),
        drift_kib as f64 / 1024.0,
        RSS_DRIFT_TOLERANCE * 100.0,
        mib(warm)
    );
    println!(
        "  {} tasks back to baseline: {tasks_after} after, baseline {tasks_baseline}, tolerance {TASK_TOLERANCE}; active sessions {active_after}",
        verdict(tasks_ok)
    );
    println!(
        "  {} zero lost usage: stored {store_secs:.1} s vs held {held_secs:.1} s, |diff| {:.1} s <= {slack:.0} s",
        verdict(usage_ok),
        diff.abs()
    );
    let lost = log_lines_seconds(&server.log_path, "USAGE LOST");
    let handed = log_lines_seconds(&server.log_path, "handing it to the server's backlog");
    println!(
        "  {} no usage lost: {} writes lost (server log), holding {} s, at most {} s in one; \
         {} sessions handed {} s of final usage to the backlog (at most {} s in one)",
        verdict(lost.0 == 0),
        lost.0,
        lost.1,
        lost.2,
        handed.0,
        handed.1,
        handed.2
    );
    crate::print_log_summary(&server.log_path);
}

/// Server log lines (JSON) that contain `needle`: how many, the sum of their `seconds` field,
/// and the largest.
fn log_lines_seconds(log: &std::path::Path, needle: &str) -> (u64, u64, u64) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut out = (0, 0, 0);
    for line in text.lines().filter(|l| l.contains(needle)) {
        out.0 += 1;
        let secs = line
            .split_once("\"seconds\":")
            .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        out.1 += secs;
        out.2 = out.2.max(secs);
    }
    out
}

/// Conversation milliseconds of every user from `day0` to today in the server's SQLite store.
async fn stored_conversation_ms(data_dir: &std::path::Path, day0: time::Date) -> i64 {
    let url = duplex_store::sqlite_url_in(data_dir);
    let store = duplex_store::Store::open(&url)
        .await
        .unwrap_or_else(|e| panic!("the soak's store {url} opens: {e}"));
    let today = time::OffsetDateTime::now_utc().date();
    let rows = store
        .usage_between(day0, today)
        .await
        .expect("the store answers");
    store.close().await;
    rows.iter().map(|r| r.usage.conversation_ms).sum()
}
