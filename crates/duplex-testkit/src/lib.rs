//! Fake cloud providers for tests. Each fake is a real server on `127.0.0.1:0` that speaks
//! the vendor's wire protocol (WebSocket or HTTP with the vendor's paths, headers, message
//! shapes and close codes), checks what the client sends the way the vendor would (auth
//! header, query parameters, content types), records every request so tests can assert on
//! it, and can be told to misbehave.
//!
//! - [`deepgram::DeepgramFake`]: live `/v1/listen` WebSocket (interim/final `Results`,
//!   `SpeechStarted`, `UtteranceEnd`, `Finalize` answered with `from_finalize`, `Metadata` on
//!   `CloseStream`, and the NET-0001 close when neither audio nor KeepAlive arrives in time);
//! - [`openai::OpenAiFake`]: SSE chat completions byte for byte, `/v1/audio/speech` PCM
//!   streaming and `/v1/audio/transcriptions` multipart, with fault modes ([`openai::Fault`]);
//! - [`elevenlabs::ElevenLabsFake`]: `stream-input` WebSocket TTS;
//! - [`azure::AzureFake`]: REST TTS that validates SSML and headers.
//!
//! Every fake can be told to misbehave ([`openai::Fault`] for the OpenAI APIs, [`Fault`] for
//! the others) and counts the connections or requests it is still serving (`open()`), so a
//! test can check that a client gave every one of them up.
//!
//! Dropping a fake stops its server.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

pub mod azure;
pub mod deepgram;
pub mod elevenlabs;
pub mod openai;

/// A server task that stops when dropped.
pub struct ServerHandle {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    tcp: Gauge,
}

impl ServerHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// TCP connections open to the server: requests in progress, WebSocket sessions, and
    /// the idle keep-alive connections a client's pool holds.
    pub fn tcp_connections(&self) -> usize {
        self.tcp.get()
    }
}

/// A listener that counts its accepted connections while they are open.
struct CountingListener {
    inner: tokio::net::TcpListener,
    tcp: Gauge,
}

impl axum::serve::Listener for CountingListener {
    type Io = Counted;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Counted, SocketAddr) {
        let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        let guard = self.tcp.enter();
        (Counted { io, _guard: guard }, addr)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// An accepted connection, counted until it is dropped.
struct Counted {
    io: tokio::net::TcpStream,
    _guard: GaugeGuard,
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How the next connection or request to a fake (Deepgram, ElevenLabs, Azure) misbehaves.
/// "The first" is the vendor's first answer on the stream: a transcript (Deepgram), an audio
/// message (ElevenLabs), a piece of the PCM body (Azure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Refuse the handshake or request with this HTTP status (401, 429, 500, …) and the
    /// vendor's error body.
    Refuse(u16),
    /// Accept the TCP connection and the request, and never answer: no handshake response,
    /// no status line.
    HangBeforeFirstByte,
    /// Deliver the first answer, then keep the connection open and neither read nor write
    /// (only WebSocket pings, which a client answers by itself and which tell the fake when
    /// the client has gone).
    StallAfterFirst,
    /// Deliver the first answer, then drop the TCP connection without a close frame or the
    /// rest of the body.
    DisconnectAfterFirst,
    /// Deliver the first answer, then a message that breaks the protocol (a text frame that
    /// is not JSON).
    MalformedAfterFirst,
}

/// Counts what a fake is still serving: a guard per connection or request.
#[derive(Debug, Clone, Default)]
pub(crate) struct Gauge(Arc<AtomicUsize>);

impl Gauge {
    pub(crate) fn enter(&self) -> GaugeGuard {
        self.0.fetch_add(1, Ordering::SeqCst);
        GaugeGuard(self.0.clone())
    }

    pub(crate) fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// One connection or request being served; dropping it counts it out.
#[derive(Debug)]
pub(crate) struct GaugeGuard(Arc<AtomicUsize>);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves `router` on a fresh loopback port.
pub(crate) async fn serve(router: axum::Router) -> ServerHandle {
    serve_with(router, None).await
}

/// [`serve`] with a receive buffer of about `recv_buffer` bytes on every accepted socket
/// (Linux doubles the value; accepted sockets inherit it from the listener, and a set size
/// turns receive autotuning off). A fake that stops reading then pushes back on its client
/// within tens of kilobytes instead of megabytes, as a vendor whose server is stuck does
/// once its buffers are full.
pub(crate) async fn serve_with(router: axum::Router, recv_buffer: Option<u32>) -> ServerHandle {
    let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
    if let Some(size) = recv_buffer {
        socket
            .set_recv_buffer_size(size)
            .expect("SO_RCVBUF can be set");
    }
    socket
        .bind("127.0.0.1:0".parse().expect("an address"))
        .expect("bind a loopback port");
    // Tests open a handful of connections at a time.
    let listener = socket.listen(64).expect("listen");
    let addr = listener
        .local_addr()
        .expect("a bound listener has an address");
    let tcp = Gauge::default();
    let listener = CountingListener {
        inner: listener,
        tcp: tcp.clone(),
    };
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    ServerHandle { addr, task, tcp }
}

/// Polls `cond` every 10 ms until it holds or `within` passes; returns whether it held.
pub async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs a test body with a deadline, so that a hung fake fails the test instead of CI.
pub async fn within<T>(limit: Duration, body: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, body)
        .await
        .expect("test took too long")
}

/// A deterministic "voice": a 220 Hz tone, 40 ms per character, for fakes that return audio.
pub fn tone_for_text(text: &str, rate: u32) -> Vec<i16> {
    let n = text.chars().count() * rate as usize * 40 / 1000;
    (0..n)
        .map(|i| {
            let t = i as f64 / f64::from(rate);
            ((std::f64::consts::TAU * 220.0 * t).sin() * 8000.0) as i16
        })
        .collect()
}

pub(crate) fn le_bytes(samples: &[i16]) -> Vec<u8> {
    samples.iter().flat_map(|s| s.to_le_bytes()).collect()
}

/// Root mean square of little-endian PCM16 bytes.
pub(crate) fn rms_le(bytes: &[u8]) -> f64 {
    let n = bytes.len() / 2;
    if n == 0 {
        return 0.0;
    }
    let sum: f64 = bytes
        .chunks_exact(2)
        .map(|p| f64::from(i16::from_le_bytes([p[0], p[1]])).powi(2))
        .sum();
    (sum / n as f64).sqrt()
}
