//! The Qwen3 `config.json`, read with transformers' defaults.

use std::path::Path;

use serde::Deserialize;

use crate::config::{
    load_config, parse_config, parse_layer_types, parse_rope, Activation, Dims, LayerType, Rope,
};
use crate::error::{Error, Result};

fn d_vocab() -> usize {
    151936
}
fn d_hidden() -> usize {
    4096
}
fn d_intermediate() -> usize {
    22016
}
fn d_layers() -> usize {
    32
}
fn d_heads() -> usize {
    32
}
fn d_head_dim() -> usize {
    128
}
fn d_activation() -> String {
    "silu".into()
}
fn d_eps() -> f64 {
    1e-6
}
fn d_max_pos() -> usize {
    32768
}
fn d_sliding() -> Option<usize> {
    Some(4096)
}
fn d_max_window_layers() -> usize {
    28
}

/// The fields of transformers' `Qwen3Config` that the encoder uses, with
/// transformers' defaults (5.24.0: the Qwen3-8B dimensions). Unknown keys are
/// ignored.
///
/// Qwen3-4B, Z-Image's text encoder, sets hidden 2560, 36 layers, 32/8
/// heads of 128, intermediate 9728, `rope_theta` 1e6.
#[derive(Debug, Clone, Deserialize)]
pub struct Qwen3Config {
    /// Vocabulary size (rows of `embed_tokens`).
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    /// Model width.
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    /// Feed-forward width.
    #[serde(default = "d_intermediate")]
    pub intermediate_size: usize,
    /// Decoder layers in the checkpoint.
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    /// Query heads.
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); `null` or absent: as many
    /// as query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width (explicit in Qwen3, not `hidden / heads`).
    #[serde(default = "d_head_dim")]
    pub head_dim: usize,
    /// Feed-forward activation name.
    #[serde(default = "d_activation")]
    pub hidden_act: String,
    /// RMSNorm epsilon (the layer norms and the per-head q/k norms).
    #[serde(default = "d_eps")]
    pub rms_norm_eps: f64,
    /// Longest sequence the model was trained for (informative).
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: usize,
    /// Whether the LM head shares the embedding: irrelevant here (no LM head).
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Whether the attention projections have biases.
    #[serde(default)]
    pub attention_bias: bool,
    /// Sliding-window attention on the layers from `max_window_layers` on;
    /// off in every released Qwen3.
    #[serde(default)]
    pub use_sliding_window: bool,
    /// The window, used only with `use_sliding_window`.
    #[serde(default = "d_sliding")]
    pub sliding_window: Option<usize>,
    /// The first layer index that slides (with `use_sliding_window`).
    #[serde(default = "d_max_window_layers")]
    pub max_window_layers: usize,
    /// Per-layer attention type; default derived as transformers does.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// Legacy top-level RoPE base.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// transformers 5 RoPE parameters (`rope_type`, `rope_theta`, `factor`).
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    /// Legacy name of `rope_parameters`.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
}

impl Default for Qwen3Config {
    /// transformers' `Qwen3Config()`.
    fn default() -> Self {
        // An empty object gets every serde default; this cannot fail.
        serde_json::from_str("{}").unwrap_or_else(|_| unreachable!())
    }
}

impl Qwen3Config {
    /// Parses a `config.json` text.
    pub fn from_json(text: &str) -> Result<Self> {
        parse_config(text, "<string>", Self::validate)
    }

    /// Reads `config.json` from a file or from a folder that holds it.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        load_config(path.as_ref(), Self::validate)
    }

    /// Checks that the config describes a model this crate can build.
    pub fn validate(&self) -> Result<()> {
        Dims {
            layers: self.num_hidden_layers,
            heads: self.num_attention_heads,
            kv_heads: self.num_key_value_heads(),
            head_dim: self.head_dim,
            hidden: self.hidden_size,
            intermediate: self.intermediate_size,
            vocab: self.vocab_size,
        }
        .validate()?;
        self.activation()?;
        self.rope()?;
        let types = self.layer_types()?;
        if types.contains(&LayerType::Sliding) && self.effective_sliding_window().is_none() {
            return Err(Error::InvalidConfig(
                "sliding_attention layers need `use_sliding_window` and `sliding_window`".into(),
            ));
        }
        Ok(())
    }

    /// Key/value heads (`num_attention_heads` when not given).
    pub fn num_key_value_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// The feed-forward activation.
    pub fn activation(&self) -> Result<Activation> {
        Activation::from_name(&self.hidden_act)
    }

    /// The sliding window as transformers keeps it: `sliding_window` when
    /// `use_sliding_window`, else none.
    pub fn effective_sliding_window(&self) -> Option<usize> {
        self.sliding_window.filter(|_| self.use_sliding_window)
    }

    /// The attention type of every layer, as transformers derives it: sliding
    /// from `max_window_layers` on when the window is in use, else full.
    pub fn layer_types(&self) -> Result<Vec<LayerType>> {
        match &self.layer_types {
            Some(names) => parse_layer_types(names, self.num_hidden_layers),
            None => {
                let sliding = self.effective_sliding_window().is_some();
                Ok((0..self.num_hidden_layers)
                    .map(|i| {
                        if sliding && i >= self.max_window_layers {
                            LayerType::Sliding
                        } else {
                            LayerType::Full
                        }
                    })
                    .collect())
            }
        }
    }

    /// The RoPE parameters, as transformers 5 standardises them (see
    /// [`crate::Gemma2Config::rope`]).
    pub fn rope(&self) -> Result<Rope> {
        parse_rope(
            self.rope_parameters.as_ref(),
            self.rope_scaling.as_ref(),
            self.rope_theta,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_transformers_qwen3_defaults() {
        let c = Qwen3Config::default();
        assert_eq!(
            (c.hidden_size, c.num_hidden_layers, c.head_dim, c.vocab_size),
            (4096, 32, 128, 151936)
        );
        assert_eq!(c.num_key_value_heads(), 32);
        assert_eq!(c.effective_sliding_window(), None);
        assert!(c
            .layer_types()
            .unwrap()
            .iter()
            .all(|t| *t == LayerType::Full));
        assert_eq!(c.rope().unwrap().theta, 10_000.0);
        assert_eq!(c.activation().unwrap(), Activation::Silu);
    }

    #[test]
    fn qwen3_4b_config() {
        // Z-Image-Turbo's text_encoder/config.json (Qwen3-4B).
        let c = Qwen3Config::from_json(
            r#"{"architectures": ["Qwen3ForCausalLM"], "attention_bias": false,
                "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
                "head_dim": 128, "hidden_act": "silu", "hidden_size": 2560,
                "initializer_range": 0.02, "intermediate_size": 9728,
                "max_position_embeddings": 40960, "max_window_layers": 36,
                "model_type": "qwen3", "num_attention_heads": 32, "num_hidden_layers": 36,
                "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": null,
                "rope_theta": 1000000, "sliding_window": null, "tie_word_embeddings": true,
                "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
                "use_cache": true, "use_sliding_window": false, "vocab_size": 151936}"#,
        )
        .unwrap();
        assert_eq!(
            (c.hidden_size, c.num_key_value_heads(), c.head_dim),
            (2560, 8, 128)
        );
        assert_eq!(c.rope().unwrap().theta, 1e6);
        assert_eq!(c.layer_types().unwrap().len(), 36);
        assert!(c.tie_word_embeddings);
    }

    #[test]
    fn sliding_layers_and_refusals() {
        let c = Qwen3Config::from_json(
            r#"{"num_hidden_layers": 4, "use_sliding_window": true, "sliding_window": 8,
                "max_window_layers": 2}"#,
        )
        .unwrap();
        use LayerType::*;
        assert_eq!(c.layer_types().unwrap(), vec![Full, Full, Sliding, Sliding]);
        assert!(Qwen3Config::from_json(
            r#"{"num_hidden_layers": 1, "layer_types": ["sliding_attention"]}"#
        )
        .is_err());
        assert!(Qwen3Config::from_json(r#"{"num_key_value_heads": 5}"#).is_err());
        assert!(Qwen3Config::from_json(r#"{"hidden_act": "tanh"}"#).is_err());
        assert!(Qwen3Config::from_json(r#"{"rope_scaling": {"rope_type": "yarn"}}"#).is_err());
        let e = Qwen3Config::from_json(r#"{"num_hidden_layers": 100000000}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("num_hidden_layers") && e.contains("limit"),
            "{e}"
        );
    }
}
