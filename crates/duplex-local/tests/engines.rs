//! The local engines on their real models: recognition accuracy on recorded speech, a voice
//! that the recognizer understands, an LLM that answers and stops, cancellation.
//!
//! These need the models (`scripts/setup-models.sh --test-data`, which `scripts/test.sh`
//! runs) and are gated by `DUPLEX_TEST_LOCAL=1`, which `scripts/test.sh` sets; without it
//! each test says it was skipped. Models load once per test binary and tests take turns (they
//! all want both cores).

// The turn is a std `MutexGuard` held for a whole test across its awaits on purpose: each test
// has its own runtime, and the guard only makes the tests of this binary run one at a time.
#![allow(clippy::await_holding_lock)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use duplex_local::observe::{Engine, Observe};
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
    /// What the engines reported.
    seen: Arc<Seen>,
}

/// Counts the engines' reports.
#[derive(Default)]
struct Seen {
    /// Jobs that started, by engine: stt, llm, tts.
    started: [AtomicU64; 3],
    tokens: AtomicU64,
}

impl Seen {
    fn started(&self, engine: Engine) -> u64 {
        self.started[engine as usize].load(Ordering::SeqCst)
    }
}

impl Observe for Seen {
    fn queue_wait(&self, engine: Engine, _wait: Duration) {
        self.started[engine as usize].fetch_add(1, Ordering::SeqCst);
    }
    fn llm_tokens(&self, tokens: u64) {
        self.tokens.fetch_add(tokens, Ordering::SeqCst);
    }
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
            seen: Arc::new(Seen::default()),
        };
        e.stt.set_observer(e.seen.clone());
        e.candle.set_observer(e.seen.clone());
        e.piper.set_observer(e.seen.clone());
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

fn librivox(id: &str) -> Vec<i16> {
    read_wav_16k(&format!(
        "{LIBRIVOX}/sense_and_sensibility_01_austen_64kb-{id}.wav"
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_utterances_at_once_are_transcribed_as_each_alone() {
    let Some((e, _turn)) = engines() else { return };
    let (a, b) = (librivox("0870"), librivox("0880"));
    let alone_a = e.stt.transcribe(a.clone()).await.unwrap();
    let alone_b = e.stt.transcribe(b.clone()).await.unwrap();
    let t = Instant::now();
    let (both_a, both_b) = tokio::join!(e.stt.transcribe(a), e.stt.transcribe(b));
    eprintln!("{alone_a:?} {alone_b:?}; both at once in {:?}", t.elapsed());
    assert!(!alone_a.is_empty() && alone_a != alone_b);
    assert_eq!(both_a.unwrap(), alone_a);
    assert_eq!(both_b.unwrap(), alone_b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_queued_transcription_never_starts() {
    let Some((e, _turn)) = engines() else { return };
    let audio = librivox("0890");
    let started = e.seen.started(Engine::Stt);
    // Every Whisper instance busy, then one more job queued, then dropped.
    let busy: Vec<_> = (0..duplex_local::provider::WHISPER_INSTANCES)
        .map(|_| {
            let (stt, audio) = (e.stt.clone(), audio.clone());
            tokio::spawn(async move { stt.transcribe(audio).await })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while e.seen.started(Engine::Stt) < started + busy.len() as u64 {
        assert!(Instant::now() < deadline, "the first jobs did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let queued = {
        let (stt, audio) = (e.stt.clone(), audio.clone());
        tokio::spawn(async move { stt.transcribe(audio).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    queued.abort();
    for job in busy {
        assert!(!job.await.unwrap().unwrap().is_empty());
    }
    // The pool is free again: the next job runs.
    assert!(!e.stt.transcribe(audio).await.unwrap().is_empty());
    assert_eq!(
        e.seen.started(Engine::Stt),
        started + duplex_local::provider::WHISPER_INSTANCES as u64 + 1,
        "the dropped job never started"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_transcription_stops_at_its_next_step() {
    if std::env::var("DUPLEX_TEST_LOCAL").as_deref() != Ok("1") {
        return;
    }
    let mut whisper = duplex_local::whisper::WhisperModel::load(&ModelDir::from_env().whisper())
        .unwrap_or_else(|e| panic!("{e}"));
    let audio: Vec<f32> = librivox("0870")
        .iter()
        .map(|&s| f32::from(s) / 32768.0)
        .collect();
    let asked = std::sync::atomic::AtomicUsize::new(0);
    // Cancelled after the encoder and two decoder steps.
    let stop = || asked.fetch_add(1, Ordering::SeqCst) >= 3;
    let out = whisper.transcribe_with(&audio, None, &stop);
    assert!(
        matches!(out, Err(duplex_local::Error::Cancelled)),
        "{out:?}"
    );
    assert_eq!(
        asked.load(Ordering::SeqCst),
        4,
        "no step ran after the cancel"
    );
    // The model is fine for the next utterance.
    assert!(!whisper.transcribe(&audio).unwrap().text.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_whisper_fails_one_transcription_not_the_next() {
    let Some((e, _turn)) = engines() else { return };
    let audio = librivox("0880");
    e.stt.panic_on_next_job();
    let failed = e.stt.transcribe(audio.clone()).await;
    assert!(failed.is_err(), "{failed:?}");
    // The stream interface too: the next session's utterance is transcribed.
    assert!(!recognize(&e.stt, &audio).await.is_empty());
    assert!(!e.stt.transcribe(audio).await.unwrap().is_empty());
}

/// Piper samples noise inside the model (the voice's `noise_scale` and `noise_w`: VITS draws
/// its latent and its phoneme durations), so a sentence is never twice the same samples, alone
/// or not; what must hold at once is what holds alone: the same length within the duration
/// noise, and words Whisper understands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_syntheses_at_once_sound_like_each_alone() {
    let Some((e, _turn)) = engines() else { return };
    let a = "Paris is the capital of France.";
    let b = "The weather is lovely today, so we are going to the park.";
    let (alone_a, rate) = e.piper.synthesize(a).await.unwrap();
    let (alone_b, _) = e.piper.synthesize(b).await.unwrap();
    let (both_a, both_b) = tokio::join!(e.piper.synthesize(a), e.piper.synthesize(b));
    let (both_a, both_b) = (both_a.unwrap().0, both_b.unwrap().0);
    eprintln!(
        "alone {} and {} samples, at once {} and {} at {rate} Hz",
        alone_a.len(),
        alone_b.len(),
        both_a.len(),
        both_b.len()
    );
    for (text, alone, both) in [(a, &alone_a, &both_a), (b, &alone_b, &both_b)] {
        let ratio = both.len() as f64 / alone.len() as f64;
        assert!(
            (0.8..1.25).contains(&ratio),
            "{text:?}: {ratio:.2} of its length alone"
        );
        let heard = recognize(&e.stt, &resample(both, rate, 16_000)).await;
        // Whisper tiny.en on the voice's sampling noise sometimes mishears a word or two of a
        // six-word sentence ("Carishes the capital of France"); a broken synthesis (silence,
        // noise, a cut sentence) misses most of them.
        assert!(
            wer(text, &heard) <= 0.35,
            "Whisper heard {heard:?} for {text:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_piper_fails_one_sentence_not_the_next() {
    let Some((e, _turn)) = engines() else { return };
    e.piper.panic_on_next_job();
    assert!(e.piper.synthesize("Hello there.").await.is_err());
    let (audio, _) = synthesize(&e.piper, "Hello there.").await;
    assert!(audio.len() > 10_000, "{} samples", audio.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_llm_fails_one_answer_not_the_next() {
    let Some((e, _turn)) = engines() else { return };
    for llm in [&e.llm, &e.candle] {
        llm.panic_on_next_job();
        let mut stream = llm.stream(request("What is the capital of France?"));
        match stream.next().await {
            Some(Err(err)) => eprintln!("failed as it should: {err}"),
            other => panic!("expected the answer to fail, got {other:?}"),
        }
        drop(stream);
        answers_and_stops(llm).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_dropped_while_the_serial_llm_is_busy_never_starts() {
    let Some((e, _turn)) = engines() else { return };
    let started = e.seen.started(Engine::Llm);
    let mut essay = request("Write a long essay about the history of the Roman Empire.");
    essay.messages[0] = ChatMessage::new(Role::System, "You write long, detailed essays.");
    let mut running = e.candle.stream(essay);
    for _ in 0..3 {
        assert!(matches!(running.next().await, Some(Ok(LlmEvent::Delta(_)))));
    }
    // A second turn waits for the model; its user barges in before it starts.
    let waiting = e.candle.stream(request("What is the capital of France?"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(waiting);
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(running);
    let dropped = Instant::now();
    while !e.candle.is_idle() {
        assert!(dropped.elapsed() < Duration::from_secs(2), "still busy");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Give a wrongly started second turn the time to take the model.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(e.candle.is_idle(), "the dropped turn took the model");
    assert_eq!(
        e.seen.started(Engine::Llm),
        started + 1,
        "only the essay started"
    );
}

/// The decoder that caches its keys and values picks the tokens candle's decoder picks (which
/// feeds the whole sequence again at each step), on every recorded LibriVox clip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cached_whisper_decoder_transcribes_as_the_uncached_one() {
    let Some((_e, _turn)) = engines() else { return };
    let mut whisper = duplex_local::whisper::WhisperModel::load(&ModelDir::from_env().whisper())
        .unwrap_or_else(|e| panic!("{e}"));
    let transcripts = std::fs::read_to_string(format!("{LIBRIVOX}/transcription")).unwrap();
    let mut compared = 0;
    for line in transcripts.lines() {
        let id = line.rsplit_once('(').unwrap().1.trim_end_matches(')');
        let audio: Vec<f32> = read_wav_16k(&format!("{LIBRIVOX}/{id}.wav"))
            .iter()
            .map(|&s| f32::from(s) / 32768.0)
            .collect();
        let (t, cached) = (Instant::now(), whisper.transcribe(&audio).unwrap());
        let cached_time = t.elapsed();
        let (t, reference) = (
            Instant::now(),
            whisper.transcribe_reference(&audio).unwrap(),
        );
        eprintln!(
            "{id}: cached {cached_time:?}, uncached {:?}: {:?}",
            t.elapsed(),
            cached.text
        );
        assert!(!reference.text.is_empty(), "{id}");
        assert_eq!(cached.text, reference.text, "{id}");
        assert_eq!(cached.guard, reference.guard, "{id}");
        assert!(
            (cached.no_speech_prob - reference.no_speech_prob).abs() < 1e-3,
            "{id}: {cached:?} {reference:?}"
        );
        compared += 1;
    }
    assert!(compared >= 5, "{compared} clips");
}
