//! Sample-rate conversion of mono `i16` streams fed in chunks of any length.
//!
//! Wraps rubato 5's synchronous FFT resampler (`Fft`, fixed block size on both sides). rubato
//! wants whole blocks, so [`Resampler`] keeps the partial block between calls and runs one FFT
//! block whenever it fills: the output is the same whatever the input chunking. Equal rates are
//! a passthrough that never touches rubato. Doubling the rate (8 -> 16 kHz, every telephony
//! client's path into the pipeline) is a polyphase FIR instead ([`Upsample2`]): per sample, not
//! per block, so it delays by 2.2 ms instead of rubato's 10 ms, and its state is 40 samples
//! per stream (the taps are shared) instead of rubato's FFT plans and buffers. It is a
//! half-band filter, so only one of its two phases is computed, with AVX2 where the CPU has it
//! (chosen at run time; the same arithmetic either way).

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

/// Taps of the 2x interpolation filter, at the output rate. 71 taps with a Kaiser window
/// (beta 7, ~70 dB stopband) give a transition band of ~1 kHz around 4 kHz: flat to ~3.5 kHz
/// (the telephone band ends at 3.4 kHz), images of 8 kHz input above ~4.5 kHz attenuated.
/// Odd, so the delay is a whole number of output samples ((TAPS - 1) / 2 = 35, 2.2 ms).
const UP2_TAPS: usize = 71;
/// Cutoff of the 2x interpolation filter as a fraction of the output rate: a half-band filter
/// (4 kHz at 16 kHz, the input's Nyquist frequency). Every other tap of a half-band filter is
/// zero except the centre one, so the phase that holds the centre is the input sample itself
/// and only the other phase is computed: half the work of a filter with any other cutoff (the
/// resampler was ~22 % of the server's CPU in echo mode at 1,000 mu-law calls before).
const UP2_CUTOFF: f64 = 0.25;
const UP2_KAISER_BETA: f64 = 7.0;

/// Converts a mono `i16` stream from one sample rate to another.
pub struct Resampler {
    from_rate: u32,
    to_rate: u32,
    kind: Kind,
}

enum Kind {
    /// Equal rates.
    Passthrough,
    /// `to_rate == 2 * from_rate`.
    Up2(Upsample2),
    /// Any other pair.
    Fft(Box<FftState>),
}

/// Exact 2x interpolation: zero-stuffing and a windowed-sinc lowpass, as two polyphase
/// filters (even outputs use the even taps, odd outputs the odd ones): two 40-lane dot
/// products per input sample.
struct Upsample2 {
    /// The filter, shared by every stream (one copy in the cache for all sessions).
    taps: &'static Up2Taps,
    /// The last `taps.even.len() - 1` input samples followed by the current chunk.
    buf: Vec<f32>,
    samples_in: u64,
    samples_out: u64,
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
            .field("chunk_size", &self.chunk_size())
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
                kind: Kind::Passthrough,
            });
        }
        if to_rate == 2 * from_rate {
            return Ok(Resampler {
                from_rate,
                to_rate,
                kind: Kind::Up2(Upsample2::new()),
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
            kind: Kind::Fft(Box::new(FftState {
                fft,
                block_in,
                filled: 0,
                block_out,
                samples_in: 0,
                samples_out: 0,
            })),
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

    /// Input samples per internal block (1 for a passthrough or a per-sample filter).
    pub fn chunk_size(&self) -> usize {
        match &self.kind {
            Kind::Fft(s) => s.block_in.len(),
            Kind::Passthrough | Kind::Up2(_) => 1,
        }
    }

    /// How many output samples any input event is delayed by (leading samples of the stream
    /// that come from the resampler's zero history, not from the input). 0 for a passthrough.
    pub fn delay_samples(&self) -> usize {
        match &self.kind {
            Kind::Passthrough => 0,
            Kind::Up2(u) => u.delay(),
            Kind::Fft(s) => s.fft.output_delay(),
        }
    }

    /// Resamples `input`, of any length, appending whatever output is ready to `out`.
    pub fn process(&mut self, input: &[i16], out: &mut Vec<i16>) {
        let state = match &mut self.kind {
            Kind::Passthrough => {
                out.extend_from_slice(input);
                return;
            }
            Kind::Up2(u) => {
                u.process(input, out);
                return;
            }
            Kind::Fft(state) => state,
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
        let state = match &mut self.kind {
            Kind::Passthrough => return,
            Kind::Up2(u) => {
                u.flush(out);
                return;
            }
            Kind::Fft(state) => state,
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

impl Upsample2 {
    fn new() -> Upsample2 {
        let taps = up2_taps();
        Upsample2 {
            buf: vec![0.0; taps.even.len() - 1],
            taps,
            samples_in: 0,
            samples_out: 0,
        }
    }

    /// `(UP2_TAPS - 1) / 2` output samples.
    fn delay(&self) -> usize {
        (UP2_TAPS - 1) / 2
    }

    fn process(&mut self, input: &[i16], out: &mut Vec<i16>) {
        self.samples_in += input.len() as u64;
        let n = input.len();
        let history = self.taps.even.len() - 1;
        self.buf
            .extend(input.iter().map(|&x| f32::from(x) * (1.0 / 32768.0)));
        // Output pair k (input sample k) is sum_j tap[j] * x[k - j]; x[k - j] sits at
        // buf[history + k - j]. The taps are stored reversed and zero-padded to whole lanes, so
        // each output is a dot product of two equal slices with LANES independent partial
        // sums, which the compiler vectorises.
        out.reserve(2 * n);
        let width = self.taps.even.len();
        let (dot, centre) = (self.taps.dot, self.taps.centre);
        for k in 0..n {
            let window = &self.buf[k + history + 1 - width..k + history + 1];
            out.push(to_i16(dot(&self.taps.even, window)));
            // The odd phase is a unit impulse: the input sample, delayed.
            out.push(to_i16(window[centre]));
        }
        self.samples_out += 2 * n as u64;
        // Keep the last `history` samples for the next chunk.
        self.buf.drain(..n);
    }

    fn flush(&mut self, out: &mut Vec<i16>) {
        if self.samples_in == 0 {
            return;
        }
        let owed = self.delay() as u64 + 2 * self.samples_in;
        let missing = owed - self.samples_out;
        let zeros = vec![0i16; missing.div_ceil(2) as usize];
        let keep = out.len() + missing as usize;
        self.process(&zeros, out);
        out.truncate(keep);
        let history = self.taps.even.len() - 1;
        self.buf.clear();
        self.buf.resize(history, 0.0);
        self.samples_in = 0;
        self.samples_out = 0;
    }
}

/// The 2x interpolation filter's two phases. The even one (odd offsets from the centre tap)
/// normalised to unit gain at DC, in reverse order (oldest input sample first) and zero-padded
/// at the front to a whole number of [`LANES`]; the odd one, a half-band filter's centre tap
/// alone, as the position in the same window of the input sample it passes through.
struct Up2Taps {
    even: Vec<f32>,
    centre: usize,
    /// [`dot`], compiled for the widest vectors this CPU has.
    dot: fn(&[f32], &[f32]) -> f32,
}

/// The filter, designed once per process.
fn up2_taps() -> &'static Up2Taps {
    static TAPS: std::sync::OnceLock<Up2Taps> = std::sync::OnceLock::new();
    TAPS.get_or_init(|| {
        let centre = (UP2_TAPS - 1) as f64 / 2.0;
        let i0_beta = bessel_i0(UP2_KAISER_BETA);
        let taps: Vec<f64> = (0..UP2_TAPS)
            .map(|n| {
                let t = n as f64 - centre;
                let x = 2.0 * UP2_CUTOFF * t;
                let sinc = if t == 0.0 {
                    1.0
                } else if t % 2.0 == 0.0 {
                    // A half-band filter's zeros, exactly (sin(pi k) is not 0 in floating
                    // point): the odd phase is then a pure delay.
                    0.0
                } else {
                    (std::f64::consts::PI * x).sin() / (std::f64::consts::PI * x)
                };
                let r = t / centre;
                let window = bessel_i0(UP2_KAISER_BETA * (1.0 - r * r).max(0.0).sqrt()) / i0_beta;
                sinc * window
            })
            .collect();
        // Each phase sums to 1: a constant input gives the same constant at both phases, so
        // no ripple at half the output rate.
        let width = UP2_TAPS.div_ceil(2).next_multiple_of(LANES);
        let phase = |first: usize| -> Vec<f32> {
            let p: Vec<f64> = taps.iter().skip(first).step_by(2).copied().collect();
            let sum: f64 = p.iter().sum();
            let mut reversed = vec![0.0; width - p.len()];
            reversed.extend(p.iter().rev().map(|&c| (c / sum) as f32));
            reversed
        };
        let odd = phase(1);
        let centre = odd
            .iter()
            .position(|&c| c == 1.0)
            .expect("a half-band filter's odd phase is its centre tap");
        assert!(
            odd.iter()
                .enumerate()
                .all(|(i, &c)| i == centre || c == 0.0),
            "a half-band filter's odd phase is a unit impulse"
        );
        Up2Taps {
            even: phase(0),
            centre,
            dot: dot_for_this_cpu(),
        }
    })
}

/// Partial sums of [`dot`]: eight f32 lanes (two SSE registers, one AVX register).
const LANES: usize = 8;

/// [`dot`] compiled for AVX2 when the CPU has it (eight lanes in one register instead of two
/// SSE2 ones), else the baseline build. Same operations in the same order either way (no
/// fused multiply-add), so the output is bit for bit the same on every CPU.
fn dot_for_this_cpu() -> fn(&[f32], &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        return dot_avx2;
    }
    dot
}

#[cfg(target_arch = "x86_64")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    #[target_feature(enable = "avx2")]
    fn inner(a: &[f32], b: &[f32]) -> f32 {
        dot(a, b)
    }
    // SAFETY: chosen by `dot_for_this_cpu` only on a CPU with AVX2.
    unsafe { inner(a, b) }
}

/// Dot product of two slices of the same length, a multiple of [`LANES`].
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    for (ca, cb) in a.chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] += ca[i] * cb[i];
        }
    }
    acc.iter().sum()
}

/// Modified Bessel function of the first kind, order 0 (for the Kaiser window): its power
/// series, to well below f64 precision for the arguments used here.
fn bessel_i0(x: f64) -> f64 {
    let mut sum = 1.0;
    let mut term = 1.0;
    let q = x * x / 4.0;
    for k in 1..50 {
        term *= q / (k * k) as f64;
        sum += term;
        if term < sum * 1e-17 {
            break;
        }
    }
    sum
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
            (8000, 16000),
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

    /// Power of `freq` in `samples` (Goertzel), relative to full scale.
    fn tone_power(samples: &[i16], rate: u32, freq: f64) -> f64 {
        let w = 2.0 * std::f64::consts::PI * freq / f64::from(rate);
        let (mut s1, mut s2) = (0.0, 0.0);
        for &x in samples {
            let s0 = f64::from(x) / 32768.0 + 2.0 * w.cos() * s1 - s2;
            s2 = s1;
            s1 = s0;
        }
        (s1 * s1 + s2 * s2 - 2.0 * w.cos() * s1 * s2) / (samples.len() as f64).powi(2)
    }

    #[test]
    fn doubling_keeps_the_telephone_band_and_rejects_images() {
        let mut rs = Resampler::new(8000, 16000).unwrap();
        assert_eq!(rs.chunk_size(), 1);
        for freq in [300.0, 1000.0, 3000.0, 3400.0] {
            let input = sine(8000, freq, 0.5);
            let mut out = Vec::new();
            rs.process(&input, &mut out);
            rs.flush(&mut out);
            let signal = &out[rs.delay_samples() + 200..out.len() - 200];
            let wanted = tone_power(signal, 16000, freq);
            // The image of f mirrors around the input's Nyquist frequency (4 kHz).
            let image = tone_power(signal, 16000, 8000.0 - freq);
            let gain_db = 10.0 * (wanted / tone_power(&input[200..3800], 8000, freq)).log10();
            let rejection_db = 10.0 * (wanted / image).log10();
            assert!(
                gain_db.abs() < 0.5,
                "{freq} Hz: passband gain {gain_db:.2} dB"
            );
            let floor = if freq < 3300.0 { 60.0 } else { 25.0 };
            assert!(
                rejection_db > floor,
                "{freq} Hz: image at {rejection_db:.1} dB"
            );
        }
    }

    #[test]
    fn the_odd_phase_passes_the_input_through_and_every_cpu_computes_alike() {
        // Every other output sample is an input sample, exactly (the half-band centre tap).
        let input = sine(8000, 1000.0, 0.1);
        let mut rs = Resampler::new(8000, 16000).unwrap();
        let mut out = Vec::new();
        rs.process(&input, &mut out);
        let delay = rs.delay_samples();
        assert_eq!(delay % 2, 1, "the delay puts input samples at odd outputs");
        for (k, &x) in input.iter().enumerate().take(input.len() - delay) {
            assert_eq!(out[2 * k + delay], x, "output {}", 2 * k + delay);
        }
        // The dot product chosen for this CPU gives the baseline's result bit for bit.
        let taps = up2_taps();
        let mut noise: u32 = 7;
        let window: Vec<f32> = (0..taps.even.len())
            .map(|_| {
                noise = noise.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (noise >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect();
        assert_eq!(
            (taps.dot)(&taps.even, &window).to_bits(),
            dot(&taps.even, &window).to_bits()
        );
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
