//! Cost of `FrontEnd::push` per 20 ms client frame, the path every inbound binary frame takes
//! (and the transport benchmark's echo mode). Prints figures, asserts nothing.
//!
//! Run with `cargo bench -p duplex-audio`.

use std::hint::black_box;
use std::time::Instant;

use duplex_audio::codec::{encode_mulaw, encode_pcm16};
use duplex_audio::{EndpointConfig, FrontEnd, FrontEndConfig, VadMode};
use duplex_proto::Encoding;

/// 10 s of audio per case: long enough to amortise warm-up, short enough to run in a second.
const FRAMES: usize = 500;
/// Passes over the audio; the best pass is reported (least disturbed by other processes).
const PASSES: usize = 5;

/// Alternating 1 s of a harmonic "voice" and 1 s of quiet noise, so the VAD and endpointer see
/// both speech and silence.
fn signal(rate: u32, seconds: usize) -> Vec<i16> {
    let mut noise: u32 = 0x1234_5678;
    (0..rate as usize * seconds)
        .map(|i| {
            let t = i as f64 / f64::from(rate);
            // xorshift: cheap deterministic noise at about -50 dBFS.
            noise ^= noise << 13;
            noise ^= noise >> 17;
            noise ^= noise << 5;
            let hiss = (noise % 200) as f64 - 100.0;
            let voice = if (i / rate as usize).is_multiple_of(2) {
                [(140.0, 1.0), (280.0, 0.7), (650.0, 0.5), (1100.0, 0.3)]
                    .iter()
                    .map(|(f, a)| a * (2.0 * std::f64::consts::PI * f * t).sin())
                    .sum::<f64>()
                    * 5000.0
            } else {
                0.0
            };
            (voice + hiss) as i16
        })
        .collect()
}

fn bench(name: &str, encoding: Encoding, rate: u32) {
    let samples = signal(rate, FRAMES / 50);
    let frames: Vec<Vec<u8>> = samples
        .chunks(rate as usize / 50)
        .map(|chunk| {
            let mut bytes = Vec::new();
            match encoding {
                Encoding::Pcm16 => encode_pcm16(chunk, &mut bytes),
                Encoding::Mulaw => encode_mulaw(chunk, &mut bytes),
            }
            bytes
        })
        .collect();
    let mut best = f64::INFINITY;
    let mut events = Vec::with_capacity(8);
    let mut turns = 0;
    for _ in 0..PASSES {
        let mut fe = FrontEnd::new(FrontEndConfig {
            encoding,
            input_rate: rate,
            vad_mode: VadMode::Aggressive,
            endpoint: EndpointConfig::default(),
        })
        .unwrap();
        turns = 0;
        let start = Instant::now();
        for frame in &frames {
            fe.push(black_box(frame), &mut events).unwrap();
            turns += events
                .iter()
                .filter(|e| matches!(e, duplex_audio::FrontEndEvent::SpeechStarted { .. }))
                .count();
            black_box(&events);
            events.clear();
        }
        let ns = start.elapsed().as_nanos() as f64 / frames.len() as f64;
        best = best.min(ns);
    }
    println!(
        "{name:<12} {best:>8.0} ns per 20 ms frame ({:.3}% of real time, {turns} turns seen)",
        best / 20e6 * 100.0
    );
}

fn main() {
    bench("pcm16@48k", Encoding::Pcm16, 48000);
    bench("pcm16@16k", Encoding::Pcm16, 16000);
    bench("mulaw@8k", Encoding::Mulaw, 8000);
    bench("pcm16@44.1k", Encoding::Pcm16, 44100);
}
