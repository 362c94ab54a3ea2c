//! The one WebSocket driver of the streaming vendors (Deepgram live, ElevenLabs stream-input).
//!
//! A vendor's protocol is a [`WsCodec`]: a plain `&mut self` state machine, quinn-proto /
//! h2-codec style, that takes the session's inputs, the socket's frames and `now`, and yields
//! [`WsOutput`]s (frames to write, events for the session, usage to meter, the end) plus the
//! next deadline it needs ([`WsCodec::poll_timeout`]: KeepAlive due, finalize answer overdue,
//! close handshake over). The codecs know nothing of tokio or tungstenite and are tested on
//! recorded message sequences without sockets.
//!
//! [`run`] is the only code that owns a vendor socket: it connects (with a timeout, abandoned
//! on cancel), then loops — drain the codec's outputs, then wait for whichever comes first of
//! a session input, a frame, the codec's deadline or cancellation, and hand it to the codec.
//! Every write is bounded too ([`WsRequest::send_timeout`]): a peer that stops reading fills
//! the socket's buffers and would otherwise hold the driver in a write forever, deaf to the
//! codec's deadlines. It decides nothing about the protocol.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest};

use crate::usage::UsageKind;
use crate::{CancellationToken, ProviderError};

/// Default of [`WsRequest::send_timeout`]: a live vendor reads as fast as we write (audio at
/// 32 KB/s, text a sentence at a time), so a frame that cannot be written for 5 s means the
/// peer stopped reading and the buffers on both sides are full.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// A frame from the socket, or what happened to it, as a codec sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum WsIn {
    Text(String),
    Binary(Vec<u8>),
    /// The peer's close frame: code and reason, if it sent them.
    Close(Option<(u16, String)>),
    /// Reading or writing failed (the transport's message).
    Error(String),
    /// The stream ended without a close frame.
    Ended,
}

impl WsIn {
    /// For a stream that was not supposed to end yet: the error that ends it, if this input
    /// is a close, a transport error or the end of the stream (`vendor` names the peer).
    pub fn unexpected_end(&self, vendor: &str) -> Option<crate::ProviderError> {
        let why = match self {
            WsIn::Close(frame) => {
                let why = frame
                    .as_ref()
                    .map(|(code, reason)| format!("{code} {reason}"))
                    .unwrap_or_default();
                format!("{vendor} closed the stream: {why}")
            }
            WsIn::Error(e) => format!("{vendor} socket: {e}"),
            WsIn::Ended => format!("{vendor} closed the connection"),
            WsIn::Text(_) | WsIn::Binary(_) => return None,
        };
        Some(crate::ProviderError::Closed(why))
    }
}

/// A frame a codec wants written.
#[derive(Debug, Clone, PartialEq)]
pub enum WsFrame {
    Text(String),
    Binary(Vec<u8>),
    /// A normal close (1000).
    Close,
}

/// What a codec asks its driver to do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum WsOutput<E> {
    /// Write this frame.
    Send(WsFrame),
    /// Deliver this event to the session.
    Event(E),
    /// Meter this much usage of this kind (the driver knows session, provider and model).
    Usage(UsageKind, f64),
    /// The stream is over: the driver drops the socket and ends.
    Finished,
}

/// A vendor's WebSocket protocol as a sans-IO state machine. Every `handle_*` may queue
/// outputs; the driver drains [`WsCodec::poll_output`] after each.
pub trait WsCodec: Send + 'static {
    /// What the session sends (e.g. [`crate::SttInput`]).
    type Input: Send + 'static;
    /// What the session receives (e.g. [`crate::SttEvent`]).
    type Event: Send + 'static;

    /// The socket is open.
    fn handle_connected(&mut self, now: Instant);
    /// The session sent an input.
    fn handle_input(&mut self, now: Instant, input: Self::Input);
    /// The session dropped the stream (cancelled, or its input channel closed).
    fn handle_input_closed(&mut self, now: Instant);
    /// A frame arrived, or the socket failed or ended.
    fn handle_frame(&mut self, now: Instant, frame: WsIn);
    /// `now` reached the deadline of [`WsCodec::poll_timeout`].
    fn handle_timeout(&mut self, now: Instant);
    /// The stream failed outside the protocol (connect, handshake, bad URL).
    fn handle_failure(&mut self, error: ProviderError);
    /// Whether the driver should read session inputs now (a codec that got its last input
    /// stops reading them, so a dropped stream is noticed by cancellation only).
    fn accepts_input(&self) -> bool;
    fn poll_output(&mut self) -> Option<WsOutput<Self::Event>>;
    /// The next instant the codec needs [`WsCodec::handle_timeout`], if any.
    fn poll_timeout(&self) -> Option<Instant>;
}

/// How to open a vendor's socket.
#[derive(Debug, Clone)]
pub struct WsRequest {
    /// Vendor name for error messages (`Deepgram`, `ElevenLabs`).
    pub vendor: &'static str,
    pub url: String,
    /// Extra handshake headers (authentication).
    pub headers: Vec<(&'static str, String)>,
    pub connect_timeout: Duration,
    /// The longest one frame may wait to be written (the peer stopped reading and the
    /// socket's buffers are full); past it the stream fails with [`ProviderError::Timeout`].
    pub send_timeout: Duration,
}

/// Runs `codec` over a socket opened with `request` until the codec finishes, the session
/// stops listening, or the connect fails. `meter` records the codec's usage outputs.
pub async fn run<C: WsCodec>(
    mut codec: C,
    request: WsRequest,
    mut input: mpsc::Receiver<C::Input>,
    events: mpsc::Sender<C::Event>,
    cancel: CancellationToken,
    meter: impl Fn(UsageKind, f64) + Send,
) {
    let ws = tokio::select! {
        // Nobody waits for a stream that was dropped while connecting.
        _ = cancel.cancelled() => return,
        ws = connect(&request) => ws,
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            codec.handle_failure(e);
            let _ = drain(&mut codec, &events, &meter, None).await;
            return;
        }
    };
    let (mut sink, mut source) = ws.split();
    codec.handle_connected(now());
    let mut input_closed = false;
    loop {
        let watch = (!input_closed).then_some(&cancel);
        let writer = Writer {
            sink: &mut sink,
            watch,
            timeout: request.send_timeout,
        };
        match drain(&mut codec, &events, &meter, Some(writer)).await {
            Drained::Continue => {}
            Drained::Over => return,
            Drained::SendFailed(e) => {
                codec.handle_frame(now(), WsIn::Error(e));
                continue;
            }
            Drained::SendTimedOut => {
                codec.handle_failure(ProviderError::Timeout(format!(
                    "{} did not take a frame within {} ms (it stopped reading)",
                    request.vendor,
                    request.send_timeout.as_millis()
                )));
                continue;
            }
            Drained::Cancelled => {
                input_closed = true;
                codec.handle_input_closed(now());
                continue;
            }
        }
        let deadline = codec.poll_timeout();
        let reading = codec.accepts_input() && !input_closed;
        tokio::select! {
            // Cancellation is checked first so a dropped stream never sends more input.
            biased;
            _ = cancel.cancelled(), if !input_closed => {
                input_closed = true;
                codec.handle_input_closed(now());
            }
            i = input.recv(), if reading => match i {
                Some(i) => codec.handle_input(now(), i),
                None => {
                    input_closed = true;
                    codec.handle_input_closed(now());
                }
            },
            _ = sleep_until_opt(deadline) => codec.handle_timeout(now()),
            m = source.next() => {
                let frame = match m {
                    Some(Ok(Message::Text(t))) => WsIn::Text(t.to_string()),
                    Some(Ok(Message::Binary(b))) => WsIn::Binary(b.to_vec()),
                    Some(Ok(Message::Close(f))) => {
                        WsIn::Close(f.map(|f| (u16::from(f.code), f.reason.to_string())))
                    }
                    // tungstenite answers pings itself.
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => WsIn::Error(e.to_string()),
                    None => WsIn::Ended,
                };
                codec.handle_frame(now(), frame);
            }
        }
    }
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;
type WsSink = futures::stream::SplitSink<WsStream, Message>;

enum Drained {
    Continue,
    /// The codec finished or the session stopped listening.
    Over,
    /// Writing a frame failed; the rest of the outputs were dropped.
    SendFailed(String),
    /// A frame waited longer than the send timeout; the rest of the outputs were dropped.
    SendTimedOut,
    /// The session dropped the stream while a write waited; the rest of the outputs were
    /// dropped.
    Cancelled,
}

/// Where [`drain`] writes: the socket, the cancel token to watch while a write waits (`None`
/// once the codec knows of the drop, so a stalled socket cannot delay a barge-in), and the
/// longest a write may wait.
struct Writer<'a> {
    sink: &'a mut WsSink,
    watch: Option<&'a CancellationToken>,
    timeout: Duration,
}

/// Runs the codec's queued outputs. `writer` is `None` before a socket exists.
async fn drain<C: WsCodec>(
    codec: &mut C,
    events: &mpsc::Sender<C::Event>,
    meter: &impl Fn(UsageKind, f64),
    mut writer: Option<Writer<'_>>,
) -> Drained {
    while let Some(out) = codec.poll_output() {
        match out {
            WsOutput::Send(frame) => {
                let Some(Writer {
                    sink,
                    watch,
                    timeout,
                }) = writer.as_mut()
                else {
                    continue;
                };
                let write = tokio::time::timeout(*timeout, async {
                    match frame {
                        WsFrame::Text(t) => sink.send(Message::Text(t.into())).await,
                        WsFrame::Binary(b) => sink.send(Message::Binary(b.into())).await,
                        WsFrame::Close => sink.close().await,
                    }
                });
                let sent = match watch {
                    Some(cancel) => tokio::select! {
                        biased;
                        _ = cancel.cancelled() => {
                            while codec.poll_output().is_some() {}
                            return Drained::Cancelled;
                        }
                        r = write => r,
                    },
                    None => write.await,
                };
                match sent {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        // What was queued after the failed write belongs to a stream that is
                        // gone.
                        while codec.poll_output().is_some() {}
                        return Drained::SendFailed(e.to_string());
                    }
                    Err(_elapsed) => {
                        while codec.poll_output().is_some() {}
                        return Drained::SendTimedOut;
                    }
                }
            }
            WsOutput::Event(ev) => {
                if events.send(ev).await.is_err() {
                    return Drained::Over;
                }
            }
            WsOutput::Usage(kind, amount) => meter(kind, amount),
            WsOutput::Finished => return Drained::Over,
        }
    }
    Drained::Continue
}

async fn connect(request: &WsRequest) -> Result<WsStream, ProviderError> {
    let vendor = request.vendor;
    let url = &request.url;
    let mut req = url
        .as_str()
        .into_client_request()
        .map_err(|e| ProviderError::InvalidRequest(format!("bad {vendor} URL {url}: {e}")))?;
    for (name, value) in &request.headers {
        let value = value
            .parse()
            .map_err(|_| ProviderError::InvalidRequest("API key is not a valid header".into()))?;
        req.headers_mut().insert(*name, value);
    }
    let handshake = async {
        let tcp = tcp_connect(&req).await.map_err(ProviderError::Connect)?;
        tokio_tungstenite::client_async_tls(req, tcp)
            .await
            .map_err(connect_error)
    };
    let (ws, _) = tokio::time::timeout(request.connect_timeout, handshake)
        .await
        .map_err(|_| ProviderError::Timeout(format!("{vendor} connect")))??;
    Ok(ws)
}

/// The kernel's send buffer of a vendor socket: 2 s of 16 kHz PCM16 (Linux reserves twice
/// that).
/// Left to autotuning it grows to megabytes — minutes of audio queued for a peer that has
/// stopped reading, which would pass unnoticed that long before a write blocks and
/// [`WsRequest::send_timeout`] can tell. Live audio older than that is worthless anyway.
const SEND_BUFFER: u32 = 64 * 1024;

/// TCP to the request's host and port (the first address that answers), with
/// [`SEND_BUFFER`].
async fn tcp_connect(
    req: &tungstenite::handshake::client::Request,
) -> Result<tokio::net::TcpStream, String> {
    let uri = req.uri();
    let host = uri.host().ok_or("no host in the URL")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("wss") {
            443
        } else {
            80
        });
    let mut last = format!("{host}:{port} has no address");
    for addr in tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("{host}: {e}"))?
    {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .map_err(|e| e.to_string())?;
        socket
            .set_send_buffer_size(SEND_BUFFER)
            .map_err(|e| e.to_string())?;
        match socket.connect(addr).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(last)
}

fn now() -> Instant {
    // tokio's clock, so that a paused test clock also pauses the codecs' deadlines.
    tokio::time::Instant::now().into_std()
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Maps a WebSocket handshake failure to a provider error.
pub(crate) fn connect_error(e: tungstenite::Error) -> ProviderError {
    match e {
        tungstenite::Error::Http(resp) => {
            let status = resp.status().as_u16();
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            if status == 429 {
                ProviderError::RateLimited(body)
            } else {
                ProviderError::Http { status, body }
            }
        }
        other => ProviderError::Connect(other.to_string()),
    }
}

/// `http(s)://` → `ws(s)://`, without a trailing slash.
pub(crate) fn ws_base(base: &str) -> String {
    let base = base.trim().trim_end_matches('/');
    if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        base.to_owned()
    }
}

/// Percent-encodes a query value (model and language names are plain ASCII in practice).
pub(crate) fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
