//! End to end with every cloud adapter: the real server, configured from environment-style
//! variables, runs spoken turns against the vendor fakes of `duplex-testkit` (Deepgram live
//! STT + an OpenAI-compatible LLM + each TTS vendor), over real sockets on loopback.

use std::collections::HashMap;
use std::time::Duration;

use duplex_proto::{ErrorCode, ServerMessage};
use duplex_replay::{SessionConfig, TurnOutcome, run_session};
use duplex_server::Config;
use duplex_testkit::azure::AzureFake;
use duplex_testkit::deepgram::DeepgramFake;
use duplex_testkit::elevenlabs::ElevenLabsFake;
use duplex_testkit::openai::{Api, Fault, OpenAiFake};
use duplex_testkit::within;

use super::{TestServer, speech};

const TRANSCRIPT: &str = "what is the weather like in paris";
const REPLY: &str = "It is sunny in Paris. Take a hat.";
const LIMIT: Duration = Duration::from_secs(20);

struct Fakes {
    deepgram: DeepgramFake,
    openai: OpenAiFake,
    elevenlabs: ElevenLabsFake,
    azure: AzureFake,
}

impl Fakes {
    async fn start() -> Fakes {
        Fakes {
            deepgram: DeepgramFake::start("dg-key", &[TRANSCRIPT]).await,
            openai: OpenAiFake::start("sk-key", REPLY).await,
            elevenlabs: ElevenLabsFake::start("xi-key").await,
            azure: AzureFake::start("az-key").await,
        }
    }

    /// The server's configuration, parsed from variables like an operator would set them.
    fn config(&self, tts: &str, extra: &[(&str, &str)]) -> Config {
        let mut vars: HashMap<String, String> = [
            ("DEEPGRAM_API_KEY", "dg-key".to_owned()),
            ("DEEPGRAM_BASE_URL", self.deepgram.base_url()),
            ("OPENAI_API_KEY", "sk-key".to_owned()),
            ("OPENAI_BASE_URL", self.openai.base_url()),
            ("ELEVENLABS_API_KEY", "xi-key".to_owned()),
            ("ELEVENLABS_BASE_URL", self.elevenlabs.base_url()),
            ("AZURE_SPEECH_KEY", "az-key".to_owned()),
            ("AZURE_SPEECH_ENDPOINT", self.azure.endpoint()),
            ("TTS_PROVIDER", tts.to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (k, v) in extra {
            vars.insert(k.to_string(), v.to_string());
        }
        let parsed = Config::from_lookup(|k| vars.get(k).cloned()).expect("valid config");
        let mut c = super::test_config();
        c.engines.cloud = parsed.engines.cloud;
        c
    }
}

async fn spoken_turns(ts: &TestServer, turns: usize) -> duplex_replay::SessionReport {
    let wav = speech("What is the weather like today in Paris?", 16000);
    let mut cfg = SessionConfig::new(ts.url());
    cfg.speed = 4.0;
    cfg.turns = turns;
    cfg.turn_timeout = Duration::from_secs(8);
    run_session(&cfg, &[wav]).await
}

async fn full_turn_with(tts: &str) {
    within(LIMIT, async {
        let fakes = Fakes::start().await;
        let ts = TestServer::start(fakes.config(tts, &[])).await;
        let report = spoken_turns(&ts, 1).await;
        assert!(report.errors.is_empty(), "{tts}: {:?}", report.errors);
        let turn = &report.turns[0];
        assert_eq!(turn.outcome, TurnOutcome::Completed, "{tts}: {turn:#?}");
        assert_eq!(turn.user_transcript.as_deref(), Some(TRANSCRIPT));
        assert_eq!(turn.assistant_text.as_deref(), Some(REPLY));
        // The fakes' voices: 40 ms per character of text.
        assert!(turn.assistant_audio_ms > 500, "{tts}: {turn:#?}");

        // Each vendor saw the protocol it expects.
        let dg = &fakes.deepgram.connections()[0];
        assert!(dg.audio_bytes > 0 && dg.finalizes >= 1, "{dg:?}");
        let chat = &fakes.openai.requests_to(Api::Chat)[0];
        assert_eq!(chat.body["stream_options"]["include_usage"], true);
        let last_user = chat.body["messages"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(last_user["content"], TRANSCRIPT);
        match tts {
            "azure" => assert_eq!(fakes.azure.requests().len(), 2, "two sentences"),
            "elevenlabs" => assert!(fakes.elevenlabs.connections()[0].finished),
            "openai" => assert_eq!(fakes.openai.requests_to(Api::Speech).len(), 2),
            _ => unreachable!(),
        }

        // Usage and cost reached the Prometheus counters.
        let (_, body) = ts.http("/metrics").await;
        let tts_model = match tts {
            "azure" => "neural",
            "elevenlabs" => "eleven_flash_v2_5",
            _ => "gpt-4o-mini-tts",
        };
        let tts_needle =
            format!("kind=\"tts_characters\",model=\"{tts_model}\",provider=\"{tts}\"");
        for needle in [
            "duplex_provider_usage_total{kind=\"stt_seconds\",model=\"nova-3\",provider=\"deepgram\"}",
            "duplex_provider_usage_total{kind=\"llm_completion_tokens\",model=\"gpt-4o-mini\",provider=\"openai\"}",
            "duplex_provider_cost_usd_total{model=\"gpt-4o-mini\",provider=\"openai\"}",
            &tts_needle,
        ] {
            assert!(body.contains(needle), "{tts}: {needle} missing in\n{body}");
        }
    })
    .await;
}

#[tokio::test]
async fn spoken_turn_through_deepgram_openai_and_azure() {
    full_turn_with("azure").await;
}

#[tokio::test]
async fn spoken_turn_through_deepgram_openai_and_elevenlabs() {
    full_turn_with("elevenlabs").await;
}

#[tokio::test]
async fn spoken_turn_through_deepgram_openai_and_openai_tts() {
    full_turn_with("openai").await;
}

#[tokio::test]
async fn an_llm_outage_is_an_error_event_and_the_next_turn_works() {
    within(LIMIT, async {
        let fakes = Fakes::start().await;
        let config = fakes.config("azure", &[("LLM_RETRIES", "0")]);
        fakes.openai.push_fault(Api::Chat, Fault::ServerError);
        let ts = TestServer::start(config).await;
        let report = spoken_turns(&ts, 2).await;
        assert_eq!(
            report.errors.get("llm_error"),
            Some(&1),
            "{:?}",
            report.errors
        );
        let last = report.turns.last().unwrap();
        assert_eq!(last.outcome, TurnOutcome::Completed, "{:#?}", report.turns);
        assert_eq!(last.assistant_text.as_deref(), Some(REPLY));
    })
    .await;
}

/// A recognizer that refuses every connection (here: a wrong Deepgram key, 401) is retried with
/// exponential backoff, each failure told to the client, instead of a reconnect loop per
/// session; the session itself keeps working.
#[tokio::test]
async fn a_failing_recognizer_is_retried_with_backoff_not_in_a_loop() {
    within(LIMIT, async {
        let fakes = Fakes::start().await;
        let ts =
            TestServer::start(fakes.config("openai", &[("DEEPGRAM_API_KEY", "wrong-key")])).await;
        let mut c = super::connect(&ts, 16000).await;
        // Backoff of 100 ms doubling (with jitter of up to half): failures at ~0, 0.1, 0.3,
        // 0.7, 1.5, 3.1 s. A loop without backoff fails hundreds of times in 3 s.
        tokio::time::sleep(Duration::from_secs(3)).await;
        super::still_alive(&mut c).await;
        let failures: Vec<String> = c
            .events()
            .iter()
            .filter_map(|e| match e.json() {
                Some(ServerMessage::Error(err)) if err.code == ErrorCode::SttError => {
                    Some(err.message.clone())
                }
                _ => None,
            })
            .collect();
        assert!(
            (3..=9).contains(&failures.len()),
            "{} failures: {failures:#?}",
            failures.len()
        );
        assert!(
            failures.iter().all(|m| m.contains("reconnecting in")),
            "{failures:#?}"
        );
        assert!(
            fakes.deepgram.connections().is_empty(),
            "the fake accepted a wrong key"
        );
    })
    .await;
}
