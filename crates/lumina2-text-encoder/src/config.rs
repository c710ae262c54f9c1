//! The Gemma-2 `config.json`, read with transformers' defaults.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::error::{Error, Result};

/// Which attention pattern a decoder layer uses (`layer_types` in `config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerType {
    /// Causal attention over the whole sequence.
    Full,
    /// Causal attention over the last `sliding_window` positions (the query included).
    Sliding,
}

/// The activation of the feed-forward gate (`hidden_activation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// GELU, tanh approximation (`gelu_pytorch_tanh`, `gelu_new`, `gelu_fast`).
    GeluTanh,
    /// Exact GELU (`gelu`).
    GeluErf,
    /// SiLU (`silu`, `swish`).
    Silu,
    /// ReLU (`relu`).
    Relu,
}

impl Activation {
    pub(crate) fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" | "gelu_python_tanh" => Self::GeluTanh,
            "gelu" => Self::GeluErf,
            "silu" | "swish" => Self::Silu,
            "relu" => Self::Relu,
            other => {
                return Err(Error::InvalidConfig(format!(
                    "activation `{other}` (hidden_activation / hidden_act) is not supported"
                )))
            }
        })
    }
}

/// Rotary embedding parameters, as transformers 5 standardises them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    /// `rope_theta`: the base wavelength.
    pub theta: f64,
    /// The divisor of the positions of `linear` RoPE scaling (1 for `default`).
    pub linear_factor: f64,
}

fn d_vocab() -> usize {
    256000
}
fn d_hidden() -> usize {
    2304
}
fn d_intermediate() -> usize {
    9216
}
fn d_layers() -> usize {
    26
}
fn d_heads() -> usize {
    8
}
fn d_kv_heads() -> usize {
    4
}
fn d_head_dim() -> Option<usize> {
    Some(256)
}
fn d_activation() -> Option<String> {
    Some("gelu_pytorch_tanh".into())
}
fn d_eps() -> f64 {
    1e-6
}
fn d_max_pos() -> usize {
    8192
}
fn d_query_scalar() -> f64 {
    256.0
}
fn d_sliding() -> Option<usize> {
    Some(4096)
}
fn d_attn_softcap() -> Option<f64> {
    Some(50.0)
}
fn d_final_softcap() -> Option<f64> {
    Some(30.0)
}
fn d_pad() -> Option<u32> {
    Some(0)
}

/// The fields of transformers' `Gemma2Config` that the encoder uses, with
/// transformers' defaults (5.24.0). Unknown keys are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct Gemma2Config {
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
    /// Key/value heads (grouped-query attention).
    #[serde(default = "d_kv_heads")]
    pub num_key_value_heads: usize,
    /// Per-head width; `null` means `hidden_size / num_attention_heads`.
    #[serde(default = "d_head_dim")]
    pub head_dim: Option<usize>,
    /// Feed-forward activation name.
    #[serde(default = "d_activation")]
    pub hidden_activation: Option<String>,
    /// RMSNorm epsilon.
    #[serde(default = "d_eps")]
    pub rms_norm_eps: f64,
    /// Longest sequence the model was trained for (informative).
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: usize,
    /// Attention scores are scaled by `query_pre_attn_scalar ** -0.5`.
    #[serde(default = "d_query_scalar")]
    pub query_pre_attn_scalar: f64,
    /// Window of the sliding-attention layers.
    #[serde(default = "d_sliding")]
    pub sliding_window: Option<usize>,
    /// Per-layer attention type; default: sliding for even layer indices, full for odd ones.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// Tanh soft-capping of attention logits (`None`: off).
    #[serde(default = "d_attn_softcap")]
    pub attn_logit_softcapping: Option<f64>,
    /// Soft-capping of the LM head's logits: irrelevant here (no LM head).
    #[serde(default = "d_final_softcap")]
    pub final_logit_softcapping: Option<f64>,
    /// Whether the attention projections have biases.
    #[serde(default)]
    pub attention_bias: bool,
    /// The padding token id.
    #[serde(default = "d_pad")]
    pub pad_token_id: Option<u32>,
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

impl Default for Gemma2Config {
    /// transformers' `Gemma2Config()`: the Gemma-2-2B dimensions.
    fn default() -> Self {
        // An empty object gets every serde default; this cannot fail.
        serde_json::from_str("{}").unwrap_or_else(|_| unreachable!())
    }
}

/// Largest number of weights a config may describe: 2^38, 100x the largest
/// Gemma-2 (27B).
pub const MAX_PARAMETERS: u64 = 1 << 38;

impl Gemma2Config {
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
        let bad = |m: String| Err(Error::InvalidConfig(m));
        Dims {
            layers: self.num_hidden_layers,
            heads: self.num_attention_heads,
            kv_heads: self.num_key_value_heads,
            head_dim: self.head_dim(),
            hidden: self.hidden_size,
            intermediate: self.intermediate_size,
            vocab: self.vocab_size,
        }
        .validate()?;
        if self.query_pre_attn_scalar <= 0.0 {
            return bad("query_pre_attn_scalar must be positive".into());
        }
        self.activation()?;
        self.rope()?;
        let types = self.layer_types()?;
        if types.contains(&LayerType::Sliding) && self.sliding_window.is_none() {
            return bad("sliding_attention layers need `sliding_window`".into());
        }
        Ok(())
    }

    /// The per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The feed-forward activation.
    pub fn activation(&self) -> Result<Activation> {
        match &self.hidden_activation {
            Some(name) => Activation::from_name(name),
            None => Err(Error::InvalidConfig(
                "hidden_activation is null".to_string(),
            )),
        }
    }

    /// The attention type of every layer, as transformers derives it.
    pub fn layer_types(&self) -> Result<Vec<LayerType>> {
        match &self.layer_types {
            None => Ok((0..self.num_hidden_layers)
                .map(|i| {
                    if (i + 1) % 2 == 1 {
                        LayerType::Sliding
                    } else {
                        LayerType::Full
                    }
                })
                .collect()),
            Some(names) => parse_layer_types(names, self.num_hidden_layers),
        }
    }

    /// The RoPE parameters. As transformers 5: `rope_parameters` (or the legacy
    /// `rope_scaling`) first, then the top-level `rope_theta`, then 10000;
    /// `rope_type` (or `type`) defaults to `default`.
    pub fn rope(&self) -> Result<Rope> {
        parse_rope(
            self.rope_parameters.as_ref(),
            self.rope_scaling.as_ref(),
            self.rope_theta,
        )
    }
}

/// An explicit `layer_types` list: one `full_attention` or
/// `sliding_attention` per layer.
pub(crate) fn parse_layer_types(names: &[String], layers: usize) -> Result<Vec<LayerType>> {
    if names.len() != layers {
        return Err(Error::InvalidConfig(format!(
            "layer_types has {} entries for {layers} layers",
            names.len()
        )));
    }
    names
        .iter()
        .map(|n| match n.as_str() {
            "full_attention" => Ok(LayerType::Full),
            "sliding_attention" => Ok(LayerType::Sliding),
            other => Err(Error::InvalidConfig(format!(
                "layer type `{other}` is not supported"
            ))),
        })
        .collect()
}

/// The RoPE parameters as transformers 5 standardises them: `rope_scaling`
/// (legacy) or `rope_parameters` first, then the top-level `rope_theta`, then
/// 10000; `rope_type` (or `type`) defaults to `default`; only `default` and
/// `linear` are supported.
pub(crate) fn parse_rope(
    rope_parameters: Option<&serde_json::Value>,
    rope_scaling: Option<&serde_json::Value>,
    rope_theta: Option<f64>,
) -> Result<Rope> {
    let params = rope_scaling
        .filter(|v| !v.is_null())
        .or(rope_parameters.filter(|v| !v.is_null()));
    let obj = match params {
        None => None,
        Some(serde_json::Value::Object(m)) => Some(m),
        Some(other) => {
            return Err(Error::InvalidConfig(format!(
                "rope_parameters must be an object, found {other}"
            )))
        }
    };
    let get = |k: &str| obj.and_then(|m| m.get(k)).filter(|v| !v.is_null());
    let theta = match get("rope_theta") {
        Some(v) => v.as_f64().ok_or_else(|| {
            Error::InvalidConfig(format!("rope_theta must be a number, found {v}"))
        })?,
        None => rope_theta.unwrap_or(10_000.0),
    };
    let rope_type = get("rope_type")
        .or_else(|| get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let linear_factor = match rope_type {
        "default" => 1.0,
        "linear" => get("factor")
            .and_then(|v| v.as_f64())
            .ok_or_else(|| Error::InvalidConfig("linear RoPE needs a numeric `factor`".into()))?,
        other => {
            return Err(Error::InvalidConfig(format!(
                "rope_type `{other}` is not supported (only `default` and `linear`)"
            )))
        }
    };
    if !(theta > 0.0 && linear_factor > 0.0) {
        return Err(Error::InvalidConfig(format!(
            "rope_theta {theta} and factor {linear_factor} must be positive"
        )));
    }
    Ok(Rope {
        theta,
        linear_factor,
    })
}

/// The dimensions of a decoder checkpoint, checked against bounds far above
/// any released model but low enough that what is sized by them alone (the
/// layer list, the RoPE table) stays small: a file claiming two million
/// layers is refused, not allocated for.
pub(crate) struct Dims {
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub vocab: usize,
}

impl Dims {
    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        if self.hidden == 0 || self.heads == 0 || self.kv_heads == 0 {
            return bad("hidden_size and head counts must be positive".into());
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.heads, self.kv_heads
            ));
        }
        for (name, v, max) in [
            ("num_hidden_layers", self.layers, 1 << 12),
            ("num_attention_heads", self.heads, 1 << 12),
            ("num_key_value_heads", self.kv_heads, 1 << 12),
            ("head_dim", self.head_dim, 1 << 16),
            ("hidden_size", self.hidden, 1 << 16),
            ("intermediate_size", self.intermediate, 1 << 20),
            ("vocab_size", self.vocab, 1 << 22),
        ] {
            if v > max {
                return bad(format!("{name} {v} is over the limit of {max}"));
            }
        }
        // The weights, from the numbers alone: the embedding, then per layer
        // q, k, v, o and the gated MLP (norms are negligible).
        let n = |x: usize| x as u64;
        let (h, hd) = (n(self.hidden), n(self.head_dim));
        let attn = n(self.heads)
            .saturating_add(n(self.kv_heads))
            .saturating_mul(2)
            .saturating_mul(hd)
            .saturating_mul(h);
        let mlp = h.saturating_mul(n(self.intermediate)).saturating_mul(3);
        let params = n(self.vocab)
            .saturating_mul(h)
            .saturating_add(n(self.layers).saturating_mul(attn.saturating_add(mlp)));
        if params > MAX_PARAMETERS {
            return bad(format!(
                "the config describes about {params} weights, over the limit of {MAX_PARAMETERS}"
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be positive and even",
                self.head_dim
            ));
        }
        if self.vocab == 0 {
            return bad("vocab_size must be positive".into());
        }
        Ok(())
    }
}

/// Reads a `config.json` (a file, or a folder that holds it), bounded in size.
pub(crate) fn read_config(path: &Path) -> Result<(String, String)> {
    let mut path = path.to_path_buf();
    if path.is_dir() {
        path = path.join("config.json");
    }
    let text =
        lumina2_weights::fs::read_to_string_bounded(&path, lumina2_weights::fs::MAX_CONFIG_BYTES)
            .map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
    Ok((text, path.display().to_string()))
}

/// Parses a `config.json` text (read from `origin`, for errors) and checks
/// it with `validate`.
pub(crate) fn parse_config<T: DeserializeOwned>(
    text: &str,
    origin: &str,
    validate: impl FnOnce(&T) -> Result<()>,
) -> Result<T> {
    let cfg: T = serde_json::from_str(text).map_err(|source| Error::Json {
        origin: origin.to_string(),
        source,
    })?;
    validate(&cfg)?;
    Ok(cfg)
}

/// [`read_config`], then [`parse_config`].
pub(crate) fn load_config<T: DeserializeOwned>(
    path: &Path,
    validate: impl FnOnce(&T) -> Result<()>,
) -> Result<T> {
    let (text, origin) = read_config(path)?;
    parse_config(&text, &origin, validate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_transformers_gemma2_defaults() {
        let c = Gemma2Config::default();
        assert_eq!(
            (c.hidden_size, c.num_hidden_layers, c.head_dim()),
            (2304, 26, 256)
        );
        assert_eq!(c.sliding_window, Some(4096));
        assert_eq!(c.attn_logit_softcapping, Some(50.0));
        let t = c.layer_types().unwrap();
        assert_eq!(
            &t[..3],
            &[LayerType::Sliding, LayerType::Full, LayerType::Sliding]
        );
        assert_eq!(c.rope().unwrap().theta, 10_000.0);
        assert_eq!(c.activation().unwrap(), Activation::GeluTanh);
    }

    #[test]
    fn rope_priority_and_unknown_keys() {
        let c = Gemma2Config::from_json(
            r#"{"rope_theta": 5000.0, "whatever": [1, 2], "num_hidden_layers": 2}"#,
        )
        .unwrap();
        assert_eq!(c.rope().unwrap().theta, 5000.0);
        let c = Gemma2Config::from_json(
            r#"{"rope_theta": 5000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}}"#,
        )
        .unwrap();
        assert_eq!(c.rope().unwrap().theta, 7.0);
        assert!(Gemma2Config::from_json(r#"{"rope_parameters": {"rope_type": "yarn"}}"#).is_err());
        assert!(Gemma2Config::from_json(
            r#"{"num_hidden_layers": 2, "layer_types": ["full_attention"]}"#
        )
        .is_err());
        assert!(Gemma2Config::from_json(r#"{"num_key_value_heads": 3}"#).is_err());
    }

    #[test]
    fn absurd_numbers_are_refused_with_the_limit() {
        for (json, culprit) in [
            (r#"{"num_hidden_layers": 100000000}"#, "num_hidden_layers"),
            (r#"{"hidden_size": 4611686018427387904}"#, "hidden_size"),
            (
                r#"{"intermediate_size": 4611686018427387904}"#,
                "intermediate_size",
            ),
            (r#"{"vocab_size": 4611686018427387904}"#, "vocab_size"),
            (r#"{"head_dim": 4611686018427387904}"#, "head_dim"),
            (
                r#"{"num_hidden_layers": 4096, "intermediate_size": 1048576, "hidden_size": 65536, "head_dim": 256}"#,
                "weights",
            ),
        ] {
            let e = Gemma2Config::from_json(json).unwrap_err().to_string();
            assert!(e.contains(culprit) && e.contains("limit"), "{json}: {e}");
        }
    }
}
