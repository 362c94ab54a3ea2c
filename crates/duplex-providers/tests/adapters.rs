//! The cloud adapters against the fakes of `duplex-testkit`, which speak the vendors' wire
//! protocols on loopback: happy paths, every fault mode, failover, breakers, KeepAlive,
//! cancellation and usage records.

use std::sync::Arc;
use std::time::Duration;

use duplex_providers::azure::{AzureTts, AzureTtsConfig};
use duplex_providers::deepgram::{DeepgramConfig, DeepgramStt};
use duplex_providers::elevenlabs::{ElevenLabsConfig, ElevenLabsTts};
use duplex_providers::openai::{
    OpenAiEndpoint, OpenAiLlm, OpenAiStt, OpenAiSttConfig, OpenAiTts, OpenAiTtsConfig,
};
use duplex_providers::router::{BreakerConfig, BreakerState, LlmRouter, RouterConfig};
use duplex_providers::usage::MemorySink;
use duplex_providers::{
    ChatMessage, LanguageModel, LlmEvent, LlmRequest, Meter, PriceTable, ProviderError, Role,
    SpeechToText, SttEvent, SttInput, SttParams, TextToSpeech, TtsEvent, TtsInput, TtsParams,
    UsageKind,
};
use duplex_testkit::openai::{Api, Fault, OpenAiFake};
use duplex_testkit::{eventually, tone_for_text, within};
use futures::StreamExt;

const LIMIT: Duration = Duration::from_secs(10);

fn meter() -> (Meter, Arc<MemorySink>) {
    let sink = Arc::new(MemorySink::default());
    (
        Meter::new(sink.clone(), Arc::new(PriceTable::defaults())),
        sink,
    )
}

fn stt_params() -> SttParams {
    SttParams {
        sample_rate: 16000,
        language: None,
        session_id: "sess".into(),
    }
}

fn tts_params() -> TtsParams {
    TtsParams {
        session_id: "sess".into(),
        voice: None,
        language: None,
        preferred_sample_rate: 16000,
    }
}

fn request(text: &str) -> LlmRequest {
    LlmRequest {
        session_id: "sess".into(),
        model: None,
        messages: vec![
            ChatMessage::new(Role::System, "Be brief."),
            ChatMessage::new(Role::User, text),
        ],
        max_tokens: None,
        plan: None,
        budget_remaining_usd: None,
    }
}

/// 20 ms of a loud square wave at 16 kHz.
fn loud_frame() -> Vec<i16> {
    (0..320)
        .map(|i| if (i / 20) % 2 == 0 { 6000 } else { -6000 })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Deepgram
// ---------------------------------------------------------------------------------------------

mod deepgram {
    use super::*;
    use duplex_testkit::deepgram::{DeepgramFake, REQUIRED_PARAMS};

    fn config(fake: &DeepgramFake, key: &str) -> DeepgramConfig {
        let mut c = DeepgramConfig::new(key);
        c.base_url = fake.base_url();
        c
    }

    #[tokio::test]
    async fn transcribes_with_interims_and_one_final_per_finalize() {
        within(LIMIT, async {
            let fake = DeepgramFake::start("dg-key", &["what is the weather like in paris"]).await;
            fake.set_ms_per_word(60);
            let (meter, sink) = meter();
            let stt = DeepgramStt::new(config(&fake, "dg-key"), meter);
            let mut s = stt.open(stt_params());
            for _ in 0..30 {
                s.input.send(SttInput::Audio(loud_frame())).await.unwrap();
            }
            s.input.send(SttInput::Finalize).await.unwrap();
            let mut events = Vec::new();
            while let Some(ev) = s.events.recv().await {
                let last = matches!(ev, SttEvent::Final { .. } | SttEvent::Error(_));
                events.push(ev);
                if last {
                    break;
                }
            }
            assert_eq!(events.first(), Some(&SttEvent::SpeechStarted), "{events:?}");
            let interims: Vec<&str> = events
                .iter()
                .filter_map(|e| match e {
                    SttEvent::Interim { text } => Some(text.as_str()),
                    _ => None,
                })
                .collect();
            assert!(interims.len() >= 3, "{events:?}");
            assert_eq!(interims[0], "what");
            // After the mid-utterance final segment, interims keep its words in front.
            assert!(
                interims
                    .iter()
                    .any(|t| t.starts_with("what is the weather like"))
            );
            assert_eq!(
                events.last(),
                Some(&SttEvent::Final {
                    text: "what is the weather like in paris".into()
                })
            );
            let conn = &fake.connections()[0];
            for p in REQUIRED_PARAMS {
                assert!(conn.query.contains_key(*p), "missing {p}");
            }
            assert_eq!(conn.query["encoding"], "linear16");
            assert_eq!(conn.query["sample_rate"], "16000");
            assert_eq!(conn.query["model"], "nova-3");
            assert_eq!(conn.audio_bytes, 30 * 640);
            assert_eq!(conn.finalizes, 1);
            // 0.6 s of audio metered at Finalize.
            let secs = sink.total(UsageKind::SttSeconds);
            assert!((secs - 0.6).abs() < 1e-9, "{secs}");
            assert!(sink.records()[0].cost_usd > 0.0);
            // Dropping the stream ends it with CloseStream (answered by Metadata + close).
            drop(s);
            assert!(
                eventually(LIMIT, || fake.connections()[0].closed).await,
                "closed"
            );
            assert_eq!(fake.connections()[0].close_streams, 1);
        })
        .await;
    }

    #[tokio::test]
    async fn silence_gives_an_empty_final() {
        within(LIMIT, async {
            let fake = DeepgramFake::start("k", &["never heard"]).await;
            let stt = DeepgramStt::new(config(&fake, "k"), Meter::none());
            let mut s = stt.open(stt_params());
            s.input.send(SttInput::Audio(vec![0; 320])).await.unwrap();
            s.input.send(SttInput::Finalize).await.unwrap();
            assert_eq!(
                s.events.recv().await,
                Some(SttEvent::Final {
                    text: String::new()
                })
            );
        })
        .await;
    }

    #[tokio::test]
    async fn keepalive_holds_an_idle_stream_open_and_its_absence_is_an_error() {
        within(LIMIT, async {
            let fake = DeepgramFake::start("k", &["hi"]).await;
            fake.set_timeout(Duration::from_millis(400));
            let mut with = config(&fake, "k");
            with.keepalive_interval = Duration::from_millis(100);
            let stt = DeepgramStt::new(with, Meter::none());
            let mut kept = stt.open(stt_params());
            let mut without = config(&fake, "k");
            without.keepalive_interval = Duration::from_secs(60);
            let stt = DeepgramStt::new(without, Meter::none());
            let mut dropped = stt.open(stt_params());
            // The stream without KeepAlive is closed by the fake with NET-0001.
            match dropped.events.recv().await {
                Some(SttEvent::Error(ProviderError::Closed(why))) => {
                    assert!(why.contains("1011") && why.contains("NET-0001"), "{why}")
                }
                other => panic!("expected a close error, got {other:?}"),
            }
            tokio::time::sleep(Duration::from_millis(600)).await;
            assert!(
                kept.events.try_recv().is_err(),
                "no error on the kept stream"
            );
            let conns = fake.connections();
            let kept_conn = conns.iter().find(|c| c.keepalives > 0).expect("keepalives");
            assert!(kept_conn.keepalives >= 5, "{kept_conn:?}");
            assert!(!kept_conn.timed_out);
            assert_eq!(conns.iter().filter(|c| c.timed_out).count(), 1);
            // The kept stream still recognises speech.
            for _ in 0..20 {
                kept.input
                    .send(SttInput::Audio(loud_frame()))
                    .await
                    .unwrap();
            }
            kept.input.send(SttInput::Finalize).await.unwrap();
            loop {
                match kept.events.recv().await.expect("events") {
                    SttEvent::Final { text } => {
                        assert_eq!(text, "hi");
                        break;
                    }
                    SttEvent::Error(e) => panic!("{e}"),
                    _ => {}
                }
            }
        })
        .await;
    }

    #[tokio::test]
    async fn a_bad_key_is_an_http_error_value() {
        within(LIMIT, async {
            let fake = DeepgramFake::start("right", &["x"]).await;
            let stt = DeepgramStt::new(config(&fake, "wrong"), Meter::none());
            let mut s = stt.open(stt_params());
            assert!(matches!(
                s.events.recv().await,
                Some(SttEvent::Error(ProviderError::Http { status: 401, .. }))
            ));
        })
        .await;
    }
}

// ---------------------------------------------------------------------------------------------
// OpenAI LLM and the router
// ---------------------------------------------------------------------------------------------

const REPLY: &str = "Paris is sunny today. Enjoy it!";

fn endpoint(fake: &OpenAiFake, name: &str) -> OpenAiEndpoint {
    OpenAiEndpoint {
        name: name.into(),
        base_url: fake.base_url(),
        api_key: "sk-test".into(),
        model: "gpt-4o-mini".into(),
    }
}

async fn collect(
    mut s: duplex_providers::LlmStream,
) -> (String, Vec<Result<LlmEvent, ProviderError>>) {
    let mut text = String::new();
    let mut items = Vec::new();
    while let Some(item) = s.next().await {
        if let Ok(LlmEvent::Delta(d)) = &item {
            text.push_str(d);
        }
        items.push(item);
    }
    (text, items)
}

fn fast_router() -> RouterConfig {
    RouterConfig {
        first_token_timeout: Duration::from_millis(500),
        idle_timeout: Duration::from_millis(500),
        retries: 0,
        backoff_base: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
        breaker: BreakerConfig {
            failure_threshold: 2,
            cool_down: Duration::from_millis(400),
        },
        cache_ttl: None,
        cache_capacity: 10,
    }
}

/// Primary and backup endpoints on two fakes.
async fn two_fakes() -> (OpenAiFake, OpenAiFake, LlmRouter) {
    let primary = OpenAiFake::start("sk-test", REPLY).await;
    let backup = OpenAiFake::start("sk-test", "Backup answer.").await;
    let router = LlmRouter::new(
        vec![
            Arc::new(OpenAiLlm::new(endpoint(&primary, "primary"), Meter::none())),
            Arc::new(OpenAiLlm::new(endpoint(&backup, "backup"), Meter::none())),
        ],
        vec![],
        fast_router(),
    )
    .unwrap();
    (primary, backup, router)
}

#[tokio::test]
async fn llm_streams_sse_with_usage_and_records_cost() {
    within(LIMIT, async {
        let fake = OpenAiFake::start("sk-test", REPLY).await;
        let (meter, sink) = meter();
        let llm = OpenAiLlm::new(endpoint(&fake, "openai"), meter);
        let (text, items) = collect(llm.stream(request("Weather in Paris?"))).await;
        assert_eq!(text, REPLY);
        match items.last() {
            Some(Ok(LlmEvent::Done {
                usage: Some(u),
                model,
            })) => {
                assert_eq!(model, "gpt-4o-mini");
                assert_eq!(u.completion_tokens, 6);
                assert_eq!(
                    u.prompt_tokens,
                    ("Be brief.".len() + "Weather in Paris?".len()) as u32 / 4
                );
            }
            other => panic!("{other:?}"),
        }
        let req = &fake.requests_to(Api::Chat)[0];
        assert_eq!(req.authorization.as_deref(), Some("Bearer sk-test"));
        assert_eq!(req.body["stream"], true);
        assert_eq!(req.body["stream_options"]["include_usage"], true);
        assert_eq!(req.body["model"], "gpt-4o-mini");
        assert_eq!(req.body["messages"][0]["role"], "system");
        assert_eq!(req.body["messages"][1]["content"], "Weather in Paris?");
        assert_eq!(sink.total(UsageKind::LlmCompletionTokens), 6.0);
        let cost: f64 = sink.records().iter().map(|r| r.cost_usd).sum();
        assert!(cost > 0.0 && cost < 0.001, "{cost}");
        assert_eq!(fake.completed_streams(), 1);
    })
    .await;
}

#[tokio::test]
async fn router_fails_over_on_429_500_hang_and_malformed_before_the_first_token() {
    within(LIMIT, async {
        for fault in [
            Fault::RateLimited {
                retry_after_secs: 7,
            },
            Fault::ServerError,
            Fault::HangBeforeFirstByte,
            Fault::MalformedAfter(0),
            Fault::DisconnectAfter(0),
        ] {
            let (primary, backup, router) = two_fakes().await;
            primary.push_fault(Api::Chat, fault.clone());
            let (text, items) = collect(router.stream(request("hi"))).await;
            assert_eq!(text, "Backup answer.", "{fault:?}: {items:?}");
            assert!(matches!(items.last(), Some(Ok(LlmEvent::Done { .. }))));
            assert_eq!(primary.requests_to(Api::Chat).len(), 1, "{fault:?}");
            assert_eq!(backup.requests_to(Api::Chat).len(), 1, "{fault:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn after_the_first_token_a_failure_is_an_error_item_not_a_failover() {
    within(LIMIT, async {
        for fault in [Fault::DisconnectAfter(2), Fault::MalformedAfter(2)] {
            let (primary, backup, router) = two_fakes().await;
            primary.push_fault(Api::Chat, fault.clone());
            let (text, items) = collect(router.stream(request("hi"))).await;
            assert_eq!(text, "Paris is ", "{fault:?}");
            assert!(items.last().unwrap().is_err(), "{fault:?}: {items:?}");
            assert_eq!(backup.requests_to(Api::Chat).len(), 0);
        }
    })
    .await;
}

#[tokio::test]
async fn when_every_endpoint_fails_the_error_names_them_all() {
    within(LIMIT, async {
        let (primary, backup, router) = two_fakes().await;
        primary.push_fault(Api::Chat, Fault::ServerError);
        backup.push_fault(
            Api::Chat,
            Fault::RateLimited {
                retry_after_secs: 1,
            },
        );
        let (text, items) = collect(router.stream(request("hi"))).await;
        assert_eq!(text, "");
        match &items[..] {
            [Err(ProviderError::Connect(m))] => {
                assert!(
                    m.contains("primary: HTTP 500") && m.contains("backup: rate limited"),
                    "{m}"
                )
            }
            other => panic!("{other:?}"),
        }
    })
    .await;
}

#[tokio::test]
async fn an_invalid_request_is_not_failed_over() {
    within(LIMIT, async {
        let (_primary, backup, router) = two_fakes().await;
        let mut req = request("hi");
        req.messages.clear(); // the fake, like OpenAI, answers 400
        let (_, items) = collect(router.stream(req)).await;
        assert!(
            matches!(items[..], [Err(ProviderError::Http { status: 400, .. })]),
            "{items:?}"
        );
        assert_eq!(backup.requests().len(), 0);
    })
    .await;
}

#[tokio::test]
async fn the_breaker_skips_a_failing_endpoint_then_probes_it_after_the_cool_down() {
    within(LIMIT, async {
        let (primary, backup, router) = two_fakes().await;
        primary.push_fault(Api::Chat, Fault::ServerError);
        primary.push_fault(Api::Chat, Fault::ServerError);
        for _ in 0..2 {
            let (text, _) = collect(router.stream(request("hi"))).await;
            assert_eq!(text, "Backup answer.");
        }
        assert_eq!(router.breaker_state("primary"), Some(BreakerState::Open));
        // Open: the primary is not even asked.
        let (text, _) = collect(router.stream(request("hi"))).await;
        assert_eq!(text, "Backup answer.");
        assert_eq!(primary.requests().len(), 2);
        assert_eq!(backup.requests().len(), 3);
        // After the cool-down one probe goes to the primary; it succeeds and closes the breaker.
        tokio::time::sleep(Duration::from_millis(450)).await;
        assert_eq!(
            router.breaker_state("primary"),
            Some(BreakerState::HalfOpen)
        );
        let (text, _) = collect(router.stream(request("hi"))).await;
        assert_eq!(text, REPLY);
        assert_eq!(router.breaker_state("primary"), Some(BreakerState::Closed));
    })
    .await;
}

#[tokio::test]
async fn retries_walk_the_chain_again_after_a_backoff() {
    within(LIMIT, async {
        let fake = OpenAiFake::start("sk-test", REPLY).await;
        fake.push_fault(Api::Chat, Fault::ServerError);
        let mk = |retries| {
            let mut c = fast_router();
            c.retries = retries;
            c.breaker.failure_threshold = 10;
            LlmRouter::new(
                vec![Arc::new(OpenAiLlm::new(
                    endpoint(&fake, "only"),
                    Meter::none(),
                ))],
                vec![],
                c,
            )
            .unwrap()
        };
        let (text, _) = collect(mk(1).stream(request("hi"))).await;
        assert_eq!(text, REPLY);
        assert_eq!(fake.requests().len(), 2);
        fake.push_fault(Api::Chat, Fault::ServerError);
        let (_, items) = collect(mk(0).stream(request("hi"))).await;
        assert!(items[0].is_err());
    })
    .await;
}

#[tokio::test]
async fn dropping_the_stream_closes_the_http_stream() {
    within(LIMIT, async {
        let fake = OpenAiFake::start("sk-test", &"word ".repeat(200)).await;
        fake.set_token_delay(Duration::from_millis(20));
        let router = LlmRouter::new(
            vec![Arc::new(OpenAiLlm::new(
                endpoint(&fake, "openai"),
                Meter::none(),
            ))],
            vec![],
            fast_router(),
        )
        .unwrap();
        let mut s = router.stream(request("talk a lot"));
        for _ in 0..2 {
            assert!(matches!(s.next().await, Some(Ok(LlmEvent::Delta(_)))));
        }
        drop(s);
        assert!(
            eventually(Duration::from_secs(3), || fake.disconnects() == 1).await,
            "the fake saw the client go away"
        );
        assert_eq!(fake.completed_streams(), 0);
    })
    .await;
}

#[tokio::test]
async fn the_cache_answers_identical_prompts_when_enabled() {
    within(LIMIT, async {
        let fake = OpenAiFake::start("sk-test", REPLY).await;
        let mut c = fast_router();
        c.cache_ttl = Some(Duration::from_secs(60));
        let router = LlmRouter::new(
            vec![Arc::new(OpenAiLlm::new(
                endpoint(&fake, "openai"),
                Meter::none(),
            ))],
            vec![],
            c,
        )
        .unwrap();
        for _ in 0..2 {
            let (text, items) = collect(router.stream(request("same"))).await;
            assert_eq!(text, REPLY);
            assert!(matches!(items.last(), Some(Ok(LlmEvent::Done { .. }))));
        }
        assert_eq!(fake.requests().len(), 1);
        let (text, _) = collect(router.stream(request("different"))).await;
        assert_eq!(text, REPLY);
        assert_eq!(fake.requests().len(), 2);
    })
    .await;
}

#[tokio::test]
async fn routes_pick_endpoints_by_plan() {
    within(LIMIT, async {
        let (primary, backup, _) = two_fakes().await;
        let router = LlmRouter::new(
            vec![
                Arc::new(OpenAiLlm::new(endpoint(&primary, "primary"), Meter::none())),
                Arc::new(OpenAiLlm::new(endpoint(&backup, "backup"), Meter::none())),
            ],
            duplex_providers::router::parse_routes("plan=free => backup; * => primary,backup")
                .unwrap(),
            fast_router(),
        )
        .unwrap();
        let mut free = request("hi");
        free.plan = Some("free".into());
        assert_eq!(collect(router.stream(free)).await.0, "Backup answer.");
        assert_eq!(collect(router.stream(request("hi"))).await.0, REPLY);
    })
    .await;
}

#[tokio::test]
async fn a_client_model_outside_the_plans_route_is_not_used() {
    within(LIMIT, async {
        let (primary, backup, _) = two_fakes().await;
        let router = LlmRouter::new(
            vec![
                Arc::new(OpenAiLlm::new(endpoint(&primary, "primary"), Meter::none())),
                Arc::new(OpenAiLlm::new(endpoint(&backup, "backup"), Meter::none())),
            ],
            duplex_providers::router::parse_routes("plan=free => backup; * => primary,backup")
                .unwrap(),
            fast_router(),
        )
        .unwrap();
        // A free session asking for the paid plans' endpoint still gets the free route.
        let mut free = request("hi");
        free.plan = Some("free".into());
        free.model = Some("primary".into());
        assert_eq!(collect(router.stream(free)).await.0, "Backup answer.");
        assert_eq!(primary.requests().len(), 0);
        let err = router.check_model(Some("free"), "primary").unwrap_err();
        assert_eq!(
            err,
            "model \"primary\" is not available on this plan (available: backup); the plan's default applies"
        );
        assert!(router.check_model(Some("free"), "backup").is_ok());
        // Within the plan's chain the client's choice goes first.
        let mut pro = request("hi");
        pro.plan = Some("pro".into());
        pro.model = Some("backup".into());
        assert_eq!(collect(router.stream(pro)).await.0, "Backup answer.");
        assert!(router.check_model(Some("pro"), "primary").is_ok());
        let long = "x".repeat(500);
        assert!(router.check_model(Some("pro"), &long).unwrap_err().len() < 200);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// TTS adapters
// ---------------------------------------------------------------------------------------------

/// Sends chunks and End; returns (samples per index, done indices, rate, error).
async fn synthesize(
    tts: &dyn TextToSpeech,
    chunks: &[&str],
) -> (Vec<usize>, Vec<u32>, u32, Option<ProviderError>) {
    let mut s = tts.open(tts_params());
    for (i, c) in chunks.iter().enumerate() {
        s.input
            .send(TtsInput::Text {
                index: i as u32,
                text: c.to_string(),
            })
            .await
            .unwrap();
    }
    s.input.send(TtsInput::End).await.unwrap();
    let mut samples = vec![0; chunks.len()];
    let mut done = Vec::new();
    let mut rate = 0;
    while let Some(ev) = s.events.recv().await {
        match ev {
            TtsEvent::Audio {
                index,
                samples: a,
                sample_rate,
            } => {
                assert!(!done.contains(&index), "audio after ChunkDone of {index}");
                samples[index as usize] += a.len();
                rate = sample_rate;
            }
            TtsEvent::ChunkDone { index } => done.push(index),
            TtsEvent::Finished => return (samples, done, rate, None),
            TtsEvent::Error(e) => return (samples, done, rate, Some(e)),
        }
    }
    panic!("stream ended without Finished");
}

const CHUNKS: &[&str] = &["Hello there.", "Fish & chips <today>?"];

#[tokio::test]
async fn http_tts_and_transcription_fail_on_a_silent_server_after_the_read_timeout() {
    within(LIMIT, async {
        let fake = OpenAiFake::start("sk-test", "").await;
        let mut c = OpenAiTtsConfig::new("sk-test");
        c.base_url = fake.base_url();
        c.read_timeout = Duration::from_millis(300);
        let tts = OpenAiTts::new(c, Meter::none());
        // The fake accepts the request and never sends a byte.
        fake.push_fault(Api::Speech, Fault::HangBeforeFirstByte);
        let started = std::time::Instant::now();
        let (_, _, _, err) = synthesize(&tts, CHUNKS).await;
        let waited = started.elapsed();
        match err {
            Some(ProviderError::Timeout(m)) => assert!(m.contains("read timeout"), "{m}"),
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
            "{waited:?}"
        );

        let mut c = OpenAiSttConfig::new("sk-test");
        c.base_url = fake.base_url();
        c.read_timeout = Duration::from_millis(300);
        let stt = OpenAiStt::new(c, Meter::none());
        fake.push_fault(Api::Transcriptions, Fault::HangBeforeFirstByte);
        let mut s = stt.open(stt_params());
        for _ in 0..50 {
            s.input.send(SttInput::Audio(loud_frame())).await.unwrap();
        }
        s.input.send(SttInput::Finalize).await.unwrap();
        match s.events.recv().await {
            Some(SttEvent::Error(ProviderError::Timeout(_))) => {}
            other => panic!("expected a timeout, got {other:?}"),
        }
    })
    .await;
}

#[tokio::test]
async fn openai_tts_streams_pcm_per_chunk() {
    within(LIMIT, async {
        let fake = OpenAiFake::start("sk-test", "").await;
        let mut c = OpenAiTtsConfig::new("sk-test");
        c.base_url = fake.base_url();
        let (meter, sink) = meter();
        let tts = OpenAiTts::new(c, meter);
        let (samples, done, rate, err) = synthesize(&tts, CHUNKS).await;
        assert_eq!(err, None);
        assert_eq!(rate, 24000);
        assert_eq!(done, [0, 1]);
        for (i, c) in CHUNKS.iter().enumerate() {
            assert_eq!(samples[i], tone_for_text(c, 24000).len());
        }
        let reqs = fake.requests_to(Api::Speech);
        assert_eq!(reqs[1].body["input"], CHUNKS[1]);
        assert_eq!(reqs[1].body["response_format"], "pcm");
        assert_eq!(reqs[1].body["voice"], "alloy");
        let chars = (CHUNKS[0].len() + CHUNKS[1].len()) as f64;
        assert_eq!(sink.total(UsageKind::TtsCharacters), chars);

        fake.push_fault(Api::Speech, Fault::ServerError);
        let (_, _, _, err) = synthesize(&tts, CHUNKS).await;
        assert!(
            matches!(err, Some(ProviderError::Http { status: 500, .. })),
            "{err:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn elevenlabs_streams_base64_audio_and_follows_stream_input() {
    use duplex_testkit::elevenlabs::ElevenLabsFake;
    within(LIMIT, async {
        let fake = ElevenLabsFake::start("xi-key").await;
        let mut c = ElevenLabsConfig::new("xi-key", "voice-1");
        c.base_url = fake.base_url();
        let (meter, sink) = meter();
        let tts = ElevenLabsTts::new(c, meter);
        let (samples, done, rate, err) = synthesize(&tts, CHUNKS).await;
        assert_eq!(err, None);
        assert_eq!((rate, done), (16000, vec![0, 1]));
        for (i, c) in CHUNKS.iter().enumerate() {
            assert_eq!(samples[i], tone_for_text(c, 16000).len(), "chunk {i}");
        }
        let conn = &fake.connections()[0];
        assert_eq!(conn.voice_id, "voice-1");
        assert_eq!(conn.query["output_format"], "pcm_16000");
        assert_eq!(conn.query["model_id"], "eleven_flash_v2_5");
        assert_eq!(conn.header_key.as_deref(), Some("xi-key"));
        let m = &conn.messages;
        assert_eq!(m[0]["text"], " ");
        assert!(m[0]["voice_settings"]["stability"].is_number());
        assert_eq!(m[1]["text"], "Hello there. ");
        assert_eq!(m[1]["flush"], true);
        assert_eq!(m.last().unwrap()["text"], "");
        assert!(conn.finished);
        assert!(sink.total(UsageKind::TtsCharacters) > 0.0);

        let mut bad = ElevenLabsConfig::new("nope", "voice-1");
        bad.base_url = fake.base_url();
        let (_, _, _, err) = synthesize(&ElevenLabsTts::new(bad, Meter::none()), CHUNKS).await;
        match err {
            Some(ProviderError::Closed(why)) => assert!(why.contains("1008"), "{why}"),
            other => panic!("{other:?}"),
        }
    })
    .await;
}

#[tokio::test]
async fn azure_posts_ssml_with_the_documented_headers() {
    use duplex_testkit::azure::AzureFake;
    within(LIMIT, async {
        let fake = AzureFake::start("az-key").await;
        let mut c = AzureTtsConfig::new("az-key", "westeurope");
        c.endpoint = Some(fake.endpoint());
        let (meter, sink) = meter();
        let tts = AzureTts::new(c, meter);
        let (samples, done, rate, err) = synthesize(&tts, CHUNKS).await;
        assert_eq!(err, None, "{:?}", fake.rejected());
        assert_eq!((rate, done), (24000, vec![0, 1]));
        assert_eq!(samples[1], tone_for_text(CHUNKS[1], 24000).len());
        let r = &fake.requests()[1];
        assert_eq!(r.text, CHUNKS[1]);
        assert_eq!(r.voice, "en-US-AvaMultilingualNeural");
        assert_eq!(r.language, "en-US");
        assert_eq!(r.output_format, "raw-24khz-16bit-mono-pcm");
        assert!(r.user_agent.starts_with("duplex/"));
        assert!(r.ssml.contains("Fish &amp; chips &lt;today&gt;?"));
        assert_eq!(sink.records()[0].provider, "azure");

        let mut bad = AzureTtsConfig::new("wrong", "westeurope");
        bad.endpoint = Some(fake.endpoint());
        let (_, _, _, err) = synthesize(&AzureTts::new(bad, Meter::none()), CHUNKS).await;
        assert!(
            matches!(err, Some(ProviderError::Http { status: 401, .. })),
            "{err:?}"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// OpenAI transcription
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn openai_stt_uploads_each_utterance_as_wav() {
    within(LIMIT, async {
        let fake = OpenAiFake::start("sk-test", "").await;
        fake.set_transcript("what time is it");
        let mut c = OpenAiSttConfig::new("sk-test");
        c.base_url = fake.base_url();
        let (meter, sink) = meter();
        let stt = OpenAiStt::new(c, meter);
        let mut params = stt_params();
        params.language = Some("en-US".into());
        let mut s = stt.open(params);
        for _ in 0..50 {
            s.input.send(SttInput::Audio(loud_frame())).await.unwrap();
        }
        s.input.send(SttInput::Finalize).await.unwrap();
        assert_eq!(
            s.events.recv().await,
            Some(SttEvent::Final {
                text: "what time is it".into()
            })
        );
        let r = &fake.requests_to(Api::Transcriptions)[0];
        assert_eq!(r.wav_seconds, Some(1.0));
        assert_eq!(r.body["model"], "whisper-1");
        assert_eq!(r.body["language"], "en");
        assert_eq!(r.body["filename"], "utterance.wav");
        assert_eq!(sink.total(UsageKind::SttSeconds), 1.0);
        // A too-short utterance is not uploaded.
        s.input.send(SttInput::Finalize).await.unwrap();
        assert_eq!(
            s.events.recv().await,
            Some(SttEvent::Final {
                text: String::new()
            })
        );
        assert_eq!(fake.requests().len(), 1);
        // A failing upload is an error value.
        fake.push_fault(
            Api::Transcriptions,
            Fault::RateLimited {
                retry_after_secs: 3,
            },
        );
        for _ in 0..10 {
            s.input.send(SttInput::Audio(loud_frame())).await.unwrap();
        }
        s.input.send(SttInput::Finalize).await.unwrap();
        match s.events.recv().await {
            Some(SttEvent::Error(ProviderError::RateLimited(m))) => {
                assert!(m.contains("retry after 3"), "{m}")
            }
            other => panic!("{other:?}"),
        }
    })
    .await;
}
