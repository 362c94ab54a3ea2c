//! [`FrontEnd`]: one client's audio stream, from wire bytes to 20 ms frames with VAD decisions
//! and turn boundaries.
//!
//! Called for every client binary frame (50 a second per connection), so steady state does no
//! allocation: the decode, resample and reframe buffers are kept, and frames are carried inline
//! in the events.

use duplex_proto::Encoding;

use crate::endpoint::{EndpointConfig, EndpointEvent, Endpointer, FRAME_MS};
use crate::reframe::Reframer;
use crate::resample::Resampler;
use crate::vad::{VAD_RATE_8K, Vad, VadMode};
use crate::{AudioError, codec};

/// The pipeline's internal rate: what the VAD and the STT providers get.
pub const INTERNAL_RATE: u32 = 16000;

/// Samples in one 20 ms frame at [`INTERNAL_RATE`].
pub const FRAME_SAMPLES: usize = (INTERNAL_RATE as u64 * FRAME_MS / 1000) as usize;

/// How a client's stream is decoded and endpointed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrontEndConfig {
    /// Wire encoding of the client's binary frames.
    pub encoding: Encoding,
    /// Client sample rate; one of [`crate::SUPPORTED_RATES`].
    pub input_rate: u32,
    /// VAD aggressiveness.
    pub vad_mode: VadMode,
    /// Turn-taking thresholds.
    pub endpoint: EndpointConfig,
}

/// What one push produced, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
// Frames are carried inline so that emitting one never allocates; the size difference to the
// small variants is the point, not an accident.
#[allow(clippy::large_enum_variant)]
pub enum FrontEndEvent {
    /// A 20 ms frame of 16 kHz audio.
    Frame {
        /// Position of the frame's first sample.
        audio_ms: u64,
        /// The audio, inline so that emitting a frame never allocates.
        samples: [i16; FRAME_SAMPLES],
        /// The VAD's decision for this frame.
        voiced: bool,
    },
    /// A turn began at `audio_ms` (emitted after the frame that confirmed it).
    SpeechStarted {
        /// Where speech began.
        audio_ms: u64,
    },
    /// A turn ended: `end_of_turn_ms` of silence followed `audio_ms`, or the turn hit
    /// `max_turn_ms`.
    SpeechStopped {
        /// Where speech ended.
        audio_ms: u64,
    },
}

/// The audio front end of one client stream.
#[derive(Debug)]
pub struct FrontEnd {
    encoding: Encoding,
    resampler: Resampler,
    /// Output samples still to drop: the resampler's leading delay, dropped so that `audio_ms`
    /// lines up with the client's own timeline.
    skip: usize,
    decoded: Vec<i16>,
    resampled: Vec<i16>,
    reframer: Reframer,
    /// For 8 kHz input: the client's own samples in 20 ms frames, which the VAD classifies
    /// (libfvad works at 8 kHz internally, so upsampling for it would only be undone inside).
    /// Frame `k` here and frame `k` of `reframer` cover the same 20 ms: both streams start at
    /// the client's first sample (the resampler's delay is skipped), and the upsampled stream
    /// is never ahead of its input, so this one always has the frame ready.
    vad_input: Option<Reframer>,
    vad: Vad,
    endpointer: Endpointer,
    frames: u64,
}

impl FrontEnd {
    /// Builds a front end; `Err(UnsupportedSampleRate)` if the input rate is not supported.
    pub fn new(config: FrontEndConfig) -> Result<FrontEnd, AudioError> {
        let resampler = Resampler::new(config.input_rate, INTERNAL_RATE)?;
        // 100 ms at the client rate: larger than any sane client frame, so no growth in
        // steady state.
        let capacity = config.input_rate as usize / 10;
        let (vad_input, vad) = if config.input_rate == VAD_RATE_8K {
            (
                Some(Reframer::new(FRAME_SAMPLES / 2)),
                Vad::with_rate(VAD_RATE_8K, config.vad_mode)?,
            )
        } else {
            (None, Vad::new(config.vad_mode))
        };
        Ok(FrontEnd {
            encoding: config.encoding,
            skip: resampler.delay_samples(),
            resampler,
            decoded: Vec::with_capacity(capacity),
            resampled: Vec::with_capacity(capacity),
            reframer: Reframer::new(FRAME_SAMPLES),
            vad_input,
            vad,
            endpointer: Endpointer::new(config.endpoint),
            frames: 0,
        })
    }

    /// Decodes, resamples and frames one client binary frame, appending the resulting events
    /// to `events`.
    ///
    /// `Err(OddLength)` for a pcm16 frame with an odd byte count: the frame is dropped and the
    /// front end stays usable.
    pub fn push(
        &mut self,
        bytes: &[u8],
        events: &mut Vec<FrontEndEvent>,
    ) -> Result<(), AudioError> {
        self.decoded.clear();
        match self.encoding {
            Encoding::Pcm16 => {
                if !bytes.len().is_multiple_of(2) {
                    return Err(AudioError::OddLength(bytes.len()));
                }
                codec::decode_pcm16(bytes, &mut self.decoded);
            }
            Encoding::Mulaw => codec::decode_mulaw(bytes, &mut self.decoded),
        }
        self.resampled.clear();
        self.resampler.process(&self.decoded, &mut self.resampled);
        let skipped = self.skip.min(self.resampled.len());
        self.skip -= skipped;
        self.reframer.push(&self.resampled[skipped..]);
        if let Some(vad_input) = &mut self.vad_input {
            vad_input.push(&self.decoded);
        }

        while let Some(frame) = self.reframer.pop() {
            let samples: [i16; FRAME_SAMPLES] = frame
                .try_into()
                .expect("the reframer yields FRAME_SAMPLES-sample frames");
            let voiced = match &mut self.vad_input {
                Some(vad_input) => {
                    let own = vad_input
                        .pop()
                        .expect("the 8 kHz input is never behind its upsampled frames");
                    self.vad
                        .is_voiced(own)
                        .expect("20 ms at 8 kHz is a valid VAD frame length")
                }
                None => self
                    .vad
                    .is_voiced(&samples)
                    .expect("FRAME_SAMPLES is a valid 16 kHz VAD frame length"),
            };
            let audio_ms = self.frames * FRAME_MS;
            self.frames += 1;
            events.push(FrontEndEvent::Frame {
                audio_ms,
                samples,
                voiced,
            });
            match self.endpointer.push(audio_ms, voiced) {
                Some(EndpointEvent::SpeechStarted { audio_ms }) => {
                    events.push(FrontEndEvent::SpeechStarted { audio_ms })
                }
                Some(EndpointEvent::SpeechStopped { audio_ms }) => {
                    events.push(FrontEndEvent::SpeechStopped { audio_ms })
                }
                None => {}
            }
        }
        Ok(())
    }

    /// Forgets any speech in progress (no `SpeechStopped` is emitted for it). Audio and
    /// positions carry on.
    pub fn reset_endpointing(&mut self) {
        self.endpointer.reset();
    }

    /// Whether a turn is in progress.
    pub fn in_speech(&self) -> bool {
        self.endpointer.in_speech()
    }

    /// Position of the next frame: milliseconds of 16 kHz audio emitted so far.
    pub fn audio_ms(&self) -> u64 {
        self.frames * FRAME_MS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(encoding: Encoding, input_rate: u32) -> FrontEndConfig {
        FrontEndConfig {
            encoding,
            input_rate,
            vad_mode: VadMode::Aggressive,
            endpoint: EndpointConfig::default(),
        }
    }

    #[test]
    fn odd_pcm16_frame_is_an_error_and_the_stream_goes_on() {
        let mut fe = FrontEnd::new(config(Encoding::Pcm16, 16000)).unwrap();
        let mut events = Vec::new();
        assert_eq!(
            fe.push(&[0; 641], &mut events),
            Err(AudioError::OddLength(641))
        );
        assert!(events.is_empty());
        fe.push(&[0; 640], &mut events).unwrap();
        assert!(matches!(
            events.as_slice(),
            [FrontEndEvent::Frame {
                audio_ms: 0,
                voiced: false,
                ..
            }]
        ));
        // mu-law has one byte per sample: odd lengths are fine.
        let mut fe = FrontEnd::new(config(Encoding::Mulaw, 8000)).unwrap();
        fe.push(&[0xFF; 161], &mut events).unwrap();
    }

    #[test]
    fn unsupported_rate_is_an_error() {
        assert_eq!(
            FrontEnd::new(config(Encoding::Pcm16, 11025)).unwrap_err(),
            AudioError::UnsupportedSampleRate(11025)
        );
    }

    #[test]
    fn one_second_at_any_rate_makes_about_fifty_frames() {
        for rate in crate::SUPPORTED_RATES {
            for encoding in [Encoding::Pcm16, Encoding::Mulaw] {
                let mut fe = FrontEnd::new(config(encoding, rate)).unwrap();
                let mut events = Vec::new();
                let frame_bytes = rate as usize / 50 * encoding.bytes_per_sample();
                for _ in 0..50 {
                    // Quiet but not digital silence: mu-law 0xFF and pcm16 zero are both 0.
                    fe.push(&vec![0xFF; frame_bytes], &mut events).unwrap();
                }
                let positions: Vec<u64> = events
                    .iter()
                    .filter_map(|ev| match ev {
                        FrontEndEvent::Frame { audio_ms, .. } => Some(*audio_ms),
                        _ => None,
                    })
                    .collect();
                // The resampler holds back up to one block (20 ms) plus its delay (10 ms).
                assert!(
                    (48..=50).contains(&positions.len()),
                    "{rate} {encoding:?}: {}",
                    positions.len()
                );
                let expected: Vec<u64> = (0..positions.len() as u64).map(|i| i * 20).collect();
                assert_eq!(positions, expected, "{rate} {encoding:?}");
                assert_eq!(fe.audio_ms(), positions.len() as u64 * 20);
            }
        }
    }

    #[test]
    fn front_end_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<FrontEnd>();
        assert_send::<Resampler>();
    }
}
