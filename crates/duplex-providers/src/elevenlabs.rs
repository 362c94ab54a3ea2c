//! ElevenLabs text-to-speech over the `stream-input` WebSocket.
//!
//! Wire protocol, per ElevenLabs' API reference ("WebSocket", `/v1/text-to-speech/{voice_id}/
//! stream-input`):
//! - connect to `wss://api.elevenlabs.io/v1/text-to-speech/{voice_id}/stream-input?
//!   model_id=…&output_format=pcm_16000` with the `xi-api-key` header;
//! - first message `{"text":" ","voice_settings":{…},"xi_api_key":"…"}` (the key is also
//!   accepted here; sending both is allowed and survives proxies that drop headers);
//! - each text chunk as `{"text":"chunk ","flush":true}` — the docs ask for text ending in a
//!   space, and `flush` forces generation of what was sent so far (our chunks are whole
//!   sentences, so there is nothing to gain from waiting for more text);
//! - `{"text":""}` ends the input; the server then finishes and sends `{"isFinal":true}`;
//! - audio arrives as `{"audio":"<base64 PCM>","isFinal":null,"alignment":{"chars":[…],…},
//!   "normalizedAlignment":{…}}`.
//!
//! Chunk attribution is inferred: the protocol does not say which text an audio message
//! belongs to. Audio goes to the oldest unfinished chunk, and the non-space characters of
//! each message's `alignment.chars` are counted down against that chunk's text; when they run
//! out the chunk is done. Without alignment data every chunk completes at `isFinal`.
//!
//! The protocol is [`ElevenLabsCodec`], a sans-IO state machine run by the shared driver in
//! [`crate::ws`]. It needs no deadline: ElevenLabs keeps a stream-input socket open for 20 s
//! without text, longer than a reply takes to arrive sentence by sentence.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use base64::Engine;
use serde::Deserialize;

use crate::usage::{Meter, UsageKind};
use crate::ws::{self, WsCodec, WsFrame, WsIn, WsOutput, WsRequest, enc, ws_base};
use crate::{ProviderError, TextToSpeech, TtsEvent, TtsInput, TtsParams, TtsStream};

/// Settings of the ElevenLabs adapter.
#[derive(Debug, Clone)]
pub struct ElevenLabsConfig {
    pub api_key: String,
    /// Used when the session names no voice.
    pub voice_id: String,
    /// `wss://api.elevenlabs.io` by default; `ws://`, `http://`, `https://` accepted.
    pub base_url: String,
    pub model_id: String,
    /// PCM rate requested with `output_format=pcm_<rate>` (16000, 22050, 24000, 44100).
    pub sample_rate: u32,
    pub stability: f32,
    pub similarity_boost: f32,
    pub connect_timeout: Duration,
    /// The longest one frame may wait to be written: past it the peer has stopped reading
    /// and the stream fails.
    pub send_timeout: Duration,
    /// The longest the server may stay silent while audio is owed (text sent and not yet
    /// voiced, or the end not yet confirmed): first audio of a sentence, or the next message.
    pub response_timeout: Duration,
}

impl ElevenLabsConfig {
    pub fn new(api_key: impl Into<String>, voice_id: impl Into<String>) -> ElevenLabsConfig {
        ElevenLabsConfig {
            api_key: api_key.into(),
            voice_id: voice_id.into(),
            base_url: "wss://api.elevenlabs.io".into(),
            model_id: "eleven_flash_v2_5".into(),
            // The session's internal rate: no resampling for 16 kHz clients.
            sample_rate: 16_000,
            stability: 0.5,
            similarity_boost: 0.8,
            connect_timeout: Duration::from_secs(5),
            send_timeout: crate::ws::SEND_TIMEOUT,
            // Flash models answer in ~100 ms; 10 s of silence with audio owed is a hung
            // stream, and the turn should fail rather than wait forever.
            response_timeout: Duration::from_secs(10),
        }
    }

    pub fn stream_url(&self, voice_id: &str) -> String {
        format!(
            "{}/v1/text-to-speech/{}/stream-input?model_id={}&output_format=pcm_{}",
            ws_base(&self.base_url),
            enc(voice_id),
            enc(&self.model_id),
            self.sample_rate
        )
    }
}

/// ElevenLabs stream-input synthesizer.
#[derive(Debug, Clone)]
pub struct ElevenLabsTts {
    config: ElevenLabsConfig,
    meter: Meter,
}

impl ElevenLabsTts {
    pub fn new(config: ElevenLabsConfig, meter: Meter) -> ElevenLabsTts {
        crate::install_crypto_provider();
        ElevenLabsTts { config, meter }
    }
}

impl TextToSpeech for ElevenLabsTts {
    fn name(&self) -> &str {
        "elevenlabs"
    }

    fn open(&self, params: TtsParams) -> TtsStream {
        let (stream, task) = TtsStream::channel();
        let voice = params.voice.clone().unwrap_or(self.config.voice_id.clone());
        let request = WsRequest {
            vendor: "ElevenLabs",
            url: self.config.stream_url(&voice),
            headers: vec![("xi-api-key", self.config.api_key.clone())],
            connect_timeout: self.config.connect_timeout,
            send_timeout: self.config.send_timeout,
        };
        let codec = ElevenLabsCodec::new(&self.config);
        let meter = self.meter.clone();
        let model = self.config.model_id.clone();
        let session = params.session_id;
        tokio::spawn(ws::run(
            codec,
            request,
            task.input,
            task.events,
            task.cancel,
            move |kind, amount| meter.record(&session, "elevenlabs", &model, kind, amount),
        ));
        stream
    }
}

#[derive(Deserialize)]
struct Alignment {
    #[serde(default)]
    chars: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Incoming {
    audio: Option<String>,
    is_final: Option<bool>,
    alignment: Option<Alignment>,
    /// Error messages (e.g. invalid key, quota) carry `message` / `error`.
    message: Option<String>,
    error: Option<String>,
}

fn non_space(s: &str) -> usize {
    s.chars().filter(|c| !c.is_whitespace()).count()
}

/// The ElevenLabs stream-input protocol as a sans-IO state machine; see the module docs.
#[derive(Debug)]
pub struct ElevenLabsCodec {
    /// The first message: a space, voice settings and the key.
    init: String,
    sample_rate: u32,
    /// Chunks sent and not yet fully voiced: (index, non-space characters left).
    open_chunks: VecDeque<(u32, usize)>,
    last_index: u32,
    input_done: bool,
    done: bool,
    response_timeout: Duration,
    /// When the server last sent something, or audio started to be owed (see
    /// [`ElevenLabsCodec::owed`]).
    heard_at: Option<Instant>,
    out: VecDeque<WsOutput<TtsEvent>>,
}

impl ElevenLabsCodec {
    pub fn new(config: &ElevenLabsConfig) -> ElevenLabsCodec {
        let init = serde_json::json!({
            "text": " ",
            "voice_settings": {
                "stability": config.stability,
                "similarity_boost": config.similarity_boost,
            },
            "xi_api_key": config.api_key,
        });
        ElevenLabsCodec {
            init: init.to_string(),
            sample_rate: config.sample_rate,
            open_chunks: VecDeque::new(),
            last_index: 0,
            input_done: false,
            done: false,
            response_timeout: config.response_timeout,
            heard_at: None,
            out: VecDeque::new(),
        }
    }

    /// Audio or the end is owed: text was sent and not voiced, or `End` was sent.
    fn owed(&self) -> bool {
        !self.done && (!self.open_chunks.is_empty() || self.input_done)
    }

    fn event(&mut self, event: TtsEvent) {
        self.out.push_back(WsOutput::Event(event));
    }

    fn fail(&mut self, error: ProviderError) {
        self.done = true;
        self.out.clear();
        self.event(TtsEvent::Error(error));
        self.out.push_back(WsOutput::Finished);
    }

    fn handle_text(&mut self, text: &str) {
        let m: Incoming = match serde_json::from_str(text) {
            Ok(m) => m,
            Err(e) => {
                return self.fail(ProviderError::Protocol(format!("ElevenLabs message: {e}")));
            }
        };
        if let Some(audio) = m.audio.as_deref().filter(|a| !a.is_empty()) {
            let bytes = match base64::engine::general_purpose::STANDARD.decode(audio) {
                Ok(b) => b,
                Err(e) => {
                    return self.fail(ProviderError::Protocol(format!(
                        "ElevenLabs audio is not base64: {e}"
                    )));
                }
            };
            let samples = crate::http::pcm16_samples(&mut None, &bytes);
            let index = self.open_chunks.front().map_or(self.last_index, |c| c.0);
            let sample_rate = self.sample_rate;
            self.event(TtsEvent::Audio {
                index,
                samples,
                sample_rate,
            });
            if let Some(al) = &m.alignment {
                let mut voiced: usize = al.chars.iter().map(|c| non_space(c)).sum();
                while voiced > 0
                    && let Some(front) = self.open_chunks.front_mut()
                {
                    let used = voiced.min(front.1);
                    front.1 -= used;
                    voiced -= used;
                    if front.1 == 0 {
                        let index = front.0;
                        self.open_chunks.pop_front();
                        self.event(TtsEvent::ChunkDone { index });
                    } else {
                        break;
                    }
                }
            }
        } else if m.is_final != Some(true) && (m.message.is_some() || m.error.is_some()) {
            let why = m.message.or(m.error).unwrap_or_default();
            return self.fail(ProviderError::Protocol(format!("ElevenLabs error: {why}")));
        }
        if m.is_final == Some(true) {
            for (index, _) in std::mem::take(&mut self.open_chunks) {
                self.event(TtsEvent::ChunkDone { index });
            }
            self.event(TtsEvent::Finished);
            self.done = true;
            self.out.push_back(WsOutput::Send(WsFrame::Close));
            self.out.push_back(WsOutput::Finished);
        }
    }
}

impl WsCodec for ElevenLabsCodec {
    type Input = TtsInput;
    type Event = TtsEvent;

    fn handle_connected(&mut self, _now: Instant) {
        let init = std::mem::take(&mut self.init);
        self.out.push_back(WsOutput::Send(WsFrame::Text(init)));
    }

    fn handle_input(&mut self, now: Instant, input: TtsInput) {
        if self.done || self.input_done {
            return;
        }
        if !self.owed() {
            // The silence clock starts when audio starts to be owed.
            self.heard_at = Some(now);
        }
        match input {
            TtsInput::Text { index, text } => {
                let text = text.trim();
                if text.is_empty() {
                    self.event(TtsEvent::ChunkDone { index });
                    return;
                }
                let chars = text.chars().count() as f64;
                self.out
                    .push_back(WsOutput::Usage(UsageKind::TtsCharacters, chars));
                // The docs ask for text ending in a space; flush, because our chunks are
                // whole sentences and waiting for more text gains nothing.
                let msg = serde_json::json!({ "text": format!("{text} "), "flush": true });
                self.out
                    .push_back(WsOutput::Send(WsFrame::Text(msg.to_string())));
                self.open_chunks.push_back((index, non_space(text)));
                self.last_index = index;
            }
            TtsInput::End => {
                self.input_done = true;
                self.out
                    .push_back(WsOutput::Send(WsFrame::Text(r#"{"text":""}"#.into())));
            }
        }
    }

    fn handle_input_closed(&mut self, _now: Instant) {
        // A cancelled turn: the audio is unwanted, so the socket is simply dropped.
        if !self.done {
            self.done = true;
            self.out.clear();
            self.out.push_back(WsOutput::Finished);
        }
    }

    fn handle_frame(&mut self, now: Instant, frame: WsIn) {
        if self.done {
            return;
        }
        self.heard_at = Some(now);
        match frame {
            WsIn::Text(text) => self.handle_text(&text),
            WsIn::Binary(_) => {}
            end => {
                if let Some(e) = end.unexpected_end("ElevenLabs") {
                    self.fail(e);
                }
            }
        }
    }

    fn handle_timeout(&mut self, now: Instant) {
        if self.poll_timeout().is_some_and(|at| at <= now) {
            let secs = self.response_timeout.as_secs_f64();
            self.fail(ProviderError::Timeout(format!(
                "ElevenLabs sent nothing for {secs} s while audio was owed"
            )));
        }
    }

    fn handle_failure(&mut self, error: ProviderError) {
        self.fail(error);
    }

    fn accepts_input(&self) -> bool {
        !self.done && !self.input_done
    }

    fn poll_output(&mut self) -> Option<WsOutput<TtsEvent>> {
        self.out.pop_front()
    }

    fn poll_timeout(&self) -> Option<Instant> {
        if !self.owed() {
            return None;
        }
        self.heard_at.map(|at| at + self.response_timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::expect;
    use std::fmt::Write;

    /// An audio message as ElevenLabs sends it (and the fake, byte for byte): `samples` as
    /// base64 PCM16 LE and the characters it voices.
    fn audio_message(samples: &[i16], chars: &str) -> String {
        let pcm: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
        let chars: Vec<String> = chars.chars().map(|c| c.to_string()).collect();
        let alignment = serde_json::json!({
            "chars": chars,
            "charStartTimesMs": (0..chars.len()).map(|i| i * 40).collect::<Vec<_>>(),
            "charDurationsMs": chars.iter().map(|_| 40).collect::<Vec<_>>(),
        });
        serde_json::json!({
            "audio": base64::engine::general_purpose::STANDARD.encode(pcm),
            "isFinal": null,
            "normalizedAlignment": alignment,
            "alignment": alignment,
        })
        .to_string()
    }

    enum Step {
        Connected,
        Text(u32, &'static str),
        End,
        InputClosed,
        Recv(String),
        Close(u16, &'static str),
    }

    fn timeline(script: Vec<Step>) -> String {
        let now = Instant::now();
        let mut config = ElevenLabsConfig::new("xi-key", "voice1");
        config.sample_rate = 16_000;
        let mut codec = ElevenLabsCodec::new(&config);
        let mut out = String::new();
        for step in script {
            let what = match step {
                Step::Connected => {
                    codec.handle_connected(now);
                    "connected".to_owned()
                }
                Step::Text(index, text) => {
                    codec.handle_input(
                        now,
                        TtsInput::Text {
                            index,
                            text: text.into(),
                        },
                    );
                    format!("text {index} {text:?}")
                }
                Step::End => {
                    codec.handle_input(now, TtsInput::End);
                    "end".to_owned()
                }
                Step::InputClosed => {
                    codec.handle_input_closed(now);
                    "input closed".to_owned()
                }
                Step::Recv(m) => {
                    let shown = if m.len() > 60 {
                        format!("{}…", &m[..60])
                    } else {
                        m.clone()
                    };
                    codec.handle_frame(now, WsIn::Text(m));
                    format!("recv {shown}")
                }
                Step::Close(code, reason) => {
                    codec.handle_frame(now, WsIn::Close(Some((code, reason.into()))));
                    format!("recv close {code}")
                }
            };
            writeln!(out, "{what}").unwrap();
            while let Some(o) = codec.poll_output() {
                writeln!(out, "  -> {o:?}").unwrap();
            }
        }
        if !codec.owed() {
            assert_eq!(codec.poll_timeout(), None, "nothing owed, no deadline");
        }
        out
    }

    #[test]
    fn a_silent_server_fails_the_stream_after_the_response_timeout() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut config = ElevenLabsConfig::new("xi-key", "voice1");
        config.response_timeout = Duration::from_millis(500);
        let mut codec = ElevenLabsCodec::new(&config);
        codec.handle_connected(at(0));
        while codec.poll_output().is_some() {}
        assert_eq!(codec.poll_timeout(), None, "nothing owed before text");
        codec.handle_input(
            at(100),
            TtsInput::Text {
                index: 0,
                text: "Hi.".into(),
            },
        );
        assert_eq!(codec.poll_timeout(), Some(at(600)), "first audio due");
        // A message restarts the clock (idle, not total).
        codec.handle_frame(at(400), WsIn::Text(audio_message(&[1], "H")));
        assert_eq!(codec.poll_timeout(), Some(at(900)));
        while codec.poll_output().is_some() {}
        codec.handle_timeout(at(899));
        assert_eq!(codec.poll_output(), None, "not yet");
        codec.handle_timeout(at(900));
        let mut outs = Vec::new();
        while let Some(o) = codec.poll_output() {
            outs.push(format!("{o:?}"));
        }
        expect![[r#"
            [
                "Event(Error(Timeout(\"ElevenLabs sent nothing for 0.5 s while audio was owed\")))",
                "Finished",
            ]
        "#]]
        .assert_debug_eq(&outs);
        assert_eq!(codec.poll_timeout(), None, "finished");
    }

    #[test]
    fn chunks_are_sent_flushed_and_completed_by_alignment() {
        let got = timeline(vec![
            Step::Connected,
            Step::Text(0, "Hi there. "),
            Step::Text(1, "  "),
            Step::Text(2, "Bye."),
            Step::Recv(audio_message(&[1, -2], "Hi ")),
            Step::Recv(audio_message(&[3], "there.")),
            Step::Recv(audio_message(&[4, 5, 6], "By")),
            Step::End,
            Step::Text(3, "too late"),
            Step::Recv(audio_message(&[7], "e.")),
            Step::Recv(r#"{"isFinal":true}"#.into()),
        ]);
        expect![[r#"
            connected
              -> Send(Text("{\"text\":\" \",\"voice_settings\":{\"similarity_boost\":0.800000011920929,\"stability\":0.5},\"xi_api_key\":\"xi-key\"}"))
            text 0 "Hi there. "
              -> Usage(TtsCharacters, 9.0)
              -> Send(Text("{\"flush\":true,\"text\":\"Hi there. \"}"))
            text 1 "  "
              -> Event(ChunkDone { index: 1 })
            text 2 "Bye."
              -> Usage(TtsCharacters, 4.0)
              -> Send(Text("{\"flush\":true,\"text\":\"Bye. \"}"))
            recv {"alignment":{"charDurationsMs":[40,40,40],"charStartTimesMs…
              -> Event(Audio { index: 0, samples: [1, -2], sample_rate: 16000 })
            recv {"alignment":{"charDurationsMs":[40,40,40,40,40,40],"charSta…
              -> Event(Audio { index: 0, samples: [3], sample_rate: 16000 })
              -> Event(ChunkDone { index: 0 })
            recv {"alignment":{"charDurationsMs":[40,40],"charStartTimesMs":[…
              -> Event(Audio { index: 2, samples: [4, 5, 6], sample_rate: 16000 })
            end
              -> Send(Text("{\"text\":\"\"}"))
            text 3 "too late"
            recv {"alignment":{"charDurationsMs":[40,40],"charStartTimesMs":[…
              -> Event(Audio { index: 2, samples: [7], sample_rate: 16000 })
              -> Event(ChunkDone { index: 2 })
            recv {"isFinal":true}
              -> Event(Finished)
              -> Send(Close)
              -> Finished
        "#]]
        .assert_eq(&got);
    }

    #[test]
    fn without_alignment_chunks_complete_at_is_final() {
        let got = timeline(vec![
            Step::Connected,
            Step::Text(0, "One."),
            Step::Text(1, "Two."),
            Step::Recv(r#"{"audio":"AQACAA==","isFinal":null}"#.into()),
            Step::End,
            Step::Recv(r#"{"isFinal":true}"#.into()),
        ]);
        expect![[r#"
            connected
              -> Send(Text("{\"text\":\" \",\"voice_settings\":{\"similarity_boost\":0.800000011920929,\"stability\":0.5},\"xi_api_key\":\"xi-key\"}"))
            text 0 "One."
              -> Usage(TtsCharacters, 4.0)
              -> Send(Text("{\"flush\":true,\"text\":\"One. \"}"))
            text 1 "Two."
              -> Usage(TtsCharacters, 4.0)
              -> Send(Text("{\"flush\":true,\"text\":\"Two. \"}"))
            recv {"audio":"AQACAA==","isFinal":null}
              -> Event(Audio { index: 0, samples: [1, 2], sample_rate: 16000 })
            end
              -> Send(Text("{\"text\":\"\"}"))
            recv {"isFinal":true}
              -> Event(ChunkDone { index: 0 })
              -> Event(ChunkDone { index: 1 })
              -> Event(Finished)
              -> Send(Close)
              -> Finished
        "#]]
        .assert_eq(&got);
    }

    #[test]
    fn errors_closes_and_cancellation_end_the_stream() {
        let got = timeline(vec![
            Step::Connected,
            Step::Text(0, "Hello."),
            Step::Recv(
                r#"{"message":"Invalid API key","error":"invalid_api_key","code":1008}"#.into(),
            ),
            Step::Text(1, "ignored"),
        ]);
        expect![[r#"
            connected
              -> Send(Text("{\"text\":\" \",\"voice_settings\":{\"similarity_boost\":0.800000011920929,\"stability\":0.5},\"xi_api_key\":\"xi-key\"}"))
            text 0 "Hello."
              -> Usage(TtsCharacters, 6.0)
              -> Send(Text("{\"flush\":true,\"text\":\"Hello. \"}"))
            recv {"message":"Invalid API key","error":"invalid_api_key","code…
              -> Event(Error(Protocol("ElevenLabs error: Invalid API key")))
              -> Finished
            text 1 "ignored"
        "#]]
        .assert_eq(&got);
        let got = timeline(vec![Step::Connected, Step::Close(1008, "Invalid API key")]);
        expect![[r#"
            connected
              -> Send(Text("{\"text\":\" \",\"voice_settings\":{\"similarity_boost\":0.800000011920929,\"stability\":0.5},\"xi_api_key\":\"xi-key\"}"))
            recv close 1008
              -> Event(Error(Closed("ElevenLabs closed the stream: 1008 Invalid API key")))
              -> Finished
        "#]]
        .assert_eq(&got);
        let got = timeline(vec![
            Step::Connected,
            Step::Recv(r#"{"audio":"not base64!","isFinal":null}"#.into()),
        ]);
        expect![[r#"
            connected
              -> Send(Text("{\"text\":\" \",\"voice_settings\":{\"similarity_boost\":0.800000011920929,\"stability\":0.5},\"xi_api_key\":\"xi-key\"}"))
            recv {"audio":"not base64!","isFinal":null}
              -> Event(Error(Protocol("ElevenLabs audio is not base64: Invalid symbol 32, offset 3.")))
              -> Finished
        "#]]
        .assert_eq(&got);
        let got = timeline(vec![
            Step::Connected,
            Step::Text(0, "Hello."),
            Step::InputClosed,
        ]);
        expect![[r#"
            connected
              -> Send(Text("{\"text\":\" \",\"voice_settings\":{\"similarity_boost\":0.800000011920929,\"stability\":0.5},\"xi_api_key\":\"xi-key\"}"))
            text 0 "Hello."
              -> Usage(TtsCharacters, 6.0)
              -> Send(Text("{\"flush\":true,\"text\":\"Hello. \"}"))
            input closed
              -> Finished
        "#]]
        .assert_eq(&got);
    }

    #[test]
    fn url_names_voice_model_and_pcm_format() {
        let mut c = ElevenLabsConfig::new("k", "voice1");
        c.base_url = "http://127.0.0.1:1".into();
        assert_eq!(
            c.stream_url("voice1"),
            "ws://127.0.0.1:1/v1/text-to-speech/voice1/stream-input?model_id=eleven_flash_v2_5&output_format=pcm_16000"
        );
    }
}
