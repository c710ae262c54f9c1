//! Gemma-2 text encoders from GGUF files written by llama.cpp's
//! `convert_hf_to_gguf.py` (the community Gemma-2-2B GGUFs): llama.cpp's
//! tensor names mapped back to transformers' keys, the config read from the
//! `gemma2.*` metadata, and linear weights kept quantised.
//!
//! Two things differ from the transformers checkpoint and are undone here:
//! - names: `token_embd`, `blk.N.attn_q`, `blk.N.ffn_norm`, `output_norm`, ...
//!   (the table in [`llama_cpp_name`]);
//! - the RMS norm weights: Gemma scales by `1 + weight`, llama.cpp by
//!   `weight`, so the converter stores `weight + 1`. Every `*norm.weight` is
//!   read back as the stored value minus one (in f32).
//!
//! Files whose tensors already carry transformers' names are read as they are.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use lumina2_text_encoder::{Gemma2Config, Gemma2Encoder};
use lumina2_weights::{LinearWeight, WeightSource, Weights};

use crate::gguf::{GgufError, GgufFile, MetadataValue};

/// Errors of reading a Gemma-2 GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GemmaGgufError {
    /// The GGUF file itself could not be read.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// `general.architecture` names another model.
    #[error("{}: architecture `{found}` is not a Gemma-2 text encoder (expected `gemma2`)", .path.display())]
    Architecture {
        /// The file.
        path: PathBuf,
        /// The architecture found.
        found: String,
    },
    /// A metadata value the config needs is missing or has the wrong type.
    #[error("{}: metadata `{key}`: {reason}", .path.display())]
    Metadata {
        /// The file.
        path: PathBuf,
        /// The metadata key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The config read from the file, or the one given, does not describe
    /// the file's tensors, or the encoder could not be built.
    #[error("{}: {source}", .path.display())]
    Encoder {
        /// The file.
        path: PathBuf,
        /// The text encoder's error.
        #[source]
        source: lumina2_text_encoder::Error,
    },
}

/// The names outside the layers: (transformers, llama.cpp).
const GLOBAL_NAMES: [(&str, &str); 2] = [
    ("embed_tokens.weight", "token_embd.weight"),
    ("norm.weight", "output_norm.weight"),
];

/// The names inside layer N, after `layers.N.` and `blk.N.`: (transformers,
/// llama.cpp).
const LAYER_NAMES: [(&str, &str); 11] = [
    ("input_layernorm.weight", "attn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    (
        "post_attention_layernorm.weight",
        "post_attention_norm.weight",
    ),
    ("pre_feedforward_layernorm.weight", "ffn_norm.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
    ("post_feedforward_layernorm.weight", "post_ffw_norm.weight"),
];

/// A model's table of names: (transformers, llama.cpp) outside the layers,
/// and inside layer N after `layers.N.` / `blk.N.`.
pub(crate) struct NameTables {
    pub global: &'static [(&'static str, &'static str)],
    pub layer: &'static [(&'static str, &'static str)],
}

const GEMMA2_NAMES: NameTables = NameTables {
    global: &GLOBAL_NAMES,
    layer: &LAYER_NAMES,
};

/// Maps `name` from one naming to the other: `from_prefix`/`to_prefix` are the
/// layer prefixes (`layers.`, `blk.`), `side` picks the column of the tables
/// that `name` is in (0: transformers, 1: llama.cpp).
pub(crate) fn rename(
    tables: &NameTables,
    name: &str,
    from_prefix: &str,
    to_prefix: &str,
    side: usize,
) -> Option<String> {
    let pick = |pair: &(&'static str, &'static str)| if side == 0 { pair.0 } else { pair.1 };
    let other = |pair: &(&'static str, &'static str)| if side == 0 { pair.1 } else { pair.0 };
    if let Some(pair) = tables.global.iter().find(|p| pick(p) == name) {
        return Some(other(pair).to_string());
    }
    let (layer, tail) = name.strip_prefix(from_prefix)?.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let pair = tables.layer.iter().find(|p| pick(p) == tail)?;
    Some(format!("{to_prefix}{layer}.{}", other(pair)))
}

/// The llama.cpp name of a transformers `Gemma2Model` key (without the
/// `model.` prefix), or `None` for a key llama.cpp does not have.
///
/// | transformers | llama.cpp |
/// |---|---|
/// | `embed_tokens.weight` | `token_embd.weight` |
/// | `norm.weight` | `output_norm.weight` |
/// | `layers.N.input_layernorm.weight` | `blk.N.attn_norm.weight` |
/// | `layers.N.self_attn.{q,k,v}_proj.weight` | `blk.N.attn_{q,k,v}.weight` |
/// | `layers.N.self_attn.o_proj.weight` | `blk.N.attn_output.weight` |
/// | `layers.N.post_attention_layernorm.weight` | `blk.N.post_attention_norm.weight` |
/// | `layers.N.pre_feedforward_layernorm.weight` | `blk.N.ffn_norm.weight` |
/// | `layers.N.mlp.{gate,up,down}_proj.weight` | `blk.N.ffn_{gate,up,down}.weight` |
/// | `layers.N.post_feedforward_layernorm.weight` | `blk.N.post_ffw_norm.weight` |
pub fn llama_cpp_name(key: &str) -> Option<String> {
    rename(&GEMMA2_NAMES, key, "layers.", "blk.", 0)
}

/// The transformers key of a llama.cpp Gemma-2 tensor name (the inverse of
/// [`llama_cpp_name`]).
pub fn transformers_name(name: &str) -> Option<String> {
    rename(&GEMMA2_NAMES, name, "blk.", "layers.", 1)
}

/// A Gemma-2 GGUF file as a [`WeightSource`] in transformers' key names
/// (`layers.0.self_attn.q_proj.weight`, with or without `model.`): linear
/// weights stay quantised where candle has the block type, norm weights come
/// back as transformers stores them.
#[derive(Debug)]
pub struct Gemma2Gguf {
    file: GgufFile,
    /// Whether the tensors carry llama.cpp's names (else transformers').
    llama_cpp_names: bool,
}

impl Gemma2Gguf {
    /// Opens `path` and checks that it holds a Gemma-2 model.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GemmaGgufError> {
        Self::new(GgufFile::open(path)?)
    }

    /// Wraps an open GGUF file, checking `general.architecture` when present.
    pub fn new(file: GgufFile) -> Result<Self, GemmaGgufError> {
        if let Some(arch) = file.metadata().get("general.architecture") {
            let found = arch.as_str().unwrap_or("<not a string>");
            if found != "gemma2" {
                return Err(GemmaGgufError::Architecture {
                    path: file.path().to_path_buf(),
                    found: found.to_string(),
                });
            }
        }
        let llama_cpp_names = file.tensor_info("token_embd.weight").is_ok();
        Ok(Self {
            file,
            llama_cpp_names,
        })
    }

    /// The underlying GGUF file.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The name of `key` (a transformers key) in the file, and whether it is
    /// a norm weight stored as `weight + 1`.
    fn resolve(&self, key: &str) -> Option<(String, bool)> {
        let key = key.strip_prefix("model.").unwrap_or(key);
        if !self.llama_cpp_names {
            let name = if self.file.tensor_info(key).is_ok() {
                key.to_string()
            } else {
                format!("model.{key}")
            };
            return Some((name, false));
        }
        let name = llama_cpp_name(key)?;
        let shifted = key.ends_with("norm.weight");
        Some((name, shifted))
    }

    fn err(&self, key: &str, e: impl std::fmt::Display) -> lumina2_weights::Error {
        lumina2_weights::Error::WeightLoad {
            key: key.to_string(),
            source_name: self.file.path().display().to_string(),
            reason: e.to_string(),
        }
    }

    /// The config of the encoder, from the `gemma2.*` metadata (what
    /// llama.cpp's converter writes) and the embedding's shape; transformers'
    /// defaults for what the file does not say (`rope_theta` 10000,
    /// `gelu_pytorch_tanh`). `query_pre_attn_scalar` is not stored: as in
    /// llama.cpp it is the head width, except for the 46-layer 27B model,
    /// where it is `hidden_size / num_attention_heads`.
    pub fn config(&self) -> Result<Gemma2Config, GemmaGgufError> {
        let path = self.file.path().to_path_buf();
        let md = self.file.metadata();
        let missing = |key: &str, reason: &str| GemmaGgufError::Metadata {
            path: path.clone(),
            key: key.to_string(),
            reason: reason.to_string(),
        };
        let int = |key: &str| -> Result<usize, GemmaGgufError> {
            let v = md.get(key).ok_or_else(|| missing(key, "missing"))?;
            let n = v
                .as_u64()
                .ok_or_else(|| missing(key, "not a non-negative integer"))?;
            usize::try_from(n).map_err(|_| missing(key, "too large"))
        };
        let opt_int = |key: &str| -> Result<Option<usize>, GemmaGgufError> {
            if md.contains_key(key) {
                int(key).map(Some)
            } else {
                Ok(None)
            }
        };
        let float = |key: &str| -> Result<Option<f64>, GemmaGgufError> {
            match md.get(key) {
                None => Ok(None),
                Some(MetadataValue::F32(v)) => Ok(Some(f64::from(*v))),
                Some(MetadataValue::F64(v)) => Ok(Some(*v)),
                Some(v) => v
                    .as_u64()
                    .map(|n| Some(n as f64))
                    .ok_or_else(|| missing(key, "not a number")),
            }
        };
        let hidden = int("gemma2.embedding_length")?;
        let layers = int("gemma2.block_count")?;
        let heads = int("gemma2.attention.head_count")?;
        let kv_heads = opt_int("gemma2.attention.head_count_kv")?.unwrap_or(heads);
        let head_dim = match opt_int("gemma2.attention.key_length")? {
            Some(d) => d,
            None => hidden / heads.max(1),
        };
        if let Some(v) = opt_int("gemma2.attention.value_length")? {
            if v != head_dim {
                return Err(missing(
                    "gemma2.attention.value_length",
                    &format!("{v} differs from the key length {head_dim}"),
                ));
            }
        }
        let embd = self
            .file
            .tensor_info(
                &self
                    .resolve("embed_tokens.weight")
                    .map_or_else(|| "token_embd.weight".to_string(), |(n, _)| n),
            )?
            .shape();
        let vocab = match embd.as_slice() {
            [v, h] if *h == hidden => *v,
            _ => {
                return Err(missing(
                    "gemma2.embedding_length",
                    &format!("{hidden} does not match the token embedding's shape {embd:?}"),
                ))
            }
        };
        let query_pre_attn_scalar = if layers == 46 {
            (hidden / heads.max(1)) as f64
        } else {
            head_dim as f64
        };
        let mut cfg = serde_json::json!({
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": int("gemma2.feed_forward_length")?,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "query_pre_attn_scalar": query_pre_attn_scalar,
        });
        let set = |cfg: &mut serde_json::Value, name: &str, v: serde_json::Value| {
            if let Some(o) = cfg.as_object_mut() {
                o.insert(name.to_string(), v);
            }
        };
        if let Some(ctx) = opt_int("gemma2.context_length")? {
            set(&mut cfg, "max_position_embeddings", ctx.into());
        }
        if let Some(eps) = float("gemma2.attention.layer_norm_rms_epsilon")? {
            set(&mut cfg, "rms_norm_eps", eps.into());
        }
        if let Some(w) = opt_int("gemma2.attention.sliding_window")? {
            set(&mut cfg, "sliding_window", w.into());
        }
        if let Some(c) = float("gemma2.attn_logit_softcapping")? {
            set(&mut cfg, "attn_logit_softcapping", c.into());
        }
        if let Some(c) = float("gemma2.final_logit_softcapping")? {
            set(&mut cfg, "final_logit_softcapping", c.into());
        }
        if let Some(theta) = float("gemma2.rope.freq_base")? {
            set(&mut cfg, "rope_theta", theta.into());
        }
        Gemma2Config::from_json(&cfg.to_string())
            .map_err(|source| GemmaGgufError::Encoder { path, source })
    }

    /// The file as [`Weights`] in `dtype` on `device`, for building the
    /// encoder oneself (with [`Gemma2Gguf::config`] or another config).
    pub fn into_weights(self, dtype: DType, device: &Device) -> Weights {
        Weights::new(Arc::new(self), dtype, device)
    }

    /// Builds the encoder that the Lumina2 pipeline uses (the layers up to
    /// the penultimate hidden state) in `dtype`, its config from the file.
    pub fn penultimate_encoder(
        self,
        dtype: DType,
        device: &Device,
    ) -> Result<Gemma2Encoder, GemmaGgufError> {
        let cfg = self.config()?;
        self.penultimate_encoder_with_config(&cfg, dtype, device)
    }

    /// As [`Gemma2Gguf::penultimate_encoder`], with a config given by the
    /// caller (a transformers `config.json`) instead of the file's metadata;
    /// the tensors' shapes are checked against it.
    pub fn penultimate_encoder_with_config(
        self,
        cfg: &Gemma2Config,
        dtype: DType,
        device: &Device,
    ) -> Result<Gemma2Encoder, GemmaGgufError> {
        let path = self.file.path().to_path_buf();
        let weights = Weights::new(Arc::new(self), dtype, device);
        Gemma2Encoder::penultimate(cfg, &weights)
            .map_err(|source| GemmaGgufError::Encoder { path, source })
    }
}

impl WeightSource for Gemma2Gguf {
    fn contains(&self, key: &str) -> bool {
        self.resolve(key)
            .is_some_and(|(name, _)| self.file.tensor_info(&name).is_ok())
    }

    fn tensor(&self, key: &str) -> lumina2_weights::Result<Tensor> {
        let (name, shifted) = self
            .resolve(key)
            .ok_or_else(|| self.err(key, "not a Gemma-2 weight"))?;
        let t = self
            .file
            .tensor(&name, DType::F32, &Device::Cpu)
            .map_err(|e| self.err(key, e))?;
        if shifted {
            // llama.cpp's converter stored `weight + 1` (see the module docs).
            return (t - 1.0).map_err(|e| self.err(key, e));
        }
        Ok(t)
    }

    fn linear(&self, key: &str) -> lumina2_weights::Result<LinearWeight> {
        let (name, shifted) = self
            .resolve(key)
            .ok_or_else(|| self.err(key, "not a Gemma-2 weight"))?;
        if shifted {
            return Ok(LinearWeight::Dense(WeightSource::tensor(self, key)?));
        }
        WeightSource::linear(&self.file, &name)
    }

    fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .file
            .tensor_infos()
            .iter()
            .map(|t| {
                if self.llama_cpp_names {
                    transformers_name(&t.name).unwrap_or_else(|| t.name.clone())
                } else {
                    t.name.clone()
                }
            })
            .collect();
        keys.sort();
        keys
    }

    fn name(&self) -> String {
        self.file.path().display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for key in [
            "embed_tokens.weight",
            "norm.weight",
            "layers.0.input_layernorm.weight",
            "layers.12.self_attn.q_proj.weight",
            "layers.3.self_attn.k_proj.weight",
            "layers.3.self_attn.v_proj.weight",
            "layers.3.self_attn.o_proj.weight",
            "layers.3.post_attention_layernorm.weight",
            "layers.3.pre_feedforward_layernorm.weight",
            "layers.3.mlp.gate_proj.weight",
            "layers.3.mlp.up_proj.weight",
            "layers.3.mlp.down_proj.weight",
            "layers.25.post_feedforward_layernorm.weight",
        ] {
            let name = llama_cpp_name(key).unwrap_or_default();
            assert_eq!(transformers_name(&name).as_deref(), Some(key), "{name}");
        }
        assert_eq!(
            llama_cpp_name("layers.1.pre_feedforward_layernorm.weight").as_deref(),
            Some("blk.1.ffn_norm.weight")
        );
        assert_eq!(llama_cpp_name("layers.x.mlp.up_proj.weight"), None);
        assert_eq!(llama_cpp_name("lm_head.weight"), None);
        assert_eq!(transformers_name("blk..attn_q.weight"), None);
        assert_eq!(transformers_name("output.weight"), None);
    }
}
