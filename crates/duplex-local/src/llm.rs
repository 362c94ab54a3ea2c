//! A small chat model from a GGUF file on candle's quantized kernels: Qwen2 (`qwen2`
//! architecture) or Llama-family models such as SmolLM2 (`llama`). The tokenizer is read from
//! the GGUF metadata; the prompt uses the ChatML template both families are tuned on.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use candle_transformers::models::{quantized_llama, quantized_qwen2};

use crate::Error;
use crate::bytelevel::{Bpe, QWEN2_PATTERN, Utf8Stream};
use crate::gate::ComputeGate;

pub(crate) const IM_START: &str = "<|im_start|>";
pub(crate) const IM_END: &str = "<|im_end|>";
pub(crate) const END_OF_TEXT: &str = "<|endoftext|>";

/// Sampling settings of one generation.
#[derive(Debug, Clone)]
pub struct GenParams {
    pub max_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    pub top_p: f64,
    /// Divides the logits of recently generated tokens (>1 discourages loops, which small
    /// models fall into easily).
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for GenParams {
    fn default() -> Self {
        GenParams {
            // A spoken answer of a few sentences; the system prompt asks for brevity and this
            // bounds a model that ignores it.
            max_tokens: 160,
            temperature: 0.7,
            top_p: 0.9,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            seed: 299_792_458,
        }
    }
}

/// Role and text of a message, as the engine sees them.
#[derive(Debug, Clone, Copy)]
pub enum Speaker {
    System,
    User,
    Assistant,
}

/// What a generation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenStats {
    pub prompt_tokens: usize,
    /// Prompt tokens run through the model; the rest came from the KV cache of an earlier
    /// request (`LlamaChat` only: `ChatModel` decodes every prompt whole).
    pub prompt_decoded: usize,
    pub completion_tokens: usize,
    /// Stopped by a stop token (as opposed to the token limit or the caller).
    pub stopped: bool,
}

/// Where the model's tensors are read from.
enum Reader {
    File(BufReader<File>),
    Memory(std::io::Cursor<Vec<u8>>),
}

impl std::io::Read for Reader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Reader::File(r) => r.read(buf),
            Reader::Memory(r) => r.read(buf),
        }
    }
}

impl std::io::Seek for Reader {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        match self {
            Reader::File(r) => r.seek(pos),
            Reader::Memory(r) => r.seek(pos),
        }
    }
}

fn slow_dtype(t: GgmlDType) -> bool {
    matches!(t, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1)
}

fn needs_requantize(ct: &gguf_file::Content) -> bool {
    ct.tensor_infos.values().any(|t| slow_dtype(t.ggml_dtype))
}

/// candle has AVX2 kernels for Q4_0, Q8_0 and the k-quants but runs Q4_1, Q5_0 and Q5_1 on
/// scalar code: 20x slower, ~1 token/s for Qwen2.5-0.5B Q4_K_M, whose attention and FFN
/// tensors are mostly Q5_0. Those tensors are re-quantized to Q8_0 at load (more bits, so no
/// loss; ~1 s for this model) and the model is read back from the rewritten GGUF in memory.
fn requantize(
    ct: gguf_file::Content,
    r: &mut BufReader<File>,
) -> candle_core::Result<(gguf_file::Content, std::io::Cursor<Vec<u8>>)> {
    let mut tensors = Vec::with_capacity(ct.tensor_infos.len());
    for name in ct.tensor_infos.keys() {
        let t = ct.tensor(r, name, &Device::Cpu)?;
        let slow = slow_dtype(t.dtype());
        let row = t.shape().dims().last().copied().unwrap_or(0);
        let t = if slow && row % GgmlDType::Q8_0.block_size() == 0 {
            QTensor::quantize(&t.dequantize(&Device::Cpu)?, GgmlDType::Q8_0)?
        } else {
            t
        };
        tensors.push((name.clone(), t));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> =
        ct.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut buf = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut buf, &metadata, &refs)?;
    buf.set_position(0);
    let content = gguf_file::Content::read(&mut buf)?;
    Ok((content, buf))
}

enum Weights {
    Qwen2(quantized_qwen2::ModelWeights),
    Llama(quantized_llama::ModelWeights),
}

impl Weights {
    fn forward(&mut self, x: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        match self {
            Weights::Qwen2(m) => m.forward(x, pos),
            Weights::Llama(m) => m.forward(x, pos),
        }
    }

    fn reset(&mut self) -> Result<(), Error> {
        match self {
            Weights::Qwen2(m) => m.clear_kv_cache(),
            // candle's quantized Llama resets its cache whenever it sees position 0.
            Weights::Llama(_) => {}
        }
        Ok(())
    }
}

/// A loaded GGUF chat model.
pub struct ChatModel {
    weights: Weights,
    bpe: Bpe,
    stops: Vec<u32>,
    pub name: String,
    pub context_length: usize,
}

impl ChatModel {
    /// Loads a GGUF model. Models with tensors candle runs slowly are re-quantized once and
    /// the result is kept next to the model as `<name>.candle.gguf` (rebuilt when older).
    pub fn load(path: &Path) -> Result<ChatModel, Error> {
        let err = |e: &dyn std::fmt::Display| Error::Model(format!("{}: {e}", path.display()));
        let cache = path.with_extension("candle.gguf");
        let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let fresh = matches!((modified(&cache), modified(path)), (Some(c), Some(m)) if c >= m);
        let source = if fresh { cache.as_path() } else { path };
        let mut r = BufReader::new(File::open(source).map_err(|e| err(&e))?);
        let ct = gguf_file::Content::read(&mut r).map_err(|e| err(&e))?;
        let (ct, mut r) = if fresh || !needs_requantize(&ct) {
            (ct, Reader::File(r))
        } else {
            let (ct, buf) = requantize(ct, &mut r).map_err(|e| err(&e))?;
            // Best effort: without the cache the next start re-quantizes again.
            let tmp = cache.with_extension("tmp");
            if std::fs::write(&tmp, buf.get_ref())
                .and_then(|_| std::fs::rename(&tmp, &cache))
                .is_err()
            {
                tracing::warn!(cache = %cache.display(), "could not cache the re-quantized model");
            }
            (ct, Reader::Memory(buf))
        };
        let md = |k: &str| ct.metadata.get(k);
        let arch = md("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        let name = md("general.name")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| arch.clone());
        let strings = |k: &str| -> Result<Vec<String>, Error> {
            md(k)
                .ok_or_else(|| err(&format!("no {k} in the GGUF metadata")))?
                .to_vec()
                .map_err(|e| err(&e))?
                .iter()
                .map(|v| v.to_string().cloned().map_err(|e| err(&e)))
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let bpe = Bpe::new(
            tokens,
            &merges,
            QWEN2_PATTERN,
            &[IM_START, IM_END, END_OF_TEXT],
        )
        .map_err(|e| err(&e))?;
        let context_length = md(&format!("{arch}.context_length"))
            .and_then(|v| v.to_u32().ok())
            .unwrap_or(2048) as usize;
        let mut stops: Vec<u32> = [IM_END, END_OF_TEXT]
            .iter()
            .filter_map(|t| bpe.token_id(t))
            .collect();
        stops.extend(md("tokenizer.ggml.eos_token_id").and_then(|v| v.to_u32().ok()));
        if bpe.token_id(IM_START).is_none() || bpe.token_id(IM_END).is_none() {
            return Err(err(
                &"the vocabulary has no ChatML tokens (<|im_start|>, <|im_end|>)",
            ));
        }
        let weights = match arch.as_str() {
            "qwen2" => Weights::Qwen2(
                quantized_qwen2::ModelWeights::from_gguf(ct, &mut r, &Device::Cpu)
                    .map_err(|e| err(&e))?,
            ),
            "llama" => Weights::Llama(
                quantized_llama::ModelWeights::from_gguf(ct, &mut r, &Device::Cpu)
                    .map_err(|e| err(&e))?,
            ),
            other => return Err(err(&format!("unsupported architecture {other:?}"))),
        };
        Ok(ChatModel {
            weights,
            bpe,
            stops,
            name,
            context_length,
        })
    }

    /// The ChatML prompt of a conversation, ending with the assistant's turn opened.
    pub fn prompt(messages: &[(Speaker, &str)]) -> String {
        let mut p = String::new();
        for (who, text) in messages {
            let role = match who {
                Speaker::System => "system",
                Speaker::User => "user",
                Speaker::Assistant => "assistant",
            };
            p.push_str(&format!("{IM_START}{role}\n{}{IM_END}\n", text.trim()));
        }
        p.push_str(&format!("{IM_START}assistant\n"));
        p
    }

    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        self.bpe.encode(text)
    }

    /// Generates a reply to `messages`, handing each piece of text to `on_text`; generation
    /// stops at a stop token, at `max_tokens`, or as soon as `on_text` returns `false`.
    pub fn generate(
        &mut self,
        messages: &[(Speaker, &str)],
        params: &GenParams,
        gate: &ComputeGate,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<GenStats, Error> {
        let mut prompt = self.tokenize(&Self::prompt(messages));
        // Keep room for the answer: drop the oldest tokens after the system prompt would be
        // nicer, but the session's history is short; cutting from the front keeps the end.
        let room = self.context_length.saturating_sub(params.max_tokens + 8);
        if prompt.len() > room {
            prompt.drain(..prompt.len() - room);
        }
        let sampling = if params.temperature <= 0.0 {
            Sampling::ArgMax
        } else {
            Sampling::TopP {
                p: params.top_p,
                temperature: params.temperature,
            }
        };
        let mut sampler = LogitsProcessor::from_sampling(params.seed, sampling);
        self.weights.reset()?;
        let mut stats = GenStats {
            prompt_tokens: prompt.len(),
            prompt_decoded: prompt.len(),
            completion_tokens: 0,
            stopped: false,
        };
        let input = Tensor::new(prompt.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let mut logits = {
            let _turn = gate.enter();
            self.weights.forward(&input, 0)?.squeeze(0)?
        };
        let mut pos = prompt.len();
        let mut generated: Vec<u32> = Vec::new();
        let mut text = Utf8Stream::default();
        let mut bytes = Vec::new();
        loop {
            let logits_f = if params.repeat_penalty != 1.0 && !generated.is_empty() {
                let start = generated.len().saturating_sub(params.repeat_last_n);
                candle_transformers::utils::apply_repeat_penalty(
                    &logits,
                    params.repeat_penalty,
                    &generated[start..],
                )?
            } else {
                logits.clone()
            };
            let next = sampler.sample(&logits_f)?;
            if self.stops.contains(&next) {
                stats.stopped = true;
                break;
            }
            generated.push(next);
            stats.completion_tokens += 1;
            bytes.clear();
            self.bpe.token_bytes(next, &mut bytes);
            // Called for every token, even one that completes no character yet, so that the
            // caller can cancel between any two tokens.
            if !on_text(&text.push(&bytes)) {
                break;
            }
            if stats.completion_tokens >= params.max_tokens {
                break;
            }
            let input = Tensor::new(&[next], &Device::Cpu)?.unsqueeze(0)?;
            let _turn = gate.enter();
            logits = self.weights.forward(&input, pos)?.squeeze(0)?;
            pos += 1;
        }
        Ok(stats)
    }
}
