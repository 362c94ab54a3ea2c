//! The local engines on their real models: recognition accuracy on recorded speech, a voice
//! that the recognizer understands, an LLM that answers and stops, cancellation.
//!
//! These need the models (`scripts/setup-models.sh --test-data`, which `scripts/test.sh`
//! runs) and are gated by `DUPLEX_TEST_LOCAL=1`, which `scripts/test.sh` sets; without it
//! each test says it was skipped. Models load once per test binary and tests take turns (they
//! all want both cores).

use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use duplex_local::{ComputeGate, GenParams, LlmChoice, LocalLlm, LocalStt, ModelDir};
use duplex_providers::{
    ChatMessage, LanguageModel, LlmEvent, LlmRequest, Role, SpeechToText, SttEvent, SttInput,
    SttParams, TextToSpeech, TtsEvent, TtsInput, TtsParams,
};
use duplex_replay::wer::{wer, words};
use futures::StreamExt;

const LIBRIVOX: &str = "/usr/share/pocketsphinx/test/data/librivox";

struct Engines {
    stt: LocalStt,
    /// On llama.cpp, the default engine.
    llm: LocalLlm,
    /// The same model on candle.
    candle: LocalLlm,
    piper: duplex_local::PiperTts,
    espeak: duplex_local::EspeakTts,
}

/// The engines, or `None` (with a note) when local tests are not enabled.
fn engines() -> Option<(&'static Engines, MutexGuard<'static, ()>)> {
    static TURN: Mutex<()> = Mutex::new(());
    static ENGINES: OnceLock<Engines> = OnceLock::new();
    if std::env::var("DUPLEX_TEST_LOCAL").as_deref() != Ok("1") {
        eprintln!("skipped: set DUPLEX_TEST_LOCAL=1 after scripts/setup-models.sh --test-data");
        return None;
    }
    let turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let engines = ENGINES.get_or_init(|| {
        let dir = ModelDir::from_env();
        let gate = ComputeGate::new();
        let t = Instant::now();
        let e = Engines {
            stt: dir.load_stt(&gate).unwrap_or_else(|e| panic!("{e}")),
            llm: dir
                .load_llm(
                    LlmChoice::Qwen05b,
                    duplex_local::LlmEngine::Llama,
                    &gate,
                    GenParams::default(),
                    &duplex_local::BatchConfig::default(),
                )
                .unwrap_or_else(|e| panic!("{e}")),
            candle: dir
                .load_llm(
                    LlmChoice::Qwen05b,
                    duplex_local::LlmEngine::Candle,
                    &gate,
                    GenParams::default(),
                    &duplex_local::BatchConfig::default(),
                )
                .unwrap_or_else(|e| panic!("{e}")),
            piper: dir.load_piper(&gate).unwrap_or_else(|e| panic!("{e}")),
            espeak: dir.load_espeak(&gate).unwrap_or_else(|e| panic!("{e}")),
        };
        eprintln!("loaded the local engines in {:?}", t.elapsed());
        e
    });
    Some((engines, turn))
}

fn read_wav_16k(path: &str) -> Vec<i16> {
    let r = hound::WavReader::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(r.spec().sample_rate, 16_000, "{path}");
    r.into_samples::<i16>()
        .map(|s| s.expect("valid WAV"))
        .collect()
}

/// Linear-interpolation resampling: plenty for feeding a recognizer in a test.
fn resample(samples: &[i16], from: u32, to: u32) -> Vec<i16> {
    let n = (samples.len() as u64 * to as u64 / from as u64) as usize;
    (0..n)
        .map(|i| {
            let x = i as f64 * from as f64 / to as f64;
            let j = x as usize;
            let f = x - j as f64;
            let a = samples[j.min(samples.len() - 1)] as f64;
            let b = samples[(j + 1).min(samples.len() - 1)] as f64;
            (a + (b - a) * f) as i16
        })
        .collect()
}

/// Runs one utterance through the recognizer's stream interface, in 20 ms frames.
async fn recognize(stt: &LocalStt, samples: &[i16]) -> String {
    let mut s = stt.open(SttParams {
        sample_rate: 16_000,
        language: None,
        session_id: "test".into(),
    });
    for frame in samples.chunks(320) {
        s.input.send(SttInput::Audio(frame.to_vec())).await.unwrap();
    }
    s.input.send(SttInput::Finalize).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(60), s.events.recv()).await {
        Ok(Some(SttEvent::Final { text })) => text,
        other => panic!("expected a final transcript, got {other:?}"),
    }
}

async fn synthesize(tts: &dyn TextToSpeech, text: &str) -> (Vec<i16>, u32) {
    let mut s = tts.open(TtsParams {
        session_id: "test".into(),
        voice: None,
        language: None,
        preferred_sample_rate: 16_000,
    });
    s.input
        .send(TtsInput::Text {
            index: 0,
            text: text.into(),
        })
        .await
        .unwrap();
    s.input.send(TtsInput::End).await.unwrap();
    let (mut audio, mut rate) = (Vec::new(), 0);
    loop {
        match s.events.recv().await.expect("stream ends with Finished") {
            TtsEvent::Audio {
                samples,
                sample_rate,
                ..
            } => {
                audio.extend(samples);
                rate = sample_rate;
            }
            TtsEvent::ChunkDone { .. } => {}
            TtsEvent::Finished => return (audio, rate),
            TtsEvent::Error(e) => panic!("synthesis failed: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whisper_transcribes_recorded_speech() {
    let Some((e, _turn)) = engines() else { return };
    let transcripts = std::fs::read_to_string(format!("{LIBRIVOX}/transcription")).unwrap();
    let (mut errors, mut total) = (0.0, 0usize);
    for line in transcripts.lines() {
        // `<s> words </s> (file-id)`
        let text = line.replace("<s>", "").replace("</s>", "");
        let (reference, id) = text.rsplit_once('(').unwrap();
        let id = id.trim_end_matches(')');
        let audio = read_wav_16k(&format!("{LIBRIVOX}/{id}.wav"));
        let t = Instant::now();
        let hyp = recognize(&e.stt, &audio).await;
        let w = wer(reference, &hyp);
        eprintln!("{id}: WER {w:.2} in {:?}: {hyp:?}", t.elapsed());
        errors += w * words(reference).len() as f64;
        total += words(reference).len();
    }
    let wer = errors / total as f64;
    eprintln!("WER over {total} words: {wer:.3}");
    // Whisper tiny.en reaches ~5-10% on these LibriVox clips ("mister" vs "Mr." counts as an
    // error); 20% leaves room for that and catches a broken front end (which gives ~100%).
    assert!(wer < 0.20, "word error rate {wer:.3}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whisper_returns_nothing_for_silence_and_noise() {
    let Some((e, _turn)) = engines() else { return };
    assert_eq!(recognize(&e.stt, &vec![0i16; 32_000]).await, "");
    // Faint noise at about -50 dBFS: below the silence gate, never decoded.
    let mut x = 12345u32;
    let noise: Vec<i16> = (0..32_000)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            ((x >> 16) as i16) / 300
        })
        .collect();
    assert_eq!(recognize(&e.stt, &noise).await, "");
    // A 0.2 s click of speech-level energy: too short to hold a word.
    assert_eq!(recognize(&e.stt, &vec![8000i16; 3200]).await, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piper_speech_is_understood_by_whisper() {
    let Some((e, _turn)) = engines() else { return };
    let text = "The weather is lovely today, so we are going to the park.";
    let t = Instant::now();
    let (audio, rate) = synthesize(&e.piper, text).await;
    eprintln!(
        "piper: {:.2} s of audio in {:?}",
        audio.len() as f64 / rate as f64,
        t.elapsed()
    );
    assert_eq!(rate, 22_050);
    let heard = recognize(&e.stt, &resample(&audio, rate, 16_000)).await;
    eprintln!("heard {heard:?}");
    assert!(wer(text, &heard) <= 0.2, "Whisper heard {heard:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn espeak_speech_is_understood_by_whisper() {
    let Some((e, _turn)) = engines() else { return };
    let text = "Please call me back in ten minutes.";
    let (audio, rate) = synthesize(&e.espeak, text).await;
    let heard = recognize(&e.stt, &resample(&audio, rate, 16_000)).await;
    eprintln!("heard {heard:?}");
    assert!(wer(text, &heard) <= 0.3, "Whisper heard {heard:?}");
}

fn request(user: &str) -> LlmRequest {
    LlmRequest {
        session_id: "test".into(),
        model: None,
        messages: vec![
            ChatMessage::new(Role::System, duplex_local::SPOKEN_SYSTEM_PROMPT),
            ChatMessage::new(Role::User, user),
        ],
        max_tokens: None,
        plan: None,
        budget_remaining_usd: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_answers_and_stops_at_a_stop_token() {
    let Some((e, _turn)) = engines() else { return };
    answers_and_stops(&e.llm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_candle_engine_answers_and_stops_too() {
    let Some((e, _turn)) = engines() else { return };
    answers_and_stops(&e.candle).await;
}

async fn answers_and_stops(llm: &LocalLlm) {
    let t = Instant::now();
    let mut stream = llm.stream(request("What is the capital of France?"));
    let (mut text, mut first, mut done) = (String::new(), None, None);
    while let Some(item) = stream.next().await {
        match item.expect("no error") {
            LlmEvent::Delta(d) => {
                first.get_or_insert(t.elapsed());
                text.push_str(&d);
            }
            LlmEvent::Done { usage, .. } => done = usage,
        }
    }
    let usage = done.expect("Done with usage");
    eprintln!(
        "{text:?} first token {first:?}, total {:?}, {usage:?}",
        t.elapsed()
    );
    assert!(text.contains("Paris"), "answer: {text:?}");
    // It ended by itself, before the token limit: a stop token ended it.
    assert!(
        (usage.completion_tokens as usize) < GenParams::default().max_tokens,
        "{usage:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_llm_stream_stops_generation() {
    let Some((e, _turn)) = engines() else { return };
    // A request that makes a long answer: no spoken-style system prompt, an essay asked for.
    let mut req = request("Write a long essay about the history of the Roman Empire.");
    req.messages[0] = ChatMessage::new(Role::System, "You write long, detailed essays.");
    let mut stream = e.llm.stream(req);
    let mut deltas = 0;
    while deltas < 5 {
        match stream.next().await {
            Some(Ok(LlmEvent::Delta(_))) => deltas += 1,
            other => panic!("expected tokens, got {other:?}"),
        }
    }
    assert!(!e.llm.is_idle(), "the generation is still running");
    let dropped = Instant::now();
    drop(stream);
    while !e.llm.is_idle() {
        assert!(
            dropped.elapsed() < Duration::from_secs(2),
            "generation still running 2 s after the stream was dropped"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!("generation stopped {:?} after the drop", dropped.elapsed());
}
