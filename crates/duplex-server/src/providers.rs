//! Builds the provider set sessions run on from [`Config`]: per engine, the explicit
//! `*_PROVIDER` choice, else the cloud vendor whose key is set, else the `DUPLEX_PROVIDERS`
//! set (config.rs resolves the choice; this module only constructs). Every cloud adapter
//! reports usage to the given sink, priced from `PROVIDER_PRICES` over the defaults. Local
//! engines load their models here (seconds: call it off the async runtime) and share one
//! compute gate.

use std::sync::Arc;

use duplex_providers::azure::{AzureTts, AzureTtsConfig};
use duplex_providers::deepgram::{DeepgramConfig, DeepgramStt};
use duplex_providers::elevenlabs::{ElevenLabsConfig, ElevenLabsTts};
use duplex_providers::openai::{
    OpenAiEndpoint, OpenAiLlm, OpenAiStt, OpenAiSttConfig, OpenAiTts, OpenAiTtsConfig,
};
use duplex_providers::router::{BreakerConfig, LlmRouter, RouterConfig};
use duplex_providers::scripted::{ScriptedConfig, ScriptedLlm, ScriptedStt, ScriptedTts};
use duplex_providers::{LanguageModel, Meter, ProviderSet, SpeechToText, TextToSpeech, UsageSink};

use crate::config::{EnginesConfig, LlmEngine, ProviderMode, SttEngine, TtsEngine};

/// A local engine that could not load: the message names the file and the command that
/// installs it.
#[derive(Debug, thiserror::Error)]
#[error("local {engine}: {source}")]
pub struct BuildError {
    engine: &'static str,
    source: duplex_local::Error,
}

/// Where the engines report (the metrics): the LLM router's failovers and breakers, the local
/// engines' queue waits, decode steps and tokens.
pub trait EngineObserver:
    duplex_providers::router::RouterObserver + duplex_local::observe::Observe
{
}

impl<T: duplex_providers::router::RouterObserver + duplex_local::observe::Observe> EngineObserver
    for T
{
}

/// The engines of every session; `None` in echo mode (no providers at all).
/// The LLM router and the local engines report to `observer` (the metrics).
/// `max_turn` (the endpointer's longest utterance) bounds what a non-streaming recognizer keeps.
pub fn build(
    config: &EnginesConfig,
    max_turn: std::time::Duration,
    usage: Arc<dyn UsageSink>,
    observer: Arc<dyn EngineObserver>,
) -> Result<Option<ProviderSet>, BuildError> {
    if config.providers == ProviderMode::Echo {
        return Ok(None);
    }
    // An engine left to the default runs the DUPLEX_PROVIDERS set.
    let local = config.providers == ProviderMode::Local;
    let stt_engine = match config.cloud.stt {
        SttEngine::Default if local => SttEngine::Local,
        SttEngine::Default => SttEngine::Scripted,
        chosen => chosen,
    };
    let llm_engine = match config.cloud.llm {
        LlmEngine::Default if local => LlmEngine::Local,
        LlmEngine::Default => LlmEngine::Scripted,
        chosen => chosen,
    };
    let tts_engine = match config.cloud.tts {
        TtsEngine::Default if local => TtsEngine::Local,
        TtsEngine::Default => TtsEngine::Scripted,
        chosen => chosen,
    };
    let models = duplex_local::ModelDir::new(&config.models_dir);
    let gate = if config.local_overlap_steps {
        duplex_local::ComputeGate::new()
    } else {
        duplex_local::ComputeGate::serial()
    };
    let loaded = |engine: &'static str, t: std::time::Instant| {
        tracing::info!(engine, models = %config.models_dir.display(), took_ms = t.elapsed().as_millis() as u64, "local engine loaded");
    };
    let failed = |engine: &'static str| move |source| BuildError { engine, source };
    duplex_providers::install_crypto_provider();
    let cloud = &config.cloud;
    let meter = Meter::new(usage, Arc::new(cloud.prices.clone()));
    let scripted = ScriptedConfig {
        llm_first_token: config.scripted_llm_first_token,
        llm_token_interval: config.scripted_llm_token_interval,
        tts_latency: config.scripted_tts_latency,
        ..ScriptedConfig::default()
    };
    let key = |k: &Option<String>| {
        k.clone()
            .expect("config.rs checked the key of a chosen engine")
    };

    let stt: Arc<dyn SpeechToText> = match stt_engine {
        SttEngine::Local => {
            let t = std::time::Instant::now();
            let stt = models
                .load_stt(&gate)
                .map_err(failed("speech recognition"))?;
            stt.set_observer(observer.clone());
            loaded("whisper", t);
            Arc::new(stt)
        }
        SttEngine::Default | SttEngine::Scripted => Arc::new(ScriptedStt::new(scripted.clone())),
        SttEngine::Deepgram => {
            let mut c = DeepgramConfig::new(key(&cloud.deepgram_api_key));
            c.base_url = cloud.deepgram_base_url.clone();
            c.model = cloud.deepgram_model.clone();
            c.connect_timeout = cloud.connect_timeout;
            c.send_timeout = cloud.send_timeout;
            Arc::new(DeepgramStt::new(c, meter.clone()))
        }
        SttEngine::OpenAi => {
            let mut c = OpenAiSttConfig::new(key(&cloud.openai_api_key));
            c.base_url = cloud.openai_base_url.clone();
            c.model = cloud.openai_stt_model.clone();
            c.max_utterance = max_turn.max(std::time::Duration::from_secs(1));
            c.connect_timeout = cloud.connect_timeout;
            c.read_timeout = cloud.read_timeout;
            c.response_timeout = cloud.openai_stt_timeout;
            Arc::new(OpenAiStt::new(c, meter.clone()))
        }
    };

    let llm: Arc<dyn LanguageModel> = match llm_engine {
        LlmEngine::Local => {
            let t = std::time::Instant::now();
            let params = duplex_local::GenParams {
                max_tokens: config.local_llm_max_tokens,
                ..duplex_local::GenParams::default()
            };
            let llm = models
                .load_llm(
                    config.local_llm,
                    config.local_llm_engine,
                    &gate,
                    params,
                    &duplex_local::BatchConfig {
                        max_sequences: config.local_llm_max_sequences,
                        context_per_sequence: config.local_llm_context_tokens,
                        ..duplex_local::BatchConfig::default()
                    },
                )
                .map_err(failed("language model"))?
                .with_meter(meter.clone());
            llm.set_observer(observer.clone());
            loaded("llm", t);
            Arc::new(llm)
        }
        LlmEngine::Default | LlmEngine::Scripted => Arc::new(ScriptedLlm::new(scripted.clone())),
        LlmEngine::OpenAi => {
            let endpoints: Vec<Arc<dyn LanguageModel>> = cloud
                .llm_endpoints
                .iter()
                .map(|e| {
                    Arc::new(OpenAiLlm::with_timeouts(
                        OpenAiEndpoint {
                            name: e.name.clone(),
                            base_url: e.base_url.clone(),
                            api_key: e.api_key.clone(),
                            model: e.model.clone(),
                        },
                        meter.clone(),
                        cloud.connect_timeout,
                        cloud.read_timeout,
                    )) as Arc<dyn LanguageModel>
                })
                .collect();
            let router = RouterConfig {
                first_token_timeout: cloud.llm_first_token_timeout,
                idle_timeout: cloud.llm_idle_timeout,
                retries: cloud.llm_retries,
                breaker: BreakerConfig {
                    failure_threshold: cloud.llm_breaker_failures,
                    cool_down: cloud.llm_breaker_cool_down,
                },
                cache_ttl: cloud.llm_cache_ttl,
                ..RouterConfig::default()
            };
            Arc::new(
                LlmRouter::new(endpoints, cloud.llm_routes.clone(), router)
                    .expect("config.rs validated endpoints and routes")
                    .with_observer(observer.clone()),
            )
        }
    };

    let tts: Arc<dyn TextToSpeech> = match tts_engine {
        TtsEngine::Local => {
            let t = std::time::Instant::now();
            let tts = models.load_piper(&gate).map_err(failed("voice"))?;
            // espeak-ng is there: Piper phonemizes with it.
            let espeak = models.load_espeak(&gate).map_err(failed("voice"))?;
            let tts = tts.with_fallback(&espeak);
            tts.set_observer(observer.clone());
            loaded("piper", t);
            Arc::new(tts)
        }
        TtsEngine::Espeak => {
            let espeak = models.load_espeak(&gate).map_err(failed("voice"))?;
            espeak.set_observer(observer.clone());
            Arc::new(espeak)
        }
        TtsEngine::Default | TtsEngine::Scripted => Arc::new(ScriptedTts::new(scripted)),
        TtsEngine::Azure => {
            let mut c =
                AzureTtsConfig::new(key(&cloud.azure_speech_key), &cloud.azure_speech_region);
            c.endpoint = cloud.azure_speech_endpoint.clone();
            c.voice = cloud.azure_speech_voice.clone();
            c.connect_timeout = cloud.connect_timeout;
            c.read_timeout = cloud.read_timeout;
            Arc::new(AzureTts::new(c, meter.clone()))
        }
        TtsEngine::ElevenLabs => {
            let mut c =
                ElevenLabsConfig::new(key(&cloud.elevenlabs_api_key), &cloud.elevenlabs_voice_id);
            c.base_url = cloud.elevenlabs_base_url.clone();
            c.model_id = cloud.elevenlabs_model.clone();
            c.connect_timeout = cloud.connect_timeout;
            c.send_timeout = cloud.send_timeout;
            c.response_timeout = cloud.elevenlabs_response_timeout;
            Arc::new(ElevenLabsTts::new(c, meter.clone()))
        }
        TtsEngine::OpenAi => {
            let mut c = OpenAiTtsConfig::new(key(&cloud.openai_api_key));
            c.base_url = cloud.openai_base_url.clone();
            c.model = cloud.openai_tts_model.clone();
            c.voice = cloud.openai_tts_voice.clone();
            c.connect_timeout = cloud.connect_timeout;
            c.read_timeout = cloud.read_timeout;
            Arc::new(OpenAiTts::new(c, meter))
        }
    };
    Ok(Some(ProviderSet { stt, llm, tts }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn names(pairs: &[(&str, &str)]) -> Option<[String; 3]> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let config = crate::Config::from_lookup(|k| map.get(k).cloned()).expect("valid");
        build(
            &config.engines,
            config.turns.max_turn,
            Arc::new(duplex_providers::usage::NullSink),
            Arc::new(crate::Metrics::new()),
        )
        .expect("no local engine is asked for")
        .map(|p| {
            [
                p.stt.name().to_owned(),
                p.llm.name().to_owned(),
                p.tts.name().to_owned(),
            ]
        })
    }

    #[tokio::test]
    async fn engines_follow_the_config() {
        let scripted = ("DUPLEX_PROVIDERS", "scripted");
        assert_eq!(
            names(&[scripted]).unwrap(),
            ["scripted", "scripted", "scripted"]
        );
        assert_eq!(names(&[("DUPLEX_PROVIDERS", "echo")]), None);
        assert_eq!(
            names(&[
                ("DEEPGRAM_API_KEY", "d"),
                ("OPENAI_API_KEY", "o"),
                ("AZURE_SPEECH_KEY", "a"),
                ("AZURE_SPEECH_REGION", "westeurope"),
            ])
            .unwrap(),
            ["deepgram", "openai", "azure"]
        );
        assert_eq!(
            names(&[
                ("OPENAI_API_KEY", "o"),
                (
                    "LLM_ENDPOINTS",
                    "groq|https://api.groq.com/openai/v1|llama|g"
                ),
                ("ELEVENLABS_API_KEY", "e"),
            ])
            .unwrap(),
            ["openai", "router", "elevenlabs"]
        );
    }
}
