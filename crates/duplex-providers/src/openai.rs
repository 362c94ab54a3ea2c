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
use async_openai::types::chat::CreateChatCompletionStreamResponse;
use async_openai::types::chat::{
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestMessage,
    ChatCompletionRequestSystemMessage, ChatCompletionRequestUserMessage,
    ChatCompletionStreamOptions, CreateChatCompletionRequest,
};
use futures::StreamExt;
use futures::stream::FuturesOrdered;

use crate::http::{
    CONNECT_TIMEOUT, HttpRequest, READ_TIMEOUT, http_client_with, http_error, reqwest_error,
    run_chunked_tts,
};
use crate::router::channel_stream;
use crate::usage::{Meter, UsageKind};
use crate::{
    LanguageModel, LlmEvent, LlmRequest, LlmStream, ProviderError, Role, SpeechToText, SttEvent,
    SttInput, SttParams, SttStream, TextToSpeech, TokenUsage, TtsParams, TtsStream,
};

/// Error bodies are logged and shown; a few hundred bytes say what went wrong.
const MAX_ERROR_BODY: usize = 500;

/// OpenAI's public API.
pub const OPENAI_BASE_URL: &str = "https://api.openai.com/v1";
/// Rate of `response_format: "pcm"` speech (OpenAI documents 24 kHz 16-bit mono).
pub const OPENAI_PCM_RATE: u32 = 24_000;
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

fn join_url(base: &str, path: &str) -> String {
    format!("{}/{}", base.trim().trim_end_matches('/'), path)
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
        OpenAiLlm::with_timeouts(endpoint, meter, CONNECT_TIMEOUT, READ_TIMEOUT)
    }

    /// With another connect timeout and read timeout (no byte for this long, before the
    /// headers or between body pieces, fails the request).
    pub fn with_timeouts(
        endpoint: OpenAiEndpoint,
        meter: Meter,
        connect_timeout: Duration,
        read_timeout: Duration,
    ) -> OpenAiLlm {
        let config = OpenAIConfig::new()
            .with_api_base(endpoint.base_url.trim_end_matches('/'))
            .with_api_key(endpoint.api_key.clone());
        // async-openai's default executor retries 429/5xx/connect errors itself, with
        // backoff honouring Retry-After: that would hold a voice turn on one sick endpoint.
        // The router owns retries and failover, so requests go out exactly once.
        let http = http_client_with(connect_timeout, read_timeout);
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
            let mut codec = ChatCodec::new(body.model.clone());
            match client.chat().create_stream(body).await {
                Err(e) => codec.handle_error(e),
                Ok(mut stream) => {
                    while !codec.is_over() {
                        match stream.next().await {
                            Some(Ok(chunk)) => codec.handle_chunk(chunk),
                            Some(Err(e)) => codec.handle_error(e),
                            None => codec.handle_end(),
                        }
                        // Forwarded per chunk, so each token reaches the session at once.
                        if !forward(&mut codec, &tx, &meter, &request.session_id, &provider).await {
                            return;
                        }
                    }
                }
            }
            forward(&mut codec, &tx, &meter, &request.session_id, &provider).await;
        }))
    }
}

/// Drains a [`ChatCodec`]: events to the stream, usage to the meter. `false` when the
/// consumer dropped the stream.
async fn forward(
    codec: &mut ChatCodec,
    tx: &tokio::sync::mpsc::Sender<Result<LlmEvent, ProviderError>>,
    meter: &Meter,
    session_id: &str,
    provider: &str,
) -> bool {
    while let Some(out) = codec.poll_output() {
        match out {
            ChatOutput::Event(ev) => {
                if tx.send(ev).await.is_err() {
                    return false;
                }
            }
            ChatOutput::Usage {
                model,
                kind,
                amount,
            } => meter.record(session_id, provider, &model, kind, amount),
        }
    }
    true
}

/// What a [`ChatCodec`] yields.
#[derive(Debug, Clone, PartialEq)]
pub enum ChatOutput {
    /// An item of the LLM stream; an error is the last item.
    Event(Result<LlmEvent, ProviderError>),
    /// Token usage of the answering model, to meter.
    Usage {
        model: String,
        kind: UsageKind,
        amount: f64,
    },
}

/// OpenAI chat streaming as a codec. async-openai already frames the SSE body
/// (`eventsource-stream`, `data: [DONE]`) and parses each `data:` line into a
/// `CreateChatCompletionStreamResponse`, so a second SSE parser here would only duplicate it.
/// What is left of the protocol, and lives here without IO, is the mapping of those chunks
/// to [`LlmEvent`]s: content deltas in order, the model the endpoint reports, the usage chunk
/// that `stream_options.include_usage` adds after the `finish_reason` chunk, and the rule that
/// a body ending without a `finish_reason` is a cut answer, not a finished one.
#[derive(Debug)]
pub struct ChatCodec {
    model: String,
    usage: Option<TokenUsage>,
    finished: bool,
    over: bool,
    out: VecDeque<ChatOutput>,
}

impl ChatCodec {
    /// `model` is the requested model, reported unless the endpoint names another.
    pub fn new(model: String) -> ChatCodec {
        ChatCodec {
            model,
            usage: None,
            finished: false,
            over: false,
            out: VecDeque::new(),
        }
    }

    /// A parsed `data:` chunk.
    pub fn handle_chunk(&mut self, chunk: CreateChatCompletionStreamResponse) {
        if self.over {
            return;
        }
        if !chunk.model.is_empty() {
            self.model = chunk.model;
        }
        if let Some(u) = chunk.usage {
            self.usage = Some(TokenUsage {
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
            });
        }
        for choice in chunk.choices {
            if let Some(text) = choice.delta.content
                && !text.is_empty()
            {
                self.out
                    .push_back(ChatOutput::Event(Ok(LlmEvent::Delta(text))));
            }
            self.finished |= choice.finish_reason.is_some();
        }
    }

    /// The request or the stream failed (HTTP status, transport, malformed JSON).
    pub fn handle_error(&mut self, e: OpenAIError) {
        if !self.over {
            self.over = true;
            self.out.push_back(ChatOutput::Event(Err(openai_error(e))));
        }
    }

    /// The body ended (after `data: [DONE]`, or cut).
    pub fn handle_end(&mut self) {
        if self.over {
            return;
        }
        self.over = true;
        if !self.finished {
            // async-openai ends the stream quietly when the body ends: without a
            // finish_reason the answer was cut.
            self.out
                .push_back(ChatOutput::Event(Err(ProviderError::Closed(
                    "stream ended before finish_reason".into(),
                ))));
            return;
        }
        if let Some(u) = self.usage {
            for (kind, amount) in [
                (UsageKind::LlmPromptTokens, u.prompt_tokens),
                (UsageKind::LlmCompletionTokens, u.completion_tokens),
            ] {
                self.out.push_back(ChatOutput::Usage {
                    model: self.model.clone(),
                    kind,
                    amount: f64::from(amount),
                });
            }
        }
        self.out.push_back(ChatOutput::Event(Ok(LlmEvent::Done {
            usage: self.usage,
            model: self.model.clone(),
        })));
    }

    /// Whether the stream is over (its last outputs may still be queued).
    pub fn is_over(&self) -> bool {
        self.over
    }

    pub fn poll_output(&mut self) -> Option<ChatOutput> {
        self.out.pop_front()
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
    /// No byte for this long (before the headers or between body pieces) fails the turn.
    pub read_timeout: Duration,
    /// TCP + TLS setup.
    pub connect_timeout: Duration,
}

impl OpenAiTtsConfig {
    pub fn new(api_key: impl Into<String>) -> OpenAiTtsConfig {
        OpenAiTtsConfig {
            api_key: api_key.into(),
            base_url: OPENAI_BASE_URL.into(),
            model: "gpt-4o-mini-tts".into(),
            voice: "alloy".into(),
            read_timeout: READ_TIMEOUT,
            connect_timeout: CONNECT_TIMEOUT,
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
            client: http_client_with(config.connect_timeout, config.read_timeout),
            config,
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
        let config = self.config.clone();
        let meter = self.meter.clone();
        let voice = params.voice.clone().unwrap_or(config.voice.clone());
        run_chunked_tts(
            task,
            OPENAI_PCM_RATE,
            self.client.clone(),
            move |text: &str| {
                meter.record(
                    &params.session_id,
                    "openai",
                    &config.model,
                    UsageKind::TtsCharacters,
                    text.chars().count() as f64,
                );
                config.speech_request(&voice, text)
            },
        );
        stream
    }
}

impl OpenAiTtsConfig {
    /// The `/audio/speech` request for one chunk: raw PCM (`response_format: "pcm"`).
    pub fn speech_request(&self, voice: &str, text: &str) -> HttpRequest {
        let body = serde_json::json!({
            "model": self.model,
            "input": text,
            "voice": voice,
            "response_format": "pcm",
        });
        HttpRequest {
            url: join_url(&self.base_url, "audio/speech"),
            headers: vec![
                ("Authorization", format!("Bearer {}", self.api_key)),
                ("Content-Type", "application/json".into()),
            ],
            body: body.to_string().into_bytes(),
        }
    }
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
    /// No byte of the answer for this long (before the headers or between body pieces)
    /// fails the transcription.
    pub read_timeout: Duration,
    /// TCP + TLS setup.
    pub connect_timeout: Duration,
    /// The whole transcription of one utterance (upload, recognition, the answer's body)
    /// must be done within this; a server that trickles its answer resets the read timeout
    /// at every byte but not this one.
    pub response_timeout: Duration,
}

impl OpenAiSttConfig {
    pub fn new(api_key: impl Into<String>) -> OpenAiSttConfig {
        OpenAiSttConfig {
            api_key: api_key.into(),
            base_url: OPENAI_BASE_URL.into(),
            model: "whisper-1".into(),
            max_utterance: Duration::from_secs(30),
            min_utterance: Duration::from_millis(100),
            read_timeout: READ_TIMEOUT,
            connect_timeout: CONNECT_TIMEOUT,
            // Whisper answers a 30 s utterance in a few seconds; the user waits for it.
            response_timeout: Duration::from_secs(15),
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
            client: http_client_with(config.connect_timeout, config.read_timeout),
            config,
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
        let body = resp.bytes().await.map_err(reqwest_error)?;
        parse_transcription(&body)
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
            let mut buffer =
                UtteranceBuffer::new(rate, this.config.max_utterance, this.config.min_utterance);
            // Transcriptions run while the next utterance is buffered; answers keep order.
            let mut pending = FuturesOrdered::new();
            loop {
                tokio::select! {
                    _ = task.cancel.cancelled() => return,
                    input = task.input.recv() => match input {
                        Some(SttInput::Audio(samples)) => buffer.push(&samples),
                        Some(SttInput::Finalize) => {
                            let utterance = buffer.finalize();
                            let this = this.clone();
                            let params = params.clone();
                            pending.push_back(async move {
                                let Some(samples) = utterance else {
                                    return Ok(String::new());
                                };
                                let limit = this.config.response_timeout;
                                tokio::time::timeout(limit, this.transcribe(samples, rate, &params))
                                    .await
                                    .unwrap_or_else(|_| {
                                        Err(ProviderError::Timeout(format!(
                                            "OpenAI transcription not answered within {} ms",
                                            limit.as_millis()
                                        )))
                                    })
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

/// The audio of the utterance being spoken, for the non-streaming transcription API: bounded
/// to the newest `max_utterance`, and not worth a request below `min_utterance`.
#[derive(Debug)]
pub struct UtteranceBuffer {
    samples: VecDeque<i16>,
    max_samples: usize,
    min_samples: usize,
}

impl UtteranceBuffer {
    pub fn new(rate: u32, max_utterance: Duration, min_utterance: Duration) -> UtteranceBuffer {
        let per_ms = |d: Duration| (d.as_millis() as usize).saturating_mul(rate as usize) / 1000;
        UtteranceBuffer {
            samples: VecDeque::new(),
            max_samples: per_ms(max_utterance),
            min_samples: per_ms(min_utterance),
        }
    }

    /// More audio; the oldest is dropped beyond `max_utterance`.
    pub fn push(&mut self, samples: &[i16]) {
        self.samples.extend(samples);
        if self.samples.len() > self.max_samples {
            let excess = self.samples.len() - self.max_samples;
            self.samples.drain(..excess);
        }
    }

    /// Ends the utterance: its audio to transcribe, or `None` when it is too short to give
    /// anything but an empty transcript.
    pub fn finalize(&mut self) -> Option<Vec<i16>> {
        let samples: Vec<i16> = self.samples.drain(..).collect();
        (samples.len() >= self.min_samples).then_some(samples)
    }
}

/// The text of a `response_format: "json"` transcription (`{"text": "…"}`), trimmed.
pub fn parse_transcription(body: &[u8]) -> Result<String, ProviderError> {
    #[derive(serde::Deserialize)]
    struct Transcription {
        text: String,
    }
    let t: Transcription = serde_json::from_slice(body)
        .map_err(|e| ProviderError::Protocol(format!("transcription response: {e}")))?;
    Ok(t.text.trim().to_owned())
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
    use expect_test::expect;
    use std::fmt::Write;

    /// The `data:` lines of a streamed answer as OpenAI sends them (and the fake, byte for
    /// byte): a role chunk, content chunks, the `finish_reason` chunk, the usage chunk.
    const ROLE: &str = r#"{"choices":[{"delta":{"content":"","refusal":null,"role":"assistant"},"finish_reason":null,"index":0,"logprobs":null}],"created":1750000000,"id":"chatcmpl-fake","model":"gpt-4o-mini-2024-07-18","object":"chat.completion.chunk","system_fingerprint":"fp_fake","usage":null}"#;
    const PARIS: &str = r#"{"choices":[{"delta":{"content":"Paris "},"finish_reason":null,"index":0,"logprobs":null}],"created":1750000000,"id":"chatcmpl-fake","model":"gpt-4o-mini-2024-07-18","object":"chat.completion.chunk","system_fingerprint":"fp_fake","usage":null}"#;
    const IS_SUNNY: &str = r#"{"choices":[{"delta":{"content":"is sunny."},"finish_reason":null,"index":0,"logprobs":null}],"created":1750000000,"id":"chatcmpl-fake","model":"gpt-4o-mini-2024-07-18","object":"chat.completion.chunk","system_fingerprint":"fp_fake","usage":null}"#;
    const STOP: &str = r#"{"choices":[{"delta":{},"finish_reason":"stop","index":0,"logprobs":null}],"created":1750000000,"id":"chatcmpl-fake","model":"gpt-4o-mini-2024-07-18","object":"chat.completion.chunk","system_fingerprint":"fp_fake","usage":null}"#;
    const USAGE: &str = r#"{"choices":[],"created":1750000000,"id":"chatcmpl-fake","model":"gpt-4o-mini-2024-07-18","object":"chat.completion.chunk","system_fingerprint":"fp_fake","usage":{"completion_tokens":3,"prompt_tokens":12,"total_tokens":15}}"#;

    fn chat_timeline(chunks: &[&str], end: bool) -> String {
        let mut codec = ChatCodec::new("gpt-4o-mini".into());
        let mut out = String::new();
        let drain = |codec: &mut ChatCodec, out: &mut String| {
            while let Some(o) = codec.poll_output() {
                writeln!(out, "  -> {o:?}").unwrap();
            }
        };
        for chunk in chunks {
            match serde_json::from_str::<CreateChatCompletionStreamResponse>(chunk) {
                Ok(c) => {
                    writeln!(out, "chunk").unwrap();
                    codec.handle_chunk(c);
                }
                // What async-openai does with a `data:` line it cannot parse.
                Err(e) => {
                    writeln!(out, "bad chunk").unwrap();
                    codec.handle_error(OpenAIError::JSONDeserialize(e, (*chunk).into()));
                }
            }
            drain(&mut codec, &mut out);
        }
        if end {
            writeln!(out, "end").unwrap();
            codec.handle_end();
            drain(&mut codec, &mut out);
        }
        out
    }

    #[test]
    fn chat_chunks_become_deltas_then_usage_and_done() {
        let got = chat_timeline(&[ROLE, PARIS, IS_SUNNY, STOP, USAGE], true);
        expect![[r#"
            chunk
            chunk
              -> Event(Ok(Delta("Paris ")))
            chunk
              -> Event(Ok(Delta("is sunny.")))
            chunk
            chunk
            end
              -> Usage { model: "gpt-4o-mini-2024-07-18", kind: LlmPromptTokens, amount: 12.0 }
              -> Usage { model: "gpt-4o-mini-2024-07-18", kind: LlmCompletionTokens, amount: 3.0 }
              -> Event(Ok(Done { usage: Some(TokenUsage { prompt_tokens: 12, completion_tokens: 3 }), model: "gpt-4o-mini-2024-07-18" }))
        "#]]
        .assert_eq(&got);
    }

    #[test]
    fn a_chat_stream_without_finish_reason_or_with_bad_json_is_an_error() {
        let got = chat_timeline(&[ROLE, PARIS], true);
        expect![[r#"
            chunk
            chunk
              -> Event(Ok(Delta("Paris ")))
            end
              -> Event(Err(Closed("stream ended before finish_reason")))
        "#]]
        .assert_eq(&got);
        let got = chat_timeline(&[ROLE, r#"{"choices": [oops"#, PARIS], true);
        expect![[r#"
            chunk
            bad chunk
              -> Event(Err(Protocol("bad JSON from the endpoint: expected value at line 1 column 14: {\"choices\": [oops")))
            chunk
            end
        "#]]
        .assert_eq(&got);
    }

    #[test]
    fn speech_request_asks_for_raw_pcm_with_the_bearer_key() {
        let mut c = OpenAiTtsConfig::new("sk-test");
        c.base_url = "http://127.0.0.1:9/v1/".into();
        let r = c.speech_request("alloy", "Hi.");
        assert_eq!(r.url, "http://127.0.0.1:9/v1/audio/speech");
        assert_eq!(
            r.headers,
            [
                ("Authorization", "Bearer sk-test".to_owned()),
                ("Content-Type", "application/json".to_owned())
            ]
        );
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"model": "gpt-4o-mini-tts", "input": "Hi.", "voice": "alloy", "response_format": "pcm"})
        );
    }

    #[test]
    fn utterances_keep_the_newest_audio_and_skip_the_too_short() {
        let ms = Duration::from_millis;
        // 1 kHz keeps the arithmetic visible: 5 ms = 5 samples.
        let mut b = UtteranceBuffer::new(1000, ms(5), ms(3));
        b.push(&[1, 2, 3]);
        b.push(&[4, 5, 6, 7]);
        assert_eq!(b.finalize(), Some(vec![3, 4, 5, 6, 7]), "oldest dropped");
        assert_eq!(b.finalize(), None, "empty after a finalize");
        b.push(&[8, 9]);
        assert_eq!(b.finalize(), None, "2 ms is below min_utterance");
        b.push(&[10, 11, 12]);
        assert_eq!(
            b.finalize(),
            Some(vec![10, 11, 12]),
            "the short one was dropped"
        );
    }

    #[test]
    fn transcriptions_are_parsed_and_trimmed() {
        assert_eq!(
            parse_transcription(br#"{"text":" What is the weather like? "}"#),
            Ok("What is the weather like?".into())
        );
        assert!(matches!(
            parse_transcription(b"<html>502</html>"),
            Err(ProviderError::Protocol(m)) if m.starts_with("transcription response")
        ));
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
