//! The one HTTP driver of the request-per-chunk synthesizers (OpenAI `/audio/speech`, Azure
//! REST), and the pure parts of every HTTP vendor call.
//!
//! - [`HttpRequest`]: a vendor request as data (method POST, URL, headers, body), built by
//!   pure functions in the vendor modules and tested without a socket; [`HttpRequest::send`]
//!   is the only place it becomes a reqwest call.
//! - [`PcmChunkCodec`]: the protocol both synthesizers share, sans-IO. Text chunks in, one
//!   request per chunk out, in order and one at a time; the response's status, body pieces
//!   and end in, [`TtsEvent`]s out (raw PCM16 LE decoded across pieces that split a sample,
//!   `ChunkDone` at the body's end, `Finished` after `End`, the first failure as `Error`).
//! - [`run_chunked_tts`]: the driver. It feeds the codec the session's inputs and the HTTP
//!   response, sends what the codec asks, and is the only part that awaits.
//! - [`error_from_response`]: an unsuccessful answer as a [`ProviderError`], pure.

use std::collections::VecDeque;
use std::time::Duration;

use futures::StreamExt;

use crate::{ProviderError, TtsEvent, TtsInput, TtsTask};

/// TCP + TLS setup longer than this means the endpoint is unreachable; failover beats waiting.
/// Adapters take it from their config (`connect_timeout`).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest an HTTP vendor may stay silent while an answer is owed: before the response
/// headers (first byte) and between body pieces (idle). A live vendor streams audio or tokens
/// well within a second; 15 s of nothing is a hung connection, and waiting longer only holds
/// a voice turn. reqwest's read timeout restarts at every read, so a long stream that keeps
/// flowing is never cut. Adapters take it from their config (`read_timeout`).
pub const READ_TIMEOUT: Duration = Duration::from_secs(15);
/// Error bodies are logged and shown; a few hundred bytes say what went wrong.
const MAX_ERROR_BODY: usize = 500;

/// A reqwest client for streaming APIs: a connect timeout, a read timeout per read (first
/// byte and idle), no total timeout (streams are long), pooled connections.
pub(crate) fn http_client_with(
    connect_timeout: Duration,
    read_timeout: Duration,
) -> reqwest::Client {
    crate::install_crypto_provider();
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .read_timeout(read_timeout)
        .user_agent(concat!("duplex/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("a client with these settings always builds")
}

/// Maps a transport error.
pub(crate) fn reqwest_error(e: reqwest::Error) -> ProviderError {
    if e.is_connect() {
        ProviderError::Connect(e.to_string())
    } else if e.is_timeout() {
        ProviderError::Timeout(format!(
            "the provider sent nothing within its read timeout (first byte or idle): {e}"
        ))
    } else {
        ProviderError::Closed(e.to_string())
    }
}

/// An unsuccessful answer (status, `Retry-After` header, body) as a provider error; the body
/// is cut to [`MAX_ERROR_BODY`] bytes.
pub fn error_from_response(status: u16, retry_after: Option<&str>, body: &str) -> ProviderError {
    let mut cut = MAX_ERROR_BODY.min(body.len());
    while !body.is_char_boundary(cut) {
        cut -= 1;
    }
    let body = body[..cut].to_owned();
    match (status, retry_after) {
        (429, Some(after)) => ProviderError::RateLimited(format!("retry after {after} s: {body}")),
        (429, None) => ProviderError::RateLimited(body),
        _ => ProviderError::Http { status, body },
    }
}

/// Reads an unsuccessful response into a provider error.
pub(crate) async fn http_error(resp: reqwest::Response) -> ProviderError {
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = resp.text().await.unwrap_or_default();
    error_from_response(status, retry_after.as_deref(), &body)
}

/// A vendor's POST request as data.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpRequest {
    pub url: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl HttpRequest {
    pub(crate) async fn send(
        self,
        client: &reqwest::Client,
    ) -> Result<reqwest::Response, reqwest::Error> {
        let mut builder = client.post(self.url);
        for (name, value) in self.headers {
            builder = builder.header(name, value);
        }
        builder.body(self.body).send().await
    }
}

/// What a [`PcmChunkCodec`] asks its driver to do.
#[derive(Debug, Clone, PartialEq)]
pub enum ChunkOutput {
    /// Synthesize chunk `index`: send the vendor's request for `text`.
    Request { index: u32, text: String },
    /// Deliver this event to the session.
    Event(TtsEvent),
    /// The stream is over.
    Finished,
}

/// The request-per-chunk PCM synthesis protocol; see the module docs.
#[derive(Debug)]
pub struct PcmChunkCodec {
    rate: u32,
    /// The chunk whose request is in flight.
    in_flight: Option<u32>,
    /// A body piece may split a sample: its first byte waits for the next piece.
    carry: Option<u8>,
    done: bool,
    out: VecDeque<ChunkOutput>,
}

impl PcmChunkCodec {
    /// For vendors answering PCM16 LE mono at `rate`.
    pub fn new(rate: u32) -> PcmChunkCodec {
        PcmChunkCodec {
            rate,
            in_flight: None,
            carry: None,
            done: false,
            out: VecDeque::new(),
        }
    }

    /// Inputs are read one chunk at a time: the next request waits for the previous body.
    pub fn accepts_input(&self) -> bool {
        !self.done && self.in_flight.is_none()
    }

    pub fn handle_input(&mut self, input: TtsInput) {
        if !self.accepts_input() {
            return;
        }
        match input {
            TtsInput::Text { index, text } => {
                self.in_flight = Some(index);
                self.carry = None;
                self.out.push_back(ChunkOutput::Request { index, text });
            }
            TtsInput::End => {
                self.out.push_back(ChunkOutput::Event(TtsEvent::Finished));
                self.finish();
            }
        }
    }

    /// The session dropped the stream.
    pub fn handle_input_closed(&mut self) {
        if !self.done {
            self.out.clear();
            self.finish();
        }
    }

    /// The request failed (transport, or an unsuccessful status read into an error).
    pub fn handle_failure(&mut self, error: ProviderError) {
        if !self.done {
            self.out
                .push_back(ChunkOutput::Event(TtsEvent::Error(error)));
            self.finish();
        }
    }

    /// A piece of the response body.
    pub fn handle_body(&mut self, bytes: &[u8]) {
        let Some(index) = self.in_flight.filter(|_| !self.done) else {
            return;
        };
        let samples = pcm16_samples(&mut self.carry, bytes);
        if !samples.is_empty() {
            self.out.push_back(ChunkOutput::Event(TtsEvent::Audio {
                index,
                samples,
                sample_rate: self.rate,
            }));
        }
    }

    /// The response body ended: the chunk is done.
    pub fn handle_body_end(&mut self) {
        if let Some(index) = self.in_flight.take().filter(|_| !self.done) {
            self.out
                .push_back(ChunkOutput::Event(TtsEvent::ChunkDone { index }));
        }
    }

    pub fn poll_output(&mut self) -> Option<ChunkOutput> {
        self.out.pop_front()
    }

    fn finish(&mut self) {
        self.done = true;
        self.in_flight = None;
        self.out.push_back(ChunkOutput::Finished);
    }
}

/// Decodes little-endian 16-bit samples, carrying an odd trailing byte to the next call.
pub(crate) fn pcm16_samples(carry: &mut Option<u8>, bytes: &[u8]) -> Vec<i16> {
    let mut out = Vec::with_capacity(bytes.len() / 2 + 1);
    let mut rest = bytes;
    if let Some(lo) = carry.take() {
        match rest.split_first() {
            Some((&hi, tail)) => {
                out.push(i16::from_le_bytes([lo, hi]));
                rest = tail;
            }
            None => {
                *carry = Some(lo);
                return out;
            }
        }
    }
    let mut pairs = rest.chunks_exact(2);
    out.extend(pairs.by_ref().map(|p| i16::from_le_bytes([p[0], p[1]])));
    if let [b] = pairs.remainder() {
        *carry = Some(*b);
    }
    out
}

/// Runs a TTS stream of a request-per-chunk vendor: `request` builds (and meters) the
/// vendor's request for one chunk's text. Dropping the stream cancels the request in flight.
pub(crate) fn run_chunked_tts<F>(
    mut task: TtsTask,
    rate: u32,
    client: reqwest::Client,
    mut request: F,
) where
    F: FnMut(&str) -> HttpRequest + Send + 'static,
{
    tokio::spawn(async move {
        let mut codec = PcmChunkCodec::new(rate);
        // The response whose body is being read.
        let mut body: Option<futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>> =
            None;
        loop {
            while let Some(out) = codec.poll_output() {
                match out {
                    ChunkOutput::Request { text, .. } => {
                        let sent = tokio::select! {
                            _ = task.cancel.cancelled() => return,
                            r = request(&text).send(&client) => r,
                        };
                        match sent {
                            Err(e) => codec.handle_failure(reqwest_error(e)),
                            Ok(resp) if !resp.status().is_success() => {
                                let e = tokio::select! {
                                    _ = task.cancel.cancelled() => return,
                                    e = http_error(resp) => e,
                                };
                                codec.handle_failure(e);
                            }
                            Ok(resp) => body = Some(resp.bytes_stream().boxed()),
                        }
                    }
                    ChunkOutput::Event(ev) => {
                        if task.events.send(ev).await.is_err() {
                            return;
                        }
                    }
                    ChunkOutput::Finished => return,
                }
            }
            tokio::select! {
                _ = task.cancel.cancelled() => codec.handle_input_closed(),
                input = task.input.recv(), if codec.accepts_input() => match input {
                    Some(input) => codec.handle_input(input),
                    None => codec.handle_input_closed(),
                },
                piece = next_piece(&mut body) => match piece {
                    Some(Ok(bytes)) => codec.handle_body(&bytes),
                    Some(Err(e)) => {
                        body = None;
                        codec.handle_failure(reqwest_error(e));
                    }
                    None => {
                        body = None;
                        codec.handle_body_end();
                    }
                },
            }
        }
    });
}

async fn next_piece(
    body: &mut Option<futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>>,
) -> Option<reqwest::Result<bytes::Bytes>> {
    match body {
        Some(b) => b.next().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::expect;
    use std::fmt::Write;

    #[test]
    fn pcm_decoding_carries_split_samples() {
        let mut carry = None;
        let all: Vec<i16> = vec![1, -2, 300, -400, 5];
        let bytes: Vec<u8> = all.iter().flat_map(|s| s.to_le_bytes()).collect();
        let mut out = Vec::new();
        for piece in [
            &bytes[..1],
            &bytes[1..4],
            &bytes[4..4],
            &bytes[4..9],
            &bytes[9..],
        ] {
            out.extend(pcm16_samples(&mut carry, piece));
        }
        assert_eq!(out, all);
        assert_eq!(carry, None);
    }

    enum Step {
        Text(u32, &'static str),
        End,
        Body(&'static [u8]),
        BodyEnd,
        Fail(ProviderError),
        InputClosed,
    }

    fn timeline(script: Vec<Step>) -> String {
        let mut codec = PcmChunkCodec::new(24_000);
        let mut out = String::new();
        for step in script {
            let what = match step {
                Step::Text(index, text) => {
                    let reading = codec.accepts_input();
                    codec.handle_input(TtsInput::Text {
                        index,
                        text: text.into(),
                    });
                    format!("text {index} {text:?} (reading inputs: {reading})")
                }
                Step::End => {
                    codec.handle_input(TtsInput::End);
                    "end".into()
                }
                Step::Body(b) => {
                    codec.handle_body(b);
                    format!("body {b:?}")
                }
                Step::BodyEnd => {
                    codec.handle_body_end();
                    "body end".into()
                }
                Step::Fail(e) => {
                    codec.handle_failure(e);
                    "failure".into()
                }
                Step::InputClosed => {
                    codec.handle_input_closed();
                    "input closed".into()
                }
            };
            writeln!(out, "{what}").unwrap();
            while let Some(o) = codec.poll_output() {
                writeln!(out, "  -> {o:?}").unwrap();
            }
        }
        out
    }

    #[test]
    fn one_request_per_chunk_in_order_with_pcm_split_across_pieces() {
        // Pieces as the OpenAI fake streams them: split mid-sample on purpose.
        let got = timeline(vec![
            Step::Text(0, "Hello."),
            Step::Body(&[1, 0, 2]),
            Step::Body(&[0]),
            Step::Body(&[]),
            Step::Body(&[255, 255]),
            Step::BodyEnd,
            Step::Text(1, "Bye."),
            Step::Text(2, "not read while 1 is in flight"),
            Step::BodyEnd,
            Step::End,
            Step::Text(3, "after the end"),
        ]);
        expect![[r#"
            text 0 "Hello." (reading inputs: true)
              -> Request { index: 0, text: "Hello." }
            body [1, 0, 2]
              -> Event(Audio { index: 0, samples: [1], sample_rate: 24000 })
            body [0]
              -> Event(Audio { index: 0, samples: [2], sample_rate: 24000 })
            body []
            body [255, 255]
              -> Event(Audio { index: 0, samples: [-1], sample_rate: 24000 })
            body end
              -> Event(ChunkDone { index: 0 })
            text 1 "Bye." (reading inputs: true)
              -> Request { index: 1, text: "Bye." }
            text 2 "not read while 1 is in flight" (reading inputs: false)
            body end
              -> Event(ChunkDone { index: 1 })
            end
              -> Event(Finished)
              -> Finished
            text 3 "after the end" (reading inputs: false)
        "#]]
        .assert_eq(&got);
    }

    #[test]
    fn a_failed_request_ends_the_stream_with_its_error() {
        let got = timeline(vec![
            Step::Text(0, "Hello."),
            Step::Fail(error_from_response(
                401,
                None,
                r#"{"error":{"message":"bad key"}}"#,
            )),
            Step::Body(&[1, 0]),
            Step::End,
        ]);
        expect![[r#"
            text 0 "Hello." (reading inputs: true)
              -> Request { index: 0, text: "Hello." }
            failure
              -> Event(Error(Http { status: 401, body: "{\"error\":{\"message\":\"bad key\"}}" }))
              -> Finished
            body [1, 0]
            end
        "#]]
        .assert_eq(&got);
        let got = timeline(vec![
            Step::Text(0, "Hello."),
            Step::Body(&[1, 0]),
            Step::InputClosed,
        ]);
        expect![[r#"
            text 0 "Hello." (reading inputs: true)
              -> Request { index: 0, text: "Hello." }
            body [1, 0]
              -> Event(Audio { index: 0, samples: [1], sample_rate: 24000 })
            input closed
              -> Finished
        "#]]
        .assert_eq(&got);
    }

    #[test]
    fn error_responses_name_rate_limits_and_cut_long_bodies() {
        assert_eq!(
            error_from_response(429, Some("7"), "slow down"),
            ProviderError::RateLimited("retry after 7 s: slow down".into())
        );
        assert_eq!(
            error_from_response(429, None, "slow down"),
            ProviderError::RateLimited("slow down".into())
        );
        let long = "é".repeat(400);
        match error_from_response(503, None, &long) {
            ProviderError::Http { status: 503, body } => {
                assert!(body.len() <= MAX_ERROR_BODY && body.len() >= MAX_ERROR_BODY - 1);
                assert!(long.starts_with(&body));
            }
            other => panic!("{other:?}"),
        }
    }
}
