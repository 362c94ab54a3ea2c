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
    let _engines = LOCAL_ENGINES.lock().await;
    let ts = TestServer::start(config).await;
    let before = ts.http("/metrics").await.1;
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
    // The local engines' own series: each engine ran a job, the LLM decoded steps and
    // generated at least the answer's tokens, nothing runs now.
    for engine in ["stt", "llm", "tts"] {
        let count = format!(r#"duplex_local_queue_wait_seconds_count{{engine="{engine}"}}"#);
        assert_eq!(sample(&before, &count), 0.0, "{before}");
        assert!(sample(&metrics, &count) >= 1.0, "{metrics}");
    }
    assert_eq!(sample(&before, "duplex_local_llm_tokens_total"), 0.0);
    assert!(
        sample(&metrics, "duplex_local_llm_tokens_total") >= tokens,
        "{metrics}"
    );
    assert!(
        sample(&metrics, "duplex_local_llm_batch_size_count") >= tokens,
        "{metrics}"
    );
    assert_eq!(sample(&metrics, "duplex_local_llm_active_sequences"), 0.0);
    assert_eq!(
        sample(&metrics, "duplex_local_stt_queue_dropped_total"),
        0.0
    );
}

/// The value of the series `name` (with its labels) in a Prometheus text exposition.
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in {metrics}"))
        .parse()
        .unwrap()
}

/// Three conversations at once on the embedded engines (the LLM decodes them in one batch):
/// all get their answers, and one of them barging in on its own answer does not stall the
/// other two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sessions_asking_at_once_all_get_answers_and_a_barge_in_stalls_no_one() {
    let Some(config) = local_config() else { return };
    let _engines = LOCAL_ENGINES.lock().await;
    let ts = TestServer::start(config).await;
    let base = |turns: usize| {
        let mut cfg = SessionConfig::new(ts.url());
        // Debug builds on two shared cores: generous bounds; the benchmark measures speed.
        cfg.turn_timeout = Duration::from_secs(150);
        cfg.ready_timeout = Duration::from_secs(30);
        cfg.turns = turns;
        cfg
    };
    let france = [piper_speech("What is the capital of France?")];
    let week = [piper_speech("How many days are in a week?")];
    let story = [
        piper_speech("Tell me a long story about a dragon."),
        piper_speech("What color is the sky on a clear day?"),
    ];
    let (a_cfg, b_cfg) = (base(1), base(1));
    let mut c_cfg = base(2);
    // The third user interrupts the story with the next question once it is audible.
    c_cfg.barge_in_after_ms = Some(300);
    let (a, b, c) = tokio::join!(
        run_session(&a_cfg, &france),
        run_session(&b_cfg, &week),
        run_session(&c_cfg, &story),
    );
    for (name, r) in [("france", &a), ("week", &b), ("story", &c)] {
        assert!(r.ok, "{name}: {r:#?}");
    }
    let answer = |r: &duplex_replay::SessionReport, i: usize| {
        r.turns[i]
            .assistant_text
            .clone()
            .unwrap_or_default()
            .to_lowercase()
    };
    assert_eq!(a.turns[0].outcome, TurnOutcome::Completed, "{a:#?}");
    assert!(answer(&a, 0).contains("paris"), "{:?}", answer(&a, 0));
    assert_eq!(b.turns[0].outcome, TurnOutcome::Completed, "{b:#?}");
    let week_answer = answer(&b, 0);
    assert!(
        week_answer.contains("seven") || week_answer.contains('7'),
        "{week_answer:?}"
    );
    assert_eq!(c.turns[0].outcome, TurnOutcome::Interrupted, "{c:#?}");
    assert_eq!(c.turns[1].outcome, TurnOutcome::Completed, "{c:#?}");
    // The question that interrupted was heard and answered (what a 0.5B model says about the
    // sky after half a dragon story varies: "blue", "white"...).
    let heard = c.turns[1].user_transcript.as_deref().unwrap_or_default();
    assert!(
        wer("What color is the sky on a clear day?", heard) <= 0.5,
        "heard {heard:?}"
    );
    assert!(!answer(&c, 1).trim().is_empty(), "{c:#?}");
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
