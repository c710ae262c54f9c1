//! Where each Z-Image component comes from, and loading it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use lumina2_scheduler::SchedulerConfig;
use lumina2_text_encoder::{ChatTokenizer, Qwen3Config, Qwen3Encoder};
use lumina2_transformer::{WeightSource, Weights, ZImageConfig, ZImageTransformer};
use lumina2_vae::AutoencoderKLConfig;

use crate::components::{self, is_gguf, is_safetensors, LoadReport, LoraSpec};
use crate::error::{Error, Result};
use crate::TransformerSource;

/// The files of every component of a Z-Image pipeline: diffusers' folder
/// layout, or the single files people download in its place.
#[derive(Debug, Clone, PartialEq)]
pub struct ZImageSources {
    /// The transformer: `transformer/` (`ZImageTransformer2DModel`'s
    /// `config.json` and safetensors), or a single file (ComfyUI's or the
    /// original `.safetensors`, keys bare or under `model.diffusion_model.`,
    /// a diffusers-key `.safetensors`, or a community `.gguf`, kept
    /// quantised) with the `config.json` that describes it; `config: None`:
    /// the released model's config with the file's sizes.
    pub transformer: TransformerSource,
    /// LoRAs applied on top of the transformer, in order (diffusers/PEFT,
    /// ComfyUI `diffusion_model.`-prefixed, or kohya keys).
    pub loras: Vec<LoraSpec>,
    /// The Qwen3 text encoder: `text_encoder/` (`config.json` and
    /// safetensors), a llama.cpp GGUF file, or one safetensors file
    /// (ComfyUI's `qwen_3_4b.safetensors`: transformers' keys under any prefix).
    pub text_encoder: PathBuf,
    /// `config.json` (or its folder) of a single-file text encoder; `None`:
    /// a GGUF file's metadata (a safetensors file needs one).
    pub text_encoder_config: Option<PathBuf>,
    /// `tokenizer/`: `tokenizer.json` and `tokenizer_config.json` with the
    /// chat template (or `chat_template.jinja` beside them); a file in that
    /// folder names the folder.
    pub tokenizer: PathBuf,
    /// The VAE: `vae/`, or one file (a Flux VAE in Black Forest Labs'/ComfyUI's
    /// keys, `ae.safetensors`, or in diffusers' keys).
    pub vae: PathBuf,
    /// `config.json` (or its folder) of a single-file VAE; `None`: the Flux
    /// VAE's, sizes from the file.
    pub vae_config: Option<PathBuf>,
    /// `scheduler_config.json`.
    pub scheduler_config: PathBuf,
}

impl ZImageSources {
    /// The components of a Z-Image diffusers pipeline folder
    /// (`model_index.json` naming `ZImagePipeline`).
    pub fn from_pipeline_folder(path: impl AsRef<Path>) -> Result<Self> {
        let folder = lumina2_loader::PipelineFolder::open_as(
            path.as_ref(),
            lumina2_loader::PipelineKind::ZImage,
        )?;
        Ok(Self::from_folder(&folder))
    }

    /// The components of an opened Z-Image pipeline folder.
    pub fn from_folder(folder: &lumina2_loader::PipelineFolder) -> Self {
        Self {
            transformer: TransformerSource::Folder(folder.transformer_dir()),
            loras: Vec::new(),
            text_encoder: folder.text_encoder_dir(),
            text_encoder_config: None,
            tokenizer: folder.tokenizer_dir(),
            vae: folder.vae_dir(),
            vae_config: None,
            scheduler_config: folder.scheduler_config(),
        }
    }

    /// The transformer's configuration: its `config.json`, or for a single
    /// file without one, the released model's with the file's sizes.
    pub fn transformer_config(&self) -> Result<ZImageConfig> {
        match &self.transformer {
            TransformerSource::File { path, config: None } => {
                Ok(lumina2_loader::zimage_file_config(path)?)
            }
            other => Ok(ZImageConfig::from_file(
                other.config_path().unwrap_or(Path::new("")),
            )?),
        }
    }

    /// The text encoder's configuration: its folder's, the one given, or a
    /// GGUF file's metadata.
    pub fn text_encoder_config(&self) -> Result<Qwen3Config> {
        let path = &self.text_encoder;
        if path.is_dir() {
            return Ok(Qwen3Config::from_file(path)?);
        }
        match &self.text_encoder_config {
            Some(c) => Ok(Qwen3Config::from_file(c)?),
            None if is_gguf(path) => Ok(lumina2_loader::Qwen3Gguf::open(path)?.config()?),
            None => Err(Error::File {
                path: path.clone(),
                reason: "a single-file Qwen3 text encoder carries no config: give its \
                         config.json (the pipeline folder's text_encoder/)"
                    .into(),
            }),
        }
    }

    /// The VAE's configuration: its folder's `config.json`, the one given
    /// for a single file, or the Flux VAE's with the file's sizes.
    pub fn vae_config(&self) -> Result<AutoencoderKLConfig> {
        components::vae_config(&self.vae, self.vae_config.as_deref())
    }

    /// The scheduler's configuration.
    pub fn scheduler(&self) -> Result<SchedulerConfig> {
        Ok(SchedulerConfig::from_file(&self.scheduler_config)?)
    }

    /// The tokenizer's folder (`tokenizer` itself, or the folder of a file in it).
    fn tokenizer_dir(&self) -> &Path {
        match self.tokenizer.parent() {
            Some(p) if self.tokenizer.is_file() => p,
            _ => &self.tokenizer,
        }
    }
}

/// The tokenizer and `hidden_states[-2]` of the Qwen3 text encoder.
pub(crate) struct ZImagePromptEncoder {
    pub(crate) tokenizer: ChatTokenizer,
    pub(crate) encoder: Qwen3Encoder,
}

pub(crate) fn load_prompt_encoder(
    sources: &ZImageSources,
    cfg: &Qwen3Config,
    dtype: DType,
    device: &Device,
    report: &mut LoadReport,
) -> Result<ZImagePromptEncoder> {
    let tokenizer = ChatTokenizer::from_folder(sources.tokenizer_dir())?;
    let path = &sources.text_encoder;
    let weights = if path.is_file() && is_gguf(path) {
        // llama.cpp's Qwen3 GGUF: linears and embedding kept quantised.
        lumina2_loader::Qwen3Gguf::open(path)?.into_weights(dtype, device)
    } else if is_safetensors(path) {
        Weights::new(lumina2_loader::open_qwen3_file(path)?, dtype, device)
    } else {
        let folder = lumina2_loader::ComponentFolder::open(path)?;
        Weights::from_safetensors(folder.safetensors_files(), dtype, device)?
    };
    let encoder = Qwen3Encoder::penultimate(cfg, &weights)?;
    report.loaded("text encoder", &weights);
    Ok(ZImagePromptEncoder { tokenizer, encoder })
}

/// Opens the transformer's weights (LoRAs applied) without building the
/// model: a folder's safetensors, or a single file in diffusers' names.
pub fn zimage_transformer_weights(
    source: &TransformerSource,
    loras: &[LoraSpec],
    cfg: &ZImageConfig,
) -> Result<Arc<dyn WeightSource>> {
    let base = match source {
        TransformerSource::Folder(dir) => components::folder_source(dir)?,
        TransformerSource::File { path, .. } => {
            lumina2_loader::open_zimage_transformer_file(path, cfg)?
        }
    };
    if loras.is_empty() {
        return Ok(base);
    }
    crate::lora::apply(base, loras, cfg)
}

pub(crate) fn load_transformer(
    sources: &ZImageSources,
    cfg: &ZImageConfig,
    (dtype, int8): (DType, bool),
    device: &Device,
    report: &mut LoadReport,
) -> Result<ZImageTransformer> {
    let source = zimage_transformer_weights(&sources.transformer, &sources.loras, cfg)?;
    let weights = Weights::new(source, dtype, device).with_int8_linears(int8);
    let model = ZImageTransformer::new(cfg, &weights)?;
    report.loaded("transformer", &weights);
    Ok(model)
}
