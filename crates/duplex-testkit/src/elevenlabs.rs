//! An ElevenLabs `stream-input` fake: `GET /v1/text-to-speech/{voice_id}/stream-input`
//! upgraded to a WebSocket.
//!
//! Like ElevenLabs it needs the key (`xi-api-key` header or `xi_api_key` in the first
//! message), `model_id` and an `output_format` in the query (only `pcm_<rate>` here). The
//! first message must be `{"text":" ", "voice_settings":{…}}`; each later text message is
//! voiced when it carries `flush: true` or `try_trigger_generation: true` (or at the end), in
//! two audio messages with base64 PCM and `alignment.chars`; `{"text":""}` ends the input and
//! is answered with `{"isFinal":true}` and a normal close. A bad key closes with 1008.
//!
//! Faults ([`crate::Fault`], queued per connection): a refused handshake with ElevenLabs'
//! `{"detail":{"status","message"}}` body, a handshake never answered, and after the first
//! audio message: a stall (no reads, no writes but pings), a dropped connection without a
//! close frame, or a text frame that is not JSON.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use serde_json::{Value, json};

use crate::{Fault, Gauge, GaugeGuard, ServerHandle, le_bytes, serve, tone_for_text};

/// What the fake saw on one connection.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Connection {
    pub voice_id: String,
    pub query: HashMap<String, String>,
    pub header_key: Option<String>,
    /// Every text message received, parsed.
    pub messages: Vec<Value>,
    pub finished: bool,
}

/// Pings of a stalled connection: how soon the fake notices that the client has gone.
const STALL_PING: Duration = Duration::from_millis(50);

struct Inner {
    key: String,
    connections: Vec<Connection>,
    faults: VecDeque<Fault>,
    open: Gauge,
}

/// The ElevenLabs fake server.
#[derive(Clone)]
pub struct ElevenLabsFake {
    inner: Arc<Mutex<Inner>>,
    server: Arc<ServerHandle>,
}

impl ElevenLabsFake {
    pub async fn start(key: &str) -> ElevenLabsFake {
        let inner = Arc::new(Mutex::new(Inner {
            key: key.to_owned(),
            connections: Vec::new(),
            faults: VecDeque::new(),
            open: Gauge::default(),
        }));
        let router = Router::new()
            .route(
                "/v1/text-to-speech/{voice_id}/stream-input",
                get(stream_input),
            )
            .with_state(inner.clone());
        let server = Arc::new(serve(router).await);
        ElevenLabsFake { inner, server }
    }

    /// Base URL for `ELEVENLABS_BASE_URL`.
    pub fn base_url(&self) -> String {
        format!("ws://{}", self.server.addr())
    }

    pub fn connections(&self) -> Vec<Connection> {
        self.inner.lock().expect("not poisoned").connections.clone()
    }

    /// The next connection misbehaves as `fault` (faults queue up in order).
    pub fn push_fault(&self, fault: Fault) {
        self.inner
            .lock()
            .expect("not poisoned")
            .faults
            .push_back(fault);
    }

    /// Handshakes and connections the fake is still serving.
    pub fn open(&self) -> usize {
        self.inner.lock().expect("not poisoned").open.get()
    }

    /// TCP connections open to the fake (see [`crate::ServerHandle::tcp_connections`]).
    pub fn tcp_connections(&self) -> usize {
        self.server.tcp_connections()
    }
}

/// A refused handshake as ElevenLabs answers HTTP errors: the status and a `detail` body.
fn refuse(status: u16) -> Response {
    let (kind, message) = match status {
        401 => ("invalid_api_key", "Invalid API key"),
        429 => (
            "too_many_concurrent_requests",
            "Too many concurrent requests for your subscription.",
        ),
        _ => (
            "internal_server_error",
            "An internal server error occurred.",
        ),
    };
    let body = json!({"detail": {"status": kind, "message": message}});
    (
        StatusCode::from_u16(status).expect("a valid status"),
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

type Shared = State<Arc<Mutex<Inner>>>;

async fn stream_input(
    State(inner): Shared,
    Path(voice_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let (fault, guard) = {
        let mut g = inner.lock().expect("not poisoned");
        (g.faults.pop_front(), g.open.enter())
    };
    match fault {
        Some(Fault::Refuse(status)) => return refuse(status),
        Some(Fault::HangBeforeFirstByte) => {
            // The guard is held until the client gives up and hyper drops this handler.
            std::future::pending::<()>().await;
        }
        _ => {}
    }
    let rate: Option<u32> = query
        .get("output_format")
        .and_then(|f| f.strip_prefix("pcm_"))
        .and_then(|r| r.parse().ok());
    let Some(rate) = rate else {
        return (StatusCode::BAD_REQUEST, "output_format=pcm_<rate> expected").into_response();
    };
    if !query.contains_key("model_id") {
        return (StatusCode::BAD_REQUEST, "model_id expected").into_response();
    }
    let header_key = headers
        .get("xi-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let id = {
        let mut g = inner.lock().expect("not poisoned");
        g.connections.push(Connection {
            voice_id,
            query,
            header_key: header_key.clone(),
            ..Connection::default()
        });
        g.connections.len() - 1
    };
    ws.on_upgrade(move |socket| session(socket, inner, id, rate, header_key, fault, guard))
}

/// Voices `text` in two audio messages; `false` when the connection is over (the client is
/// gone, or a fault ended it after the first message).
async fn voice(socket: &mut WebSocket, text: &str, rate: u32, fault: &mut Option<Fault>) -> bool {
    let chars: Vec<char> = text.chars().collect();
    let mid = chars.len() / 2;
    let b64 = base64::engine::general_purpose::STANDARD;
    for part in [&chars[..mid], &chars[mid..]] {
        if part.is_empty() {
            continue;
        }
        let s: String = part.iter().collect();
        let audio = b64.encode(le_bytes(&tone_for_text(&s, rate)));
        let alignment = json!({
            "chars": part.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
            "charStartTimesMs": (0..part.len()).map(|i| i * 40).collect::<Vec<_>>(),
            "charDurationsMs": part.iter().map(|_| 40).collect::<Vec<_>>(),
        });
        let msg = json!({"audio": audio, "isFinal": null, "normalizedAlignment": alignment, "alignment": alignment});
        if socket
            .send(Message::Text(msg.to_string().into()))
            .await
            .is_err()
        {
            return false;
        }
        match fault.take() {
            Some(Fault::StallAfterFirst) => loop {
                tokio::time::sleep(STALL_PING).await;
                let ping = Message::Ping(Bytes::from_static(b"stall"));
                if socket.send(ping).await.is_err() {
                    return false;
                }
            },
            // Dropping the socket closes TCP without a close frame.
            Some(Fault::DisconnectAfterFirst) => return false,
            Some(Fault::MalformedAfterFirst) => {
                let bad = Message::Text(r#"{"audio":"AAAA","isFinal":"#.into());
                if socket.send(bad).await.is_err() {
                    return false;
                }
            }
            other => *fault = other,
        }
    }
    true
}

async fn session(
    mut socket: WebSocket,
    inner: Arc<Mutex<Inner>>,
    id: usize,
    rate: u32,
    header_key: Option<String>,
    mut fault: Option<Fault>,
    _guard: GaugeGuard,
) {
    let key = inner.lock().expect("not poisoned").key.clone();
    let mut first = true;
    let mut buffered = String::new();
    while let Some(Ok(msg)) = socket.recv().await {
        let Message::Text(text) = msg else {
            if matches!(msg, Message::Close(_)) {
                break;
            }
            continue;
        };
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            let _ = socket
                .send(Message::Close(Some(CloseFrame {
                    code: 1007,
                    reason: "invalid JSON".into(),
                })))
                .await;
            break;
        };
        inner.lock().expect("not poisoned").connections[id]
            .messages
            .push(v.clone());
        let t = v.get("text").and_then(Value::as_str);
        if first {
            first = false;
            let body_key = v.get("xi_api_key").and_then(Value::as_str);
            let authorised =
                header_key.as_deref() == Some(key.as_str()) || body_key == Some(key.as_str());
            if !authorised {
                let _ = socket
                    .send(Message::Close(Some(CloseFrame {
                        code: 1008,
                        reason: "Invalid API key".into(),
                    })))
                    .await;
                break;
            }
            if t != Some(" ") || v.get("voice_settings").is_none() {
                let _ = socket
                    .send(Message::Close(Some(CloseFrame {
                        code: 1008,
                        reason: "first message must be {\"text\":\" \", \"voice_settings\":{...}}"
                            .into(),
                    })))
                    .await;
                break;
            }
            continue;
        }
        match t {
            Some("") => {
                if !buffered.trim().is_empty()
                    && !voice(&mut socket, buffered.trim(), rate, &mut fault).await
                {
                    break;
                }
                let _ = socket
                    .send(Message::Text(json!({"isFinal": true}).to_string().into()))
                    .await;
                inner.lock().expect("not poisoned").connections[id].finished = true;
                let _ = socket
                    .send(Message::Close(Some(CloseFrame {
                        code: 1000,
                        reason: "".into(),
                    })))
                    .await;
                break;
            }
            Some(t) => {
                buffered.push_str(t);
                let flush = v.get("flush") == Some(&Value::Bool(true))
                    || v.get("try_trigger_generation") == Some(&Value::Bool(true));
                if flush {
                    let now = std::mem::take(&mut buffered);
                    if !voice(&mut socket, now.trim(), rate, &mut fault).await {
                        break;
                    }
                }
            }
            None => {
                let _ = socket
                    .send(Message::Close(Some(CloseFrame {
                        code: 1008,
                        reason: "text is required".into(),
                    })))
                    .await;
                break;
            }
        }
    }
}
