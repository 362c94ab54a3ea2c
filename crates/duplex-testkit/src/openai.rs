//! An OpenAI-compatible fake: `POST /v1/chat/completions` (SSE streaming exactly as OpenAI
//! frames it: `data: {chunk}\n\n` lines, a role chunk, content chunks, a `finish_reason`
//! chunk, a final usage chunk with empty `choices` when `stream_options.include_usage` is set,
//! then `data: [DONE]\n\n`), `POST /v1/audio/speech` (raw 24 kHz PCM16, streamed in pieces that
//! split samples on purpose) and `POST /v1/audio/transcriptions` (multipart with a WAV file).
//! Requests need `Authorization: Bearer <key>`; error bodies use OpenAI's
//! `{"error":{"message","type","param","code"}}` shape.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

use crate::{Gauge, GaugeGuard, ServerHandle, le_bytes, serve, tone_for_text};

/// How the next request to an API misbehaves. `N` counts content tokens (chat) or body
/// pieces (speech); a transcription's answer is one JSON value, so `N` does not count there:
/// a stall trickles whitespace before it, a disconnect cuts it after its first bytes.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// HTTP 401 with OpenAI's `invalid_api_key` error body, whatever the key.
    Unauthorized,
    /// HTTP 429 with `Retry-After` and OpenAI's rate-limit error body.
    RateLimited { retry_after_secs: u32 },
    /// HTTP 500 with a server-error body.
    ServerError,
    /// Accept the request and never answer (not even headers).
    HangBeforeFirstByte,
    /// Send this many content tokens (pieces), then keep the response open with nothing
    /// more: no data, only the SSE comment lines (`: keep-alive`) some OpenAI-compatible
    /// servers send while a model is slow, so that the bytes keep flowing and only a
    /// token-level deadline can tell.
    StallAfter(usize),
    /// Send this many content tokens (pieces), then cut the connection.
    DisconnectAfter(usize),
    /// Send this many content tokens, then a `data:` line that is not JSON; a transcription
    /// answers 200 with a body that is not JSON. Speech has no such mode: raw PCM has no
    /// framing to break.
    MalformedAfter(usize),
}

/// Keep-alive comments of a stalled chat stream, whitespace of a stalled transcription.
const STALL_COMMENT_EVERY: Duration = Duration::from_millis(50);

/// Which API a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Chat,
    Speech,
    Transcriptions,
}

/// One request as the fake received it.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub api: Api,
    pub authorization: Option<String>,
    /// The JSON body (chat, speech) or the multipart text fields (transcriptions) as JSON.
    pub body: Value,
    /// Seconds of audio in the uploaded WAV (transcriptions).
    pub wav_seconds: Option<f64>,
}

#[derive(Debug)]
struct Inner {
    key: String,
    reply: String,
    model: String,
    transcript: String,
    token_delay: Duration,
    faults: Vec<(Api, VecDeque<Fault>)>,
    requests: Vec<Recorded>,
    /// Chat streams whose client went away before the stream was complete.
    disconnects: usize,
    completed_streams: usize,
    open: Gauge,
}

/// The OpenAI-compatible fake server.
#[derive(Clone)]
pub struct OpenAiFake {
    inner: Arc<Mutex<Inner>>,
    server: Arc<ServerHandle>,
}

impl OpenAiFake {
    /// Starts a fake that accepts `key` and answers every chat with `reply`.
    pub async fn start(key: &str, reply: &str) -> OpenAiFake {
        let inner = Arc::new(Mutex::new(Inner {
            key: key.to_owned(),
            reply: reply.to_owned(),
            model: "gpt-4o-mini".into(),
            transcript: "hello from the fake transcriber".into(),
            token_delay: Duration::from_millis(2),
            faults: vec![
                (Api::Chat, VecDeque::new()),
                (Api::Speech, VecDeque::new()),
                (Api::Transcriptions, VecDeque::new()),
            ],
            requests: Vec::new(),
            disconnects: 0,
            completed_streams: 0,
            open: Gauge::default(),
        }));
        let router = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/audio/speech", post(speech))
            .route("/v1/audio/transcriptions", post(transcriptions))
            .with_state(inner.clone());
        let server = Arc::new(serve(router).await);
        OpenAiFake { inner, server }
    }

    /// Base URL with the version prefix, as `OPENAI_BASE_URL` takes it.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.server.addr())
    }

    pub fn set_reply(&self, reply: &str) {
        self.lock().reply = reply.to_owned();
    }

    pub fn set_model(&self, model: &str) {
        self.lock().model = model.to_owned();
    }

    pub fn set_transcript(&self, text: &str) {
        self.lock().transcript = text.to_owned();
    }

    /// Delay between streamed tokens.
    pub fn set_token_delay(&self, d: Duration) {
        self.lock().token_delay = d;
    }

    /// The next request to `api` misbehaves as `fault` (faults queue up in order).
    pub fn push_fault(&self, api: Api, fault: Fault) {
        let mut g = self.lock();
        let q = g
            .faults
            .iter_mut()
            .find(|(a, _)| *a == api)
            .expect("every API has a queue");
        q.1.push_back(fault);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    pub fn requests_to(&self, api: Api) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.api == api)
            .collect()
    }

    /// Chat streams the client abandoned before their end.
    pub fn disconnects(&self) -> usize {
        self.lock().disconnects
    }

    pub fn completed_streams(&self) -> usize {
        self.lock().completed_streams
    }

    /// Requests whose answer is still being served (or withheld).
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

fn error(status: StatusCode, kind: &str, message: &str, code: Option<&str>) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Checks the bearer key, records the request and takes the next fault for `api`.
#[allow(clippy::result_large_err)] // a test fake; the error is the response to send
fn admit(
    inner: &Arc<Mutex<Inner>>,
    api: Api,
    headers: &HeaderMap,
    body: Value,
    wav_seconds: Option<f64>,
) -> Result<(Option<Fault>, GaugeGuard), Response> {
    let mut g = inner.lock().expect("not poisoned");
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    g.requests.push(Recorded {
        api,
        authorization: authorization.clone(),
        body,
        wav_seconds,
    });
    if authorization.as_deref() != Some(&format!("Bearer {}", g.key)) {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "Incorrect API key provided",
            Some("invalid_api_key"),
        ));
    }
    let fault = g
        .faults
        .iter_mut()
        .find(|(a, _)| *a == api)
        .and_then(|(_, q)| q.pop_front());
    if fault == Some(Fault::Unauthorized) {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "Incorrect API key provided",
            Some("invalid_api_key"),
        ));
    }
    Ok((fault, g.open.enter()))
}

/// Answers the faults that happen before any body byte.
async fn early_fault(fault: &Option<Fault>) -> Option<Response> {
    match fault {
        Some(Fault::RateLimited { retry_after_secs }) => {
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                "requests",
                "Rate limit reached for requests",
                Some("rate_limit_exceeded"),
            );
            r.headers_mut().insert(
                "retry-after",
                retry_after_secs.to_string().parse().expect("digits"),
            );
            Some(r)
        }
        Some(Fault::ServerError) => Some(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "The server had an error while processing your request.",
            None,
        )),
        Some(Fault::HangBeforeFirstByte) => {
            std::future::pending::<()>().await;
            unreachable!("pending never completes")
        }
        _ => None,
    }
}

/// A streamed body fed by a task; the task learns of a client that went away when its send
/// fails.
fn channel_body() -> (
    tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    Body,
) {
    // Small: the producer should notice a gone client at once.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (tx, Body::from_stream(stream))
}

async fn chat(State(inner): Shared, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "We could not parse the JSON body of your request.",
            None,
        );
    };
    let (fault, guard) = match admit(&inner, Api::Chat, &headers, req.clone(), None) {
        Ok(f) => f,
        Err(r) => return r,
    };
    if let Some(r) = early_fault(&fault).await {
        return r;
    }
    if req.get("stream") != Some(&Value::Bool(true)) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "this fake only streams",
            None,
        );
    }
    let messages = req
        .get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if messages.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "messages must not be empty",
            None,
        );
    }
    let include_usage = req.pointer("/stream_options/include_usage") == Some(&Value::Bool(true));
    let prompt_chars: usize = messages
        .iter()
        .filter_map(|m| m.get("content").and_then(Value::as_str))
        .map(str::len)
        .sum();
    let (reply, model, delay) = {
        let g = inner.lock().expect("not poisoned");
        (g.reply.clone(), g.model.clone(), g.token_delay)
    };
    let tokens: Vec<String> = reply.split_inclusive(' ').map(str::to_owned).collect();
    let (tx, body) = channel_body();
    let state = inner.clone();
    tokio::spawn(async move {
        let _guard = guard;
        let chunk = |delta: Value, finish: Value| {
            let c = json!({
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": 1_750_000_000u32,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
                "usage": null,
            });
            Bytes::from(format!("data: {c}\n\n"))
        };
        let gone = |state: &Arc<Mutex<Inner>>| state.lock().expect("not poisoned").disconnects += 1;
        if tx
            .send(Ok(chunk(
                json!({"role": "assistant", "content": "", "refusal": null}),
                Value::Null,
            )))
            .await
            .is_err()
        {
            return gone(&state);
        }
        for (i, token) in tokens.iter().enumerate() {
            match &fault {
                Some(Fault::DisconnectAfter(n)) if i == *n => {
                    let _ = tx.send(Err(std::io::Error::other("fake disconnect"))).await;
                    return;
                }
                Some(Fault::StallAfter(n)) if i == *n => loop {
                    tokio::time::sleep(STALL_COMMENT_EVERY).await;
                    let comment = Bytes::from_static(b": keep-alive\n\n");
                    if tx.send(Ok(comment)).await.is_err() {
                        return gone(&state);
                    }
                },
                Some(Fault::MalformedAfter(n)) if i == *n => {
                    let _ = tx
                        .send(Ok(Bytes::from_static(b"data: {\"choices\": [oops\n\n")))
                        .await;
                }
                _ => {}
            }
            tokio::time::sleep(delay).await;
            if tx
                .send(Ok(chunk(json!({"content": token}), Value::Null)))
                .await
                .is_err()
            {
                return gone(&state);
            }
        }
        if tx
            .send(Ok(chunk(json!({}), Value::from("stop"))))
            .await
            .is_err()
        {
            return gone(&state);
        }
        if include_usage {
            let prompt = prompt_chars / 4;
            let usage = json!({
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": 1_750_000_000u32,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [],
                "usage": {"prompt_tokens": prompt, "completion_tokens": tokens.len(), "total_tokens": prompt + tokens.len()},
            });
            if tx
                .send(Ok(Bytes::from(format!("data: {usage}\n\n"))))
                .await
                .is_err()
            {
                return gone(&state);
            }
        }
        if tx
            .send(Ok(Bytes::from_static(b"data: [DONE]\n\n")))
            .await
            .is_err()
        {
            return gone(&state);
        }
        state.lock().expect("not poisoned").completed_streams += 1;
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .expect("a valid response")
}

/// The rate of `response_format: "pcm"`.
pub const SPEECH_RATE: u32 = 24_000;

async fn speech(State(inner): Shared, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "bad JSON",
            None,
        );
    };
    let (fault, guard) = match admit(&inner, Api::Speech, &headers, req.clone(), None) {
        Ok(f) => f,
        Err(r) => return r,
    };
    if let Some(r) = early_fault(&fault).await {
        return r;
    }
    let input = req.get("input").and_then(Value::as_str).unwrap_or("");
    let ok = !input.is_empty()
        && req.get("model").and_then(Value::as_str).is_some()
        && req.get("voice").and_then(Value::as_str).is_some()
        && req.get("response_format").and_then(Value::as_str) == Some("pcm");
    if !ok {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "model, input, voice and response_format=pcm are required",
            None,
        );
    }
    let pcm = le_bytes(&tone_for_text(input, SPEECH_RATE));
    let (tx, body) = channel_body();
    tokio::spawn(async move {
        let _guard = guard;
        // 4,801-byte pieces: every other piece splits a sample, as networks do.
        for (i, piece) in pcm.chunks(4801).enumerate() {
            match &fault {
                // The body stays open until the client drops the response.
                Some(Fault::StallAfter(n)) if i == *n => return tx.closed().await,
                Some(Fault::DisconnectAfter(n)) if i == *n => {
                    let _ = tx.send(Err(std::io::Error::other("fake disconnect"))).await;
                    return;
                }
                _ => {}
            }
            if tx.send(Ok(Bytes::copy_from_slice(piece))).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(body)
        .expect("a valid response")
}

/// One part of a multipart body.
struct Part {
    name: String,
    filename: Option<String>,
    content_type: Option<String>,
    data: Vec<u8>,
}

/// A strict-enough multipart/form-data parser (RFC 7578) for one test fake.
fn parse_multipart(content_type: &str, body: &[u8]) -> Result<Vec<Part>, String> {
    let boundary = content_type
        .split(';')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("boundary="))
        .ok_or("no boundary in Content-Type")?
        .trim_matches('"');
    let delim = format!("--{boundary}");
    let mut parts = Vec::new();
    let mut rest = body;
    let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).position(|w| w == needle);
    let start = find(rest, delim.as_bytes()).ok_or("no first boundary")?;
    rest = &rest[start + delim.len()..];
    loop {
        if rest.starts_with(b"--") {
            return Ok(parts);
        }
        rest = rest
            .strip_prefix(b"\r\n")
            .ok_or("boundary not followed by CRLF")?;
        let head_end = find(rest, b"\r\n\r\n").ok_or("part without header end")?;
        let head = std::str::from_utf8(&rest[..head_end]).map_err(|_| "non-UTF-8 headers")?;
        rest = &rest[head_end + 4..];
        let next = find(rest, format!("\r\n{delim}").as_bytes()).ok_or("unterminated part")?;
        let data = rest[..next].to_vec();
        rest = &rest[next + 2 + delim.len()..];
        let mut name = None;
        let mut filename = None;
        let mut ctype = None;
        for line in head.split("\r\n") {
            let (k, v) = line.split_once(':').ok_or("bad part header")?;
            match k.trim().to_ascii_lowercase().as_str() {
                "content-disposition" => {
                    for p in v.split(';').map(str::trim) {
                        if let Some(n) = p.strip_prefix("name=") {
                            name = Some(n.trim_matches('"').to_owned());
                        } else if let Some(f) = p.strip_prefix("filename=") {
                            filename = Some(f.trim_matches('"').to_owned());
                        }
                    }
                }
                "content-type" => ctype = Some(v.trim().to_owned()),
                _ => {}
            }
        }
        parts.push(Part {
            name: name.ok_or("part without a name")?,
            filename,
            content_type: ctype,
            data,
        });
    }
}

/// Seconds of audio in a 16-bit mono PCM WAV with a canonical header.
fn wav_seconds(wav: &[u8]) -> Result<f64, String> {
    if wav.len() < 44 || &wav[..4] != b"RIFF" || &wav[8..16] != b"WAVEfmt " {
        return Err("not a RIFF/WAVE file".into());
    }
    let u16_at = |i: usize| u16::from_le_bytes([wav[i], wav[i + 1]]);
    let u32_at = |i: usize| u32::from_le_bytes([wav[i], wav[i + 1], wav[i + 2], wav[i + 3]]);
    if u16_at(20) != 1 || u16_at(22) != 1 || u16_at(34) != 16 {
        return Err("expected PCM, mono, 16 bit".into());
    }
    if &wav[36..40] != b"data" || u32_at(40) as usize != wav.len() - 44 {
        return Err("data chunk length does not match the file".into());
    }
    Ok(f64::from(u32_at(40)) / 2.0 / f64::from(u32_at(24)))
}

async fn transcriptions(State(inner): Shared, headers: HeaderMap, body: Bytes) -> Response {
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ctype.starts_with("multipart/form-data") {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "expected multipart/form-data",
            None,
        );
    }
    let parts = match parse_multipart(ctype, &body) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request_error", &e, None),
    };
    let mut fields = serde_json::Map::new();
    let mut seconds = None;
    let mut file_problem = Some("no file part".to_owned());
    for p in &parts {
        if p.name == "file" {
            file_problem = match (&p.filename, wav_seconds(&p.data)) {
                (None, _) => Some("file part without filename".into()),
                (Some(_), Err(e)) => Some(e),
                (Some(f), Ok(s)) => {
                    seconds = Some(s);
                    fields.insert("filename".into(), Value::from(f.clone()));
                    fields.insert(
                        "file_content_type".into(),
                        Value::from(p.content_type.clone().unwrap_or_default()),
                    );
                    None
                }
            };
        } else {
            fields.insert(
                p.name.clone(),
                Value::from(String::from_utf8_lossy(&p.data).into_owned()),
            );
        }
    }
    let (fault, guard) = match admit(
        &inner,
        Api::Transcriptions,
        &headers,
        Value::Object(fields.clone()),
        seconds,
    ) {
        Ok(f) => f,
        Err(r) => return r,
    };
    if let Some(r) = early_fault(&fault).await {
        return r;
    }
    if let Some(problem) = file_problem {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            &problem,
            None,
        );
    }
    if !fields.contains_key("model") {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "model is required",
            None,
        );
    }
    let text = inner.lock().expect("not poisoned").transcript.clone();
    let body = json!({ "text": text }).to_string();
    let cut = match fault {
        Some(Fault::MalformedAfter(_)) => {
            return (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                "<html><body>502 Bad Gateway</body></html>",
            )
                .into_response();
        }
        Some(Fault::StallAfter(_) | Fault::DisconnectAfter(_)) => fault,
        _ => return ok_json(body),
    };
    // The status line and the headers; then a cut after the first bytes of the JSON, or a
    // stall that trickles the whitespace JSON allows before a value, a byte every 50 ms,
    // so that only a deadline on the whole answer (not one on silence) can end it.
    let (tx, stream) = channel_body();
    tokio::spawn(async move {
        let _guard = guard;
        if matches!(cut, Some(Fault::StallAfter(_))) {
            loop {
                if tx.send(Ok(Bytes::from_static(b" "))).await.is_err() {
                    return;
                }
                tokio::time::sleep(STALL_COMMENT_EVERY).await;
            }
        }
        let first = Bytes::copy_from_slice(&body.as_bytes()[..body.len() / 2]);
        if tx.send(Ok(first)).await.is_err() {
            return;
        }
        let _ = tx.send(Err(std::io::Error::other("fake disconnect"))).await;
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(stream)
        .expect("a valid response")
}

fn ok_json(body: String) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}
