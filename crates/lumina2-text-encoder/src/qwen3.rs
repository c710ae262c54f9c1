//! The Qwen3 decoder stack, run as an encoder: transformers' `Qwen3Model`
//! (eager attention) up to a chosen layer. Z-Image conditions on
//! `hidden_states[-2]` of Qwen3-4B.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::config::LayerType;
use crate::decoder::{residual, Attention, AttentionSpec, Mlp, RmsNorm};
use crate::error::Result;
use crate::qwen3_config::Qwen3Config;
use crate::stack::{
    folder_weights, penultimate_layers, stack_accessors, DecoderStack, Layer, StackConfig,
};
use crate::weights::Weights;

/// A pre-norm decoder layer: `x + attn(norm(x))`, then `x + mlp(norm(x))`
/// (two norms, unlike Gemma-2's four).
#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    layer_type: LayerType,
}

impl DecoderLayer {
    fn load(w: &Weights, cfg: &Qwen3Config, layer_type: LayerType) -> Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        let spec = AttentionSpec {
            hidden: d,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads(),
            head_dim: cfg.head_dim,
            bias: cfg.attention_bias,
            scaling: (cfg.head_dim as f64).powf(-0.5),
            softcap: None,
            qk_norm_eps: Some(eps),
        };
        Ok(Self {
            input_layernorm: RmsNorm::weighted(w, "input_layernorm", d, eps)?,
            self_attn: Attention::load(&w.pp("self_attn"), spec)?,
            post_attention_layernorm: RmsNorm::weighted(w, "post_attention_layernorm", d, eps)?,
            mlp: Mlp::load(&w.pp("mlp"), d, cfg.intermediate_size, cfg.activation()?)?,
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
        let x = residual(x, &h)?;
        let h = self.post_attention_layernorm.forward(&x)?;
        let h = self.mlp.forward(&h)?;
        residual(&x, &h)
    }
}

/// Qwen3 as Z-Image's text encoder.
///
/// Equal to transformers' `Qwen3Model` with eager attention, stopped early:
/// [`Qwen3Encoder::penultimate`] loads and runs the first
/// `num_hidden_layers - 1` decoder layers and returns their output,
/// `Qwen3Model(..., output_hidden_states=True).hidden_states[-2]` (the
/// states that enter the last layer; no final norm), which Z-Image takes.
/// The last layer, the final norm `model.norm` and the LM head are neither
/// loaded nor run. [`Qwen3Encoder::new`] loads any number of layers and
/// [`Qwen3Encoder::forward_to_layer`] stops at any loaded depth
/// (`hidden_states[n]`).
///
/// Against Gemma-2: no embedding scaling, `w * x / rms` norms (the
/// normalised value rounded before the product), per-head `q_norm`/`k_norm`
/// on q and k before RoPE, scores scaled by `head_dim ** -0.5` without
/// soft-capping, SiLU gate, two norms per layer.
///
/// Padding: `attention_mask` (1 = token, 0 = padding, either side) is
/// combined with the causal mask as transformers does; a query row with every
/// key masked (a left-padded position) gets a uniform softmax over all
/// positions, as PyTorch's eager path computes it. Real tokens never see
/// padded keys, so their states do not depend on the padding.
#[derive(Debug, Clone)]
pub struct Qwen3Encoder {
    stack: DecoderStack<DecoderLayer>,
}

impl Qwen3Encoder {
    /// Loads the embeddings and the first `num_layers` decoder layers.
    ///
    /// Keys are looked up with and without transformers' `model.` prefix
    /// (`Qwen3ForCausalLM` checkpoints have it, `Qwen3Model` ones do not).
    pub fn new(cfg: &Qwen3Config, weights: &Weights, num_layers: usize) -> Result<Self> {
        cfg.validate()?;
        let stack_cfg = StackConfig {
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.hidden_size,
            num_hidden_layers: cfg.num_hidden_layers,
            head_dim: cfg.head_dim,
            layer_types: cfg.layer_types()?,
            rope: cfg.rope()?,
            sliding_window: cfg.effective_sliding_window(),
        };
        let stack = DecoderStack::load(stack_cfg, weights, num_layers, |w, t| {
            DecoderLayer::load(w, cfg, t)
        })?;
        Ok(Self { stack })
    }

    /// Loads what `hidden_states[-2]` needs: all decoder layers but the last.
    pub fn penultimate(cfg: &Qwen3Config, weights: &Weights) -> Result<Self> {
        Self::new(cfg, weights, penultimate_layers(cfg.num_hidden_layers)?)
    }

    /// Opens a transformers folder (`config.json` and safetensors, sharded
    /// with `model.safetensors.index.json` or not, stored in any float dtype)
    /// and loads [`Qwen3Encoder::penultimate`], computing in `dtype` on
    /// `device`.
    pub fn from_folder(path: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let cfg = Qwen3Config::from_file(path)?;
        Self::penultimate(&cfg, &folder_weights(path, dtype, device)?)
    }

    stack_accessors!();

    /// The hidden states after all loaded layers, `[B, L, hidden_size]` in the
    /// compute dtype (with [`Qwen3Encoder::penultimate`]: `hidden_states[-2]`).
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
        // No scaling of the embeddings (Gemma scales them by sqrt(hidden)).
        self.stack
            .forward_to_layer(input_ids, attention_mask, n, None)
    }
}
