//! The llama.cpp engine on the real Qwen2.5 model: it answers and stops by itself, a second
//! turn reuses the first turn's KV cache (and still answers right), and the caller can stop
//! it between any two tokens.
//!
//! Gated like `tests/engines.rs`: needs the models (`scripts/setup-models.sh`) and
//! `DUPLEX_TEST_LOCAL=1`; without it each test says it was skipped. The model loads once per
//! test binary and tests take turns on it.

use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use duplex_local::llm::Speaker;
use duplex_local::{ComputeGate, GenParams, LlamaChat, LlmChoice, ModelDir, SPOKEN_SYSTEM_PROMPT};

/// The model, or `None` (with a note) when local tests are not enabled.
fn llama() -> Option<MutexGuard<'static, LlamaChat>> {
    static MODEL: OnceLock<Mutex<LlamaChat>> = OnceLock::new();
    if std::env::var("DUPLEX_TEST_LOCAL").as_deref() != Ok("1") {
        eprintln!("skipped: set DUPLEX_TEST_LOCAL=1 after scripts/setup-models.sh");
        return None;
    }
    let model = MODEL.get_or_init(|| {
        let dir = ModelDir::from_env();
        let path = dir
            .require(dir.llm(LlmChoice::Qwen05b))
            .unwrap_or_else(|e| panic!("{e}"));
        let t = Instant::now();
        let model = LlamaChat::load(&path, duplex_local::models::compute_threads())
            .unwrap_or_else(|e| panic!("{e}"));
        eprintln!("loaded {} in {:?}", model.name, t.elapsed());
        Mutex::new(model)
    });
    Some(model.lock().unwrap_or_else(|p| p.into_inner()))
}

fn greedy() -> GenParams {
    GenParams {
        temperature: 0.0,
        ..GenParams::default()
    }
}

/// Generates to the end; returns the text and the stats.
fn answer(
    llama: &mut LlamaChat,
    messages: &[(Speaker, &str)],
    params: &GenParams,
) -> (String, duplex_local::llm::GenStats) {
    let mut text = String::new();
    let t = Instant::now();
    let stats = llama
        .generate(messages, params, &ComputeGate::new(), |piece| {
            text.push_str(piece);
            true
        })
        .expect("generates");
    eprintln!("{text:?} in {:?}: {stats:?}", t.elapsed());
    (text, stats)
}

#[test]
fn answers_and_stops_at_a_stop_token() {
    let Some(mut llama) = llama() else { return };
    let params = GenParams::default();
    let messages = [
        (Speaker::System, SPOKEN_SYSTEM_PROMPT),
        (Speaker::User, "What is the capital of France?"),
    ];
    let (text, stats) = answer(&mut llama, &messages, &params);
    assert!(text.contains("Paris"), "answer: {text:?}");
    assert!(stats.stopped, "{stats:?}");
    assert!(stats.completion_tokens < params.max_tokens, "{stats:?}");
}

#[test]
fn a_second_turn_decodes_only_the_new_tail() {
    let Some(mut llama) = llama() else { return };
    let params = greedy();
    let q1 = "What is the capital of France?";
    let turn1 = [(Speaker::System, SPOKEN_SYSTEM_PROMPT), (Speaker::User, q1)];
    let (a1, _) = answer(&mut llama, &turn1, &params);
    let q2 = "And what is the capital of Germany?";
    let turn2 = [
        (Speaker::System, SPOKEN_SYSTEM_PROMPT),
        (Speaker::User, q1),
        (Speaker::Assistant, a1.as_str()),
        (Speaker::User, q2),
    ];
    let (a2, stats) = answer(&mut llama, &turn2, &params);
    // Decoded: the end of the answer's turn, the new question's turn and the opening of the
    // reply, about 20 tokens; the system prompt and first turn (~80) came from the cache.
    assert!(stats.prompt_decoded < stats.prompt_tokens, "{stats:?}");
    assert!(stats.prompt_decoded <= 30, "{stats:?}");
    // A cache kept at the wrong positions or with stale entries would derail the answer.
    assert!(a2.contains("Berlin"), "answer: {a2:?}");
    // The same prompt decoded whole, for comparison (not asserted equal: batches of other
    // sizes round differently, which may tip a greedy choice).
    llama.clear_cache();
    let (cold, cold_stats) = answer(&mut llama, &turn2, &params);
    assert_eq!(cold_stats.prompt_decoded, cold_stats.prompt_tokens);
    assert!(cold.contains("Berlin"), "answer: {cold:?}");
}

#[test]
fn returning_false_stops_within_one_token() {
    let Some(mut llama) = llama() else { return };
    let messages = [
        (Speaker::System, "You write long, detailed essays."),
        (
            Speaker::User,
            "Write a long essay about the history of the Roman Empire.",
        ),
    ];
    let mut calls = 0;
    let stats = llama
        .generate(&messages, &greedy(), &ComputeGate::new(), |_| {
            calls += 1;
            calls < 3
        })
        .expect("generates");
    assert_eq!(calls, 3, "{stats:?}");
    assert_eq!(stats.completion_tokens, 3, "{stats:?}");
    assert!(!stats.stopped, "{stats:?}");
}
