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
//! Dropping a fake stops its server.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

pub mod azure;
pub mod deepgram;
pub mod elevenlabs;
pub mod openai;

/// A server task that stops when dropped.
pub struct ServerHandle {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl ServerHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `router` on a fresh loopback port.
pub(crate) async fn serve(router: axum::Router) -> ServerHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let addr = listener
        .local_addr()
        .expect("a bound listener has an address");
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    ServerHandle { addr, task }
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
