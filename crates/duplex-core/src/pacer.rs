//! Audio pacer: decides when the next assistant audio frame may be sent, so that the client
//! never holds more than a small lead of unplayed audio. Whatever sits in the client's buffer
//! is still heard after an interruption, so the lead bounds how fast a barge-in cuts the
//! assistant off; it also must cover network jitter, or playback stutters.
//!
//! # Model
//!
//! The client starts playing when the first frame of a turn arrives and then plays at real
//! time, stalling (underrun) whenever its buffer is empty; playback resumes when the next
//! frame arrives. So the estimated playhead advances with wall time from an anchor (first
//! send, resume after an underrun, or the last `playback.mark`) and never passes the audio
//! sent:
//!
//! ```text
//! played(now) = min(sent, anchor.played + (now - anchor.at))
//! ```
//!
//! A frame may be sent when it fits in the lead: `sent - played(now) + frame <= lead`, or when
//! the client's buffer is empty (so that a frame longer than the lead is not stuck forever).
//! With a 300 ms lead and 20 ms frames, 15 frames go out at once, then one every 20 ms.
//!
//! A `playback.mark` from the client is authoritative: its jitter buffer may hold it behind
//! the estimate. The mark becomes the new anchor, clamped to the audio sent. Marks must belong
//! to the current turn; filtering stale ones is the caller's job.
//!
//! Sans-IO: time is an argument, never read here.

use std::time::{Duration, Instant};

/// Paces the audio of one assistant turn at a time; see the module docs.
#[derive(Debug, Clone)]
pub struct Pacer {
    lead: Duration,
    /// Audio sent in this turn.
    sent: Duration,
    /// The playhead was at `.1` at instant `.0` and has advanced with wall time since (capped
    /// at `sent`). `None` until the first frame of the turn is sent.
    anchor: Option<(Instant, Duration)>,
}

impl Pacer {
    /// A pacer that keeps at most `lead` of audio ahead of the client's playhead.
    pub fn new(lead: Duration) -> Self {
        Self {
            lead,
            sent: Duration::ZERO,
            anchor: None,
        }
    }

    /// Starts a new turn: nothing sent, playhead at zero.
    pub fn start_turn(&mut self) {
        self.sent = Duration::ZERO;
        self.anchor = None;
    }

    /// `None` if a frame of duration `frame` may be sent at `now`; otherwise the instant from
    /// which it may (the caller sleeps until then, or until something else happens).
    pub fn ready_at(&self, now: Instant, frame: Duration) -> Option<Instant> {
        let (at, base) = self.anchor?;
        // The playhead must reach this point for the frame to fit in the lead. Capped at
        // `sent`: an empty client buffer always accepts a frame.
        let target = (self.sent + frame).saturating_sub(self.lead).min(self.sent);
        if self.played(now) >= target {
            None
        } else {
            // `target > played(now) >= base`, and below `sent` the playhead moves at real time.
            Some(at + (target - base))
        }
    }

    /// A frame of duration `frame` was written to the socket at `now`.
    pub fn on_sent(&mut self, now: Instant, frame: Duration) {
        let played = self.played(now);
        if self.anchor.is_none() || played >= self.sent {
            // First frame, or the client ran dry: playback (re)starts with this frame.
            self.anchor = Some((now, played));
        }
        self.sent += frame;
    }

    /// The client reported at `now` that it has played `played` of this turn.
    pub fn on_mark(&mut self, now: Instant, played: Duration) {
        self.anchor = Some((now, played.min(self.sent)));
    }

    /// Best estimate of the audio of this turn the client has played by `now`.
    pub fn played(&self, now: Instant) -> Duration {
        match self.anchor {
            None => Duration::ZERO,
            Some((at, base)) => (base + now.saturating_duration_since(at)).min(self.sent),
        }
    }

    /// Audio sent in this turn.
    pub fn sent(&self) -> Duration {
        self.sent
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use expect_test::{Expect, expect};

    use super::*;

    /// 20 ms is the usual frame of Opus and of most TTS PCM streams.
    const FRAME: Duration = Duration::from_millis(20);
    /// A typical lead: an interruption cuts within a third of a second.
    const LEAD: Duration = Duration::from_millis(300);

    /// An arbitrary origin for test instants: `Instant` has no constant, so this is the only
    /// clock read, and every instant used is `origin() + offset`.
    fn origin() -> Instant {
        Instant::now()
    }

    /// One step of a timeline script, at a millisecond offset.
    #[derive(Clone, Copy)]
    enum Step {
        /// TTS delivered this many ms of audio, queued as 20 ms frames.
        Audio(u64),
        /// The client's `playback.mark` says it has played this many ms.
        Mark(u64),
        /// Print what the pacer believes.
        Query,
        /// Interruption: print the playhead, drop queued audio, start a new turn.
        Interrupt,
    }

    /// A send of `count` frames at `at`.
    struct Batch {
        at: Duration,
        count: usize,
        sent: Duration,
        played: Duration,
    }

    /// Plays the role of the session actor: sends queued frames whenever the pacer allows,
    /// otherwise sleeps until `ready_at` or the next script step, whichever comes first.
    /// Returns the printed timeline and every send instant (ms offsets, one per frame).
    fn simulate(script: &[(u64, Step)]) -> (String, Vec<u64>) {
        let base = origin();
        let ms = |t: Instant| (t - base).as_millis() as u64;
        let mut pacer = Pacer::new(LEAD);
        pacer.start_turn();
        let mut queue: VecDeque<Duration> = VecDeque::new();
        let mut steps = script.iter().copied().peekable();
        let mut now = base;
        let mut lines = Vec::new();
        let mut batches: Vec<Batch> = Vec::new();
        let mut sends = Vec::new();
        loop {
            while let Some(&(at, step)) = steps.peek() {
                if base + Duration::from_millis(at) > now {
                    break;
                }
                steps.next();
                flush(&mut batches, &mut lines);
                let played = pacer.played(now).as_millis();
                let sent = pacer.sent().as_millis();
                match step {
                    Step::Audio(len) => {
                        queue.extend((0..len / 20).map(|_| FRAME));
                        lines.push(format!("{at}ms audio +{len}ms"));
                    }
                    Step::Mark(mark) => {
                        pacer.on_mark(now, Duration::from_millis(mark));
                        lines.push(format!(
                            "{at}ms mark {mark}ms (estimate was {played}ms, sent {sent}ms)"
                        ));
                    }
                    Step::Query => {
                        lines.push(format!("{at}ms query played={played}ms sent={sent}ms"))
                    }
                    Step::Interrupt => {
                        lines.push(format!(
                            "{at}ms interrupt played={played}ms sent={sent}ms, {} frames dropped",
                            queue.len()
                        ));
                        queue.clear();
                        pacer.start_turn();
                    }
                }
            }
            let wake = match queue.front() {
                Some(&frame) => match pacer.ready_at(now, frame) {
                    None => {
                        queue.pop_front();
                        pacer.on_sent(now, frame);
                        sends.push(ms(now));
                        let at = now - base;
                        match batches.last_mut() {
                            Some(b) if b.at == at => b.count += 1,
                            _ => batches.push(Batch {
                                at,
                                count: 1,
                                sent: Duration::ZERO,
                                played: Duration::ZERO,
                            }),
                        }
                        let b = batches.last_mut().expect("pushed above");
                        b.sent = pacer.sent();
                        b.played = pacer.played(now);
                        continue;
                    }
                    Some(t) => {
                        assert!(t > now, "ready_at {t:?} is not in the future");
                        Some(t)
                    }
                },
                None => None,
            };
            let next_step = steps
                .peek()
                .map(|&(at, _)| base + Duration::from_millis(at));
            now = match (wake, next_step) {
                (Some(a), Some(b)) => a.min(b),
                (Some(t), None) | (None, Some(t)) => t,
                (None, None) => break,
            };
        }
        flush(&mut batches, &mut lines);
        (lines.join("\n") + "\n", sends)
    }

    /// Prints batches; consecutive single-frame sends at a steady interval share one line.
    fn flush(batches: &mut Vec<Batch>, lines: &mut Vec<String>) {
        let mut i = 0;
        while i < batches.len() {
            let b = &batches[i];
            let mut j = i + 1;
            if b.count == 1 && j < batches.len() && batches[j].count == 1 {
                let step = batches[j].at - b.at;
                while j < batches.len()
                    && batches[j].count == 1
                    && batches[j].at - batches[j - 1].at == step
                {
                    j += 1;
                }
                let last = &batches[j - 1];
                lines.push(format!(
                    "{}ms..{}ms send 1 frame every {}ms ({} frames), then sent={}ms played={}ms",
                    b.at.as_millis(),
                    last.at.as_millis(),
                    step.as_millis(),
                    j - i,
                    last.sent.as_millis(),
                    last.played.as_millis(),
                ));
            } else {
                lines.push(format!(
                    "{}ms send {} frame(s), then sent={}ms played={}ms",
                    b.at.as_millis(),
                    b.count,
                    b.sent.as_millis(),
                    b.played.as_millis(),
                ));
            }
            i = j;
        }
        batches.clear();
    }

    fn check(script: &[(u64, Step)], expect: Expect) -> Vec<u64> {
        let (timeline, sends) = simulate(script);
        expect.assert_eq(&timeline);
        sends
    }

    #[test]
    fn steady_stream_sends_the_lead_at_once_then_real_time() {
        let sends = check(
            &[
                (0, Step::Audio(2000)),
                (1000, Step::Query),
                (1800, Step::Query),
                (2100, Step::Query),
            ],
            expect![[r#"
                0ms audio +2000ms
                0ms send 15 frame(s), then sent=300ms played=0ms
                20ms..980ms send 1 frame every 20ms (49 frames), then sent=1280ms played=980ms
                1000ms query played=1000ms sent=1280ms
                1000ms..1700ms send 1 frame every 20ms (36 frames), then sent=2000ms played=1700ms
                1800ms query played=1800ms sent=2000ms
                2100ms query played=2000ms sent=2000ms
            "#]],
        );
        assert_eq!(sends.len(), 100);
        assert!(sends[..15].iter().all(|&t| t == 0), "{sends:?}");
        for (k, &t) in sends[15..].iter().enumerate() {
            assert_eq!(t, 20 * (k as u64 + 1), "frame {}", k + 15);
        }
    }

    #[test]
    fn underrun_then_resume_refills_the_lead() {
        // TTS delivers 400 ms, then is 500 ms late with the rest.
        check(
            &[
                (0, Step::Audio(400)),
                (350, Step::Query),
                (450, Step::Query),
                (900, Step::Audio(600)),
                (900, Step::Query),
                (1000, Step::Query),
                (1600, Step::Query),
            ],
            expect![[r#"
                0ms audio +400ms
                0ms send 15 frame(s), then sent=300ms played=0ms
                20ms..100ms send 1 frame every 20ms (5 frames), then sent=400ms played=100ms
                350ms query played=350ms sent=400ms
                450ms query played=400ms sent=400ms
                900ms audio +600ms
                900ms query played=400ms sent=400ms
                900ms send 15 frame(s), then sent=700ms played=400ms
                920ms..980ms send 1 frame every 20ms (4 frames), then sent=780ms played=480ms
                1000ms query played=500ms sent=780ms
                1000ms..1200ms send 1 frame every 20ms (11 frames), then sent=1000ms played=700ms
                1600ms query played=1000ms sent=1000ms
            "#]],
        );
    }

    #[test]
    fn a_lagging_mark_slows_sending_down() {
        // At 500 ms the estimate is 500 ms, but the client's jitter buffer held it back by 100.
        check(
            &[
                (0, Step::Audio(1000)),
                (500, Step::Mark(400)),
                (600, Step::Query),
                (1300, Step::Query),
            ],
            expect![[r#"
                0ms audio +1000ms
                0ms send 15 frame(s), then sent=300ms played=0ms
                20ms..480ms send 1 frame every 20ms (24 frames), then sent=780ms played=480ms
                500ms mark 400ms (estimate was 500ms, sent 780ms)
                600ms query played=500ms sent=780ms
                600ms..800ms send 1 frame every 20ms (11 frames), then sent=1000ms played=700ms
                1300ms query played=1000ms sent=1000ms
            "#]],
        );
    }

    #[test]
    fn interruption_knows_what_was_heard() {
        check(
            &[
                (0, Step::Audio(2000)),
                (1000, Step::Interrupt),
                (1000, Step::Query),
                (1200, Step::Audio(100)),
                (1250, Step::Query),
                (1400, Step::Query),
            ],
            expect![[r#"
                0ms audio +2000ms
                0ms send 15 frame(s), then sent=300ms played=0ms
                20ms..980ms send 1 frame every 20ms (49 frames), then sent=1280ms played=980ms
                1000ms interrupt played=1000ms sent=1280ms, 36 frames dropped
                1000ms query played=0ms sent=0ms
                1200ms audio +100ms
                1200ms send 5 frame(s), then sent=100ms played=0ms
                1250ms query played=50ms sent=100ms
                1400ms query played=100ms sent=100ms
            "#]],
        );
    }

    #[test]
    fn nothing_sent_means_nothing_played() {
        let base = origin();
        let mut pacer = Pacer::new(LEAD);
        let later = base + Duration::from_secs(5);
        assert_eq!(pacer.ready_at(later, FRAME), None);
        assert_eq!(pacer.played(later), Duration::ZERO);
        // A mark before any send cannot claim audio that was never sent.
        pacer.on_mark(later, Duration::from_secs(1));
        assert_eq!(pacer.played(later + FRAME), Duration::ZERO);
        assert_eq!(pacer.sent(), Duration::ZERO);
    }

    #[test]
    fn a_frame_longer_than_the_lead_is_not_stuck() {
        let base = origin();
        let ms = |n| base + Duration::from_millis(n);
        let big = Duration::from_millis(500);
        let mut pacer = Pacer::new(LEAD);
        assert_eq!(pacer.ready_at(base, big), None);
        pacer.on_sent(base, big);
        // It fits only once the client's buffer is empty.
        assert_eq!(pacer.ready_at(ms(100), big), Some(ms(500)));
        assert_eq!(pacer.ready_at(ms(500), big), None);
        // A small frame fits as soon as the buffer is down to `LEAD - FRAME`.
        assert_eq!(pacer.ready_at(ms(100), FRAME), Some(ms(220)));
    }

    #[test]
    fn start_turn_resets() {
        let base = origin();
        let mut pacer = Pacer::new(LEAD);
        pacer.on_sent(base, LEAD);
        assert_eq!(pacer.ready_at(base, FRAME), Some(base + FRAME));
        pacer.start_turn();
        assert_eq!(pacer.sent(), Duration::ZERO);
        assert_eq!(pacer.played(base + LEAD), Duration::ZERO);
        assert_eq!(pacer.ready_at(base, FRAME), None);
    }
}
