//! Cuts a stream that arrives in chunks of any length into fixed-size frames.
//!
//! Clients send frames of whatever length their audio stack produces, and resampling changes
//! lengths again; the VAD and the STT want exactly 20 ms at 16 kHz. [`Reframer`] keeps the
//! remainder between pushes.

/// 20 ms at 16 kHz: the frame the VAD and the rest of the pipeline work on.
pub const DEFAULT_FRAME_LEN: usize = 320;

/// Buffers samples and hands them out in frames of a fixed length.
#[derive(Debug, Clone)]
pub struct Reframer {
    frame_len: usize,
    buf: Vec<i16>,
    /// Samples before `start` were already handed out; compacted on the next push.
    start: usize,
}

impl Default for Reframer {
    fn default() -> Self {
        Reframer::new(DEFAULT_FRAME_LEN)
    }
}

impl Reframer {
    /// Creates a reframer for frames of `frame_len` samples.
    ///
    /// # Panics
    /// If `frame_len` is 0 (a caller bug: no stream is made of empty frames).
    pub fn new(frame_len: usize) -> Reframer {
        assert!(frame_len > 0, "frame length must be positive");
        Reframer {
            frame_len,
            // Room for a frame plus one large push (100 ms at 48 kHz) before the first growth.
            buf: Vec::with_capacity(frame_len + 4800),
            start: 0,
        }
    }

    /// Frame length in samples.
    pub fn frame_len(&self) -> usize {
        self.frame_len
    }

    /// Appends samples; take the completed frames with [`Reframer::pop`].
    pub fn push(&mut self, samples: &[i16]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(samples);
    }

    /// The next complete frame, if any.
    pub fn pop(&mut self) -> Option<&[i16]> {
        let end = self.start + self.frame_len;
        if end > self.buf.len() {
            return None;
        }
        let frame = &self.buf[self.start..end];
        self.start = end;
        Some(frame)
    }

    /// Samples buffered towards the next frame.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Drops buffered samples.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.start = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_contiguous_whatever_the_chunking() {
        let input: Vec<i16> = (0..1000).collect();
        let mut reframer = Reframer::new(64);
        let mut frames = Vec::new();
        let mut rest = &input[..];
        for size in [0, 1, 63, 64, 65, 200, 3].iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (now, later) = rest.split_at((*size).min(rest.len()));
            reframer.push(now);
            while let Some(frame) = reframer.pop() {
                assert_eq!(frame.len(), 64);
                frames.extend_from_slice(frame);
            }
            rest = later;
        }
        assert_eq!(frames.len(), 1000 / 64 * 64);
        assert_eq!(frames, input[..frames.len()]);
        assert_eq!(reframer.pending(), 1000 % 64);
        reframer.clear();
        assert_eq!(reframer.pending(), 0);
        assert!(reframer.pop().is_none());
    }

    #[test]
    fn default_is_20ms_at_16k() {
        let mut reframer = Reframer::default();
        reframer.push(&[7; 319]);
        assert!(reframer.pop().is_none());
        reframer.push(&[7; 1]);
        assert_eq!(reframer.pop().map(<[i16]>::len), Some(320));
    }
}
