//! Where each Z-Image component comes from, and loading it.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use lumina2_scheduler::SchedulerConfig;
use lumina2_text_encoder::{ChatTokenizer, Qwen3Config, Qwen3Encoder};
use lumina2_transformer::{Weights, ZImageConfig, ZImageTransformer};

use crate::components::LoadReport;
use crate::error::Result;

/// The files of every component of a Z-Image pipeline (diffusers' folder
/// layout: each a component folder).
#[derive(Debug, Clone, PartialEq)]
pub struct ZImageSources {
    /// `transformer/`: `ZImageTransformer2DModel`'s `config.json` and safetensors.
    pub transformer: PathBuf,
    /// `text_encoder/`: the Qwen3 model (`config.json` and safetensors).
    pub text_encoder: PathBuf,
    /// `tokenizer/`: `tokenizer.json` and `tokenizer_config.json` with the
    /// chat template (or `chat_template.jinja` beside them).
    pub tokenizer: PathBuf,
    /// `vae/`: the autoencoder (`config.json` and safetensors).
    pub vae: PathBuf,
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
            transformer: folder.transformer_dir(),
            text_encoder: folder.text_encoder_dir(),
            tokenizer: folder.tokenizer_dir(),
            vae: folder.vae_dir(),
            scheduler_config: folder.scheduler_config(),
        }
    }

    /// The transformer's configuration.
    pub fn transformer_config(&self) -> Result<ZImageConfig> {
        Ok(ZImageConfig::from_file(&self.transformer)?)
    }

    /// The text encoder's configuration.
    pub fn text_encoder_config(&self) -> Result<Qwen3Config> {
        Ok(Qwen3Config::from_file(&self.text_encoder)?)
    }

    /// The scheduler's configuration.
    pub fn scheduler(&self) -> Result<SchedulerConfig> {
        Ok(SchedulerConfig::from_file(&self.scheduler_config)?)
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
    let tokenizer = ChatTokenizer::from_folder(&sources.tokenizer)?;
    let folder = lumina2_loader::ComponentFolder::open(&sources.text_encoder)?;
    let weights = Weights::from_safetensors(folder.safetensors_files(), dtype, device)?;
    let encoder = Qwen3Encoder::penultimate(cfg, &weights)?;
    report.loaded("text encoder", &weights);
    Ok(ZImagePromptEncoder { tokenizer, encoder })
}

pub(crate) fn load_transformer(
    sources: &ZImageSources,
    cfg: &ZImageConfig,
    dtype: DType,
    device: &Device,
    report: &mut LoadReport,
) -> Result<ZImageTransformer> {
    let folder = lumina2_loader::ComponentFolder::open(&sources.transformer)?;
    let weights = Weights::from_safetensors(folder.safetensors_files(), dtype, device)?;
    let model = ZImageTransformer::new(cfg, &weights)?;
    report.loaded("transformer", &weights);
    Ok(model)
}
