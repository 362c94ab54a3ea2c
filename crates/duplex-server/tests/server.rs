//! Integration tests of the server over real WebSockets on 127.0.0.1, driven by the project's
//! own client (`duplex-replay`), with speech synthesized by espeak-ng at test time.

use std::sync::OnceLock;
use std::time::Duration;

use duplex_proto::{
    AudioEndReason, ClientMessage, Encoding, ErrorCode, InputText, Ping, ResponseInterrupt,
    ServerMessage, SessionEnd, SessionStart, close_code,
};
use duplex_replay::client::{Client, EventKind};
use duplex_replay::{Mode, SessionConfig, TurnOutcome, Wav, run_session};
use duplex_server::{Config, Metrics, ProviderMode, Server};

mod admin;
mod amplification;
mod auth;
mod billing;
mod browser;
mod cloud;
mod faults;
mod local;
mod metering;
mod ops;
mod soak;

const WAIT: Duration = Duration::from_secs(10);

/// Held by the tests that run conversations on the embedded engines (debug builds of Whisper,
/// the LLM and Piper on two cores): one such test at a time, so that their timing (a question
/// answered before the next one is spoken) does not depend on which other test overlaps.
static LOCAL_ENGINES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Scripted providers with short, realistic delays.
fn test_config() -> Config {
    let mut c = Config::for_tests();
    c.engines.scripted_llm_first_token = Duration::from_millis(30);
    c.engines.scripted_llm_token_interval = Duration::from_millis(2);
    c.engines.scripted_tts_latency = Duration::from_millis(20);
    c.turns.end_of_turn = Duration::from_millis(500);
    // The tests stream speech at 4x real time or as fast as they can; the audio rate bound
    // (`MAX_AUDIO_AHEAD_MS`) has its own tests.
    c.limits.max_audio_ahead = None;
    c
}

struct TestServer {
    server: Server,
    metrics: Metrics,
}

impl TestServer {
    async fn start(config: Config) -> TestServer {
        let metrics = Metrics::new();
        let server = Server::bind(config, metrics.clone())
            .await
            .expect("server binds");
        TestServer { server, metrics }
    }

    fn url(&self) -> String {
        format!("ws://{}/v1/conversation", self.server.local_addr())
    }

    async fn http(&self, path: &str) -> (u16, String) {
        http_get(self.server.local_addr(), path).await
    }
}

/// A minimal HTTP/1.1 GET (the tests need nothing more than status and body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut buf))
        .await
        .expect("response in time")
        .unwrap();
    let status = buf[9..12].parse().expect("status code");
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Speech synthesized with espeak-ng, resampled to `rate`, with 300 ms of silence before.
fn speech(text: &str, rate: u32) -> Wav {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("duplex-server-tests-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    });
    let path = dir.join(format!(
        "{}.wav",
        text.replace(|c: char| !c.is_alphanumeric(), "_")
    ));
    if !path.exists() {
        // Tests run in parallel threads of one process: write under a name of this thread's
        // own and rename, so no test reads a file espeak-ng is still writing.
        let partial = path.with_extension(format!("{:?}.partial", std::thread::current().id()));
        let status = std::process::Command::new("espeak-ng")
            .args(["-v", "en-us", "-s", "170", "-w"])
            .arg(&partial)
            .arg(text)
            .status()
            .expect("espeak-ng must be installed to synthesize test speech (scripts/test.sh installs it)");
        assert!(status.success(), "espeak-ng failed");
        std::fs::rename(&partial, &path).unwrap();
    }
    let mut reader = hound::WavReader::open(&path).unwrap();
    let spec = reader.spec();
    let samples: Vec<i16> = reader.samples::<i16>().map(Result::unwrap).collect();
    let mut r = duplex_audio::Resampler::new(spec.sample_rate, rate).unwrap();
    let mut out = vec![0i16; rate as usize * 3 / 10];
    r.process(&samples, &mut out);
    r.flush(&mut out);
    Wav::from_samples(text, rate, out).unwrap()
}

fn start(rate: u32) -> SessionStart {
    SessionStart {
        sample_rate: rate,
        encoding: Encoding::Pcm16,
        language: None,
        voice: None,
        model: None,
        system_prompt: None,
        output_sample_rate: None,
        output_encoding: None,
    }
}

async fn connect(ts: &TestServer, rate: u32) -> Client {
    let mut c = Client::connect(&ts.url(), Some(start(rate)))
        .await
        .expect("connects");
    c.wait_ready(WAIT).await.expect("session.ready");
    c
}

async fn expect_error(c: &mut Client, code: ErrorCode) -> duplex_proto::ErrorMessage {
    let e = c
        .wait_for(|e| e.error_code().is_some(), WAIT)
        .await
        .expect("an error event");
    match e.kind {
        EventKind::Json(ServerMessage::Error(err)) => {
            assert_eq!(err.code, code, "{err:?}");
            err
        }
        other => unreachable!("{other:?}"),
    }
}

/// The session still answers after a non-fatal error.
async fn still_alive(c: &mut Client) {
    c.send_json(&ClientMessage::Ping(Ping {
        id: Some("alive".into()),
    }))
    .await
    .unwrap();
    let e = c
        .wait_for(|e| matches!(e.json(), Some(ServerMessage::Pong(_))), WAIT)
        .await
        .expect("pong after the error");
    assert!(matches!(e.json(), Some(ServerMessage::Pong(p)) if p.id.as_deref() == Some("alive")));
}

#[tokio::test]
async fn spoken_turn_end_to_end_at_48k() {
    let ts = TestServer::start(test_config()).await;
    let wav = speech("What is the weather like today in Paris?", 48000);
    let mut cfg = SessionConfig::new(ts.url());
    cfg.speed = 4.0;
    let report = run_session(&cfg, &[wav]).await;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let turn = &report.turns[0];
    assert_eq!(turn.outcome, TurnOutcome::Completed, "{turn:#?}");
    assert_eq!(turn.audio_end_reason, Some(AudioEndReason::Complete));
    let transcript = turn.user_transcript.as_deref().unwrap();
    assert!(
        transcript.starts_with("(scripted transcript 1)"),
        "{transcript}"
    );
    let text = turn.assistant_text.as_deref().unwrap();
    assert!(text.contains("scripted test model"), "{text}");
    let m = &turn.metrics;
    let (stop, fin, txt, audio) = (
        m.speech_stopped_ms.unwrap(),
        m.final_transcript_ms.unwrap(),
        m.first_text_ms.unwrap(),
        m.first_audio_ms.unwrap(),
    );
    assert!(stop <= fin && fin <= txt && txt <= audio, "{m:?}");
    assert!(turn.assistant_audio_ms > 1000, "{turn:#?}");
    // The turn is visible in the metrics.
    let (status, body) = ts.http("/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("duplex_turns_total 1"), "{body}");
    assert!(
        body.contains("duplex_stage_latency_seconds_count{stage=\"voice_to_voice\"} 1"),
        "{body}"
    );
}

#[tokio::test]
async fn barge_in_stops_audio_and_reports_what_was_heard() {
    let ts = TestServer::start(test_config()).await;
    let wavs = [
        speech("Tell me a long story please.", 16000),
        speech("Stop, stop.", 16000),
    ];
    let mut cfg = SessionConfig::new(ts.url());
    cfg.turns = 2;
    cfg.speed = 1.0;
    cfg.barge_in_after_ms = Some(600);
    let report = run_session(&cfg, &wavs).await;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let first = &report.turns[0];
    assert_eq!(first.outcome, TurnOutcome::Interrupted, "{first:#?}");
    let m = &first.metrics;
    let interrupt_ms = m.interrupt_ms.expect("interrupted arrived");
    let stop_ms = m.audio_stop_ms.expect("audio stopped");
    // The VAD needs speech_start_ms of voiced audio; then the cut is immediate and at most the
    // frames already in flight arrive after it.
    assert!(interrupt_ms < 1000.0, "{m:?}");
    assert!(stop_ms <= interrupt_ms + 100.0, "{m:?}");
    let interrupted = first
        .interrupted
        .as_ref()
        .expect("the interrupted message is recorded");
    let text = first.assistant_text.clone().unwrap_or_default();
    assert!(
        text.starts_with(&interrupted.heard_text),
        "{interrupted:?} vs {text}"
    );
    assert!(
        interrupted.played_ms <= first.assistant_audio_ms + 20,
        "{interrupted:?} {first:#?}"
    );
    assert_eq!(ts.metrics.interruptions_total.get(), 1);
}

#[tokio::test]
async fn typed_turn_and_explicit_interrupt() {
    let ts = TestServer::start(test_config()).await;
    let mut c = connect(&ts, 16000).await;
    c.send_json(&ClientMessage::InputText(InputText {
        text: "hello".into(),
    }))
    .await
    .unwrap();
    let e = c
        .wait_for(|e| matches!(e.kind, EventKind::Audio(_)), WAIT)
        .await
        .expect("assistant audio");
    let EventKind::Audio(frame) = e.kind else {
        unreachable!()
    };
    assert_eq!(frame.len(), 640, "20 ms of pcm16 at 16 kHz");
    c.send_json(&ClientMessage::ResponseInterrupt(ResponseInterrupt {}))
        .await
        .unwrap();
    let e = c
        .wait_for(
            |e| matches!(e.json(), Some(ServerMessage::Interrupted(_))),
            WAIT,
        )
        .await
        .unwrap();
    let Some(ServerMessage::Interrupted(i)) = e.json() else {
        unreachable!()
    };
    assert_eq!(i.turn_id, 1);
    let e = c
        .wait_for(
            |e| matches!(e.json(), Some(ServerMessage::AssistantAudioEnd(_))),
            WAIT,
        )
        .await
        .unwrap();
    let Some(ServerMessage::AssistantAudioEnd(end)) = e.json() else {
        unreachable!()
    };
    assert_eq!(end.reason, AudioEndReason::Interrupted);
    // No audio of turn 1 after the end; a new typed turn gets turn id 2.
    c.send_json(&ClientMessage::InputText(InputText {
        text: "again".into(),
    }))
    .await
    .unwrap();
    let e = c
        .wait_for(
            |e| matches!(e.json(), Some(ServerMessage::AssistantAudioStart(_))),
            WAIT,
        )
        .await
        .unwrap();
    let Some(ServerMessage::AssistantAudioStart(s)) = e.json() else {
        unreachable!()
    };
    assert_eq!(s.turn_id, 2);
    let log = c.events();
    let end_at = log
        .iter()
        .position(|e| matches!(e.json(), Some(ServerMessage::AssistantAudioEnd(_))))
        .unwrap();
    let start2_at = log.len() - 1;
    assert!(
        log[end_at..start2_at]
            .iter()
            .all(|e| !matches!(e.kind, EventKind::Audio(_))),
        "audio of the interrupted turn arrived after assistant_audio.end"
    );
}

#[tokio::test]
async fn mulaw_8k_session_started_from_query_parameters() {
    let ts = TestServer::start(test_config()).await;
    let url = format!("{}?v=1&sample_rate=8000&encoding=mulaw", ts.url());
    let mut c = Client::connect(&url, None).await.unwrap();
    let ready = c.wait_ready(WAIT).await.unwrap();
    assert_eq!(ready.input.encoding, Encoding::Mulaw);
    assert_eq!(
        (ready.output.encoding, ready.output.sample_rate),
        (Encoding::Mulaw, 8000)
    );
    assert_eq!(ready.providers.stt, "scripted");
    c.send_json(&ClientMessage::InputText(InputText { text: "hi".into() }))
        .await
        .unwrap();
    let e = c
        .wait_for(|e| matches!(e.kind, EventKind::Audio(_)), WAIT)
        .await
        .unwrap();
    let EventKind::Audio(frame) = e.kind else {
        unreachable!()
    };
    assert_eq!(frame.len(), 160, "20 ms of mu-law at 8 kHz");
    // A spoken turn in mu-law is endpointed and transcribed too.
    let wav = speech("Can you hear me on the phone?", 8000);
    let mut bytes = Vec::new();
    duplex_audio::codec::encode_mulaw(&wav.samples, &mut bytes);
    bytes.extend(std::iter::repeat_n(0xFFu8, 8000)); // 1 s of mu-law silence
    for chunk in bytes.chunks(160) {
        c.send_audio(chunk).await.unwrap();
    }
    c.wait_for(
        |e| matches!(e.json(), Some(ServerMessage::UserTranscript(t)) if t.is_final && t.text.contains("scripted transcript")),
        WAIT,
    )
    .await
    .expect("final transcript of the mu-law utterance");
}

#[tokio::test]
async fn bad_inputs_get_precise_errors_and_the_session_survives() {
    let ts = TestServer::start(test_config()).await;
    let mut c = Client::connect(&ts.url(), None).await.unwrap();
    // Before session.start.
    c.send_binary_raw(vec![0; 640]).await.unwrap();
    expect_error(&mut c, ErrorCode::AudioBeforeSessionStart).await;
    c.send_json(&ClientMessage::InputText(InputText { text: "x".into() }))
        .await
        .unwrap();
    expect_error(&mut c, ErrorCode::SessionNotStarted).await;
    c.send_text_raw(r#"{"type":"session.start","sample_rate":11025}"#)
        .await
        .unwrap();
    expect_error(&mut c, ErrorCode::UnsupportedSampleRate).await;
    c.send_text_raw(r#"{"type":"session.start","sample_rate":16000,"encoding":"opus"}"#)
        .await
        .unwrap();
    let err = c
        .wait_for(|e| e.error_code().is_some(), WAIT)
        .await
        .unwrap();
    assert!(
        matches!(
            err.error_code(),
            Some(ErrorCode::UnsupportedEncoding | ErrorCode::InvalidMessage)
        ),
        "{err:?}"
    );
    still_alive(&mut c).await;
    // Start properly.
    c.send_json(&ClientMessage::SessionStart(start(16000)))
        .await
        .unwrap();
    c.wait_for(
        |e| matches!(e.json(), Some(ServerMessage::SessionReady(_))),
        WAIT,
    )
    .await
    .unwrap();
    c.send_json(&ClientMessage::SessionStart(start(16000)))
        .await
        .unwrap();
    expect_error(&mut c, ErrorCode::SessionAlreadyStarted).await;
    c.send_text_raw("{not json").await.unwrap();
    expect_error(&mut c, ErrorCode::MalformedJson).await;
    c.send_text_raw(r#"{"type":"dance"}"#).await.unwrap();
    expect_error(&mut c, ErrorCode::UnknownMessageType).await;
    c.send_text_raw(r#"{"type":"playback.mark","turn_id":"one"}"#)
        .await
        .unwrap();
    expect_error(&mut c, ErrorCode::InvalidMessage).await;
    c.send_binary_raw(vec![0; 641]).await.unwrap();
    expect_error(&mut c, ErrorCode::OddFrameLength).await;
    still_alive(&mut c).await;
    // After session.end: an error for what is still in flight, then a normal close.
    c.send_json(&ClientMessage::SessionEnd(SessionEnd {}))
        .await
        .unwrap();
    c.send_json(&ClientMessage::InputText(InputText {
        text: "late".into(),
    }))
    .await
    .unwrap();
    expect_error(&mut c, ErrorCode::SessionEnded).await;
    let e = c
        .wait_for(|e| e.close_code().is_some(), WAIT)
        .await
        .unwrap();
    assert_eq!(e.close_code(), Some(close_code::NORMAL));
    let (_, metrics) = ts.http("/metrics").await;
    assert!(
        metrics.contains("duplex_errors_total{code=\"odd_frame_length\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn unsupported_query_parameters_get_an_error_event() {
    let ts = TestServer::start(test_config()).await;
    let url = format!("{}?sample_rate=16000&encoding=opus", ts.url());
    let mut c = Client::connect(&url, None).await.unwrap();
    expect_error(&mut c, ErrorCode::UnsupportedEncoding).await;
    let url = format!("{}?sample_rate=12345", ts.url());
    let mut c = Client::connect(&url, None).await.unwrap();
    expect_error(&mut c, ErrorCode::UnsupportedSampleRate).await;
    still_alive(&mut c).await;
    let url = format!("{}?v=1&sample_rate=16000&colour=blue", ts.url());
    let mut c = Client::connect(&url, None).await.unwrap();
    expect_error(&mut c, ErrorCode::InvalidMessage).await;
    // No version selected (no subprotocol, no `?v=`) is refused before the upgrade.
    let err = tokio_tungstenite::connect_async(ts.url())
        .await
        .expect_err("refused");
    assert!(
        matches!(&err, tokio_tungstenite::tungstenite::Error::Http(r) if r.status() == 400),
        "{err}"
    );
    // An unknown protocol version is refused before the upgrade.
    let url = format!("{}?v=2", ts.url());
    let err = Client::connect(&url, None)
        .await
        .err()
        .expect("v=2 is refused");
    assert!(err.to_string().contains("400"), "{err}");
}

#[tokio::test]
async fn oversized_message_closes_with_1009() {
    let mut config = test_config();
    config.limits.max_message_bytes = 4096;
    let ts = TestServer::start(config).await;
    let mut c = connect(&ts, 16000).await;
    c.send_binary_raw(vec![0; 640]).await.unwrap();
    c.send_binary_raw(vec![0; 8192]).await.unwrap();
    let err = expect_error(&mut c, ErrorCode::MessageTooLarge).await;
    assert!(err.fatal);
    let e = c
        .wait_for(|e| e.close_code().is_some(), WAIT)
        .await
        .unwrap();
    assert_eq!(e.close_code(), Some(close_code::MESSAGE_TOO_BIG));
    // The server keeps serving others.
    let mut c2 = connect(&ts, 16000).await;
    still_alive(&mut c2).await;
}

#[tokio::test]
async fn provider_faults_are_reported_and_the_session_recovers() {
    let ts = TestServer::start(test_config()).await;
    let mut c = connect(&ts, 16000).await;
    c.send_json(&ClientMessage::InputText(InputText {
        text: "[[llm_error]]".into(),
    }))
    .await
    .unwrap();
    let err = expect_error(&mut c, ErrorCode::LlmError).await;
    assert!(!err.fatal);
    c.send_json(&ClientMessage::InputText(InputText {
        text: "[[llm_error_mid]]".into(),
    }))
    .await
    .unwrap();
    expect_error(&mut c, ErrorCode::LlmError).await;
    // The words before the fault are still spoken, and the audio ends with reason `error`.
    let e = c
        .wait_for(
            |e| matches!(e.json(), Some(ServerMessage::AssistantAudioEnd(_))),
            WAIT,
        )
        .await
        .unwrap_or_else(|err| {
            let labels: Vec<String> = c.events().iter().map(|e| e.label()).collect();
            panic!("{err}: {labels:#?}")
        });
    assert!(
        matches!(e.json(), Some(ServerMessage::AssistantAudioEnd(a)) if a.reason == AudioEndReason::Error)
    );
    c.send_json(&ClientMessage::InputText(InputText {
        text: "now [[tts_error]] please".into(),
    }))
    .await
    .unwrap();
    expect_error(&mut c, ErrorCode::TtsError).await;
    // The chunks before the failing one were spoken; the audio ends with reason `error`.
    let e = c
        .wait_for(
            |e| matches!(e.json(), Some(ServerMessage::AssistantAudioEnd(_))),
            WAIT,
        )
        .await
        .unwrap();
    assert!(
        matches!(e.json(), Some(ServerMessage::AssistantAudioEnd(a)) if a.reason == AudioEndReason::Error)
    );
    // A normal turn works afterwards.
    c.send_json(&ClientMessage::InputText(InputText {
        text: "fine now".into(),
    }))
    .await
    .unwrap();
    let e = c
        .wait_for(
            |e| matches!(e.json(), Some(ServerMessage::AssistantAudioEnd(_))),
            WAIT,
        )
        .await
        .unwrap();
    assert!(
        matches!(e.json(), Some(ServerMessage::AssistantAudioEnd(a)) if a.reason == AudioEndReason::Complete)
    );
}

#[tokio::test]
async fn idle_sessions_are_closed() {
    let mut config = test_config();
    config.limits.idle_timeout = Duration::from_secs(1);
    let ts = TestServer::start(config).await;
    let mut c = connect(&ts, 16000).await;
    let err = expect_error(&mut c, ErrorCode::IdleTimeout).await;
    assert!(err.fatal);
    let e = c
        .wait_for(|e| e.close_code().is_some(), WAIT)
        .await
        .unwrap();
    assert_eq!(e.close_code(), Some(close_code::IDLE_TIMEOUT));
}

/// A connection that never starts a session cannot stay by pinging: it is closed at the
/// pre-start deadline.
#[tokio::test]
async fn a_connection_without_a_session_is_closed_at_the_pre_start_deadline() {
    let mut config = test_config();
    config.limits.pre_start_timeout = Duration::from_secs(1);
    let ts = TestServer::start(config).await;
    let mut c = Client::connect(&ts.url(), None).await.expect("connects");
    let started = std::time::Instant::now();
    // Pings every 200 ms (they reset the idle timer, not this one).
    let err = loop {
        c.send_json(&ClientMessage::Ping(Ping { id: None }))
            .await
            .expect("still open while pinging");
        if let Ok(e) = c
            .wait_for(|e| e.error_code().is_some(), Duration::from_millis(200))
            .await
        {
            break e;
        }
        assert!(started.elapsed() < WAIT, "never closed");
    };
    assert!(
        matches!(err.json(), Some(ServerMessage::Error(e)) if e.code == ErrorCode::StartTimeout && e.fatal),
        "{err:?}"
    );
    let e = c
        .wait_for(|e| e.close_code().is_some(), WAIT)
        .await
        .unwrap();
    assert_eq!(e.close_code(), Some(close_code::IDLE_TIMEOUT));
    assert!(started.elapsed() >= Duration::from_millis(900));
}

/// Strings a client could make the server echo or process without bound are capped.
#[tokio::test]
async fn long_ping_ids_and_typed_turns_are_refused_with_invalid_message() {
    let mut config = test_config();
    config.limits.max_input_text_chars = 20;
    let ts = TestServer::start(config).await;
    let mut c = connect(&ts, 16000).await;
    c.send_json(&ClientMessage::Ping(Ping {
        id: Some("x".repeat(10_000)),
    }))
    .await
    .unwrap();
    let err = expect_error(&mut c, ErrorCode::InvalidMessage).await;
    assert!(err.message.contains("ping id longer than"), "{err:?}");
    assert!(
        !c.events()
            .iter()
            .any(|e| matches!(e.json(), Some(ServerMessage::Pong(_)))),
        "no pong echoes the long id"
    );
    c.send_json(&ClientMessage::InputText(InputText {
        text: "é".repeat(21),
    }))
    .await
    .unwrap();
    let err = expect_error(&mut c, ErrorCode::InvalidMessage).await;
    assert!(err.message.contains("MAX_INPUT_TEXT_CHARS"), "{err:?}");
    still_alive(&mut c).await;
    // At the limit, the turn runs.
    c.send_json(&ClientMessage::InputText(InputText {
        text: "é".repeat(20),
    }))
    .await
    .unwrap();
    c.wait_for(
        |e| matches!(e.json(), Some(ServerMessage::AssistantMessage(_))),
        WAIT,
    )
    .await
    .expect("the assistant answers a text at the limit");
}

#[tokio::test]
async fn connection_caps_refuse_before_upgrade() {
    let mut config = test_config();
    config.limits.max_connections_per_ip = 2;
    let ts = TestServer::start(config).await;
    let _a = connect(&ts, 16000).await;
    let _b = connect(&ts, 16000).await;
    let err = Client::connect(&ts.url(), None)
        .await
        .err()
        .expect("third is refused");
    assert!(err.to_string().contains("429"), "{err}");
    drop(_a);
    // The slot frees once the first session ends.
    let mut ok = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if Client::connect(&ts.url(), None).await.is_ok() {
            ok = true;
            break;
        }
    }
    assert!(ok, "a slot frees after a session ends");

    let mut config = test_config();
    config.limits.max_connections = 1;
    let ts = TestServer::start(config).await;
    let _a = connect(&ts, 16000).await;
    let err = Client::connect(&ts.url(), None)
        .await
        .err()
        .expect("second is refused");
    assert!(err.to_string().contains("503"), "{err}");
}

#[tokio::test]
async fn graceful_shutdown_lets_the_turn_finish() {
    let ts = TestServer::start(test_config()).await;
    let (status, _) = ts.http("/healthz").await;
    assert_eq!(status, 200);
    assert_eq!(ts.http("/readyz").await.0, 200);
    let mut busy = connect(&ts, 16000).await;
    let mut idle = connect(&ts, 16000).await;
    busy.send_json(&ClientMessage::InputText(InputText {
        text: "one more".into(),
    }))
    .await
    .unwrap();
    busy.wait_for(|e| matches!(e.kind, EventKind::Audio(_)), WAIT)
        .await
        .unwrap();
    let addr = ts.server.local_addr();
    let token = ts.server.shutdown_token();
    token.cancel();
    let wait = tokio::spawn(ts.server.wait());
    // The idle session is told and closed at once.
    expect_error(&mut idle, ErrorCode::ServerShuttingDown).await;
    let e = idle
        .wait_for(|e| e.close_code().is_some(), WAIT)
        .await
        .unwrap();
    assert_eq!(e.close_code(), Some(close_code::GOING_AWAY));
    // The busy one finishes its turn first.
    let end = busy
        .wait_for(
            |e| matches!(e.json(), Some(ServerMessage::AssistantAudioEnd(_))),
            WAIT,
        )
        .await
        .unwrap();
    assert!(
        matches!(end.json(), Some(ServerMessage::AssistantAudioEnd(a)) if a.reason == AudioEndReason::Complete)
    );
    let e = busy
        .wait_for(|e| e.close_code().is_some(), WAIT)
        .await
        .unwrap();
    assert_eq!(e.close_code(), Some(close_code::GOING_AWAY));
    tokio::time::timeout(WAIT, wait)
        .await
        .expect("server drained")
        .unwrap();
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn echo_mode_returns_one_frame_per_frame() {
    let mut config = test_config();
    config.engines.providers = ProviderMode::Echo;
    let ts = TestServer::start(config).await;
    let wav = speech("Echo test.", 16000);
    let mut cfg = SessionConfig::new(ts.url());
    cfg.mode = Mode::Echo;
    cfg.speed = 0.0;
    let report = run_session(&cfg, std::slice::from_ref(&wav)).await;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let frames = wav.frames().len() as u64;
    assert_eq!(report.frames_sent, frames);
    assert_eq!(report.frames_received, frames, "{report:?}");
    assert_eq!(ts.metrics.frames_in_total.get(), frames);
}

/// The session reads and writes its socket in one task, and flushes only when it has nothing
/// left to read: a lone frame must still go out with no traffic after it, and a burst must come
/// back whole, byte for byte and in order.
#[tokio::test]
async fn echoes_come_back_in_order_alone_or_in_a_burst() {
    let mut config = test_config();
    config.engines.providers = ProviderMode::Echo;
    let ts = TestServer::start(config).await;
    let mut c = connect(&ts, 16000).await;
    // 20 ms at 16 kHz, different for every i.
    let frame = |i: u16| -> Vec<u8> {
        (0..320u16)
            .flat_map(|k| (k.wrapping_mul(97) ^ i.wrapping_mul(31)).to_le_bytes())
            .collect()
    };
    async fn next_audio(c: &mut Client) -> Vec<u8> {
        let e = c
            .wait_for(|e| matches!(e.kind, EventKind::Audio(_)), WAIT)
            .await
            .expect("an echoed frame");
        match e.kind {
            EventKind::Audio(b) => b,
            other => unreachable!("{other:?}"),
        }
    }
    c.send_binary_raw(frame(1)).await.unwrap();
    assert_eq!(next_audio(&mut c).await, frame(1), "the lone frame");
    // 1 s of audio at once: within the real-time allowance, so every frame is echoed.
    for i in 2..52 {
        c.send_binary_raw(frame(i)).await.unwrap();
    }
    for i in 2..52 {
        assert_eq!(next_audio(&mut c).await, frame(i), "frame {i} of the burst");
    }
    assert_eq!(ts.metrics.frames_out_total.get(), 51);
}

/// Audio sent faster than real time is cut at the allowance (`MAX_AUDIO_AHEAD_MS`, 2 s by
/// default): the excess is dropped and counted, the client is told once, and the session goes
/// on.
#[tokio::test]
async fn audio_faster_than_real_time_is_dropped_beyond_the_allowance() {
    let mut config = test_config();
    config.engines.providers = ProviderMode::Echo;
    config.limits.max_audio_ahead = Some(Duration::from_secs(2));
    let ts = TestServer::start(config).await;
    let mut c = connect(&ts, 16000).await;
    // 4 s of 20 ms frames in one go.
    for _ in 0..200 {
        c.send_binary_raw(vec![0u8; 640]).await.unwrap();
    }
    let err = expect_error(&mut c, ErrorCode::AudioTooFast).await;
    assert!(!err.fatal);
    still_alive(&mut c).await;
    let dropped = ts.metrics.audio_too_fast_total.get();
    let echoed = ts.metrics.frames_out_total.get();
    // 2 s of allowance plus whatever real time passed while sending: at least 100 frames
    // pass, and (on any machine that sends 200 small frames in under 2 s) some are dropped;
    // every frame is either echoed or dropped.
    assert!(dropped > 0 && dropped <= 100, "dropped {dropped}");
    assert_eq!(ts.metrics.frames_in_total.get(), 200);
    assert_eq!(echoed + dropped, 200, "echoed {echoed}, dropped {dropped}");
    assert_eq!(
        ts.metrics
            .errors_total
            .with_label_values(&["audio_too_fast"])
            .get(),
        1
    );
}

#[tokio::test]
async fn slow_consumer_is_disconnected_with_bounded_memory() {
    let mut config = test_config();
    config.engines.providers = ProviderMode::Echo;
    let ts = TestServer::start(config).await;
    // A raw client that sends many frames and never reads: the echoes pile up in the socket
    // buffers, then in the bounded writer queue, and the server gives up on it.
    let mut c = connect(&ts, 16000).await;
    let frame = vec![0u8; 16000];
    let mut closed = false;
    for _ in 0..20_000 {
        if c.send_binary_raw(frame.clone()).await.is_err() {
            closed = true;
            break;
        }
        if ts
            .metrics
            .errors_total
            .with_label_values(&["slow_consumer"])
            .get()
            > 0
        {
            closed = true;
            break;
        }
    }
    assert!(
        closed,
        "the server never gave up on a client that does not read"
    );
    assert_eq!(
        ts.metrics
            .errors_total
            .with_label_values(&["slow_consumer"])
            .get(),
        1
    );
    drop(c);
    for _ in 0..100 {
        if ts.metrics.active_sessions.get() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ts.metrics.active_sessions.get(), 0);
}

/// Reads from a raw socket until the server closes it (EOF or reset); what it sent.
async fn read_until_closed(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn a_stalled_request_head_is_closed_at_the_header_read_timeout() {
    use tokio::io::AsyncWriteExt;
    let timeout = Duration::from_millis(400);
    let mut config = test_config();
    config.limits.header_read_timeout = timeout;
    let ts = TestServer::start(config).await;
    let addr = ts.server.local_addr();
    // Half a request line, then nothing (slowloris); and a connection that never says a word.
    let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
    half.write_all(b"GET /v1/conversation?v=1 HT")
        .await
        .unwrap();
    let mut mute = tokio::net::TcpStream::connect(addr).await.unwrap();
    let t0 = std::time::Instant::now();
    for s in [&mut half, &mut mute] {
        tokio::time::timeout(timeout + Duration::from_secs(2), read_until_closed(s))
            .await
            .expect("closed by the server within the header read timeout");
    }
    let took = t0.elapsed();
    assert!(took >= timeout - Duration::from_millis(50), "{took:?}");
    // A client that sends its request in time is served, and a session runs past the timeout.
    assert_eq!(ts.http("/healthz").await.0, 200);
    let mut c = connect(&ts, 16000).await;
    tokio::time::sleep(timeout * 2).await;
    still_alive(&mut c).await;
}

#[tokio::test]
async fn connections_past_the_pending_cap_are_refused_and_sessions_go_on() {
    use tokio::io::AsyncWriteExt;
    let timeout = Duration::from_secs(2);
    let mut config = test_config();
    config.limits.header_read_timeout = timeout;
    config.limits.max_pending_connections = 2;
    let ts = TestServer::start(config).await;
    let addr = ts.server.local_addr();
    // An established session holds no pending slot.
    let mut session = connect(&ts, 16000).await;
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        stalled.push(s);
    }
    // Both stalled connections are accepted before the next one arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = std::time::Instant::now();
    let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
    let answer = tokio::time::timeout(WAIT, read_until_closed(&mut third))
        .await
        .expect("closed");
    assert!(
        t0.elapsed() < timeout,
        "refused at accept, not at the header timeout: {:?}",
        t0.elapsed()
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    let metrics = ts.metrics.render();
    assert!(
        metrics.contains(r#"duplex_connections_rejected_total{reason="pending"} 1"#),
        "{metrics}"
    );
    // The session is unaffected.
    still_alive(&mut session).await;
    // Once the stalled connections time out, new ones are served again.
    for s in &mut stalled {
        tokio::time::timeout(WAIT, read_until_closed(s))
            .await
            .expect("stalled connection closed at the header timeout");
    }
    assert_eq!(ts.http("/healthz").await.0, 200);
    still_alive(&mut session).await;
}
