//! The Gemma-2 decoder stack, run as an encoder: transformers' `Gemma2Model`
//! (eager attention) up to a chosen layer.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::config::{Gemma2Config, LayerType};
use crate::decoder::{
    check_ids, check_mask, inv_freq, residual, rope_tables, without_model_prefix, Attention,
    AttentionSpec, Masks, Mlp, RmsNorm,
};
use crate::embedding::Embedding;
use crate::error::{invalid_input, Error, Result};
use crate::weights::{safetensors_files, Weights};

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    pre_feedforward_layernorm: RmsNorm,
    mlp: Mlp,
    post_feedforward_layernorm: RmsNorm,
    layer_type: LayerType,
}

impl DecoderLayer {
    fn load(w: &Weights, cfg: &Gemma2Config, layer_type: LayerType) -> Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        let spec = AttentionSpec {
            hidden: d,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim(),
            bias: cfg.attention_bias,
            scaling: cfg.query_pre_attn_scalar.powf(-0.5),
            softcap: cfg.attn_logit_softcapping,
            qk_norm_eps: None,
        };
        let norm = |name: &str| RmsNorm::one_plus(w, name, d, eps);
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            self_attn: Attention::load(&w.pp("self_attn"), spec)?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            pre_feedforward_layernorm: norm("pre_feedforward_layernorm")?,
            mlp: Mlp::load(&w.pp("mlp"), d, cfg.intermediate_size, cfg.activation()?)?,
            post_feedforward_layernorm: norm("post_feedforward_layernorm")?,
            layer_type,
        })
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = self.input_layernorm.forward(x)?;
        let h = self.self_attn.forward(&h, cos, sin, mask)?;
        let h = self.post_attention_layernorm.forward(&h)?;
        let x = residual(x, &h)?;
        let h = self.pre_feedforward_layernorm.forward(&x)?;
        let h = self.mlp.forward(&h)?;
        let h = self.post_feedforward_layernorm.forward(&h)?;
        residual(&x, &h)
    }
}

/// Gemma-2 as Lumina-Image 2.0's text encoder.
///
/// Equal to transformers' `Gemma2Model` with eager attention, but it stops
/// early: [`Gemma2Encoder::penultimate`] loads and runs the first
/// `num_hidden_layers - 1` decoder layers and returns their output, which is
/// `Gemma2Model(..., output_hidden_states=True).hidden_states[-2]`, the
/// hidden states that *enter* the last decoder layer. Lumina-Image 2.0
/// conditions on exactly those, so the last layer, the final norm and the LM
/// head would only cost memory and time: they are neither loaded nor run.
/// [`Gemma2Encoder::new`] loads any number of layers for callers that want
/// another depth, and [`Gemma2Encoder::forward_to_layer`] stops at any loaded
/// depth (`hidden_states[n]`).
///
/// Padding: `attention_mask` (1 = token, 0 = padding) is combined with the
/// causal (and sliding-window) mask exactly as transformers' masking utilities
/// do: padded keys are masked with the dtype's most negative value, and a
/// query row whose keys are all masked (a padded position beyond the sliding
/// window of every real token, or a sequence with no token at all) gets a
/// uniform softmax over all positions, as PyTorch computes it. Outputs at
/// padded positions therefore match transformers too.
#[derive(Debug, Clone)]
pub struct Gemma2Encoder {
    embed_tokens: Embedding,
    embed_scale: Tensor,
    layers: Vec<DecoderLayer>,
    inv_freq: Vec<f32>,
    sliding_window: Option<usize>,
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    dtype: DType,
    device: Device,
}

impl Gemma2Encoder {
    /// Loads the embeddings and the first `num_layers` decoder layers.
    ///
    /// Keys are looked up with and without transformers' `model.` prefix
    /// (`Gemma2ForCausalLM` checkpoints have it, `Gemma2Model` ones do not).
    pub fn new(cfg: &Gemma2Config, weights: &Weights, num_layers: usize) -> Result<Self> {
        cfg.validate()?;
        if num_layers > cfg.num_hidden_layers {
            return Err(Error::InvalidConfig(format!(
                "cannot load {num_layers} layers: the config has {}",
                cfg.num_hidden_layers
            )));
        }
        let w = without_model_prefix(weights);
        let dtype = w.dtype();
        let device = w.device().clone();
        let embed_tokens = Embedding::load(&w, "embed_tokens", cfg.vocab_size, cfg.hidden_size)?;
        // transformers: torch.tensor(hidden_size ** 0.5) (float32) cast to the weights' dtype.
        let scale = (cfg.hidden_size as f64).sqrt() as f32;
        let embed_scale = Tensor::new(scale, &device)?.to_dtype(dtype)?;
        let types = cfg.layer_types()?;
        let mut layers = Vec::with_capacity(num_layers);
        for (i, t) in types.iter().take(num_layers).enumerate() {
            layers.push(DecoderLayer::load(&w.pp(format!("layers.{i}")), cfg, *t)?);
        }
        let rope = cfg.rope()?;
        let inv_freq = inv_freq(rope.theta, rope.linear_factor, cfg.head_dim());
        Ok(Self {
            embed_tokens,
            embed_scale,
            layers,
            inv_freq,
            sliding_window: cfg.sliding_window,
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.hidden_size,
            num_hidden_layers: cfg.num_hidden_layers,
            dtype,
            device,
        })
    }

    /// Loads what `hidden_states[-2]` needs: all decoder layers but the last.
    pub fn penultimate(cfg: &Gemma2Config, weights: &Weights) -> Result<Self> {
        if cfg.num_hidden_layers == 0 {
            return Err(Error::InvalidConfig(
                "a model without decoder layers has no penultimate hidden state".into(),
            ));
        }
        Self::new(cfg, weights, cfg.num_hidden_layers - 1)
    }

    /// Opens a transformers folder (`config.json` and safetensors, sharded or
    /// not, stored in any float dtype) and loads [`Gemma2Encoder::penultimate`],
    /// computing in `dtype` on `device`.
    pub fn from_folder(path: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let cfg = Gemma2Config::from_file(path)?;
        let files = safetensors_files(path)?;
        let weights = Weights::from_safetensors(&files, dtype, device)?;
        Self::penultimate(&cfg, &weights)
    }

    /// Number of loaded (and run) decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Decoder layers of the checkpoint (`num_hidden_layers`).
    pub fn num_hidden_layers(&self) -> usize {
        self.num_hidden_layers
    }

    /// Width of the returned hidden states.
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The compute device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The hidden states after all loaded layers, `[B, L, hidden_size]` in the
    /// compute dtype (with [`Gemma2Encoder::penultimate`]: `hidden_states[-2]`).
    ///
    /// `input_ids`: `[B, L]` integer token ids; `attention_mask`: `[B, L]`,
    /// nonzero for tokens, 0 for padding (`None`: no padding).
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        self.forward_to_layer(input_ids, attention_mask, self.layers.len())
    }

    /// `hidden_states[n]` of transformers: the embeddings for `n = 0`, else the
    /// output of decoder layer `n - 1`. `n` cannot exceed [`Self::num_layers`].
    pub fn forward_to_layer(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        n: usize,
    ) -> Result<Tensor> {
        if n > self.layers.len() {
            return Err(invalid_input(
                "n",
                format!("layer {n} asked, only {} loaded", self.layers.len()),
            ));
        }
        let (b, l, ids) = check_ids(input_ids, self.vocab_size)?;
        let keep = check_mask(attention_mask, b, l)?;
        let x = self
            .embed_tokens
            .lookup(&ids, self.hidden_size, &self.device)?
            .reshape((b, l, self.hidden_size))?;
        let mut x = x.broadcast_mul(&self.embed_scale)?;
        if n == 0 {
            return Ok(x);
        }
        let (cos, sin) = rope_tables(&self.inv_freq, l, self.dtype, &self.device)?;
        let layers = &self.layers[..n];
        let any_sliding = layers.iter().any(|ly| ly.layer_type == LayerType::Sliding);
        let masks = Masks::new(
            &keep,
            (b, l),
            self.sliding_window,
            any_sliding,
            self.dtype,
            &self.device,
        )?;
        for layer in layers {
            x = layer.forward(&x, &cos, &sin, masks.for_layer(layer.layer_type))?;
        }
        Ok(x)
    }
}
