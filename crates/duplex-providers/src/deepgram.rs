//! Deepgram live speech-to-text over WebSocket (`/v1/listen`).
//!
//! Wire protocol, as documented by Deepgram (developers.deepgram.com, "Live audio" API
//! reference and the `KeepAlive` / `Finalize` / `CloseStream` pages):
//! - connect to `wss://api.deepgram.com/v1/listen?model=…&language=…&encoding=linear16&
//!   sample_rate=16000&channels=1&interim_results=true&endpointing=…&utterance_end_ms=…&
//!   vad_events=true&smart_format=true` with the header `Authorization: Token KEY`;
//! - send audio as binary frames of little-endian 16-bit PCM;
//! - send text frames `{"type":"KeepAlive"}` while no audio flows (the server closes with
//!   `NET-0001` after 10 s without audio or KeepAlive), `{"type":"Finalize"}` to flush the
//!   utterance, `{"type":"CloseStream"}` at the end (the server answers with `Metadata` and
//!   closes);
//! - receive `Results` (`is_final`, `speech_final`, `from_finalize`,
//!   `channel.alternatives[0].transcript`), `UtteranceEnd`, `SpeechStarted`, `Metadata`.
//!
//! Mapping: interim `Results` become [`SttEvent::Interim`] (the utterance's final segments so
//! far plus the current hypothesis); `is_final` segments are accumulated, and one
//! [`SttEvent::Final`] is emitted per [`SttInput::Finalize`] — when Deepgram answers with
//! `from_finalize: true`, or after [`DeepgramConfig::finalize_timeout`], because Deepgram only
//! sends a `from_finalize` result when audio was still buffered (its docs say so). The
//! finalize timeout is the one guess here: the docs give no bound on the answer's delay.
//!
//! The protocol is [`DeepgramCodec`], a sans-IO state machine (session inputs, frames and
//! `now` in; frames, events, usage and its next deadline out) run by the shared driver in
//! [`crate::ws`]. Its deadlines: the next KeepAlive (`keepalive_interval` after the last frame
//! sent), the finalize answer (`finalize_timeout` after a Finalize) and the end of the close
//! handshake ([`CLOSE_WAIT`] after CloseStream).
//!
//! The `deepgram` crate (0.14) is not used for the live connection: it runs its own socket
//! task with 256-message queues, so it cannot sit under the shared driver; its KeepAlive
//! timer is a fixed 3 s; and a close frame ends its `receive()` without the code and reason
//! (`NET-0001`) this adapter reports. `probes/deepgram-crate` measures all three against the
//! testkit fake; ARCHITECTURE.md has the figures.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::usage::{Meter, UsageKind};
use crate::ws::{self, WsCodec, WsFrame, WsIn, WsOutput, WsRequest, enc, ws_base};
use crate::{ProviderError, SpeechToText, SttEvent, SttInput, SttParams, SttStream};

/// Settings of the Deepgram adapter.
#[derive(Debug, Clone)]
pub struct DeepgramConfig {
    pub api_key: String,
    /// `wss://api.deepgram.com` by default; `ws://`, `http://` and `https://` are accepted.
    pub base_url: String,
    pub model: String,
    /// Used when the session does not name a language.
    pub language: String,
    /// Deepgram's own end-of-speech silence (`endpointing`, ms).
    pub endpointing_ms: u32,
    /// Gap after the last word for `UtteranceEnd` (`utterance_end_ms`, Deepgram's minimum is
    /// 1000).
    pub utterance_end_ms: u32,
    pub smart_format: bool,
    /// Send KeepAlive after this long without audio. Deepgram recommends every 3-5 s.
    pub keepalive_interval: Duration,
    /// Longest wait for the `from_finalize` answer before the accumulated text is final.
    pub finalize_timeout: Duration,
    pub connect_timeout: Duration,
    /// The longest one frame may wait to be written: past it the peer has stopped reading
    /// and the stream fails.
    pub send_timeout: Duration,
}

impl DeepgramConfig {
    pub fn new(api_key: impl Into<String>) -> DeepgramConfig {
        DeepgramConfig {
            api_key: api_key.into(),
            base_url: "wss://api.deepgram.com".into(),
            model: "nova-3".into(),
            language: "en".into(),
            endpointing_ms: 300,
            utterance_end_ms: 1000,
            smart_format: true,
            keepalive_interval: Duration::from_secs(4),
            // The user is waiting for the reply: a from_finalize answer normally comes within
            // a few hundred ms; past this, what was final already is the transcript.
            finalize_timeout: Duration::from_millis(1500),
            connect_timeout: Duration::from_secs(5),
            send_timeout: crate::ws::SEND_TIMEOUT,
        }
    }

    /// The listen URL for one stream.
    pub fn listen_url(&self, params: &SttParams) -> String {
        let language = params.language.as_deref().unwrap_or(&self.language);
        format!(
            "{}/v1/listen?model={}&language={}&encoding=linear16&sample_rate={}&channels=1\
             &interim_results=true&endpointing={}&utterance_end_ms={}&vad_events=true&smart_format={}",
            ws_base(&self.base_url),
            enc(&self.model),
            enc(language),
            params.sample_rate,
            self.endpointing_ms,
            self.utterance_end_ms,
            self.smart_format,
        )
    }
}

/// Deepgram live recognizer.
#[derive(Debug, Clone)]
pub struct DeepgramStt {
    config: DeepgramConfig,
    meter: Meter,
}

impl DeepgramStt {
    pub fn new(config: DeepgramConfig, meter: Meter) -> DeepgramStt {
        DeepgramStt { config, meter }
    }
}

impl SpeechToText for DeepgramStt {
    fn name(&self) -> &str {
        "deepgram"
    }

    fn open(&self, params: SttParams) -> SttStream {
        let (stream, task) = SttStream::channel();
        let request = WsRequest {
            vendor: "Deepgram",
            url: self.config.listen_url(&params),
            headers: vec![("Authorization", format!("Token {}", self.config.api_key))],
            connect_timeout: self.config.connect_timeout,
            send_timeout: self.config.send_timeout,
        };
        let codec = DeepgramCodec::new(&self.config, params.sample_rate);
        let meter = self.meter.clone();
        let model = self.config.model.clone();
        let session = params.session_id;
        tokio::spawn(ws::run(
            codec,
            request,
            task.input,
            task.events,
            task.cancel,
            move |kind, amount| meter.record(&session, "deepgram", &model, kind, amount),
        ));
        stream
    }
}

#[derive(Deserialize)]
struct Incoming {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    is_final: bool,
    #[serde(default)]
    from_finalize: bool,
    channel: Option<serde_json::Value>,
    /// Error messages carry a description.
    description: Option<String>,
    message: Option<String>,
}

impl Incoming {
    fn transcript(&self) -> String {
        self.channel
            .as_ref()
            .and_then(|c| c.pointer("/alternatives/0/transcript"))
            .and_then(|t| t.as_str())
            .unwrap_or("")
            .trim()
            .to_owned()
    }
}

/// How long the close handshake may take after `CloseStream` (Deepgram flushes and sends
/// `Metadata` first). The task is detached by then, so the wait delays nobody.
pub const CLOSE_WAIT: Duration = Duration::from_secs(2);

const KEEP_ALIVE: &str = r#"{"type":"KeepAlive"}"#;
const FINALIZE: &str = r#"{"type":"Finalize"}"#;
const CLOSE_STREAM: &str = r#"{"type":"CloseStream"}"#;

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Streaming,
    /// CloseStream sent; waiting for the close until this instant.
    Closing(Instant),
    Done,
}

/// The Deepgram live protocol as a sans-IO state machine; see the module docs.
#[derive(Debug)]
pub struct DeepgramCodec {
    keepalive_interval: Duration,
    finalize_timeout: Duration,
    /// Samples per second of the audio sent, for metering.
    rate: f64,
    state: State,
    /// When the last frame was sent (`None` before the socket opened).
    last_sent: Option<Instant>,
    /// Samples sent since usage was last metered.
    unmetered: u64,
    /// Final segments of the current utterance.
    finals: Vec<String>,
    /// A Finalize awaits its answer until this instant.
    finalize_at: Option<Instant>,
    out: VecDeque<WsOutput<SttEvent>>,
}

impl DeepgramCodec {
    pub fn new(config: &DeepgramConfig, sample_rate: u32) -> DeepgramCodec {
        DeepgramCodec {
            keepalive_interval: config.keepalive_interval,
            finalize_timeout: config.finalize_timeout,
            rate: f64::from(sample_rate.max(1)),
            state: State::Streaming,
            last_sent: None,
            unmetered: 0,
            finals: Vec::new(),
            finalize_at: None,
            out: VecDeque::new(),
        }
    }

    fn send_text(&mut self, now: Instant, text: &str) {
        self.out
            .push_back(WsOutput::Send(WsFrame::Text(text.into())));
        self.last_sent = Some(now);
    }

    fn meter(&mut self) {
        let seconds = self.unmetered as f64 / self.rate;
        self.unmetered = 0;
        if seconds > 0.0 {
            self.out
                .push_back(WsOutput::Usage(UsageKind::SttSeconds, seconds));
        }
    }

    fn emit_final(&mut self) {
        self.finalize_at = None;
        let text = std::mem::take(&mut self.finals).join(" ");
        self.out
            .push_back(WsOutput::Event(SttEvent::Final { text }));
    }

    fn fail(&mut self, error: ProviderError) {
        self.state = State::Done;
        self.out.clear();
        self.out.push_back(WsOutput::Event(SttEvent::Error(error)));
        self.out.push_back(WsOutput::Finished);
    }

    fn finish(&mut self) {
        self.state = State::Done;
        self.out.push_back(WsOutput::Finished);
    }

    fn handle_text(&mut self, text: &str) {
        let m: Incoming = match serde_json::from_str(text) {
            Ok(m) => m,
            Err(e) => {
                return self.fail(ProviderError::Protocol(format!(
                    "Deepgram message: {e}: {text}"
                )));
            }
        };
        let event = match m.kind.as_str() {
            "Results" => {
                let transcript = m.transcript();
                if m.is_final {
                    if !transcript.is_empty() {
                        self.finals.push(transcript);
                    }
                    // Only the answer to our Finalize ends the utterance; Deepgram's own
                    // is_final segments are joined into it.
                    if m.from_finalize && self.finalize_at.is_some() {
                        self.emit_final();
                    }
                    None
                } else if transcript.is_empty() {
                    None
                } else {
                    let mut text = self.finals.join(" ");
                    if !text.is_empty() {
                        text.push(' ');
                    }
                    text.push_str(&transcript);
                    Some(SttEvent::Interim { text })
                }
            }
            "SpeechStarted" => Some(SttEvent::SpeechStarted),
            "UtteranceEnd" => Some(SttEvent::UtteranceEnd),
            "Metadata" => {
                tracing::debug!(metadata = %text, "Deepgram metadata");
                None
            }
            "Error" => {
                let why = m.description.or(m.message).unwrap_or(text.to_owned());
                return self.fail(ProviderError::Protocol(format!("Deepgram error: {why}")));
            }
            other => {
                tracing::debug!(kind = other, "unknown Deepgram message ignored");
                None
            }
        };
        if let Some(event) = event {
            self.out.push_back(WsOutput::Event(event));
        }
    }
}

impl WsCodec for DeepgramCodec {
    type Input = SttInput;
    type Event = SttEvent;

    fn handle_connected(&mut self, now: Instant) {
        self.last_sent = Some(now);
    }

    fn handle_input(&mut self, now: Instant, input: SttInput) {
        if self.state != State::Streaming {
            return;
        }
        match input {
            SttInput::Audio(samples) => {
                if samples.is_empty() {
                    return;
                }
                let mut bytes = Vec::with_capacity(samples.len() * 2);
                for s in &samples {
                    bytes.extend_from_slice(&s.to_le_bytes());
                }
                self.unmetered += samples.len() as u64;
                self.out.push_back(WsOutput::Send(WsFrame::Binary(bytes)));
                self.last_sent = Some(now);
            }
            SttInput::Finalize => {
                self.meter();
                self.send_text(now, FINALIZE);
                self.finalize_at = Some(now + self.finalize_timeout);
            }
        }
    }

    fn handle_input_closed(&mut self, now: Instant) {
        if self.state != State::Streaming {
            return;
        }
        // Flush, say goodbye, and wait briefly for Deepgram's Metadata and close.
        self.meter();
        self.send_text(now, CLOSE_STREAM);
        self.state = State::Closing(now + CLOSE_WAIT);
    }

    fn handle_frame(&mut self, _now: Instant, frame: WsIn) {
        match self.state {
            State::Done => {}
            State::Closing(_) => match frame {
                // Nobody listens any more: the rest is ignored until the socket closes.
                WsIn::Close(_) | WsIn::Error(_) | WsIn::Ended => self.finish(),
                WsIn::Text(_) | WsIn::Binary(_) => {}
            },
            State::Streaming => match frame {
                WsIn::Text(text) => self.handle_text(&text),
                WsIn::Binary(_) => {}
                end => {
                    if let Some(e) = end.unexpected_end("Deepgram") {
                        self.fail(e);
                    }
                }
            },
        }
    }

    fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Streaming => {
                // Past this, what was final already is the transcript: Deepgram only answers
                // a Finalize when audio was still buffered.
                if self.finalize_at.is_some_and(|at| now >= at) {
                    self.emit_final();
                }
                if self
                    .last_sent
                    .is_some_and(|at| now >= at + self.keepalive_interval)
                {
                    self.send_text(now, KEEP_ALIVE);
                }
            }
            State::Closing(until) if now >= until => self.finish(),
            State::Closing(_) | State::Done => {}
        }
    }

    fn handle_failure(&mut self, error: ProviderError) {
        self.fail(error);
    }

    fn accepts_input(&self) -> bool {
        self.state == State::Streaming
    }

    fn poll_output(&mut self) -> Option<WsOutput<SttEvent>> {
        self.out.pop_front()
    }

    fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Streaming => {
                let keepalive = self.last_sent.map(|at| at + self.keepalive_interval);
                match (keepalive, self.finalize_at) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
            State::Closing(until) => Some(until),
            State::Done => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::expect;
    use std::fmt::Write;

    /// Messages as Deepgram sends them (and duplex-testkit's fake, byte for byte).
    const INTERIM_WHAT: &str = r#"{"channel":{"alternatives":[{"confidence":0.98,"transcript":"what","words":[]}]},"channel_index":[0,1],"duration":0.3,"from_finalize":false,"is_final":false,"metadata":{"model_info":{"arch":"nova-3","name":"general-nova-3","version":"fake"},"model_uuid":"00000000-fake-model","request_id":"00000000-fake-4000-8000-000000000000"},"speech_final":false,"start":0.0,"type":"Results"}"#;
    const FINAL_HALF: &str = r#"{"channel":{"alternatives":[{"confidence":0.98,"transcript":"what is the","words":[]}]},"channel_index":[0,1],"duration":0.5,"from_finalize":false,"is_final":true,"metadata":{"model_info":{"arch":"nova-3","name":"general-nova-3","version":"fake"},"model_uuid":"00000000-fake-model","request_id":"00000000-fake-4000-8000-000000000000"},"speech_final":false,"start":0.0,"type":"Results"}"#;
    const INTERIM_WEATHER: &str = r#"{"channel":{"alternatives":[{"confidence":0.98,"transcript":"weather","words":[]}]},"channel_index":[0,1],"duration":0.6,"from_finalize":false,"is_final":false,"metadata":{"model_info":{"arch":"nova-3","name":"general-nova-3","version":"fake"},"model_uuid":"00000000-fake-model","request_id":"00000000-fake-4000-8000-000000000000"},"speech_final":false,"start":0.0,"type":"Results"}"#;
    const FINAL_FROM_FINALIZE: &str = r#"{"channel":{"alternatives":[{"confidence":0.98,"transcript":"weather like","words":[]}]},"channel_index":[0,1],"duration":0.6,"from_finalize":true,"is_final":true,"metadata":{"model_info":{"arch":"nova-3","name":"general-nova-3","version":"fake"},"model_uuid":"00000000-fake-model","request_id":"00000000-fake-4000-8000-000000000000"},"speech_final":true,"start":0.0,"type":"Results"}"#;
    const SPEECH_STARTED: &str = r#"{"channel":[0],"timestamp":0.02,"type":"SpeechStarted"}"#;
    const UTTERANCE_END: &str = r#"{"channel":[0,1],"last_word_end":0.6,"type":"UtteranceEnd"}"#;
    const METADATA: &str = r#"{"channels":1,"created":"2025-06-01T00:00:00.000Z","duration":0.6,"request_id":"00000000-fake-4000-8000-000000000000","sha256":"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","transaction_key":"deprecated","type":"Metadata"}"#;
    const ERROR: &str = r#"{"type":"Error","variant":"SchemaError","description":"request schema is invalid","message":"invalid request"}"#;
    const NET_0001: &str =
        "Deepgram did not receive audio data or a text message within the timeout window. NET-0001";

    enum Step {
        Connected,
        Audio(usize),
        Finalize,
        InputClosed,
        Recv(&'static str),
        Close(u16, &'static str),
        Ended,
        Timeout,
    }

    /// Runs a recorded sequence through a codec (KeepAlive every 4 s, finalize answer within
    /// 1.5 s, 16 kHz) and prints every output and the next deadline, in ms from the start.
    fn timeline(script: &[(u64, Step)]) -> String {
        let t0 = Instant::now();
        let config = DeepgramConfig::new("k");
        let mut codec = DeepgramCodec::new(&config, 16_000);
        let mut out = String::new();
        for (at, step) in script {
            let now = t0 + Duration::from_millis(*at);
            let what = match step {
                Step::Connected => {
                    codec.handle_connected(now);
                    "connected".to_owned()
                }
                Step::Audio(n) => {
                    codec.handle_input(now, SttInput::Audio(vec![1000; *n]));
                    format!("audio {n}")
                }
                Step::Finalize => {
                    codec.handle_input(now, SttInput::Finalize);
                    "finalize".to_owned()
                }
                Step::InputClosed => {
                    codec.handle_input_closed(now);
                    "input closed".to_owned()
                }
                Step::Recv(text) => {
                    codec.handle_frame(now, WsIn::Text((*text).to_owned()));
                    let kind: serde_json::Value = serde_json::from_str(text).unwrap();
                    format!("recv {}", kind["type"].as_str().unwrap_or("?"))
                }
                Step::Close(code, reason) => {
                    codec.handle_frame(now, WsIn::Close(Some((*code, (*reason).to_owned()))));
                    format!("recv close {code}")
                }
                Step::Ended => {
                    codec.handle_frame(now, WsIn::Ended);
                    "socket ended".to_owned()
                }
                Step::Timeout => {
                    codec.handle_timeout(now);
                    "timeout".to_owned()
                }
            };
            writeln!(out, "t={at:<5} {what}").unwrap();
            while let Some(o) = codec.poll_output() {
                let o = match o {
                    WsOutput::Send(WsFrame::Binary(b)) => format!("send {} bytes", b.len()),
                    WsOutput::Send(f) => format!("send {f:?}"),
                    other => format!("{other:?}"),
                };
                writeln!(out, "        -> {o}").unwrap();
            }
            let next = codec
                .poll_timeout()
                .map(|d| format!("t={}", (d - t0).as_millis()))
                .unwrap_or("none".into());
            writeln!(out, "        next deadline {next}").unwrap();
        }
        out
    }

    #[test]
    fn an_utterance_gives_interims_and_one_final_per_finalize() {
        let got = timeline(&[
            (0, Step::Connected),
            (20, Step::Audio(320)),
            (30, Step::Recv(SPEECH_STARTED)),
            (300, Step::Recv(INTERIM_WHAT)),
            (500, Step::Recv(FINAL_HALF)),
            (600, Step::Recv(INTERIM_WEATHER)),
            (620, Step::Audio(9280)),
            (640, Step::Finalize),
            (700, Step::Recv(FINAL_FROM_FINALIZE)),
            (710, Step::Recv(UTTERANCE_END)),
        ]);
        expect![[r#"
            t=0     connected
                    next deadline t=4000
            t=20    audio 320
                    -> send 640 bytes
                    next deadline t=4020
            t=30    recv SpeechStarted
                    -> Event(SpeechStarted)
                    next deadline t=4020
            t=300   recv Results
                    -> Event(Interim { text: "what" })
                    next deadline t=4020
            t=500   recv Results
                    next deadline t=4020
            t=600   recv Results
                    -> Event(Interim { text: "what is the weather" })
                    next deadline t=4020
            t=620   audio 9280
                    -> send 18560 bytes
                    next deadline t=4620
            t=640   finalize
                    -> Usage(SttSeconds, 0.6)
                    -> send Text("{\"type\":\"Finalize\"}")
                    next deadline t=2140
            t=700   recv Results
                    -> Event(Final { text: "what is the weather like" })
                    next deadline t=4640
            t=710   recv UtteranceEnd
                    -> Event(UtteranceEnd)
                    next deadline t=4640
        "#]]
        .assert_eq(&got);
    }

    #[test]
    fn keepalive_while_idle_and_a_late_finalize_answer_times_out() {
        let got = timeline(&[
            (0, Step::Connected),
            (4000, Step::Timeout),
            (5000, Step::Audio(320)),
            (6000, Step::Finalize),
            // Nothing was buffered: Deepgram does not answer, the deadline gives the final.
            (7500, Step::Timeout),
            (10000, Step::Timeout),
            // A from_finalize answer after the deadline is not a second final.
            (10100, Step::Recv(FINAL_FROM_FINALIZE)),
        ]);
        expect![[r#"
            t=0     connected
                    next deadline t=4000
            t=4000  timeout
                    -> send Text("{\"type\":\"KeepAlive\"}")
                    next deadline t=8000
            t=5000  audio 320
                    -> send 640 bytes
                    next deadline t=9000
            t=6000  finalize
                    -> Usage(SttSeconds, 0.02)
                    -> send Text("{\"type\":\"Finalize\"}")
                    next deadline t=7500
            t=7500  timeout
                    -> Event(Final { text: "" })
                    next deadline t=10000
            t=10000 timeout
                    -> send Text("{\"type\":\"KeepAlive\"}")
                    next deadline t=14000
            t=10100 recv Results
                    next deadline t=14000
        "#]]
        .assert_eq(&got);
    }

    #[test]
    fn dropping_the_stream_sends_close_stream_and_waits_for_the_close() {
        let got = timeline(&[
            (0, Step::Connected),
            (100, Step::Audio(1600)),
            (200, Step::InputClosed),
            (250, Step::Recv(METADATA)),
            (260, Step::Close(1000, "")),
        ]);
        expect![[r#"
            t=0     connected
                    next deadline t=4000
            t=100   audio 1600
                    -> send 3200 bytes
                    next deadline t=4100
            t=200   input closed
                    -> Usage(SttSeconds, 0.1)
                    -> send Text("{\"type\":\"CloseStream\"}")
                    next deadline t=2200
            t=250   recv Metadata
                    next deadline t=2200
            t=260   recv close 1000
                    -> Finished
                    next deadline none
        "#]]
        .assert_eq(&got);
        // Without an answer the close handshake ends at its deadline.
        let got = timeline(&[
            (0, Step::Connected),
            (200, Step::InputClosed),
            (1000, Step::Audio(320)),
            (2200, Step::Timeout),
        ]);
        expect![[r#"
            t=0     connected
                    next deadline t=4000
            t=200   input closed
                    -> send Text("{\"type\":\"CloseStream\"}")
                    next deadline t=2200
            t=1000  audio 320
                    next deadline t=2200
            t=2200  timeout
                    -> Finished
                    next deadline none
        "#]]
        .assert_eq(&got);
    }

    #[test]
    fn vendor_errors_and_closes_end_the_stream_with_an_error_event() {
        let got = timeline(&[(0, Step::Connected), (10000, Step::Close(1011, NET_0001))]);
        expect![[r#"
            t=0     connected
                    next deadline t=4000
            t=10000 recv close 1011
                    -> Event(Error(Closed("Deepgram closed the stream: 1011 Deepgram did not receive audio data or a text message within the timeout window. NET-0001")))
                    -> Finished
                    next deadline none
        "#]]
        .assert_eq(&got);
        let got = timeline(&[(0, Step::Connected), (10, Step::Recv(ERROR))]);
        expect![[r#"
            t=0     connected
                    next deadline t=4000
            t=10    recv Error
                    -> Event(Error(Protocol("Deepgram error: request schema is invalid")))
                    -> Finished
                    next deadline none
        "#]]
        .assert_eq(&got);
        let got = timeline(&[(0, Step::Connected), (10, Step::Ended)]);
        expect![[r#"
            t=0     connected
                    next deadline t=4000
            t=10    socket ended
                    -> Event(Error(Closed("Deepgram closed the connection")))
                    -> Finished
                    next deadline none
        "#]]
        .assert_eq(&got);
        let mut codec = DeepgramCodec::new(&DeepgramConfig::new("k"), 16_000);
        codec.handle_frame(Instant::now(), WsIn::Text("not json".into()));
        assert!(matches!(
            codec.poll_output(),
            Some(WsOutput::Event(SttEvent::Error(ProviderError::Protocol(m)))) if m.contains("not json")
        ));
        assert_eq!(codec.poll_output(), Some(WsOutput::Finished));
        assert!(!codec.accepts_input());
    }

    #[test]
    fn url_carries_the_documented_query_parameters() {
        let mut c = DeepgramConfig::new("k");
        c.base_url = "http://127.0.0.1:9/".into();
        let url = c.listen_url(&SttParams {
            sample_rate: 16000,
            language: Some("pt-BR".into()),
            session_id: "s".into(),
        });
        assert_eq!(
            url,
            "ws://127.0.0.1:9/v1/listen?model=nova-3&language=pt-BR&encoding=linear16&sample_rate=16000\
             &channels=1&interim_results=true&endpointing=300&utterance_end_ms=1000&vad_events=true&smart_format=true"
        );
        assert_eq!(
            ws_base("https://api.deepgram.com"),
            "wss://api.deepgram.com"
        );
        assert_eq!(enc("a b/é"), "a%20b%2F%C3%A9");
    }
}
