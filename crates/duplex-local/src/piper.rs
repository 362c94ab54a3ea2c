//! Piper voices (VITS exported to ONNX) on ONNX Runtime, loaded at run time from the
//! `libonnxruntime.so` of PyPI's `onnxruntime` wheel; text is phonemized by espeak-ng.

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::Session;
use ort::value::Tensor;

use crate::Error;
use crate::espeak::Espeak;
use crate::gate::{ComputeGate, Urgency};

/// Loudest sample after normalisation (Piper normalises each utterance to its peak; a little
/// headroom avoids clipping after the session's resampler).
const PEAK: f32 = 0.9 * 32767.0;
/// Quieter peaks than this are silence and are not amplified.
const MIN_PEAK: f32 = 0.01;

/// ONNX Runtime's threads do not spin (busy-wait) after a run, its default: on 2 cores with
/// the other engines a spinning pool took 0.96 s per sentence against 0.63 s without (the
/// engines bench, `concurrency`).
const SPIN: bool = false;

/// A loaded Piper voice.
pub struct PiperVoice {
    session: Session,
    espeak: Espeak,
    ids: HashMap<char, Vec<i64>>,
    pub sample_rate: u32,
    noise_scale: f32,
    length_scale: f32,
    noise_w: f32,
}

/// Initialises ONNX Runtime from `lib` once per process (ort allows one environment) and
/// returns that environment.
pub fn init_onnxruntime(lib: &Path) -> Result<&'static Environment, Error> {
    static ENV: OnceLock<Result<Environment, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let builder = ort::init_from(lib).map_err(|e| {
            format!(
                "cannot load ONNX Runtime from {} ({e}); run scripts/setup-models.sh",
                lib.display()
            )
        })?;
        builder
            .with_name("duplex")
            .build()
            .map_err(|e| format!("ONNX Runtime environment: {e}"))
    })
    .as_ref()
    .map_err(|e| Error::Model(e.clone()))
}

impl PiperVoice {
    /// Loads `model` (`.onnx`) and its `.onnx.json` config next to it.
    pub fn load(model: &Path, onnxruntime: &Path, threads: usize) -> Result<PiperVoice, Error> {
        PiperVoice::load_with(model, onnxruntime, threads, SPIN)
    }

    /// [`load`](Self::load) with ONNX Runtime's intra-op threads spinning (busy-waiting for
    /// work after a run) or not.
    pub fn load_with(
        model: &Path,
        onnxruntime: &Path,
        threads: usize,
        spin: bool,
    ) -> Result<PiperVoice, Error> {
        let env = init_onnxruntime(onnxruntime)?;
        let err =
            |p: &Path, e: &dyn std::fmt::Display| Error::Model(format!("{}: {e}", p.display()));
        let cfg_path = model.with_extension("onnx.json");
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&cfg_path).map_err(|e| err(&cfg_path, &e))?)
                .map_err(|e| err(&cfg_path, &e))?;
        let mut ids = HashMap::new();
        for (k, v) in cfg["phoneme_id_map"]
            .as_object()
            .ok_or_else(|| err(&cfg_path, &"no phoneme_id_map"))?
        {
            let mut chars = k.chars();
            if let (Some(c), None) = (chars.next(), chars.next()) {
                let list: Vec<i64> = v
                    .as_array()
                    .map(|a| a.iter().filter_map(|x| x.as_i64()).collect())
                    .unwrap_or_default();
                ids.insert(c, list);
            }
        }
        for needed in ['^', '_', '$'] {
            if !ids.contains_key(&needed) {
                return Err(err(&cfg_path, &format!("phoneme_id_map lacks {needed:?}")));
            }
        }
        let inf = &cfg["inference"];
        let f = |v: &serde_json::Value, d: f64| v.as_f64().unwrap_or(d) as f32;
        let session = Session::builder(env)
            .and_then(|b| b.with_intra_threads(threads).map_err(Into::into))
            .and_then(|b| b.with_intra_op_spinning(spin).map_err(Into::into))
            .and_then(|mut b| b.commit_from_file(model))
            .map_err(|e| err(model, &e))?;
        Ok(PiperVoice {
            session,
            espeak: Espeak::global()?,
            ids,
            sample_rate: cfg["audio"]["sample_rate"].as_u64().unwrap_or(22050) as u32,
            noise_scale: f(&inf["noise_scale"], 0.667),
            length_scale: f(&inf["length_scale"], 1.0),
            noise_w: f(&inf["noise_w"], 0.8),
        })
    }

    /// Phoneme ids of `text`: `^ _ (phoneme _)* $`, clauses joined by their punctuation.
    pub fn phoneme_ids(&self, text: &str) -> Result<Vec<i64>, Error> {
        let mut phonemes = String::new();
        for (clause, punct) in clauses(text) {
            for p in self.espeak.phonemes(clause)? {
                if !phonemes.is_empty() && !phonemes.ends_with(' ') {
                    phonemes.push(' ');
                }
                phonemes.push_str(p.trim());
            }
            if let Some(p) = punct {
                phonemes.push(p);
            }
        }
        let mut out = self.ids[&'^'].clone();
        let pad = &self.ids[&'_'];
        out.extend(pad);
        for c in phonemes.chars() {
            // Phonemes the voice was not trained on are skipped (Piper does the same).
            if let Some(id) = self.ids.get(&c) {
                out.extend(id);
                out.extend(pad);
            }
        }
        out.extend(&self.ids[&'$']);
        Ok(out)
    }

    /// Synthesizes `text` (a sentence or clause) to 16-bit samples at `sample_rate`.
    pub fn synthesize(&mut self, text: &str) -> Result<Vec<i16>, Error> {
        self.synthesize_with(text, None)
    }

    /// [`synthesize_as`](Self::synthesize_as) as a normal (not urgent) step.
    pub fn synthesize_with(
        &mut self,
        text: &str,
        gate: Option<&ComputeGate>,
    ) -> Result<Vec<i16>, Error> {
        self.synthesize_as(text, gate.map(|g| (g, Urgency::Normal)))
    }

    /// [`synthesize`](Self::synthesize), holding `gate` (if any, with that urgency: an
    /// answer's first sentence is urgent) during the model's run only (phonemizing is short
    /// and takes espeak-ng's own lock).
    pub fn synthesize_as(
        &mut self,
        text: &str,
        gate: Option<(&ComputeGate, Urgency)>,
    ) -> Result<Vec<i16>, Error> {
        let ids = self.phoneme_ids(text)?;
        if ids.len() <= 3 {
            return Ok(Vec::new());
        }
        let n = ids.len();
        let run = |e: ort::Error| Error::Inference(format!("piper: {e}"));
        let input = Tensor::from_array(([1usize, n], ids)).map_err(run)?;
        let lengths = Tensor::from_array(([1usize], vec![n as i64])).map_err(run)?;
        let scales = Tensor::from_array((
            [3usize],
            vec![self.noise_scale, self.length_scale, self.noise_w],
        ))
        .map_err(run)?;
        // One core: the session runs on one ONNX Runtime thread (see `PIPER_THREADS`).
        let _turn = gate.map(|(g, u)| g.enter_as(u, 1, 1));
        let outputs = self
            .session
            .run(ort::inputs![
                "input" => input,
                "input_lengths" => lengths,
                "scales" => scales,
            ])
            .map_err(run)?;
        let (_, audio) = outputs[0].try_extract_tensor::<f32>().map_err(run)?;
        let peak = audio.iter().fold(0f32, |m, s| m.max(s.abs()));
        let gain = PEAK / peak.max(MIN_PEAK);
        Ok(audio
            .iter()
            .map(|s| (s * gain).clamp(-32768.0, 32767.0) as i16)
            .collect())
    }
}

/// Splits text into clauses and their closing punctuation (`.`, `,`, `?`, `!`, `;`, `:`),
/// the way Piper's patched espeak reports them, so that the voice hears the punctuation.
pub fn clauses(text: &str) -> Vec<(&str, Option<char>)> {
    let mut out = Vec::new();
    let mut start = 0;
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    for (i, &(pos, c)) in chars.iter().enumerate() {
        let next_is_space = chars.get(i + 1).is_none_or(|&(_, n)| n.is_whitespace());
        if matches!(c, '.' | ',' | '?' | '!' | ';' | ':') && next_is_space {
            let clause = text[start..pos].trim();
            if !clause.is_empty() {
                out.push((clause, Some(c)));
            }
            start = pos + c.len_utf8();
        }
    }
    let rest = text[start..].trim();
    if !rest.is_empty() {
        out.push((rest, None));
    }
    out
}
