//! Sample-rate conversion of mono `i16` streams fed in chunks of any length.
//!
//! Wraps rubato 5's synchronous FFT resampler (`Fft`, fixed block size on both sides). rubato
//! wants whole blocks, so [`Resampler`] keeps the partial block between calls and runs one FFT
//! block whenever it fills: the output is the same whatever the input chunking. Equal rates are
//! a passthrough that never touches rubato.

use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Resampler as _, WindowFunction};

use crate::AudioError;

/// Rates the server accepts from clients and produces from TTS providers.
pub const SUPPORTED_RATES: [u32; 6] = [8000, 16000, 22050, 24000, 44100, 48000];

/// FFT block length target in milliseconds of input. 20 ms matches the client frame length, so a
/// client frame completes a block without waiting; rubato's delay is half an output block
/// (10 ms), and a 20 ms block keeps the anti-alias cutoff near Nyquist (about 3.66 kHz for
/// 8 kHz input) where a 10 ms block would drop it to about 3.3 kHz.
const BLOCK_MS: u32 = 20;

/// Converts a mono `i16` stream from one sample rate to another.
pub struct Resampler {
    from_rate: u32,
    to_rate: u32,
    /// `None` when the rates are equal.
    fft: Option<FftState>,
}

struct FftState {
    fft: Fft<f32>,
    /// Input block, filled up to `filled`.
    block_in: Vec<f32>,
    filled: usize,
    block_out: Vec<f32>,
    /// Input samples accepted and output samples produced since creation or the last flush;
    /// `flush` uses them to emit exactly the output the input is worth.
    samples_in: u64,
    samples_out: u64,
}

impl std::fmt::Debug for Resampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resampler")
            .field("from_rate", &self.from_rate)
            .field("to_rate", &self.to_rate)
            .field("block_in", &self.fft.as_ref().map(|s| s.block_in.len()))
            .field("delay_samples", &self.delay_samples())
            .finish()
    }
}

impl Resampler {
    /// Creates a resampler between two of the [`SUPPORTED_RATES`].
    pub fn new(from_rate: u32, to_rate: u32) -> Result<Resampler, AudioError> {
        for rate in [from_rate, to_rate] {
            if !SUPPORTED_RATES.contains(&rate) {
                return Err(AudioError::UnsupportedSampleRate(rate));
            }
        }
        if from_rate == to_rate {
            return Ok(Resampler {
                from_rate,
                to_rate,
                fft: None,
            });
        }
        let wanted_block = (from_rate * BLOCK_MS / 1000) as usize;
        // With `FixedSync::Both` rubato rounds the block up to a multiple of the smallest block
        // the rate pair allows (e.g. 441 input samples for 44.1 kHz -> 16 kHz) and processes
        // it as a single FFT, so `sub_chunks` is irrelevant and set to 1.
        let fft = Fft::<f32>::new_custom(
            from_rate as usize,
            to_rate as usize,
            wanted_block,
            1,
            1,
            WindowFunction::BlackmanHarris2,
            FixedSync::Both,
        )
        .map_err(|e| AudioError::Resampler(e.to_string()))?;
        let block_in = vec![0.0; fft.input_frames_next()];
        let block_out = vec![0.0; fft.output_frames_next()];
        Ok(Resampler {
            from_rate,
            to_rate,
            fft: Some(FftState {
                fft,
                block_in,
                filled: 0,
                block_out,
                samples_in: 0,
                samples_out: 0,
            }),
        })
    }

    /// Input sample rate.
    pub fn from_rate(&self) -> u32 {
        self.from_rate
    }

    /// Output sample rate.
    pub fn to_rate(&self) -> u32 {
        self.to_rate
    }

    /// Input samples per internal block (1 for a passthrough).
    pub fn chunk_size(&self) -> usize {
        self.fft.as_ref().map_or(1, |s| s.block_in.len())
    }

    /// How many output samples any input event is delayed by (leading samples of the stream
    /// that come from the resampler's zero history, not from the input). 0 for a passthrough.
    pub fn delay_samples(&self) -> usize {
        self.fft.as_ref().map_or(0, |s| s.fft.output_delay())
    }

    /// Resamples `input`, of any length, appending whatever output is ready to `out`.
    pub fn process(&mut self, input: &[i16], out: &mut Vec<i16>) {
        let Some(state) = self.fft.as_mut() else {
            out.extend_from_slice(input);
            return;
        };
        state.samples_in += input.len() as u64;
        let mut rest = input;
        while !rest.is_empty() {
            let take = (state.block_in.len() - state.filled).min(rest.len());
            let (now, later) = rest.split_at(take);
            for (dst, &src) in state.block_in[state.filled..].iter_mut().zip(now) {
                *dst = f32::from(src) * (1.0 / 32768.0);
            }
            state.filled += take;
            rest = later;
            if state.filled == state.block_in.len() {
                state.run_block(out, usize::MAX);
            }
        }
    }

    /// Ends the stream: pushes the buffered partial block and the resampler's delay line through
    /// with zero padding, appending exactly the output still owed so that the whole stream's
    /// output is `delay_samples() + ceil(input_len * to_rate / from_rate)` samples. Afterwards
    /// the resampler starts a fresh stream.
    pub fn flush(&mut self, out: &mut Vec<i16>) {
        let Some(state) = self.fft.as_mut() else {
            return;
        };
        if state.samples_in == 0 {
            return;
        }
        let owed = state.fft.output_delay() as u64
            + (state.samples_in * u64::from(self.to_rate)).div_ceil(u64::from(self.from_rate));
        while state.samples_out < owed {
            state.block_in[state.filled..].fill(0.0);
            let limit = (owed - state.samples_out) as usize;
            state.run_block(out, limit);
        }
        state.fft.reset();
        state.filled = 0;
        state.samples_in = 0;
        state.samples_out = 0;
    }
}

impl FftState {
    /// Resamples the full input block and appends at most `limit` output samples.
    fn run_block(&mut self, out: &mut Vec<i16>, limit: usize) {
        let frames_in = self.block_in.len();
        let frames_out = self.block_out.len();
        let input = InterleavedSlice::new(&self.block_in[..], 1, frames_in)
            .expect("block_in holds exactly one mono block");
        let mut output = InterleavedSlice::new_mut(&mut self.block_out[..], 1, frames_out)
            .expect("block_out holds exactly one mono block");
        self.fft
            .process_into_buffer(&input, &mut output, None)
            .expect("buffers are sized from the resampler's own block sizes");
        self.filled = 0;
        let produced = frames_out.min(limit);
        out.extend(self.block_out[..produced].iter().map(|&x| to_i16(x)));
        self.samples_out += produced as u64;
    }
}

/// Full scale `f32` to `i16`, rounding half away from zero like `f32::round`, which on the
/// baseline x86-64 target (no SSE4.1 `roundss`) is a libm call per sample: `roundf` was ~2 %
/// of the server's CPU in echo mode (perf, 450 mu-law calls). `as` saturates, so overshoot
/// from the anti-alias filter clips instead of wrapping.
#[inline]
fn to_i16(x: f32) -> i16 {
    let v = x * 32768.0;
    (v + 0.5f32.copysign(v)) as i16
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(rate: u32, freq: f64, secs: f64) -> Vec<i16> {
        let n = (f64::from(rate) * secs) as usize;
        (0..n)
            .map(|i| {
                let t = i as f64 / f64::from(rate);
                // 0.5 full scale: loud, with headroom for filter ripple.
                (16384.0 * (2.0 * std::f64::consts::PI * freq * t).sin()) as i16
            })
            .collect()
    }

    /// Sign changes, a frequency estimate that needs no FFT.
    fn zero_crossings(samples: &[i16]) -> usize {
        samples
            .windows(2)
            .filter(|w| (w[0] < 0) != (w[1] < 0))
            .count()
    }

    #[test]
    fn sine_keeps_frequency_and_length() {
        for (from, to) in [
            (48000, 16000),
            (8000, 16000),
            (44100, 16000),
            (22050, 48000),
        ] {
            let secs = 1.0;
            let input = sine(from, 440.0, secs);
            let mut rs = Resampler::new(from, to).unwrap();
            let mut out = Vec::new();
            rs.process(&input, &mut out);
            let expected_len = (input.len() as u64 * u64::from(to) / u64::from(from)) as usize;
            let slack = rs.chunk_size() * to as usize / from as usize + rs.delay_samples();
            assert!(
                out.len().abs_diff(expected_len) <= slack,
                "{from}->{to}: {} samples, expected {expected_len} +- {slack}",
                out.len()
            );
            // Skip the delay so only resampled signal is counted; compare crossings per second.
            let signal = &out[rs.delay_samples()..];
            let measured = zero_crossings(signal) as f64 * f64::from(to) / signal.len() as f64;
            let expected = 2.0 * 440.0;
            assert!(
                (measured - expected).abs() / expected < 0.02,
                "{from}->{to}: {measured} crossings/s"
            );
            // Amplitude survives too (a passband gain of ~1): peak near 16384.
            let peak = signal.iter().map(|s| s.unsigned_abs()).max().unwrap();
            assert!((15500..=17300).contains(&peak), "{from}->{to}: peak {peak}");
        }
    }

    #[test]
    fn output_is_independent_of_chunking() {
        for (from, to) in [
            (48000, 16000),
            (22050, 8000),
            (24000, 48000),
            (16000, 16000),
        ] {
            let input = sine(from, 440.0, 0.7);
            let mut one = Resampler::new(from, to).unwrap();
            let mut whole = Vec::new();
            one.process(&input, &mut whole);
            one.flush(&mut whole);

            let mut many = Resampler::new(from, to).unwrap();
            let mut pieces = Vec::new();
            let sizes = [1, 7, 13, 160, 331, 0, 2, 999];
            let mut rest = &input[..];
            for size in sizes.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (now, later) = rest.split_at((*size).min(rest.len()));
                many.process(now, &mut pieces);
                rest = later;
            }
            many.flush(&mut pieces);
            assert_eq!(pieces.len(), whole.len(), "{from}->{to}");
            assert_eq!(pieces, whole, "{from}->{to}");
            let expected = rs_owed(&one, input.len());
            assert_eq!(whole.len(), expected, "{from}->{to}");
        }
    }

    fn rs_owed(rs: &Resampler, input_len: usize) -> usize {
        rs.delay_samples() + (input_len * rs.to_rate() as usize).div_ceil(rs.from_rate() as usize)
    }

    #[test]
    fn flush_starts_a_fresh_stream() {
        let input = sine(24000, 440.0, 0.3);
        let mut rs = Resampler::new(24000, 16000).unwrap();
        let mut first = Vec::new();
        rs.process(&input, &mut first);
        rs.flush(&mut first);
        let mut second = Vec::new();
        rs.process(&input, &mut second);
        rs.flush(&mut second);
        assert_eq!(first, second);
        // Flushing an empty stream emits nothing.
        rs.flush(&mut second);
        assert_eq!(first.len(), second.len());
    }

    #[test]
    fn every_supported_pair_constructs() {
        for from in SUPPORTED_RATES {
            for to in SUPPORTED_RATES {
                let mut rs = Resampler::new(from, to).unwrap();
                let mut out = Vec::new();
                rs.process(&sine(from, 440.0, 0.1), &mut out);
                rs.flush(&mut out);
                assert_eq!(out.len(), rs_owed(&rs, from as usize / 10), "{from}->{to}");
                // Blocks stay short so resampling adds little latency: at most 40 ms of input.
                assert!(rs.chunk_size() <= from as usize / 25, "{from}->{to}");
            }
        }
    }

    #[test]
    fn conversion_rounds_half_away_from_zero_and_saturates() {
        for x in [
            0.0f32, 0.3, -0.3, 1.0, -1.0, 1.5, -1.5, 2.5, -2.5, 100.49, -100.51,
        ] {
            let f = x / 32768.0;
            assert_eq!(to_i16(f), (f * 32768.0).round() as i16, "{x}");
        }
        assert_eq!(to_i16(1.5), i16::MAX);
        assert_eq!(to_i16(-1.5), i16::MIN);
    }

    #[test]
    fn unsupported_rates_are_errors() {
        assert!(matches!(
            Resampler::new(11025, 16000),
            Err(AudioError::UnsupportedSampleRate(11025))
        ));
        assert!(matches!(
            Resampler::new(16000, 0),
            Err(AudioError::UnsupportedSampleRate(0))
        ));
    }

    #[test]
    fn passthrough_copies() {
        let mut rs = Resampler::new(16000, 16000).unwrap();
        let mut out = Vec::new();
        rs.process(&[1, 2, 3], &mut out);
        rs.flush(&mut out);
        assert_eq!(out, [1, 2, 3]);
        assert_eq!(rs.delay_samples(), 0);
    }
}
