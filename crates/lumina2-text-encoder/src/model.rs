//! The Gemma-2 decoder stack, run as an encoder: transformers' `Gemma2Model`
//! (eager attention) up to a chosen layer.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::config::{Gemma2Config, LayerType};
use crate::decoder::{residual, Attention, AttentionSpec, Mlp, RmsNorm};
use crate::error::Result;
use crate::stack::{
    folder_weights, penultimate_layers, stack_accessors, DecoderStack, Layer, StackConfig,
};
use crate::weights::Weights;

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
}

impl Layer for DecoderLayer {
    fn layer_type(&self) -> LayerType {
        self.layer_type
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
    stack: DecoderStack<DecoderLayer>,
    embed_scale: Tensor,
}

impl Gemma2Encoder {
    /// Loads the embeddings and the first `num_layers` decoder layers.
    ///
    /// Keys are looked up with and without transformers' `model.` prefix
    /// (`Gemma2ForCausalLM` checkpoints have it, `Gemma2Model` ones do not).
    pub fn new(cfg: &Gemma2Config, weights: &Weights, num_layers: usize) -> Result<Self> {
        cfg.validate()?;
        let stack_cfg = StackConfig {
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.hidden_size,
            num_hidden_layers: cfg.num_hidden_layers,
            head_dim: cfg.head_dim(),
            layer_types: cfg.layer_types()?,
            rope: cfg.rope()?,
            sliding_window: cfg.sliding_window,
        };
        let stack = DecoderStack::load(stack_cfg, weights, num_layers, |w, t| {
            DecoderLayer::load(w, cfg, t)
        })?;
        // transformers: torch.tensor(hidden_size ** 0.5) (float32) cast to the weights' dtype.
        let scale = (cfg.hidden_size as f64).sqrt() as f32;
        let embed_scale = Tensor::new(scale, &stack.device)?.to_dtype(stack.dtype)?;
        Ok(Self { stack, embed_scale })
    }

    /// Loads what `hidden_states[-2]` needs: all decoder layers but the last.
    pub fn penultimate(cfg: &Gemma2Config, weights: &Weights) -> Result<Self> {
        Self::new(cfg, weights, penultimate_layers(cfg.num_hidden_layers)?)
    }

    /// Opens a transformers folder (`config.json` and safetensors, sharded or
    /// not, stored in any float dtype) and loads [`Gemma2Encoder::penultimate`],
    /// computing in `dtype` on `device`.
    pub fn from_folder(path: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let cfg = Gemma2Config::from_file(path)?;
        Self::penultimate(&cfg, &folder_weights(path, dtype, device)?)
    }

    stack_accessors!();

    /// The hidden states after all loaded layers, `[B, L, hidden_size]` in the
    /// compute dtype (with [`Gemma2Encoder::penultimate`]: `hidden_states[-2]`).
    ///
    /// `input_ids`: `[B, L]` integer token ids; `attention_mask`: `[B, L]`,
    /// nonzero for tokens, 0 for padding (`None`: no padding).
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        self.forward_to_layer(input_ids, attention_mask, self.num_layers())
    }

    /// `hidden_states[n]` of transformers: the embeddings for `n = 0`, else the
    /// output of decoder layer `n - 1`. `n` cannot exceed [`Self::num_layers`].
    pub fn forward_to_layer(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        n: usize,
    ) -> Result<Tensor> {
        // Gemma scales the embeddings by sqrt(hidden_size).
        let scale = Some(&self.embed_scale);
        self.stack
            .forward_to_layer(input_ids, attention_mask, n, scale)
    }
}
