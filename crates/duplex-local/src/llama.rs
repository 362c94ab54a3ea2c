//! The same chat models as [`ChatModel`] on llama.cpp (through `llama-cpp-2`): the same ChatML
//! prompt and sampling settings, ~1.5x the decode speed and under half the time to first token
//! on 2 cores (Qwen2.5-0.5B: ~35 vs ~22 tokens/s, ~0.5 vs ~1.2 s for a 57-token prompt), and
//! the KV cache of the previous request kept between requests. In a voice conversation each
//! turn's prompt is the last one plus the answer and a new question, so only that tail goes
//! through the model (~0.2 s to the first token of a second turn).
//!
//! llama.cpp is C++ vendored and compiled by `llama-cpp-sys-2` (cmake, libclang for bindgen);
//! its CPU kernels are fixed at build time (see `.cargo/config.toml`).

use std::ffi::{CStr, c_char, c_void};
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::OnceLock;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;

use crate::Error;
use crate::bytelevel::Utf8Stream;
use crate::gate::ComputeGate;
use crate::llm::{ChatModel, END_OF_TEXT, GenParams, GenStats, IM_END, IM_START, Speaker};

/// The context (KV cache) size: a spoken conversation's system prompt and history fit in a
/// few hundred tokens, and 4096 keep the cache at ~50 MB for Qwen2.5-0.5B (the model's own
/// 32768 would take ~400 MB). Longer prompts lose their oldest tokens.
const CONTEXT_TOKENS: u32 = 4096;

/// Prompt tokens per decode call, and so per turn of the compute gate: ~1 s of prefill on 2
/// cores (~130 tokens/s), so another session's step gets in between. Batches of 512 prefilled
/// a 530-token prompt no faster (~4 s either way).
const BATCH_TOKENS: usize = 128;

/// The one sequence of the context.
const SEQ: i32 = 0;

/// llama.cpp's process-wide state. It may be initialised once per process and never again
/// after it is freed, so it lives in a static and is never dropped.
static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();

pub(crate) fn backend() -> &'static LlamaBackend {
    BACKEND.get_or_init(|| {
        // Before anything else of llama.cpp runs: it logs ~140 lines per model load to stderr
        // by default, which would break the server's JSON logs.
        // SAFETY: the callback is a plain function valid for the whole process and ignores
        // its user data.
        unsafe { llama_cpp_sys_2::llama_log_set(Some(log_to_tracing), std::ptr::null_mut()) };
        LlamaBackend::init().expect("llama.cpp's backend is initialised only here")
    })
}

/// llama.cpp's and ggml's log lines as `tracing` events (target `llama_cpp`): errors and
/// warnings as such, the rest (model metadata, progress) at debug level.
unsafe extern "C" fn log_to_tracing(
    level: llama_cpp_sys_2::ggml_log_level,
    text: *const c_char,
    _user_data: *mut c_void,
) {
    if text.is_null() {
        return;
    }
    // SAFETY: llama.cpp passes a NUL-terminated string that lives for the call.
    let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    let text = text.trim_end();
    // Progress dots of the model loader, and the ends of continued lines.
    if text.trim_matches('.').is_empty() {
        return;
    }
    match level {
        llama_cpp_sys_2::GGML_LOG_LEVEL_ERROR => tracing::error!(target: "llama_cpp", "{text}"),
        llama_cpp_sys_2::GGML_LOG_LEVEL_WARN => tracing::warn!(target: "llama_cpp", "{text}"),
        _ => tracing::debug!(target: "llama_cpp", "{text}"),
    }
}

/// A GGUF chat model on llama.cpp, with its context and KV cache.
///
/// A llama.cpp context borrows its model (`LlamaContext<'model>`), and the two must live in
/// one struct that moves between threads (`Arc<Mutex<_>>`, `spawn_blocking`). Instead of a
/// self-referential struct, the model is leaked into a `&'static`: the server loads its model
/// once per process, and a leaked model stays valid for every context that borrows it. Each
/// further `load` leaks another copy of the weights (they are memory-mapped from the file).
pub struct LlamaChat {
    model: &'static LlamaModel,
    ctx: LlamaContext<'static>,
    batch: LlamaBatch<'static>,
    /// The tokens whose keys and values are in the cache, at positions 0, 1, ...
    cached: Vec<LlamaToken>,
    stops: Vec<LlamaToken>,
    pub name: String,
    /// Tokens the context holds (prompt and answer together).
    pub context_length: usize,
}

// `LocalLlm` keeps its engine in `Arc<Mutex<_>>` and runs it on the blocking pool.
const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<LlamaChat>();
};

impl LlamaChat {
    /// Loads a GGUF model and makes its context; `threads` run each decode (prompt batches
    /// and single tokens alike).
    pub fn load(path: &Path, threads: usize) -> Result<LlamaChat, Error> {
        let ChatVocab { model, stops, name } = load_model(path)?;
        let n_ctx = model.n_ctx_train().clamp(1, CONTEXT_TOKENS);
        let threads = i32::try_from(threads.max(1)).unwrap_or(i32::MAX);
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(BATCH_TOKENS as u32)
            .with_n_ubatch(BATCH_TOKENS as u32)
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        let ctx = model.new_context(backend(), params).map_err(|e| {
            Error::Model(format!(
                "{}: llama.cpp could not make a context ({e})",
                path.display()
            ))
        })?;
        Ok(LlamaChat {
            model,
            context_length: ctx.n_ctx() as usize,
            ctx,
            batch: LlamaBatch::new(BATCH_TOKENS, 1),
            cached: Vec::new(),
            stops,
            name,
        })
    }

    /// Token ids of `text`, with ChatML's special tokens parsed as such (as [`ChatModel`]
    /// does).
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        self.tokens(text).iter().map(|t| t.0 as u32).collect()
    }

    fn tokens(&self, text: &str) -> Vec<LlamaToken> {
        self.model.vocab().tokenize(text.as_bytes(), false, true)
    }

    /// Forgets the KV cache: the next request decodes its whole prompt.
    pub fn clear_cache(&mut self) {
        self.ctx.clear_kv_cache();
        self.cached.clear();
    }

    /// Generates a reply to `messages`, handing each piece of text to `on_text`; generation
    /// stops at a stop token, at `max_tokens`, or as soon as `on_text` returns `false`.
    /// The part of the prompt that the cache already holds is not decoded again.
    pub fn generate(
        &mut self,
        messages: &[(Speaker, &str)],
        params: &GenParams,
        gate: &ComputeGate,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<GenStats, Error> {
        let mut prompt = self.tokens(&ChatModel::prompt(messages));
        // Keep room for the answer, cutting the oldest tokens as ChatModel does (a cut
        // prompt shares no prefix with the cache, so it is decoded whole).
        let room = self
            .context_length
            .saturating_sub(params.max_tokens + 8)
            .max(1);
        if prompt.len() > room {
            prompt.drain(..prompt.len() - room);
        }
        let reused = self.reuse_prefix(&prompt);
        let mut stats = GenStats {
            prompt_tokens: prompt.len(),
            prompt_decoded: prompt.len() - reused,
            completion_tokens: 0,
            stopped: false,
        };
        let mut sampler = sampler(self.model, params);
        let mut logits = self.decode(&prompt[reused..], gate)?;
        let vocab = self.model.vocab();
        let mut text = Utf8Stream::default();
        let mut bytes = Vec::new();
        loop {
            let next = sampler.sample(&self.ctx, logits);
            if vocab.is_eog(next) || self.stops.contains(&next) {
                stats.stopped = true;
                break;
            }
            stats.completion_tokens += 1;
            bytes.clear();
            vocab.token_to_piece_into(next, &mut bytes, false, None);
            // Called for every token, even one that completes no character yet, so that the
            // caller can cancel between any two tokens.
            if !on_text(&text.push(&bytes)) {
                break;
            }
            if stats.completion_tokens >= params.max_tokens {
                break;
            }
            logits = self.decode(&[next], gate)?;
        }
        Ok(stats)
    }

    /// Keeps the longest cached prefix of `prompt` and drops the rest of the cache; returns
    /// how many prompt tokens are already decoded. The last prompt token is always decoded
    /// again: its logits pick the first token of the answer.
    fn reuse_prefix(&mut self, prompt: &[LlamaToken]) -> usize {
        let common = self
            .cached
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        let keep = common.min(prompt.len().saturating_sub(1));
        if keep < self.cached.len() {
            let removed = self
                .ctx
                .clear_kv_cache_seq(Some(SEQ as u32), Some(keep as u32), None)
                .unwrap_or(false);
            if !removed {
                // llama.cpp cannot cut this cache (a recurrent model's): start afresh.
                self.clear_cache();
                return 0;
            }
            self.cached.truncate(keep);
        }
        keep
    }

    /// Decodes `tokens` after the cached ones, one decode call (and one turn of the gate) per
    /// batch; returns the batch index of the last token's logits.
    fn decode(&mut self, tokens: &[LlamaToken], gate: &ComputeGate) -> Result<i32, Error> {
        let mut logits = 0;
        let batches = tokens.len().div_ceil(BATCH_TOKENS);
        for (b, chunk) in tokens.chunks(BATCH_TOKENS).enumerate() {
            self.batch.clear();
            let start = self.cached.len();
            for (i, &t) in chunk.iter().enumerate() {
                // Only the very last token's logits are used.
                let last = b + 1 == batches && i + 1 == chunk.len();
                self.batch
                    .add(t, (start + i) as i32, &[SEQ], last)
                    .expect("a chunk fits the batch it was sized for");
            }
            let result = {
                let _turn = gate.enter();
                self.ctx.decode(&mut self.batch)
            };
            if let Err(e) = result {
                // The cache may hold part of the batch: trust none of it.
                self.clear_cache();
                return Err(Error::Inference(format!("llama.cpp decode: {e}")));
            }
            self.cached.extend_from_slice(chunk);
            logits = chunk.len() as i32 - 1;
        }
        Ok(logits)
    }
}

/// A loaded ChatML model (leaked, see [`LlamaChat`]) and what generation needs of its
/// vocabulary.
pub(crate) struct ChatVocab {
    pub model: &'static LlamaModel,
    /// Tokens that end an answer besides llama.cpp's own end-of-generation tokens.
    pub stops: Vec<LlamaToken>,
    pub name: String,
}

/// Loads a GGUF model and checks that it speaks ChatML.
pub(crate) fn load_model(path: &Path) -> Result<ChatVocab, Error> {
    let err = |e: &dyn std::fmt::Display| Error::Model(format!("{}: {e}", path.display()));
    if !path.is_file() {
        return Err(err(&"no such file"));
    }
    let model = LlamaModel::load_from_file(backend(), path, &LlamaModelParams::default())
        .map_err(|e| err(&format!("llama.cpp could not load it ({e})")))?;
    let vocab = model.vocab();
    let single = |text: &str| match vocab.tokenize(text.as_bytes(), false, true).as_slice() {
        [t] => Some(*t),
        _ => None,
    };
    if single(IM_START).is_none() || single(IM_END).is_none() {
        return Err(err(
            &"the vocabulary has no ChatML tokens (<|im_start|>, <|im_end|>)",
        ));
    }
    // End-of-generation tokens (EOS, EOT, <|im_end|> ...) are also asked of llama.cpp per
    // token; these two are named because ChatModel stops at them.
    let stops: Vec<LlamaToken> = [IM_END, END_OF_TEXT]
        .iter()
        .filter_map(|t| single(t))
        .collect();
    let name = model
        .meta_val_str("general.name")
        .unwrap_or_else(|_| "llama.cpp model".to_string());
    // Leaked only once it is known to be a ChatML model (see LlamaChat's doc).
    let model: &'static LlamaModel = Box::leak(Box::new(model));
    Ok(ChatVocab { model, stops, name })
}

/// The sampler chain for `params`: [`ChatModel`]'s semantics (repetition penalty on the
/// answer's last `repeat_last_n` tokens, then greedy, or temperature and top-p).
pub(crate) fn sampler(model: &LlamaModel, params: &GenParams) -> LlamaSampler {
    let mut chain = Vec::new();
    if params.repeat_penalty != 1.0 && params.repeat_last_n > 0 {
        chain.push(LlamaSampler::penalties(
            model.n_vocab(),
            i32::try_from(params.repeat_last_n).unwrap_or(i32::MAX),
            params.repeat_penalty,
            0.0,
            0.0,
        ));
    }
    if params.temperature <= 0.0 {
        chain.push(LlamaSampler::greedy());
    } else {
        // llama.cpp's seeds are 32 bits, and u32::MAX means "pick one at random".
        let seed = (params.seed ^ (params.seed >> 32)) as u32;
        chain.push(LlamaSampler::temp(params.temperature as f32));
        chain.push(LlamaSampler::top_p(params.top_p as f32, 1));
        chain.push(LlamaSampler::dist(seed.min(u32::MAX - 1)));
    }
    LlamaSampler::chain(chain, true)
}
