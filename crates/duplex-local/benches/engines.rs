//! Benchmark of the local engines on their real models (`cargo bench -p duplex-local`):
//! Whisper's word error rate and time per utterance on recorded speech (pocketsphinx-testdata),
//! the LLM's time to first token and tokens per second on candle and on llama.cpp (and
//! llama.cpp's second turn of a conversation, which reuses the first turn's KV cache), Piper's
//! and espeak-ng's time per sentence, the process's resident memory after each load, and
//! (`concurrency`) 1-3 transcriptions and Piper sentences one after another against all at
//! once, which sized the engines' pools. Prints figures; asserts nothing. Needs `scripts/setup-models.sh --test-data`.

use std::path::Path;
use std::time::Instant;

use duplex_local::llm::{GenStats, Speaker};
use duplex_local::piper::PiperVoice;
use duplex_local::whisper::WhisperModel;
use duplex_local::{
    ChatModel, ComputeGate, GenParams, LlamaChat, LlmChoice, ModelDir, SPOKEN_SYSTEM_PROMPT,
};

const LIBRIVOX: &str = "/usr/share/pocketsphinx/test/data/librivox";

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

const QUESTIONS: [&str; 3] = [
    "What is the capital of France?",
    "Can you suggest something to cook for dinner tonight?",
    "How far away is the moon?",
];

/// Greedy, so that both engines answer alike.
fn llm_params() -> GenParams {
    GenParams {
        temperature: 0.0,
        ..GenParams::default()
    }
}

fn bench_candle(path: &Path) {
    let (gate, params) = (ComputeGate::new(), llm_params());
    let t = Instant::now();
    let mut candle = ChatModel::load(path).expect("llm loads");
    println!(
        "candle {}: loaded in {:?}, rss {:.0} MiB",
        candle.name,
        t.elapsed(),
        rss_mib()
    );
    for q in QUESTIONS {
        let messages = [(Speaker::System, SPOKEN_SYSTEM_PROMPT), (Speaker::User, q)];
        ask(&format!("{q:?}"), &messages, |m, on_text| {
            candle
                .generate(m, &params, &gate, on_text)
                .expect("generates")
        });
    }
    println!("  rss {:.0} MiB", rss_mib());
}

fn bench_llama(path: &Path) {
    let (gate, params) = (ComputeGate::new(), llm_params());
    let t = Instant::now();
    let threads = duplex_local::models::compute_threads();
    let mut llama = LlamaChat::load(path, threads).expect("llama.cpp loads");
    println!(
        "llama.cpp {}: loaded in {:?}, rss {:.0} MiB",
        llama.name,
        t.elapsed(),
        rss_mib()
    );
    for q in QUESTIONS {
        let messages = [(Speaker::System, SPOKEN_SYSTEM_PROMPT), (Speaker::User, q)];
        // Cold, as candle runs: the whole prompt decoded.
        llama.clear_cache();
        ask(&format!("{q:?}"), &messages, |m, on_text| {
            llama
                .generate(m, &params, &gate, on_text)
                .expect("generates")
        });
    }
    // A conversation: the first question again (the cache holds the last question's prompt,
    // so only the shared system prompt is reused), then a follow-up whose prompt is the first
    // turn's plus the answer: only the tail is decoded.
    let (q1, q2) = (QUESTIONS[0], "And what is the capital of Germany?");
    let turn1 = [(Speaker::System, SPOKEN_SYSTEM_PROMPT), (Speaker::User, q1)];
    let answer = ask("turn 1", &turn1, |m, on_text| {
        llama
            .generate(m, &params, &gate, on_text)
            .expect("generates")
    });
    let turn2 = [
        (Speaker::System, SPOKEN_SYSTEM_PROMPT),
        (Speaker::User, q1),
        (Speaker::Assistant, answer.as_str()),
        (Speaker::User, q2),
    ];
    ask("turn 2", &turn2, |m, on_text| {
        llama
            .generate(m, &params, &gate, on_text)
            .expect("generates")
    });
    println!("  rss {:.0} MiB", rss_mib());
}

/// Runs one generation through `generate` and prints its first-token latency, speed and
/// answer; returns the answer.
fn ask<'m>(
    label: &str,
    messages: &'m [(Speaker, &'m str)],
    generate: impl FnOnce(&'m [(Speaker, &'m str)], &mut dyn FnMut(&str) -> bool) -> GenStats,
) -> String {
    let t = Instant::now();
    let mut first = None;
    let mut text = String::new();
    let stats = generate(messages, &mut |piece: &str| {
        first.get_or_insert_with(|| t.elapsed());
        text.push_str(piece);
        true
    });
    let total = t.elapsed();
    let first = first.unwrap_or(total);
    let rate =
        stats.completion_tokens.saturating_sub(1) as f64 / (total - first).as_secs_f64().max(1e-9);
    println!(
        "  {label}: prompt {} tokens ({} decoded), first token {:.0} ms, {} tokens at {rate:.1} tokens/s: {text:?}",
        stats.prompt_tokens,
        stats.prompt_decoded,
        first.as_secs_f64() * 1000.0,
        stats.completion_tokens,
    );
    text
}

/// Runs `jobs` one after another, then all at once (one thread each), and prints the wall
/// time of the lot and the mean time a job took from the start to its result.
fn serial_vs_concurrent<T: Send>(
    label: &str,
    mut instances: Vec<T>,
    jobs: usize,
    run: impl Fn(&mut T, usize) + Sync,
) {
    let t = Instant::now();
    let mut done = Vec::new();
    for j in 0..jobs {
        run(&mut instances[0], j);
        done.push(t.elapsed().as_secs_f64());
    }
    let serial = (
        t.elapsed().as_secs_f64(),
        done.iter().sum::<f64>() / jobs as f64,
    );
    let t = Instant::now();
    let done: Vec<f64> = std::thread::scope(|s| {
        let handles: Vec<_> = instances
            .iter_mut()
            .take(jobs)
            .enumerate()
            .map(|(j, inst)| {
                let run = &run;
                s.spawn(move || {
                    run(inst, j);
                    t.elapsed().as_secs_f64()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("job"))
            .collect()
    });
    let concurrent = (
        t.elapsed().as_secs_f64(),
        done.iter().sum::<f64>() / jobs as f64,
    );
    println!(
        "  {label}, {jobs} at once: serial {:.2} s (mean {:.2} s), concurrent {:.2} s (mean {:.2} s)",
        serial.0, serial.1, concurrent.0, concurrent.1
    );
}

/// Several transcriptions and syntheses serial vs at once (one engine instance per job), the
/// figures that size the pools (`cargo bench -p duplex-local --bench engines concurrency`;
/// `RAYON_NUM_THREADS` sets candle's threads).
fn bench_concurrency(dir: &ModelDir) {
    let whisper = WhisperModel::load(&dir.whisper()).expect("whisper loads");
    let clips: Vec<Vec<f32>> = ["0870", "0880", "0890"]
        .iter()
        .map(|id| {
            hound::WavReader::open(format!(
                "{LIBRIVOX}/sense_and_sensibility_01_austen_64kb-{id}.wav"
            ))
            .expect("wav")
            .into_samples::<i16>()
            .map(|s| f32::from(s.expect("sample")) / 32768.0)
            .collect()
        })
        .collect();
    println!(
        "whisper (candle threads {}), clips of {:?} s:",
        candle_core::utils::get_num_threads(),
        clips.iter().map(|c| c.len() / 16_000).collect::<Vec<_>>()
    );
    for jobs in 1..=3 {
        let pool = vec![whisper.clone(); jobs];
        serial_vs_concurrent("transcriptions", pool, jobs, |m, j| {
            m.transcribe(&clips[j % clips.len()]).expect("transcribes");
        });
        // As the server runs them: each step (encoder, decoder token) takes the gate.
        let gate = ComputeGate::new();
        let pool = vec![whisper.clone(); jobs];
        serial_vs_concurrent("transcriptions, gate per step", pool, jobs, |m, j| {
            m.transcribe_with(&clips[j % clips.len()], Some(&gate), &|| false)
                .expect("transcribes");
        });
    }
    let sentences = [
        "Paris is the capital of France.",
        "The weather is lovely today, so we are going to the park.",
        "I would suggest a simple pasta with tomatoes and basil.",
    ];
    for (threads, spin) in [(2, false), (1, false)] {
        println!("piper, {threads} intra-op threads per session, spinning {spin}:");
        for jobs in 1..=3 {
            let pool: Vec<PiperVoice> = (0..jobs)
                .map(|_| {
                    PiperVoice::load_with(&dir.piper_voice(), &dir.onnxruntime(), threads, spin)
                        .expect("piper loads")
                })
                .collect();
            serial_vs_concurrent("syntheses", pool, jobs, |v, j| {
                v.synthesize(sentences[j % sentences.len()])
                    .expect("synthesizes");
            });
        }
    }
}

fn main() {
    let dir = ModelDir::from_env();
    let only = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let want = |what: &str| only.as_deref().is_none_or(|o| o == what);
    println!("threads: {}", duplex_local::models::compute_threads());
    println!("rss at start: {:.0} MiB", rss_mib());

    if want("concurrency") {
        bench_concurrency(&dir);
    }

    if want("stt") {
        let t = Instant::now();
        let mut whisper = WhisperModel::load(&dir.whisper()).expect("whisper loads");
        println!(
            "whisper tiny.en: loaded in {:?}, rss {:.0} MiB",
            t.elapsed(),
            rss_mib()
        );
        let transcripts = std::fs::read_to_string(format!("{LIBRIVOX}/transcription"))
            .expect("pocketsphinx-testdata is installed");
        let (mut errors, mut words_total, mut audio_s, mut busy_s) = (0.0, 0usize, 0.0, 0.0);
        for line in transcripts.lines() {
            let text = line.replace("<s>", "").replace("</s>", "");
            let (reference, id) = text.rsplit_once('(').expect("transcript line");
            let id = id.trim_end_matches(')');
            let r = hound::WavReader::open(format!("{LIBRIVOX}/{id}.wav")).expect("wav");
            let samples: Vec<f32> = r
                .into_samples::<i16>()
                .map(|s| f32::from(s.expect("sample")) / 32768.0)
                .collect();
            let t = Instant::now();
            let out = whisper.transcribe(&samples).expect("transcribes");
            let took = t.elapsed().as_secs_f64();
            let n = duplex_replay::wer::words(reference).len();
            let w = duplex_replay::wer::wer(reference, &out.text);
            errors += w * n as f64;
            words_total += n;
            audio_s += samples.len() as f64 / 16_000.0;
            busy_s += took;
            println!(
                "  {id}: {:.1} s audio in {took:.2} s, WER {:.1} %",
                samples.len() as f64 / 16_000.0,
                w * 100.0
            );
        }
        println!(
            "whisper: WER {:.1} % over {words_total} words; {:.2} s per utterance, real-time factor {:.3}; rss {:.0} MiB",
            100.0 * errors / words_total as f64,
            busy_s / 5.0,
            busy_s / audio_s,
            rss_mib()
        );
    }

    // `llm` runs both engines; `llm-candle` or `llm-llama` one of them (each in its own process
    // for a clean resident-memory figure).
    let candle_on = want("llm") || want("llm-candle");
    let llama_on = want("llm") || want("llm-llama");
    for choice in [LlmChoice::Qwen05b, LlmChoice::SmolLm135m] {
        let path = dir.llm(choice);
        if !(candle_on || llama_on) {
            break;
        }
        if !path.exists() {
            println!("{}: not installed, skipped", path.display());
            continue;
        }
        if candle_on {
            bench_candle(&path);
        }
        if llama_on {
            bench_llama(&path);
        }
    }

    if want("tts") {
        let sentences = [
            "Paris is the capital of France.",
            "The weather is lovely today, so we are going to the park.",
        ];
        let t = Instant::now();
        let mut piper = PiperVoice::load(
            &dir.piper_voice(),
            &dir.onnxruntime(),
            duplex_local::models::compute_threads(),
        )
        .expect("piper loads");
        println!(
            "piper joe-medium: loaded in {:?}, rss {:.0} MiB",
            t.elapsed(),
            rss_mib()
        );
        for s in sentences {
            let t = Instant::now();
            let audio = piper.synthesize(s).expect("synthesizes");
            let took = t.elapsed().as_secs_f64();
            let secs = audio.len() as f64 / piper.sample_rate as f64;
            println!(
                "  {s:?}: {secs:.2} s of audio in {:.0} ms (real-time factor {:.3})",
                took * 1000.0,
                took / secs
            );
        }
        let espeak = duplex_local::espeak::Espeak::global().expect("espeak-ng loads");
        for s in sentences {
            let t = Instant::now();
            let audio = espeak.speak(s).expect("speaks");
            println!(
                "  espeak-ng {s:?}: {:.2} s of audio in {:.1} ms",
                audio.len() as f64 / espeak.sample_rate as f64,
                t.elapsed().as_secs_f64() * 1000.0
            );
        }
        println!("  rss {:.0} MiB", rss_mib());
    }
}
