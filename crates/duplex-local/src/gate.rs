//! The compute gate: one CPU-heavy step at a time, first come first served.
//!
//! candle and ONNX Runtime already spread one step (a Whisper decode, an LLM token, a Piper
//! sentence) over every core, so running two steps at once only makes both slower and starves
//! the async runtime. Steps are short (an LLM token is ~30-60 ms), so a generation that takes
//! the gate per token lets a sentence of TTS or another session's transcript in between, and
//! the first audio of a reply does not wait for the whole reply.

use std::sync::{Arc, Condvar, Mutex};

/// A FIFO ticket lock shared by the local engines. Cloning shares the gate.
#[derive(Clone, Default)]
pub struct ComputeGate {
    inner: Arc<(Mutex<Tickets>, Condvar)>,
}

#[derive(Default)]
struct Tickets {
    next: u64,
    serving: u64,
}

/// Holds the gate; dropping it lets the next ticket in.
pub struct GateGuard<'a> {
    gate: &'a ComputeGate,
}

impl ComputeGate {
    pub fn new() -> ComputeGate {
        ComputeGate::default()
    }

    /// Waits (blocking the thread: call from a blocking thread only) for this caller's turn.
    pub fn enter(&self) -> GateGuard<'_> {
        let (lock, cv) = &*self.inner;
        let mut t = lock
            .lock()
            .expect("gate lock is never poisoned: no code panics under it");
        let ticket = t.next;
        t.next += 1;
        while t.serving != ticket {
            t = cv.wait(t).expect("gate lock is never poisoned");
        }
        GateGuard { gate: self }
    }
}

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        let (lock, cv) = &*self.gate.inner;
        let mut t = lock.lock().expect("gate lock is never poisoned");
        t.serving += 1;
        cv.notify_all();
    }
}
