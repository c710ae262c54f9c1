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

use candle_core::{DType, Device};
use lumina2_text_encoder::{Qwen3Config, Qwen3Encoder};
use lumina2_weights::{WeightSource, Weights};

use crate::gguf::{GgufError, GgufFile};
use crate::llama_gguf::{
    delegate_weight_source, Arch, ArchMismatch, EncoderGguf, NameTables,
    Optional::{Float, Int},
};

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

/// Qwen3's architecture: the norms are stored as they are.
static QWEN3: Arch = Arch {
    name: "qwen3",
    label: "Qwen3",
    names: QWEN3_NAMES,
    norms_plus_one: false,
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
    QWEN3.names.llama_cpp_name(key)
}

/// The transformers key of a llama.cpp Qwen3 tensor name (the inverse of
/// [`llama_cpp_name`]).
pub fn transformers_name(name: &str) -> Option<String> {
    QWEN3.names.transformers_name(name)
}

/// A Qwen3 GGUF file as a [`WeightSource`] in transformers' key names
/// (`layers.0.self_attn.q_proj.weight`, with or without `model.`): linear
/// weights and the embedding stay quantised where candle has the block type.
#[derive(Debug)]
pub struct Qwen3Gguf {
    inner: EncoderGguf,
}

impl Qwen3Gguf {
    /// Opens `path` and checks that it holds a Qwen3 model.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Qwen3GgufError> {
        Self::new(GgufFile::open(path)?)
    }

    /// Wraps an open GGUF file, checking `general.architecture` when present.
    pub fn new(file: GgufFile) -> Result<Self, Qwen3GgufError> {
        let inner = EncoderGguf::new(file, &QWEN3)
            .map_err(|ArchMismatch { path, found }| Qwen3GgufError::Architecture { path, found })?;
        Ok(Self { inner })
    }

    /// The underlying GGUF file.
    pub fn file(&self) -> &GgufFile {
        self.inner.file()
    }

    /// The config of the encoder, from the `qwen3.*` metadata (what
    /// llama.cpp's converter writes) and the embedding's shape; transformers'
    /// `Qwen3Config` defaults for what the file does not say (`silu`, no
    /// attention bias unless the file has `attn_q.bias`). `head_dim` is
    /// `qwen3.attention.key_length` when present, else `hidden / heads`
    /// (llama.cpp's own default).
    pub fn config(&self) -> Result<Qwen3Config, Qwen3GgufError> {
        let path = self.file().path().to_path_buf();
        let bad = |key, reason| Qwen3GgufError::Metadata {
            path: path.clone(),
            key,
            reason,
        };
        let md = self.inner.metadata(&bad);
        let hidden = md.int("embedding_length")?;
        let heads = md.int("attention.head_count")?;
        let head_dim = md.head_dim(hidden, heads)?;
        let vocab = md.vocab(hidden)?;
        let bias = self.contains("layers.0.self_attn.q_proj.bias");
        let mut cfg = serde_json::json!({
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": md.int("feed_forward_length")?,
            "num_hidden_layers": md.int("block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": md.opt_int("attention.head_count_kv")?.unwrap_or(heads),
            "head_dim": head_dim,
            "attention_bias": bias,
        });
        md.set_optional(
            &mut cfg,
            &[
                Int("max_position_embeddings", "context_length"),
                Float("rms_norm_eps", "attention.layer_norm_rms_epsilon"),
                Float("rope_theta", "rope.freq_base"),
            ],
        )?;
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
        let path = self.file().path().to_path_buf();
        Qwen3Encoder::penultimate(cfg, &self.into_weights(dtype, device))
            .map_err(|source| Qwen3GgufError::Encoder { path, source })
    }
}

delegate_weight_source!(Qwen3Gguf);

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
