//! The compute gate: the machine's cores, handed to CPU-heavy steps first come first served.
//!
//! Each step of a local engine (a Whisper encoder pass or decoder token, an LLM decode step, a
//! Piper sentence) asks the gate for cores before it computes and runs with exactly the
//! threads it was given, so the engines never run more compute threads than there are cores:
//! two steps at once on more threads than cores only make both slower (llama.cpp's threads
//! spin at their barriers) and starve the async runtime.
//!
//! A step asks for a range of cores:
//! - llama.cpp's context has a thread count fixed at load, so an LLM step takes every core
//!   ([`ComputeGate::enter`]);
//! - a Piper sentence runs on one ONNX Runtime thread (and espeak-ng on one), so it takes one
//!   core ([`ComputeGate::enter_cores`]`(1, 1)`): two sentences, or a sentence and a Whisper
//!   step, run side by side instead of leaving a core idle;
//! - a Whisper step can run on one core or on all of them (candle splits its matrix products
//!   over the rayon pool it runs in), so it asks for `(1, all)`: it takes one core when the
//!   next step waiting could start beside it on the other (a Piper sentence, another
//!   transcription), and every free core otherwise (alone, or before an LLM step that needs
//!   the whole machine anyway), so one conversation transcribes as fast as before.
//!
//! Order is FIFO within three classes: a step waits until every step of its class that asked
//! before it has started and enough cores are free, so an LLM step that needs every core is
//! never overtaken forever by single-core steps of its class. A final transcript's steps go
//! first (the head of a turn: its answer cannot start before it, and its steps are short);
//! then urgent steps (an answer before the end of its first sentence, an answer's first
//! sentence of speech: their users hear nothing yet); then the others (speculative
//! transcripts, the later sentences of answers already speaking): time to first audio before
//! tokens nobody hears yet. Steps are short (an LLM token ~30-60 ms, a Whisper token less, a Piper
//! sentence a few hundred ms), so a generation that asks per token lets a sentence of TTS or
//! another session's transcript in between, and the first audio of a reply does not wait for
//! the whole reply.
//!
//! [`ComputeGate::serial`] keeps the behaviour before cores were shared (every step takes every
//! core): the switch `LOCAL_OVERLAP_STEPS=off` of the server, for comparisons.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};

/// The cores of the machine, shared by the local engines. Cloning shares the gate.
#[derive(Clone)]
pub struct ComputeGate {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    turn: Condvar,
    cores: usize,
    /// Steps never share the machine (every step takes every core).
    serial: bool,
}

struct State {
    /// The ticket the next caller gets.
    next: u64,
    /// Cores no running step holds.
    free: usize,
    /// Callers waiting, in the order they start: by rank (transcripts, then urgent steps, then
    /// the others), then by ticket.
    waiting: VecDeque<Waiter>,
}

struct Waiter {
    ticket: u64,
    /// The fewest cores it can start with.
    min: usize,
    /// [`Urgency::rank`]: a waiter starts after every waiter of its rank or higher that asked
    /// before it.
    rank: u8,
}

/// Whether a step's user waits for their first audio (see [`ComputeGate::enter_as`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urgency {
    /// A final transcript (or the speculative one a final waits for): the head of its turn,
    /// nothing of the answer can start before it, and its steps are short (a Whisper decoder
    /// token takes ~15 ms on one core against ~50 ms for a batched LLM step). It goes ahead
    /// of urgent LLM and speech steps: interleaved with them, each of its tokens waited a
    /// whole LLM step, and the last of three simultaneous transcripts finished ~0.8 s late.
    Transcript,
    /// An answer before its first sentence end, a first sentence of speech: its user hears
    /// nothing until it is done.
    Urgent,
    /// Everything else (a speculative transcript, an answer's later sentences).
    Normal,
}

impl Urgency {
    /// Order at the gate: higher first.
    fn rank(self) -> u8 {
        match self {
            Urgency::Transcript => 2,
            Urgency::Urgent => 1,
            Urgency::Normal => 0,
        }
    }
}

/// Holds cores of the gate; dropping it gives them back.
pub struct GateGuard<'a> {
    gate: &'a ComputeGate,
    cores: usize,
    urgency: Urgency,
    rank: u8,
    ticket: u64,
    since: std::time::Instant,
}

impl GateGuard<'_> {
    /// Cores this step was given: run with exactly this many threads.
    pub fn cores(&self) -> usize {
        self.cores
    }

    /// The urgency this step entered with.
    pub fn urgency(&self) -> Urgency {
        self.urgency
    }

    /// Whether a caller of this step's urgency or a higher one waits: a run of short steps
    /// (a Whisper decoder's tokens) may keep its cores from one step to the next while this
    /// is false, and lets go when it turns true. Keeping them while only lower classes wait
    /// is what the order promises anyway; asking again at each step let a waiting LLM step
    /// in between two tokens of a final transcript, since the next token had not asked yet
    /// when the last one ended.
    pub fn should_yield(&self) -> bool {
        self.waiting_at_or_above(self.rank)
    }

    /// Whether a caller of `urgency` or a higher one waits.
    pub fn should_yield_to(&self, urgency: Urgency) -> bool {
        let rank = if self.gate.inner.serial {
            0
        } else {
            urgency.rank()
        };
        self.waiting_at_or_above(rank)
    }

    /// The ticket this step entered with (tests tell a kept turn from a new one by it).
    #[cfg(test)]
    pub(crate) fn ticket(&self) -> u64 {
        self.ticket
    }

    fn waiting_at_or_above(&self, rank: u8) -> bool {
        let s = self
            .gate
            .inner
            .state
            .lock()
            .expect("gate lock is never poisoned");
        s.waiting.iter().any(|w| w.rank >= rank)
    }
}

impl Default for ComputeGate {
    fn default() -> Self {
        ComputeGate::new()
    }
}

impl ComputeGate {
    /// A gate over this machine's cores ([`crate::models::compute_threads`]).
    pub fn new() -> ComputeGate {
        ComputeGate::with_cores(crate::models::compute_threads())
    }

    /// A gate over `cores` cores (at least one).
    pub fn with_cores(cores: usize) -> ComputeGate {
        ComputeGate::build(cores, false)
    }

    /// A gate where every step takes every core: one step at a time across all engines.
    pub fn serial() -> ComputeGate {
        ComputeGate::build(crate::models::compute_threads(), true)
    }

    fn build(cores: usize, serial: bool) -> ComputeGate {
        let cores = cores.max(1);
        ComputeGate {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    next: 0,
                    free: cores,
                    waiting: VecDeque::new(),
                }),
                turn: Condvar::new(),
                cores,
                serial,
            }),
        }
    }

    /// Cores the gate hands out.
    pub fn cores(&self) -> usize {
        self.inner.cores
    }

    /// Whether steps never share the machine ([`ComputeGate::serial`]).
    pub fn is_serial(&self) -> bool {
        self.inner.serial
    }

    /// Waits (blocking the thread: call from a blocking thread only) for this caller's turn
    /// and every core.
    pub fn enter(&self) -> GateGuard<'_> {
        let all = self.inner.cores;
        self.enter_cores(all, all)
    }

    /// Waits (blocking the thread) for this caller's turn and at least `min` free cores, then
    /// takes `min` of them if the next caller waiting could start beside it on the rest, else
    /// up to `max` (a step that would leave a core idle anyway runs on it). On a serial gate,
    /// every core.
    pub fn enter_cores(&self, min: usize, max: usize) -> GateGuard<'_> {
        self.enter_as(Urgency::Normal, min, max)
    }

    /// [`enter_cores`](Self::enter_cores), where a step waits only behind the steps of its
    /// urgency or a higher one that asked before it: a final transcript's steps first, then
    /// urgent ones, then the others (first audio first: a first sentence or a final
    /// transcript does not queue behind the later sentences of other answers). On a serial
    /// gate, urgency changes nothing (the order before it existed).
    pub fn enter_as(&self, urgency: Urgency, min: usize, max: usize) -> GateGuard<'_> {
        let inner = &*self.inner;
        let rank = if inner.serial { 0 } else { urgency.rank() };
        let (min, max) = if inner.serial {
            (inner.cores, inner.cores)
        } else {
            let min = min.clamp(1, inner.cores);
            (min, max.clamp(min, inner.cores))
        };
        let asked = std::time::Instant::now();
        let mut s = inner
            .state
            .lock()
            .expect("gate lock is never poisoned: no code panics under it");
        let ticket = s.next;
        s.next += 1;
        let at = s
            .waiting
            .iter()
            .position(|w| w.rank < rank)
            .unwrap_or(s.waiting.len());
        s.waiting.insert(at, Waiter { ticket, min, rank });
        while s.waiting.front().is_none_or(|w| w.ticket != ticket) || s.free < min {
            s = inner.turn.wait(s).expect("gate lock is never poisoned");
        }
        s.waiting.pop_front();
        let room_for_next = s
            .waiting
            .front()
            .is_some_and(|next| s.free - min >= next.min);
        let cores = if room_for_next { min } else { max.min(s.free) };
        s.free -= cores;
        // The next ticket may start beside this step.
        inner.turn.notify_all();
        let since = std::time::Instant::now();
        tracing::trace!(
            ticket,
            ?urgency,
            min,
            max,
            cores,
            waited_us = since.duration_since(asked).as_micros() as u64,
            queued = s.waiting.len(),
            "gate step starts"
        );
        GateGuard {
            gate: self,
            cores,
            urgency,
            rank,
            ticket,
            since,
        }
    }
}

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        let inner = &*self.gate.inner;
        let mut s = inner.state.lock().expect("gate lock is never poisoned");
        s.free += self.cores;
        inner.turn.notify_all();
        tracing::trace!(
            ticket = self.ticket,
            held_us = self.since.elapsed().as_micros() as u64,
            "gate step ends"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    /// Bound on any wait of these tests: a broken gate fails them instead of hanging them.
    const BOUND: Duration = Duration::from_secs(10);

    impl ComputeGate {
        /// Tickets handed out so far (a caller blocked in `enter*` holds one).
        fn tickets(&self) -> u64 {
            self.inner.state.lock().unwrap().next
        }

        /// Waits until `n` tickets were handed out.
        fn await_tickets(&self, n: u64) {
            let start = Instant::now();
            while self.tickets() < n {
                assert!(start.elapsed() < BOUND, "no caller reached the gate");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    #[test]
    fn a_step_alone_gets_every_core_it_can_use() {
        let gate = ComputeGate::with_cores(2);
        assert_eq!(gate.enter_cores(1, 2).cores(), 2);
        assert_eq!(gate.enter_cores(1, 1).cores(), 1);
        assert_eq!(gate.enter().cores(), 2);
        // Asking for more than the machine has is clamped, never a deadlock.
        assert_eq!(gate.enter_cores(5, 9).cores(), 2);
    }

    #[test]
    fn single_core_steps_run_side_by_side() {
        let gate = ComputeGate::with_cores(2);
        let a = gate.enter_cores(1, 1);
        let (tx, rx) = mpsc::channel();
        let other = gate.clone();
        // Not scoped: if the gate wrongly blocks this thread, the test fails and leaves it.
        std::thread::spawn(move || {
            let b = other.enter_cores(1, 1);
            tx.send(b.cores()).unwrap();
        });
        assert_eq!(rx.recv_timeout(BOUND), Ok(1), "the second core was free");
        assert_eq!(a.cores(), 1);
    }

    #[test]
    fn a_whole_machine_step_waits_for_running_steps_and_later_steps_wait_for_it() {
        let gate = ComputeGate::with_cores(2);
        let running = AtomicUsize::new(0);
        let (order_tx, order) = mpsc::channel();
        let piper = gate.enter_cores(1, 1);
        std::thread::scope(|scope| {
            let (g, r, tx) = (&gate, &running, order_tx.clone());
            scope.spawn(move || {
                let turn = g.enter();
                // Nothing else runs while the LLM step holds the machine.
                assert_eq!(r.fetch_add(turn.cores(), Ordering::SeqCst), 0);
                tx.send("llm").unwrap();
                std::thread::sleep(Duration::from_millis(50));
                r.fetch_sub(turn.cores(), Ordering::SeqCst);
            });
            gate.await_tickets(2);
            // A one-core step asking after the LLM step does not overtake it, although a
            // core is free now.
            let (g, r, tx) = (&gate, &running, order_tx.clone());
            scope.spawn(move || {
                let turn = g.enter_cores(1, 1);
                assert_eq!(r.fetch_add(turn.cores(), Ordering::SeqCst), 0);
                tx.send("whisper").unwrap();
                r.fetch_sub(turn.cores(), Ordering::SeqCst);
            });
            gate.await_tickets(3);
            std::thread::sleep(Duration::from_millis(50));
            assert!(
                order.try_recv().is_err(),
                "no step may start while one core is held and the LLM step waits for two"
            );
            drop(piper);
        });
        assert_eq!(order.try_iter().collect::<Vec<_>>(), ["llm", "whisper"]);
    }

    #[test]
    fn an_elastic_step_takes_one_core_when_others_wait() {
        let gate = ComputeGate::with_cores(2);
        let first = gate.enter();
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|scope| {
            for n in 0..2 {
                let (g, tx) = (&gate, tx.clone());
                scope.spawn(move || {
                    let turn = g.enter_cores(1, 2);
                    tx.send(turn.cores()).unwrap();
                    std::thread::sleep(Duration::from_millis(20));
                });
                gate.await_tickets(2 + n as u64);
            }
            drop(first);
        });
        // The first elastic step saw the second waiting behind it: one core each.
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), [1, 1]);
    }

    #[test]
    fn an_elastic_step_keeps_every_core_when_the_next_step_needs_them_all() {
        let gate = ComputeGate::with_cores(2);
        let first = gate.enter();
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|scope| {
            let (g, t) = (&gate, tx.clone());
            scope.spawn(move || t.send(("whisper", g.enter_cores(1, 2).cores())).unwrap());
            gate.await_tickets(2);
            let (g, t) = (&gate, tx.clone());
            scope.spawn(move || t.send(("llm", g.enter().cores())).unwrap());
            gate.await_tickets(3);
            drop(first);
        });
        // The LLM step could not have started beside a one-core Whisper step: Whisper ran on
        // both cores, then the LLM step.
        assert_eq!(
            rx.try_iter().collect::<Vec<_>>(),
            [("whisper", 2), ("llm", 2)]
        );
    }

    #[test]
    fn transcripts_then_urgent_steps_go_ahead_of_normal_ones_in_order() {
        let gate = ComputeGate::with_cores(2);
        let first = gate.enter();
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|scope| {
            let steps = [
                ("later sentence", Urgency::Normal),
                ("first sentence", Urgency::Urgent),
                ("speculation", Urgency::Normal),
                ("llm opening", Urgency::Urgent),
                ("final", Urgency::Transcript),
                ("another final", Urgency::Transcript),
            ];
            for (n, (name, urgency)) in steps.into_iter().enumerate() {
                let (g, t) = (&gate, tx.clone());
                scope.spawn(move || {
                    // Every core: one step at a time, so the order is observable.
                    let _turn = g.enter_as(urgency, 2, 2);
                    t.send(name).unwrap();
                });
                gate.await_tickets(2 + n as u64);
            }
            drop(first);
        });
        assert_eq!(
            rx.try_iter().collect::<Vec<_>>(),
            [
                "final",
                "another final",
                "first sentence",
                "llm opening",
                "later sentence",
                "speculation"
            ]
        );
    }

    #[test]
    fn a_step_should_yield_only_to_its_class_or_a_higher_one() {
        let gate = ComputeGate::with_cores(2);
        let (tx, rx) = mpsc::channel();
        let speculation = gate.enter_as(Urgency::Normal, 2, 2);
        std::thread::scope(|scope| {
            assert!(!speculation.should_yield(), "nobody waits");
            let (g, t) = (&gate, tx.clone());
            scope.spawn(move || {
                let _later = g.enter_as(Urgency::Normal, 1, 1);
                t.send("later sentence").unwrap();
            });
            gate.await_tickets(2);
            assert!(speculation.should_yield(), "its own class waits");
            assert!(!speculation.should_yield_to(Urgency::Urgent));
            let (g, t) = (&gate, tx.clone());
            scope.spawn(move || {
                let _llm = g.enter_as(Urgency::Urgent, 2, 2);
                t.send("llm").unwrap();
            });
            gate.await_tickets(3);
            assert!(speculation.should_yield_to(Urgency::Urgent));
            assert!(!speculation.should_yield_to(Urgency::Transcript));
            drop(speculation);
        });
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), ["llm", "later sentence"]);
        // A final transcript does not yield to lower classes.
        let fin = gate.enter_as(Urgency::Transcript, 1, 2);
        std::thread::scope(|scope| {
            scope.spawn(|| drop(gate.enter_as(Urgency::Urgent, 2, 2)));
            gate.await_tickets(5);
            assert!(!fin.should_yield());
            drop(fin);
        });
    }

    #[test]
    fn a_serial_gate_gives_every_step_the_whole_machine() {
        let gate = ComputeGate::serial();
        let cores = gate.cores();
        assert_eq!(gate.enter_cores(1, 1).cores(), cores);
        let held = gate.enter_cores(1, 1);
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let _turn = gate.enter_cores(1, 1);
                tx.send(()).unwrap();
            });
            gate.await_tickets(3);
            std::thread::sleep(Duration::from_millis(50));
            assert!(
                rx.try_recv().is_err(),
                "a serial gate runs one step at a time"
            );
            drop(held);
        });
        assert!(rx.try_recv().is_ok());
    }
}
