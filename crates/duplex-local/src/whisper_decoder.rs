//! Whisper's text decoder with a cache of its self-attention keys and values: each greedy
//! step feeds only the token it adds. candle's `TextDecoder` caches only the cross-attention
//! keys, so every step re-ran the whole token sequence through every layer; with the cache a
//! transcript of n tokens costs n decoder positions instead of about n²/2.
//!
//! The arithmetic is the same as candle's decoder, op for op (q and k each scaled by
//! d_head^-1/4, tanh-approximated GELU, the tied output projection), so greedy decoding picks
//! the same tokens; a test compares the two on recorded speech.

use candle_core::{Device, IndexOp, Module, Result, Tensor};
use candle_nn::{LayerNorm, Linear, VarBuilder};
use candle_transformers::models::whisper as w;

fn layer_norm(size: usize, vb: VarBuilder) -> Result<LayerNorm> {
    Ok(LayerNorm::new(
        vb.get(size, "weight")?,
        vb.get(size, "bias")?,
        1e-5,
    ))
}

fn linear(i: usize, o: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get((o, i), "weight")?;
    let bias = if bias { Some(vb.get(o, "bias")?) } else { None };
    Ok(Linear::new(weight, bias))
}

#[derive(Clone)]
struct Attention {
    query: Linear,
    key: Linear,
    value: Linear,
    out: Linear,
}

impl Attention {
    fn load(n_state: usize, vb: VarBuilder) -> Result<Attention> {
        Ok(Attention {
            query: linear(n_state, n_state, true, vb.pp("q_proj"))?,
            key: linear(n_state, n_state, false, vb.pp("k_proj"))?,
            value: linear(n_state, n_state, true, vb.pp("v_proj"))?,
            out: linear(n_state, n_state, true, vb.pp("out_proj"))?,
        })
    }
}

#[derive(Clone)]
struct Block {
    attn: Attention,
    attn_ln: LayerNorm,
    cross: Attention,
    cross_ln: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    mlp_ln: LayerNorm,
}

/// The decoder's weights (shared by clones: candle tensors are reference counted).
#[derive(Clone)]
pub struct CachedDecoder {
    embed: Tensor,
    positions: Tensor,
    blocks: Vec<Block>,
    ln: LayerNorm,
    n_head: usize,
}

/// One transcription's keys and values: the audio's per layer (computed once), and the
/// tokens' so far per layer.
pub struct DecoderState {
    cross: Vec<(Tensor, Tensor)>,
    tokens: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl CachedDecoder {
    /// Loads the decoder from the names candle's Whisper uses (`model.decoder.*`).
    pub fn load(vb: VarBuilder, cfg: &w::Config) -> Result<CachedDecoder> {
        let n = cfg.d_model;
        let blocks = (0..cfg.decoder_layers)
            .map(|i| {
                let vb = vb.pp(format!("layers.{i}"));
                Ok(Block {
                    attn: Attention::load(n, vb.pp("self_attn"))?,
                    attn_ln: layer_norm(n, vb.pp("self_attn_layer_norm"))?,
                    cross: Attention::load(n, vb.pp("encoder_attn"))?,
                    cross_ln: layer_norm(n, vb.pp("encoder_attn_layer_norm"))?,
                    fc1: linear(n, 4 * n, true, vb.pp("fc1"))?,
                    fc2: linear(4 * n, n, true, vb.pp("fc2"))?,
                    mlp_ln: layer_norm(n, vb.pp("final_layer_norm"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(CachedDecoder {
            embed: vb.get((cfg.vocab_size, n), "embed_tokens.weight")?,
            positions: vb.get((cfg.max_target_positions, n), "embed_positions.weight")?,
            blocks,
            ln: layer_norm(n, vb.pp("layer_norm"))?,
            n_head: cfg.decoder_attention_heads,
        })
    }

    /// A transcription's state for the encoder's output `audio` (1, frames, d_model): the
    /// cross-attention keys and values of every layer, computed here once.
    pub fn start(&self, audio: &Tensor) -> Result<DecoderState> {
        let cross = self
            .blocks
            .iter()
            .map(|b| Ok((b.cross.key.forward(audio)?, b.cross.value.forward(audio)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(DecoderState {
            cross,
            tokens: vec![None; self.blocks.len()],
            len: 0,
        })
    }

    /// Feeds `tokens` after those fed before; returns their hidden states (1, tokens, d_model)
    /// after the final layer norm.
    pub fn forward(&self, tokens: &[u32], state: &mut DecoderState) -> Result<Tensor> {
        let new = tokens.len();
        let past = state.len;
        let ids = Tensor::new(tokens, self.embed.device())?;
        let mut x = self
            .embed
            .index_select(&ids, 0)?
            .broadcast_add(&self.positions.narrow(0, past, new)?)?
            .unsqueeze(0)?;
        // Within the new tokens, each sees itself and those before it.
        let mask = (new > 1)
            .then(|| causal_mask(past, new, x.device()))
            .transpose()?;
        for (i, block) in self.blocks.iter().enumerate() {
            let h = block.attn_ln.forward(&x)?;
            let q = block.attn.query.forward(&h)?;
            let k = block.attn.key.forward(&h)?;
            let v = block.attn.value.forward(&h)?;
            let (k, v) = match state.tokens[i].take() {
                Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 1)?, Tensor::cat(&[&pv, &v], 1)?),
                None => (k, v),
            };
            let a = self.attention(&q, &k, &v, mask.as_ref())?;
            state.tokens[i] = Some((k, v));
            x = (x + block.attn.out.forward(&a)?)?;

            let h = block.cross_ln.forward(&x)?;
            let q = block.cross.query.forward(&h)?;
            let (k, v) = &state.cross[i];
            let a = self.attention(&q, k, v, None)?;
            x = (&x + block.cross.out.forward(&a)?)?;

            let h = block.fc1.forward(&block.mlp_ln.forward(&x)?)?.gelu()?;
            x = (&x + block.fc2.forward(&h)?)?;
        }
        state.len += new;
        self.ln.forward(&x)
    }

    /// Logits over the vocabulary of one hidden state (d_model): the output projection is the
    /// token embedding, transposed.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        hidden.unsqueeze(0)?.matmul(&self.embed.t()?)?.i(0)
    }

    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let heads = |x: &Tensor| -> Result<Tensor> {
            let (b, n, s) = x.dims3()?;
            x.reshape((b, n, self.n_head, s / self.n_head))?
                .transpose(1, 2)
        };
        let (_, _, n_state) = q.dims3()?;
        let scale = ((n_state / self.n_head) as f64).powf(-0.25);
        let q = (heads(q)? * scale)?;
        let k = (heads(k)?.transpose(2, 3)? * scale)?;
        let v = heads(v)?.contiguous()?;
        let mut qk = q.matmul(&k)?;
        if let Some(mask) = mask {
            qk = qk.broadcast_add(mask)?;
        }
        let w = candle_nn::ops::softmax_last_dim(&qk)?;
        w.matmul(&v)?.transpose(1, 2)?.flatten_from(2)
    }
}

/// `new` rows over `past + new` columns: 0 where a new token may look, -inf ahead of it.
fn causal_mask(past: usize, new: usize, device: &Device) -> Result<Tensor> {
    let cols = past + new;
    let mask: Vec<f32> = (0..new)
        .flat_map(|i| (0..cols).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (new, cols), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_tokens_see_the_past_and_those_before_them() {
        let m = causal_mask(2, 3, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let ninf = f32::NEG_INFINITY;
        assert_eq!(
            m,
            [
                [0.0, 0.0, 0.0, ninf, ninf],
                [0.0, 0.0, 0.0, 0.0, ninf],
                [0.0, 0.0, 0.0, 0.0, 0.0],
            ]
        );
    }
}
