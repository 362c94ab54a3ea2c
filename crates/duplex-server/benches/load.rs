//! Load benchmark of the real `duplex` binary over loopback. Prints figures, asserts nothing.
//!
//! Run with `cargo bench -p duplex-server --bench load`. Each scenario starts its own server
//! process (so counters, histograms and memory start from zero), drives it with
//! `duplex_replay::run_load` from this process, and prints client-side latencies, the server's
//! own stage histograms (`/metrics`), its memory (`/proc/<pid>/status` VmRSS) and CPU time
//! (`/proc/<pid>/stat`).
//!
//! The `floor` scenario (`load/floor.rs`) compares duplex in echo mode with a bare
//! tokio-tungstenite echo server (`load/bare_echo.rs`, this binary started again as a separate
//! process) at several call counts, mu-law 8 kHz, and prints the ratios duplex / bare.
//!
//! Environment (the defaults take about four minutes on two cores):
//! - `BENCH_SCENARIOS`: comma list of `floor`, `echo`, `conversation`, `bargein`, `soak`
//!   (default `floor,echo,conversation`).
//! - `BENCH_QUICK=1`: the CI version, seconds in all: only `floor` (unless `BENCH_SCENARIOS`
//!   says otherwise) at 20 calls for 2 s.
//! - `BENCH_SESSIONS`: one number for every scenario but `floor`, or
//!   `echo=200,conversation=50,...` (defaults: echo 200, conversation 50, bargein 50).
//! - `BENCH_SECONDS`: how long every session is held once all have started (default 20).
//! - `BENCH_RAMP_MS`: sessions start evenly over this ramp (default 5000).
//! - `BENCH_DUPLEX_BIN`: the server binary of the `echo`, `conversation` and `bargein`
//!   scenarios (default: the one this bench was built with), e.g. a copy of an older build, to
//!   compare two versions in one sitting.
//! - `BENCH_FLOOR_LEVELS`: call counts of `floor` (default `250,500,1000,2000`).
//! - `BENCH_FLOOR_SECONDS`: how long each `floor` point is held after its ramp (default 8).
//! - `BENCH_FLOOR_RAMP_MS`: `floor` ramp-up (default 1.5 ms per call, at least 200 ms).
//! - `BENCH_FLOOR_SERVERS`: `duplex`, `duplex=PATH` (another build of the binary, e.g. a copy
//!   from before a change), `bare` (tungstenite's default read buffer) and `bare@BYTES` (a read
//!   buffer of BYTES), compared with the first bare one (default `bare,duplex`).
//! - `BENCH_FLOOR_ROUNDS`: how many times each `floor` level runs (default 1), the servers'
//!   order rotating; ratios pair the points of one round, and a summary gives each ratio's
//!   median and range over the rounds.
//! - `BENCH_FLOOR_TIMELINE_MS`: also print each `floor` point's round trips over time, in
//!   windows of this length by send time.
//! - After the levels, `floor` starts as many sessions as its largest level on each server,
//!   leaves them silent for 6 s and prints RSS per idle session.
//!
//! The `soak` scenario (`load/soak.rs`, driven by `load/churn.rs`) holds many sessions with
//! churn (barge-ins, abrupt disconnects, reconnects) for a long time and checks that RSS stays
//! flat, the server's task count returns to its baseline and the store holds every second the
//! clients held; its variables are `BENCH_SOAK_SESSIONS` (500), `BENCH_SOAK_SECS` (1800),
//! `BENCH_SOAK_REPORT_SECS` (60) and `BENCH_SOAK_WARMUP_SECS` (300). It is not part of the
//! default list: the full run takes half an hour.
//!
//! The client runs in this process on the same machine: on a small box the figures include
//! the client's own CPU contention, which is printed next to the server's.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use duplex_replay::{LoadConfig, LoadReport, Mode, Summary, Wav, run_load};

#[path = "load/bare_echo.rs"]
mod bare_echo;
#[path = "load/churn.rs"]
mod churn;
#[path = "load/floor.rs"]
mod floor;
#[path = "load/soak.rs"]
mod soak;

/// The speech every conversation turn (and the echo stream) plays: about four seconds, long
/// enough to be one clear turn for the endpointer.
const SPEECH_TEXT: &str =
    "Hello there. Could you tell me what the weather will be like tomorrow afternoon?";
/// The server's internal rate: no resampling on the inbound path, the cheapest client format.
const RATE: u32 = 16_000;
/// Silence before the speech, as a real microphone has.
const LEAD_SILENCE_MS: u32 = 300;
/// `/healthz` polls while the server starts: 100 × 100 ms = 10 s, far more than a release
/// binary needs to bind.
const HEALTH_TRIES: u32 = 100;
const HEALTH_PAUSE: Duration = Duration::from_millis(100);
/// How often RSS and the active-session gauge are sampled during a run.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);
/// Any single HTTP request to the server (metrics, health) gives up after this long.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// Let the freshly started server settle before the baseline RSS is read.
const SETTLE: Duration = Duration::from_millis(500);
/// Beyond ramp-up plus hold time, how long a scenario may take before it is abandoned
/// (`run_load` bounds itself; this is a second fence that also covers a wedged client).
const SCENARIO_SLACK: Duration = Duration::from_secs(90);
/// Conversation turns per session: a cap only; `max_duration` ends every session first.
const MAX_TURNS: usize = 1000;
/// Barge-in scenario: interrupt once this much assistant audio has arrived.
const BARGE_IN_AFTER_MS: u64 = 500;
/// Stages listed even when the server recorded nothing for them, in pipeline order.
const STAGES: &[&str] = &[
    "endpointing",
    "stt_final",
    "llm_first_token",
    "tts_first_audio",
    "voice_to_voice",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Echo,
    Conversation,
    BargeIn,
}

impl Scenario {
    fn parse(s: &str) -> Scenario {
        match s.trim() {
            "echo" => Scenario::Echo,
            "conversation" => Scenario::Conversation,
            "bargein" | "barge-in" => Scenario::BargeIn,
            other => panic!(
                "BENCH_SCENARIOS: unknown scenario {other:?} (floor, echo, conversation, bargein)"
            ),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Scenario::Echo => "echo",
            Scenario::Conversation => "conversation",
            Scenario::BargeIn => "bargein",
        }
    }

    fn providers(self) -> &'static str {
        match self {
            Scenario::Echo => "echo",
            Scenario::Conversation | Scenario::BargeIn => "scripted",
        }
    }

    fn default_sessions(self) -> usize {
        match self {
            Scenario::Echo => 200,
            Scenario::Conversation | Scenario::BargeIn => 50,
        }
    }
}

struct Settings {
    /// Run the `floor` comparison first.
    floor: Option<floor::FloorSettings>,
    /// Run the `soak` last.
    soak: Option<soak::SoakSettings>,
    scenarios: Vec<Scenario>,
    sessions: BTreeMap<&'static str, usize>,
    hold: Duration,
    ramp: Duration,
}

impl Settings {
    fn from_env() -> Settings {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let quick = var("BENCH_QUICK").is_some_and(|v| v.trim() != "0");
        let default_scenarios = if quick {
            "floor"
        } else {
            "floor,echo,conversation"
        };
        let names: Vec<String> = var("BENCH_SCENARIOS")
            .unwrap_or_else(|| default_scenarios.into())
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        let floor = names
            .iter()
            .any(|n| n == "floor")
            .then(|| floor::FloorSettings::from_env(quick));
        let soak = names
            .iter()
            .any(|n| n == "soak")
            .then(soak::SoakSettings::from_env);
        let scenarios: Vec<Scenario> = names
            .iter()
            .filter(|n| *n != "floor" && *n != "soak")
            .map(|n| Scenario::parse(n))
            .collect();
        let mut sessions: BTreeMap<&'static str, usize> =
            [Scenario::Echo, Scenario::Conversation, Scenario::BargeIn]
                .into_iter()
                .map(|s| (s.name(), s.default_sessions()))
                .collect();
        if let Some(v) = var("BENCH_SESSIONS") {
            if let Ok(n) = v.trim().parse::<usize>() {
                sessions.values_mut().for_each(|s| *s = n);
            } else {
                for pair in v.split(',') {
                    let (k, n) = pair
                        .split_once('=')
                        .expect("BENCH_SESSIONS: a number or name=number pairs");
                    let name = Scenario::parse(k).name();
                    let n = n.trim().parse().expect("BENCH_SESSIONS: a session count");
                    sessions.insert(name, n);
                }
            }
        }
        let num = |name: &str, default: u64| {
            var(name).map_or(default, |v| {
                v.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}: expected a whole number, got {v:?}"))
            })
        };
        Settings {
            floor,
            soak,
            scenarios,
            sessions,
            hold: Duration::from_secs(num("BENCH_SECONDS", 20)),
            ramp: Duration::from_millis(num("BENCH_RAMP_MS", 5000)),
        }
    }
}

fn main() {
    // Started again by the `floor` scenario as the bare echo server.
    if let Ok(spec) = std::env::var(bare_echo::ROLE_VAR) {
        bare_echo::serve(&spec);
        return;
    }
    let settings = Settings::from_env();
    let wall = Instant::now();
    let speech = speech(SPEECH_TEXT, RATE);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    println!(
        "duplex load benchmark: server {}, {} CPUs, hold {} s after a {} ms ramp; speech {:.2} s at {} Hz",
        env!("CARGO_BIN_EXE_duplex"),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        settings.hold.as_secs(),
        settings.ramp.as_millis(),
        speech.duration().as_secs_f64(),
        RATE,
    );
    if let Some(floor) = &settings.floor {
        runtime.block_on(floor::run(floor));
    }
    for &scenario in &settings.scenarios {
        let sessions = settings.sessions[scenario.name()];
        runtime.block_on(run_scenario(scenario, sessions, &settings, &speech));
    }
    if let Some(soak) = &settings.soak {
        runtime.block_on(soak::run(soak, &speech));
    }
    println!("\ntotal wall time: {:.1} s", wall.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------------------------
// One scenario
// ---------------------------------------------------------------------------------------------

async fn run_scenario(scenario: Scenario, sessions: usize, settings: &Settings, speech: &Wav) {
    let started = Instant::now();
    let server = ServerProcess::start(scenario.name(), scenario.providers()).await;
    tokio::time::sleep(SETTLE).await;
    let pid = server.pid();
    let rss_baseline = rss_kib(&pid).unwrap_or(0);

    let cfg = load_config(scenario, sessions, settings, speech, server.addr);
    cfg.validate().expect("the load configuration is valid");

    let stop = Arc::new(AtomicBool::new(false));
    let fence = settings.ramp + settings.hold + SCENARIO_SLACK;
    let sampler = tokio::spawn(sample(pid.clone(), server.addr, Arc::clone(&stop), fence));
    let cpu_server0 = cpu_ticks(&pid).unwrap_or(0);
    let cpu_self0 = cpu_ticks("self").unwrap_or(0);
    let t0 = Instant::now();
    let report = match tokio::time::timeout(fence, run_load(&cfg)).await {
        Ok(r) => r,
        Err(_) => panic!(
            "{}: run_load did not return within {} s: the replayer's own bounds failed",
            scenario.name(),
            fence.as_secs()
        ),
    };
    let run_secs = t0.elapsed().as_secs_f64();
    let cpu_server = cpu_ticks(&pid).unwrap_or(0).saturating_sub(cpu_server0);
    let cpu_self = cpu_ticks("self").unwrap_or(0).saturating_sub(cpu_self0);
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.await.expect("the sampler does not panic");
    let rss_after = rss_kib(&pid).unwrap_or(0);
    let metrics = match http_get(server.addr, "/metrics").await {
        Ok((200, body)) => parse_prometheus(&body),
        Ok((status, _)) => panic!("/metrics answered {status}"),
        Err(e) => panic!("/metrics failed: {e}"),
    };
    let log_path = server.log_path.clone();
    drop(server);

    let ticks = clock_ticks_per_sec();
    let figures = Figures {
        scenario,
        sessions,
        report,
        metrics,
        rss_baseline,
        rss_peak: samples.rss_peak.max(rss_after),
        rss_after,
        active_peak: samples.active_peak,
        samples: samples.count,
        server_cpu_pct: cpu_server as f64 / ticks / run_secs * 100.0,
        client_cpu_pct: cpu_self as f64 / ticks / run_secs * 100.0,
        run_secs,
        scenario_secs: started.elapsed().as_secs_f64(),
    };
    figures.print(settings);
    print_log_summary(&log_path);
}

fn load_config(
    scenario: Scenario,
    sessions: usize,
    settings: &Settings,
    speech: &Wav,
    addr: SocketAddr,
) -> LoadConfig {
    let url = format!("ws://{addr}/v1/conversation");
    let mut cfg = LoadConfig::new(url, vec![speech.clone()]);
    cfg.sessions = sessions;
    cfg.ramp_up = settings.ramp;
    // `max_duration` counts from the start of the run and each session gets what is left
    // after its ramp offset: every session is held until ramp + hold, all of them at once for
    // the last `hold` seconds.
    cfg.max_duration = Some(settings.ramp + settings.hold);
    cfg.speed = 1.0;
    cfg.keep_sessions = true;
    match scenario {
        Scenario::Echo => {
            cfg.mode = Mode::Echo;
            // Enough passes over the speech to outlast max_duration; the deadline stops first.
            let passes =
                (settings.ramp + settings.hold).as_secs_f64() / speech.duration().as_secs_f64();
            cfg.turns = passes.ceil() as usize + 2;
            // In echo mode this is how long replies may lag after the last frame: loopback
            // echoes in milliseconds, so 5 s only counts replies that are truly lost.
            cfg.turn_timeout = Duration::from_secs(5);
        }
        Scenario::Conversation | Scenario::BargeIn => {
            cfg.mode = Mode::Conversation;
            cfg.turns = MAX_TURNS;
            // The scripted pipeline answers in well under a second; 15 s only trips on a
            // stuck turn and still ends before the hold time of a default run.
            cfg.turn_timeout = Duration::from_secs(15);
            if scenario == Scenario::BargeIn {
                cfg.barge_in_after_ms = Some(BARGE_IN_AFTER_MS);
            }
        }
    }
    cfg
}

/// The speech, synthesized by espeak-ng and resampled to `rate` with `duplex_audio`.
fn speech(text: &str, rate: u32) -> Wav {
    let dir = std::env::temp_dir().join(format!("duplex-load-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir is writable");
    let path = dir.join("speech.wav");
    let status = Command::new("espeak-ng")
        .args(["-v", "en-us", "-s", "170", "-w"])
        .arg(&path)
        .arg(text)
        .status()
        .expect("espeak-ng must be installed to synthesize the benchmark's speech");
    assert!(status.success(), "espeak-ng failed: {status}");
    let mut reader = hound::WavReader::open(&path).expect("espeak-ng wrote a WAV");
    let spec = reader.spec();
    let samples: Vec<i16> = reader
        .samples::<i16>()
        .collect::<Result<_, _>>()
        .expect("espeak-ng writes 16-bit PCM");
    let mut resampler = duplex_audio::Resampler::new(spec.sample_rate, rate)
        .expect("espeak-ng's rate is supported");
    let mut out = vec![0i16; (rate * LEAD_SILENCE_MS / 1000) as usize];
    resampler.process(&samples, &mut out);
    resampler.flush(&mut out);
    let _ = std::fs::remove_dir_all(&dir);
    Wav::from_samples("espeak-ng speech", rate, out).expect("a protocol rate")
}

// ---------------------------------------------------------------------------------------------
// The server process
// ---------------------------------------------------------------------------------------------

/// The server child process; killed when dropped (also while a panic unwinds).
struct ServerProcess {
    child: Child,
    addr: SocketAddr,
    log_path: PathBuf,
    data_dir: PathBuf,
}

impl ServerProcess {
    /// `duplex --providers PROVIDERS`; `name` labels its log file.
    async fn start(name: &str, providers: &str) -> ServerProcess {
        ServerProcess::start_binary(Path::new(&server_binary()), name, providers).await
    }

    /// Like [`ServerProcess::start`] with another build of the binary.
    async fn start_binary(binary: &Path, name: &str, providers: &str) -> ServerProcess {
        // Bind-and-release: another process could take the port in between, which on a
        // benchmark box is unlikely enough; the health check below would then fail loudly.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log_path = std::env::temp_dir().join(format!(
            "duplex-load-bench-{}-{}.log",
            std::process::id(),
            name
        ));
        let log = std::fs::File::create(&log_path).expect("server log file");
        // A fresh store per server, never the working directory's `data/`.
        let data_dir = std::env::temp_dir().join(format!(
            "duplex-load-bench-{}-{}-data",
            std::process::id(),
            name
        ));
        let _ = std::fs::remove_dir_all(&data_dir);
        std::fs::create_dir_all(&data_dir).expect("temp dir is writable");
        let child = Command::new(binary)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--providers", providers])
            .env("DUPLEX_DATA_DIR", &data_dir)
            .env_remove("DATABASE_URL")
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "warn")
            .env("MAX_CONNECTIONS", "100000")
            .env("MAX_CONNECTIONS_PER_IP", "100000")
            // Every session comes from 127.0.0.1: the per-IP connect rate limit (60 a minute
            // by default) would refuse all but the first burst.
            .env("CONNECT_RATE_PER_MIN", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the duplex binary starts");
        let mut server = ServerProcess {
            child,
            addr,
            log_path,
            data_dir,
        };
        for _ in 0..HEALTH_TRIES {
            if let Ok(Some(status)) = server.child.try_wait() {
                let log = std::fs::read_to_string(&server.log_path).unwrap_or_default();
                panic!("the server exited during startup ({status}):\n{log}");
            }
            if let Ok((200, _)) = http_get(addr, "/healthz").await {
                return server;
            }
            tokio::time::sleep(HEALTH_PAUSE).await;
        }
        panic!(
            "the server did not answer /healthz within {} ms",
            HEALTH_TRIES * HEALTH_PAUSE.as_millis() as u32
        );
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// Stops the server gracefully (SIGTERM, as an orchestrator does) and waits at most
    /// `within` for it to exit; kills it after that. Describes how it ended.
    fn terminate(&mut self, within: Duration) -> String {
        let sent = Command::new("kill")
            .args(["-TERM", &self.pid()])
            .status()
            .is_ok_and(|s| s.success());
        if !sent {
            return "SIGTERM could not be sent".into();
        }
        let t0 = Instant::now();
        while t0.elapsed() < within {
            if let Ok(Some(status)) = self.child.try_wait() {
                return format!(
                    "exited ({status}) after {:.1} s",
                    t0.elapsed().as_secs_f64()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        format!("still running after {} s: killed", within.as_secs())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// A minimal HTTP/1.1 GET: status and body.
async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)
            .await
            .map_err(|e| e.to_string())?;
        let status = buf
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("not an HTTP response: {:?}", buf.get(..40)))?;
        let body = buf
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    };
    tokio::time::timeout(HTTP_TIMEOUT, request)
        .await
        .map_err(|_| format!("GET {path}: no answer within {} s", HTTP_TIMEOUT.as_secs()))?
}

// ---------------------------------------------------------------------------------------------
// /proc and sampling
// ---------------------------------------------------------------------------------------------

/// Resident set size in KiB (`VmRSS` of `/proc/<pid>/status`).
fn rss_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// User plus system CPU time in clock ticks (`/proc/<pid>/stat` fields 14 and 15).
fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state), so field 14 is index 11.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// `sysconf(_SC_CLK_TCK)` through `getconf` (no libc dependency for one number); Linux uses
/// 100 almost everywhere, the fallback.
fn clock_ticks_per_sec() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

struct Samples {
    rss_peak: u64,
    active_peak: f64,
    count: usize,
}

/// Samples RSS and the active-session gauge every [`SAMPLE_EVERY`] until `stop`, or at most
/// for `budget`.
async fn sample(pid: String, addr: SocketAddr, stop: Arc<AtomicBool>, budget: Duration) -> Samples {
    let max_samples = (budget.as_millis() / SAMPLE_EVERY.as_millis()) as usize + 1;
    let mut s = Samples {
        rss_peak: 0,
        active_peak: 0.0,
        count: 0,
    };
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    while s.count < max_samples && !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        s.count += 1;
        s.rss_peak = s.rss_peak.max(rss_kib(&pid).unwrap_or(0));
        if let Ok((200, body)) = http_get(addr, "/metrics").await {
            let m = parse_prometheus(&body);
            s.active_peak = s.active_peak.max(m.value("duplex_active_sessions", &[]));
        }
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Prometheus text
// ---------------------------------------------------------------------------------------------

struct PromSample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

struct Prometheus(Vec<PromSample>);

fn parse_prometheus(text: &str) -> Prometheus {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => match v.parse() {
                Ok(v) => v,
                Err(_) => continue,
            },
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
            None => (series, Vec::new()),
        };
        out.push(PromSample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    Prometheus(out)
}

/// `a="x",b="y"` (with `\"` and `\\` escapes) into pairs.
fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    // Bounded by the input: every iteration consumes at least one character.
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        if chars.next() != Some('"') {
            break;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => value.extend(chars.next()),
                '"' => break,
                c => value.push(c),
            }
        }
        out.push((key.trim().trim_start_matches(',').trim().to_string(), value));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    out
}

impl Prometheus {
    fn matches(s: &PromSample, name: &str, labels: &[(&str, &str)]) -> bool {
        s.name == name
            && labels
                .iter()
                .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
    }

    /// The sum of every series of `name` carrying `labels` (0 when there is none).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|s| Prometheus::matches(s, name, labels))
            .map(|s| s.value)
            // Not `sum()`: the empty f64 sum is -0.0, which prints as "-0".
            .fold(0.0, |a, b| a + b)
    }

    fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Histogram {
        let mut buckets: Vec<(f64, f64)> = self
            .0
            .iter()
            .filter(|s| Prometheus::matches(s, &format!("{name}_bucket"), labels))
            .filter_map(|s| {
                let le = s.labels.iter().find(|(k, _)| k == "le")?;
                let le = if le.1 == "+Inf" {
                    f64::INFINITY
                } else {
                    le.1.parse().ok()?
                };
                Some((le, s.value))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Histogram {
            buckets,
            count: self.value(&format!("{name}_count"), labels),
            sum: self.value(&format!("{name}_sum"), labels),
        }
    }
}

/// Cumulative buckets `(le, count)`, ascending.
struct Histogram {
    buckets: Vec<(f64, f64)>,
    count: f64,
    sum: f64,
}

enum Estimate {
    Within(f64),
    /// The quantile fell in the `+Inf` bucket: only a lower bound is known.
    Above(f64),
}

impl Histogram {
    /// Quantile `q` (0..1) by linear interpolation inside the bucket holding rank `q * count`,
    /// the first bucket starting at 0 (what Prometheus' `histogram_quantile` does).
    fn quantile(&self, q: f64) -> Option<Estimate> {
        if self.count <= 0.0 {
            return None;
        }
        let rank = q * self.count;
        let mut lower = (0.0, 0.0);
        for &(le, cum) in &self.buckets {
            if cum >= rank {
                if le.is_infinite() {
                    return Some(Estimate::Above(lower.0));
                }
                let width = cum - lower.1;
                let frac = if width > 0.0 {
                    (rank - lower.1) / width
                } else {
                    1.0
                };
                return Some(Estimate::Within(lower.0 + (le - lower.0) * frac));
            }
            lower = (le, cum);
        }
        Some(Estimate::Above(lower.0))
    }
}

// ---------------------------------------------------------------------------------------------
// Printing
// ---------------------------------------------------------------------------------------------

struct Figures {
    scenario: Scenario,
    sessions: usize,
    report: LoadReport,
    metrics: Prometheus,
    rss_baseline: u64,
    rss_peak: u64,
    rss_after: u64,
    active_peak: f64,
    samples: usize,
    server_cpu_pct: f64,
    client_cpu_pct: f64,
    run_secs: f64,
    scenario_secs: f64,
}

impl Figures {
    fn print(&self, settings: &Settings) {
        let r = &self.report;
        let m = &self.metrics;
        let started = r
            .session_reports
            .iter()
            .filter(|s| s.session_id.is_some())
            .count();
        let counter = |name: &str| m.value(name, &[]);
        let slow = m.value("duplex_errors_total", &[("code", "slow_consumer")]);
        println!();
        println!(
            "=== scenario {} (--providers {}): {} sessions, ramp {} ms, held {} s ===",
            self.scenario.name(),
            self.scenario.providers(),
            self.sessions,
            settings.ramp.as_millis(),
            settings.hold.as_secs()
        );
        let row = |k: &str, v: String| println!("  {k:<52} {v:>14}");
        row(
            "sessions started (session.ready received)",
            started.to_string(),
        );
        row(
            "sessions ok (held to the end, no error)",
            r.sessions_ok.to_string(),
        );
        row("sessions failed", r.sessions_failed.to_string());
        row(
            "server: sessions accepted (duplex_sessions_total)",
            fmt_count(counter("duplex_sessions_total")),
        );
        row(
            "server: peak active sessions (gauge, 500 ms samples)",
            fmt_count(self.active_peak),
        );
        row(
            "server: connections rejected",
            fmt_count(counter("duplex_connections_rejected_total")),
        );
        row("frames sent (client)", r.frames_sent.to_string());
        row("frames received (client)", r.frames_received.to_string());
        if self.scenario == Scenario::Echo {
            row(
                "frames dropped (sent - received)",
                (r.frames_sent as i64 - r.frames_received as i64).to_string(),
            );
        }
        let frames_in = counter("duplex_audio_frames_in_total");
        row("server: audio frames in", fmt_count(frames_in));
        let frames_out = counter("duplex_audio_frames_out_total");
        row("server: audio frames out", fmt_count(frames_out));
        row(
            "frames lost server -> client (server out - received)",
            format!("{}", frames_out - r.frames_received as f64),
        );
        row(
            "frames lost client -> server (sent - server in)",
            format!("{}", r.frames_sent as f64 - frames_in),
        );
        row(
            "server: STT frames dropped (stt_frames_dropped_total)",
            fmt_count(counter("duplex_stt_frames_dropped_total")),
        );
        row("server: errors{code=slow_consumer}", fmt_count(slow));
        let other_errors: Vec<String> =
            m.0.iter()
                .filter(|s| s.name == "duplex_errors_total" && s.value > 0.0)
                .map(|s| {
                    let code = s
                        .labels
                        .iter()
                        .find(|(k, _)| k == "code")
                        .map_or("?", |(_, v)| v);
                    format!("{code}={}", s.value)
                })
                .collect();
        row(
            "server: errors_total by code",
            if other_errors.is_empty() {
                "none".into()
            } else {
                other_errors.join(" ")
            },
        );
        if self.scenario != Scenario::Echo {
            row(
                "server: turns started",
                fmt_count(counter("duplex_turns_total")),
            );
            row(
                "server: interruptions",
                fmt_count(counter("duplex_interruptions_total")),
            );
            row(
                "client: turns completed / interrupted / failed / timed out / cut",
                format!(
                    "{} / {} / {} / {} / {}",
                    r.turns_completed,
                    r.turns_interrupted,
                    r.turns_failed,
                    r.turns_timed_out,
                    r.turns_cut
                ),
            );
        }
        let mib = |kib: u64| format!("{:.1} MiB", kib as f64 / 1024.0);
        row(
            "server RSS at baseline (before load)",
            mib(self.rss_baseline),
        );
        row(
            &format!("server RSS peak ({} samples every 500 ms)", self.samples),
            mib(self.rss_peak),
        );
        row("server RSS after the run", mib(self.rss_after));
        row(
            "server RSS per session held ((peak - baseline) / ok)",
            if r.sessions_ok > 0 {
                format!(
                    "{:.0} KiB",
                    self.rss_peak.saturating_sub(self.rss_baseline) as f64 / r.sessions_ok as f64
                )
            } else {
                "-".into()
            },
        );
        row(
            "server CPU (utime+stime, % of one core)",
            format!("{:.1} %", self.server_cpu_pct),
        );
        row(
            "client CPU (this bench process, % of one core)",
            format!("{:.1} %", self.client_cpu_pct),
        );
        row("load run wall time", format!("{:.1} s", self.run_secs));
        row(
            "scenario wall time (incl. server start/stop)",
            format!("{:.1} s", self.scenario_secs),
        );

        println!();
        println!(
            "  {:<36} {:>7} {:>9} {:>9} {:>9} {:>9}",
            "client-side latency (ms)", "count", "p50", "p95", "p99", "max"
        );
        let lat_rows: Vec<(&str, &Summary)> = match self.scenario {
            Scenario::Echo => vec![("echo round trip", &r.metrics.echo_rtt_ms)],
            _ => vec![
                (
                    "end of speech -> speech_stopped",
                    &r.metrics.speech_stopped_ms,
                ),
                (
                    "end of speech -> final transcript",
                    &r.metrics.final_transcript_ms,
                ),
                ("end of speech -> first text", &r.metrics.first_text_ms),
                ("end of speech -> first audio", &r.metrics.first_audio_ms),
                ("end of speech -> turn end", &r.metrics.turn_total_ms),
                ("barge-in speech -> interrupted", &r.metrics.interrupt_ms),
                ("barge-in speech -> last audio", &r.metrics.audio_stop_ms),
            ],
        };
        let cell = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
        for (name, s) in lat_rows {
            if s.count == 0 && name.starts_with("barge") && self.scenario != Scenario::BargeIn {
                continue;
            }
            println!(
                "  {:<36} {:>7} {:>9} {:>9} {:>9} {:>9}",
                name,
                s.count,
                cell(s.p50),
                cell(s.p95),
                cell(s.p99),
                cell(s.max)
            );
        }

        println!();
        println!(
            "  {:<36} {:>7} {:>9} {:>9} {:>9}",
            "server-side stage latency (ms)", "count", "p50~", "p99~", "mean"
        );
        for stage in STAGES {
            let h = m.histogram("duplex_stage_latency_seconds", &[("stage", stage)]);
            let est = |q: f64| match h.quantile(q) {
                None => "-".to_string(),
                Some(Estimate::Within(v)) => format!("{:.1}", v * 1000.0),
                Some(Estimate::Above(v)) => format!(">{:.0}", v * 1000.0),
            };
            let mean = if h.count > 0.0 {
                format!("{:.1}", h.sum / h.count * 1000.0)
            } else {
                "-".into()
            };
            println!(
                "  {:<36} {:>7} {:>9} {:>9} {:>9}",
                stage,
                fmt_count(h.count),
                est(0.5),
                est(0.99),
                mean
            );
        }
        println!(
            "  (~ server quantiles are estimates from the cumulative Prometheus buckets, linear \
             interpolation within the bucket; the mean is exact)"
        );

        println!();
        println!("  duplex-replay's own report:");
        for line in r.to_table().lines() {
            println!("  | {line}");
        }
        let mut closes: BTreeMap<String, usize> = BTreeMap::new();
        for s in &r.session_reports {
            let key = match &s.close {
                Some((code, reason)) if reason.is_empty() => code.to_string(),
                Some((code, reason)) => format!("{code} {reason}"),
                None => "none".into(),
            };
            *closes.entry(key).or_default() += 1;
        }
        let closes: Vec<String> = closes.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        println!("  close frames from the server: {}", closes.join(", "));
    }
}

fn fmt_count(v: f64) -> String {
    format!("{v:.0}")
}

/// Counts the server's log lines (`RUST_LOG=warn`, JSON) by level and message.
fn print_log_summary(path: &Path) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut by_message: BTreeMap<String, usize> = BTreeMap::new();
    let mut lines = 0;
    for line in text.lines() {
        lines += 1;
        let key = match serde_json::from_str::<serde_json::Value>(line) {
            Ok(v) => format!(
                "{} {}",
                v["level"].as_str().unwrap_or("?"),
                v["fields"]["message"].as_str().unwrap_or("?")
            ),
            Err(_) => format!("(not JSON) {}", line.chars().take(100).collect::<String>()),
        };
        *by_message.entry(key).or_default() += 1;
    }
    println!("  server log (RUST_LOG=warn): {lines} lines");
    let mut top: Vec<(String, usize)> = by_message.into_iter().collect();
    top.sort_by_key(|b| std::cmp::Reverse(b.1));
    for (message, n) in top.iter().take(8) {
        println!("    {n:>6} x {message}");
    }
    if lines == 0 {
        let _ = std::fs::remove_file(path);
    } else {
        println!("    (kept at {})", path.display());
    }
}

/// The server binary of the session scenarios: `BENCH_DUPLEX_BIN`, else the one built with
/// this bench.
fn server_binary() -> String {
    std::env::var("BENCH_DUPLEX_BIN")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_duplex").to_owned())
}
