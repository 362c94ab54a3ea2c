//! End-to-end tests of the front end on real (synthesized) speech.
//!
//! The speech comes from `espeak-ng` at test time. Without it the speech test is skipped with a
//! loud message, unless `CI` is set: CI installs espeak-ng, so there its absence is a failure.

use std::path::PathBuf;
use std::process::Command;

use duplex_audio::codec::{encode_mulaw, encode_pcm16};
use duplex_audio::{EndpointConfig, FrontEnd, FrontEndConfig, FrontEndEvent, Resampler, VadMode};
use duplex_proto::Encoding;

const SENTENCE: &str = "Hello, this is a test of the voice activity detector.";

/// Silence added before and after the speech.
const PAD_MS: u64 = 1000;

/// Synthesizes `SENTENCE` with espeak-ng; `None` if espeak-ng is not installed outside CI.
fn espeak() -> Option<(u32, Vec<i16>)> {
    let path: PathBuf =
        std::env::temp_dir().join(format!("duplex-audio-speech-{}.wav", std::process::id()));
    let status = Command::new("espeak-ng")
        .arg("-w")
        .arg(&path)
        .arg(SENTENCE)
        .status();
    match status {
        Ok(status) => assert!(status.success(), "espeak-ng failed: {status}"),
        Err(e) => {
            if std::env::var_os("CI").is_some() {
                panic!("CI is set but espeak-ng cannot run ({e}); install the espeak-ng package");
            }
            eprintln!("\n!!!!!! SKIPPING the real-speech VAD test: espeak-ng not found ({e}).");
            eprintln!("!!!!!! Install it (apt-get install espeak-ng) to run this test.\n");
            return None;
        }
    }
    let mut reader = hound::WavReader::open(&path).expect("espeak-ng wrote a WAV");
    let spec = reader.spec();
    assert_eq!((spec.channels, spec.bits_per_sample), (1, 16), "{spec:?}");
    let samples: Vec<i16> = reader.samples::<i16>().map(Result::unwrap).collect();
    std::fs::remove_file(&path).expect("remove the temporary WAV");
    Some((spec.sample_rate, samples))
}

/// Resamples a whole clip (process + flush), dropping the resampler's leading delay.
fn resample(from: u32, to: u32, input: &[i16]) -> Vec<i16> {
    let mut rs = Resampler::new(from, to).unwrap();
    let mut out = Vec::new();
    rs.process(input, &mut out);
    rs.flush(&mut out);
    out.drain(..rs.delay_samples());
    out
}

/// The span [first, last] of samples louder than -36 dBFS, in ms: where the speech is.
fn loud_span_ms(rate: u32, samples: &[i16]) -> (u64, u64) {
    let loud = |s: &i16| s.unsigned_abs() > 500;
    let first = samples.iter().position(loud).expect("some speech");
    let last = samples.iter().rposition(loud).expect("some speech");
    let ms = |i: usize| i as u64 * 1000 / u64::from(rate);
    (ms(first), ms(last))
}

/// Pushes the clip in 20 ms client frames and returns the start and stop events.
fn run(encoding: Encoding, rate: u32, samples: &[i16]) -> Vec<FrontEndEvent> {
    let mut fe = FrontEnd::new(FrontEndConfig {
        encoding,
        input_rate: rate,
        vad_mode: VadMode::Aggressive,
        endpoint: EndpointConfig {
            speech_start_ms: 60,
            end_of_turn_ms: 700,
            ..Default::default()
        },
    })
    .unwrap();
    let mut events = Vec::new();
    let mut bytes = Vec::new();
    for chunk in samples.chunks(rate as usize / 50) {
        bytes.clear();
        match encoding {
            Encoding::Pcm16 => encode_pcm16(chunk, &mut bytes),
            Encoding::Mulaw => encode_mulaw(chunk, &mut bytes),
        }
        fe.push(&bytes, &mut events).unwrap();
    }
    let frames = events
        .iter()
        .filter(|e| matches!(e, FrontEndEvent::Frame { .. }))
        .count();
    // Every 20 ms of input became a frame, but for the resampler's last block and delay.
    let expected = samples.len() as u64 * 50 / u64::from(rate);
    assert!(
        expected - frames as u64 <= 2,
        "{frames} frames for {expected}"
    );
    events.retain(|e| !matches!(e, FrontEndEvent::Frame { .. }));
    events
}

#[test]
fn real_speech_is_one_turn_at_every_client_rate() {
    let Some((native_rate, speech)) = espeak() else {
        return;
    };
    let pad = vec![0i16; (PAD_MS * u64::from(native_rate) / 1000) as usize];
    let clip: Vec<i16> = [&pad[..], &speech, &pad].concat();
    let (loud_from, loud_to) = loud_span_ms(native_rate, &clip);
    assert!(
        loud_to - loud_from > 2000,
        "espeak-ng said the sentence in {loud_from}..{loud_to}"
    );

    for (encoding, rate) in [
        (Encoding::Pcm16, 16000),
        (Encoding::Pcm16, 48000),
        (Encoding::Mulaw, 8000),
    ] {
        let input = resample(native_rate, rate, &clip);
        let events = run(encoding, rate, &input);
        let label = format!("{encoding:?}@{rate}: {events:?}");
        let [
            FrontEndEvent::SpeechStarted { audio_ms: start },
            FrontEndEvent::SpeechStopped { audio_ms: stop },
        ] = events[..]
        else {
            panic!("expected exactly one start and one stop, got {label}");
        };
        // 150 ms: espeak-ng's own lead-in silence plus the 60 ms start rule and frame rounding.
        assert!(start.abs_diff(PAD_MS) <= 150, "start {label}");
        // Speech ends where the loud samples end, give or take a soft final consonant
        // ("detector") before, and libfvad's hangover (it keeps reporting speech for a few
        // frames after speech, ~100-200 ms) after.
        eprintln!("loud {loud_from}..{loud_to} ms, {label}");
        assert!(
            stop + 200 >= loud_to && stop <= loud_to + 250,
            "stop vs {loud_to} {label}"
        );
    }
}

#[test]
fn events_do_not_depend_on_client_frame_size() {
    // A synthetic "utterance": 400 ms of a harmonic tone between silences, at 48 kHz.
    let rate = 48000;
    let mut samples = vec![0i16; rate as usize / 2];
    samples.extend((0..rate as usize * 2 / 5).map(|i| {
        let t = i as f64 / f64::from(rate);
        let s: f64 = [(140.0, 1.0), (280.0, 0.7), (650.0, 0.5), (1100.0, 0.3)]
            .iter()
            .map(|(f, a)| a * (2.0 * std::f64::consts::PI * f * t).sin())
            .sum();
        (s * 5000.0) as i16
    }));
    samples.extend(vec![0i16; rate as usize]);
    let mut bytes = Vec::new();
    encode_pcm16(&samples, &mut bytes);

    let config = FrontEndConfig {
        encoding: Encoding::Pcm16,
        input_rate: rate,
        vad_mode: VadMode::Quality,
        endpoint: EndpointConfig::default(),
    };
    let mut reference: Option<Vec<FrontEndEvent>> = None;
    // Frame sizes in bytes, all even: 20 ms, 10 ms, an odd sample count, one big push.
    for size in [1920, 960, 1002, bytes.len()] {
        let mut fe = FrontEnd::new(config).unwrap();
        let mut events = Vec::new();
        for chunk in bytes.chunks(size) {
            fe.push(chunk, &mut events).unwrap();
        }
        let starts = events
            .iter()
            .filter(|e| matches!(e, FrontEndEvent::SpeechStarted { .. }))
            .count();
        assert_eq!(starts, 1, "frame size {size}");
        match &reference {
            None => reference = Some(events),
            Some(reference) => assert!(*reference == events, "frame size {size} differs"),
        }
    }
}

/// Property tests: any bytes a client sends, at any supported rate and encoding, give events
/// or the documented `OddLength` (pcm16 with an odd byte count), never a panic; the front end
/// stays usable after a refused frame.
mod fuzz {
    use duplex_audio::{AudioError, FrontEnd, FrontEndConfig, SUPPORTED_RATES};
    use duplex_proto::Encoding;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn push_takes_any_bytes(
            rate in prop::sample::select(SUPPORTED_RATES.to_vec()),
            mulaw in any::<bool>(),
            frames in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..4000), 1..8),
        ) {
            let encoding = if mulaw { Encoding::Mulaw } else { Encoding::Pcm16 };
            let mut fe = FrontEnd::new(FrontEndConfig {
                encoding,
                input_rate: rate,
                vad_mode: Default::default(),
                endpoint: Default::default(),
            })
            .expect("supported rate");
            let mut events = Vec::new();
            for bytes in &frames {
                match fe.push(bytes, &mut events) {
                    Ok(()) => {}
                    Err(AudioError::OddLength(n)) => {
                        prop_assert!(!mulaw && n % 2 == 1 && n == bytes.len());
                    }
                    Err(e) => prop_assert!(false, "undocumented error {e}"),
                }
            }
        }
    }
}
