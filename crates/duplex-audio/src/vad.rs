//! Voice activity detection on 16 kHz (or 8 kHz) frames: a `Send` wrapper around
//! `webrtc_vad::Vad`.
//!
//! The wrapper exists for three pitfalls of webrtc-vad 0.4 (docs/dependencies.md): its `Vad`
//! is not `Send`, so a session actor could not own it; an empty slice panics and a frame that is
//! not 10, 20 or 30 ms is rejected; and `reset()` silently switches it to 8 kHz. Here the rate is
//! fixed when the detector is built, lengths are checked before the C code sees them, and
//! "reset" builds a new instance instead of calling `reset()`.
//!
//! libfvad classifies every rate at 8 kHz internally (it downsamples 16, 32 and 48 kHz input
//! first). So a stream that arrives at 8 kHz (telephony) is classified on its own samples
//! ([`Vad::with_rate`] at [`VAD_RATE_8K`]) instead of being upsampled to 16 kHz only to be
//! downsampled again inside the detector.

use crate::AudioError;

/// The rate [`Vad::new`] runs at: the pipeline's internal rate.
pub const VAD_RATE: u32 = 16000;

/// The telephony rate, which the detector also takes directly ([`Vad::with_rate`]).
pub const VAD_RATE_8K: u32 = 8000;

/// Frame lengths libfvad accepts at 16 kHz: 10, 20 and 30 ms.
pub const VAD_FRAME_LENS: [usize; 3] = [160, 320, 480];

/// Frame lengths libfvad accepts at 8 kHz: 10, 20 and 30 ms.
pub const VAD_FRAME_LENS_8K: [usize; 3] = [80, 160, 240];

/// How eagerly frames are classified as speech (libfvad's modes, least to most aggressive
/// about rejecting non-speech).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VadMode {
    /// Most permissive: reports speech readily; for clean, quiet input.
    Quality,
    /// Slightly stricter.
    LowBitrate,
    /// Stricter; a good default for desktop and phone microphones.
    #[default]
    Aggressive,
    /// Strictest: fewest false positives in noise, may clip soft speech.
    VeryAggressive,
}

impl VadMode {
    fn to_webrtc(self) -> webrtc_vad::VadMode {
        match self {
            VadMode::Quality => webrtc_vad::VadMode::Quality,
            VadMode::LowBitrate => webrtc_vad::VadMode::LowBitrate,
            VadMode::Aggressive => webrtc_vad::VadMode::Aggressive,
            VadMode::VeryAggressive => webrtc_vad::VadMode::VeryAggressive,
        }
    }
}

/// A voice activity detector at 16 kHz ([`Vad::new`]) or 8 kHz ([`Vad::with_rate`]).
pub struct Vad {
    inner: webrtc_vad::Vad,
    mode: VadMode,
    rate: u32,
}

// SAFETY: `webrtc_vad::Vad` is a raw pointer to a libfvad instance (`Fvad*`) that it allocates
// in `fvad_new`, frees in `Drop`, and never hands out or clones. libfvad keeps all its state in
// that instance (no globals, no thread-locals), so moving the owner to another thread moves the
// only access path with it. `Vad` is deliberately not `Sync` and all calls take `&mut self`, so
// the instance is never used from two threads at once.
unsafe impl Send for Vad {}

impl std::fmt::Debug for Vad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vad")
            .field("mode", &self.mode)
            .field("rate", &self.rate)
            .finish()
    }
}

impl Vad {
    /// Creates a 16 kHz detector in the given mode.
    pub fn new(mode: VadMode) -> Vad {
        Vad::with_rate(VAD_RATE, mode).expect("16 kHz is a detector rate")
    }

    /// Creates a detector for [`VAD_RATE`] or [`VAD_RATE_8K`] audio;
    /// `Err(UnsupportedSampleRate)` for any other rate.
    pub fn with_rate(rate: u32, mode: VadMode) -> Result<Vad, AudioError> {
        let webrtc_rate = match rate {
            VAD_RATE => webrtc_vad::SampleRate::Rate16kHz,
            VAD_RATE_8K => webrtc_vad::SampleRate::Rate8kHz,
            other => return Err(AudioError::UnsupportedSampleRate(other)),
        };
        let inner = webrtc_vad::Vad::new_with_rate_and_mode(webrtc_rate, mode.to_webrtc());
        Ok(Vad { inner, mode, rate })
    }

    /// The mode it was created with.
    pub fn mode(&self) -> VadMode {
        self.mode
    }

    /// The rate it classifies.
    pub fn rate(&self) -> u32 {
        self.rate
    }

    /// Classifies one 10, 20 or 30 ms frame at the detector's rate.
    ///
    /// Any other length (including empty) is `AudioError::VadFrameLength` and never reaches
    /// the C code.
    pub fn is_voiced(&mut self, frame: &[i16]) -> Result<bool, AudioError> {
        let lens = if self.rate == VAD_RATE_8K {
            VAD_FRAME_LENS_8K
        } else {
            VAD_FRAME_LENS
        };
        if !lens.contains(&frame.len()) {
            return Err(AudioError::VadFrameLength(frame.len()));
        }
        self.inner
            .is_voice_segment(frame)
            .map_err(|()| AudioError::VadFrameLength(frame.len()))
    }

    /// Forgets the detector's adaptive noise state by building a fresh instance (never via
    /// `webrtc_vad::Vad::reset`, which switches the rate to 8 kHz).
    pub fn reset(&mut self) {
        *self = Vad::with_rate(self.rate, self.mode).expect("the rate was accepted before");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vowel-like harmonic signal: 150 Hz fundamental with formant-ish overtones, 20 ms
    /// at `rate` from sample `offset`.
    fn voiced_frame_at(rate: usize, offset: usize) -> Vec<i16> {
        (0..rate / 50)
            .map(|i| {
                let t = (offset + i) as f64 / rate as f64;
                let s: f64 = [(150.0, 1.0), (300.0, 0.6), (700.0, 0.5), (1200.0, 0.3)]
                    .iter()
                    .map(|(f, a)| a * (2.0 * std::f64::consts::PI * f * t).sin())
                    .sum();
                (s * 6000.0) as i16
            })
            .collect()
    }

    fn voiced_frame(offset: usize) -> Vec<i16> {
        voiced_frame_at(16000, offset)
    }

    #[test]
    fn wrong_lengths_are_errors_not_panics() {
        let mut vad = Vad::new(VadMode::Aggressive);
        for len in [0, 1, 159, 161, 319, 640] {
            assert!(
                matches!(vad.is_voiced(&vec![0; len]), Err(AudioError::VadFrameLength(l)) if l == len),
                "{len}"
            );
        }
        for len in VAD_FRAME_LENS {
            assert!(!vad.is_voiced(&vec![0; len]).unwrap(), "{len}");
        }
    }

    #[test]
    fn silence_is_unvoiced_and_tone_is_voiced_even_after_reset() {
        let mut vad = Vad::new(VadMode::Quality);
        for round in 0..2 {
            let silent = (0..10).any(|_| vad.is_voiced(&[0; 320]).unwrap());
            assert!(!silent, "round {round}");
            let voiced = (0..25)
                .filter(|i| vad.is_voiced(&voiced_frame(i * 320)).unwrap())
                .count();
            assert!(voiced >= 20, "round {round}: {voiced}/25 voiced");
            // The second round checks that reset kept 16 kHz: at 8 kHz, 320 samples would be
            // 40 ms, which libfvad rejects, and `is_voiced` would return an error.
            vad.reset();
        }
    }

    fn voiced_frame_8k(offset: usize) -> Vec<i16> {
        voiced_frame_at(8000, offset)
    }

    #[test]
    fn an_8k_detector_takes_8k_frames_only_and_keeps_its_rate_after_reset() {
        assert_eq!(
            Vad::with_rate(11025, VadMode::Quality).unwrap_err(),
            AudioError::UnsupportedSampleRate(11025)
        );
        let mut vad = Vad::with_rate(VAD_RATE_8K, VadMode::Quality).unwrap();
        for round in 0..2 {
            assert_eq!(vad.rate(), VAD_RATE_8K);
            for len in [0, 79, 320, 480] {
                assert!(
                    matches!(vad.is_voiced(&vec![0; len]), Err(AudioError::VadFrameLength(l)) if l == len),
                    "round {round}: {len}"
                );
            }
            let silent = (0..10).any(|_| vad.is_voiced(&[0; 160]).unwrap());
            assert!(!silent, "round {round}");
            let voiced = (0..25)
                .filter(|i| vad.is_voiced(&voiced_frame_8k(i * 160)).unwrap())
                .count();
            assert!(voiced >= 20, "round {round}: {voiced}/25 voiced");
            vad.reset();
        }
    }

    #[test]
    fn is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<Vad>();
    }
}
