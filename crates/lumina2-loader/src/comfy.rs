//! The files ComfyUI users download, recognised from their keys and opened
//! as the three models' weight sources.
//!
//! The layouts are the ones ComfyUI writes and reads (`comfy/sd.py`
//! `save_checkpoint` puts the diffusion model under `model.diffusion_model.`,
//! the text encoders under `text_encoders.` and the VAE under `vae.`; class
//! `Lumina2` of `comfy/supported_models.py` names them; the Gemma-2 tokenizer
//! is `spiece_model`, the bytes of its SentencePiece model, as
//! `comfy/text_encoders/lumina2.py` `Gemma2BTokenizer.state_dict` stores it):
//!
//! | file | keys |
//! |---|---|
//! | all-in-one (`all_in_one/lumina_2.safetensors`) | `model.diffusion_model.*` (original transformer keys), `text_encoders.gemma2_2b.transformer.model.*` (Gemma-2), `text_encoders.gemma2_2b.logit_scale` (unused), `text_encoders.spiece_model` (tokenizer), `vae.*` (BFL VAE) |
//! | text encoder (`gemma_2_2b_fp16.safetensors`) | `model.*` (Gemma-2), `spiece_model` |
//! | VAE (`ae.safetensors`) | BFL VAE keys ([`crate::bfl_vae`]) |
//!
//! Each model is a view over the one open file ([`Prefixed`]): tensors are
//! read when the model asks for them, converted to the compute dtype one at
//! a time.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::DType;
use lumina2_text_encoder::Gemma2Config;
use lumina2_vae::AutoencoderKLConfig;
use lumina2_weights::{SafetensorsSource, WeightSource};

use crate::bfl_vae::{BflVae, BFL_VAE_MARKER};
use crate::folder::Error;
use crate::original::{detect_layout, TransformerLayout};
use crate::prefixed::Prefixed;

/// Prefix of the transformer in ComfyUI checkpoints.
pub const TRANSFORMER_PREFIX: &str = "model.diffusion_model.";
/// Prefix of the Gemma-2 model (transformers' keys, `model.` included) in
/// the all-in-one checkpoint.
pub const TEXT_ENCODER_PREFIX: &str = "text_encoders.gemma2_2b.transformer.";
/// The tokenizer in the all-in-one checkpoint.
pub const CHECKPOINT_SPIECE_KEY: &str = "text_encoders.spiece_model";
/// The tokenizer in a split text encoder file.
pub const SPIECE_KEY: &str = "spiece_model";
/// Prefix of the VAE in the all-in-one checkpoint.
pub const VAE_PREFIX: &str = "vae.";
/// Keys of the all-in-one checkpoint that no model reads: the CLIP-style
/// logit scale ComfyUI's text encoder wrapper carries.
const IGNORED_CHECKPOINT_KEYS: [&str; 1] = ["text_encoders.gemma2_2b.logit_scale"];
/// Largest `spiece_model` accepted: Gemma's is 4 MB; 64 MiB is far above any
/// SentencePiece model and keeps a forged header from costing memory.
pub const MAX_SPIECE_BYTES: usize = 64 << 20;

/// What a single `.safetensors` file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SingleFileLayout {
    /// ComfyUI's all-in-one checkpoint: transformer, Gemma-2, tokenizer, VAE.
    Checkpoint,
    /// A transformer alone, in the given key layout.
    Transformer(TransformerLayout),
    /// A Gemma-2 text encoder in transformers' keys (ComfyUI's split file),
    /// with or without `spiece_model`.
    TextEncoder,
    /// The Flux VAE in Black Forest Labs' key names (ComfyUI's `ae.safetensors`).
    BflVae,
    /// A VAE in diffusers' `AutoencoderKL` key names.
    DiffusersVae,
}

impl SingleFileLayout {
    /// A phrase for messages and `lumina2 inspect`.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Checkpoint => "ComfyUI all-in-one checkpoint (transformer, Gemma-2 text encoder, tokenizer, Flux VAE)",
            Self::Transformer(TransformerLayout::Diffusers) => "transformer (diffusers keys)",
            Self::Transformer(TransformerLayout::Original) => "transformer (original Alpha-VLLM keys)",
            Self::Transformer(TransformerLayout::ComfyUi) => "transformer (ComfyUI keys)",
            Self::TextEncoder => "Gemma-2 text encoder (ComfyUI/transformers keys)",
            Self::BflVae => "Flux VAE (Black Forest Labs/ComfyUI keys)",
            Self::DiffusersVae => "VAE (diffusers keys)",
        }
    }
}

/// Recognises a single file's layout from its keys; `None` when it is none of them.
pub fn detect_single_file<'a>(keys: impl IntoIterator<Item = &'a str>) -> Option<SingleFileLayout> {
    let keys: Vec<&str> = keys.into_iter().collect();
    let has = |k: &str| keys.contains(&k);
    let transformer = detect_layout(keys.iter().copied());
    let companions = keys
        .iter()
        .any(|k| k.starts_with("text_encoders.") || k.starts_with(VAE_PREFIX));
    match transformer {
        Some(TransformerLayout::ComfyUi) if companions => Some(SingleFileLayout::Checkpoint),
        Some(l) => Some(SingleFileLayout::Transformer(l)),
        None if has("model.embed_tokens.weight") || has("embed_tokens.weight") => {
            Some(SingleFileLayout::TextEncoder)
        }
        None if has(BFL_VAE_MARKER) => Some(SingleFileLayout::BflVae),
        None if has("encoder.down_blocks.0.resnets.0.conv1.weight") => {
            Some(SingleFileLayout::DiffusersVae)
        }
        None => None,
    }
}

/// An open single `.safetensors` file and its layout.
pub struct SingleFile {
    path: PathBuf,
    source: Arc<SafetensorsSource>,
    layout: SingleFileLayout,
}

impl std::fmt::Debug for SingleFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SingleFile")
            .field("path", &self.path)
            .field("layout", &self.layout)
            .finish()
    }
}

impl SingleFile {
    /// Opens `path` (its header only) and recognises its layout.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref().to_path_buf();
        let source =
            Arc::new(
                SafetensorsSource::open(&[&path]).map_err(|e| Error::Unsupported {
                    path: path.clone(),
                    reason: e.to_string(),
                })?,
            );
        let keys = source.keys();
        let layout = detect_single_file(keys.iter().map(String::as_str)).ok_or_else(|| {
            Error::Unsupported {
                path: path.clone(),
                reason: "not a Lumina2 file: no key of a ComfyUI checkpoint, transformer, \
                         Gemma-2 text encoder or VAE layout"
                    .into(),
            }
        })?;
        Ok(Self {
            path,
            source,
            layout,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the file holds.
    pub fn layout(&self) -> SingleFileLayout {
        self.layout
    }

    /// The whole file, keys as stored.
    pub fn source(&self) -> &Arc<SafetensorsSource> {
        &self.source
    }

    fn wrong(&self, wanted: &str) -> Error {
        Error::Unsupported {
            path: self.path.clone(),
            reason: format!("holds a {}, not {wanted}", self.layout.describe()),
        }
    }

    /// Keys of a checkpoint that belong to none of its parts.
    pub fn stray_checkpoint_keys(&self) -> Vec<String> {
        self.source
            .keys()
            .into_iter()
            .filter(|k| {
                !(k.starts_with(TRANSFORMER_PREFIX)
                    || k.starts_with(TEXT_ENCODER_PREFIX)
                    || k.starts_with(VAE_PREFIX)
                    || k == CHECKPOINT_SPIECE_KEY
                    || IGNORED_CHECKPOINT_KEYS.contains(&k.as_str()))
            })
            .collect()
    }

    /// The Gemma-2 text encoder of a checkpoint or a text encoder file.
    pub fn text_encoder(&self) -> Result<GemmaFile, Error> {
        let (weights, spiece): (Arc<dyn WeightSource>, &str) = match self.layout {
            SingleFileLayout::Checkpoint => {
                self.check_checkpoint()?;
                (
                    Arc::new(Prefixed::new(self.source.clone(), TEXT_ENCODER_PREFIX)),
                    CHECKPOINT_SPIECE_KEY,
                )
            }
            SingleFileLayout::TextEncoder => (self.source.clone(), SPIECE_KEY),
            _ => return Err(self.wrong("a Gemma-2 text encoder")),
        };
        let spiece_key = self.source.contains(spiece).then(|| spiece.to_string());
        GemmaFile::new(self.path.clone(), self.source.clone(), weights, spiece_key)
    }

    /// The VAE of a checkpoint or a VAE file, in diffusers' names.
    pub fn vae(&self) -> Result<Arc<dyn WeightSource>, Error> {
        match self.layout {
            SingleFileLayout::DiffusersVae => Ok(self.source.clone()),
            _ => Ok(Arc::new(self.bfl_vae()?)),
        }
    }

    /// The BFL-layout VAE of a checkpoint or an `ae.safetensors`.
    fn bfl_vae(&self) -> Result<BflVae, Error> {
        match self.layout {
            SingleFileLayout::Checkpoint => {
                self.check_checkpoint()?;
                let part = Arc::new(Prefixed::new(self.source.clone(), VAE_PREFIX));
                BflVae::new(part, &self.path, VAE_PREFIX)
            }
            SingleFileLayout::BflVae => BflVae::new(self.source.clone(), &self.path, ""),
            SingleFileLayout::DiffusersVae => Err(Error::Unsupported {
                path: self.path.clone(),
                reason: "a VAE in diffusers keys needs its config.json (give the VAE's folder)"
                    .into(),
            }),
            _ => Err(self.wrong("a VAE")),
        }
    }

    /// The VAE's config: the Flux VAE's, sizes from the file's tensors.
    pub fn flux_vae_config(&self) -> Result<AutoencoderKLConfig, Error> {
        self.bfl_vae()?.flux_config(&self.path)
    }

    /// A checkpoint holds its three parts and nothing else.
    fn check_checkpoint(&self) -> Result<(), Error> {
        let stray = self.stray_checkpoint_keys();
        let keys = self.source.keys();
        let mut missing = Vec::new();
        for (prefix, part) in [
            (TRANSFORMER_PREFIX, "cap_embedder.0.weight"),
            (TEXT_ENCODER_PREFIX, "model.embed_tokens.weight"),
            (VAE_PREFIX, BFL_VAE_MARKER),
        ] {
            let key = format!("{prefix}{part}");
            if !keys.contains(&key) {
                missing.push(key);
            }
        }
        if stray.is_empty() && missing.is_empty() {
            Ok(())
        } else {
            Err(Error::KeyMismatch {
                path: self.path.clone(),
                missing,
                unexpected: stray,
            })
        }
    }
}

/// A Gemma-2 text encoder in a ComfyUI file, and its embedded tokenizer.
pub struct GemmaFile {
    path: PathBuf,
    file: Arc<SafetensorsSource>,
    weights: Arc<dyn WeightSource>,
    spiece_key: Option<String>,
}

/// The Gemma-2 keys (without `model.`) of a config, with their shapes.
pub fn gemma2_weight_shapes(cfg: &Gemma2Config) -> Vec<(String, Vec<usize>)> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let q = cfg.num_attention_heads * cfg.head_dim();
    let kv = cfg.num_key_value_heads * cfg.head_dim();
    let mut out = vec![
        ("embed_tokens.weight".to_string(), vec![cfg.vocab_size, h]),
        ("norm.weight".to_string(), vec![h]),
    ];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("layers.{l}");
        for norm in [
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ] {
            out.push((format!("{p}.{norm}.weight"), vec![h]));
        }
        for (name, shape) in [
            ("self_attn.q_proj", vec![q, h]),
            ("self_attn.k_proj", vec![kv, h]),
            ("self_attn.v_proj", vec![kv, h]),
            ("self_attn.o_proj", vec![h, q]),
            ("mlp.gate_proj", vec![i, h]),
            ("mlp.up_proj", vec![i, h]),
            ("mlp.down_proj", vec![h, i]),
        ] {
            out.push((format!("{p}.{name}.weight"), shape.clone()));
            if cfg.attention_bias && name.starts_with("self_attn") {
                out.push((format!("{p}.{name}.bias"), vec![shape[0]]));
            }
        }
    }
    out
}

impl GemmaFile {
    fn new(
        path: PathBuf,
        file: Arc<SafetensorsSource>,
        weights: Arc<dyn WeightSource>,
        spiece_key: Option<String>,
    ) -> Result<Self, Error> {
        Ok(Self {
            path,
            file,
            weights,
            spiece_key,
        })
    }

    /// The weights, in transformers' keys (`model.` included).
    pub fn weights(&self) -> Arc<dyn WeightSource> {
        self.weights.clone()
    }

    /// The shape of a Gemma-2 key (without `model.`), when the file has it.
    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.weights.shape(&format!("model.{key}"))
    }

    /// The file's name of a Gemma-2 key (without `model.`), for messages.
    fn file_key(&self, key: &str) -> String {
        match self.spiece_key.as_deref() {
            Some(CHECKPOINT_SPIECE_KEY) => format!("{TEXT_ENCODER_PREFIX}model.{key}"),
            _ => format!("model.{key}"),
        }
    }

    /// Gemma-2-2B's config (transformers' `Gemma2Config()`), with the sizes
    /// the tensors give: vocabulary and width from `embed_tokens`, layers
    /// counted, feed-forward width from `gate_proj`, head counts from the
    /// projections at Gemma-2's head width of 256. Checked against every
    /// tensor ([`GemmaFile::check`]).
    pub fn config(&self) -> Result<Gemma2Config, Error> {
        let mut cfg = Gemma2Config::default();
        let need = |key: &str| -> Result<Vec<usize>, Error> {
            self.shape(key).ok_or_else(|| Error::KeyMismatch {
                path: self.path.clone(),
                missing: vec![self.file_key(key)],
                unexpected: Vec::new(),
            })
        };
        let two = |key: &str| -> Result<[usize; 2], Error> {
            match need(key)?.as_slice() {
                &[a, b] => Ok([a, b]),
                s => Err(Error::Shape {
                    path: self.path.clone(),
                    key: self.file_key(key),
                    expected: vec![0, 0],
                    found: s.to_vec(),
                }),
            }
        };
        let [vocab, hidden] = two("embed_tokens.weight")?;
        cfg.vocab_size = vocab;
        cfg.hidden_size = hidden;
        let layers: BTreeSet<usize> = self
            .weights
            .keys()
            .iter()
            .filter_map(|k| {
                k.strip_prefix("model.layers.")?
                    .split_once('.')?
                    .0
                    .parse()
                    .ok()
            })
            .collect();
        cfg.num_hidden_layers = layers.len();
        cfg.intermediate_size = two("layers.0.mlp.gate_proj.weight")?[0];
        let head_dim = cfg.head_dim();
        let heads = |key: &str| -> Result<usize, Error> {
            let rows = two(key)?[0];
            if rows == 0 || !rows.is_multiple_of(head_dim) {
                return Err(Error::Unsupported {
                    path: self.path.clone(),
                    reason: format!(
                        "`{}` has {rows} rows, not a multiple of Gemma-2's head width {head_dim}: \
                         give the text encoder's config.json",
                        self.file_key(key)
                    ),
                });
            }
            Ok(rows / head_dim)
        };
        cfg.num_attention_heads = heads("layers.0.self_attn.q_proj.weight")?;
        cfg.num_key_value_heads = heads("layers.0.self_attn.k_proj.weight")?;
        cfg.validate().map_err(|e| Error::Unsupported {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        self.check(&cfg)?;
        Ok(cfg)
    }

    /// Every Gemma-2 tensor of the file has the shape `cfg` gives it, none
    /// is missing, and the file holds nothing else (besides the tokenizer).
    pub fn check(&self, cfg: &Gemma2Config) -> Result<(), Error> {
        let want: BTreeMap<String, Vec<usize>> = gemma2_weight_shapes(cfg).into_iter().collect();
        let mut missing = Vec::new();
        for (key, shape) in &want {
            match self.shape(key) {
                None => missing.push(self.file_key(key)),
                Some(found) if &found != shape => {
                    return Err(Error::Shape {
                        path: self.path.clone(),
                        key: self.file_key(key),
                        expected: shape.clone(),
                        found,
                    })
                }
                Some(_) => {}
            }
        }
        let unexpected: Vec<String> = self
            .weights
            .keys()
            .into_iter()
            .filter(|k| {
                Some(k.as_str()) != self.spiece_key.as_deref()
                    && !k
                        .strip_prefix("model.")
                        .is_some_and(|k| want.contains_key(k))
            })
            .map(|k| match self.spiece_key.as_deref() {
                Some(CHECKPOINT_SPIECE_KEY) => format!("{TEXT_ENCODER_PREFIX}{k}"),
                _ => k,
            })
            .collect();
        if missing.is_empty() && unexpected.is_empty() {
            Ok(())
        } else {
            Err(Error::KeyMismatch {
                path: self.path.clone(),
                missing,
                unexpected,
            })
        }
    }

    /// The key of the embedded SentencePiece model, when the file has one.
    pub fn spiece_key(&self) -> Option<&str> {
        self.spiece_key.as_deref()
    }

    /// The bytes of the embedded SentencePiece model (`None`: the file has
    /// none): a 1-D `uint8` tensor, non-empty, at most [`MAX_SPIECE_BYTES`].
    pub fn spiece_model(&self) -> Result<Option<Vec<u8>>, Error> {
        let Some(key) = self.spiece_key.as_deref() else {
            return Ok(None);
        };
        let bad = |reason: String| Error::Unsupported {
            path: self.path.clone(),
            reason: format!("tokenizer `{key}`: {reason}"),
        };
        let (dtype, shape) = self
            .file
            .tensor_info(key)
            .ok_or_else(|| bad("not in the file".into()))?;
        let n = match (dtype, shape) {
            (DType::U8, &[n]) => n,
            _ => {
                return Err(bad(format!(
                    "a {dtype:?} tensor of shape {shape:?}, expected the bytes of a SentencePiece model (1-D uint8)"
                )))
            }
        };
        if n == 0 || n > MAX_SPIECE_BYTES {
            return Err(bad(format!(
                "{n} bytes, expected 1 to {MAX_SPIECE_BYTES} (a SentencePiece model)"
            )));
        }
        let t = self.file.tensor(key).map_err(|e| bad(e.to_string()))?;
        t.to_vec1::<u8>().map(Some).map_err(|e| bad(e.to_string()))
    }
}
