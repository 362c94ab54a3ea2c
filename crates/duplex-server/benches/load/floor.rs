//! The `floor` scenario: duplex in echo mode against a bare tokio-tungstenite echo server (the
//! transport floor, [`super::bare_echo`]), driven by the same load generator at several call
//! counts, and the ratios between them.
//!
//! Every point (server, calls) gets a fresh server process. Points run level by level with the
//! servers interleaved (bare 250, duplex 250, bare 500, ...), so a noisy neighbour hurts both
//! sides of a ratio alike. Each call streams G.711 mu-law at 8 kHz, 50 frames a second (the
//! telephony case, where every frame goes through decode, the 8 -> 16 kHz resampler, VAD and
//! endpointing in duplex).
//!
//! Per point: round-trip percentiles over every echoed frame, throughput (frames echoed / sent,
//! and sent / what the schedule asked for, which shows when the load generator itself fell
//! behind), server CPU time per echoed frame (`/proc/<pid>/stat` utime+stime over the run),
//! RSS per call (peak minus the idle baseline), and how busy the rest of the machine was
//! (`/proc/stat` busy time minus the server's and this process's).

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use duplex_proto::Encoding;
use duplex_replay::{LoadConfig, LoadReport, Mode, Wav, percentile, run_load};

use super::bare_echo;
use super::{SETTLE, ServerProcess, clock_ticks_per_sec, cpu_ticks, rss_kib};

/// Telephony: 8 kHz mu-law, the format of the measurements.
const RATE: u32 = 8_000;
/// How often RSS is sampled during a point (the only thing read while the load runs: no
/// `/metrics` scrapes, which would cost duplex CPU the bare server does not pay).
const RSS_EVERY: Duration = Duration::from_millis(250);
/// A late echo still counts as echoed if it arrives this long after the last frame was sent;
/// past it the frame counts as lost.
const DRAIN: Duration = Duration::from_secs(5);
/// Beyond ramp + hold + drain, how long a point may take before it is abandoned.
const POINT_SLACK: Duration = Duration::from_secs(60);
/// Ramp-up per call when `BENCH_FLOOR_RAMP_MS` is not set: 2,000 calls connect over 3 s, a
/// handshake rate both servers sustain without queueing connects behind the audio.
const RAMP_PER_CALL: Duration = Duration::from_micros(1500);
const MIN_RAMP: Duration = Duration::from_millis(200);
/// Below this share of the scheduled frames sent, a point is flagged: the load generator
/// itself was starved of CPU, so the server saw less load than the level says.
const MIN_SENT_PCT: f64 = 95.0;
/// How long a bare echo server may take to print its port.
const BARE_START: Duration = Duration::from_secs(10);

/// Which servers a floor run compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FloorServer {
    /// The bare echo; `Some(bytes)` sets tungstenite's read buffer, `None` keeps its default.
    Bare(Option<usize>),
    /// `duplex --providers echo`; `Some(path)` runs another build of the binary (a copy of
    /// the one before a change), so that before and after share one run and its noise.
    Duplex(Option<PathBuf>),
}

impl FloorServer {
    fn parse(s: &str) -> FloorServer {
        match s.trim() {
            "duplex" => FloorServer::Duplex(None),
            "bare" => FloorServer::Bare(None),
            other => {
                if let Some(path) = other.strip_prefix("duplex=") {
                    return FloorServer::Duplex(Some(PathBuf::from(path)));
                }
                match other.strip_prefix("bare@").map(str::parse) {
                    Some(Ok(bytes)) => FloorServer::Bare(Some(bytes)),
                    _ => panic!(
                        "BENCH_FLOOR_SERVERS: unknown server {other:?} \
                         (duplex, duplex=PATH, bare, bare@BYTES)"
                    ),
                }
            }
        }
    }

    fn name(&self) -> String {
        match self {
            FloorServer::Duplex(None) => "duplex".into(),
            FloorServer::Duplex(Some(path)) => format!(
                "duplex={}",
                path.file_name().map_or("?".into(), |f| f.to_string_lossy())
            ),
            FloorServer::Bare(None) => "bare".into(),
            FloorServer::Bare(Some(n)) => format!("bare@{n}"),
        }
    }
}

/// `BENCH_FLOOR_*` settings.
pub struct FloorSettings {
    pub levels: Vec<usize>,
    pub hold: Duration,
    pub ramp: Option<Duration>,
    pub servers: Vec<FloorServer>,
    /// `BENCH_FLOOR_ROUNDS`: how many times each level runs, the servers' order rotating from
    /// one round to the next; ratios pair points of the same round, and a summary gives each
    /// ratio's median and spread over the rounds (the tail at 1,000 calls on two shared cores
    /// moves a lot from one run to the next, so one round proves little).
    pub rounds: usize,
    /// `BENCH_FLOOR_TIMELINE_MS`: print each point's round trips over time in windows of
    /// this length (by send time), to see whether the tail is spread or comes in bursts.
    pub timeline: Option<Duration>,
}

impl FloorSettings {
    /// `quick`: the CI version (20 calls, 2 s per point), overridable by the same variables.
    pub fn from_env(quick: bool) -> FloorSettings {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let num = |name: &str, v: String| -> u64 {
            v.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{name}: expected a whole number, got {v:?}"))
        };
        let levels = var("BENCH_FLOOR_LEVELS")
            .unwrap_or_else(|| if quick { "20" } else { "250,500,1000,2000" }.into())
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| num("BENCH_FLOOR_LEVELS", s.into()) as usize)
            .collect();
        let hold = var("BENCH_FLOOR_SECONDS")
            .map_or(if quick { 2 } else { 8 }, |v| num("BENCH_FLOOR_SECONDS", v));
        FloorSettings {
            levels,
            hold: Duration::from_secs(hold),
            ramp: var("BENCH_FLOOR_RAMP_MS")
                .map(|v| Duration::from_millis(num("BENCH_FLOOR_RAMP_MS", v))),
            servers: var("BENCH_FLOOR_SERVERS")
                .unwrap_or_else(|| "bare,duplex".into())
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(FloorServer::parse)
                .collect(),
            rounds: var("BENCH_FLOOR_ROUNDS")
                .map_or(1, |v| num("BENCH_FLOOR_ROUNDS", v).max(1) as usize),
            timeline: var("BENCH_FLOOR_TIMELINE_MS")
                .map(|v| Duration::from_millis(num("BENCH_FLOOR_TIMELINE_MS", v).max(1))),
        }
    }

    fn ramp(&self, calls: usize) -> Duration {
        self.ramp
            .unwrap_or_else(|| (RAMP_PER_CALL * calls as u32).max(MIN_RAMP))
    }
}

/// The figures of one (server, calls) point.
struct Point {
    server: String,
    calls: usize,
    round: usize,
    ok: usize,
    ramp: Duration,
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
    /// Frames the schedule asked for (every call at 50 frames/s from its start to the end).
    scheduled: f64,
    sent: u64,
    received: u64,
    /// Server CPU seconds over the load run.
    server_cpu_s: f64,
    client_cpu_s: f64,
    /// Busy CPU of everything else on the machine.
    other_cpu_s: f64,
    run_s: f64,
    rss_baseline_kib: u64,
    rss_peak_kib: u64,
    errors: String,
    /// Per window of send time since the load started: (window start s, frames, p50, p99,
    /// max), when `BENCH_FLOOR_TIMELINE_MS` is set.
    timeline: Vec<(f64, usize, f64, f64, f64)>,
}

impl Point {
    fn echoed_pct(&self) -> f64 {
        self.received as f64 / self.sent.max(1) as f64 * 100.0
    }
    fn sent_pct(&self) -> f64 {
        self.sent as f64 / self.scheduled.max(1.0) * 100.0
    }
    fn cpu_us_per_frame(&self) -> f64 {
        self.server_cpu_s / self.received.max(1) as f64 * 1e6
    }
    fn rss_kib_per_call(&self) -> f64 {
        self.rss_peak_kib.saturating_sub(self.rss_baseline_kib) as f64 / self.ok.max(1) as f64
    }
}

/// Runs every level against every server and prints the table and the ratios.
pub async fn run(settings: &FloorSettings) {
    let speech = super::speech(super::SPEECH_TEXT, RATE);
    println!(
        "\n=== scenario floor: {} vs the bare transport, mu-law {} Hz, 50 frames/s per call, \
         {} s held per point ===",
        settings
            .servers
            .iter()
            .map(FloorServer::name)
            .collect::<Vec<_>>()
            .join(", "),
        RATE,
        settings.hold.as_secs()
    );
    let mut points = Vec::new();
    let n = settings.servers.len();
    for (&calls, round) in settings
        .levels
        .iter()
        .flat_map(|c| std::iter::repeat(c).zip(0..settings.rounds))
    {
        // Round r starts with the r-th server, so no server always runs first or last.
        for i in 0..n {
            let server = &settings.servers[(i + round) % n];
            let mut point = run_point(server, calls, settings, &speech).await;
            point.round = round;
            println!(
                "  {:<20} {:>5} calls: p50 {:>7.1} ms  p99 {:>7.1} ms  echoed {:>5.1} %  \
                 {:>5.1} us CPU/frame  (machine: other {:.0} % of a core)",
                point.server,
                point.calls,
                point.p50,
                point.p99,
                point.echoed_pct(),
                point.cpu_us_per_frame(),
                point.other_cpu_s / point.run_s * 100.0
            );
            for (start, n, p50, p99, max) in &point.timeline {
                println!(
                    "    t {start:>6.2} s  frames {n:>6}  p50 {p50:>7.1}  p99 {p99:>7.1}  \
                     max {max:>7.1} ms"
                );
            }
            points.push(point);
        }
    }
    print_table(&points);
    print_ratios(&points, &settings.servers);
    if settings.rounds > 1 {
        print_round_summary(&points, &settings.servers);
    }
    if let Some(&calls) = settings.levels.iter().max() {
        println!(
            "\n  idle sessions ({calls} started, no audio, held {} s): RSS per session",
            IDLE_HOLD.as_secs()
        );
        for server in &settings.servers {
            let (ready, kib) = idle_point(server, calls).await;
            println!(
                "  {:<20} {ready:>5} ready  {kib:>6.1} KiB per idle session",
                server.name()
            );
        }
    }
}

/// How long the idle sessions are held before RSS is read (heartbeats included: 5 s).
const IDLE_HOLD: Duration = Duration::from_secs(6);
/// How long an idle session may take to be ready.
const IDLE_READY: Duration = Duration::from_secs(30);

/// `calls` sessions started and left silent: (sessions ready, RSS KiB per session).
async fn idle_point(server: &FloorServer, calls: usize) -> (usize, f64) {
    let process = start_process(server).await;
    tokio::time::sleep(SETTLE).await;
    let pid = process.pid();
    let baseline = rss_kib(&pid).unwrap_or(0);
    let url = format!("ws://{}/v1/conversation", process.addr());
    let start = duplex_proto::SessionStart {
        sample_rate: RATE,
        encoding: Encoding::Mulaw,
        language: None,
        voice: None,
        model: None,
        system_prompt: None,
        output_sample_rate: None,
        output_encoding: None,
    };
    let mut clients = Vec::with_capacity(calls);
    for _ in 0..calls {
        let url = url.clone();
        let start = start.clone();
        clients.push(tokio::spawn(async move {
            let mut c = duplex_replay::Client::connect(&url, Some(start))
                .await
                .ok()?;
            c.set_keep_log(false);
            c.wait_ready(IDLE_READY).await.ok()?;
            Some(c)
        }));
        // The floor's ramp: connects at a rate both servers take without queueing.
        tokio::time::sleep(RAMP_PER_CALL).await;
    }
    let mut ready = Vec::with_capacity(calls);
    for c in clients {
        if let Ok(Some(c)) = c.await {
            ready.push(c);
        }
    }
    tokio::time::sleep(IDLE_HOLD).await;
    let kib =
        rss_kib(&pid).unwrap_or(0).saturating_sub(baseline) as f64 / ready.len().max(1) as f64;
    let n = ready.len();
    for c in ready {
        let _ = tokio::time::timeout(Duration::from_secs(5), c.close()).await;
    }
    drop(process);
    (n, kib)
}

async fn start_process(server: &FloorServer) -> Process {
    match server {
        FloorServer::Duplex(binary) => {
            let binary = binary
                .as_deref()
                .unwrap_or(Path::new(env!("CARGO_BIN_EXE_duplex")));
            Process::Duplex(ServerProcess::start_binary(binary, "floor", "echo").await)
        }
        FloorServer::Bare(read_buffer) => Process::Bare(BareProcess::start(*read_buffer)),
    }
}

async fn run_point(
    server: &FloorServer,
    calls: usize,
    settings: &FloorSettings,
    speech: &Wav,
) -> Point {
    let ramp = settings.ramp(calls);
    let process = start_process(server).await;
    tokio::time::sleep(SETTLE).await;
    let pid = process.pid();
    let rss_baseline_kib = rss_kib(&pid).unwrap_or(0);

    let mut cfg = LoadConfig::new(
        format!("ws://{}/v1/conversation", process.addr()),
        vec![speech.clone()],
    );
    cfg.sessions = calls;
    cfg.ramp_up = ramp;
    cfg.max_duration = Some(ramp + settings.hold);
    cfg.speed = 1.0;
    cfg.keep_sessions = true;
    cfg.mode = Mode::Echo;
    cfg.encoding = Encoding::Mulaw;
    cfg.turns = ((ramp + settings.hold).as_secs_f64() / speech.duration().as_secs_f64()).ceil()
        as usize
        + 2;
    cfg.turn_timeout = DRAIN;
    cfg.validate()
        .expect("the floor load configuration is valid");

    let stop = Arc::new(AtomicBool::new(false));
    let fence = ramp + settings.hold + DRAIN + POINT_SLACK;
    let sampler = tokio::spawn(sample_rss(pid.clone(), Arc::clone(&stop), fence));
    let server0 = cpu_ticks(&pid).unwrap_or(0);
    let client0 = cpu_ticks("self").unwrap_or(0);
    let busy0 = machine_busy_ticks().unwrap_or(0);
    let t0 = Instant::now();
    let t0_ms = t0
        .duration_since(duplex_replay::session::epoch().into_std())
        .as_secs_f64()
        * 1e3;
    let report: LoadReport = tokio::time::timeout(fence, run_load(&cfg))
        .await
        .unwrap_or_else(|_| panic!("floor {calls}: run_load overran its own bounds"));
    let run_s = t0.elapsed().as_secs_f64();
    let ticks = clock_ticks_per_sec();
    let server_cpu = cpu_ticks(&pid).unwrap_or(0).saturating_sub(server0) as f64 / ticks;
    let client_cpu = cpu_ticks("self").unwrap_or(0).saturating_sub(client0) as f64 / ticks;
    let busy = machine_busy_ticks().unwrap_or(0).saturating_sub(busy0) as f64 / ticks;
    stop.store(true, Ordering::Relaxed);
    let rss_peak_kib = sampler
        .await
        .expect("the sampler does not panic")
        .max(rss_kib(&pid).unwrap_or(0));
    drop(process);

    let mut rtts: Vec<f64> = report
        .session_reports
        .iter()
        .flat_map(|s| s.echo_rtt_ms.iter().copied())
        .collect();
    let timeline = settings
        .timeline
        .map(|w| timeline(&report, t0_ms, w))
        .unwrap_or_default();
    rtts.sort_by(f64::total_cmp);
    let q = |p: f64| percentile(&rtts, p).unwrap_or(f64::NAN);
    // Every call sends from its ramp offset to ramp + hold: on average hold + ramp / 2.
    let scheduled = calls as f64 * 50.0 * (settings.hold + ramp / 2).as_secs_f64();
    let errors = if report.errors.is_empty() {
        "none".to_string()
    } else {
        report
            .errors
            .iter()
            .map(|(code, n)| format!("{code}={n}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    Point {
        server: server.name(),
        calls,
        round: 0,
        ok: report.sessions_ok,
        ramp,
        p50: q(50.0),
        p90: q(90.0),
        p99: q(99.0),
        p999: q(99.9),
        max: rtts.last().copied().unwrap_or(f64::NAN),
        scheduled,
        sent: report.frames_sent,
        received: report.frames_received,
        server_cpu_s: server_cpu,
        client_cpu_s: client_cpu,
        other_cpu_s: (busy - server_cpu - client_cpu).max(0.0),
        run_s,
        rss_baseline_kib,
        rss_peak_kib,
        errors,
        timeline,
    }
}

/// Round trips grouped by when their frame was sent, in windows of `window` from `t0_ms`.
fn timeline(report: &LoadReport, t0_ms: f64, window: Duration) -> Vec<(f64, usize, f64, f64, f64)> {
    let w = window.as_secs_f64() * 1e3;
    let mut buckets: Vec<Vec<f64>> = Vec::new();
    for s in &report.session_reports {
        for (rtt, sent) in s.echo_rtt_ms.iter().zip(&s.echo_sent_ms) {
            let i = ((sent - t0_ms).max(0.0) / w) as usize;
            if buckets.len() <= i {
                buckets.resize_with(i + 1, Vec::new);
            }
            buckets[i].push(*rtt);
        }
    }
    buckets
        .into_iter()
        .enumerate()
        .filter(|(_, b)| !b.is_empty())
        .map(|(i, mut b)| {
            b.sort_by(f64::total_cmp);
            let q = |p: f64| percentile(&b, p).unwrap_or(f64::NAN);
            (
                i as f64 * w / 1e3,
                b.len(),
                q(50.0),
                q(99.0),
                b[b.len() - 1],
            )
        })
        .collect()
}

fn print_table(points: &[Point]) {
    println!();
    println!(
        "  {:<20} {:>5} {:>5} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>6} {:>8} {:>8} {:>6} {:>6} {:>6}",
        "server",
        "calls",
        "ok",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "echoed",
        "sent",
        "us/frame",
        "KiB/call",
        "srv %",
        "gen %",
        "oth %",
    );
    for p in points {
        let pct = |s: f64| s / p.run_s * 100.0;
        println!(
            "  {:<20} {:>5} {:>5} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>6.1}% {:>5.1}% {:>8.1} {:>8.0} {:>6.0} {:>6.0} {:>6.0}",
            p.server,
            p.calls,
            p.ok,
            p.p50,
            p.p90,
            p.p99,
            p.p999,
            p.max,
            p.echoed_pct(),
            p.sent_pct(),
            p.cpu_us_per_frame(),
            p.rss_kib_per_call(),
            pct(p.server_cpu_s),
            pct(p.client_cpu_s),
            pct(p.other_cpu_s),
        );
    }
    println!(
        "  (echoed = frames echoed / sent; sent = frames sent / scheduled at 50/s per call; \
         us/frame = server CPU per echoed frame; srv/gen/oth % = server, load generator and \
         everything else, % of one core over the run)"
    );
    for p in points.iter().filter(|p| p.sent_pct() < MIN_SENT_PCT) {
        println!(
            "  {} {} calls: the load generator sent only {:.0} % of the scheduled frames (the \
             machine was saturated): its latencies and CPU per frame are not comparable",
            p.server,
            p.calls,
            p.sent_pct()
        );
    }
    for p in points
        .iter()
        .filter(|p| p.errors != "none" || p.ok < p.calls)
    {
        println!(
            "  {} {} calls: {} of {} calls ok (ramp {} ms); errors: {}",
            p.server,
            p.calls,
            p.ok,
            p.calls,
            p.ramp.as_millis(),
            p.errors
        );
    }
}

/// Every server against the first bare server of the list, and every duplex build against the
/// first duplex one, per level.
fn print_ratios(points: &[Point], servers: &[FloorServer]) {
    let first = |bare: bool| {
        servers
            .iter()
            .find(|s| matches!(s, FloorServer::Bare(_)) == bare)
            .map(FloorServer::name)
    };
    if let Some(floor) = first(true) {
        print_ratios_to(points, &floor, |_| true);
    }
    if let Some(duplex) = first(false) {
        print_ratios_to(points, &duplex, |p| p.server.starts_with("duplex"));
    }
}

fn print_ratios_to(points: &[Point], floor: &str, include: impl Fn(&Point) -> bool) {
    if !points.iter().any(|p| p.server != floor && include(p)) {
        return;
    }
    println!();
    println!(
        "  {:<40} {:>5} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9}",
        "ratio", "calls", "p50", "p90", "p99", "p99.9", "us/frame", "KiB/call"
    );
    for (i, p) in points.iter().enumerate() {
        if p.server == floor || !include(p) {
            continue;
        }
        // The reference point of the same level and round; else the latest one before this
        // one (levels may repeat).
        let Some(b) = points
            .iter()
            .find(|b| b.server == floor && b.calls == p.calls && b.round == p.round)
            .or_else(|| {
                points[..i]
                    .iter()
                    .rev()
                    .find(|b| b.server == floor && b.calls == p.calls)
            })
        else {
            continue;
        };
        let r = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        println!(
            "  {:<40} {:>5} {:>7.2}x {:>7.2}x {:>7.2}x {:>8.2}x {:>8.2}x {:>8.2}x",
            format!("{} / {}", p.server, floor),
            p.calls,
            r(p.p50, b.p50),
            r(p.p90, b.p90),
            r(p.p99, b.p99),
            r(p.p999, b.p999),
            r(p.cpu_us_per_frame(), b.cpu_us_per_frame()),
            r(p.rss_kib_per_call(), b.rss_kib_per_call()),
        );
    }
}

/// Per level and server, each ratio to the first bare server of the same round: median, range,
/// and in how many rounds the goals held (p99 within 1.5x, CPU per frame within 1.3x).
fn print_round_summary(points: &[Point], servers: &[FloorServer]) {
    let Some(floor) = servers
        .iter()
        .find(|s| matches!(s, FloorServer::Bare(_)))
        .map(FloorServer::name)
    else {
        return;
    };
    println!();
    println!(
        "  {:<28} {:>5} {:>6} {:>24} {:>24} {:>10} {:>14}",
        "over rounds, to the floor",
        "calls",
        "rounds",
        "p99 median (min-max)",
        "us/frame median (min-max)",
        "goals met",
        "median p99s"
    );
    let mut levels: Vec<usize> = points.iter().map(|p| p.calls).collect();
    levels.dedup();
    for calls in levels {
        for server in servers
            .iter()
            .map(FloorServer::name)
            .filter(|s| *s != floor)
        {
            let mut p99 = Vec::new();
            let mut cpu = Vec::new();
            let mut met = 0;
            // The two servers' median p99 over the rounds: one lucky or unlucky round of
            // either side moves it less than it moves that round's ratio.
            let mut own = Vec::new();
            let mut floors = Vec::new();
            for p in points
                .iter()
                .filter(|p| p.server == server && p.calls == calls)
            {
                let Some(b) = points
                    .iter()
                    .find(|b| b.server == floor && b.calls == calls && b.round == p.round)
                else {
                    continue;
                };
                let (rp, rc) = (p.p99 / b.p99, p.cpu_us_per_frame() / b.cpu_us_per_frame());
                if rp <= 1.5 && rc <= 1.3 && p.echoed_pct() >= 100.0 && p.sent_pct() >= MIN_SENT_PCT
                {
                    met += 1;
                }
                p99.push(rp);
                cpu.push(rc);
                own.push(p.p99);
                floors.push(b.p99);
            }
            if p99.is_empty() {
                continue;
            }
            let spread = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                let median = percentile(v, 50.0).unwrap_or(f64::NAN);
                format!("{median:.2}x ({:.2}-{:.2})", v[0], v[v.len() - 1])
            };
            let median = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                percentile(v, 50.0).unwrap_or(f64::NAN)
            };
            let (own, floor) = (median(&mut own), median(&mut floors));
            println!(
                "  {:<28} {:>5} {:>6} {:>24} {:>24} {:>7} of {} {:>6.1} / {:.1} ms = {:.2}x",
                server,
                calls,
                p99.len(),
                spread(&mut p99),
                spread(&mut cpu),
                met,
                p99.len(),
                own,
                floor,
                own / floor
            );
        }
    }
}

/// Peak RSS every [`RSS_EVERY`] until `stop`, or at most for `budget`.
async fn sample_rss(pid: String, stop: Arc<AtomicBool>, budget: Duration) -> u64 {
    let max_samples = (budget.as_millis() / RSS_EVERY.as_millis()) as usize + 1;
    let mut peak = 0;
    let mut tick = tokio::time::interval(RSS_EVERY);
    for _ in 0..max_samples {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        tick.tick().await;
        peak = peak.max(rss_kib(&pid).unwrap_or(0));
    }
    peak
}

/// Busy ticks of the whole machine (`/proc/stat` `cpu` line: everything but idle and iowait).
fn machine_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3)? + fields.get(4)?;
    Some(total - idle)
}

// ---------------------------------------------------------------------------------------------
// Server processes
// ---------------------------------------------------------------------------------------------

enum Process {
    Duplex(ServerProcess),
    Bare(BareProcess),
}

impl Process {
    fn pid(&self) -> String {
        match self {
            Process::Duplex(s) => s.pid(),
            Process::Bare(b) => b.child.id().to_string(),
        }
    }
    fn addr(&self) -> SocketAddr {
        match self {
            Process::Duplex(s) => s.addr,
            Process::Bare(b) => b.addr,
        }
    }
}

/// The bare echo server: this bench binary started again in the [`bare_echo`] role. Killed
/// when dropped; it also exits by itself when its stdin (held here) closes.
struct BareProcess {
    child: Child,
    addr: SocketAddr,
}

impl BareProcess {
    fn start(read_buffer: Option<usize>) -> BareProcess {
        let exe = std::env::current_exe().expect("the bench binary knows its path");
        let spec = read_buffer.map_or_else(|| "default".to_string(), |n| n.to_string());
        let mut child = Command::new(exe)
            .env(bare_echo::ROLE_VAR, spec)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the bench binary starts again as the bare echo server");
        let stdout = child.stdout.take().expect("stdout is piped");
        // Read the port on a thread so that a server that never prints cannot hang the bench.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(BARE_START)
            .expect("the bare echo server prints its port");
        let port: u16 = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("the bare echo server printed {line:?}, not a port"));
        BareProcess {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }
}

impl Drop for BareProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
