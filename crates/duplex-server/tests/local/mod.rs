//! The server on its default, the embedded offline engines: a spoken question goes in, the
//! local Whisper transcribes it, the local language model answers, and the Piper voice speaks
//! the answer. These need the models (`scripts/setup-models.sh --test-data`, which
//! `scripts/test.sh` runs) and are gated by `DUPLEX_TEST_LOCAL=1`, which `scripts/test.sh`
//! sets; without it they say they were skipped. A missing model is tested without models.

use super::*;
use duplex_replay::wer::wer;

/// The question in the Piper voice at 16 kHz, 300 ms of silence before (espeak-ng's voice is
/// too robotic for Whisper tiny.en: it hears "the capital and friends").
pub(crate) fn piper_speech(text: &str) -> Wav {
    let dir = duplex_local::ModelDir::from_env();
    let mut voice = duplex_local::piper::PiperVoice::load(
        &dir.piper_voice(),
        &dir.onnxruntime(),
        duplex_local::models::compute_threads(),
    )
    .expect("the Piper voice loads");
    let samples = voice.synthesize(text).expect("Piper speaks");
    let mut r = duplex_audio::Resampler::new(voice.sample_rate, 16_000).unwrap();
    let mut out = vec![0i16; 16_000 * 3 / 10];
    r.process(&samples, &mut out);
    r.flush(&mut out);
    Wav::from_samples(text, 16_000, out).unwrap()
}

/// The local engines, or `None` (with a note) when local tests are not enabled.
pub(super) fn local_config() -> Option<Config> {
    if std::env::var("DUPLEX_TEST_LOCAL").as_deref() != Ok("1") {
        eprintln!("skipped: set DUPLEX_TEST_LOCAL=1 after scripts/setup-models.sh --test-data");
        return None;
    }
    let mut c = Config::for_tests();
    c.engines.providers = ProviderMode::Local;
    c.engines.models_dir = duplex_local::ModelDir::from_env().root().to_path_buf();
    Some(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoken_question_gets_a_spoken_answer_from_the_local_engines() {
    let Some(config) = local_config() else { return };
    let ts = TestServer::start(config).await;
    let question = "What is the capital of France?";
    let mut cfg = SessionConfig::new(ts.url());
    // Debug builds on two shared cores: generous bounds; the benchmark measures speed.
    cfg.turn_timeout = Duration::from_secs(120);
    cfg.ready_timeout = Duration::from_secs(30);
    cfg.record_timeline = true;
    let report = run_session(&cfg, &[piper_speech(question)]).await;
    assert!(report.ok, "{report:#?}");
    let turn = &report.turns[0];
    eprintln!("{:#?}", turn.metrics);
    let heard = turn.user_transcript.as_deref().unwrap_or_default();
    assert!(wer(question, heard) <= 0.2, "Whisper heard {heard:?}");
    let answer = turn.assistant_text.as_deref().unwrap_or_default();
    assert!(
        answer.to_lowercase().contains("paris"),
        "the language model answered {answer:?}"
    );
    assert_eq!(turn.outcome, TurnOutcome::Completed, "{turn:#?}");
    // Speech, not a click: "The capital of France is Paris." is well over a second.
    assert!(turn.assistant_audio_ms > 1000, "{turn:#?}");
    let metrics = ts.http("/metrics").await.1;
    assert!(metrics.contains("duplex_turns_total 1"), "{metrics}");
    // The answer's tokens are counted like a cloud model's.
    let completion = metrics
        .lines()
        .find(|l| {
            l.starts_with("duplex_provider_usage_total")
                && l.contains(r#"provider="local""#)
                && l.contains("llm_completion_tokens")
        })
        .unwrap_or_else(|| panic!("no local completion tokens in {metrics}"));
    let tokens: f64 = completion.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(tokens >= 5.0, "{completion}");
    let rss = metrics
        .lines()
        .find_map(|l| l.strip_prefix("duplex_process_resident_memory_bytes "))
        .expect("resident memory on /metrics");
    // The models are loaded: hundreds of MB.
    assert!(rss.parse::<f64>().unwrap() > 200e6, "{rss}");
}

#[tokio::test]
async fn a_missing_model_stops_startup_with_the_file_and_the_fix() {
    let mut config = Config::for_tests();
    config.engines.providers = ProviderMode::Local;
    let empty = std::env::temp_dir().join(format!("duplex-no-models-{}", std::process::id()));
    config.engines.models_dir = empty.clone();
    let err = match Server::bind(config, Metrics::new()).await {
        Ok(_) => panic!("the server started without models"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(&empty.display().to_string()), "{err}");
    assert!(err.contains("scripts/setup-models.sh"), "{err}");
    assert!(err.contains("is missing"), "{err}");
}
