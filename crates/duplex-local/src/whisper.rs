//! Whisper speech recognition on candle, loading a CTranslate2 export (`model/model.bin`,
//! `config.json`, `vocabulary.txt`) directly: the CT2 names are mapped onto candle's Whisper
//! (fused QKV projections are split) at load time, so no conversion step is needed.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::{D, DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::whisper::{self as w, model::Whisper};

use crate::Error;
use crate::bytelevel::ByteLevel;
use crate::ct2::Ct2Model;
use crate::gate::{ComputeGate, GateGuard, Urgency};
use crate::whisper_decoder::CachedDecoder;

/// Audio quieter than this RMS (of samples in -1..1, about -45 dBFS) is silence: Whisper
/// invents text for silence ("Thank you."), so it is never decoded.
const SILENCE_RMS: f32 = 0.005;
/// Utterances shorter than this are not decoded (a cough, a click): 0.3 s holds no word.
const MIN_SPEECH_SAMPLES: usize = w::SAMPLE_RATE * 3 / 10;
/// Probability of the no-speech token above which the segment counts as no speech (Whisper's
/// own default threshold).
const NO_SPEECH_THRESHOLD: f32 = 0.6;
/// Upper bound on tokens per second of audio (fast speech is ~4 words/s, ~6 tokens/s): a
/// decoder far past it is looping.
const MAX_TOKENS_PER_SECOND: f32 = 8.0;
/// Tokens allowed regardless of duration.
const MIN_TOKEN_BUDGET: usize = 12;
/// The decoder's text context (448) minus the prompt.
const MAX_TOKENS: usize = 220;

/// Silence after the speech in the encoder window (100 frames = 1 s).
const MEL_PADDING_FRAMES: usize = 100;
/// Shortest encoder window (1000 frames = 10 s).
const MIN_WINDOW_FRAMES: usize = 1000;

/// A recognition result.
#[derive(Debug, Clone, PartialEq)]
pub struct Transcript {
    pub text: String,
    /// Probability of "no speech" the model gave this audio.
    pub no_speech_prob: f32,
    /// Why decoding stopped early, if it did (a guard fired).
    pub guard: Option<&'static str>,
}

/// A loaded Whisper model (English-only or multilingual, greedy decoding without timestamps).
/// Cloning shares the weights (candle tensors are reference counted): each clone has only its
/// own decoder cache and its own narrow thread pools, so a pool of clones transcribes several
/// utterances at once.
pub struct WhisperModel {
    /// Thread pools of fewer threads than the machine has cores, by thread count, made when a
    /// step is first given that many cores by the gate (candle splits its work over the rayon
    /// pool it runs in). A step given every core runs on rayon's global pool.
    narrow: std::sync::Mutex<Vec<(usize, std::sync::Arc<rayon::ThreadPool>)>>,
    /// The encoder is candle's; its decoder is used only as the reference the cached one is
    /// tested against ([`WhisperModel::transcribe_reference`]).
    model: Whisper,
    decoder: CachedDecoder,
    filters: Vec<f32>,
    vocab: Vec<String>,
    bytes: ByteLevel,
    eot: u32,
    no_speech: Option<u32>,
    /// `[sot, (lang, transcribe)?, no_timestamps]`.
    prompt: Vec<u32>,
    /// Additive mask over the vocabulary: `-inf` for suppressed tokens.
    suppress: Tensor,
    suppress_begin: Vec<u32>,
}

/// Runs `f` on `pool`, or on the calling thread (rayon's global pool for candle's parallel
/// work) without one.
fn on<R: Send>(pool: Option<std::sync::Arc<rayon::ThreadPool>>, f: impl FnOnce() -> R + Send) -> R {
    match pool {
        Some(pool) => pool.install(f),
        None => f(),
    }
}

impl Clone for WhisperModel {
    fn clone(&self) -> Self {
        WhisperModel {
            // Not shared: two clones given one core each must run on two threads.
            narrow: Default::default(),
            model: self.model.clone(),
            decoder: self.decoder.clone(),
            filters: self.filters.clone(),
            vocab: self.vocab.clone(),
            bytes: self.bytes.clone(),
            eot: self.eot,
            no_speech: self.no_speech,
            prompt: self.prompt.clone(),
            suppress: self.suppress.clone(),
            suppress_begin: self.suppress_begin.clone(),
        }
    }
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Model(format!("{}: {e}", path.display()))
}

impl WhisperModel {
    /// Loads `dir/model.bin`, `dir/config.json` and `dir/vocabulary.txt`.
    pub fn load(dir: &Path) -> Result<WhisperModel, Error> {
        let bin = dir.join("model.bin");
        let mut r = BufReader::new(File::open(&bin).map_err(|e| io_err(&bin, e))?);
        let ct2 = Ct2Model::read(&mut r).map_err(|e| io_err(&bin, e))?;
        if ct2.spec != "WhisperSpec" {
            return Err(io_err(&bin, format!("not a Whisper model ({})", ct2.spec)));
        }
        let vocab_path = dir.join("vocabulary.txt");
        let vocab: Vec<String> = std::fs::read_to_string(&vocab_path)
            .map_err(|e| io_err(&vocab_path, e))?
            .lines()
            .map(str::to_string)
            .collect();
        let cfg_path = dir.join("config.json");
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&cfg_path).map_err(|e| io_err(&cfg_path, e))?)
                .map_err(|e| io_err(&cfg_path, e))?;
        let ids = |key: &str| -> Vec<u32> {
            cfg[key]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_u64())
                        .map(|v| v as u32)
                        .collect()
                })
                .unwrap_or_default()
        };

        let (tensors, config) = map_weights(&ct2, vocab.len()).map_err(|e| io_err(&bin, e))?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let model = Whisper::load(&vb, config.clone()).map_err(|e| io_err(&bin, e))?;
        let decoder =
            CachedDecoder::load(vb.pp("model.decoder"), &config).map_err(|e| io_err(&bin, e))?;

        let find = |t: &str| vocab.iter().position(|v| v == t).map(|i| i as u32);
        let missing = |t: &str| io_err(&vocab_path, format!("no {t} token"));
        let sot = find(w::SOT_TOKEN).ok_or_else(|| missing(w::SOT_TOKEN))?;
        let eot = find(w::EOT_TOKEN).ok_or_else(|| missing(w::EOT_TOKEN))?;
        let no_timestamps =
            find(w::NO_TIMESTAMPS_TOKEN).ok_or_else(|| missing(w::NO_TIMESTAMPS_TOKEN))?;
        let no_speech = w::NO_SPEECH_TOKENS.iter().find_map(|t| find(t));
        // English-only models have no task tokens: the prompt is just sot + notimestamps.
        let multilingual = vocab.len() >= 51865;
        let mut prompt = vec![sot];
        if multilingual {
            prompt.extend(find("<|en|>"));
            prompt.extend(find(w::TRANSCRIBE_TOKEN));
        }
        prompt.push(no_timestamps);

        let mut mask = vec![0f32; vocab.len()];
        for id in ids("suppress_ids") {
            if let Some(m) = mask.get_mut(id as usize) {
                *m = f32::NEG_INFINITY;
            }
        }
        // No timestamps, no task or language tokens in the output: everything after eot.
        for m in mask.iter_mut().skip(eot as usize + 1) {
            *m = f32::NEG_INFINITY;
        }
        let suppress = Tensor::new(mask, &Device::Cpu).map_err(|e| io_err(&bin, e))?;
        let mut suppress_begin = ids("suppress_ids_begin");
        if suppress_begin.is_empty() {
            suppress_begin = vec![220, eot];
        }

        Ok(WhisperModel {
            narrow: Default::default(),
            model,
            decoder,
            filters: mel_filters(config.num_mel_bins, w::N_FFT, w::SAMPLE_RATE as f32),
            vocab,
            bytes: ByteLevel::default(),
            eot,
            no_speech,
            prompt,
            suppress,
            suppress_begin,
        })
    }

    /// The pool a step given `cores` cores runs on: none (rayon's global pool, every core)
    /// without a gate or with every core, else this instance's pool of that many threads.
    fn pool_for(
        &self,
        cores: Option<usize>,
    ) -> Result<Option<std::sync::Arc<rayon::ThreadPool>>, Error> {
        let Some(cores) = cores.filter(|&c| c < rayon::current_num_threads()) else {
            return Ok(None);
        };
        let mut pools = self
            .narrow
            .lock()
            .expect("pool list lock is never poisoned");
        if let Some((_, pool)) = pools.iter().find(|(n, _)| *n == cores) {
            return Ok(Some(pool.clone()));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cores)
            .thread_name(move |i| format!("whisper-{cores}c-{i}"))
            .build()
            .map_err(|e| Error::Inference(format!("whisper thread pool: {e}")))?;
        let pool = std::sync::Arc::new(pool);
        pools.push((cores, pool.clone()));
        Ok(Some(pool))
    }

    /// Transcribes one utterance of 16 kHz mono samples in -1..1 (at most 30 s are used).
    pub fn transcribe(&mut self, samples: &[f32]) -> Result<Transcript, Error> {
        self.transcribe_with(samples, None, &|| false)
    }

    /// [`transcribe_with`](Self::transcribe_with) as a normal (not urgent) step.
    pub fn transcribe_with(
        &mut self,
        samples: &[f32],
        gate: Option<&ComputeGate>,
        stop: &dyn Fn() -> bool,
    ) -> Result<Transcript, Error> {
        let normal = || Urgency::Normal;
        self.transcribe_as(
            samples,
            gate.map(|g| (g, &normal as &dyn Fn() -> Urgency)),
            stop,
        )
    }

    /// [`transcribe`](Self::transcribe) in steps (the encoder, then each decoder token), each
    /// taking `gate` if there is one (with the urgency the function gives at that step: a
    /// final transcript is urgent, a speculation is not until a final waits for it), and
    /// asking `stop` before each: when it answers true the transcription ends with
    /// [`Error::Cancelled`] (a stale speculation, a dropped turn).
    pub fn transcribe_as(
        &mut self,
        samples: &[f32],
        gate: Option<(&ComputeGate, &dyn Fn() -> Urgency)>,
        stop: &dyn Fn() -> bool,
    ) -> Result<Transcript, Error> {
        self.run(samples, gate, stop, false)
    }

    /// [`transcribe`](Self::transcribe) with candle's own decoder, which feeds the whole token
    /// sequence again at every step: the reference the cached decoder must agree with (tests
    /// and benches only).
    #[doc(hidden)]
    pub fn transcribe_reference(&mut self, samples: &[f32]) -> Result<Transcript, Error> {
        self.run(samples, None, &|| false, true)
    }

    fn run(
        &mut self,
        samples: &[f32],
        gate: Option<(&ComputeGate, &dyn Fn() -> Urgency)>,
        stop: &dyn Fn() -> bool,
        reference: bool,
    ) -> Result<Transcript, Error> {
        let silent = Transcript {
            text: String::new(),
            no_speech_prob: 1.0,
            guard: None,
        };
        if samples.len() < MIN_SPEECH_SAMPLES || rms(samples) < SILENCE_RMS {
            return Ok(silent);
        }
        let samples = &samples[..samples.len().min(w::N_SAMPLES)];
        let mel = w::audio::pcm_to_mel(&self.model.config, samples, &self.filters);
        let n_mels = self.model.config.num_mel_bins;
        let frames = mel.len() / n_mels;
        let mel = Tensor::from_vec(mel, (1, n_mels, frames), &Device::Cpu)?;
        // Whisper was trained on 30 s windows (3000 frames); the encoder's cost grows with the
        // window, so a short utterance gets a shorter window: its audio plus 1 s of padding,
        // never under 10 s (shorter windows made tiny.en drift on the LibriVox clips, 10 s
        // windows gave the same transcripts as 30 s ones at a third of the cost).
        let spoken = samples.len() / w::HOP_LENGTH;
        let window = (spoken + MEL_PADDING_FRAMES).clamp(MIN_WINDOW_FRAMES, w::N_FRAMES);
        let mel = mel.narrow(2, 0, window.min(frames))?;
        if stop() {
            return Err(Error::Cancelled);
        }
        // The gate's turn, kept from one step to the next while nobody of its class or a
        // higher one waits and the urgency stays the same (a final transcript's tokens run
        // back to back instead of each waiting behind an LLM step).
        let mut turn = None;
        let audio = {
            take_turn(&mut turn, gate);
            let pool = self.pool_for(turn.as_ref().map(|t| t.cores()))?;
            let encoder = &mut self.model.encoder;
            on(pool, || encoder.forward(&mel, true))?
        };

        let seconds = samples.len() as f32 / w::SAMPLE_RATE as f32;
        let budget =
            (MIN_TOKEN_BUDGET + (seconds * MAX_TOKENS_PER_SECOND) as usize).min(MAX_TOKENS);
        let mut tokens = self.prompt.clone();
        let mut state = self.decoder.start(&audio)?;
        let mut no_speech_prob = 0.0;
        let mut guard = None;
        for step in 0..=budget {
            if step == budget {
                guard = Some("token budget for the audio length exceeded");
                break;
            }
            if stop() {
                return Err(Error::Cancelled);
            }
            take_turn(&mut turn, gate);
            let pool = self.pool_for(turn.as_ref().map(|t| t.cores()))?;
            let (reference_decoder, decoder, no_speech, suppress) = (
                &mut self.model.decoder,
                &self.decoder,
                self.no_speech,
                &self.suppress,
            );
            let state = &mut state;
            let (mut logits, ns_prob) = on(pool, || {
                // The logits at the sot position (for the no-speech probability, first step
                // only) and at the last position.
                let first = step == 0 && no_speech.is_some();
                let (at_sot, logits) = if reference {
                    let input = Tensor::new(tokens.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
                    let hidden = reference_decoder.forward(&input, &audio, step == 0)?;
                    let at = |i: usize| {
                        reference_decoder
                            .final_linear(&hidden.i((.., i..i + 1))?)?
                            .i((0, 0))
                    };
                    let (_, seq, _) = hidden.dims3()?;
                    (first.then(|| at(0)).transpose()?, at(seq - 1)?)
                } else {
                    // The prompt at the first step, then the token the last step added.
                    let new = if step == 0 {
                        &tokens[..]
                    } else {
                        &tokens[tokens.len() - 1..]
                    };
                    let hidden = decoder.forward(new, state)?;
                    let at = |i: usize| decoder.logits(&hidden.i((0, i))?);
                    let (_, seq, _) = hidden.dims3()?;
                    (first.then(|| at(0)).transpose()?, at(seq - 1)?)
                };
                let mut ns_prob = None;
                if let (Some(at_sot), Some(ns)) = (at_sot, no_speech) {
                    let probs = candle_nn::ops::softmax(&at_sot, D::Minus1)?;
                    ns_prob = Some(probs.i(ns as usize)?.to_scalar::<f32>()?);
                }
                Ok::<_, Error>(((logits + suppress)?.to_vec1::<f32>()?, ns_prob))
            })?;
            if let Some(p) = ns_prob {
                no_speech_prob = p;
            }
            if step == 0 {
                for &id in &self.suppress_begin {
                    if let Some(l) = logits.get_mut(id as usize) {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
            let next = argmax(&logits);
            if next == self.eot {
                break;
            }
            tokens.push(next);
            let generated = &tokens[self.prompt.len()..];
            if let Some(cut) = repetition_cut(generated) {
                tokens.truncate(self.prompt.len() + cut);
                guard = Some("repeated phrase");
                break;
            }
        }
        // The cached decoder feeds each token once; candle's (the reference) caches only the
        // cross-attention keys (flushed at step 0) and feeds the whole sequence at each step.
        let generated = &tokens[self.prompt.len()..];
        if no_speech_prob > NO_SPEECH_THRESHOLD && generated.len() < 4 {
            return Ok(Transcript {
                no_speech_prob,
                ..silent
            });
        }
        let mut bytes = Vec::new();
        for &t in generated {
            if t < self.eot {
                self.bytes.decode_into(&self.vocab[t as usize], &mut bytes);
            }
        }
        Ok(Transcript {
            text: String::from_utf8_lossy(&bytes).trim().to_string(),
            no_speech_prob,
            guard,
        })
    }
}

/// Takes the gate for a step of a transcription, keeping the turn `turn` holds from the step
/// before while its urgency is unchanged and nobody of its class or a higher one waits.
fn take_turn<'g>(
    turn: &mut Option<GateGuard<'g>>,
    gate: Option<(&'g ComputeGate, &dyn Fn() -> Urgency)>,
) {
    let Some((g, u)) = gate else { return };
    let urgency = u();
    if turn
        .as_ref()
        .is_some_and(|t| t.urgency() != urgency || t.should_yield())
    {
        *turn = None;
    }
    if turn.is_none() {
        *turn = Some(g.enter_as(urgency, 1, g.cores()));
    }
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn rms(samples: &[f32]) -> f32 {
    (samples.iter().map(|s| s * s).sum::<f32>() / samples.len().max(1) as f32).sqrt()
}

/// If the generated tokens end with the same n-gram three times in a row (n = 1..=8 tokens;
/// a single token needs 5 repeats since "very very" is real), returns the length to keep:
/// up to the end of the first occurrence.
pub fn repetition_cut(tokens: &[u32]) -> Option<usize> {
    for n in 1..=8usize {
        let times = if n == 1 { 5 } else { 3 };
        if tokens.len() < n * times {
            continue;
        }
        let end = tokens.len();
        let last = &tokens[end - n..];
        if (1..times).all(|k| &tokens[end - (k + 1) * n..end - k * n] == last) {
            return Some(end - (times - 1) * n);
        }
    }
    None
}

/// Maps CTranslate2 Whisper variable names onto candle's (Hugging Face) names.
fn map_weights(
    ct2: &Ct2Model,
    vocab_size: usize,
) -> std::io::Result<(HashMap<String, Tensor>, w::Config)> {
    let mut out = HashMap::new();
    let count_layers = |prefix: &str| {
        (0..)
            .take_while(|i| {
                ct2.variables
                    .contains_key(&format!("{prefix}/layer_{i}/ffn/linear_0/weight"))
            })
            .count()
    };
    let enc_layers = count_layers("encoder");
    let dec_layers = count_layers("decoder");
    let conv1 = ct2.tensor("encoder/conv1/weight")?;
    let (d_model, n_mels, _) = conv1.dims3().map_err(to_io)?;
    let dec_pos = ct2.tensor("decoder/position_encodings/encodings")?;
    let n_text_ctx = dec_pos.dim(0).map_err(to_io)?;
    let enc_pos = ct2.tensor("encoder/position_encodings/encodings")?;
    let n_audio_ctx = enc_pos.dim(0).map_err(to_io)?;

    let mut put = |name: String, t: Tensor| {
        out.insert(name, t);
    };
    let e = "model.encoder";
    let d = "model.decoder";
    put(format!("{e}.conv1.weight"), conv1);
    put(format!("{e}.conv1.bias"), ct2.tensor("encoder/conv1/bias")?);
    put(
        format!("{e}.conv2.weight"),
        ct2.tensor("encoder/conv2/weight")?,
    );
    put(format!("{e}.conv2.bias"), ct2.tensor("encoder/conv2/bias")?);
    put(
        format!("{e}.layer_norm.weight"),
        ct2.tensor("encoder/layer_norm/gamma")?,
    );
    put(
        format!("{e}.layer_norm.bias"),
        ct2.tensor("encoder/layer_norm/beta")?,
    );
    put(
        format!("{d}.embed_tokens.weight"),
        ct2.tensor("decoder/embeddings/weight")?,
    );
    put(format!("{d}.embed_positions.weight"), dec_pos);
    put(
        format!("{d}.layer_norm.weight"),
        ct2.tensor("decoder/layer_norm/gamma")?,
    );
    put(
        format!("{d}.layer_norm.bias"),
        ct2.tensor("decoder/layer_norm/beta")?,
    );

    let norm = |put: &mut dyn FnMut(String, Tensor), src: &str, dst: &str| -> std::io::Result<()> {
        put(
            format!("{dst}.weight"),
            ct2.tensor(&format!("{src}/gamma"))?,
        );
        put(format!("{dst}.bias"), ct2.tensor(&format!("{src}/beta"))?);
        Ok(())
    };
    let linear =
        |put: &mut dyn FnMut(String, Tensor), src: &str, dst: &str| -> std::io::Result<()> {
            put(
                format!("{dst}.weight"),
                ct2.tensor(&format!("{src}/weight"))?,
            );
            put(format!("{dst}.bias"), ct2.tensor(&format!("{src}/bias"))?);
            Ok(())
        };
    // A fused projection stacks [q; k; v] (or [k; v]) along the output dimension.
    let split =
        |put: &mut dyn FnMut(String, Tensor), src: &str, dsts: &[&str]| -> std::io::Result<()> {
            let wt = ct2.tensor(&format!("{src}/weight"))?;
            let b = ct2.tensor(&format!("{src}/bias"))?;
            for (i, dst) in dsts.iter().enumerate() {
                put(
                    format!("{dst}.weight"),
                    wt.narrow(0, i * d_model, d_model).map_err(to_io)?,
                );
                put(
                    format!("{dst}.bias"),
                    b.narrow(0, i * d_model, d_model).map_err(to_io)?,
                );
            }
            Ok(())
        };
    for (side, n, hf) in [("encoder", enc_layers, e), ("decoder", dec_layers, d)] {
        for i in 0..n {
            let s = format!("{side}/layer_{i}");
            let h = format!("{hf}.layers.{i}");
            split(
                &mut put,
                &format!("{s}/self_attention/linear_0"),
                &[
                    &format!("{h}.self_attn.q_proj"),
                    &format!("{h}.self_attn.k_proj"),
                    &format!("{h}.self_attn.v_proj"),
                ],
            )?;
            linear(
                &mut put,
                &format!("{s}/self_attention/linear_1"),
                &format!("{h}.self_attn.out_proj"),
            )?;
            norm(
                &mut put,
                &format!("{s}/self_attention/layer_norm"),
                &format!("{h}.self_attn_layer_norm"),
            )?;
            linear(&mut put, &format!("{s}/ffn/linear_0"), &format!("{h}.fc1"))?;
            linear(&mut put, &format!("{s}/ffn/linear_1"), &format!("{h}.fc2"))?;
            norm(
                &mut put,
                &format!("{s}/ffn/layer_norm"),
                &format!("{h}.final_layer_norm"),
            )?;
            if side == "decoder" {
                linear(
                    &mut put,
                    &format!("{s}/attention/linear_0"),
                    &format!("{h}.encoder_attn.q_proj"),
                )?;
                split(
                    &mut put,
                    &format!("{s}/attention/linear_1"),
                    &[
                        &format!("{h}.encoder_attn.k_proj"),
                        &format!("{h}.encoder_attn.v_proj"),
                    ],
                )?;
                linear(
                    &mut put,
                    &format!("{s}/attention/linear_2"),
                    &format!("{h}.encoder_attn.out_proj"),
                )?;
                norm(
                    &mut put,
                    &format!("{s}/attention/layer_norm"),
                    &format!("{h}.encoder_attn_layer_norm"),
                )?;
            }
        }
    }
    let config = w::Config {
        num_mel_bins: n_mels,
        max_source_positions: n_audio_ctx,
        d_model,
        encoder_attention_heads: ct2.int("encoder/num_heads")? as usize,
        encoder_layers: enc_layers,
        vocab_size,
        max_target_positions: n_text_ctx,
        decoder_attention_heads: ct2.int("decoder/num_heads")? as usize,
        decoder_layers: dec_layers,
        suppress_tokens: Vec::new(),
    };
    Ok((out, config))
}

fn to_io(e: candle_core::Error) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

/// librosa's mel filter bank (Slaney scale and normalisation), as Whisper's `mel_filters.npz`
/// holds it: `n_mels x (n_fft/2 + 1)`, row-major.
pub fn mel_filters(n_mels: usize, n_fft: usize, sample_rate: f32) -> Vec<f32> {
    fn hz_to_mel(f: f64) -> f64 {
        let f_sp = 200.0 / 3.0;
        let min_log_hz = 1000.0;
        let min_log_mel = min_log_hz / f_sp;
        let logstep = (6.4f64).ln() / 27.0;
        if f >= min_log_hz {
            min_log_mel + (f / min_log_hz).ln() / logstep
        } else {
            f / f_sp
        }
    }
    fn mel_to_hz(m: f64) -> f64 {
        let f_sp = 200.0 / 3.0;
        let min_log_hz = 1000.0;
        let min_log_mel = min_log_hz / f_sp;
        let logstep = (6.4f64).ln() / 27.0;
        if m >= min_log_mel {
            min_log_hz * (logstep * (m - min_log_mel)).exp()
        } else {
            f_sp * m
        }
    }
    let n_bins = n_fft / 2 + 1;
    let sr = sample_rate as f64;
    let fft_freqs: Vec<f64> = (0..n_bins).map(|i| i as f64 * sr / n_fft as f64).collect();
    let (lo, hi) = (hz_to_mel(0.0), hz_to_mel(sr / 2.0));
    let mel_f: Vec<f64> = (0..n_mels + 2)
        .map(|i| mel_to_hz(lo + (hi - lo) * i as f64 / (n_mels + 1) as f64))
        .collect();
    let mut weights = vec![0f32; n_mels * n_bins];
    for m in 0..n_mels {
        let enorm = 2.0 / (mel_f[m + 2] - mel_f[m]);
        for (k, &f) in fft_freqs.iter().enumerate() {
            let lower = (f - mel_f[m]) / (mel_f[m + 1] - mel_f[m]);
            let upper = (mel_f[m + 2] - f) / (mel_f[m + 2] - mel_f[m + 1]);
            weights[m * n_bins + k] = (lower.min(upper).max(0.0) * enorm) as f32;
        }
    }
    weights
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// A transcription keeps its turn from token to token while only lower classes wait (an
    /// urgent LLM step waits until the final transcript is done, instead of running between
    /// two of its tokens), and lets go for a waiter of its own class or when its urgency
    /// changes.
    #[test]
    fn a_transcript_keeps_its_turn_between_tokens_until_its_class_waits() {
        let gate = ComputeGate::with_cores(2);
        let transcript = || Urgency::Transcript;
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|scope| {
            // Inside the scope: a failed assertion drops the turn, so the other threads end
            // and the test fails instead of hanging.
            let mut turn = None;
            take_turn(&mut turn, Some((&gate, &transcript)));
            assert_eq!(
                turn.as_ref().map(|t| t.cores()),
                Some(2),
                "alone: every core"
            );
            let (g, t) = (&gate, tx.clone());
            scope.spawn(move || {
                let _llm = g.enter_as(Urgency::Urgent, 2, 2);
                t.send("llm").unwrap();
            });
            // The LLM step waits at the gate.
            while !turn.as_ref().unwrap().should_yield_to(Urgency::Urgent) {
                std::thread::sleep(Duration::from_millis(1));
            }
            // The next tokens keep the turn: the LLM step does not run in between.
            let ticket = turn.as_ref().unwrap().ticket();
            for _ in 0..3 {
                take_turn(&mut turn, Some((&gate, &transcript)));
                assert_eq!(turn.as_ref().unwrap().ticket(), ticket, "the same turn");
                std::thread::sleep(Duration::from_millis(5));
                assert!(
                    rx.try_recv().is_err(),
                    "the LLM step ran between two tokens"
                );
            }
            // Another final transcript asks: this one lets go at its next token, and both
            // run before the LLM step (side by side on a core each, or the other first on
            // both if it starts before this one asks again).
            let (g, t) = (&gate, tx.clone());
            scope.spawn(move || {
                let _other = g.enter_as(Urgency::Transcript, 1, 2);
                t.send("final").unwrap();
                std::thread::sleep(Duration::from_millis(20));
            });
            while !turn.as_ref().unwrap().should_yield() {
                std::thread::sleep(Duration::from_millis(1));
            }
            take_turn(&mut turn, Some((&gate, &transcript)));
            assert_ne!(turn.as_ref().unwrap().ticket(), ticket, "a new turn");
            assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok("final"));
            assert!(rx.try_recv().is_err(), "the LLM waits for both finals");
            drop(turn);
        });
        assert_eq!(rx.try_recv(), Ok("llm"));
    }
}
