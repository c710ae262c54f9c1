//! Qwen3 text encoders (Z-Image's Qwen3-4B) from GGUF files written by
//! llama.cpp's `convert_hf_to_gguf.py`: llama.cpp's tensor names mapped back
//! to transformers' keys, the config read from the `qwen3.*` metadata, and
//! linear weights (and the token embedding) kept quantised.
//!
//! Unlike Gemma-2 ([`crate::gemma_gguf`]), nothing but the names differs from
//! the transformers checkpoint: Qwen3's norms multiply by `weight` as
//! llama.cpp's do, and its rotary embedding is the half-split (NEOX) one, so
//! the converter neither shifts norms nor permutes q/k rows.
//!
//! Files whose tensors already carry transformers' names are read as they are.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use lumina2_text_encoder::{Qwen3Config, Qwen3Encoder};
use lumina2_weights::{LinearWeight, WeightSource, Weights};

use crate::gemma_gguf::{rename, NameTables};
use crate::gguf::{GgufError, GgufFile, MetadataValue};

/// Errors of reading a Qwen3 GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum Qwen3GgufError {
    /// The GGUF file itself could not be read.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// `general.architecture` names another model.
    #[error("{}: architecture `{found}` is not a Qwen3 text encoder (expected `qwen3`)", .path.display())]
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

/// (transformers, llama.cpp) names of Qwen3 (llama.cpp's `LLM_ARCH_QWEN3`).
const QWEN3_NAMES: NameTables = NameTables {
    global: &[
        ("embed_tokens.weight", "token_embd.weight"),
        ("norm.weight", "output_norm.weight"),
    ],
    layer: &[
        ("input_layernorm.weight", "attn_norm.weight"),
        ("self_attn.q_proj.weight", "attn_q.weight"),
        ("self_attn.k_proj.weight", "attn_k.weight"),
        ("self_attn.v_proj.weight", "attn_v.weight"),
        ("self_attn.o_proj.weight", "attn_output.weight"),
        ("self_attn.q_proj.bias", "attn_q.bias"),
        ("self_attn.k_proj.bias", "attn_k.bias"),
        ("self_attn.v_proj.bias", "attn_v.bias"),
        ("self_attn.o_proj.bias", "attn_output.bias"),
        ("self_attn.q_norm.weight", "attn_q_norm.weight"),
        ("self_attn.k_norm.weight", "attn_k_norm.weight"),
        ("post_attention_layernorm.weight", "ffn_norm.weight"),
        ("mlp.gate_proj.weight", "ffn_gate.weight"),
        ("mlp.up_proj.weight", "ffn_up.weight"),
        ("mlp.down_proj.weight", "ffn_down.weight"),
    ],
};

/// The llama.cpp name of a transformers `Qwen3Model` key (without the
/// `model.` prefix), or `None` for a key llama.cpp does not have.
///
/// | transformers | llama.cpp |
/// |---|---|
/// | `embed_tokens.weight` | `token_embd.weight` |
/// | `norm.weight` | `output_norm.weight` |
/// | `layers.N.input_layernorm.weight` | `blk.N.attn_norm.weight` |
/// | `layers.N.self_attn.{q,k,v}_proj.{weight,bias}` | `blk.N.attn_{q,k,v}.{weight,bias}` |
/// | `layers.N.self_attn.o_proj.{weight,bias}` | `blk.N.attn_output.{weight,bias}` |
/// | `layers.N.self_attn.{q,k}_norm.weight` | `blk.N.attn_{q,k}_norm.weight` |
/// | `layers.N.post_attention_layernorm.weight` | `blk.N.ffn_norm.weight` |
/// | `layers.N.mlp.{gate,up,down}_proj.weight` | `blk.N.ffn_{gate,up,down}.weight` |
pub fn llama_cpp_name(key: &str) -> Option<String> {
    rename(&QWEN3_NAMES, key, "layers.", "blk.", 0)
}

/// The transformers key of a llama.cpp Qwen3 tensor name (the inverse of
/// [`llama_cpp_name`]).
pub fn transformers_name(name: &str) -> Option<String> {
    rename(&QWEN3_NAMES, name, "blk.", "layers.", 1)
}

/// A Qwen3 GGUF file as a [`WeightSource`] in transformers' key names
/// (`layers.0.self_attn.q_proj.weight`, with or without `model.`): linear
/// weights and the embedding stay quantised where candle has the block type.
#[derive(Debug)]
pub struct Qwen3Gguf {
    file: GgufFile,
    /// Whether the tensors carry llama.cpp's names (else transformers').
    llama_cpp_names: bool,
}

impl Qwen3Gguf {
    /// Opens `path` and checks that it holds a Qwen3 model.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Qwen3GgufError> {
        Self::new(GgufFile::open(path)?)
    }

    /// Wraps an open GGUF file, checking `general.architecture` when present.
    pub fn new(file: GgufFile) -> Result<Self, Qwen3GgufError> {
        if let Some(arch) = file.metadata().get("general.architecture") {
            let found = arch.as_str().unwrap_or("<not a string>");
            if found != "qwen3" {
                return Err(Qwen3GgufError::Architecture {
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

    /// The name of `key` (a transformers key) in the file.
    fn resolve(&self, key: &str) -> Option<String> {
        let key = key.strip_prefix("model.").unwrap_or(key);
        if !self.llama_cpp_names {
            return Some(if self.file.tensor_info(key).is_ok() {
                key.to_string()
            } else {
                format!("model.{key}")
            });
        }
        llama_cpp_name(key)
    }

    fn err(&self, key: &str, e: impl std::fmt::Display) -> lumina2_weights::Error {
        lumina2_weights::Error::WeightLoad {
            key: key.to_string(),
            source_name: self.file.path().display().to_string(),
            reason: e.to_string(),
        }
    }

    /// The config of the encoder, from the `qwen3.*` metadata (what
    /// llama.cpp's converter writes) and the embedding's shape; transformers'
    /// `Qwen3Config` defaults for what the file does not say (`silu`, no
    /// attention bias unless the file has `attn_q.bias`). `head_dim` is
    /// `qwen3.attention.key_length` when present, else `hidden / heads`
    /// (llama.cpp's own default).
    pub fn config(&self) -> Result<Qwen3Config, Qwen3GgufError> {
        let path = self.file.path().to_path_buf();
        let md = self.file.metadata();
        let bad = |key: &str, reason: &str| Qwen3GgufError::Metadata {
            path: path.clone(),
            key: key.to_string(),
            reason: reason.to_string(),
        };
        let opt_int = |key: &str| -> Result<Option<usize>, Qwen3GgufError> {
            let Some(v) = md.get(key) else {
                return Ok(None);
            };
            let n = v
                .as_u64()
                .ok_or_else(|| bad(key, "not a non-negative integer"))?;
            usize::try_from(n)
                .map(Some)
                .map_err(|_| bad(key, "too large"))
        };
        let int = |key: &str| opt_int(key)?.ok_or_else(|| bad(key, "missing"));
        let float = |key: &str| -> Result<Option<f64>, Qwen3GgufError> {
            match md.get(key) {
                None => Ok(None),
                Some(MetadataValue::F32(v)) => Ok(Some(f64::from(*v))),
                Some(MetadataValue::F64(v)) => Ok(Some(*v)),
                Some(v) => v
                    .as_u64()
                    .map(|n| Some(n as f64))
                    .ok_or_else(|| bad(key, "not a number")),
            }
        };
        let hidden = int("qwen3.embedding_length")?;
        let heads = int("qwen3.attention.head_count")?;
        let head_dim = opt_int("qwen3.attention.key_length")?.unwrap_or(hidden / heads.max(1));
        if let Some(v) = opt_int("qwen3.attention.value_length")? {
            if v != head_dim {
                return Err(bad(
                    "qwen3.attention.value_length",
                    &format!("{v} differs from the key length {head_dim}"),
                ));
            }
        }
        let embd_name = self
            .resolve("embed_tokens.weight")
            .unwrap_or_else(|| "token_embd.weight".to_string());
        let embd = self.file.tensor_info(&embd_name)?.shape();
        let vocab = match embd.as_slice() {
            [v, h] if *h == hidden => *v,
            _ => {
                return Err(bad(
                    "qwen3.embedding_length",
                    &format!("{hidden} does not match the token embedding's shape {embd:?}"),
                ))
            }
        };
        let bias = self.contains("layers.0.self_attn.q_proj.bias");
        let mut cfg = serde_json::json!({
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": int("qwen3.feed_forward_length")?,
            "num_hidden_layers": int("qwen3.block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": opt_int("qwen3.attention.head_count_kv")?.unwrap_or(heads),
            "head_dim": head_dim,
            "attention_bias": bias,
        });
        if let Some(o) = cfg.as_object_mut() {
            if let Some(ctx) = opt_int("qwen3.context_length")? {
                o.insert("max_position_embeddings".into(), ctx.into());
            }
            if let Some(eps) = float("qwen3.attention.layer_norm_rms_epsilon")? {
                o.insert("rms_norm_eps".into(), eps.into());
            }
            if let Some(theta) = float("qwen3.rope.freq_base")? {
                o.insert("rope_theta".into(), theta.into());
            }
        }
        Qwen3Config::from_json(&cfg.to_string())
            .map_err(|source| Qwen3GgufError::Encoder { path, source })
    }

    /// The file as [`Weights`] in `dtype` on `device`, for building the
    /// encoder oneself (with [`Qwen3Gguf::config`] or another config).
    pub fn into_weights(self, dtype: DType, device: &Device) -> Weights {
        Weights::new(Arc::new(self), dtype, device)
    }

    /// Builds the encoder that Z-Image uses (the layers up to the
    /// penultimate hidden state) in `dtype`, its config from the file.
    pub fn penultimate_encoder(
        self,
        dtype: DType,
        device: &Device,
    ) -> Result<Qwen3Encoder, Qwen3GgufError> {
        let cfg = self.config()?;
        self.penultimate_encoder_with_config(&cfg, dtype, device)
    }

    /// As [`Qwen3Gguf::penultimate_encoder`], with a config given by the
    /// caller (a transformers `config.json`) instead of the file's metadata;
    /// the tensors' shapes are checked against it.
    pub fn penultimate_encoder_with_config(
        self,
        cfg: &Qwen3Config,
        dtype: DType,
        device: &Device,
    ) -> Result<Qwen3Encoder, Qwen3GgufError> {
        let path = self.file.path().to_path_buf();
        let weights = Weights::new(Arc::new(self), dtype, device);
        Qwen3Encoder::penultimate(cfg, &weights)
            .map_err(|source| Qwen3GgufError::Encoder { path, source })
    }
}

impl WeightSource for Qwen3Gguf {
    fn contains(&self, key: &str) -> bool {
        self.resolve(key)
            .is_some_and(|name| self.file.tensor_info(&name).is_ok())
    }

    fn tensor(&self, key: &str) -> lumina2_weights::Result<Tensor> {
        let name = self
            .resolve(key)
            .ok_or_else(|| self.err(key, "not a Qwen3 weight"))?;
        self.file
            .tensor(&name, DType::F32, &Device::Cpu)
            .map_err(|e| self.err(key, e))
    }

    fn linear(&self, key: &str) -> lumina2_weights::Result<LinearWeight> {
        let name = self
            .resolve(key)
            .ok_or_else(|| self.err(key, "not a Qwen3 weight"))?;
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
            "layers.3.self_attn.q_norm.weight",
            "layers.3.self_attn.k_norm.weight",
            "layers.12.self_attn.o_proj.weight",
            "layers.1.self_attn.q_proj.bias",
            "layers.35.post_attention_layernorm.weight",
            "layers.2.mlp.down_proj.weight",
        ] {
            let n = llama_cpp_name(key).unwrap();
            assert_eq!(transformers_name(&n).as_deref(), Some(key), "{n}");
        }
        assert_eq!(
            llama_cpp_name("layers.4.self_attn.k_norm.weight").as_deref(),
            Some("blk.4.attn_k_norm.weight")
        );
        assert_eq!(
            llama_cpp_name("layers.4.post_attention_layernorm.weight").as_deref(),
            Some("blk.4.ffn_norm.weight")
        );
        assert_eq!(llama_cpp_name("layers.x.mlp.up_proj.weight"), None);
        assert_eq!(llama_cpp_name("lm_head.weight"), None);
    }
}
