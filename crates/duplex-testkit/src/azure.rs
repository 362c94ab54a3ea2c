//! An Azure Speech REST TTS fake: `POST /cognitiveservices/v1`.
//!
//! Like Azure it answers 401 without the right `Ocp-Apim-Subscription-Key`, 400 for a missing
//! `User-Agent`, an unsupported `X-Microsoft-OutputFormat` (only the raw PCM formats here),
//! a wrong `Content-Type` or SSML that is not `<speak version="1.0" … xml:lang="…"><voice
//! name="…">text</voice></speak>`; otherwise it streams headerless PCM16 at the requested rate.
//!
//! Faults ([`crate::Fault`], queued per request): a refusal with the status (429, 500, …), a
//! request never answered, and after the first piece of PCM a stall (the body stays open
//! until the client drops it) or a cut body. `MalformedAfterFirst` does not exist here: a
//! raw PCM body has no framing to break (any bytes are samples).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;

use crate::{Fault, Gauge, ServerHandle, le_bytes, serve, tone_for_text};

/// One request as the fake received it.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub output_format: String,
    pub user_agent: String,
    pub ssml: String,
    pub language: String,
    pub voice: String,
    /// The text inside `<voice>`, unescaped.
    pub text: String,
}

struct Inner {
    key: String,
    requests: Vec<Recorded>,
    rejected: Vec<String>,
    faults: VecDeque<Fault>,
    open: Gauge,
}

/// The Azure TTS fake server.
#[derive(Clone)]
pub struct AzureFake {
    inner: Arc<Mutex<Inner>>,
    server: Arc<ServerHandle>,
}

impl AzureFake {
    pub async fn start(key: &str) -> AzureFake {
        let inner = Arc::new(Mutex::new(Inner {
            key: key.to_owned(),
            requests: Vec::new(),
            rejected: Vec::new(),
            faults: VecDeque::new(),
            open: Gauge::default(),
        }));
        let router = Router::new()
            .route("/cognitiveservices/v1", post(synthesize))
            .with_state(inner.clone());
        let server = Arc::new(serve(router).await);
        AzureFake { inner, server }
    }

    /// Endpoint for `AZURE_SPEECH_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.server.addr())
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.lock().expect("not poisoned").requests.clone()
    }

    /// Why requests were refused.
    pub fn rejected(&self) -> Vec<String> {
        self.inner.lock().expect("not poisoned").rejected.clone()
    }

    /// The next valid request misbehaves as `fault` (faults queue up in order).
    pub fn push_fault(&self, fault: Fault) {
        assert_ne!(
            fault,
            Fault::MalformedAfterFirst,
            "raw PCM cannot be malformed"
        );
        self.inner
            .lock()
            .expect("not poisoned")
            .faults
            .push_back(fault);
    }

    /// Requests whose answer is still being served (or withheld).
    pub fn open(&self) -> usize {
        self.inner.lock().expect("not poisoned").open.get()
    }

    /// TCP connections open to the fake (see [`crate::ServerHandle::tcp_connections`]).
    pub fn tcp_connections(&self) -> usize {
        self.server.tcp_connections()
    }
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let i = s.find(start)? + start.len();
    let j = s[i..].find(end)? + i;
    Some(&s[i..j])
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// Checks the SSML document: (language, voice, text).
fn parse_ssml(ssml: &str) -> Result<(String, String, String), String> {
    let ssml = ssml.trim();
    if !ssml.starts_with("<speak") || !ssml.ends_with("</speak>") {
        return Err("SSML must be one <speak> element".into());
    }
    let head = between(ssml, "<speak", ">").ok_or("bad <speak>")?;
    if !head.contains("version=\"1.0\"") {
        return Err("<speak> needs version=\"1.0\"".into());
    }
    let lang = between(head, "xml:lang=\"", "\"").ok_or("<speak> needs xml:lang")?;
    let voice = between(ssml, "<voice name=\"", "\"").ok_or("a <voice name=…> is required")?;
    let text = between(ssml, &format!("<voice name=\"{voice}\">"), "</voice>")
        .ok_or("bad <voice> element")?;
    if text.contains('<') {
        return Err("unexpected markup inside <voice>".into());
    }
    Ok((lang.to_owned(), voice.to_owned(), unescape(text)))
}

async fn synthesize(
    State(inner): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let h = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let reject = |status: StatusCode, why: &str| {
        inner
            .lock()
            .expect("not poisoned")
            .rejected
            .push(why.to_owned());
        (status, why.to_owned()).into_response()
    };
    let key = inner.lock().expect("not poisoned").key.clone();
    if h("ocp-apim-subscription-key") != key {
        return reject(StatusCode::UNAUTHORIZED, "bad subscription key");
    }
    if h("user-agent").is_empty() {
        return reject(StatusCode::BAD_REQUEST, "User-Agent is required");
    }
    if !h(header::CONTENT_TYPE.as_str()).starts_with("application/ssml+xml") {
        return reject(
            StatusCode::BAD_REQUEST,
            "Content-Type must be application/ssml+xml",
        );
    }
    let format = h("x-microsoft-outputformat");
    let rate = match format.as_str() {
        "raw-16khz-16bit-mono-pcm" => 16_000,
        "raw-24khz-16bit-mono-pcm" => 24_000,
        _ => {
            return reject(
                StatusCode::BAD_REQUEST,
                "unsupported X-Microsoft-OutputFormat",
            );
        }
    };
    let ssml = String::from_utf8_lossy(&body).into_owned();
    let (language, voice, text) = match parse_ssml(&ssml) {
        Ok(p) => p,
        Err(e) => return reject(StatusCode::BAD_REQUEST, &e),
    };
    let (fault, guard) = {
        let mut g = inner.lock().expect("not poisoned");
        g.requests.push(Recorded {
            output_format: format,
            user_agent: h("user-agent"),
            ssml,
            language,
            voice,
            text: text.clone(),
        });
        (g.faults.pop_front(), g.open.enter())
    };
    match fault {
        Some(Fault::Refuse(status)) => {
            let why = match status {
                429 => "Too many requests",
                401 => "Access denied due to invalid subscription key.",
                _ => "Internal server error",
            };
            let status = StatusCode::from_u16(status).expect("a valid status");
            return (status, why.to_owned()).into_response();
        }
        Some(Fault::HangBeforeFirstByte) => {
            // Held until the client gives up and hyper drops this handler.
            let _guard = guard;
            std::future::pending::<()>().await;
            unreachable!("pending never completes");
        }
        _ => {}
    }
    let pcm = le_bytes(&tone_for_text(&text, rate));
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    tokio::spawn(async move {
        let _guard = guard;
        // Odd-sized pieces split samples, as networks do.
        for piece in pcm.chunks(3201) {
            if tx.send(Ok(Bytes::copy_from_slice(piece))).await.is_err() {
                return;
            }
            match fault {
                // The body stays open until the client drops the response.
                Some(Fault::StallAfterFirst) => return tx.closed().await,
                Some(Fault::DisconnectAfterFirst) => {
                    let _ = tx.send(Err(std::io::Error::other("fake disconnect"))).await;
                    return;
                }
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "audio/x-wav")
        .body(Body::from_stream(stream))
        .expect("a valid response")
}
