//! The scripted provider set: deterministic stand-ins for STT, LLM and TTS, for tests, demos
//! of the pipeline and load benchmarks. It is not speech recognition, not a language model and
//! not a voice, and it says so: every transcript starts with `(scripted transcript N)`, every
//! reply says it is the scripted test model, and the "voice" is a sequence of tone bursts, one
//! per word. Its timing (first token delay, per-token delay, synthesis latency) is configurable
//! so that benchmarks can model a provider's latency.
//!
//! Fault hooks for tests: a user message containing `[[llm_error]]` makes the LLM fail with
//! HTTP 500 before its first token; `[[llm_error_mid]]` fails after a few tokens; a text chunk
//! containing `[[tts_error]]` makes synthesis fail.

use std::time::Duration;

use futures::StreamExt;
use tokio::time::sleep;

use crate::{
    LanguageModel, LlmEvent, LlmRequest, LlmStream, ProviderError, Role, SpeechToText, SttEvent,
    SttInput, SttParams, SttStream, TextToSpeech, TokenUsage, TtsEvent, TtsInput, TtsParams,
    TtsStream, send_chunk_audio,
};

/// Timing of the scripted providers.
#[derive(Debug, Clone)]
pub struct ScriptedConfig {
    /// Transcript lines, used in turn (cycled).
    pub transcripts: Vec<String>,
    /// Delay before the LLM's first token.
    pub llm_first_token: Duration,
    /// Delay between LLM tokens.
    pub llm_token_interval: Duration,
    /// Delay before the first audio of each TTS chunk.
    pub tts_latency: Duration,
}

impl Default for ScriptedConfig {
    fn default() -> Self {
        ScriptedConfig {
            transcripts: vec![
                "hello, what can you do".into(),
                "tell me more about that".into(),
                "thank you, that is all".into(),
            ],
            // Roughly a fast hosted model: ~150 ms to first token, ~60 tokens/s.
            llm_first_token: Duration::from_millis(150),
            llm_token_interval: Duration::from_millis(16),
            // Roughly a fast streaming TTS: ~80 ms to first audio.
            tts_latency: Duration::from_millis(80),
        }
    }
}

/// Scripted recognizer: measures how much loud audio it gets and emits the next script line.
#[derive(Debug, Clone, Default)]
pub struct ScriptedStt {
    config: ScriptedConfig,
}

impl ScriptedStt {
    pub fn new(config: ScriptedConfig) -> ScriptedStt {
        ScriptedStt { config }
    }
}

/// RMS above which a 16-bit frame counts as "loud" for the scripted recognizer (about -30
/// dBFS: speech at normal level is well above, room noise well below).
const LOUD_RMS: f64 = 1000.0;
/// One more interim word per this much loud audio (a typical speaking rate of ~3 words/s).
const MS_PER_INTERIM_WORD: u64 = 300;
/// Less loud audio than this in an utterance gives an empty final transcript.
const MIN_UTTERANCE_MS: u64 = 100;

impl SpeechToText for ScriptedStt {
    fn name(&self) -> &str {
        "scripted"
    }

    fn open(&self, params: SttParams) -> SttStream {
        let (stream, mut task) = SttStream::channel();
        let lines = self.config.transcripts.clone();
        let rate = u64::from(params.sample_rate.max(1));
        tokio::spawn(async move {
            let mut turn = 0usize;
            let mut loud_ms = 0u64;
            let mut words_sent = 0usize;
            loop {
                let input = tokio::select! {
                    _ = task.cancel.cancelled() => return,
                    input = task.input.recv() => input,
                };
                let Some(input) = input else { return };
                let line = line_for(&lines, turn);
                let event = match input {
                    SttInput::Audio(samples) => {
                        if rms(&samples) > LOUD_RMS {
                            loud_ms += samples.len() as u64 * 1000 / rate;
                        }
                        let words: Vec<&str> = line.split(' ').collect();
                        let n = ((loud_ms / MS_PER_INTERIM_WORD) as usize).min(words.len());
                        if n > words_sent {
                            words_sent = n;
                            Some(SttEvent::Interim {
                                text: words[..n].join(" "),
                            })
                        } else {
                            None
                        }
                    }
                    SttInput::Finalize => {
                        let text = if loud_ms >= MIN_UTTERANCE_MS {
                            turn += 1;
                            line
                        } else {
                            String::new()
                        };
                        loud_ms = 0;
                        words_sent = 0;
                        Some(SttEvent::Final { text })
                    }
                };
                if let Some(event) = event
                    && task.events.send(event).await.is_err()
                {
                    return;
                }
            }
        });
        stream
    }
}

fn line_for(lines: &[String], turn: usize) -> String {
    let line = lines
        .get(turn % lines.len().max(1))
        .map(String::as_str)
        .unwrap_or("");
    format!("(scripted transcript {}) {line}", turn + 1)
}

fn rms(samples: &[i16]) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let sum: f64 = samples.iter().map(|&s| f64::from(s) * f64::from(s)).sum();
    (sum / samples.len() as f64).sqrt()
}

/// Scripted language model: answers by quoting the last user message, one word per token.
#[derive(Debug, Clone, Default)]
pub struct ScriptedLlm {
    config: ScriptedConfig,
}

impl ScriptedLlm {
    pub fn new(config: ScriptedConfig) -> ScriptedLlm {
        ScriptedLlm { config }
    }
}

/// Tokens the `[[llm_error_mid]]` hook lets through before failing.
const TOKENS_BEFORE_MID_STREAM_FAULT: usize = 3;

impl LanguageModel for ScriptedLlm {
    fn name(&self) -> &str {
        "scripted"
    }

    fn stream(&self, request: LlmRequest) -> LlmStream {
        let last_user = request
            .messages
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .map(|m| m.content.clone())
            .unwrap_or_default();
        let prompt_chars: usize = request.messages.iter().map(|m| m.content.len()).sum();
        let first = self.config.llm_first_token;
        let interval = self.config.llm_token_interval;
        let model = request.model.clone().unwrap_or_else(|| "scripted".into());
        let fail_early = last_user.contains("[[llm_error]]");
        let fail_mid = last_user.contains("[[llm_error_mid]]");
        let reply = format!(
            "This is the scripted test model of duplex, not a real language model. \
             You said: {last_user}. Switch to the local or cloud engines for real answers."
        );
        let tokens: Vec<String> = reply.split_inclusive(' ').map(str::to_owned).collect();
        let completion_tokens = tokens.len() as u32;
        let stream = async_stream(move |tx| async move {
            sleep(first).await;
            if fail_early {
                let _ = tx
                    .send(Err(ProviderError::Http {
                        status: 500,
                        body: "scripted fault".into(),
                    }))
                    .await;
                return;
            }
            for (i, token) in tokens.into_iter().enumerate() {
                if i > 0 {
                    sleep(interval).await;
                }
                if fail_mid && i == TOKENS_BEFORE_MID_STREAM_FAULT {
                    let _ = tx
                        .send(Err(ProviderError::Closed(
                            "scripted mid-stream fault".into(),
                        )))
                        .await;
                    return;
                }
                if tx.send(Ok(LlmEvent::Delta(token))).await.is_err() {
                    return;
                }
            }
            let usage = TokenUsage {
                // A rough 4 characters per token, as tokenizers of English average.
                prompt_tokens: (prompt_chars / 4) as u32,
                completion_tokens,
            };
            let _ = tx
                .send(Ok(LlmEvent::Done {
                    usage: Some(usage),
                    model,
                }))
                .await;
        });
        Box::pin(stream)
    }
}

/// Builds a stream fed by a spawned producer; the producer stops when the stream is dropped
/// (its sends fail) — which is how cancellation reaches it.
fn async_stream<F, Fut>(producer: F) -> impl futures::Stream<Item = Result<LlmEvent, ProviderError>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<LlmEvent, ProviderError>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    // One token in flight is enough: the consumer reads as fast as tokens come.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let fut = producer(tx.clone());
    let handle = tokio::spawn(async move {
        tokio::select! {
            _ = fut => {},
            _ = tx.closed() => {},
        }
    });
    let abort = handle.abort_handle();
    futures::stream::unfold((rx, AbortOnDrop(abort)), |(mut rx, guard)| async move {
        rx.recv().await.map(|item| (item, (rx, guard)))
    })
    .fuse()
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Scripted synthesizer: one tone burst per word at 24 kHz, delivered in 100 ms pieces.
#[derive(Debug, Clone, Default)]
pub struct ScriptedTts {
    config: ScriptedConfig,
}

impl ScriptedTts {
    pub fn new(config: ScriptedConfig) -> ScriptedTts {
        ScriptedTts { config }
    }
}

/// The scripted voice's native rate; 24 kHz like most cloud TTS, so sessions resample.
pub const SCRIPTED_TTS_RATE: u32 = 24_000;
/// Audio delivered per event: 100 ms, a typical streaming TTS packet.
const PIECE_SAMPLES: usize = (SCRIPTED_TTS_RATE / 10) as usize;

impl TextToSpeech for ScriptedTts {
    fn name(&self) -> &str {
        "scripted"
    }

    fn open(&self, _params: TtsParams) -> TtsStream {
        let (stream, mut task) = TtsStream::channel();
        let latency = self.config.tts_latency;
        tokio::spawn(async move {
            let cancel = task.cancel.clone();
            let work = async move {
                while let Some(input) = task.input.recv().await {
                    match input {
                        TtsInput::Text { index, text } => {
                            sleep(latency).await;
                            if text.contains("[[tts_error]]") {
                                let err = ProviderError::Http {
                                    status: 500,
                                    body: "scripted fault".into(),
                                };
                                let _ = task.events.send(TtsEvent::Error(err)).await;
                                return;
                            }
                            let audio = tone_words(&text, SCRIPTED_TTS_RATE);
                            let (events, rate) = (&task.events, SCRIPTED_TTS_RATE);
                            if !send_chunk_audio(events, index, &audio, rate, PIECE_SAMPLES).await {
                                return;
                            }
                        }
                        TtsInput::End => {
                            let _ = task.events.send(TtsEvent::Finished).await;
                            return;
                        }
                    }
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => {},
                _ = work => {},
            }
        });
        stream
    }
}

/// Renders text as tone bursts: per word 50 ms per character (at least 120 ms), a pitch
/// derived from the word, a 10 ms fade in/out, and 60 ms of silence between words.
pub fn tone_words(text: &str, rate: u32) -> Vec<i16> {
    let ms = |n: u32| (rate / 1000 * n) as usize;
    let mut out = Vec::new();
    for word in text.split_whitespace() {
        let len = ms((word.chars().count() as u32 * 50).max(120));
        let seed = word
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        let freq = 160.0 + f64::from(seed % 160);
        let fade = ms(10);
        for i in 0..len {
            let t = i as f64 / f64::from(rate);
            let env = (i.min(len - 1 - i) as f64 / fade as f64).min(1.0);
            let phase = std::f64::consts::TAU * freq * t;
            let v = 0.6 * phase.sin() + 0.25 * (2.0 * phase).sin() + 0.1 * (3.0 * phase).sin();
            out.push((v * env * 9000.0) as i16);
        }
        out.extend(std::iter::repeat_n(0i16, ms(60)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ChatMessage;

    fn fast() -> ScriptedConfig {
        ScriptedConfig {
            llm_first_token: Duration::from_millis(1),
            llm_token_interval: Duration::ZERO,
            tts_latency: Duration::ZERO,
            ..ScriptedConfig::default()
        }
    }

    #[tokio::test]
    async fn stt_emits_interims_then_the_script_line() {
        let stt = ScriptedStt::new(fast());
        let mut s = stt.open(SttParams {
            sample_rate: 16000,
            language: None,
            session_id: "t".into(),
        });
        let loud: Vec<i16> = (0..320)
            .map(|i| if i % 2 == 0 { 8000 } else { -8000 })
            .collect();
        for _ in 0..40 {
            s.input.send(SttInput::Audio(loud.clone())).await.unwrap();
        }
        s.input.send(SttInput::Finalize).await.unwrap();
        let mut events = Vec::new();
        while let Some(ev) = s.events.recv().await {
            let done = matches!(ev, SttEvent::Final { .. });
            events.push(ev);
            if done {
                break;
            }
        }
        assert!(matches!(events[0], SttEvent::Interim { .. }), "{events:?}");
        assert_eq!(
            events.last().unwrap(),
            &SttEvent::Final {
                text: "(scripted transcript 1) hello, what can you do".into()
            }
        );
    }

    #[tokio::test]
    async fn stt_gives_empty_final_for_silence() {
        let stt = ScriptedStt::new(fast());
        let mut s = stt.open(SttParams {
            sample_rate: 16000,
            language: None,
            session_id: "t".into(),
        });
        s.input.send(SttInput::Audio(vec![0; 320])).await.unwrap();
        s.input.send(SttInput::Finalize).await.unwrap();
        assert_eq!(
            s.events.recv().await.unwrap(),
            SttEvent::Final {
                text: String::new()
            }
        );
    }

    #[tokio::test]
    async fn llm_streams_words_and_usage_and_honours_fault_hooks() {
        let llm = ScriptedLlm::new(fast());
        let req = |text: &str| LlmRequest {
            session_id: "t".into(),
            model: None,
            messages: vec![ChatMessage::new(Role::User, text)],
            max_tokens: None,
            plan: None,
            budget_remaining_usd: None,
        };
        let items: Vec<_> = llm.stream(req("hi there")).collect().await;
        let text: String = items
            .iter()
            .filter_map(|i| match i {
                Ok(LlmEvent::Delta(d)) => Some(d.as_str()),
                _ => None,
            })
            .collect();
        assert!(text.contains("You said: hi there."), "{text}");
        assert!(matches!(
            items.last(),
            Some(Ok(LlmEvent::Done { usage: Some(_), .. }))
        ));

        let items: Vec<_> = llm.stream(req("[[llm_error]]")).collect().await;
        assert_eq!(items.len(), 1);
        assert!(matches!(
            items[0],
            Err(ProviderError::Http { status: 500, .. })
        ));

        let items: Vec<_> = llm.stream(req("[[llm_error_mid]]")).collect().await;
        assert_eq!(items.len(), TOKENS_BEFORE_MID_STREAM_FAULT + 1);
        assert!(items.last().unwrap().is_err());
    }

    #[tokio::test]
    async fn tts_delivers_audio_per_chunk_then_finishes() {
        let tts = ScriptedTts::new(fast());
        let mut s = tts.open(TtsParams {
            session_id: "t".into(),
            voice: None,
            language: None,
            preferred_sample_rate: 16000,
        });
        s.input
            .send(TtsInput::Text {
                index: 0,
                text: "Hello there.".into(),
            })
            .await
            .unwrap();
        s.input.send(TtsInput::End).await.unwrap();
        let mut samples = 0;
        let mut saw_done = false;
        while let Some(ev) = s.events.recv().await {
            match ev {
                TtsEvent::Audio {
                    index,
                    samples: s,
                    sample_rate,
                } => {
                    assert_eq!((index, sample_rate), (0, SCRIPTED_TTS_RATE));
                    samples += s.len();
                }
                TtsEvent::ChunkDone { index } => saw_done = index == 0,
                TtsEvent::Finished => break,
                TtsEvent::Error(e) => panic!("{e}"),
            }
        }
        assert!(saw_done);
        assert_eq!(samples, tone_words("Hello there.", SCRIPTED_TTS_RATE).len());
        // "Hello" (250 ms) + gap + "there." (300 ms) + gap.
        assert_eq!(samples, SCRIPTED_TTS_RATE as usize * 670 / 1000);
    }
}
