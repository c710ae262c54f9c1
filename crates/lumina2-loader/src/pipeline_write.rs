//! Writing a whole diffusers `Lumina2Pipeline` folder from ComfyUI's files
//! (the all-in-one checkpoint, or the split transformer, Gemma-2 and BFL VAE
//! files): the direction [`crate::comfy_write`] does not cover.
//!
//! What the folder holds, as diffusers 0.42.1 and transformers 5.24 write it:
//! - `model_index.json`: `Lumina2Pipeline` and its five components
//!   (`pipelines/lumina2/pipeline_lumina2.py` `register_modules`);
//! - `transformer/`: diffusers keys and `config.json`, exactly as
//!   [`crate::convert_transformer`] writes a diffusers folder;
//! - `text_encoder/`: `Gemma2Model`'s keys (transformers saves the base model
//!   without `model.`) and a `config.json` of Gemma-2-2B's settings with the
//!   sizes the tensors give ([`crate::GemmaFile::config`]);
//! - `tokenizer/`: the embedded SentencePiece model as `tokenizer.model`, and
//!   the tokenizer transformers' `GemmaTokenizer` builds from it (the
//!   text encoder crate builds the same one) as `tokenizer.json`, with
//!   `tokenizer_config.json` and `special_tokens_map.json`;
//! - `vae/`: the BFL keys renamed to `AutoencoderKL`'s by the one mapping of
//!   [`crate::bfl_vae`], the mid attention's 1x1 convolutions stored as the
//!   linear `[C, C]` weights diffusers has (the same bytes), and the Flux
//!   VAE's config (scaling 0.3611, shift 0.1159) with the tensors' sizes;
//! - `scheduler/`: Lumina-Image 2.0's `FlowMatchEulerDiscreteScheduler`
//!   config (shift 6.0): ComfyUI's files carry no scheduler.
//!
//! Settings the tensors do not show (a tiny model's head width, group-norm
//! count, RoPE axes) come from [`PipelineConfigs`] when given; each given
//! config is checked against the tensors.
//!
//! Every tensor keeps its stored float type, so the conversion is lossless;
//! tensors are read and written one at a time. The folder is built under a
//! temporary name next to the destination and renamed into place only when
//! complete: a failure leaves nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::DType;
use lumina2_text_encoder::{Gemma2Config, GemmaTokenizer};
use lumina2_vae::AutoencoderKLConfig;
use lumina2_weights::{SafetensorsSource, WeightSource};
use serde_json::{json, Value};

use crate::bfl_vae::{bfl_key_to_diffusers, levels};
use crate::comfy::{CHECKPOINT_SPIECE_KEY, SPIECE_KEY, VAE_PREFIX};
use crate::comfy_write::{
    float_type, is_safetensors, item_bytes, not_a_file, open_folder, open_single, read_tokenizer,
    text_encoder_items, Data, Item, PipelineParts,
};
use crate::convert::{
    diffusers_config, plan, ConvertError, ConvertOptions, ConvertReport, Out, Progress, Source,
};
use crate::gguf::GgufWriteError;
use crate::st_write::{write_safetensors, StPlan};
use crate::{ConvertFormat, SingleFileLayout};

/// The diffusers version the written configs name.
const DIFFUSERS_VERSION: &str = "0.42.1";
/// The transformers version the written configs name.
const TRANSFORMERS_VERSION: &str = "5.24.0";

/// `config.json` files the written folder takes instead of the ones derived
/// from the tensors (each checked against them). `None`: the source
/// folder's own when the part comes from a diffusers folder, else derived.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PipelineConfigs {
    /// The transformer's `config.json`.
    pub transformer: Option<PathBuf>,
    /// The Gemma-2 text encoder's `config.json`.
    pub text_encoder: Option<PathBuf>,
    /// The VAE's `config.json`.
    pub vae: Option<PathBuf>,
    /// `scheduler_config.json` (default: Lumina-Image 2.0's).
    pub scheduler: Option<PathBuf>,
}

impl PipelineConfigs {
    /// The component configs of a diffusers pipeline folder (those it has).
    pub fn from_pipeline_folder(dir: &Path) -> Self {
        let file = |p: PathBuf| p.is_file().then_some(p);
        Self {
            transformer: file(dir.join("transformer/config.json")),
            text_encoder: file(dir.join("text_encoder/config.json")),
            vae: file(dir.join("vae/config.json")),
            scheduler: file(dir.join("scheduler/scheduler_config.json")),
        }
    }
}

/// `model_index.json` of a `Lumina2Pipeline`, keys sorted as diffusers
/// writes them.
pub fn model_index_json() -> Value {
    json!({
        "_class_name": "Lumina2Pipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Gemma2Model"],
        "tokenizer": ["transformers", "GemmaTokenizer"],
        "transformer": ["diffusers", "Lumina2Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
}

/// Alpha-VLLM/Lumina-Image-2.0's `scheduler/scheduler_config.json`
/// (`FlowMatchEulerDiscreteScheduler`, shift 6.0, no dynamic shifting), with
/// the keys diffusers 0.42.1 writes.
pub fn lumina2_scheduler_json() -> Value {
    json!({
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "invert_sigmas": false,
        "max_image_seq_len": 4096,
        "max_shift": 1.15,
        "num_train_timesteps": 1000,
        "shift": 6.0,
        "shift_terminal": null,
        "stochastic_sampling": false,
        "time_shift_type": "exponential",
        "use_beta_sigmas": false,
        "use_dynamic_shifting": false,
        "use_exponential_sigmas": false,
        "use_karras_sigmas": false,
    })
}

/// transformers' name of a torch float type, as `config.json`'s `dtype`.
fn torch_dtype(d: DType) -> &'static str {
    match d {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// Gemma-2-2B's `config.json` (google/gemma-2-2b, as transformers 5.24
/// writes a `Gemma2Model`'s) with `cfg`'s sizes.
fn gemma2_config_json(cfg: &Gemma2Config, dtype: DType) -> Value {
    let layer_types: Vec<&str> = (0..cfg.num_hidden_layers)
        .map(|i| {
            if i % 2 == 0 {
                "sliding_attention"
            } else {
                "full_attention"
            }
        })
        .collect();
    json!({
        "architectures": ["Gemma2Model"],
        "attention_bias": cfg.attention_bias,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": cfg.attn_logit_softcapping,
        "bos_token_id": 2,
        "dtype": torch_dtype(dtype),
        "eos_token_id": 1,
        "final_logit_softcapping": cfg.final_logit_softcapping,
        "head_dim": cfg.head_dim(),
        "hidden_activation": cfg.hidden_activation,
        "hidden_size": cfg.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": cfg.intermediate_size,
        "layer_types": layer_types,
        "max_position_embeddings": cfg.max_position_embeddings,
        "model_type": "gemma2",
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.num_key_value_heads,
        "pad_token_id": cfg.pad_token_id,
        // transformers 5 checks the type: an int (`query_pre_attn_scalar: int`).
        "query_pre_attn_scalar": json_int_or_float(cfg.query_pre_attn_scalar),
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "sliding_window": cfg.sliding_window,
        "tie_word_embeddings": true,
        "transformers_version": TRANSFORMERS_VERSION,
        "use_bidirectional_attention": null,
        "use_cache": true,
        "vocab_size": cfg.vocab_size,
    })
}

/// `v` as a JSON integer when it is a whole number (transformers' config
/// classes check field types), else as a float.
fn json_int_or_float(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        json!(v as i64)
    } else {
        json!(v)
    }
}

/// An `AutoencoderKL` `config.json` as diffusers writes it.
fn vae_config_json(cfg: &AutoencoderKLConfig) -> Value {
    json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": cfg.act_fn,
        "block_out_channels": cfg.block_out_channels,
        "down_block_types": cfg.down_block_types,
        "force_upcast": cfg.force_upcast,
        "in_channels": cfg.in_channels,
        "latent_channels": cfg.latent_channels,
        "latents_mean": cfg.latents_mean,
        "latents_std": cfg.latents_std,
        "layers_per_block": cfg.layers_per_block,
        "mid_block_add_attention": cfg.mid_block_add_attention,
        "norm_num_groups": cfg.norm_num_groups,
        "out_channels": cfg.out_channels,
        "sample_size": cfg.sample_size,
        "scaling_factor": cfg.scaling_factor,
        "shift_factor": cfg.shift_factor,
        "up_block_types": cfg.up_block_types,
        "use_post_quant_conv": cfg.use_post_quant_conv,
        "use_quant_conv": cfg.use_quant_conv,
    })
}

/// transformers' `tokenizer_config.json` of a `GemmaTokenizer` (what
/// `save_pretrained` writes in 5.24: the backend, the named special tokens,
/// the class). `model_max_length` is left out: transformers' default (no
/// limit) is what a Gemma `tokenizer.model` gives.
fn tokenizer_config_json() -> Value {
    json!({
        "backend": "tokenizers",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "mask_token": "<mask>",
        "pad_token": "<pad>",
        "padding_side": "left",
        "tokenizer_class": "GemmaTokenizer",
        "unk_token": "<unk>",
    })
}

/// The legacy `special_tokens_map.json` (read by transformers, written by
/// older versions and shipped in the real repository).
fn special_tokens_map_json() -> Value {
    json!({
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "mask_token": "<mask>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
    })
}

fn source_err(path: &Path, reason: impl std::fmt::Display) -> ConvertError {
    ConvertError::Source {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn read_json(path: &Path) -> Result<Value, ConvertError> {
    let text =
        lumina2_weights::fs::read_to_string_bounded(path, lumina2_weights::fs::MAX_CONFIG_BYTES)
            .map_err(|e| source_err(path, e))?;
    serde_json::from_str(&text).map_err(|e| source_err(path, format!("not valid JSON: {e}")))
}

/// A text encoder to write: its tensors in `Gemma2Model`'s keys, its
/// `config.json`, and the embedded SentencePiece model (when the source
/// has one).
struct TextEncoderOut {
    items: Vec<Item>,
    config: Value,
    spiece: Option<Vec<u8>>,
}

fn text_encoder(path: &Path, config: Option<&Path>) -> Result<TextEncoderOut, ConvertError> {
    let (mut items, spiece) = text_encoder_items(path)?;
    for i in &mut items {
        if let Some(k) = i.name.strip_prefix("model.") {
            i.name = k.to_string();
        }
    }
    let folder_config = path.is_dir().then(|| {
        if path.join("model_index.json").is_file() {
            path.join("text_encoder/config.json")
        } else {
            path.join("config.json")
        }
    });
    let given = config.map(Path::to_path_buf).or(folder_config);
    let value = if is_safetensors(path) {
        let te = open_single(path)?
            .text_encoder()
            .map_err(|e| source_err(path, e))?;
        match &given {
            Some(p) => {
                let cfg = Gemma2Config::from_file(p).map_err(|e| source_err(p, e))?;
                te.check(&cfg).map_err(|e| source_err(path, e))?;
                read_json(p)?
            }
            None => {
                let cfg = te.config().map_err(|e| source_err(path, e))?;
                let dtype = items
                    .iter()
                    .find(|i| i.name == "embed_tokens.weight")
                    .map_or(DType::F32, |i| i.dtype);
                gemma2_config_json(&cfg, dtype)
            }
        }
    } else {
        let p = given.ok_or_else(|| not_a_file(path, "text encoder"))?;
        Gemma2Config::from_file(&p).map_err(|e| source_err(&p, e))?;
        read_json(&p)?
    };
    Ok(TextEncoderOut {
        items,
        config: value,
        spiece,
    })
}

/// The VAE's tensors in diffusers' names, and its config.
fn vae(path: &Path, config: Option<&Path>) -> Result<(Vec<Item>, Value), ConvertError> {
    let given = |derived: Option<AutoencoderKLConfig>| -> Result<Value, ConvertError> {
        match (config, derived) {
            (Some(p), derived) => {
                let cfg = AutoencoderKLConfig::from_file(p).map_err(|e| source_err(p, e))?;
                if let Some(d) = derived {
                    let sizes = |c: &AutoencoderKLConfig| {
                        (
                            c.block_out_channels.clone(),
                            c.layers_per_block,
                            c.in_channels,
                            c.out_channels,
                            c.latent_channels,
                            c.use_quant_conv,
                            c.use_post_quant_conv,
                            c.mid_block_add_attention,
                        )
                    };
                    if sizes(&cfg) != sizes(&d) {
                        return Err(source_err(
                            p,
                            format!(
                                "does not describe the VAE of {} (its tensors give {d:?})",
                                path.display()
                            ),
                        ));
                    }
                }
                read_json(p)
            }
            (None, Some(d)) => Ok(vae_config_json(&d)),
            (None, None) => Err(ConvertError::Options(format!(
                "{}: a VAE in diffusers keys needs its config.json",
                path.display()
            ))),
        }
    };
    let as_is = |st: &Arc<SafetensorsSource>| -> Vec<Item> {
        st.keys()
            .into_iter()
            .map(|k| {
                let (dtype, shape) = float_type(st, &k);
                Item {
                    name: k.clone(),
                    shape,
                    dtype,
                    data: Data::Tensor(st.clone(), k),
                }
            })
            .collect()
    };
    if path.is_dir() {
        let st = open_folder(path, "vae")?;
        let own = if path.join("model_index.json").is_file() {
            path.join("vae/config.json")
        } else {
            path.join("config.json")
        };
        let cfg = match config {
            Some(_) => given(None)?,
            None => read_json(&own)?,
        };
        return Ok((as_is(&st), cfg));
    }
    if !is_safetensors(path) {
        return Err(not_a_file(path, "VAE"));
    }
    let file = open_single(path)?;
    // Every key must be one the loader maps (a checkpoint: all three parts there).
    file.vae().map_err(|e| source_err(path, e))?;
    let st = file.source().clone();
    let prefix = match file.layout() {
        SingleFileLayout::DiffusersVae => return Ok((as_is(&st), given(None)?)),
        SingleFileLayout::Checkpoint => VAE_PREFIX,
        _ => "",
    };
    let derived = file.flux_vae_config().map_err(|e| source_err(path, e))?;
    let keys: Vec<String> = st
        .keys()
        .into_iter()
        .filter_map(|k| k.strip_prefix(prefix).map(str::to_string))
        .collect();
    let n = levels(&keys);
    let mut items = Vec::with_capacity(keys.len());
    for k in keys {
        let key = format!("{prefix}{k}");
        let (name, squeeze) = bfl_key_to_diffusers(&k, n).ok_or_else(|| ConvertError::Keys {
            path: path.to_path_buf(),
            reason: format!("`{key}` is not a key of the Flux VAE"),
        })?;
        let (dtype, mut shape) = float_type(&st, &key);
        // A 1x1 convolution's bytes are the linear weight's.
        if let (true, [rows, cols, 1, 1]) = (squeeze, shape.as_slice()) {
            shape = vec![*rows, *cols];
        }
        items.push(Item {
            name,
            shape,
            dtype,
            data: Data::Tensor(st.clone(), key),
        });
    }
    items.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((items, given(Some(derived))?))
}

/// The SentencePiece model and where it came from (for messages).
fn tokenizer_bytes(
    parts: &PipelineParts,
    own: Option<Vec<u8>>,
) -> Result<(Vec<u8>, String), ConvertError> {
    if let Some(p) = &parts.tokenizer {
        return Ok((read_tokenizer(p)?, p.display().to_string()));
    }
    let key = match open_single(&parts.text_encoder).map(|f| f.layout()) {
        Ok(SingleFileLayout::Checkpoint) => CHECKPOINT_SPIECE_KEY,
        _ => SPIECE_KEY,
    };
    match own {
        Some(b) => Ok((b, format!("{}: {key}", parts.text_encoder.display()))),
        None => Err(ConvertError::Keys {
            path: parts.text_encoder.clone(),
            reason: format!(
                "no `{key}` (the embedded SentencePiece tokenizer): a diffusers folder needs \
                 its tokenizer (give a tokenizer.model with --tokenizer)"
            ),
        }),
    }
}

/// Writes `value` as pretty JSON (with the trailing newline diffusers writes).
fn write_json(path: &Path, value: &Value) -> Result<(), ConvertError> {
    let mut text =
        serde_json::to_string_pretty(value).map_err(|e| ConvertError::Options(e.to_string()))?;
    text.push('\n');
    write_file(path, text.as_bytes())
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ConvertError> {
    std::fs::write(path, bytes).map_err(|source| {
        GgufWriteError::Io {
            path: path.to_path_buf(),
            source,
        }
        .into()
    })
}

/// A folder made under a temporary name, removed (with what is in it)
/// unless renamed into place.
struct Staging {
    dir: PathBuf,
    done: bool,
}

impl Staging {
    fn create(dst: &Path) -> Result<Self, ConvertError> {
        let name = dst
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| {
                ConvertError::Options(format!("{}: not a folder name", dst.display()))
            })?;
        let parent = dst.parent().filter(|p| !p.as_os_str().is_empty());
        let io = |path: PathBuf, source| GgufWriteError::Io { path, source };
        if let Some(p) = parent {
            std::fs::create_dir_all(p).map_err(|e| io(p.to_path_buf(), e))?;
        }
        let mut last = None;
        for attempt in 0..100u32 {
            let tmp = format!(".{name}.{}.{attempt}.partial", std::process::id());
            let dir = parent.map_or_else(|| PathBuf::from(&tmp), |p| p.join(&tmp));
            // create_dir fails on an existing path: the folder is ours alone.
            match std::fs::create_dir(&dir) {
                Ok(()) => return Ok(Self { dir, done: false }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(io(dir, e).into()),
            }
        }
        Err(io(
            dst.to_path_buf(),
            last.unwrap_or_else(|| std::io::Error::other("no free temporary name")),
        )
        .into())
    }

    fn commit(mut self, dst: &Path) -> Result<(), ConvertError> {
        std::fs::rename(&self.dir, dst).map_err(|source| GgufWriteError::Io {
            path: dst.to_path_buf(),
            source,
        })?;
        self.done = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Writes the diffusers `Lumina2Pipeline` folder `dst` (which must not
/// exist, or be an empty folder) from `parts`: a ComfyUI all-in-one
/// checkpoint, or the split files (any part may also be a diffusers
/// folder). `progress` is called before each tensor and at the end, as
/// [`crate::convert_transformer`] does.
pub fn convert_to_diffusers_pipeline(
    parts: &PipelineParts,
    configs: &PipelineConfigs,
    dst: &Path,
    progress: Progress<'_>,
) -> Result<ConvertReport, ConvertError> {
    let non_empty = std::fs::read_dir(dst)
        .map(|mut d| d.next().is_some())
        .unwrap_or(dst.exists());
    if non_empty {
        return Err(ConvertError::Options(format!(
            "{}: exists and is not an empty folder (a pipeline folder is written whole, \
             into a new or empty folder)",
            dst.display()
        )));
    }

    // Read and check every part before writing anything.
    let mut source = Source::open(&parts.transformer)?;
    if let Some(p) = &configs.transformer {
        source.set_config_json(p.clone());
    }
    let outs = plan(&source, true)?;
    let transformer_config = diffusers_config(
        &source,
        &outs,
        &ConvertOptions {
            format: ConvertFormat::Diffusers,
            quantize: None,
            config: None,
        },
    )?;
    let TextEncoderOut {
        items: te_items,
        config: te_config,
        spiece: own_spiece,
    } = text_encoder(&parts.text_encoder, configs.text_encoder.as_deref())?;
    let (vae_items, vae_config) = vae(&parts.vae, configs.vae.as_deref())?;
    let (spiece, origin) = tokenizer_bytes(parts, own_spiece)?;
    let tokenizer = GemmaTokenizer::from_sentencepiece(&spiece, &origin).map_err(|e| {
        // The error names `origin` (file and key) already.
        ConvertError::Tokenizer(e.to_string())
    })?;
    let tokenizer_json = tokenizer
        .inner()
        .to_string(true)
        .map_err(|e| ConvertError::Options(format!("{origin}: the tokenizer: {e}")))?;
    let mut report = ConvertReport::default();
    let scheduler = match &configs.scheduler {
        Some(p) => read_json(p)?,
        None => {
            report.notes.push(
                "scheduler/: Lumina-Image 2.0's FlowMatchEulerDiscreteScheduler config \
                 (shift 6.0); ComfyUI's files have none"
                    .into(),
            );
            lumina2_scheduler_json()
        }
    };

    let transformer_items: Vec<Item> = outs
        .iter()
        .enumerate()
        .map(|(i, o): (usize, &Out)| Item {
            name: o.name.clone(),
            shape: o.shape.clone(),
            dtype: o.dtype,
            data: Data::Transformer(i),
        })
        .collect();
    let files = [
        (
            "transformer/diffusion_pytorch_model.safetensors",
            transformer_items,
        ),
        ("text_encoder/model.safetensors", te_items),
        ("vae/diffusion_pytorch_model.safetensors", vae_items),
    ];
    let total: usize = files.iter().map(|(_, items)| items.len()).sum();
    report.tensors = total;

    let staging = Staging::create(dst)?;
    let root = staging.dir.clone();
    let mkdir = |d: &str| {
        let p = root.join(d);
        std::fs::create_dir(&p).map_err(|source| GgufWriteError::Io { path: p, source })
    };
    for d in [
        "transformer",
        "text_encoder",
        "tokenizer",
        "vae",
        "scheduler",
    ] {
        mkdir(d)?;
    }
    let mut done = 0usize;
    for (rel, items) in &files {
        let plans: Vec<StPlan> = items
            .iter()
            .map(|i| StPlan {
                name: i.name.clone(),
                shape: i.shape.clone(),
                dtype: i.dtype,
            })
            .collect();
        write_safetensors(&root.join(rel), &[("format", "pt")], &plans, |i| {
            progress(done, total)?;
            done += 1;
            item_bytes(&items[i], &source, &outs)
        })?;
    }
    write_json(&root.join("model_index.json"), &model_index_json())?;
    write_file(&root.join("transformer/config.json"), &transformer_config)?;
    write_json(&root.join("text_encoder/config.json"), &te_config)?;
    write_json(&root.join("vae/config.json"), &vae_config)?;
    write_json(&root.join("scheduler/scheduler_config.json"), &scheduler)?;
    write_file(&root.join("tokenizer/tokenizer.model"), &spiece)?;
    write_file(
        &root.join("tokenizer/tokenizer.json"),
        tokenizer_json.as_bytes(),
    )?;
    write_json(
        &root.join("tokenizer/tokenizer_config.json"),
        &tokenizer_config_json(),
    )?;
    write_json(
        &root.join("tokenizer/special_tokens_map.json"),
        &special_tokens_map_json(),
    )?;
    progress(total, total).map_err(ConvertError::Options)?;
    // An empty destination folder gives way to the complete one.
    if dst.is_dir() {
        std::fs::remove_dir(dst).map_err(|source| GgufWriteError::Io {
            path: dst.to_path_buf(),
            source,
        })?;
    }
    staging.commit(dst)?;

    for (rel, items) in &files {
        report.files.push(dst.join(rel));
        for i in items {
            *report
                .by_type
                .entry(format!("{:?}", i.dtype).to_uppercase())
                .or_default() += 1;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gemma-2-2B's config as written: the real model's values, with the
    /// types transformers 5 checks (`query_pre_attn_scalar` and the sizes
    /// are ints).
    #[test]
    fn the_derived_gemma2_config_is_gemma_2_2b() {
        let v = gemma2_config_json(&Gemma2Config::default(), DType::BF16);
        for (k, want) in [
            ("vocab_size", json!(256000)),
            ("hidden_size", json!(2304)),
            ("intermediate_size", json!(9216)),
            ("num_hidden_layers", json!(26)),
            ("num_attention_heads", json!(8)),
            ("num_key_value_heads", json!(4)),
            ("head_dim", json!(256)),
            ("query_pre_attn_scalar", json!(256)),
            ("sliding_window", json!(4096)),
            ("attn_logit_softcapping", json!(50.0)),
            ("final_logit_softcapping", json!(30.0)),
            ("max_position_embeddings", json!(8192)),
            ("dtype", json!("bfloat16")),
        ] {
            assert_eq!(v[k], want, "{k}");
        }
        assert!(v["query_pre_attn_scalar"].is_u64());
        assert_eq!(v["layer_types"][0], "sliding_attention");
        assert_eq!(v["layer_types"][25], "full_attention");
        assert_eq!(json_int_or_float(0.5), json!(0.5));
    }

    #[test]
    fn the_scheduler_is_lumina_image_2s() {
        let v = lumina2_scheduler_json();
        assert_eq!(v["shift"], json!(6.0));
        assert_eq!(v["use_dynamic_shifting"], json!(false));
        assert_eq!(v["_class_name"], "FlowMatchEulerDiscreteScheduler");
    }
}
