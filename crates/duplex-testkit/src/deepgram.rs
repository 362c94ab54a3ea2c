//! A Deepgram live-transcription fake: `GET /v1/listen` upgraded to a WebSocket.
//!
//! Like Deepgram it requires `Authorization: Token <key>` (401 otherwise) and rejects a
//! connection without the query parameters duplex must send (400). It then recognises a
//! scripted transcript: one more interim word per `ms_per_word` of loud audio, an `is_final`
//! segment with the first half of the words once half of them were heard (so that clients
//! must join segments), `SpeechStarted` at the first loud audio of an utterance, and on
//! `{"type":"Finalize"}` the remaining words as `is_final` with `from_finalize: true`, followed
//! by `UtteranceEnd`. `{"type":"CloseStream"}` gets `Metadata` and a normal close. When
//! neither audio nor `KeepAlive` arrives within `timeout` (Deepgram: 10 s), it closes with
//! code 1011 and reason `NET-0001`, as Deepgram does.
//!
//! Faults ([`crate::Fault`], queued per connection): a refused handshake with Deepgram's
//! `{"err_code","err_msg","request_id"}` body, a handshake never answered, and after the
//! first `Results`: a stall (no reads, no writes; the small receive buffer of the fake's
//! sockets makes the client's sends block within a second of audio), a dropped connection
//! without a close frame, or a text frame that is not JSON.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::{Fault, Gauge, GaugeGuard, ServerHandle, rms_le, serve_with};

/// Query parameters duplex must send.
pub const REQUIRED_PARAMS: &[&str] = &[
    "model",
    "language",
    "encoding",
    "sample_rate",
    "channels",
    "interim_results",
    "endpointing",
    "utterance_end_ms",
    "vad_events",
    "smart_format",
];

/// Loudness (RMS of 16-bit samples) that counts as speech for the fake.
const LOUD_RMS: f64 = 500.0;

/// Receive buffer of the fake's sockets: 16 kHz PCM16 is 32 KB/s, so a stalled fake fills
/// it (and the client's send buffer behind it) within about a second of audio.
const RECV_BUFFER: u32 = 8 * 1024;

/// Pings of a stalled connection: how soon the fake notices that the client has gone.
const STALL_PING: Duration = Duration::from_millis(50);

/// What the fake saw on one connection.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Connection {
    pub query: HashMap<String, String>,
    pub audio_bytes: usize,
    pub keepalives: usize,
    pub finalizes: usize,
    pub close_streams: usize,
    /// Closed by the fake for inactivity (NET-0001).
    pub timed_out: bool,
    pub closed: bool,
}

struct Inner {
    key: String,
    transcripts: Vec<String>,
    utterance: usize,
    ms_per_word: u64,
    timeout: Duration,
    connections: Vec<Connection>,
    faults: VecDeque<Fault>,
    open: Gauge,
}

/// The Deepgram fake server.
#[derive(Clone)]
pub struct DeepgramFake {
    inner: Arc<Mutex<Inner>>,
    server: Arc<ServerHandle>,
}

impl DeepgramFake {
    /// Starts a fake accepting `key` that recognises `transcripts` in turn (cycled).
    pub async fn start(key: &str, transcripts: &[&str]) -> DeepgramFake {
        let inner = Arc::new(Mutex::new(Inner {
            key: key.to_owned(),
            transcripts: transcripts.iter().map(|s| s.to_string()).collect(),
            utterance: 0,
            ms_per_word: 150,
            // Deepgram's documented inactivity timeout.
            timeout: Duration::from_secs(10),
            connections: Vec::new(),
            faults: VecDeque::new(),
            open: Gauge::default(),
        }));
        let router = Router::new()
            .route("/v1/listen", get(listen))
            .with_state(inner.clone());
        let server = Arc::new(serve_with(router, Some(RECV_BUFFER)).await);
        DeepgramFake { inner, server }
    }

    /// Base URL for `DEEPGRAM_BASE_URL`.
    pub fn base_url(&self) -> String {
        format!("ws://{}", self.server.addr())
    }

    /// Inactivity timeout (Deepgram's is 10 s; tests shorten it).
    pub fn set_timeout(&self, d: Duration) {
        self.lock().timeout = d;
    }

    /// Loud audio per recognised word.
    pub fn set_ms_per_word(&self, ms: u64) {
        self.lock().ms_per_word = ms.max(1);
    }

    pub fn connections(&self) -> Vec<Connection> {
        self.lock().connections.clone()
    }

    /// The next connection misbehaves as `fault` (faults queue up in order).
    pub fn push_fault(&self, fault: Fault) {
        self.lock().faults.push_back(fault);
    }

    /// Handshakes and connections the fake is still serving.
    pub fn open(&self) -> usize {
        self.lock().open.get()
    }

    /// TCP connections open to the fake (see [`crate::ServerHandle::tcp_connections`]).
    pub fn tcp_connections(&self) -> usize {
        self.server.tcp_connections()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("not poisoned")
    }
}

type Shared = State<Arc<Mutex<Inner>>>;

async fn listen(
    State(inner): Shared,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let (key, fault, guard) = {
        let mut g = inner.lock().expect("not poisoned");
        (g.key.clone(), g.faults.pop_front(), g.open.enter())
    };
    match fault {
        Some(Fault::Refuse(status)) => return refuse(status),
        Some(Fault::HangBeforeFirstByte) => {
            // The guard is held until the client gives up and hyper drops this handler.
            std::future::pending::<()>().await;
        }
        _ => {}
    }
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if auth != Some(&format!("Token {key}")) {
        return (
            StatusCode::UNAUTHORIZED,
            r#"{"err_code":"INVALID_AUTH","err_msg":"Invalid credentials."}"#,
        )
            .into_response();
    }
    if let Some(missing) = REQUIRED_PARAMS.iter().find(|p| !query.contains_key(**p)) {
        return (
            StatusCode::BAD_REQUEST,
            format!(r#"{{"err_code":"Bad Request","err_msg":"missing {missing}"}}"#),
        )
            .into_response();
    }
    if query.get("encoding").map(String::as_str) != Some("linear16") {
        return (StatusCode::BAD_REQUEST, "expected encoding=linear16").into_response();
    }
    let rate: u64 = match query.get("sample_rate").and_then(|r| r.parse().ok()) {
        Some(r) if r > 0 => r,
        _ => return (StatusCode::BAD_REQUEST, "bad sample_rate").into_response(),
    };
    let id = {
        let mut g = inner.lock().expect("not poisoned");
        g.connections.push(Connection {
            query,
            ..Connection::default()
        });
        g.connections.len() - 1
    };
    ws.on_upgrade(move |socket| session(socket, inner, id, rate, fault, guard))
}

/// A refused handshake as Deepgram answers it: the status and a JSON error body.
fn refuse(status: u16) -> Response {
    let (code, msg) = match status {
        401 => ("INVALID_AUTH", "Invalid credentials."),
        402 => (
            "ASR_PAYMENT_REQUIRED",
            "Project does not have enough credits.",
        ),
        429 => (
            "TOO_MANY_REQUESTS",
            "Too many requests. Please try again later",
        ),
        _ => (
            "INTERNAL_SERVER_ERROR",
            "An internal server error occurred.",
        ),
    };
    let body = json!({
        "err_code": code,
        "err_msg": msg,
        "request_id": "00000000-fake-4000-8000-000000000000",
    });
    (
        StatusCode::from_u16(status).expect("a valid status"),
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// A stalled connection: nothing read, nothing sent but pings, until the client is gone.
async fn stall(socket: &mut WebSocket) {
    loop {
        tokio::time::sleep(STALL_PING).await;
        if socket
            .send(Message::Ping(Bytes::from_static(b"stall")))
            .await
            .is_err()
        {
            return;
        }
    }
}

fn results(text: &str, is_final: bool, from_finalize: bool, start: f64, dur: f64) -> Message {
    let v = json!({
        "type": "Results",
        "channel_index": [0, 1],
        "duration": dur,
        "start": start,
        "is_final": is_final,
        "speech_final": from_finalize,
        "from_finalize": from_finalize,
        "channel": {"alternatives": [{"transcript": text, "confidence": 0.98, "words": []}]},
        "metadata": {
            "request_id": "00000000-fake-4000-8000-000000000000",
            "model_info": {"name": "general-nova-3", "version": "fake", "arch": "nova-3"},
            "model_uuid": "00000000-fake-model",
        },
    });
    Message::Text(v.to_string().into())
}

async fn session(
    mut socket: WebSocket,
    inner: Arc<Mutex<Inner>>,
    id: usize,
    rate: u64,
    mut fault: Option<Fault>,
    _guard: GaugeGuard,
) {
    let with = |f: &mut dyn FnMut(&mut Inner, usize)| {
        let mut g = inner.lock().expect("not poisoned");
        f(&mut g, id);
    };
    let mut last_activity = Instant::now();
    let mut total_ms = 0f64;
    let mut loud_ms = 0u64;
    let mut speaking = false;
    let mut final_words = 0usize;
    let mut interim_words = 0usize;
    loop {
        let (timeout, words, ms_per_word) = {
            let g = inner.lock().expect("not poisoned");
            let line = g
                .transcripts
                .get(g.utterance % g.transcripts.len().max(1))
                .cloned()
                .unwrap_or_default();
            let words: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
            (g.timeout, words, g.ms_per_word)
        };
        let msg = tokio::select! {
            m = socket.recv() => m,
            _ = tokio::time::sleep_until(last_activity + timeout) => {
                with(&mut |g, id| g.connections[id].timed_out = true);
                let _ = socket.send(Message::Close(Some(CloseFrame {
                    code: 1011,
                    reason: "Deepgram did not receive audio data or a text message within the timeout window. NET-0001".into(),
                }))).await;
                break;
            }
        };
        let Some(Ok(msg)) = msg else { break };
        let mut out: Vec<Message> = Vec::new();
        match msg {
            Message::Binary(bytes) => {
                last_activity = Instant::now();
                with(&mut |g, id| g.connections[id].audio_bytes += bytes.len());
                let ms = bytes.len() as f64 / 2.0 * 1000.0 / rate as f64;
                total_ms += ms;
                if rms_le(&bytes) > LOUD_RMS {
                    if !speaking {
                        speaking = true;
                        out.push(Message::Text(
                            json!({"type": "SpeechStarted", "channel": [0], "timestamp": total_ms / 1000.0})
                                .to_string()
                                .into(),
                        ));
                    }
                    loud_ms += ms as u64;
                    let heard = ((loud_ms / ms_per_word) as usize).min(words.len());
                    let half = words.len() / 2;
                    if final_words == 0 && half > 0 && heard >= half {
                        final_words = half;
                        out.push(results(
                            &words[..half].join(" "),
                            true,
                            false,
                            0.0,
                            total_ms / 1000.0,
                        ));
                    }
                    if heard > interim_words && heard > final_words {
                        interim_words = heard;
                        out.push(results(
                            &words[final_words..heard].join(" "),
                            false,
                            false,
                            0.0,
                            total_ms / 1000.0,
                        ));
                    }
                }
            }
            Message::Text(text) => {
                let v: Value = match serde_json::from_str(&text) {
                    Ok(v) => v,
                    Err(_) => {
                        let _ = socket
                            .send(Message::Close(Some(CloseFrame {
                                code: 1008,
                                reason: "DATA-0000 invalid JSON".into(),
                            })))
                            .await;
                        break;
                    }
                };
                match v.get("type").and_then(Value::as_str) {
                    Some("KeepAlive") => {
                        last_activity = Instant::now();
                        with(&mut |g, id| g.connections[id].keepalives += 1);
                    }
                    Some("Finalize") => {
                        with(&mut |g, id| g.connections[id].finalizes += 1);
                        let enough = loud_ms >= 100;
                        let rest = if enough {
                            words[final_words.min(words.len())..].join(" ")
                        } else {
                            String::new()
                        };
                        out.push(results(&rest, true, true, 0.0, total_ms / 1000.0));
                        if speaking {
                            out.push(Message::Text(json!({"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": total_ms / 1000.0}).to_string().into()));
                        }
                        if enough {
                            inner.lock().expect("not poisoned").utterance += 1;
                        }
                        loud_ms = 0;
                        speaking = false;
                        final_words = 0;
                        interim_words = 0;
                    }
                    Some("CloseStream") => {
                        with(&mut |g, id| g.connections[id].close_streams += 1);
                        let meta = json!({
                            "type": "Metadata",
                            "transaction_key": "deprecated",
                            "request_id": "00000000-fake-4000-8000-000000000000",
                            "sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                            "created": "2025-06-01T00:00:00.000Z",
                            "duration": total_ms / 1000.0,
                            "channels": 1,
                        });
                        let _ = socket.send(Message::Text(meta.to_string().into())).await;
                        let _ = socket
                            .send(Message::Close(Some(CloseFrame {
                                code: 1000,
                                reason: "".into(),
                            })))
                            .await;
                        break;
                    }
                    _ => {
                        let _ = socket
                            .send(Message::Close(Some(CloseFrame {
                                code: 1008,
                                reason: "DATA-0000 unknown message type".into(),
                            })))
                            .await;
                        break;
                    }
                }
            }
            Message::Close(_) => break,
            _ => {}
        }
        let answered = out
            .iter()
            .any(|m| matches!(m, Message::Text(t) if t.as_str().contains("\"Results\"")));
        for m in out {
            if socket.send(m).await.is_err() {
                break;
            }
        }
        if answered {
            match fault.take() {
                Some(Fault::StallAfterFirst) => {
                    stall(&mut socket).await;
                    break;
                }
                // Dropping the socket closes TCP without a close frame.
                Some(Fault::DisconnectAfterFirst) => break,
                Some(Fault::MalformedAfterFirst) => {
                    let _ = socket
                        .send(Message::Text(r#"{"type":"Results","channel":{"#.into()))
                        .await;
                }
                _ => {}
            }
        }
    }
    with(&mut |g, id| g.connections[id].closed = true);
}
