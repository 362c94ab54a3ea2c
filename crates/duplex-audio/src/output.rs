//! [`OutputStage`]: the mirror of [`crate::FrontEnd`] for assistant speech. Synthesized audio
//! at the provider's rate in, encoded frames of the session's output format out: resample
//! (provider rate → output rate), cut into frames of `frame_ms`, encode (PCM16 or mu-law).
//!
//! Each frame carries the index of the text chunk its first sample came from, so the
//! conversation core can tell which sentence is being heard. Sans-IO like the rest of the
//! crate: the caller passes samples in and takes frames out.

use duplex_proto::Encoding;

use crate::resample::Resampler;
use crate::{AudioError, codec};

/// One encoded output frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputFrame {
    /// Index of the text chunk the frame's first sample belongs to.
    pub index: u32,
    /// The encoded bytes (PCM16 little-endian or mu-law).
    pub bytes: Vec<u8>,
    /// Samples in the frame: `frame_samples`, except for the last frame of a stream.
    pub samples: usize,
}

/// Converts one turn's synthesized audio to the session's output frames.
#[derive(Debug)]
pub struct OutputStage {
    out_rate: u32,
    encoding: Encoding,
    frame_samples: usize,
    /// Built on the first audio at a rate other than the output rate; rebuilt if the provider
    /// changes rate mid-stream (it flushes the old one first).
    resampler: Option<Resampler>,
    /// Output-rate samples not yet making a whole frame.
    pending: Vec<i16>,
    /// Where each text chunk's samples begin in `pending`: (position, chunk index), in order;
    /// the first entry is at 0 whenever `pending` is not empty.
    marks: Vec<(usize, u32)>,
    scratch: Vec<i16>,
}

impl OutputStage {
    /// A stage for output at `out_rate` (one of [`crate::SUPPORTED_RATES`]) in `encoding`,
    /// with frames of `frame_ms`.
    pub fn new(
        out_rate: u32,
        encoding: Encoding,
        frame_ms: u32,
    ) -> Result<OutputStage, AudioError> {
        if !crate::SUPPORTED_RATES.contains(&out_rate) {
            return Err(AudioError::UnsupportedSampleRate(out_rate));
        }
        Ok(OutputStage {
            out_rate,
            encoding,
            frame_samples: (out_rate * frame_ms / 1000) as usize,
            resampler: None,
            pending: Vec::new(),
            marks: Vec::new(),
            scratch: Vec::new(),
        })
    }

    /// The output rate.
    pub fn out_rate(&self) -> u32 {
        self.out_rate
    }

    /// Duration of `samples` output samples.
    pub fn duration_of(&self, samples: usize) -> std::time::Duration {
        std::time::Duration::from_micros(samples as u64 * 1_000_000 / u64::from(self.out_rate))
    }

    /// Takes `samples` at `rate` (text chunk `index`) and appends every whole frame that is
    /// ready to `frames`. `Err` for a rate the resampler cannot convert (the audio is dropped;
    /// the stage stays usable).
    pub fn push(
        &mut self,
        index: u32,
        samples: &[i16],
        rate: u32,
        frames: &mut Vec<OutputFrame>,
    ) -> Result<(), AudioError> {
        if self.marks.last().is_none_or(|&(_, i)| i != index) {
            self.marks.push((self.pending.len(), index));
        }
        if rate == self.out_rate {
            self.pending.extend_from_slice(samples);
        } else {
            if self
                .resampler
                .as_ref()
                .is_some_and(|r| r.from_rate() != rate)
            {
                // The provider changed rate: what the old resampler holds belongs before.
                let mut old = self.resampler.take().expect("checked above");
                self.scratch.clear();
                old.flush(&mut self.scratch);
                self.pending.extend_from_slice(&self.scratch);
            }
            if self.resampler.is_none() {
                self.resampler = Some(Resampler::new(rate, self.out_rate)?);
            }
            self.scratch.clear();
            self.resampler
                .as_mut()
                .expect("set above")
                .process(samples, &mut self.scratch);
            self.pending.extend_from_slice(&self.scratch);
        }
        self.emit(false, frames);
        Ok(())
    }

    /// Ends the stream: flushes the resampler and emits the last, possibly short, frame.
    pub fn finish(&mut self, frames: &mut Vec<OutputFrame>) {
        if let Some(r) = self.resampler.as_mut() {
            self.scratch.clear();
            r.flush(&mut self.scratch);
            self.pending.extend_from_slice(&self.scratch);
        }
        self.emit(true, frames);
    }

    fn emit(&mut self, all: bool, frames: &mut Vec<OutputFrame>) {
        let n = self.frame_samples;
        let mut offset = 0;
        while self.pending.len() - offset >= n || (all && offset < self.pending.len()) {
            let end = (offset + n).min(self.pending.len());
            let frame = &self.pending[offset..end];
            let mut bytes = Vec::with_capacity(frame.len() * 2);
            match self.encoding {
                Encoding::Pcm16 => codec::encode_pcm16(frame, &mut bytes),
                Encoding::Mulaw => codec::encode_mulaw(frame, &mut bytes),
            }
            let index = self
                .marks
                .iter()
                .rev()
                .find(|&&(pos, _)| pos <= offset)
                .map_or(0, |&(_, i)| i);
            frames.push(OutputFrame {
                index,
                bytes,
                samples: frame.len(),
            });
            offset = end;
        }
        self.pending.drain(..offset);
        // Keep the mark the remaining samples start in (moved to 0) and those after it.
        let first = self
            .marks
            .iter()
            .rposition(|&(pos, _)| pos <= offset)
            .unwrap_or(0);
        self.marks.drain(..first);
        for m in &mut self.marks {
            m.0 = m.0.saturating_sub(offset);
        }
        if self.pending.is_empty() {
            self.marks.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(rate: u32, ms: u32) -> Vec<i16> {
        (0..rate * ms / 1000)
            .map(|i| {
                ((i as f64 * 440.0 * std::f64::consts::TAU / rate as f64).sin() * 8000.0) as i16
            })
            .collect()
    }

    #[test]
    fn same_rate_pcm16_is_cut_into_whole_frames_and_a_short_last_one() {
        let mut stage = OutputStage::new(16_000, Encoding::Pcm16, 20).unwrap();
        let mut frames = Vec::new();
        let audio = tone(16_000, 50);
        stage.push(0, &audio, 16_000, &mut frames).unwrap();
        assert_eq!(frames.len(), 2, "two whole 20 ms frames, 10 ms pending");
        assert!(
            frames
                .iter()
                .all(|f| f.samples == 320 && f.bytes.len() == 640)
        );
        stage.finish(&mut frames);
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[2].samples, 160);
        let mut decoded = Vec::new();
        for f in &frames {
            codec::decode_pcm16(&f.bytes, &mut decoded);
        }
        assert_eq!(decoded, audio, "bytes are the samples, in order");
    }

    #[test]
    fn mulaw_frames_are_one_byte_per_sample() {
        let mut stage = OutputStage::new(8_000, Encoding::Mulaw, 20).unwrap();
        let mut frames = Vec::new();
        stage.push(0, &tone(8_000, 40), 8_000, &mut frames).unwrap();
        assert_eq!(frames.len(), 2);
        assert!(frames.iter().all(|f| f.bytes.len() == 160));
    }

    #[test]
    fn provider_audio_is_resampled_to_the_output_rate_and_keeps_its_length() {
        // Piper speaks at 22.05 kHz; a browser asks for 44.1 kHz.
        let mut stage = OutputStage::new(44_100, Encoding::Pcm16, 20).unwrap();
        let mut frames = Vec::new();
        for chunk in tone(22_050, 1000).chunks(1000) {
            stage.push(0, chunk, 22_050, &mut frames).unwrap();
        }
        stage.finish(&mut frames);
        let samples: usize = frames.iter().map(|f| f.samples).sum();
        // One second out, plus the resampler's leading delay (a few ms).
        assert!((44_100..44_100 + 2_000).contains(&samples), "{samples}");
        assert!(frames[..frames.len() - 1].iter().all(|f| f.samples == 882));
    }

    #[test]
    fn frames_carry_the_chunk_index_of_their_first_sample() {
        let mut stage = OutputStage::new(16_000, Encoding::Pcm16, 20).unwrap();
        let mut frames = Vec::new();
        stage
            .push(0, &tone(16_000, 30), 16_000, &mut frames)
            .unwrap();
        stage
            .push(1, &tone(16_000, 30), 16_000, &mut frames)
            .unwrap();
        stage.finish(&mut frames);
        let indexes: Vec<u32> = frames.iter().map(|f| f.index).collect();
        // 0-20 ms chunk 0; 20-40 ms starts in chunk 0; 40-60 ms is chunk 1.
        assert_eq!(indexes, [0, 0, 1]);
    }

    #[test]
    fn a_rate_change_mid_stream_keeps_the_earlier_audio() {
        let mut stage = OutputStage::new(16_000, Encoding::Pcm16, 20).unwrap();
        let mut frames = Vec::new();
        stage
            .push(0, &tone(24_000, 100), 24_000, &mut frames)
            .unwrap();
        stage
            .push(1, &tone(22_050, 100), 22_050, &mut frames)
            .unwrap();
        stage.finish(&mut frames);
        let samples: usize = frames.iter().map(|f| f.samples).sum();
        assert!((3_200..3_200 + 1_000).contains(&samples), "{samples}");
    }

    #[test]
    fn unsupported_rates_are_errors_not_panics() {
        assert!(OutputStage::new(11_025, Encoding::Pcm16, 20).is_err());
        let mut stage = OutputStage::new(16_000, Encoding::Pcm16, 20).unwrap();
        let mut frames = Vec::new();
        assert!(stage.push(0, &[1, 2, 3], 11_025, &mut frames).is_err());
        stage
            .push(0, &tone(16_000, 20), 16_000, &mut frames)
            .unwrap();
        assert_eq!(frames.len(), 1, "still usable");
    }
}
