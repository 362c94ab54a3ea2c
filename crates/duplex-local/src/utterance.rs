//! What the local recognizer transcribes, decided without IO: the utterance buffer.
//!
//! The session streams every 16 kHz frame to the recognizer (cloud recognizers want the whole
//! stream) and sends `Finalize` when its endpointer ends the turn, 700 ms of silence after the
//! speech by default. Whisper decodes a buffer, not a stream, so this buffer decides:
//! - **what to keep**: silence before speech is cut to [`PRE_ROLL_MS`] (a user quiet for a
//!   minute must not make Whisper read a minute of silence, nor push the speech out of its
//!   30 s window); a turn longer than 30 s keeps its last 30 s;
//! - **when to start early**: once the speech has paused for [`PAUSE_MS`], the audio so far is
//!   handed out for a *speculative* transcription, so that Whisper runs while the endpointer
//!   is still waiting; if `Finalize` comes with no speech after that snapshot, its transcript
//!   is the answer and the recognizer's latency is mostly hidden. Speech after the snapshot
//!   makes it stale: `Finalize` then transcribes the whole buffer as usual.
//!
//! Speech here is frame energy above an adaptive noise floor: a coarse detector, only used to
//! trim and to guess a pause; the session's VAD still decides the turns.

/// Sample rate of the audio pushed in.
const RATE: usize = 16_000;
/// Samples per analysis frame (20 ms).
const FRAME: usize = RATE / 50;
/// Silence kept before the first speech frame (Whisper likes a little lead-in).
pub const PRE_ROLL_MS: usize = 300;
/// Trailing quiet after which a speculative transcription starts.
pub const PAUSE_MS: usize = 200;
/// The most audio Whisper reads.
pub const MAX_SAMPLES: usize = 30 * RATE;
/// Frames quieter than this RMS (samples in -1..1, about -45 dBFS) are never speech.
const MIN_SPEECH_RMS: f32 = 0.005;
/// A frame is speech when its RMS is this many times the noise floor.
const SPEECH_OVER_NOISE: f32 = 3.0;
/// Speech needed before a pause counts (a click is not an utterance).
const MIN_SPEECH_MS: usize = 200;
/// Quiet after which what came before is dropped as if no speech had been heard (the session
/// would have ended a real turn long before: its end-of-turn silence is shorter).
const FORGET_AFTER_QUIET_MS: usize = 3000;
/// Per-frame rise of the noise floor while the level stays above it (~1 s to rise tenfold):
/// a steady noise becomes the floor, speech (with its dips) does not.
const NOISE_RISE: f32 = 1.05;

/// What the caller should do after a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Push {
    Nothing,
    /// Start a speculative transcription of these samples (snapshot number `id`).
    Speculate {
        id: u64,
        samples: Vec<i16>,
    },
}

/// What `Finalize` should transcribe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Final {
    /// The speculative transcription `id` covers the utterance: use its result (or, if it was
    /// not run, transcribe `samples`).
    UseSpeculation { id: u64, samples: Vec<i16> },
    /// Transcribe these samples (drop any speculation).
    Transcribe(Vec<i16>),
}

/// The utterance in progress and the detector's state.
#[derive(Debug)]
pub struct UtteranceBuffer {
    samples: Vec<i16>,
    /// Samples not yet analysed (less than one frame).
    partial: Vec<i16>,
    noise: f32,
    speech_ms: usize,
    quiet_ms: usize,
    /// The current speculation and whether speech came after its snapshot.
    speculation: Option<(u64, bool)>,
    next_id: u64,
}

impl Default for UtteranceBuffer {
    fn default() -> Self {
        UtteranceBuffer {
            samples: Vec::new(),
            partial: Vec::with_capacity(FRAME),
            noise: MIN_SPEECH_RMS / SPEECH_OVER_NOISE,
            speech_ms: 0,
            quiet_ms: 0,
            speculation: None,
            next_id: 0,
        }
    }
}

fn rms(frame: &[i16]) -> f32 {
    let sum: f32 = frame
        .iter()
        .map(|&s| {
            let x = f32::from(s) / 32768.0;
            x * x
        })
        .sum();
    (sum / frame.len().max(1) as f32).sqrt()
}

impl UtteranceBuffer {
    /// Audio held now.
    pub fn len(&self) -> usize {
        self.samples.len() + self.partial.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds audio; at most one speculation is asked for per push.
    pub fn push(&mut self, mut audio: &[i16]) -> Push {
        let mut out = Push::Nothing;
        while !audio.is_empty() {
            let take = (FRAME - self.partial.len()).min(audio.len());
            self.partial.extend_from_slice(&audio[..take]);
            audio = &audio[take..];
            if self.partial.len() == FRAME {
                let frame = std::mem::take(&mut self.partial);
                if let Some(p) = self.frame(&frame) {
                    out = p;
                }
                self.partial = frame;
                self.partial.clear();
            }
        }
        out
    }

    fn frame(&mut self, frame: &[i16]) -> Option<Push> {
        let level = rms(frame);
        let speech = level > MIN_SPEECH_RMS.max(self.noise * SPEECH_OVER_NOISE);
        // The floor falls at once to a quieter frame and rises slowly otherwise.
        self.noise = if level < self.noise {
            level.max(1e-5)
        } else {
            (self.noise * NOISE_RISE).min(level)
        };
        self.samples.extend_from_slice(frame);
        if speech {
            self.speech_ms += 20;
            self.quiet_ms = 0;
            if let Some((_, stale)) = &mut self.speculation {
                *stale = true;
            }
        } else {
            self.quiet_ms += 20;
            if self.quiet_ms >= FORGET_AFTER_QUIET_MS {
                self.speech_ms = 0;
                self.speculation = None;
            }
        }
        if self.speech_ms == 0 {
            let keep = PRE_ROLL_MS * RATE / 1000;
            if self.samples.len() > keep {
                self.samples.drain(..self.samples.len() - keep);
            }
            return None;
        }
        if self.samples.len() > MAX_SAMPLES {
            self.samples.drain(..self.samples.len() - MAX_SAMPLES);
        }
        let fresh = match self.speculation {
            None => true,
            Some((_, stale)) => stale,
        };
        if self.quiet_ms == PAUSE_MS && self.speech_ms >= MIN_SPEECH_MS && fresh {
            let id = self.next_id;
            self.next_id += 1;
            self.speculation = Some((id, false));
            return Some(Push::Speculate {
                id,
                samples: self.samples.clone(),
            });
        }
        None
    }

    /// Ends the utterance: what to transcribe. The buffer starts over.
    pub fn finalize(&mut self) -> Final {
        let speculation = self.speculation.take();
        let mut samples = std::mem::take(&mut self.samples);
        samples.append(&mut self.partial);
        self.speech_ms = 0;
        self.quiet_ms = 0;
        match speculation {
            Some((id, false)) => Final::UseSpeculation { id, samples },
            _ => Final::Transcribe(samples),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quiet(ms: usize) -> Vec<i16> {
        // Faint noise around -60 dBFS.
        (0..ms * 16)
            .map(|i| if i % 2 == 0 { 30 } else { -30 })
            .collect()
    }

    /// Syllables: 160 ms loud, 40 ms soft (speech dips between syllables).
    fn speech(ms: usize) -> Vec<i16> {
        (0..ms * 16)
            .map(|i| {
                let amplitude = if i % 3200 < 2560 { 8000.0 } else { 400.0 };
                ((i as f32 * 0.07).sin() * amplitude) as i16
            })
            .collect()
    }

    #[test]
    fn silence_before_speech_is_cut_to_the_pre_roll() {
        let mut b = UtteranceBuffer::default();
        assert_eq!(b.push(&quiet(10_000)), Push::Nothing);
        assert_eq!(b.len(), PRE_ROLL_MS * 16);
        b.push(&speech(1000));
        match b.finalize() {
            Final::Transcribe(s) => assert_eq!(s.len(), (PRE_ROLL_MS + 1000) * 16),
            other => panic!("{other:?}"),
        }
        assert!(b.is_empty());
    }

    #[test]
    fn a_pause_starts_a_speculation_that_finalize_uses() {
        let mut b = UtteranceBuffer::default();
        b.push(&quiet(500));
        // Ends at the end of a loud syllable.
        b.push(&speech(960));
        // Pushed in 20 ms frames, as the session does: the speculation comes at the pause.
        let mut asked = Vec::new();
        for f in quiet(600).chunks(320) {
            if let Push::Speculate { id, samples } = b.push(f) {
                asked.push((id, samples.len()));
            }
        }
        assert_eq!(asked, [(0, (PRE_ROLL_MS + 960 + PAUSE_MS) * 16)]);
        assert!(
            matches!(b.finalize(), Final::UseSpeculation { id: 0, samples } if samples.len() == (PRE_ROLL_MS + 960 + 600) * 16)
        );
    }

    #[test]
    fn speech_after_the_snapshot_makes_the_speculation_stale() {
        let mut b = UtteranceBuffer::default();
        b.push(&speech(600));
        assert!(matches!(b.push(&quiet(300)), Push::Speculate { id: 0, .. }));
        assert_eq!(b.push(&speech(400)), Push::Nothing);
        // A second pause asks again, with everything so far.
        match b.push(&quiet(300)) {
            Push::Speculate { id, samples } => {
                assert_eq!(id, 1);
                assert_eq!(samples.len(), (600 + 300 + 400 + PAUSE_MS) * 16);
            }
            other => panic!("{other:?}"),
        }
        b.push(&speech(100));
        assert!(
            matches!(b.finalize(), Final::Transcribe(s) if s.len() == (600 + 300 + 400 + 300 + 100) * 16)
        );
    }

    #[test]
    fn a_click_is_not_an_utterance_and_long_turns_keep_their_end() {
        let mut b = UtteranceBuffer::default();
        b.push(&speech(100));
        assert_eq!(b.push(&quiet(1000)), Push::Nothing);
        b.finalize();
        let mut b = UtteranceBuffer::default();
        b.push(&speech(40_000));
        let last = speech(20);
        b.push(&last);
        match b.finalize() {
            Final::Transcribe(s) => {
                assert_eq!(s.len(), MAX_SAMPLES);
                assert_eq!(&s[s.len() - last.len()..], &last[..]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_noise_floor_adapts_to_a_noisy_line() {
        let mut b = UtteranceBuffer::default();
        // Steady noise at about -36 dBFS, above the fixed minimum: it becomes the floor, and
        // once it has been quiet (relative to the floor) long enough it is dropped.
        let noise: Vec<i16> = (0..16_000 * 6)
            .map(|i| if i % 2 == 0 { 500 } else { -500 })
            .collect();
        b.push(&noise);
        assert_eq!(b.len(), PRE_ROLL_MS * 16, "noise is not speech");
    }
}
