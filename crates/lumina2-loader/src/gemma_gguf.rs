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

use candle_core::{DType, Device};
use lumina2_text_encoder::{Gemma2Config, Gemma2Encoder};
use lumina2_weights::Weights;

use crate::gguf::{GgufError, GgufFile};
use crate::llama_gguf::{
    delegate_weight_source, Arch, ArchMismatch, EncoderGguf, NameTables,
    Optional::{Float, Int},
};

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

/// Gemma-2's table of names.
const GEMMA2_NAMES: NameTables = NameTables {
    global: &GLOBAL_NAMES,
    layer: &LAYER_NAMES,
};

/// Gemma-2's architecture: llama.cpp's names and the `weight + 1` norms.
static GEMMA2: Arch = Arch {
    name: "gemma2",
    label: "Gemma-2",
    names: GEMMA2_NAMES,
    norms_plus_one: true,
};

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
    GEMMA2.names.llama_cpp_name(key)
}

/// The transformers key of a llama.cpp Gemma-2 tensor name (the inverse of
/// [`llama_cpp_name`]).
pub fn transformers_name(name: &str) -> Option<String> {
    GEMMA2.names.transformers_name(name)
}

/// A Gemma-2 GGUF file as a [`WeightSource`](lumina2_weights::WeightSource)
/// in transformers' key names (`layers.0.self_attn.q_proj.weight`, with or
/// without `model.`): linear weights stay quantised where candle has the
/// block type, norm weights come back as transformers stores them.
#[derive(Debug)]
pub struct Gemma2Gguf {
    inner: EncoderGguf,
}

impl Gemma2Gguf {
    /// Opens `path` and checks that it holds a Gemma-2 model.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GemmaGgufError> {
        Self::new(GgufFile::open(path)?)
    }

    /// Wraps an open GGUF file, checking `general.architecture` when present.
    pub fn new(file: GgufFile) -> Result<Self, GemmaGgufError> {
        let inner = EncoderGguf::new(file, &GEMMA2)
            .map_err(|ArchMismatch { path, found }| GemmaGgufError::Architecture { path, found })?;
        Ok(Self { inner })
    }

    /// The underlying GGUF file.
    pub fn file(&self) -> &GgufFile {
        self.inner.file()
    }

    /// The config of the encoder, from the `gemma2.*` metadata (what
    /// llama.cpp's converter writes) and the embedding's shape; transformers'
    /// defaults for what the file does not say (`rope_theta` 10000,
    /// `gelu_pytorch_tanh`). `query_pre_attn_scalar` is not stored: as in
    /// llama.cpp it is the head width, except for the 46-layer 27B model,
    /// where it is `hidden_size / num_attention_heads`.
    pub fn config(&self) -> Result<Gemma2Config, GemmaGgufError> {
        let path = self.file().path().to_path_buf();
        let bad = |key, reason| GemmaGgufError::Metadata {
            path: path.clone(),
            key,
            reason,
        };
        let md = self.inner.metadata(&bad);
        let hidden = md.int("embedding_length")?;
        let layers = md.int("block_count")?;
        let heads = md.int("attention.head_count")?;
        let kv_heads = md.opt_int("attention.head_count_kv")?.unwrap_or(heads);
        let head_dim = md.head_dim(hidden, heads)?;
        let vocab = md.vocab(hidden)?;
        let query_pre_attn_scalar = if layers == 46 {
            (hidden / heads.max(1)) as f64
        } else {
            head_dim as f64
        };
        let mut cfg = serde_json::json!({
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": md.int("feed_forward_length")?,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "query_pre_attn_scalar": query_pre_attn_scalar,
        });
        md.set_optional(
            &mut cfg,
            &[
                Int("max_position_embeddings", "context_length"),
                Float("rms_norm_eps", "attention.layer_norm_rms_epsilon"),
                Int("sliding_window", "attention.sliding_window"),
                Float("attn_logit_softcapping", "attn_logit_softcapping"),
                Float("final_logit_softcapping", "final_logit_softcapping"),
                Float("rope_theta", "rope.freq_base"),
            ],
        )?;
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
        let path = self.file().path().to_path_buf();
        Gemma2Encoder::penultimate(cfg, &self.into_weights(dtype, device))
            .map_err(|source| GemmaGgufError::Encoder { path, source })
    }
}

delegate_weight_source!(Gemma2Gguf);

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
