//! The soak in small: the churn driver of the load bench's `soak` scenario
//! (`benches/load/churn.rs`, included here) against the real binary for a few seconds, with
//! assertions instead of figures: every second the clients held is in the store (within one
//! heartbeat per session) and the server's task count returns to its idle baseline once the
//! sessions are gone. The full run (hundreds of sessions for half an hour) is the bench.
//!
//! Also the server-process helper of the amplification test (`tests/amplification`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{http_get, speech};

#[path = "../../benches/load/churn.rs"]
mod churn;

use churn::{ChurnConfig, ChurnStats};

/// The server's usage heartbeat in these tests: the smallest, so "one heartbeat per session"
/// is a tight bound.
const HEARTBEAT_SECS: u64 = 1;
/// Concurrent sessions of the short soak.
const SESSIONS: usize = 40;
/// How long the clients churn.
const CHURN_FOR: Duration = Duration::from_secs(12);
/// Tasks the idle server may have beyond its baseline once every session is gone: the
/// baseline and the final figure both include the `/metrics` connection that reads them; a
/// keep-alive connection or a store timer alive at one of the two scrapes is the slack.
const TASK_TOLERANCE: i64 = 3;
/// Bound of the wind-down: clients close within their 2 s close timeout, the server writes
/// each session's final usage within milliseconds on SQLite.
const WIND_DOWN: Duration = Duration::from_secs(15);
/// Upper bound of the whole test.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A `duplex` process on a free loopback port with the scripted providers and its own SQLite
/// store; killed on drop (a failing test keeps its log).
pub(crate) struct ServerProcess {
    child: Child,
    pub addr: SocketAddr,
    pub log_path: PathBuf,
    pub data_dir: PathBuf,
}

impl ServerProcess {
    pub async fn start(label: &str, env: &[(&str, &str)]) -> ServerProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let base = std::env::temp_dir().join(format!(
            "duplex-soak-test-{}-{label}-{port}",
            std::process::id()
        ));
        let log_path = base.with_extension("log");
        let data_dir = base.with_extension("data");
        let _ = std::fs::remove_dir_all(&data_dir);
        std::fs::create_dir_all(&data_dir).expect("temp dir is writable");
        let log = std::fs::File::create(&log_path).expect("server log file");
        // A clean environment: a developer's DATABASE_URL or API keys must not leak in.
        let child = Command::new(env!("CARGO_BIN_EXE_duplex"))
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--providers", "scripted"])
            .env_clear()
            .env("DUPLEX_DATA_DIR", &data_dir)
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "warn")
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
            data_dir,
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

    pub fn url(&self) -> String {
        format!("ws://{}/v1/conversation", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Resident set size in KiB (`VmRSS` of `/proc/<pid>/status`).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("the server process is alive");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    /// `(duplex_runtime_alive_tasks, duplex_active_sessions)` from `/metrics`.
    pub async fn tasks_and_sessions(&self) -> (i64, i64) {
        let (status, body) = http_get(self.addr, "/metrics").await;
        assert_eq!(status, 200, "{body}");
        let gauge = |name: &str| -> i64 {
            body.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .unwrap_or_else(|| panic!("{name} on /metrics"))
                .trim()
                .parse()
                .expect("a whole number")
        };
        (
            gauge("duplex_runtime_alive_tasks"),
            gauge("duplex_active_sessions"),
        )
    }

    /// SIGTERM, then waits (bounded) for a clean exit: a graceful stop writes every session's
    /// final usage.
    pub fn terminate(&mut self) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill(1) runs");
        assert!(sent.success(), "SIGTERM sent");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("the child can be waited for") {
                assert!(status.success(), "graceful exit: {status}\n{}", self.log());
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the server did not exit within 20 s of SIGTERM\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log_path);
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}

/// Conversation milliseconds of every user, every day, in the store of `data_dir`.
async fn stored_ms(data_dir: &std::path::Path) -> i64 {
    let url = duplex_store::sqlite_url_in(data_dir);
    let store = duplex_store::Store::open(&url)
        .await
        .expect("the store opens");
    let today = time::OffsetDateTime::now_utc().date();
    let rows = store
        .usage_between(today.previous_day().expect("not day one"), today)
        .await
        .expect("the store answers");
    store.close().await;
    rows.iter().map(|r| r.usage.conversation_ms).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churning_sessions_lose_no_usage_and_leave_no_tasks_behind() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let heartbeat = HEARTBEAT_SECS.to_string();
        let mut server = ServerProcess::start(
            "churn",
            &[
                ("USAGE_HEARTBEAT_SECS", heartbeat.as_str()),
                // Every session comes from 127.0.0.1.
                ("MAX_CONNECTIONS_PER_IP", "1000"),
                // Short scripted replies, so turns finish and barge-ins happen within seconds.
                ("SCRIPTED_LLM_FIRST_TOKEN_MS", "50"),
                ("SCRIPTED_LLM_TOKEN_MS", "5"),
                ("SCRIPTED_TTS_LATENCY_MS", "20"),
                ("END_OF_TURN_MS", "400"),
            ],
        )
        .await;
        let mut baseline = i64::MAX;
        for _ in 0..3 {
            baseline = baseline.min(server.tasks_and_sessions().await.0);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        let wav = speech("Hello, how are you today?", churn::RATE);
        let stats = Arc::new(ChurnStats::default());
        let stop = CancellationToken::new();
        let cfg = ChurnConfig {
            url: server.url(),
            sessions: SESSIONS,
            ramp: Duration::from_secs(1),
            speech: Arc::new(wav.samples.iter().flat_map(|s| s.to_le_bytes()).collect()),
            life: (Duration::from_secs(2), Duration::from_secs(7)),
            pause: (Duration::from_millis(200), Duration::from_millis(1000)),
            barge_in: 0.4,
            barge_after: (Duration::from_millis(100), Duration::from_millis(400)),
            abrupt: 0.4,
            reply_timeout: Duration::from_secs(8),
            seed: 11,
        };
        let driver = tokio::spawn(churn::run(cfg, Arc::clone(&stats), stop.clone()));
        tokio::time::sleep(CHURN_FOR).await;
        let (busy_tasks, busy_sessions) = server.tasks_and_sessions().await;
        stop.cancel();
        driver.await.expect("the churn driver does not panic");

        // Every session is gone on the server, and every task it started with it.
        let deadline = Instant::now() + WIND_DOWN;
        let mut last = server.tasks_and_sessions().await;
        while (last.1 != 0 || last.0 > baseline + TASK_TOLERANCE) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            last = server.tasks_and_sessions().await;
        }
        let (tasks_after, sessions_after) = last;
        let summary = format!(
            "{}; server close codes: {}; errors: {}; tasks: baseline {baseline}, under load \
             {busy_tasks} ({busy_sessions} sessions), after {tasks_after} ({sessions_after} \
             sessions)",
            stats.line(),
            ChurnStats::map_line(&stats.server_close_codes),
            ChurnStats::map_line(&stats.error_codes),
        );
        eprintln!("{summary}");
        assert_eq!(sessions_after, 0, "{summary}");
        assert!(
            tasks_after <= baseline + TASK_TOLERANCE,
            "tasks did not return to the baseline: {summary}"
        );
        // The churn really happened: every way of ending, replacements, barge-ins.
        let get = ChurnStats::get;
        assert!(get(&stats.completed) > SESSIONS as u64, "{summary}");
        assert!(get(&stats.abrupt_closes) > 0, "{summary}");
        assert!(get(&stats.clean_closes) > 0, "{summary}");
        assert!(get(&stats.interrupted) > 0, "{summary}");
        assert_eq!(
            get(&stats.not_ready) + get(&stats.connect_failed),
            0,
            "{summary}"
        );
        assert!(busy_tasks > baseline, "{summary}");

        server.terminate();
        let stored = stored_ms(&server.data_dir).await as f64 / 1000.0;
        let held = stats.held_secs();
        let sessions = get(&stats.completed);
        let slack = (sessions * HEARTBEAT_SECS) as f64;
        eprintln!(
            "stored {stored:.1} s, held {held:.1} s, {sessions} sessions, slack {slack:.0} s"
        );
        // Per session too: no usage write was lost (a final write the store did not
        // acknowledge in time goes to the server's backlog; only what the backlog cannot write
        // is logged as lost).
        let log = server.log();
        assert!(!log.contains("USAGE LOST"), "usage lost:\n{log}");
        assert!(
            (stored - held).abs() <= slack,
            "stored {stored:.1} s vs held {held:.1} s over {sessions} sessions: more than one \
             heartbeat ({HEARTBEAT_SECS} s) per session apart\n{summary}"
        );
    })
    .await
    .expect("the soak test finished in time");
}
