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

use std::collections::VecDeque;
use std::time::Duration;

use base64::Engine;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

use crate::deepgram::{enc, ws_base, ws_connect_error};
use crate::usage::{Meter, UsageKind};
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
        let config = self.config.clone();
        let meter = self.meter.clone();
        tokio::spawn(async move {
            let cancel = task.cancel.clone();
            let events = task.events.clone();
            tokio::select! {
                _ = cancel.cancelled() => {}
                r = run(config, meter, params, task) => if let Err(e) = r {
                    let _ = events.send(TtsEvent::Error(e)).await;
                }
            }
        });
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

async fn run(
    config: ElevenLabsConfig,
    meter: Meter,
    params: TtsParams,
    mut task: crate::TtsTask,
) -> Result<(), ProviderError> {
    let voice = params.voice.clone().unwrap_or(config.voice_id.clone());
    let url = config.stream_url(&voice);
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| ProviderError::InvalidRequest(format!("bad ElevenLabs URL {url}: {e}")))?;
    let key = config
        .api_key
        .parse()
        .map_err(|_| ProviderError::InvalidRequest("API key is not a valid header".into()))?;
    request.headers_mut().insert("xi-api-key", key);
    let (ws, _) = timeout(
        config.connect_timeout,
        tokio_tungstenite::connect_async(request),
    )
    .await
    .map_err(|_| ProviderError::Timeout("ElevenLabs connect".into()))?
    .map_err(ws_connect_error)?;
    let (mut sink, mut source) = ws.split();
    let init = serde_json::json!({
        "text": " ",
        "voice_settings": {
            "stability": config.stability,
            "similarity_boost": config.similarity_boost,
        },
        "xi_api_key": config.api_key,
    });
    let send_err = |e: tokio_tungstenite::tungstenite::Error| {
        ProviderError::Closed(format!("ElevenLabs socket: {e}"))
    };
    sink.send(Message::Text(init.to_string().into()))
        .await
        .map_err(send_err)?;
    // Chunks sent and not yet fully voiced: (index, non-space characters left).
    let mut open_chunks: VecDeque<(u32, usize)> = VecDeque::new();
    let mut last_index = 0u32;
    let mut input_done = false;
    let b64 = base64::engine::general_purpose::STANDARD;
    loop {
        tokio::select! {
            input = task.input.recv(), if !input_done => match input {
                Some(TtsInput::Text { index, text }) => {
                    let text = text.trim();
                    if text.is_empty() {
                        if task.events.send(TtsEvent::ChunkDone { index }).await.is_err() { return Ok(()); }
                        continue;
                    }
                    meter.record(&params.session_id, "elevenlabs", &config.model_id, UsageKind::TtsCharacters, text.chars().count() as f64);
                    let msg = serde_json::json!({ "text": format!("{text} "), "flush": true });
                    sink.send(Message::Text(msg.to_string().into())).await.map_err(send_err)?;
                    open_chunks.push_back((index, non_space(text)));
                    last_index = index;
                }
                Some(TtsInput::End) => {
                    input_done = true;
                    sink.send(Message::Text(r#"{"text":""}"#.into())).await.map_err(send_err)?;
                }
                None => return Ok(()),
            },
            msg = source.next() => {
                let msg = match msg {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => return Err(ProviderError::Closed(format!("ElevenLabs socket: {e}"))),
                    None => return Err(ProviderError::Closed("ElevenLabs closed the connection".into())),
                };
                let text = match msg {
                    Message::Text(t) => t,
                    Message::Close(frame) => {
                        let why = frame.map(|f| format!("{} {}", u16::from(f.code), f.reason)).unwrap_or_default();
                        return Err(ProviderError::Closed(format!("ElevenLabs closed the stream: {why}")));
                    }
                    _ => continue,
                };
                let m: Incoming = serde_json::from_str(&text)
                    .map_err(|e| ProviderError::Protocol(format!("ElevenLabs message: {e}")))?;
                if let Some(audio) = m.audio.as_deref().filter(|a| !a.is_empty()) {
                    let bytes = b64.decode(audio)
                        .map_err(|e| ProviderError::Protocol(format!("ElevenLabs audio is not base64: {e}")))?;
                    let samples = crate::openai::pcm16_samples(&mut None, &bytes);
                    let index = open_chunks.front().map_or(last_index, |c| c.0);
                    let ev = TtsEvent::Audio { index, samples, sample_rate: config.sample_rate };
                    if task.events.send(ev).await.is_err() { return Ok(()); }
                    if let Some(al) = &m.alignment {
                        let mut voiced: usize = al.chars.iter().map(|c| non_space(c)).sum();
                        while voiced > 0 && let Some(front) = open_chunks.front_mut() {
                            let used = voiced.min(front.1);
                            front.1 -= used;
                            voiced -= used;
                            if front.1 == 0 {
                                let index = front.0;
                                open_chunks.pop_front();
                                if task.events.send(TtsEvent::ChunkDone { index }).await.is_err() { return Ok(()); }
                            } else {
                                break;
                            }
                        }
                    }
                } else if m.is_final != Some(true) && (m.message.is_some() || m.error.is_some()) {
                    let why = m.message.or(m.error).unwrap_or_default();
                    return Err(ProviderError::Protocol(format!("ElevenLabs error: {why}")));
                }
                if m.is_final == Some(true) {
                    for (index, _) in open_chunks.drain(..) {
                        if task.events.send(TtsEvent::ChunkDone { index }).await.is_err() { return Ok(()); }
                    }
                    let _ = task.events.send(TtsEvent::Finished).await;
                    let _ = sink.close().await;
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
