//! What the local engines report for the server's metrics, without depending on a metrics
//! library: the server sets each engine's [`Observer`] to its own implementation of
//! [`Observe`] (Prometheus there); engines call it at each event. The calls are a few atomic adds on the
//! other side, cheap next to an inference step.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// A local engine, as metrics label it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Stt,
    Llm,
    Tts,
}

impl Engine {
    pub fn label(self) -> &'static str {
        match self {
            Engine::Stt => "stt",
            Engine::Llm => "llm",
            Engine::Tts => "tts",
        }
    }
}

/// Receives the engines' events. Every method has an empty default.
pub trait Observe: Send + Sync + 'static {
    /// A job waited this long in `engine`'s queue before it started (an LLM turn: before its
    /// prompt's first step).
    fn queue_wait(&self, _engine: Engine, _wait: Duration) {}
    /// A job was dropped from `engine`'s full queue (a speculative transcription).
    fn dropped(&self, _engine: Engine) {}
    /// One LLM decode step ran with this many sequences (answers) in it.
    fn llm_step(&self, _sequences: usize) {}
    /// The LLM generated this many tokens.
    fn llm_tokens(&self, _tokens: u64) {}
    /// Answers the LLM is generating now (prefilling or decoding).
    fn llm_active(&self, _sequences: usize) {}
}

/// Where an engine reports: empty until [`set`](Observer::set) (the server sets it once,
/// after loading the engines). Cloning shares the cell.
#[derive(Clone, Default)]
pub struct Observer(Arc<OnceLock<Arc<dyn Observe>>>);

impl Observer {
    /// Reports nowhere until set.
    pub fn none() -> Observer {
        Observer::default()
    }

    /// Reports to `observe` from now on; false if this observer was set already.
    pub fn set(&self, observe: Arc<dyn Observe>) -> bool {
        self.0.set(observe).is_ok()
    }

    fn get(&self) -> Option<&Arc<dyn Observe>> {
        self.0.get()
    }

    pub fn queue_wait(&self, engine: Engine, wait: Duration) {
        if let Some(o) = self.get() {
            o.queue_wait(engine, wait);
        }
    }

    pub fn dropped(&self, engine: Engine) {
        if let Some(o) = self.get() {
            o.dropped(engine);
        }
    }

    pub fn llm_step(&self, sequences: usize) {
        if let Some(o) = self.get() {
            o.llm_step(sequences);
        }
    }

    pub fn llm_tokens(&self, tokens: u64) {
        if let Some(o) = self.get() {
            o.llm_tokens(tokens);
        }
    }

    pub fn llm_active(&self, sequences: usize) {
        if let Some(o) = self.get() {
            o.llm_active(sequences);
        }
    }
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.get().is_some() {
            "Observer"
        } else {
            "Observer(none)"
        })
    }
}
