//! Benchmark of the local engines on their real models (`cargo bench -p duplex-local`):
//! Whisper's word error rate and time per utterance on recorded speech (pocketsphinx-testdata),
//! the LLM's time to first token and tokens per second, Piper's and espeak-ng's time per
//! sentence, and the process's resident memory after each load. Prints figures; asserts
//! nothing. Needs `scripts/setup-models.sh --test-data`.

use std::path::PathBuf;
use std::time::Instant;

use duplex_local::llm::Speaker;
use duplex_local::piper::PiperVoice;
use duplex_local::whisper::WhisperModel;
use duplex_local::{ChatModel, ComputeGate, GenParams, LlmChoice, ModelDir};

const LIBRIVOX: &str = "/usr/share/pocketsphinx/test/data/librivox";

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() {
    let root = std::env::var_os("DUPLEX_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    let dir = ModelDir::new(root);
    let only = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let want = |what: &str| only.as_deref().is_none_or(|o| o == what);
    println!("threads: {}", duplex_local::models::compute_threads());
    println!("rss at start: {:.0} MiB", rss_mib());

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

    if want("llm") {
        for choice in [LlmChoice::Qwen05b, LlmChoice::SmolLm135m] {
            let t = Instant::now();
            let mut llm = ChatModel::load(&dir.llm(choice)).expect("llm loads");
            println!(
                "{}: loaded in {:?}, rss {:.0} MiB",
                llm.name,
                t.elapsed(),
                rss_mib()
            );
            let gate = ComputeGate::new();
            let params = GenParams {
                temperature: 0.0,
                ..GenParams::default()
            };
            for q in [
                "What is the capital of France?",
                "Can you suggest something to cook for dinner tonight?",
                "How far away is the moon?",
            ] {
                let messages = [
                    (Speaker::System, duplex_local::SPOKEN_SYSTEM_PROMPT),
                    (Speaker::User, q),
                ];
                let t = Instant::now();
                let mut first = None;
                let mut text = String::new();
                let stats = llm
                    .generate(&messages, &params, &gate, |piece| {
                        first.get_or_insert_with(|| t.elapsed());
                        text.push_str(piece);
                        true
                    })
                    .expect("generates");
                let total = t.elapsed();
                let first = first.unwrap_or(total);
                let rate = stats.completion_tokens.saturating_sub(1) as f64
                    / (total - first).as_secs_f64().max(1e-9);
                println!(
                    "  {q:?}: prompt {} tokens, first token {:.0} ms, {} tokens at {rate:.1} tokens/s: {text:?}",
                    stats.prompt_tokens,
                    first.as_secs_f64() * 1000.0,
                    stats.completion_tokens,
                );
            }
            println!("  rss {:.0} MiB", rss_mib());
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
