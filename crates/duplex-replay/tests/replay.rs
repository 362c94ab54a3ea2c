//! The replayer against a fake duplex server on loopback.
//!
//! The fake speaks `duplex.v1` just enough: it answers `session.start` with `session.ready`,
//! detects speech by energy (any non-zero sample), ends the user's turn at the first silent
//! frame after speech, and then plays a scripted assistant turn. Speech during assistant audio
//! interrupts it. In echo mode it returns every binary frame. Every test runs under a timeout.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use duplex_proto::{
    AssistantAudioEnd, AssistantAudioStart, AssistantMessage, AudioEndReason, AudioFormat,
    ClientMessage, Encoding, ErrorCode, Interrupted, PlanInfo, PlanLimits, ProviderNames,
    ServerMessage, SessionReady, SpeechStarted, SpeechStopped, UserTranscript,
};
use duplex_replay::load::SCHEDULE_LEAD;
use duplex_replay::{
    Client, Error, EventKind, LoadConfig, LoadReport, Mode, SessionConfig, TurnOutcome, Wav,
    percentile, run_load, run_session,
};
use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex as AsyncMutex;
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Upper bound of any single test: the slowest one runs well under 5 s.
const TEST_TIMEOUT: Duration = Duration::from_secs(30);
const RATE: u32 = 16000;
/// Bytes of one 20 ms assistant frame at 16 kHz PCM16.
const OUT_FRAME_BYTES: usize = 640;

// ---------------------------------------------------------------------------------------------
// The fake server
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Default)]
struct Fake {
    /// Return every binary frame instead of running turns.
    echo: bool,
    /// Send an invalid JSON text right after `session.ready`.
    garbage_after_ready: bool,
    /// Send a binary frame outside any assistant audio stream right after `session.ready`.
    stray_audio: bool,
    /// Send `usage_update` instead of `session.ready`.
    no_ready: bool,
    /// Assistant audio frames per turn, and the gap between them.
    audio_frames: usize,
    audio_gap_ms: u64,
}

/// What the fake saw from clients.
#[derive(Default)]
struct Seen {
    marks: Vec<(u64, u64)>,
    texts: Vec<String>,
    binary_frames: usize,
    /// When each user turn's speech began (its first loud frame arrived).
    speech_starts: Vec<tokio::time::Instant>,
}

type Sink = Arc<AsyncMutex<SplitSink<WebSocketStream<TcpStream>, Message>>>;

struct FakeServer {
    url: String,
    seen: Arc<Mutex<Seen>>,
    accept: JoinHandle<()>,
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn start_fake(fake: Fake) -> FakeServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/v1/conversation", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Seen::default()));
    let seen2 = Arc::clone(&seen);
    let accept = tokio::spawn(async move {
        // Bounded by the test: the listener goes when the FakeServer is dropped.
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(serve(tcp, fake.clone(), Arc::clone(&seen2)));
        }
    });
    FakeServer { url, seen, accept }
}

async fn send(sink: &Sink, msg: ServerMessage) {
    let _ = sink.lock().await.send(Message::text(msg.to_json())).await;
}

// tungstenite's handshake callback returns its `ErrorResponse` (an HTTP response) by value.
#[allow(clippy::result_large_err)]
async fn serve(tcp: TcpStream, fake: Fake, seen: Arc<Mutex<Seen>>) {
    let callback = |req: &Request, mut resp: Response| {
        if req.headers().get("Sec-WebSocket-Protocol").is_some() {
            resp.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                HeaderValue::from_static("duplex.v1"),
            );
        }
        Ok(resp)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else {
        return;
    };
    let (sink, mut stream) = ws.split();
    let sink: Sink = Arc::new(AsyncMutex::new(sink));
    let mut in_speech = false;
    let mut next_turn_id = 1;
    let mut turn: Option<(u64, JoinHandle<()>)> = None;
    let mut last_mark = 0;
    let mut audio_ms = 0u64;

    while let Some(Ok(msg)) = stream.next().await {
        match msg {
            Message::Text(text) => {
                seen.lock().unwrap().texts.push(text.to_string());
                match duplex_proto::parse_client_message(text.as_str()) {
                    Ok(ClientMessage::SessionStart(s)) => {
                        if fake.no_ready {
                            send(&sink, usage()).await;
                            continue;
                        }
                        send(&sink, ready(s.sample_rate)).await;
                        if fake.garbage_after_ready {
                            let _ = sink.lock().await.send(Message::text("{not json")).await;
                        }
                        if fake.stray_audio {
                            let frame = vec![0u8; OUT_FRAME_BYTES];
                            let _ = sink.lock().await.send(Message::binary(frame)).await;
                        }
                    }
                    Ok(ClientMessage::PlaybackMark(m)) => {
                        last_mark = m.played_ms;
                        seen.lock().unwrap().marks.push((m.turn_id, m.played_ms));
                    }
                    Ok(ClientMessage::SessionEnd(_)) => {
                        close(&sink, CloseCode::Normal, "session ended").await;
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        // What the real server does with a malformed message.
                        send(&sink, ServerMessage::error(e.code(), e.to_string(), true)).await;
                        close(&sink, CloseCode::Protocol, "protocol error").await;
                        return;
                    }
                }
            }
            Message::Binary(bytes) => {
                seen.lock().unwrap().binary_frames += 1;
                if fake.echo {
                    let _ = sink.lock().await.send(Message::binary(bytes)).await;
                    continue;
                }
                let loud = bytes.iter().any(|&b| b != 0);
                if loud && !in_speech {
                    in_speech = true;
                    seen.lock()
                        .unwrap()
                        .speech_starts
                        .push(tokio::time::Instant::now());
                    send(
                        &sink,
                        ServerMessage::SpeechStarted(SpeechStarted { audio_ms: 0 }),
                    )
                    .await;
                    if let Some((id, task)) = turn.take()
                        && !task.is_finished()
                    {
                        task.abort();
                        let _ = task.await;
                        let end = AssistantAudioEnd {
                            turn_id: id,
                            duration_ms: audio_ms,
                            reason: AudioEndReason::Interrupted,
                        };
                        send(&sink, ServerMessage::AssistantAudioEnd(end)).await;
                        let x = Interrupted {
                            turn_id: id,
                            played_ms: last_mark,
                            heard_text: "Hello".into(),
                        };
                        send(&sink, ServerMessage::Interrupted(x)).await;
                    }
                } else if !loud && in_speech {
                    in_speech = false;
                    let id = next_turn_id;
                    next_turn_id += 1;
                    audio_ms = (fake.audio_frames * 20) as u64;
                    let task = tokio::spawn(assistant_turn(Arc::clone(&sink), fake.clone(), id));
                    turn = Some((id, task));
                }
            }
            _ => {}
        }
    }
}

/// A scripted assistant turn; 10 ms between steps so every metric is distinct and ordered.
async fn assistant_turn(sink: Sink, fake: Fake, turn_id: u64) {
    let step = Duration::from_millis(10);
    send(
        &sink,
        ServerMessage::SpeechStopped(SpeechStopped { audio_ms: 0 }),
    )
    .await;
    tokio::time::sleep(step).await;
    let transcript = UserTranscript {
        text: "hi there".into(),
        is_final: true,
    };
    send(&sink, ServerMessage::UserTranscript(transcript)).await;
    tokio::time::sleep(step).await;
    let delta = AssistantMessage {
        turn_id,
        delta: Some("Hello".into()),
        text: None,
        is_final: false,
    };
    send(&sink, ServerMessage::AssistantMessage(delta)).await;
    tokio::time::sleep(step).await;
    let format = AudioFormat {
        encoding: Encoding::Pcm16,
        sample_rate: RATE,
    };
    send(
        &sink,
        ServerMessage::AssistantAudioStart(AssistantAudioStart { turn_id, format }),
    )
    .await;
    let fin = AssistantMessage {
        turn_id,
        delta: None,
        text: Some("Hello".into()),
        is_final: true,
    };
    send(&sink, ServerMessage::AssistantMessage(fin)).await;
    tokio::time::sleep(step).await;
    for _ in 0..fake.audio_frames {
        let _ = sink
            .lock()
            .await
            .send(Message::binary(vec![1u8; OUT_FRAME_BYTES]))
            .await;
        tokio::time::sleep(Duration::from_millis(fake.audio_gap_ms)).await;
    }
    let end = AssistantAudioEnd {
        turn_id,
        duration_ms: (fake.audio_frames * 20) as u64,
        reason: AudioEndReason::Complete,
    };
    send(&sink, ServerMessage::AssistantAudioEnd(end)).await;
}

async fn close(sink: &Sink, code: CloseCode, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: reason.to_string().into(),
    };
    let _ = sink.lock().await.send(Message::Close(Some(frame))).await;
}

fn ready(rate: u32) -> ServerMessage {
    let format = AudioFormat {
        encoding: Encoding::Pcm16,
        sample_rate: rate,
    };
    ServerMessage::SessionReady(SessionReady {
        session_id: "fake-session".into(),
        protocol: "duplex.v1".into(),
        input: format,
        output: AudioFormat {
            encoding: Encoding::Pcm16,
            sample_rate: RATE,
        },
        output_frame_ms: 20,
        plan: PlanInfo {
            name: "unmetered".into(),
            limits: PlanLimits::default(),
        },
        providers: ProviderNames {
            stt: "fake".into(),
            llm: "fake".into(),
            tts: "fake".into(),
        },
    })
}

fn usage() -> ServerMessage {
    ServerMessage::UsageUpdate(duplex_proto::UsageUpdate {
        plan: "free".into(),
        seconds_used_today: 0,
        seconds_remaining: None,
        session_seconds: 0,
    })
}

// ---------------------------------------------------------------------------------------------
// Test input
// ---------------------------------------------------------------------------------------------

fn temp_path(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "duplex-replay-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Writes a WAV of a 440 Hz tone (never a zero sample run long enough to matter: the fake
/// treats any non-zero byte in a frame as speech).
fn write_tone(name: &str, rate: u32, channels: u16, bits: u16, ms: u32) -> PathBuf {
    let path = temp_path(name);
    let spec = hound::WavSpec {
        channels,
        sample_rate: rate,
        bits_per_sample: bits,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(&path, spec).unwrap();
    let n = rate * ms / 1000;
    for i in 0..n {
        let v = (f64::from(i) * 440.0 * std::f64::consts::TAU / f64::from(rate)).sin();
        for ch in 0..channels {
            match bits {
                16 => w
                    .write_sample((v * 8000.0) as i16 + 1 + ch as i16 * 100)
                    .unwrap(),
                _ => w.write_sample((v * 100.0) as i8).unwrap(),
            }
        }
    }
    w.finalize().unwrap();
    path
}

fn tone(ms: u32) -> Wav {
    Wav::load(write_tone("tone.wav", RATE, 1, 16, ms)).unwrap()
}

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test timed out")
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn percentile_is_nearest_rank() {
    let data: Vec<f64> = (1..=20).map(|v| f64::from(v) * 10.0).collect();
    assert_eq!(percentile(&data, 50.0), Some(100.0));
    assert_eq!(percentile(&data, 95.0), Some(190.0));
    assert_eq!(percentile(&data, 99.0), Some(200.0));
    assert_eq!(percentile(&[1.0, 2.0, 3.0], 50.0), Some(2.0));
    assert_eq!(percentile(&[], 50.0), None);
}

#[test]
fn wav_loading_checks_format_and_downmixes() {
    let mono = Wav::load(write_tone("mono8k.wav", 8000, 1, 16, 100)).unwrap();
    assert_eq!((mono.sample_rate, mono.samples.len()), (8000, 800));
    assert_eq!(mono.frame_samples(), 160);
    assert_eq!(mono.frames().len(), 5);

    // Left is v+1, right is v+101: the average is v+51.
    let stereo = Wav::load(write_tone("stereo48k.wav", 48000, 2, 16, 50)).unwrap();
    assert_eq!(stereo.samples.len(), 2400);
    assert_eq!(stereo.samples[0], 51);

    // 44.1 kHz: 882-sample frames; the last, partial frame is padded with silence.
    let odd = Wav::load(write_tone("cd.wav", 44100, 1, 16, 30)).unwrap();
    let frames = odd.frames();
    assert_eq!(frames.len(), 2);
    assert!(frames.iter().all(|f| f.len() == 882 * 2));
    assert!(frames[1][(1323 - 882) * 2..].iter().all(|&b| b == 0));

    let err = Wav::load(write_tone("radio.wav", 22050, 1, 16, 10))
        .unwrap_err()
        .to_string();
    assert!(err.contains("22050"), "{err}");
    let err = Wav::load(write_tone("8bit.wav", 16000, 1, 8, 10))
        .unwrap_err()
        .to_string();
    assert!(err.contains("16-bit"), "{err}");
    assert!(matches!(
        Wav::load(temp_path("missing.wav")),
        Err(Error::WavRead { .. })
    ));
}

#[test]
fn config_validation() {
    let wavs = vec![tone(40)];
    let mut cfg = SessionConfig::new("ws://127.0.0.1:1/v1/conversation");
    assert!(cfg.validate(&wavs).is_ok());
    cfg.speed = 0.5;
    assert!(cfg.validate(&wavs).is_err());
    cfg.speed = 0.0;
    assert!(cfg.validate(&wavs).is_ok());
    let mixed = vec![
        tone(40),
        Wav::load(write_tone("m.wav", 8000, 1, 16, 40)).unwrap(),
    ];
    assert!(
        cfg.validate(&mixed)
            .unwrap_err()
            .to_string()
            .contains("sample rate")
    );
    assert!(cfg.validate(&[]).is_err());
}

#[tokio::test]
async fn conversation_turns_are_measured() {
    let fake = start_fake(Fake {
        audio_frames: 10,
        audio_gap_ms: 5,
        ..Fake::default()
    })
    .await;
    let mut cfg = SessionConfig::new(&fake.url);
    cfg.turns = 2;
    cfg.speed = 2.0;
    let wavs = vec![tone(200), tone(160)];
    let report = bounded(run_session(&cfg, &wavs)).await;

    assert!(report.ok, "{report:#?}");
    assert_eq!(report.session_id.as_deref(), Some("fake-session"));
    assert_eq!(report.turns.len(), 2);
    assert_eq!(report.frames_received, 20);
    assert_eq!(report.close.as_ref().map(|c| c.0), Some(1000));
    for (i, t) in report.turns.iter().enumerate() {
        assert_eq!(t.outcome, TurnOutcome::Completed, "turn {i}");
        assert_eq!(t.assistant_turn_id, Some(i as u64 + 1));
        assert_eq!(t.assistant_audio_ms, 200);
        assert_eq!(t.user_transcript.as_deref(), Some("hi there"));
        assert_eq!(t.assistant_text.as_deref(), Some("Hello"));
        assert!(!t.barged_in);
        let m = &t.metrics;
        let order = [
            m.speech_stopped_ms.expect("speech_stopped"),
            m.final_transcript_ms.expect("final_transcript"),
            m.first_text_ms.expect("first_text"),
            m.first_audio_ms.expect("first_audio"),
            m.turn_total_ms.expect("turn_total"),
        ];
        assert!(order[0] >= 0.0, "{m:?}");
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "turn {i} out of order: {m:?}"
        );
        // 10 ms fake steps, 10 frames 5 ms apart: well under a second on any machine.
        assert!(order[4] < 1000.0, "{m:?}");
        assert_eq!((m.interrupt_ms, m.audio_stop_ms), (None, None));
        assert!(
            t.timeline
                .iter()
                .any(|e| e.what == "> speech end" && e.at_ms == 0.0)
        );
    }
    // Speech (10 + 8 frames) plus continuous silence while waiting.
    assert!(report.frames_sent > 18, "{}", report.frames_sent);

    let seen = fake.seen.lock().unwrap();
    assert!(seen.texts[0].contains("\"session.start\"") && seen.texts[0].contains("16000"));
    assert!(seen.texts.last().unwrap().contains("session.end"));
    assert_eq!(seen.binary_frames as u64, report.frames_sent);
    // Playback marks: per turn, rising, ending at the full 200 ms.
    for id in [1, 2] {
        let marks: Vec<u64> = seen
            .marks
            .iter()
            .filter(|m| m.0 == id)
            .map(|m| m.1)
            .collect();
        assert!(marks.windows(2).all(|w| w[0] < w[1]), "{marks:?}");
        assert_eq!(marks.last(), Some(&200), "turn {id}: {marks:?}");
    }
}

#[tokio::test]
async fn barge_in_is_measured() {
    // 60 frames 20 ms apart: 1.2 s of assistant audio, so the barge-in lands mid-stream.
    let fake = start_fake(Fake {
        audio_frames: 60,
        audio_gap_ms: 20,
        ..Fake::default()
    })
    .await;
    let mut cfg = SessionConfig::new(&fake.url);
    cfg.turns = 2;
    cfg.speed = 2.0;
    cfg.barge_in_after_ms = Some(100);
    let report = bounded(run_session(&cfg, &[tone(100)])).await;
    assert!(report.ok, "{report:#?}");
    let (first, second) = (&report.turns[0], &report.turns[1]);
    assert!(first.barged_in);
    assert_eq!(first.outcome, TurnOutcome::Interrupted);
    assert_eq!(first.audio_end_reason, Some(AudioEndReason::Interrupted));
    assert!(first.assistant_audio_ms >= 100 && first.assistant_audio_ms < 1200);
    let interrupt = first.metrics.interrupt_ms.expect("interrupt_ms");
    let stop = first.metrics.audio_stop_ms.expect("audio_stop_ms");
    assert!((0.0..500.0).contains(&interrupt), "{interrupt}");
    assert!(
        stop <= interrupt,
        "audio stops before `interrupted` arrives: {stop} {interrupt}"
    );
    assert!(
        first
            .timeline
            .iter()
            .any(|e| e.what == "> barge-in speech start")
    );
    assert!(
        first.timeline.windows(2).all(|w| w[0].at_ms <= w[1].at_ms),
        "timeline is sorted"
    );
    // The player stops at the interruption: no mark for turn 1 after its audio ended.
    let end = first
        .timeline
        .iter()
        .find(|e| e.what.starts_with("assistant_audio.end"))
        .unwrap();
    assert!(
        !first
            .timeline
            .iter()
            .any(|e| e.what.starts_with("> playback.mark") && e.at_ms > end.at_ms),
        "{:#?}",
        first.timeline
    );
    assert_eq!(second.outcome, TurnOutcome::Completed);
    assert!(!second.barged_in);
    assert_eq!(second.assistant_audio_ms, 1200);
    assert!(second.metrics.first_audio_ms.is_some());
}

#[tokio::test]
async fn echo_mode_matches_replies_in_order() {
    let fake = start_fake(Fake {
        echo: true,
        ..Fake::default()
    })
    .await;
    let mut cfg = SessionConfig::new(&fake.url);
    cfg.mode = Mode::Echo;
    cfg.turns = 3;
    cfg.speed = 10.0;
    let report = bounded(run_session(&cfg, &[tone(200)])).await;

    assert!(report.ok, "{report:#?}");
    assert_eq!(report.frames_sent, 30);
    assert_eq!(report.frames_received, 30);
    assert_eq!(report.echo_rtt_ms.len(), 30);
    assert!(
        report
            .echo_rtt_ms
            .iter()
            .all(|&r| (0.0..1000.0).contains(&r)),
        "{report:?}"
    );

    let load = LoadReport::from_sessions(Mode::Echo, &[report], Duration::from_secs(1));
    assert_eq!(load.metrics.echo_rtt_ms.count, 30);
    assert!(load.to_table().contains("echo_rtt"));
}

#[tokio::test]
async fn garbage_json_and_stray_audio_are_protocol_errors() {
    let fake = start_fake(Fake {
        garbage_after_ready: true,
        stray_audio: true,
        audio_frames: 2,
        audio_gap_ms: 1,
        ..Fake::default()
    })
    .await;
    let cfg = SessionConfig::new(&fake.url);
    let report = bounded(run_session(&cfg, &[tone(60)])).await;
    assert!(!report.ok);
    assert_eq!(report.protocol_errors, 2, "{:?}", report.errors);
    assert_eq!(report.errors.get("protocol.bad_json"), Some(&1));
    assert_eq!(report.errors.get("protocol.audio_outside_turn"), Some(&1));
    // The turn itself still ran: errors are counted, not fatal.
    assert_eq!(report.turns[0].outcome, TurnOutcome::Completed);

    let load = LoadReport::from_sessions(Mode::Conversation, &[report], Duration::ZERO);
    assert!(!load.success());
    assert_eq!(load.sessions_failed, 1);
    assert!(
        load.failures[0].contains("protocol.bad_json"),
        "{:?}",
        load.failures
    );
}

#[tokio::test]
async fn missing_session_ready_fails_the_session() {
    let fake = start_fake(Fake {
        no_ready: true,
        ..Fake::default()
    })
    .await;
    let report = bounded(run_session(&SessionConfig::new(&fake.url), &[tone(60)])).await;
    assert!(!report.ok);
    assert_eq!(
        report.errors.get("protocol.missing_session_ready"),
        Some(&1)
    );
    assert!(report.failure.unwrap().contains("usage_update"));
    assert!(report.turns.is_empty());
}

#[tokio::test]
async fn connect_failure_is_reported() {
    // Bind then drop: nothing listens on that port any more.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("ws://127.0.0.1:{port}/v1/conversation");
    let report = bounded(run_session(&SessionConfig::new(url), &[tone(60)])).await;
    assert!(!report.ok);
    assert_eq!(report.errors.get("connect_failed"), Some(&1));
}

#[tokio::test]
async fn client_surfaces_bad_json_errors_and_close_codes() {
    let fake = start_fake(Fake {
        garbage_after_ready: true,
        ..Fake::default()
    })
    .await;
    bounded(async {
        let start = duplex_proto::SessionStart {
            sample_rate: 24000,
            encoding: Encoding::Pcm16,
            language: None,
            voice: None,
            model: None,
            system_prompt: None,
            output_sample_rate: None,
            output_encoding: None,
        };
        let mut client = Client::connect(&fake.url, Some(start)).await.unwrap();
        let ready = client.wait_ready(Duration::from_secs(5)).await.unwrap();
        assert_eq!(ready.input.sample_rate, 24000);
        match client.next_event(Duration::from_secs(5)).await {
            Err(Error::BadServerJson { text, .. }) => assert_eq!(text, "{not json"),
            other => panic!("expected BadServerJson, got {other:?}"),
        }
        assert_eq!(
            client.next_event(Duration::from_millis(50)).await.unwrap(),
            None
        );

        client.send_text_raw("{").await.unwrap();
        let err = client
            .wait_for(|e| e.error_code().is_some(), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(err.error_code(), Some(ErrorCode::MalformedJson));
        let close = client
            .wait_for(
                |e| matches!(e.kind, EventKind::Close(_)),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        assert_eq!(close.close_code(), Some(1002));
        // session.ready, the error and the close are all in the log, in order.
        let labels: Vec<String> = client.events().iter().map(|e| e.label()).collect();
        assert_eq!(labels, ["session.ready", "error", "close(1002)"]);
        assert!(matches!(
            client.wait_for(|_| true, Duration::from_secs(1)).await,
            Err(Error::Closed)
        ));
    })
    .await;
}

#[tokio::test]
async fn wait_for_times_out() {
    let fake = start_fake(Fake::default()).await;
    bounded(async {
        let mut client = Client::connect(&fake.url, None).await.unwrap();
        let r = client.wait_for(|_| true, Duration::from_millis(100)).await;
        assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
        client.send_binary_raw(vec![1, 2, 3]).await.unwrap();
        assert_eq!(client.close().await.unwrap().map(|c| c.0), Some(1000));
    })
    .await;
}

#[tokio::test]
async fn load_runs_concurrent_sessions_and_aggregates() {
    let fake = start_fake(Fake {
        audio_frames: 5,
        audio_gap_ms: 2,
        ..Fake::default()
    })
    .await;
    let cfg = LoadConfig {
        sessions: 3,
        ramp_up: Duration::from_millis(150),
        speed: 4.0,
        max_duration: Some(Duration::from_secs(20)),
        ..LoadConfig::new(&fake.url, vec![tone(100)])
    };
    cfg.validate().unwrap();
    let report = bounded(run_load(&cfg)).await;

    assert!(report.success(), "{}", report.to_table());
    assert_eq!(
        (report.sessions, report.sessions_ok, report.turns_completed),
        (3, 3, 3)
    );
    assert_eq!(report.frames_received, 15);
    assert_eq!(report.metrics.first_audio_ms.count, 3);
    let s = &report.metrics.turn_total_ms;
    assert!(s.p50 <= s.p95 && s.p95 <= s.p99 && s.p99 <= s.max && s.max.is_some());
    assert!(
        report.wall_ms >= 150.0,
        "ramp-up spreads the starts: {}",
        report.wall_ms
    );
    let table = report.to_table();
    assert!(table.contains("3 sessions (3 ok, 0 failed)"), "{table}");
    assert!(table.contains("first_audio"), "{table}");
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["sessions_ok"], 3);
    assert_eq!(json["metrics"]["first_audio_ms"]["count"], 3);
    assert!(json.get("session_reports").is_none());
}

#[tokio::test]
async fn a_turn_interval_makes_concurrent_sessions_speak_together() {
    // 200 ms of answer per turn, listened to at 4x: each turn is over long before the beat.
    let fake = start_fake(Fake {
        audio_frames: 10,
        audio_gap_ms: 0,
        ..Fake::default()
    })
    .await;
    let beat = Duration::from_millis(600);
    let cfg = LoadConfig {
        sessions: 3,
        turns: 3,
        playback_speed: Some(4.0),
        turn_interval: Some(beat),
        max_duration: Some(Duration::from_secs(20)),
        ..LoadConfig::new(&fake.url, vec![tone(100)])
    };
    cfg.validate().unwrap();
    let t0 = tokio::time::Instant::now();
    let report = bounded(run_load(&cfg)).await;
    assert!(report.success(), "{}", report.to_table());
    assert_eq!(report.turns_completed, 9);

    let mut starts = fake.seen.lock().unwrap().speech_starts.clone();
    starts.sort();
    assert_eq!(starts.len(), 9);
    // Each beat's three questions start together, on the beat: not before it (the sessions
    // would otherwise speak as soon as the previous answer was played, ~250 ms apart), and
    // within a frame or so of it (slack for a loaded machine).
    for (k, together) in starts.chunks(3).enumerate() {
        let on_beat = SCHEDULE_LEAD + beat * k as u32;
        for s in together {
            let at = *s - t0;
            assert!(
                at >= on_beat && at < on_beat + Duration::from_millis(250),
                "turn {k} started at {at:?}, beat at {on_beat:?}"
            );
        }
    }
}

#[tokio::test]
async fn playback_speed_shortens_listening_only() {
    // One second of answer audio, arriving at once.
    let fake = start_fake(Fake {
        audio_frames: 50,
        audio_gap_ms: 0,
        ..Fake::default()
    })
    .await;
    let mut cfg = SessionConfig::new(&fake.url);
    let real_time = bounded(run_session(&cfg, &[tone(100)])).await;
    cfg.playback_speed = Some(10.0);
    let fast = bounded(run_session(&cfg, &[tone(100)])).await;
    for r in [&real_time, &fast] {
        assert!(r.ok, "{r:?}");
        assert_eq!(r.turns[0].assistant_audio_ms, 1000);
    }
    // The player marks the whole second as played either way, 10x sooner in the second run.
    assert!(real_time.duration_ms >= 1000.0, "{}", real_time.duration_ms);
    assert!(fast.duration_ms < 800.0, "{}", fast.duration_ms);
    let marks = fake.seen.lock().unwrap().marks.clone();
    assert_eq!(
        marks.iter().filter(|(_, ms)| *ms == 1000).count(),
        2,
        "{marks:?}"
    );
    cfg.playback_speed = Some(0.5);
    assert!(cfg.validate(&[tone(100)]).is_err());
}

#[tokio::test]
async fn max_duration_cuts_the_session_cleanly() {
    // The assistant never finishes in time: 100 frames 20 ms apart is 2 s of audio.
    let fake = start_fake(Fake {
        audio_frames: 100,
        audio_gap_ms: 20,
        ..Fake::default()
    })
    .await;
    let mut cfg = SessionConfig::new(&fake.url);
    cfg.max_duration = Some(Duration::from_millis(500));
    let started = std::time::Instant::now();
    let report = bounded(run_session(&cfg, &[tone(100)])).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(report.ok, "{report:#?}");
    assert_eq!(report.turns[0].outcome, TurnOutcome::Cut);
    assert_eq!(report.turns[0].metrics.turn_total_ms, None);
}

#[tokio::test]
async fn cli_exit_code_follows_the_report() {
    let good = start_fake(Fake {
        audio_frames: 3,
        audio_gap_ms: 2,
        ..Fake::default()
    })
    .await;
    let bad = start_fake(Fake {
        garbage_after_ready: true,
        audio_frames: 3,
        ..Fake::default()
    })
    .await;
    let wav = write_tone("cli.wav", RATE, 1, 16, 60);
    let run = |url: String, json: bool| {
        let wav = wav.clone();
        async move {
            let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_duplex-replay"));
            cmd.args(["--url", &url, "--speed", "4"])
                .arg(&wav)
                .kill_on_drop(true);
            if json {
                cmd.arg("--json");
            }
            bounded(cmd.output()).await.unwrap()
        }
    };
    let ok = run(good.url.clone(), true).await;
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(json["sessions_ok"], 1);

    let failed = run(bad.url.clone(), false).await;
    assert_eq!(failed.status.code(), Some(1));
    let table = String::from_utf8_lossy(&failed.stdout);
    assert!(table.contains("protocol.bad_json"), "{table}");

    let usage = bounded(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_duplex-replay"))
            .args(["--url", &good.url, "--speed", "0.5"])
            .arg(&wav)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    assert_eq!(usage.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&usage.stderr).contains("speed"));
}
