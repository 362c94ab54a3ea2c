//! The browser client (`duplex-web`) against the real server, in real headless Chromium:
//! Debian's `chromium` package driven by `tests/browser/drive.mjs` (npm `playwright-core`,
//! never a downloaded browser), with a WAV file as the microphone
//! (`--use-file-for-fake-audio-capture`, which Chromium plays in a loop).
//!
//! Gated by `DUPLEX_TEST_BROWSER=1`, which `scripts/test.sh` sets after installing Chromium
//! and the driver; the spoken conversation also needs the local models (`DUPLEX_TEST_LOCAL=1`).
//! Without them each test says it was skipped. The HTTP side of the client (files, headers,
//! the admission verdict) is tested without a browser, always.
//!
//! Timing figures: the page keeps its microphone frames and its played samples on one clock,
//! the AudioContext's. A test finds where the fake microphone's first speech begins in the
//! page's level log (the first 20 ms frame above [`ONSET_RMS`]), which places the WAV on that
//! clock; the end of each question and the start of an interruption are then known in page
//! time, to within a frame. It prints end of speech → first assistant sample played, and
//! interrupting speech → last assistant sample played. Device latencies (a real microphone's
//! and speaker's buffers) are not in these figures: the fake devices have none to speak of.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::*;

/// Level (RMS of a 20 ms frame, full scale 1.0) that counts as speech when aligning the
/// microphone file with the page's clock: ~-34 dBFS, far above digital silence, below any
/// syllable of synthesized speech.
const ONSET_RMS: f64 = 0.02;
/// Bound of one browser run; each test waits far less unless something hangs.
const DRIVER_TIMEOUT: Duration = Duration::from_secs(300);

fn enabled() -> bool {
    if std::env::var("DUPLEX_TEST_BROWSER").as_deref() == Ok("1") {
        return true;
    }
    eprintln!(
        "skipped: set DUPLEX_TEST_BROWSER=1 (scripts/test.sh installs Chromium and the driver)"
    );
    false
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn out_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&d).unwrap();
    d
}

// ---- the microphone file ---------------------------------------------------------------

enum Part {
    Silence(u32),
    Speech(Wav),
}

/// A 16 kHz WAV for the fake microphone, and where its speech is.
struct MicFile {
    path: PathBuf,
    /// (start, end) in seconds of each `Part::Speech`, by energy (leading and trailing
    /// silence inside the synthesized clip excluded).
    speech: Vec<(f64, f64)>,
    /// Length of the file in seconds (Chromium loops it).
    duration: f64,
}

fn mic_file(name: &str, parts: Vec<Part>) -> MicFile {
    const RATE: u32 = 16_000;
    let mut samples: Vec<i16> = Vec::new();
    let mut speech = Vec::new();
    for part in parts {
        match part {
            Part::Silence(ms) => {
                samples.extend(std::iter::repeat_n(0, (RATE / 1000 * ms) as usize))
            }
            Part::Speech(wav) => {
                let mut r = duplex_audio::Resampler::new(wav.sample_rate, RATE).unwrap();
                let mut pcm = Vec::new();
                r.process(&wav.samples, &mut pcm);
                r.flush(&mut pcm);
                let at = samples.len();
                let window = (RATE / 100) as usize; // 10 ms
                let loud: Vec<usize> = pcm
                    .chunks(window)
                    .enumerate()
                    .filter(|(_, w)| {
                        let e = w.iter().map(|&s| (s as f64 / 32768.0).powi(2)).sum::<f64>();
                        (e / w.len() as f64).sqrt() > ONSET_RMS
                    })
                    .map(|(i, _)| i)
                    .collect();
                let (first, last) = (loud[0], *loud.last().unwrap());
                let secs = |i: usize| (at + i * window) as f64 / RATE as f64;
                speech.push((secs(first), secs(last + 1)));
                samples.extend(pcm);
            }
        }
    }
    let duration = samples.len() as f64 / RATE as f64;
    let path = out_dir().join(format!("{name}.wav"));
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: RATE,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(&path, spec).unwrap();
    for s in samples {
        w.write_sample(s).unwrap();
    }
    w.finalize().unwrap();
    MicFile {
        path,
        speech,
        duration,
    }
}

// ---- the driver ------------------------------------------------------------------------

enum Out {
    Signal(String),
    Done(Value),
}

/// One run of `tests/browser/drive.mjs`: a headless Chromium on one page.
struct Browser {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Browser {
    fn run(url: &str, wav: &Path, steps: Value) -> Browser {
        let plan = json!({"url": url, "wav": wav, "timeoutMs": 30000, "steps": steps});
        let mut child = tokio::process::Command::new("node")
            .arg(repo_root().join("tests/browser/drive.mjs"))
            .arg(plan.to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs tests/browser/drive.mjs (scripts/test.sh installs it)");
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Browser {
            child,
            stdin,
            lines,
        }
    }

    /// The next signal, or the final result (panics with the page's state on a failed step).
    async fn next(&mut self) -> Out {
        loop {
            let line = tokio::time::timeout(DRIVER_TIMEOUT, self.lines.next_line())
                .await
                .expect("the browser run finished in time")
                .unwrap()
                .expect("the driver printed a result");
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                eprintln!("driver: {line}");
                continue;
            };
            if let Some(s) = v.get("signal") {
                return Out::Signal(s.as_str().unwrap().to_owned());
            }
            if let Some(e) = v.get("error") {
                let _ = self.child.wait().await;
                panic!(
                    "browser step failed: {}\npage: {:#}",
                    e.as_str().unwrap_or_default(),
                    v["result"]
                );
            }
            let _ = self.child.wait().await;
            return Out::Done(v["result"].clone());
        }
    }

    async fn resume(&mut self) {
        self.stdin.write_all(b"go\n").await.unwrap();
    }

    async fn result(mut self) -> Value {
        match self.next().await {
            Out::Done(v) => v,
            Out::Signal(s) => panic!("unexpected signal {s}"),
        }
    }
}

/// Where the WAV's time 0 is on the page's clock: the first loud frame the page captured is
/// the first speech of the file.
fn file_origin(stats: &Value, mic: &MicFile) -> f64 {
    let onset = stats["levels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l[1].as_f64().unwrap() > ONSET_RMS)
        .expect("the page heard the microphone file")[0]
        .as_f64()
        .unwrap();
    // A frame is stamped at its end; speech begins within it.
    onset - 0.02 - mic.speech[0].0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn no_console_errors(result: &Value) {
    assert_eq!(
        result["consoleErrors"],
        json!([]),
        "console: {:#}",
        result["consoleLog"]
    );
    assert_eq!(result["pageErrors"], json!([]));
}

fn snapshot<'a>(result: &'a Value, name: &str) -> &'a Value {
    &result["snapshots"][name]
}

fn transcript<'a>(snap: &'a Value, kind: &str) -> Vec<&'a str> {
    snap["transcript"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == kind)
        .map(|e| e["text"].as_str().unwrap())
        .collect()
}

/// A port that was free a moment ago (for tests whose config must name the origin, and for a
/// restart on the same address).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---- without a browser -----------------------------------------------------------------

/// Raw GET with extra headers: status, headers (lower-case names), body.
async fn get(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, String) {
    use tokio::io::AsyncReadExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines.next().unwrap()[9..12].parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn the_client_is_served_with_types_validators_and_security_headers() {
    let ts = TestServer::start(test_config()).await;
    let addr = ts.server.local_addr();
    let (status, h, body) = get(addr, "/", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(header(&h, "content-type"), Some("text/html; charset=utf-8"));
    assert!(body.contains("<button id=\"start\""), "{body}");
    let csp = header(&h, "content-security-policy").expect("a CSP");
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert_eq!(header(&h, "x-content-type-options"), Some("nosniff"));
    assert_eq!(header(&h, "referrer-policy"), Some("no-referrer"));
    assert_eq!(header(&h, "cache-control"), Some("no-cache"));
    let etag = header(&h, "etag").expect("an ETag").to_owned();

    // Revalidation: the same bytes are not sent again.
    let (status, h, body) = get(addr, "/", &[("If-None-Match", &etag)]).await;
    assert_eq!(status, 304);
    assert!(body.is_empty());
    assert_eq!(header(&h, "etag"), Some(etag.as_str()));

    for (path, ty) in [
        ("/assets/app.js", "text/javascript; charset=utf-8"),
        (
            "/assets/capture-worklet.js",
            "text/javascript; charset=utf-8",
        ),
        (
            "/assets/playback-worklet.js",
            "text/javascript; charset=utf-8",
        ),
        ("/assets/style.css", "text/css; charset=utf-8"),
        ("/favicon.ico", "image/svg+xml"),
    ] {
        let (status, h, _) = get(addr, path, &[]).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(header(&h, "content-type"), Some(ty), "{path}");
        assert!(header(&h, "content-security-policy").is_some(), "{path}");
    }
    for path in ["/assets/nope.js", "/assets/..%2FCargo.toml", "/index.html"] {
        assert_eq!(get(addr, path, &[]).await.0, 404, "{path}");
    }

    // The page's diagnosis of a refused upgrade: a plain GET of the WebSocket URL.
    let (status, _, body) = get(addr, "/v1/conversation?v=1", &[]).await;
    assert_eq!(status, 426, "{body}");
    let (status, _, _) = get(addr, "/v1/conversation", &[]).await;
    assert_eq!(status, 400, "no protocol version");

    // An API-only deployment.
    let mut config = test_config();
    config.server.web_client = false;
    let api = TestServer::start(config).await;
    assert_eq!(get(api.server.local_addr(), "/", &[]).await.0, 404);
    assert_eq!(
        get(api.server.local_addr(), "/assets/app.js", &[]).await.0,
        404
    );
}

#[tokio::test]
async fn a_plain_get_tells_why_an_upgrade_would_be_refused() {
    let mut config = test_config();
    config.auth.jwt_secret = Some(duplex_server::auth::Secret("browser-secret".into()));
    let ts = TestServer::start(config).await;
    let addr = ts.server.local_addr();
    let (status, _, body) = get(addr, "/v1/conversation?v=1", &[]).await;
    assert_eq!(status, 401);
    assert!(body.contains("missing bearer token"), "{body}");
    let (status, _, body) = get(
        addr,
        "/v1/conversation?v=1",
        &[("Authorization", "Bearer not.a.jwt")],
    )
    .await;
    assert_eq!(status, 401, "{body}");
    let good = jwt("browser-secret", "user_diag");
    let (status, _, body) = get(
        addr,
        "/v1/conversation?v=1",
        &[("Authorization", &format!("Bearer {good}"))],
    )
    .await;
    assert_eq!(status, 426, "{body}");
}

/// `/metrics` can be closed to everyone without the operator's token (it is on the session
/// port, which faces the internet).
#[tokio::test]
async fn metrics_need_the_token_when_one_is_set() {
    let mut config = test_config();
    config.auth.metrics_token = Some(duplex_server::auth::Secret("scrape-me".into()));
    let ts = TestServer::start(config).await;
    let addr = ts.server.local_addr();
    let (status, h, _) = get(addr, "/metrics", &[]).await;
    assert_eq!(status, 401);
    assert_eq!(header(&h, "www-authenticate"), Some("Bearer"));
    let (status, _, _) = get(addr, "/metrics", &[("Authorization", "Bearer scrape-mE")]).await;
    assert_eq!(status, 401);
    let (status, _, body) = get(addr, "/metrics", &[("Authorization", "Bearer scrape-me")]).await;
    assert_eq!(status, 200);
    assert!(body.contains("duplex_active_sessions"), "{body}");
    // Without a token configured, /metrics stays open (the default).
    let open = TestServer::start(test_config()).await;
    assert_eq!(get(open.server.local_addr(), "/metrics", &[]).await.0, 200);
}

fn jwt(secret: &str, sub: &str) -> String {
    let exp = jsonwebtoken::get_current_timestamp() + 600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": sub, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

// ---- in Chromium -----------------------------------------------------------------------

/// The README's smoke test, spoken: open the page (no console errors), Start, ask three
/// questions through the microphone, hear three answers from the embedded local engines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoken_conversation_in_chromium_on_the_local_engines() {
    if !enabled() {
        return;
    }
    let Some(config) = local::local_config() else {
        return;
    };
    let _engines = super::LOCAL_ENGINES.lock().await;
    let ts = TestServer::start(config).await;
    let questions = [
        "What is the capital of France?",
        "What color is the sky on a clear day?",
        "How many days are in a week?",
    ];
    let mut parts = vec![Part::Silence(1000)];
    for q in questions {
        parts.push(Part::Speech(local::piper_speech(q)));
        // Room for the answer before the next question (a debug build on two busy cores
        // answers in several seconds).
        parts.push(Part::Silence(9000));
    }
    let mic = mic_file("questions", parts);
    let shot = out_dir().join("conversation.png");
    let url = format!("http://{}/", ts.server.local_addr());
    let done_all = "s => Object.values(s.turns).filter(t => t.done || t.interrupted).length >= 3";
    let browser = Browser::run(
        &url,
        &mic.path,
        json!([
            {"do": "goto"},
            {"do": "snapshot", "name": "loaded"},
            {"do": "click", "name": "Start"},
            {"do": "waitStatus", "states": ["speaking"], "timeoutMs": 120000},
            {"do": "sleep", "ms": 700},
            {"do": "screenshot", "path": shot},
            {"do": "waitStats", "until": done_all, "timeoutMs": 180000},
            {"do": "snapshot", "name": "talked"},
            {"do": "click", "name": "Stop"},
            {"do": "snapshot", "name": "stopped"},
        ]),
    );
    let result = browser.result().await;
    no_console_errors(&result);
    if let Ok(dest) = std::env::var("DUPLEX_SCREENSHOT_OUT") {
        std::fs::copy(&shot, dest).unwrap();
    }
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "a screenshot"
    );

    let loaded = snapshot(&result, "loaded");
    assert_eq!(loaded["state"], "idle");
    assert_eq!(loaded["stopDisabled"], true);

    let talked = snapshot(&result, "talked");
    let heard = transcript(talked, "user");
    assert!(heard.len() >= 3, "{talked:#}");
    // Whisper tiny.en on audio through the browser's echo canceller, noise suppressor and
    // AGC: judged over all three questions (one slip such as "sky" -> "guy" is 0.33 of one
    // question's nine words), and each question must still be mostly understood.
    let said = questions.join(" ");
    let understood = heard[..questions.len()].join(" ");
    let total = duplex_replay::wer::wer(&said, &understood);
    assert!(total <= 0.25, "word error rate {total:.2}: heard {heard:?}");
    for (q, h) in questions.iter().zip(&heard) {
        assert!(
            duplex_replay::wer::wer(q, h) <= 0.5,
            "Whisper heard {h:?} for {q:?}"
        );
    }
    let answers = transcript(talked, "assistant");
    assert!(answers.len() >= 3, "{talked:#}");
    assert!(
        answers[0].to_lowercase().contains("paris"),
        "answers: {answers:?}"
    );
    let stats = &talked["stats"];
    assert_eq!(
        stats["ctxRate"], stats["outputRate"],
        "no resampling on playback"
    );
    assert!(stats["marksSent"].as_u64().unwrap() >= 3, "{stats:#}");
    let mut turns: Vec<&Value> = stats["turns"].as_object().unwrap().values().collect();
    turns.sort_by_key(|t| t["turn"].as_u64());
    let origin = file_origin(stats, &mic);
    let ends: Vec<f64> = mic.speech.iter().map(|(_, end)| origin + end).collect();
    let mut latencies = Vec::new();
    for turn in &turns {
        let Some(first) = turn["startedAt"].as_f64() else {
            continue; // interrupted (by the next question) before any of it played
        };
        // The question it answers: the last one that ended before its first sample played
        // (the file loops: the k-th pass's questions end k file lengths later).
        let end = (0..4)
            .flat_map(|k| ends.iter().map(move |e| e + k as f64 * mic.duration))
            .filter(|&e| e < first)
            .max_by(f64::total_cmp)
            .unwrap_or_else(|| panic!("turn {turn:#} played before any question ended"));
        latencies.push(first - end);
    }
    // Real audio of the answers was played, by the page's own counters.
    let played = turns
        .iter()
        .filter(|t| t["playedMs"].as_u64().unwrap_or(0) > 500)
        .count();
    assert!(played >= 2, "turns: {:#}", stats["turns"]);
    // Where the time goes, per question: arrival of each event on the page after the end of
    // speech (page clock), for the note and for whoever makes it faster.
    let events = stats["events"].as_array().unwrap();
    for (i, end) in ends.iter().enumerate() {
        let after = |kind: &str, pred: &dyn Fn(&Value) -> bool| {
            events
                .iter()
                .find(|e| e["type"] == kind && e["t"].as_f64().unwrap() > *end && pred(e))
                .map(|e| ((e["t"].as_f64().unwrap() - end) * 1000.0).round())
        };
        eprintln!(
            "question {}: speech_stopped {:?} ms, final transcript {:?} ms, first text {:?} ms, audio.start {:?} ms",
            i + 1,
            after("vad.speech_stopped", &|_| true),
            after("user_transcript", &|e| e["is_final"] == true),
            after("assistant_message", &|_| true),
            after("assistant_audio.start", &|_| true),
        );
    }
    latencies.sort_by(f64::total_cmp);
    eprintln!(
        "browser, local engines: end of speech -> first assistant sample played: p50 {:.0} ms, max {:.0} ms over {} turns ({:?})",
        percentile(&latencies, 0.5) * 1000.0,
        latencies.last().unwrap() * 1000.0,
        latencies.len(),
        latencies
            .iter()
            .map(|l| (l * 1000.0).round())
            .collect::<Vec<_>>(),
    );

    let stopped = snapshot(&result, "stopped");
    assert_eq!(stopped["stats"]["micActive"], false);
    assert_eq!(stopped["state"], "idle");
    assert_eq!(stopped["startDisabled"], false);
}

/// Speech while the assistant talks flushes the page's playback: the interrupted answer is
/// marked as cut off where the user stopped hearing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barge_in_from_the_browser_flushes_playback() {
    if !enabled() {
        return;
    }
    let ts = TestServer::start(test_config()).await;
    let mic = mic_file(
        "barge_in",
        vec![
            Part::Silence(1000),
            Part::Speech(speech("Hello there, tell me a long story please", 16_000)),
            // The scripted answer (~8 s of audio) starts ~0.6 s after this silence begins.
            Part::Silence(2500),
            Part::Speech(speech("Stop, wait a moment", 16_000)),
            Part::Silence(9000),
        ],
    );
    let url = format!("http://{}/", ts.server.local_addr());
    let browser = Browser::run(
        &url,
        &mic.path,
        json!([
            {"do": "goto"},
            {"do": "click", "name": "Start"},
            {"do": "waitStats", "until": "s => s.flushes.some(f => f.lastPlayedAt !== undefined)"},
            {"do": "sleep", "ms": 500},
            {"do": "snapshot", "name": "after"},
            {"do": "click", "name": "Stop"},
        ]),
    );
    let result = browser.result().await;
    no_console_errors(&result);
    let after = snapshot(&result, "after");
    let stats = &after["stats"];
    let flush = &stats["flushes"][0];
    let turn = &stats["turns"][flush["turn"].to_string()];
    assert!(turn["interrupted"].is_object(), "{stats:#}");
    // Cut short: far less than the ~8 s answer was played.
    let played = turn["playedMs"].as_u64().unwrap();
    assert!((100..6000).contains(&played), "{turn:#}");
    let cut = after["transcript"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "assistant")
        .expect("the answer is shown");
    assert!(
        cut["cut"].as_str().unwrap_or_default().contains("Cut off"),
        "{cut:#}"
    );
    let origin = file_origin(stats, &mic);
    let interrupting = origin + mic.speech[1].0;
    let last = flush["lastPlayedAt"].as_f64().unwrap();
    let latency = last - interrupting;
    eprintln!(
        "browser barge-in: interrupting speech -> last assistant sample played: {:.0} ms (flush reason {})",
        latency * 1000.0,
        flush["reason"]
    );
    // The assistant was still talking when the user started, and stopped soon after (not at
    // the end of its answer, ~6 s later).
    assert!(latency > 0.0 && latency < 3.0, "{latency} s; {stats:#}");
}

/// A JWT deployment whose allow-list holds the page's own origin: without a token the page
/// says why it was refused; with one it talks, usage ticks, and a tiny daily allowance ends
/// in the limit banner with the microphone released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_deployment_auth_error_usage_and_limit_in_chromium() {
    if !enabled() {
        return;
    }
    const SECRET: &str = "browser-test-secret";
    let port = free_port();
    let mut config = test_config();
    config.server.port = port;
    config.auth.allowed_origins = vec![format!("http://127.0.0.1:{port}")];
    config.auth.jwt_secret = Some(duplex_server::auth::Secret(SECRET.into()));
    config.metering.plans = duplex_metering::PlanTable::parse("", Some(3), None).unwrap();
    config.metering.usage_heartbeat = Duration::from_secs(1);
    let _ts = TestServer::start(config).await;
    let mic = mic_file(
        "limit",
        vec![
            Part::Silence(500),
            Part::Speech(speech("Hello", 16_000)),
            Part::Silence(3000),
        ],
    );
    let url = format!("http://127.0.0.1:{port}/");
    let browser = Browser::run(
        &url,
        &mic.path,
        json!([
            {"do": "goto"},
            {"do": "click", "name": "Start"},
            {"do": "waitStatus", "states": ["error"]},
            {"do": "snapshot", "name": "no_token"},
            {"do": "setToken", "token": jwt(SECRET, "user_browser")},
            {"do": "click", "name": "Start"},
            {"do": "waitStatus", "states": ["listening"]},
            {"do": "waitStats", "until": "s => s.usage !== null"},
            {"do": "snapshot", "name": "talking"},
            {"do": "waitStatus", "states": ["limit"]},
            {"do": "snapshot", "name": "limited"},
            // A turn already playing finishes (PROTOCOL.md); then the server closes (4029).
            {"do": "waitEnabled", "id": "start"},
            {"do": "sleep", "ms": 300},
            {"do": "snapshot", "name": "closed"},
        ]),
    );
    let result = browser.result().await;
    let refused = snapshot(&result, "no_token");
    assert!(
        refused["status"]
            .as_str()
            .unwrap()
            .contains("missing bearer token"),
        "{refused:#}"
    );
    assert!(refused["status"].as_str().unwrap().contains("401"));
    assert_eq!(refused["startDisabled"], false, "Start works again");

    let talking = snapshot(&result, "talking");
    assert!(
        talking["usageText"].as_str().unwrap().contains("of 3 s"),
        "{talking:#}"
    );

    let limited = snapshot(&result, "limited");
    assert!(
        limited["banner"]
            .as_str()
            .unwrap()
            .starts_with("Limit reached: daily seconds"),
        "{limited:#}"
    );
    assert_eq!(limited["stats"]["limit"]["limit"], "daily_seconds");
    assert_eq!(
        limited["stats"]["micActive"], false,
        "microphone released at once"
    );
    let closed = snapshot(&result, "closed");
    assert_eq!(
        closed["state"], "limit",
        "the banner's state stays: {closed:#}"
    );
    assert!(
        closed["banner"]
            .as_str()
            .unwrap()
            .starts_with("Limit reached")
    );
    let events = closed["stats"]["events"].as_array().unwrap();
    assert!(
        events.iter().any(|e| e["type"] == "conn.closed"
            && e["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("the plan has no conversation time left"))),
        "closed with 4029: {events:#?}"
    );
    // No reconnect after a limit: one session only.
    assert_eq!(closed["stats"]["sessionIds"].as_array().unwrap().len(), 1);
}

/// The server restarts under an open page: the page reconnects by itself and a new session
/// runs on the same microphone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_reconnects_after_a_server_restart() {
    if !enabled() {
        return;
    }
    let port = free_port();
    let mut config = test_config();
    config.server.port = port;
    config.limits.shutdown_grace = Duration::from_millis(200);
    let first = TestServer::start(config.clone()).await;
    let mic = mic_file(
        "restart",
        vec![Part::Silence(1000), Part::Speech(speech("Hello", 16_000))],
    );
    let url = format!("http://127.0.0.1:{port}/");
    let mut browser = Browser::run(
        &url,
        &mic.path,
        json!([
            {"do": "goto"},
            {"do": "click", "name": "Start"},
            {"do": "waitStatus", "states": ["listening"]},
            {"do": "signal", "name": "restart"},
            {"do": "waitStats", "until": "s => s.readyCount >= 2 && s.status === 'listening'"},
            {"do": "snapshot", "name": "after"},
            {"do": "click", "name": "Stop"},
        ]),
    );
    match browser.next().await {
        Out::Signal(s) => assert_eq!(s, "restart"),
        Out::Done(v) => panic!("finished before the restart: {v:#}"),
    }
    first.server.shutdown_token().cancel();
    first.server.wait().await;
    let _second = TestServer::start(config).await;
    browser.resume().await;
    let result = browser.result().await;
    let after = snapshot(&result, "after");
    let ids = after["stats"]["sessionIds"].as_array().unwrap();
    assert_eq!(ids.len(), 2, "{after:#}");
    assert_ne!(ids[0], ids[1]);
    let history = after["stats"]["statusHistory"].as_array().unwrap();
    assert!(history.contains(&json!("reconnecting")), "{history:?}");
    assert_eq!(
        after["stats"]["micActive"], true,
        "the microphone stayed open"
    );
}
