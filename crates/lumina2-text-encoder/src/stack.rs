//! What the Gemma-2 ([`crate::Gemma2Encoder`]) and Qwen3
//! ([`crate::Qwen3Encoder`]) encoders share: the token embedding and the
//! first decoder layers of a checkpoint, loaded with and without the
//! `model.` prefix, and the run over them up to `hidden_states[n]` (input
//! checks, RoPE tables, causal / sliding-window masks with padding). Each
//! encoder states its own decoder layer ([`Layer`]) and whether it scales the
//! embeddings.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::config::{LayerType, Rope};
use crate::decoder::{check_ids, check_mask, inv_freq, rope_tables, without_model_prefix, Masks};
use crate::embedding::Embedding;
use crate::error::{invalid_input, Error, Result};
use crate::weights::{safetensors_files, Weights};

/// A decoder layer of one of the encoders.
pub(crate) trait Layer: Sized {
    /// The layer's attention pattern (which mask it takes).
    fn layer_type(&self) -> LayerType;
    /// The layer's output for hidden states `x`, RoPE tables `cos`/`sin` and
    /// the additive attention mask `mask`.
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &Tensor) -> Result<Tensor>;
}

/// What [`DecoderStack::load`] needs of a (validated) config.
pub(crate) struct StackConfig {
    /// Vocabulary size (rows of `embed_tokens`).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Decoder layers in the checkpoint.
    pub num_hidden_layers: usize,
    /// Per-head width (of the RoPE frequencies).
    pub head_dim: usize,
    /// The attention type of every layer.
    pub layer_types: Vec<LayerType>,
    /// The RoPE parameters.
    pub rope: Rope,
    /// The window of the sliding-attention layers (`None`: no window).
    pub sliding_window: Option<usize>,
}

/// The embedding and the loaded decoder layers of an encoder.
#[derive(Debug, Clone)]
pub(crate) struct DecoderStack<L> {
    embed_tokens: Embedding,
    layers: Vec<L>,
    inv_freq: Vec<f32>,
    sliding_window: Option<usize>,
    vocab_size: usize,
    pub(crate) hidden_size: usize,
    pub(crate) num_hidden_layers: usize,
    pub(crate) dtype: DType,
    pub(crate) device: Device,
}

/// The number of layers that `hidden_states[-2]` needs: all but the last.
pub(crate) fn penultimate_layers(num_hidden_layers: usize) -> Result<usize> {
    if num_hidden_layers == 0 {
        return Err(Error::InvalidConfig(
            "a model without decoder layers has no penultimate hidden state".into(),
        ));
    }
    Ok(num_hidden_layers - 1)
}

/// The weights of a transformers folder (safetensors, sharded or not, stored
/// in any float dtype), computing in `dtype` on `device`.
pub(crate) fn folder_weights(path: &Path, dtype: DType, device: &Device) -> Result<Weights> {
    let files = safetensors_files(path)?;
    Ok(Weights::from_safetensors(&files, dtype, device)?)
}

impl<L: Layer> DecoderStack<L> {
    /// Loads the embeddings and the first `num_layers` decoder layers,
    /// `load_layer` reading layer `i` under `layers.{i}.` with its type.
    /// Keys are looked up with and without transformers' `model.` prefix.
    pub(crate) fn load(
        cfg: StackConfig,
        weights: &Weights,
        num_layers: usize,
        load_layer: impl Fn(&Weights, LayerType) -> Result<L>,
    ) -> Result<Self> {
        if num_layers > cfg.num_hidden_layers {
            return Err(Error::InvalidConfig(format!(
                "cannot load {num_layers} layers: the config has {}",
                cfg.num_hidden_layers
            )));
        }
        let w = without_model_prefix(weights);
        let embed_tokens = Embedding::load(&w, "embed_tokens", cfg.vocab_size, cfg.hidden_size)?;
        let mut layers = Vec::with_capacity(num_layers);
        for (i, t) in cfg.layer_types.iter().take(num_layers).enumerate() {
            layers.push(load_layer(&w.pp(format!("layers.{i}")), *t)?);
        }
        Ok(Self {
            embed_tokens,
            layers,
            inv_freq: inv_freq(cfg.rope.theta, cfg.rope.linear_factor, cfg.head_dim),
            sliding_window: cfg.sliding_window,
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.hidden_size,
            num_hidden_layers: cfg.num_hidden_layers,
            dtype: w.dtype(),
            device: w.device().clone(),
        })
    }

    /// Number of loaded decoder layers.
    pub(crate) fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// `hidden_states[n]` of transformers: the embeddings (times
    /// `embed_scale` where the model scales them) for `n = 0`, else the
    /// output of decoder layer `n - 1`; `n` cannot exceed the loaded layers.
    pub(crate) fn forward_to_layer(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        n: usize,
        embed_scale: Option<&Tensor>,
    ) -> Result<Tensor> {
        if n > self.layers.len() {
            return Err(invalid_input(
                "n",
                format!("layer {n} asked, only {} loaded", self.layers.len()),
            ));
        }
        let (b, l, ids) = check_ids(input_ids, self.vocab_size)?;
        let keep = check_mask(attention_mask, b, l)?;
        let mut x = self
            .embed_tokens
            .lookup(&ids, self.hidden_size, &self.device)?
            .reshape((b, l, self.hidden_size))?;
        if let Some(scale) = embed_scale {
            x = x.broadcast_mul(scale)?;
        }
        if n == 0 {
            return Ok(x);
        }
        let (cos, sin) = rope_tables(&self.inv_freq, l, self.dtype, &self.device)?;
        let layers = &self.layers[..n];
        let any_sliding = layers
            .iter()
            .any(|ly| ly.layer_type() == LayerType::Sliding);
        let masks = Masks::new(
            &keep,
            (b, l),
            self.sliding_window,
            any_sliding,
            self.dtype,
            &self.device,
        )?;
        for layer in layers {
            x = layer.forward(&x, &cos, &sin, masks.for_layer(layer.layer_type()))?;
        }
        Ok(x)
    }
}

/// The accessors that both encoders have, over their `stack` field.
macro_rules! stack_accessors {
    () => {
        /// Number of loaded (and run) decoder layers.
        pub fn num_layers(&self) -> usize {
            self.stack.num_layers()
        }

        /// Decoder layers of the checkpoint (`num_hidden_layers`).
        pub fn num_hidden_layers(&self) -> usize {
            self.stack.num_hidden_layers
        }

        /// Width of the returned hidden states.
        pub fn hidden_size(&self) -> usize {
            self.stack.hidden_size
        }

        /// The compute dtype.
        pub fn dtype(&self) -> DType {
            self.stack.dtype
        }

        /// The compute device.
        pub fn device(&self) -> &Device {
            &self.stack.device
        }
    };
}
pub(crate) use stack_accessors;
