//! The llama.cpp engines on the real Qwen2.5 model: it answers and stops by itself, a second
//! turn reuses the first turn's KV cache (and still answers right), and the caller can stop
//! it between any two tokens; the batched engine answers several conversations in one batch
//! exactly as it answers each alone, a cancelled answer leaves the others and the caches of
//! other conversations untouched, and turns beyond its sequences wait their turn.
//!
//! Gated like `tests/engines.rs`: needs the models (`scripts/setup-models.sh`) and
//! `DUPLEX_TEST_LOCAL=1`; without it each test says it was skipped. The model loads once per
//! test binary and tests take turns on it.

use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use duplex_local::batched::{GenEvent, Generation};
use duplex_local::llm::{GenStats, Speaker};
use duplex_local::{
    BatchConfig, BatchedLlama, ComputeGate, GenParams, LlamaChat, LlmChoice, ModelDir,
    SPOKEN_SYSTEM_PROMPT,
};

/// Tests take turns: they all want both cores, and the batched tests need to know what else
/// runs in their engine.
static TURN: Mutex<()> = Mutex::new(());

fn enabled() -> bool {
    let on = std::env::var("DUPLEX_TEST_LOCAL").as_deref() == Ok("1");
    if !on {
        eprintln!("skipped: set DUPLEX_TEST_LOCAL=1 after scripts/setup-models.sh");
    }
    on
}

fn model_path() -> std::path::PathBuf {
    let dir = ModelDir::from_env();
    dir.require(dir.llm(LlmChoice::Qwen05b))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The model and this test's turn, or `None` (with a note) when local tests are not enabled.
fn llama() -> Option<(MutexGuard<'static, ()>, MutexGuard<'static, LlamaChat>)> {
    static MODEL: OnceLock<Mutex<LlamaChat>> = OnceLock::new();
    if !enabled() {
        return None;
    }
    let turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let model = MODEL.get_or_init(|| {
        let t = Instant::now();
        let model = LlamaChat::load(&model_path(), duplex_local::models::compute_threads())
            .unwrap_or_else(|e| panic!("{e}"));
        eprintln!("loaded {} in {:?}", model.name, t.elapsed());
        Mutex::new(model)
    });
    Some((turn, model.lock().unwrap_or_else(|p| p.into_inner())))
}

/// The batched engine with two sequences (so that a third turn queues) and this test's turn.
fn batched() -> Option<(MutexGuard<'static, ()>, &'static BatchedLlama)> {
    static MODEL: OnceLock<BatchedLlama> = OnceLock::new();
    if !enabled() {
        return None;
    }
    let turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let model = MODEL.get_or_init(|| {
        let config = BatchConfig {
            max_sequences: 2,
            context_per_sequence: 1024,
            ..BatchConfig::default()
        };
        BatchedLlama::load(&model_path(), config, ComputeGate::new())
            .unwrap_or_else(|e| panic!("{e}"))
    });
    Some((turn, model))
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
    let Some((_turn, mut llama)) = llama() else {
        return;
    };
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
    let Some((_turn, mut llama)) = llama() else {
        return;
    };
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
    let Some((_turn, mut llama)) = llama() else {
        return;
    };
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

/// Greedy and short: these tests compare tokens, a dozen of them is enough.
fn short() -> GenParams {
    GenParams {
        max_tokens: 12,
        ..greedy()
    }
}

fn spoken(question: &str) -> Vec<(Speaker, String)> {
    vec![
        (Speaker::System, SPOKEN_SYSTEM_PROMPT.to_owned()),
        (Speaker::User, question.to_owned()),
    ]
}

/// A request for a long answer, to be cancelled.
fn essay() -> Vec<(Speaker, String)> {
    vec![
        (
            Speaker::System,
            "You write long, detailed essays.".to_owned(),
        ),
        (
            Speaker::User,
            "Write a long essay about the history of the Roman Empire.".to_owned(),
        ),
    ]
}

/// Reads a generation to its end.
fn read_all(g: &mut Generation) -> (String, GenStats) {
    let mut text = String::new();
    loop {
        match g.blocking_recv() {
            Some(GenEvent::Text(t)) => text.push_str(&t),
            Some(GenEvent::Done(stats)) => return (text, stats),
            Some(GenEvent::Failed(e)) => panic!("generation failed: {e}"),
            None => panic!("generation ended without Done after {text:?}"),
        }
    }
}

/// Reads `n` pieces of text.
fn read_some(g: &mut Generation, n: usize) {
    for _ in 0..n {
        match g.blocking_recv() {
            Some(GenEvent::Text(_)) => {}
            other => panic!("expected text, got {other:?}"),
        }
    }
}

/// Each conversation id once, so that no test finds another's cache.
fn fresh(label: &str) -> String {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    format!("{label}-{}", N.fetch_add(1, Ordering::SeqCst))
}

const Q_FRANCE: &str = "What is the capital of France?";
const Q_MOON: &str = "How far away is the moon?";

#[test]
fn batched_answers_are_the_answers_alone() {
    let Some((_turn, llm)) = batched() else {
        return;
    };
    let t = Instant::now();
    let steps = || llm.stats().steps.load(Ordering::SeqCst);
    let s0 = steps();
    let (alone_a, _) = read_all(&mut llm.generate(&fresh("a"), spoken(Q_FRANCE), short()));
    let (alone_b, stats_b) = read_all(&mut llm.generate(&fresh("b"), spoken(Q_MOON), short()));
    // A new conversation shares the system prompt another sequence holds.
    assert!(stats_b.prompt_decoded < 20, "{stats_b:?}");
    let alone_steps = steps() - s0;
    let s0 = steps();
    let mut a = llm.generate(&fresh("a"), spoken(Q_FRANCE), short());
    let mut b = llm.generate(&fresh("b"), spoken(Q_MOON), short());
    let (both_a, _) = read_all(&mut a);
    let (both_b, _) = read_all(&mut b);
    let both_steps = steps() - s0;
    eprintln!(
        "alone {alone_a:?} {alone_b:?} in {alone_steps} steps; together in {both_steps} steps; {:?}",
        t.elapsed()
    );
    assert_eq!(both_a, alone_a);
    assert_eq!(both_b, alone_b);
    // Together they shared steps (each answer alone needs a step per token).
    assert!(both_steps < alone_steps, "{both_steps} vs {alone_steps}");
}

#[test]
fn a_cancelled_answer_frees_its_sequence_and_leaves_the_others_unchanged() {
    let Some((_turn, llm)) = batched() else {
        return;
    };
    let t = Instant::now();
    let (alone, _) = read_all(&mut llm.generate(&fresh("a"), spoken(Q_FRANCE), short()));
    let (alone_moon, _) = read_all(&mut llm.generate(&fresh("c"), spoken(Q_MOON), short()));
    let queued = llm.stats().queued_total.load(Ordering::SeqCst);
    // Two sequences: the essay and the question run, the third turn waits.
    let mut long = llm.generate(&fresh("essay"), essay(), GenParams::default());
    let mut a = llm.generate(&fresh("a"), spoken(Q_FRANCE), short());
    let mut c = llm.generate(&fresh("c"), spoken(Q_MOON), short());
    read_some(&mut long, 3);
    assert!(
        llm.stats().queued_total.load(Ordering::SeqCst) > queued,
        "the third turn waited for a sequence"
    );
    drop(long);
    // The cancelled essay's sequence goes to the waiting turn, which answers as it would
    // alone; so does the answer that ran next to the essay.
    let (with_c, _) = read_all(&mut c);
    let (with_a, _) = read_all(&mut a);
    eprintln!("{with_a:?} {with_c:?} in {:?}", t.elapsed());
    assert_eq!(with_a, alone);
    assert_eq!(with_c, alone_moon);
    let idle = Instant::now();
    while !llm.is_idle() {
        assert!(idle.elapsed().as_secs() < 2, "the engine is still busy");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn a_conversation_keeps_its_cache_when_another_is_cancelled() {
    let Some((_turn, llm)) = batched() else {
        return;
    };
    let t = Instant::now();
    let me = fresh("me");
    let q2 = "And what is the capital of Germany?";
    let params = GenParams {
        max_tokens: 16,
        ..greedy()
    };
    let (a1, _) = read_all(&mut llm.generate(&me, spoken(Q_FRANCE), params.clone()));
    // Another conversation starts a long answer and is interrupted.
    let mut other = llm.generate(&fresh("other"), essay(), GenParams::default());
    read_some(&mut other, 3);
    drop(other);
    let mut turn2 = spoken(Q_FRANCE);
    turn2.push((Speaker::Assistant, a1.clone()));
    turn2.push((Speaker::User, q2.to_owned()));
    let (a2, stats) = read_all(&mut llm.generate(&me, turn2, params));
    eprintln!("{a1:?} then {a2:?} ({stats:?}) in {:?}", t.elapsed());
    // Only the tail after the first answer was decoded (see a_second_turn_decodes_only_the_new_tail).
    assert!(stats.prompt_decoded <= 30, "{stats:?}");
    assert!(a2.contains("Berlin"), "answer: {a2:?}");
}

#[test]
fn a_queued_turn_dropped_before_it_starts_never_prefills() {
    let Some((_turn, llm)) = batched() else {
        return;
    };
    let stats = llm.stats();
    // Both sequences busy with long answers, a third turn queued, then dropped.
    let mut one = llm.generate(&fresh("essay"), essay(), GenParams::default());
    let mut two = llm.generate(&fresh("essay"), essay(), GenParams::default());
    read_some(&mut one, 2);
    read_some(&mut two, 2);
    let started = stats.started.load(Ordering::SeqCst);
    let waiting = llm.generate(&fresh("a"), spoken(Q_FRANCE), short());
    let t = Instant::now();
    while stats.queued.load(Ordering::SeqCst) == 0 {
        assert!(t.elapsed().as_secs() < 5, "the third turn never queued");
        read_some(&mut one, 1);
    }
    drop(waiting);
    // The scheduler forgets it at its next step; the sequences free up afterwards.
    read_some(&mut one, 2);
    drop(one);
    drop(two);
    // Bounded generously: on a loaded machine a two-answer step can take a second.
    let idle = Instant::now();
    while !llm.is_idle() {
        assert!(idle.elapsed().as_secs() < 20, "the engine is still busy");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    eprintln!("idle {:?} after the drops", idle.elapsed());
    assert_eq!(
        stats.started.load(Ordering::SeqCst),
        started,
        "the dropped turn never got a sequence"
    );
}

#[test]
fn a_panic_in_the_scheduler_fails_one_turn_and_it_serves_the_next() {
    let Some((_turn, llm)) = batched() else {
        return;
    };
    let (alone, _) = read_all(&mut llm.generate(&fresh("a"), spoken(Q_FRANCE), short()));
    llm.panic_on_next_job();
    let mut failed = llm.generate(&fresh("a"), spoken(Q_FRANCE), short());
    match failed.blocking_recv() {
        Some(GenEvent::Failed(e)) => eprintln!("failed as it should: {e}"),
        other => panic!("expected the turn to fail, got {other:?}"),
    }
    let (after, _) = read_all(&mut llm.generate(&fresh("a"), spoken(Q_FRANCE), short()));
    assert_eq!(after, alone);
}
