//! `Client`: one WebSocket connection to a duplex server, as thin as possible.
//!
//! A reader task turns every inbound frame into a timestamped [`Event`] as soon as it arrives,
//! so latencies measured from events do not depend on how busy the caller is. Sending happens
//! on the caller's task. Server text that is not a valid `duplex.v1` message is surfaced as
//! [`Error::BadServerJson`] (once, in order with the other events), never swallowed: the
//! server's tests rely on the client being at least as strict as the protocol.

use std::time::Duration;

use duplex_proto::{ClientMessage, ServerMessage, SessionReady, SessionStart};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::error::{Error, Result};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long the TCP connect plus WebSocket handshake may take: a loaded server on loopback
/// answers in milliseconds, so ten seconds only trips on a dead or wedged server.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `close` waits for the server's close frame before dropping the socket.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Events buffered between the reader task and the caller: about 20 s of 20 ms audio frames.
/// When the caller falls further behind, the reader stops reading and TCP pushes back on the
/// server, exactly as a slow real client would.
const EVENT_QUEUE: usize = 1024;
/// tungstenite's read buffer. tungstenite 0.28 zero-fills the free part of this buffer before
/// every socket read, including the read that finds nothing and returns `WouldBlock`; with its
/// 128 KiB default that is ~256 KiB of memset per 20 ms frame, which made the load generator
/// itself a large share of a small box's CPU. 4 KiB holds several frames of any protocol
/// format; larger messages still arrive whole (the buffer grows to the frame's length).
const READ_BUFFER_BYTES: usize = 4 * 1024;

/// Something the server did, stamped with the moment the reader task saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub at: Instant,
    pub kind: EventKind,
}

/// What the server sent.
#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    /// A text frame holding a valid server message.
    Json(ServerMessage),
    /// A binary frame: assistant audio (or an echoed frame).
    Audio(Vec<u8>),
    /// The server's close frame: `Some((code, reason))`, or `None` for a close without status.
    Close(Option<(u16, String)>),
}

impl Event {
    /// The JSON message, if this is one.
    pub fn json(&self) -> Option<&ServerMessage> {
        match &self.kind {
            EventKind::Json(m) => Some(m),
            _ => None,
        }
    }

    /// The close code, if this is a close event carrying one.
    pub fn close_code(&self) -> Option<u16> {
        match &self.kind {
            EventKind::Close(Some((code, _))) => Some(*code),
            _ => None,
        }
    }

    /// The `error` message's code, if this is an `error` message.
    pub fn error_code(&self) -> Option<duplex_proto::ErrorCode> {
        match self.json() {
            Some(ServerMessage::Error(e)) => Some(e.code),
            _ => None,
        }
    }

    /// A short label for timelines: the message type, `audio(N)` or `close(CODE)`.
    pub fn label(&self) -> String {
        match &self.kind {
            EventKind::Json(m) => message_type(m).to_string(),
            EventKind::Audio(b) => format!("audio({})", b.len()),
            EventKind::Close(Some((code, _))) => format!("close({code})"),
            EventKind::Close(None) => "close".to_string(),
        }
    }
}

/// The wire `type` of a server message.
pub fn message_type(m: &ServerMessage) -> &'static str {
    match m {
        ServerMessage::SessionReady(_) => "session.ready",
        ServerMessage::SpeechStarted(_) => "vad.speech_started",
        ServerMessage::SpeechStopped(_) => "vad.speech_stopped",
        ServerMessage::UserTranscript(_) => "user_transcript",
        ServerMessage::AssistantMessage(_) => "assistant_message",
        ServerMessage::AssistantAudioStart(_) => "assistant_audio.start",
        ServerMessage::AssistantAudioEnd(_) => "assistant_audio.end",
        ServerMessage::Interrupted(_) => "interrupted",
        ServerMessage::UsageUpdate(_) => "usage_update",
        ServerMessage::LimitExceeded(_) => "limit_exceeded",
        ServerMessage::Error(_) => "error",
        ServerMessage::Pong(_) => "pong",
    }
}

/// One connection to `/v1/conversation`.
pub struct Client {
    sink: SplitSink<Ws, Message>,
    rx: mpsc::Receiver<Result<Event>>,
    reader: JoinHandle<()>,
    log: Vec<Event>,
    keep_log: bool,
}

impl Client {
    /// Connects offering the `duplex.v1` subprotocol and, if `start` is given, sends
    /// `session.start`. With `None` the URL's query parameters start the session (or the
    /// caller sends `session.start` itself). Does not wait for `session.ready`: see
    /// [`Client::wait_ready`].
    pub async fn connect(url: &str, start: Option<SessionStart>) -> Result<Client> {
        Client::connect_with_protocol(url, Some(duplex_proto::SUBPROTOCOL), start).await
    }

    /// Like [`Client::connect`] but offering `subprotocol` instead of `duplex.v1`, or none
    /// (for tests of the server's handshake checks).
    pub async fn connect_with_protocol(
        url: &str,
        subprotocol: Option<&str>,
        start: Option<SessionStart>,
    ) -> Result<Client> {
        let invalid = |detail: String| Error::InvalidUrl {
            url: url.to_string(),
            detail,
        };
        let mut request = url
            .into_client_request()
            .map_err(|e| invalid(e.to_string()))?;
        if let Some(p) = subprotocol {
            let value = HeaderValue::from_str(p).map_err(|e| invalid(e.to_string()))?;
            request
                .headers_mut()
                .insert("Sec-WebSocket-Protocol", value);
        }
        // Nagle off: 20 ms audio frames must not wait for the previous frame's ACK.
        let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER_BYTES);
        let handshake = tokio_tungstenite::connect_async_with_config(request, Some(config), true);
        let (ws, _response) = tokio::time::timeout(CONNECT_TIMEOUT, handshake)
            .await
            .map_err(|_| Error::ConnectTimeout {
                url: url.to_string(),
                timeout: CONNECT_TIMEOUT,
            })?
            .map_err(|e| Error::Connect {
                url: url.to_string(),
                source: Box::new(e),
            })?;
        let (sink, stream) = ws.split();
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let reader = tokio::spawn(read_loop(stream, tx));
        let mut client = Client {
            sink,
            rx,
            reader,
            log: Vec::new(),
            keep_log: true,
        };
        if let Some(start) = start {
            client
                .send_json(&ClientMessage::SessionStart(start))
                .await?;
        }
        Ok(client)
    }

    /// Sends a client message as a text frame.
    pub async fn send_json(&mut self, msg: &ClientMessage) -> Result<()> {
        let text = serde_json::to_string(msg).expect("client messages are plain data");
        self.send_text_raw(&text).await
    }

    /// Sends one binary audio frame.
    pub async fn send_audio(&mut self, pcm: &[u8]) -> Result<()> {
        self.send_binary_raw(pcm.to_vec()).await
    }

    /// Sends any text frame, valid or not (for the server's bad-input tests).
    pub async fn send_text_raw(&mut self, text: &str) -> Result<()> {
        self.sink.send(Message::text(text)).await?;
        Ok(())
    }

    /// Sends any binary frame (odd lengths, oversized frames...).
    pub async fn send_binary_raw(&mut self, bytes: Vec<u8>) -> Result<()> {
        self.sink.send(Message::binary(bytes)).await?;
        Ok(())
    }

    /// The next event, waiting at most `timeout`: `Ok(None)` on timeout,
    /// `Err(Error::Closed)` once the connection is gone and all its events were read.
    pub async fn next_event(&mut self, timeout: Duration) -> Result<Option<Event>> {
        match tokio::time::timeout(timeout, self.recv_event()).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// The next event, however long it takes. Cancel-safe: usable in `select!`.
    pub async fn recv_event(&mut self) -> Result<Event> {
        let event = self.rx.recv().await.unwrap_or(Err(Error::Closed))?;
        if self.keep_log {
            self.log.push(event.clone());
        }
        Ok(event)
    }

    /// Reads events until one satisfies `pred` and returns it; every event read (matching or
    /// not) lands in [`Client::events`]. Fails on timeout, on a closed connection and on
    /// invalid server JSON.
    pub async fn wait_for(
        &mut self,
        mut pred: impl FnMut(&Event) -> bool,
        timeout: Duration,
    ) -> Result<Event> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left).await? {
                Some(e) if pred(&e) => return Ok(e),
                Some(_) => {}
                None => return Err(Error::Timeout(timeout)),
            }
        }
    }

    /// Waits for `session.ready`, which must be the first thing the server sends.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<SessionReady> {
        match self.next_event(timeout).await? {
            Some(Event {
                kind: EventKind::Json(ServerMessage::SessionReady(r)),
                ..
            }) => Ok(r),
            Some(other) => Err(Error::NotReady(describe(&other))),
            None => Err(Error::Timeout(timeout)),
        }
    }

    /// Every event read so far (while logging is on).
    pub fn events(&self) -> &[Event] {
        &self.log
    }

    /// Empties the log, returning what it held.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.log)
    }

    /// Turns the event log on or off (the runner turns it off: it keeps its own timeline).
    pub fn set_keep_log(&mut self, keep: bool) {
        self.keep_log = keep;
    }

    /// Closes with code 1000 and waits (bounded by [`CLOSE_TIMEOUT`]) for the server's close
    /// frame, returning its code and reason if one arrived.
    pub async fn close(mut self) -> Result<Option<(u16, String)>> {
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        };
        // The server may have closed first; then there is nothing left to send.
        let _ = self.sink.send(Message::Close(Some(frame))).await;
        let deadline = Instant::now() + CLOSE_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left).await {
                Ok(Some(Event {
                    kind: EventKind::Close(c),
                    ..
                })) => return Ok(c),
                Ok(Some(_)) | Err(Error::BadServerJson { .. }) => {}
                Ok(None) | Err(_) => return Ok(None),
            }
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // The reader would otherwise sit on a half-open socket until the server gives up.
        self.reader.abort();
    }
}

fn describe(e: &Event) -> String {
    match &e.kind {
        EventKind::Json(m) => serde_json::to_string(m).unwrap_or_else(|_| e.label()),
        _ => e.label(),
    }
}

async fn read_loop(mut stream: SplitStream<Ws>, tx: mpsc::Sender<Result<Event>>) {
    let mut seen_close = false;
    while let Some(msg) = stream.next().await {
        let at = Instant::now();
        let item = match msg {
            Ok(Message::Text(text)) => match duplex_proto::parse_server_message(text.as_str()) {
                Ok(m) => Ok(Event {
                    at,
                    kind: EventKind::Json(m),
                }),
                Err(e) => Err(Error::BadServerJson {
                    text: text.to_string(),
                    detail: e.to_string(),
                }),
            },
            Ok(Message::Binary(b)) => Ok(Event {
                at,
                kind: EventKind::Audio(b.to_vec()),
            }),
            Ok(Message::Close(frame)) => {
                seen_close = true;
                let c = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                Ok(Event {
                    at,
                    kind: EventKind::Close(c),
                })
            }
            // tungstenite answers pings itself; pongs and raw frames carry nothing for us.
            Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => continue,
            // After a close frame the transport winding down is not news.
            Err(_) if seen_close => break,
            Err(e) => Err(Error::WebSocket(Box::new(e))),
        };
        let fatal = item
            .as_ref()
            .is_err_and(|e| matches!(e, Error::WebSocket(_)));
        if tx.send(item).await.is_err() || fatal {
            break;
        }
    }
}
