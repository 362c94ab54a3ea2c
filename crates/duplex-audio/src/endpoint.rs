//! Endpointing: turns per-frame voiced/unvoiced decisions into "speech started" and "speech
//! stopped" events.
//!
//! Sans-IO and clock-free: time is the audio position (`audio_ms`, milliseconds of audio since
//! the stream began) that the caller passes with each 20 ms frame.
//!
//! Rules:
//! - **Start.** While idle, voiced frames form a *run*. An unvoiced gap of up to
//!   `start_gap_ms` (default one frame) inside a run is bridged (VAD decisions flicker inside
//!   words); a longer gap discards the run. Once a run holds `speech_start_ms` of *voiced*
//!   frames (bridged gaps do not count), `SpeechStarted` is emitted with the position of the
//!   run's first voiced frame. Clicks and pops shorter than `speech_start_ms` are ignored.
//! - **Stop.** While speaking, every voiced frame marks the latest speech end. After
//!   `end_of_turn_ms` of continuous unvoiced frames, `SpeechStopped` is emitted with the
//!   position where speech ended (the end of the last voiced frame).
//! - **Max turn.** If a turn reaches `max_turn_ms` (from its start to the end of the current
//!   frame), `SpeechStopped` is forced with the current position, and a new turn needs a new
//!   start run.

/// Duration of one frame fed to the endpointer.
pub const FRAME_MS: u64 = 20;

/// Endpointing thresholds, all in milliseconds of audio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointConfig {
    /// Voiced audio needed before a turn counts as started.
    pub speech_start_ms: u64,
    /// Continuous silence that ends a turn.
    pub end_of_turn_ms: u64,
    /// Longest turn; a turn reaching it is stopped.
    pub max_turn_ms: u64,
    /// Longest unvoiced gap bridged while deciding whether speech started.
    pub start_gap_ms: u64,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        EndpointConfig {
            // Three 20 ms frames: longer than a click or a keyboard tap, short enough that the
            // start of a word is not lost.
            speech_start_ms: 60,
            // Longer than the pauses between words and at commas (~200-400 ms), shorter than
            // the pause that makes a listener feel ignored.
            end_of_turn_ms: 700,
            // Bounds the audio one turn can buffer or stream to STT.
            max_turn_ms: 30_000,
            // One frame: a single-frame VAD dropout inside a word.
            start_gap_ms: FRAME_MS,
        }
    }
}

/// What the endpointer decided after a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointEvent {
    /// A turn began at `audio_ms`.
    SpeechStarted {
        /// Position of the turn's first voiced frame.
        audio_ms: u64,
    },
    /// The turn ended at `audio_ms`.
    SpeechStopped {
        /// Position where speech ended (or the forced cut for a max-length turn).
        audio_ms: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle {
        /// The current start run: where it began, its voiced ms and its trailing gap.
        run: Option<Run>,
    },
    Speaking {
        started_ms: u64,
        /// End of the latest voiced frame.
        speech_end_ms: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    start_ms: u64,
    voiced_ms: u64,
    gap_ms: u64,
}

/// The endpointing state machine. Feed it every frame in order with [`Endpointer::push`].
#[derive(Debug, Clone)]
pub struct Endpointer {
    config: EndpointConfig,
    state: State,
}

impl Endpointer {
    /// Creates an idle endpointer.
    pub fn new(config: EndpointConfig) -> Endpointer {
        Endpointer {
            config,
            state: State::Idle { run: None },
        }
    }

    /// The thresholds in use.
    pub fn config(&self) -> &EndpointConfig {
        &self.config
    }

    /// Whether a turn is in progress.
    pub fn in_speech(&self) -> bool {
        matches!(self.state, State::Speaking { .. })
    }

    /// Forgets any run or turn in progress; no event is emitted for it.
    pub fn reset(&mut self) {
        self.state = State::Idle { run: None };
    }

    /// Feeds the frame of [`FRAME_MS`] starting at `audio_ms`; returns the event it causes, if
    /// any (one frame never causes two).
    pub fn push(&mut self, audio_ms: u64, voiced: bool) -> Option<EndpointEvent> {
        let frame_end = audio_ms + FRAME_MS;
        match &mut self.state {
            State::Idle { run } => {
                if voiced {
                    let r = run.get_or_insert(Run {
                        start_ms: audio_ms,
                        voiced_ms: 0,
                        gap_ms: 0,
                    });
                    r.voiced_ms += FRAME_MS;
                    r.gap_ms = 0;
                    if r.voiced_ms >= self.config.speech_start_ms {
                        let started_ms = r.start_ms;
                        self.state = State::Speaking {
                            started_ms,
                            speech_end_ms: frame_end,
                        };
                        return Some(EndpointEvent::SpeechStarted {
                            audio_ms: started_ms,
                        });
                    }
                } else if let Some(r) = run {
                    r.gap_ms += FRAME_MS;
                    if r.gap_ms > self.config.start_gap_ms {
                        *run = None;
                    }
                }
                None
            }
            State::Speaking {
                started_ms,
                speech_end_ms,
            } => {
                if voiced {
                    *speech_end_ms = frame_end;
                } else if frame_end - *speech_end_ms >= self.config.end_of_turn_ms {
                    let audio_ms = *speech_end_ms;
                    self.reset();
                    return Some(EndpointEvent::SpeechStopped { audio_ms });
                }
                if frame_end - *started_ms >= self.config.max_turn_ms {
                    self.reset();
                    return Some(EndpointEvent::SpeechStopped {
                        audio_ms: frame_end,
                    });
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::{Expect, expect};
    use std::fmt::Write;

    /// Runs a script like "speech 300ms, silence 200ms" (frames of 20 ms; `speech` is voiced,
    /// `silence` unvoiced) and prints one line per event: when it was decided (end of the frame
    /// that caused it) and the position it reports.
    fn timeline(config: EndpointConfig, script: &str) -> String {
        let mut endpointer = Endpointer::new(config);
        let mut out = String::new();
        let mut now = 0;
        for step in script.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (kind, ms) = step.split_once(' ').expect("step is `kind Nms`");
            let ms: u64 = ms.trim_end_matches("ms").parse().expect("duration in ms");
            assert_eq!(ms % FRAME_MS, 0, "durations are whole frames");
            let voiced = match kind {
                "speech" => true,
                "silence" => false,
                other => panic!("unknown step {other}"),
            };
            for _ in 0..ms / FRAME_MS {
                if let Some(ev) = endpointer.push(now, voiced) {
                    let decided = now + FRAME_MS;
                    match ev {
                        EndpointEvent::SpeechStarted { audio_ms } => {
                            writeln!(out, "@{decided:>6}ms: started at {audio_ms}ms").unwrap()
                        }
                        EndpointEvent::SpeechStopped { audio_ms } => {
                            writeln!(out, "@{decided:>6}ms: stopped at {audio_ms}ms").unwrap()
                        }
                    }
                }
                now += FRAME_MS;
            }
        }
        writeln!(
            out,
            "@{now:>6}ms: end, in_speech={}",
            endpointer.in_speech()
        )
        .unwrap();
        out
    }

    fn check(script: &str, expect: Expect) {
        expect.assert_eq(&timeline(EndpointConfig::default(), script));
    }

    #[test]
    fn short_clicks_are_ignored() {
        check(
            "silence 200ms, speech 40ms, silence 300ms, speech 20ms, silence 1000ms",
            expect![[r#"
                @  1560ms: end, in_speech=false
            "#]],
        );
    }

    #[test]
    fn single_frame_dropouts_are_bridged_at_start_but_two_are_not() {
        check(
            "silence 100ms, speech 20ms, silence 20ms, speech 20ms, silence 20ms, speech 20ms, \
             silence 1000ms, \
             speech 40ms, silence 40ms, speech 40ms, silence 1000ms",
            expect![[r#"
                @   200ms: started at 100ms
                @   900ms: stopped at 200ms
                @  2320ms: end, in_speech=false
            "#]],
        );
    }

    #[test]
    fn short_gap_does_not_end_the_turn() {
        check(
            "speech 300ms, silence 200ms, speech 100ms, silence 800ms",
            expect![[r#"
                @    60ms: started at 0ms
                @  1300ms: stopped at 600ms
                @  1400ms: end, in_speech=false
            "#]],
        );
    }

    #[test]
    fn gap_just_under_end_of_turn_does_not_end_it() {
        check(
            "silence 500ms, speech 400ms, silence 680ms, speech 200ms, silence 700ms",
            expect![[r#"
                @   560ms: started at 500ms
                @  2480ms: stopped at 1780ms
                @  2480ms: end, in_speech=false
            "#]],
        );
    }

    #[test]
    fn end_of_turn_then_a_second_turn() {
        check(
            "silence 1000ms, speech 1500ms, silence 700ms, speech 500ms, silence 300ms",
            expect![[r#"
                @  1060ms: started at 1000ms
                @  3200ms: stopped at 2500ms
                @  3260ms: started at 3200ms
                @  4000ms: end, in_speech=true
            "#]],
        );
    }

    #[test]
    fn speech_at_the_very_start() {
        check(
            "speech 60ms, silence 700ms",
            expect![[r#"
                @    60ms: started at 0ms
                @   760ms: stopped at 60ms
                @   760ms: end, in_speech=false
            "#]],
        );
    }

    #[test]
    fn max_turn_forces_a_stop_and_speech_restarts() {
        check(
            "silence 200ms, speech 31000ms, silence 1000ms",
            expect![[r#"
                @   260ms: started at 200ms
                @ 30200ms: stopped at 30200ms
                @ 30260ms: started at 30200ms
                @ 31900ms: stopped at 31200ms
                @ 32200ms: end, in_speech=false
            "#]],
        );
    }

    #[test]
    fn custom_thresholds() {
        let config = EndpointConfig {
            speech_start_ms: 100,
            end_of_turn_ms: 300,
            max_turn_ms: 1000,
            start_gap_ms: 40,
        };
        expect![[r#"
            @   240ms: started at 100ms
            @   680ms: stopped at 380ms
            @   980ms: end, in_speech=false
        "#]]
        .assert_eq(&timeline(
            config,
            "silence 100ms, speech 40ms, silence 40ms, speech 60ms, silence 40ms, speech 100ms, \
             silence 600ms",
        ));
    }

    #[test]
    fn reset_forgets_the_turn() {
        let mut endpointer = Endpointer::new(EndpointConfig::default());
        let mut events = Vec::new();
        for i in 0..10 {
            events.extend(endpointer.push(i * FRAME_MS, true));
        }
        assert!(endpointer.in_speech());
        endpointer.reset();
        assert!(!endpointer.in_speech());
        for i in 10..100 {
            events.extend(endpointer.push(i * FRAME_MS, false));
        }
        assert_eq!(events, [EndpointEvent::SpeechStarted { audio_ms: 0 }]);
    }
}
