//! Speaks a sentence in the Piper voice into a 16 kHz WAV, e.g. a question to replay against
//! the server: `cargo run --release -p duplex-local --example say -- "What time is it?" q.wav`.
//! The text also goes to `q.txt`, which `duplex-replay` reads as the reference transcript.

use std::path::PathBuf;

use duplex_local::ModelDir;
use duplex_local::piper::PiperVoice;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(text), Some(out)) = (args.next(), args.next().map(PathBuf::from)) else {
        return Err("usage: say TEXT OUT.wav".into());
    };
    let dir = ModelDir::from_env();
    let mut voice = PiperVoice::load(
        &dir.require(dir.piper_voice())?,
        &dir.require(dir.onnxruntime())?,
        duplex_local::models::compute_threads(),
    )?;
    let samples = voice.synthesize(&text)?;
    // Linear interpolation to 16 kHz, then 300 ms of silence before the speech.
    let ratio = voice.sample_rate as f64 / 16_000.0;
    let n = (samples.len() as f64 / ratio) as usize;
    let mut out16 = vec![0i16; 4_800];
    out16.extend((0..n).map(|i| {
        let x = i as f64 * ratio;
        let j = x as usize;
        let (a, b) = (
            samples[j] as f64,
            samples[(j + 1).min(samples.len() - 1)] as f64,
        );
        (a + (b - a) * (x - j as f64)) as i16
    }));
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 16_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(&out, spec)?;
    for s in out16 {
        w.write_sample(s)?;
    }
    w.finalize()?;
    std::fs::write(out.with_extension("txt"), format!("{text}\n"))?;
    Ok(())
}
