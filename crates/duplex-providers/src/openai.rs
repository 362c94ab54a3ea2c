//! OpenAI and OpenAI-compatible providers.
//!
//! - [`OpenAiLlm`]: streaming Chat Completions through `async-openai` against any
//!   OpenAI-compatible base URL (OpenAI, OpenRouter, Groq, vLLM, llama.cpp, Ollama), with
//!   `stream_options.include_usage` so the last chunk carries token usage. Dropping the
//!   stream aborts the task that owns the response, which closes the HTTP stream.
//! - [`OpenAiTts`]: `POST /audio/speech` with `response_format: "pcm"` (raw 24 kHz 16-bit
//!   little-endian mono, per OpenAI's docs), one request per text chunk, the body streamed
//!   chunk by chunk.
//! - [`OpenAiStt`]: `POST /audio/transcriptions` (Whisper-style, multipart with the utterance
//!   as WAV) as a non-streaming fallback: audio is buffered between finalizes and each
//!   utterance is transcribed once, so there are no interim transcripts.
//!
//! The base URL includes the version prefix, like `OPENAI_BASE_URL`
//! (`https://api.openai.com/v1`); paths are appended to it.

use std::collections::VecDeque;
use std::time::Duration;

use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::types::chat::{
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestMessage,
    ChatCompletionRequestSystemMessage, ChatCompletionRequestUserMessage,
    ChatCompletionStreamOptions, CreateChatCompletionRequest,
};
use futures::StreamExt;
use futures::stream::FuturesOrdered;

use crate::router::channel_stream;
use crate::usage::{Meter, UsageKind};
use crate::{
    LanguageModel, LlmEvent, LlmRequest, LlmStream, ProviderError, Role, SpeechToText, SttEvent,
    SttInput, SttParams, SttStream, TextToSpeech, TokenUsage, TtsEvent, TtsInput, TtsParams,
    TtsStream, TtsTask,
};

/// OpenAI's public API.
pub const OPENAI_BASE_URL: &str = "https://api.openai.com/v1";
/// Rate of `response_format: "pcm"` speech (OpenAI documents 24 kHz 16-bit mono).
pub const OPENAI_PCM_RATE: u32 = 24_000;
/// TCP + TLS setup longer than this means the endpoint is unreachable; failover beats waiting.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Error bodies are logged and shown; a few hundred bytes say what went wrong.
const MAX_ERROR_BODY: usize = 500;

/// One OpenAI-compatible endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenAiEndpoint {
    /// Name used in metrics, usage records and routes (`openai`, `groq`, …).
    pub name: String,
    /// Base URL with the version prefix, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// May be empty for local servers that need no key.
    pub api_key: String,
    pub model: String,
}

/// A reqwest client for streaming APIs: a connect timeout, no total timeout (streams are
/// long), pooled connections.
pub(crate) fn http_client() -> reqwest::Client {
    crate::install_crypto_provider();
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .user_agent(concat!("duplex/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("a client with these settings always builds")
}

fn join_url(base: &str, path: &str) -> String {
    format!("{}/{}", base.trim().trim_end_matches('/'), path)
}

/// Maps a transport error.
pub(crate) fn reqwest_error(e: reqwest::Error) -> ProviderError {
    if e.is_connect() {
        ProviderError::Connect(e.to_string())
    } else if e.is_timeout() {
        ProviderError::Timeout(e.to_string())
    } else {
        ProviderError::Closed(e.to_string())
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
    let mut body = resp.text().await.unwrap_or_default();
    body.truncate(MAX_ERROR_BODY);
    match (status, retry_after) {
        (429, Some(after)) => ProviderError::RateLimited(format!("retry after {after} s: {body}")),
        (429, None) => ProviderError::RateLimited(body),
        _ => ProviderError::Http { status, body },
    }
}

fn openai_error(e: OpenAIError) -> ProviderError {
    match e {
        OpenAIError::Reqwest(e) => reqwest_error(e),
        OpenAIError::ApiError(r) if r.status_code.as_u16() == 429 => {
            ProviderError::RateLimited(r.api_error.message)
        }
        OpenAIError::ApiError(r) => ProviderError::Http {
            status: r.status_code.as_u16(),
            body: r.api_error.message,
        },
        OpenAIError::JSONDeserialize(e, content) => {
            let mut content = content;
            content.truncate(MAX_ERROR_BODY);
            ProviderError::Protocol(format!("bad JSON from the endpoint: {e}: {content}"))
        }
        OpenAIError::StreamError(e) => ProviderError::Closed(e.to_string()),
        OpenAIError::InvalidArgument(m) => ProviderError::InvalidRequest(m),
        other => ProviderError::Protocol(other.to_string()),
    }
}

/// Streaming chat completions from one OpenAI-compatible endpoint.
#[derive(Clone)]
pub struct OpenAiLlm {
    endpoint: OpenAiEndpoint,
    client: async_openai::Client<OpenAIConfig>,
    meter: Meter,
}

impl std::fmt::Debug for OpenAiLlm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiLlm")
            .field("name", &self.endpoint.name)
            .field("base_url", &self.endpoint.base_url)
            .field("model", &self.endpoint.model)
            .finish_non_exhaustive()
    }
}

impl OpenAiLlm {
    pub fn new(endpoint: OpenAiEndpoint, meter: Meter) -> OpenAiLlm {
        let config = OpenAIConfig::new()
            .with_api_base(endpoint.base_url.trim_end_matches('/'))
            .with_api_key(endpoint.api_key.clone());
        // async-openai's default executor retries 429/5xx/connect errors itself, with
        // backoff honouring Retry-After: that would hold a voice turn on one sick endpoint.
        // The router owns retries and failover, so requests go out exactly once.
        let http = http_client();
        let client = async_openai::Client::build(http.clone(), config)
            .with_http_service(async_openai::middleware::ReqwestService::new(http));
        OpenAiLlm {
            endpoint,
            client,
            meter,
        }
    }

    pub fn endpoint(&self) -> &OpenAiEndpoint {
        &self.endpoint
    }

    fn build_request(&self, request: &LlmRequest) -> CreateChatCompletionRequest {
        let messages = request
            .messages
            .iter()
            .map(|m| match m.role {
                Role::System => ChatCompletionRequestMessage::from(
                    ChatCompletionRequestSystemMessage::from(m.content.as_str()),
                ),
                Role::User => ChatCompletionRequestUserMessage::from(m.content.as_str()).into(),
                Role::Assistant => {
                    ChatCompletionRequestAssistantMessage::from(m.content.as_str()).into()
                }
            })
            .collect();
        #[allow(deprecated)] // max_tokens: what OpenAI-compatible servers widely accept.
        CreateChatCompletionRequest {
            model: request
                .model
                .clone()
                .unwrap_or_else(|| self.endpoint.model.clone()),
            messages,
            stream: Some(true),
            stream_options: Some(ChatCompletionStreamOptions {
                include_usage: Some(true),
                include_obfuscation: None,
            }),
            max_tokens: request.max_tokens,
            ..Default::default()
        }
    }
}

impl LanguageModel for OpenAiLlm {
    fn name(&self) -> &str {
        &self.endpoint.name
    }

    fn stream(&self, request: LlmRequest) -> LlmStream {
        let body = self.build_request(&request);
        let client = self.client.clone();
        let meter = self.meter.clone();
        let provider = self.endpoint.name.clone();
        Box::pin(channel_stream(move |tx| async move {
            let result: Result<(), ProviderError> = async {
                let model = body.model.clone();
                let mut stream = client
                    .chat()
                    .create_stream(body)
                    .await
                    .map_err(openai_error)?;
                let mut finished = false;
                let mut usage = None;
                let mut seen_model = model;
                while let Some(item) = stream.next().await {
                    let chunk = item.map_err(openai_error)?;
                    if !chunk.model.is_empty() {
                        seen_model = chunk.model;
                    }
                    if let Some(u) = chunk.usage {
                        usage = Some(TokenUsage {
                            prompt_tokens: u.prompt_tokens,
                            completion_tokens: u.completion_tokens,
                        });
                    }
                    for choice in chunk.choices {
                        if let Some(text) = choice.delta.content
                            && !text.is_empty()
                            && tx.send(Ok(LlmEvent::Delta(text))).await.is_err()
                        {
                            return Ok(());
                        }
                        finished |= choice.finish_reason.is_some();
                    }
                }
                if !finished {
                    // async-openai ends the stream quietly when the body ends: without a
                    // finish_reason the answer was cut.
                    return Err(ProviderError::Closed(
                        "stream ended before finish_reason".into(),
                    ));
                }
                if let Some(u) = usage {
                    let sid = &request.session_id;
                    meter.record(
                        sid,
                        &provider,
                        &seen_model,
                        UsageKind::LlmPromptTokens,
                        f64::from(u.prompt_tokens),
                    );
                    meter.record(
                        sid,
                        &provider,
                        &seen_model,
                        UsageKind::LlmCompletionTokens,
                        f64::from(u.completion_tokens),
                    );
                }
                let _ = tx
                    .send(Ok(LlmEvent::Done {
                        usage,
                        model: seen_model,
                    }))
                    .await;
                Ok(())
            }
            .await;
            if let Err(e) = result {
                let _ = tx.send(Err(e)).await;
            }
        }))
    }
}

// ---------------------------------------------------------------------------------------------
// TTS
// ---------------------------------------------------------------------------------------------

/// Settings of OpenAI speech synthesis.
#[derive(Debug, Clone)]
pub struct OpenAiTtsConfig {
    pub api_key: String,
    pub base_url: String,
    pub model: String,
    /// Used when the session names no voice.
    pub voice: String,
}

impl OpenAiTtsConfig {
    pub fn new(api_key: impl Into<String>) -> OpenAiTtsConfig {
        OpenAiTtsConfig {
            api_key: api_key.into(),
            base_url: OPENAI_BASE_URL.into(),
            model: "gpt-4o-mini-tts".into(),
            voice: "alloy".into(),
        }
    }
}

/// OpenAI `/audio/speech` synthesizer.
#[derive(Debug, Clone)]
pub struct OpenAiTts {
    config: OpenAiTtsConfig,
    client: reqwest::Client,
    meter: Meter,
}

impl OpenAiTts {
    pub fn new(config: OpenAiTtsConfig, meter: Meter) -> OpenAiTts {
        OpenAiTts {
            config,
            client: http_client(),
            meter,
        }
    }
}

impl TextToSpeech for OpenAiTts {
    fn name(&self) -> &str {
        "openai"
    }

    fn open(&self, params: TtsParams) -> TtsStream {
        let (stream, task) = TtsStream::channel();
        let this = self.clone();
        let url = join_url(&this.config.base_url, "audio/speech");
        let voice = params.voice.clone().unwrap_or(this.config.voice.clone());
        spawn_chunked_pcm_tts(task, OPENAI_PCM_RATE, move |text: &str| {
            this.meter.record(
                &params.session_id,
                "openai",
                &this.config.model,
                UsageKind::TtsCharacters,
                text.chars().count() as f64,
            );
            let body = serde_json::json!({
                "model": this.config.model,
                "input": text,
                "voice": voice,
                "response_format": "pcm",
            });
            this.client
                .post(&url)
                .bearer_auth(&this.config.api_key)
                .json(&body)
        });
        stream
    }
}

/// Runs a TTS stream for providers that synthesize each text chunk with one HTTP request
/// answering raw PCM16 LE at `rate` (OpenAI `/audio/speech`, Azure REST): chunks are
/// synthesized in order, a non-2xx answer or a network fault ends the stream with
/// [`TtsEvent::Error`], and dropping the stream cancels the request in flight.
pub(crate) fn spawn_chunked_pcm_tts<F>(mut task: TtsTask, rate: u32, mut request: F)
where
    F: FnMut(&str) -> reqwest::RequestBuilder + Send + 'static,
{
    tokio::spawn(async move {
        let cancel = task.cancel.clone();
        let events = task.events.clone();
        let work = async move {
            while let Some(input) = task.input.recv().await {
                let (index, text) = match input {
                    TtsInput::Text { index, text } => (index, text),
                    TtsInput::End => {
                        let _ = task.events.send(TtsEvent::Finished).await;
                        return Ok(());
                    }
                };
                let resp = request(&text).send().await.map_err(reqwest_error)?;
                if !resp.status().is_success() {
                    return Err(http_error(resp).await);
                }
                if !stream_pcm(resp, index, rate, &task.events).await? {
                    return Ok(());
                }
            }
            Ok::<(), ProviderError>(())
        };
        tokio::select! {
            _ = cancel.cancelled() => {}
            r = work => if let Err(e) = r {
                let _ = events.send(TtsEvent::Error(e)).await;
            }
        }
    });
}

/// Forwards a raw PCM16 LE body as audio events of chunk `index`, then `ChunkDone`. Returns
/// `false` when the session stopped listening.
pub(crate) async fn stream_pcm(
    resp: reqwest::Response,
    index: u32,
    rate: u32,
    events: &tokio::sync::mpsc::Sender<TtsEvent>,
) -> Result<bool, ProviderError> {
    let mut body = resp.bytes_stream();
    // A network chunk may split a sample; its first byte waits for the next chunk.
    let mut carry: Option<u8> = None;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(reqwest_error)?;
        let samples = pcm16_samples(&mut carry, &chunk);
        if samples.is_empty() {
            continue;
        }
        let ev = TtsEvent::Audio {
            index,
            samples,
            sample_rate: rate,
        };
        if events.send(ev).await.is_err() {
            return Ok(false);
        }
    }
    Ok(events.send(TtsEvent::ChunkDone { index }).await.is_ok())
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

// ---------------------------------------------------------------------------------------------
// STT (non-streaming fallback)
// ---------------------------------------------------------------------------------------------

/// Settings of OpenAI transcription.
#[derive(Debug, Clone)]
pub struct OpenAiSttConfig {
    pub api_key: String,
    pub base_url: String,
    pub model: String,
    /// Audio kept per utterance; older audio is dropped (a turn is cut at `MAX_TURN_MS`
    /// anyway, and leading silence only makes Whisper hallucinate).
    pub max_utterance: Duration,
    /// Utterances shorter than this are not sent: they give an empty transcript.
    pub min_utterance: Duration,
}

impl OpenAiSttConfig {
    pub fn new(api_key: impl Into<String>) -> OpenAiSttConfig {
        OpenAiSttConfig {
            api_key: api_key.into(),
            base_url: OPENAI_BASE_URL.into(),
            model: "whisper-1".into(),
            max_utterance: Duration::from_secs(30),
            min_utterance: Duration::from_millis(100),
        }
    }
}

/// Whisper-style transcription of whole utterances.
#[derive(Debug, Clone)]
pub struct OpenAiStt {
    config: OpenAiSttConfig,
    client: reqwest::Client,
    meter: Meter,
}

impl OpenAiStt {
    pub fn new(config: OpenAiSttConfig, meter: Meter) -> OpenAiStt {
        OpenAiStt {
            config,
            client: http_client(),
            meter,
        }
    }

    async fn transcribe(
        &self,
        samples: Vec<i16>,
        rate: u32,
        params: &SttParams,
    ) -> Result<String, ProviderError> {
        let seconds = samples.len() as f64 / f64::from(rate.max(1));
        let wav = wav_bytes(&samples, rate);
        let file = reqwest::multipart::Part::bytes(wav)
            .file_name("utterance.wav")
            .mime_str("audio/wav")
            .expect("a valid MIME type");
        let mut form = reqwest::multipart::Form::new()
            .part("file", file)
            .text("model", self.config.model.clone())
            .text("response_format", "json");
        if let Some(lang) = &params.language {
            // The API takes ISO-639-1 codes: "en-US" -> "en".
            let code = lang.split(['-', '_']).next().unwrap_or(lang).to_owned();
            form = form.text("language", code);
        }
        self.meter.record(
            &params.session_id,
            "openai",
            &self.config.model,
            UsageKind::SttSeconds,
            seconds,
        );
        let resp = self
            .client
            .post(join_url(&self.config.base_url, "audio/transcriptions"))
            .bearer_auth(&self.config.api_key)
            .multipart(form)
            .send()
            .await
            .map_err(reqwest_error)?;
        if !resp.status().is_success() {
            return Err(http_error(resp).await);
        }
        #[derive(serde::Deserialize)]
        struct Transcription {
            text: String,
        }
        let t: Transcription = resp
            .json()
            .await
            .map_err(|e| ProviderError::Protocol(format!("transcription response: {e}")))?;
        Ok(t.text.trim().to_owned())
    }
}

impl SpeechToText for OpenAiStt {
    fn name(&self) -> &str {
        "openai"
    }

    fn open(&self, params: SttParams) -> SttStream {
        let (stream, mut task) = SttStream::channel();
        let this = self.clone();
        tokio::spawn(async move {
            let rate = params.sample_rate.max(1);
            let max_samples = (this.config.max_utterance.as_millis() as usize)
                .saturating_mul(rate as usize)
                / 1000;
            let min_samples = this.config.min_utterance.as_millis() as usize * rate as usize / 1000;
            let mut buffer: VecDeque<i16> = VecDeque::new();
            // Transcriptions run while the next utterance is buffered; answers keep order.
            let mut pending = FuturesOrdered::new();
            loop {
                tokio::select! {
                    _ = task.cancel.cancelled() => return,
                    input = task.input.recv() => match input {
                        Some(SttInput::Audio(samples)) => {
                            buffer.extend(samples);
                            if buffer.len() > max_samples {
                                let excess = buffer.len() - max_samples;
                                buffer.drain(..excess);
                            }
                        }
                        Some(SttInput::Finalize) => {
                            let samples: Vec<i16> = buffer.drain(..).collect();
                            let this = this.clone();
                            let params = params.clone();
                            pending.push_back(async move {
                                if samples.len() < min_samples {
                                    return Ok(String::new());
                                }
                                this.transcribe(samples, rate, &params).await
                            });
                        }
                        None => return,
                    },
                    Some(result) = pending.next(), if !pending.is_empty() => {
                        let event = match result {
                            Ok(text) => SttEvent::Final { text },
                            Err(e) => SttEvent::Error(e),
                        };
                        let failed = matches!(event, SttEvent::Error(_));
                        if task.events.send(event).await.is_err() || failed {
                            return;
                        }
                    }
                }
            }
        });
        stream
    }
}

/// A canonical 44-byte-header WAV file of 16-bit mono PCM.
pub fn wav_bytes(samples: &[i16], rate: u32) -> Vec<u8> {
    let data_len = (samples.len() * 2) as u32;
    let mut out = Vec::with_capacity(44 + data_len as usize);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data_len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes()); // fmt chunk size
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&1u16.to_le_bytes()); // mono
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&(rate * 2).to_le_bytes()); // byte rate
    out.extend_from_slice(&2u16.to_le_bytes()); // block align
    out.extend_from_slice(&16u16.to_le_bytes()); // bits per sample
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_len.to_le_bytes());
    for s in samples {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn wav_header_is_canonical() {
        let w = wav_bytes(&[0, 1, -1], 16000);
        assert_eq!(w.len(), 44 + 6);
        assert_eq!(&w[..4], b"RIFF");
        assert_eq!(u32::from_le_bytes(w[24..28].try_into().unwrap()), 16000);
        assert_eq!(u32::from_le_bytes(w[40..44].try_into().unwrap()), 6);
    }
}
