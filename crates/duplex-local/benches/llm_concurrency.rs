//! Several conversations asking the local LLM at once (`cargo bench -p duplex-local --bench
//! llm_concurrency`): 1, 2, 3 and 4 questions sent together, through the provider API as a
//! session sends them, on the batched llama.cpp engine and on the one-at-a-time engine
//! (`llama-serial`), alternating in one run so that both see the same machine. Prints, per
//! round, the time to first token (p50 and max over the questions) and the aggregate
//! completion tokens per second (all answers' tokens over the time to the last answer's end).
//! Greedy, so both engines write the same answers. Figures only; asserts nothing.
//!
//! `BENCH_ROUNDS` (default 3) repeats each configuration.

use std::time::{Duration, Instant};

use duplex_local::{BatchConfig, ComputeGate, GenParams, LlmChoice, LlmEngine, LocalLlm, ModelDir};
use duplex_providers::{ChatMessage, LanguageModel, LlmEvent, LlmRequest, Role};
use futures::StreamExt;

/// Every question of a run is asked once per engine, so that neither engine finds a whole
/// earlier prompt in its cache (only the shared system prompt), as with real sessions.
const ANIMALS: [&str; 32] = [
    "octopuses",
    "bees",
    "owls",
    "dolphins",
    "elephants",
    "penguins",
    "bats",
    "ants",
    "giraffes",
    "crows",
    "sharks",
    "frogs",
    "koalas",
    "camels",
    "snails",
    "parrots",
    "wolves",
    "otters",
    "spiders",
    "horses",
    "turtles",
    "foxes",
    "whales",
    "eagles",
    "squirrels",
    "jellyfish",
    "kangaroos",
    "pandas",
    "hedgehogs",
    "salmon",
    "zebras",
    "moths",
];

fn question(k: usize) -> String {
    format!("Tell me a fun fact about {}.", ANIMALS[k % ANIMALS.len()])
}

struct Answer {
    first: Duration,
    tokens: u32,
}

async fn ask(llm: &LocalLlm, session: String, question: String) -> Answer {
    let t = Instant::now();
    let mut stream = llm.stream(LlmRequest {
        session_id: session,
        model: None,
        messages: vec![
            ChatMessage::new(Role::System, duplex_local::SPOKEN_SYSTEM_PROMPT),
            ChatMessage::new(Role::User, question),
        ],
        max_tokens: None,
        plan: None,
        budget_remaining_usd: None,
    });
    let mut first = None;
    let mut tokens = 0;
    while let Some(event) = stream.next().await {
        match event.expect("the local LLM answers") {
            LlmEvent::Delta(_) => {
                first.get_or_insert_with(|| t.elapsed());
            }
            LlmEvent::Done { usage, .. } => tokens = usage.map_or(0, |u| u.completion_tokens),
        }
    }
    Answer {
        first: first.unwrap_or_else(|| t.elapsed()),
        tokens,
    }
}

/// One round: `n` questions at once, starting with question `first`; returns TTFT p50 and
/// max and aggregate tokens/s.
async fn round(llm: &LocalLlm, n: usize, first: usize) -> (Duration, Duration, f64) {
    let t = Instant::now();
    let answers = futures::future::join_all(
        (first..first + n).map(|k| ask(llm, format!("conversation-{k}"), question(k))),
    )
    .await;
    let wall = t.elapsed();
    let mut firsts: Vec<Duration> = answers.iter().map(|a| a.first).collect();
    firsts.sort();
    // The lower median for an even count.
    let p50 = firsts[(firsts.len() - 1) / 2];
    let max = *firsts.last().expect("n >= 1");
    let tokens: u32 = answers.iter().map(|a| a.tokens).sum();
    (p50, max, f64::from(tokens) / wall.as_secs_f64())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let dir = ModelDir::from_env();
    let gate = ComputeGate::new();
    let params = GenParams {
        temperature: 0.0,
        ..GenParams::default()
    };
    let load = |engine| {
        dir.load_llm(
            LlmChoice::Qwen05b,
            engine,
            &gate,
            params.clone(),
            &BatchConfig::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    };
    let engines = [
        ("serial", load(LlmEngine::LlamaSerial)),
        ("batched", load(LlmEngine::Llama)),
    ];
    // Warm up each engine once (first decode allocates).
    // Warm up each engine once (first decode allocates); not a question of the run.
    for (_, llm) in &engines {
        let _ = ask(llm, "warm-up".into(), "Hello!".into()).await;
    }
    println!("engine   n  round  ttft_p50_ms  ttft_max_ms  tokens_per_s");
    let (mut r, mut asked) = (0, 0);
    for n in 1..=4 {
        for _ in 0..rounds {
            r += 1;
            for (name, llm) in &engines {
                let (p50, max, rate) = round(llm, n, asked).await;
                println!(
                    "{name:<8} {n}  {r:>5}  {:>11.0}  {:>11.0}  {rate:>12.1}",
                    p50.as_secs_f64() * 1000.0,
                    max.as_secs_f64() * 1000.0
                );
            }
            asked += n;
        }
    }
}
