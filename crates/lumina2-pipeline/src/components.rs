//! Where each component comes from, and loading it.
//!
//! The pipeline asks the loader for weights and builds the models; nothing of
//! the model math lives here.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use lumina2_scheduler::SchedulerConfig;
use lumina2_text_encoder::{Gemma2Config, Gemma2Encoder, GemmaTokenizer, PromptEncoder};
use lumina2_transformer::{Config as TransformerConfig, Lumina2Transformer, WeightSource, Weights};
use lumina2_vae::{AutoencoderKL, AutoencoderKLConfig};
use lumina2_weights::UnscannedWeights;

use crate::error::{Error, Result};

/// Where the transformer's weights come from.
#[derive(Debug, Clone, PartialEq)]
pub enum TransformerSource {
    /// A diffusers component folder (`config.json` + safetensors, sharded or not).
    Folder(PathBuf),
    /// A single file (`.safetensors` in the original, ComfyUI or diffusers
    /// layout, ComfyUI's all-in-one checkpoint, the original `.pth`, or
    /// `.gguf`), with the folder (or file) of the `config.json` that
    /// describes it; `None`: Lumina-Image 2.0's config, its sizes taken
    /// from the file's tensors (original and ComfyUI layouts).
    File {
        /// The checkpoint.
        path: PathBuf,
        /// A folder holding `config.json`, or the JSON file itself.
        config: Option<PathBuf>,
    },
}

impl TransformerSource {
    /// The path of the `config.json` that describes the transformer, when
    /// there is one.
    pub fn config_path(&self) -> Option<&Path> {
        match self {
            TransformerSource::Folder(p) => Some(p),
            TransformerSource::File { config, .. } => config.as_deref(),
        }
    }

    /// The transformer's config: its `config.json`, or inferred from a
    /// single file's tensors.
    pub fn config(&self) -> Result<TransformerConfig> {
        match self {
            TransformerSource::File { path, config: None } => {
                let file: Arc<dyn WeightSource> = if is_safetensors(path) {
                    lumina2_loader::SingleFile::open(path)?.source().clone()
                } else if is_gguf(path) {
                    Arc::new(lumina2_loader::gguf::GgufFile::open(path).map_err(|e| {
                        lumina2_loader::Error::Unsupported {
                            path: path.clone(),
                            reason: e.to_string(),
                        }
                    })?)
                } else {
                    Arc::new(lumina2_loader::PthFile::open(path)?)
                };
                Ok(lumina2_loader::infer_config(file, path)?)
            }
            other => Ok(TransformerConfig::from_file(
                other.config_path().unwrap_or(Path::new("")),
            )?),
        }
    }
}

/// A LoRA to apply to the transformer, with its scale.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// The LoRA file (diffusers/PEFT or original/ComfyUI keys).
    pub path: PathBuf,
    /// Its strength (1.0 = as trained).
    pub scale: f64,
}

/// The files of every component of a Lumina2 pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineSources {
    /// The diffusion transformer.
    pub transformer: TransformerSource,
    /// LoRAs applied on top of the transformer, in order.
    pub loras: Vec<LoraSpec>,
    /// The Gemma-2 text encoder: a transformers folder, a GGUF file
    /// (llama.cpp's key names, as the community Gemma-2-2B quantisations),
    /// ComfyUI's text encoder file or its all-in-one checkpoint.
    pub text_encoder: PathBuf,
    /// `config.json` (or its folder) of a single-file text encoder; `None`:
    /// Gemma-2-2B's, sizes from the file (GGUF: its metadata).
    pub text_encoder_config: Option<PathBuf>,
    /// `tokenizer.json` or the folder that holds it, or a ComfyUI file with
    /// the SentencePiece model embedded (`spiece_model`).
    pub tokenizer: PathBuf,
    /// The VAE: a diffusers folder, a Flux VAE file in Black Forest Labs'
    /// keys (ComfyUI's `ae.safetensors`), or ComfyUI's all-in-one checkpoint.
    pub vae: PathBuf,
    /// `config.json` (or its folder) of a single-file VAE; `None`: the Flux
    /// VAE's, sizes from the file.
    pub vae_config: Option<PathBuf>,
    /// `scheduler_config.json`; `None`: Lumina-Image 2.0's (shift 6, no
    /// dynamic shifting).
    pub scheduler_config: Option<PathBuf>,
}

impl PipelineSources {
    /// The components of a diffusers pipeline folder (`model_index.json`,
    /// `transformer/`, `text_encoder/`, `tokenizer/`, `vae/`, `scheduler/`).
    pub fn from_pipeline_folder(path: impl AsRef<Path>) -> Result<Self> {
        let folder = lumina2_loader::PipelineFolder::open(path.as_ref())?;
        Ok(Self::from_folder(&folder))
    }

    /// The components of an opened pipeline folder (local or a Hub snapshot).
    pub fn from_folder(folder: &lumina2_loader::PipelineFolder) -> Self {
        Self {
            transformer: TransformerSource::Folder(folder.transformer_dir().to_path_buf()),
            loras: Vec::new(),
            text_encoder: folder.text_encoder_dir().to_path_buf(),
            text_encoder_config: None,
            tokenizer: folder.tokenizer_file().to_path_buf(),
            vae: folder.vae_dir().to_path_buf(),
            vae_config: None,
            scheduler_config: Some(folder.scheduler_config().to_path_buf()),
        }
    }

    /// Every component from one ComfyUI all-in-one checkpoint, configs those
    /// of Lumina-Image 2.0 with the sizes of the file's tensors, the
    /// tokenizer the one embedded, and Lumina-Image 2.0's scheduler.
    pub fn from_checkpoint(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = lumina2_loader::SingleFile::open(path)?;
        if file.layout() != lumina2_loader::SingleFileLayout::Checkpoint {
            return Err(lumina2_loader::Error::Unsupported {
                path: path.to_path_buf(),
                reason: format!(
                    "holds a {}, not an all-in-one checkpoint",
                    file.layout().describe()
                ),
            }
            .into());
        }
        Ok(Self {
            transformer: TransformerSource::File {
                path: path.to_path_buf(),
                config: None,
            },
            loras: Vec::new(),
            text_encoder: path.to_path_buf(),
            text_encoder_config: None,
            tokenizer: path.to_path_buf(),
            vae: path.to_path_buf(),
            vae_config: None,
            scheduler_config: None,
        })
    }

    /// The VAE's config: its folder's `config.json`, the one given for a
    /// single file, or the Flux VAE's with the file's sizes.
    pub fn vae_config(&self) -> Result<AutoencoderKLConfig> {
        vae_config(&self.vae, self.vae_config.as_deref())
    }
}

/// The config of the VAE at `vae`: its folder's `config.json`, `config`
/// for a single file, or the Flux VAE's with the file's sizes.
pub(crate) fn vae_config(vae: &Path, config: Option<&Path>) -> Result<AutoencoderKLConfig> {
    if vae.is_dir() {
        return Ok(AutoencoderKLConfig::from_file(vae)?);
    }
    match config {
        Some(c) => Ok(AutoencoderKLConfig::from_file(c)?),
        None => Ok(lumina2_loader::SingleFile::open(vae)?.flux_vae_config()?),
    }
}

/// Whether `path` names a safetensors file (by its extension).
pub(crate) fn is_safetensors(path: &Path) -> bool {
    path.is_file() && path.extension().is_some_and(|e| e == "safetensors")
}

/// The tokenizer: `tokenizer.json` (or its folder), or the SentencePiece
/// model embedded in a ComfyUI file.
pub(crate) fn load_tokenizer(path: &Path) -> Result<GemmaTokenizer> {
    if !is_safetensors(path) {
        return Ok(GemmaTokenizer::from_file(path)?);
    }
    let te = lumina2_loader::SingleFile::open(path)?.text_encoder()?;
    match te.spiece_model()? {
        Some(bytes) => tokenizer_from_spiece(&bytes, path),
        None => Err(lumina2_loader::Error::Unsupported {
            path: path.to_path_buf(),
            reason: "holds no tokenizer (`spiece_model`): give a tokenizer.json or its folder (--tokenizer)".into(),
        }
        .into()),
    }
}

/// Lumina-Image 2.0's `scheduler/scheduler_config.json`.
pub fn lumina2_scheduler_config() -> SchedulerConfig {
    SchedulerConfig {
        shift: 6.0,
        ..SchedulerConfig::default()
    }
}

pub(crate) fn read_scheduler_config(path: Option<&Path>) -> Result<SchedulerConfig> {
    match path {
        Some(p) => Ok(SchedulerConfig::from_file(p)?),
        None => Ok(lumina2_scheduler_config()),
    }
}

pub(crate) fn load_prompt_encoder(
    sources: &PipelineSources,
    dtype: DType,
    device: &Device,
    report: &mut LoadReport,
) -> Result<PromptEncoder> {
    let tokenizer = load_tokenizer(&sources.tokenizer)?;
    let path = &sources.text_encoder;
    let (cfg, weights) = if path.is_file() && is_gguf(path) {
        // llama.cpp's Gemma-2 GGUF: config from its metadata, linears quantised.
        let gguf = lumina2_loader::Gemma2Gguf::open(path)?;
        let cfg = match &sources.text_encoder_config {
            Some(c) => Gemma2Config::from_file(c)?,
            None => gguf.config()?,
        };
        (cfg, gguf.into_weights(dtype, device))
    } else if is_safetensors(path) {
        // ComfyUI's text encoder file or all-in-one checkpoint.
        let te = lumina2_loader::SingleFile::open(path)?.text_encoder()?;
        let cfg = match &sources.text_encoder_config {
            Some(c) => {
                let cfg = Gemma2Config::from_file(c)?;
                te.check(&cfg)?;
                cfg
            }
            None => te.config()?,
        };
        (cfg, Weights::new(te.weights(), dtype, device))
    } else {
        let cfg = Gemma2Config::from_file(path)?;
        let files = lumina2_text_encoder::safetensors_files(path)?;
        (cfg, Weights::from_safetensors(&files, dtype, device)?)
    };
    let encoder = Gemma2Encoder::penultimate(&cfg, &weights)?;
    report.loaded("text encoder", &weights);
    Ok(PromptEncoder::new(tokenizer, encoder))
}

/// The tokenizer from the bytes of a SentencePiece model (a ComfyUI file's
/// `spiece_model`), built as transformers' `GemmaTokenizer` builds it.
fn tokenizer_from_spiece(bytes: &[u8], path: &Path) -> Result<GemmaTokenizer> {
    let origin = format!("{}: spiece_model", path.display());
    Ok(GemmaTokenizer::from_sentencepiece(bytes, &origin)?)
}

/// Whether `path` names a GGUF file (by its extension).
pub(crate) fn is_gguf(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "gguf")
}

/// What loading the components found: warnings for the run's report, and
/// the weights used in place without being read ([`UnscannedWeights`]),
/// scanned only when a run's values stop being finite.
#[derive(Debug, Default)]
pub(crate) struct LoadReport {
    /// Warnings not yet handed to a run's result.
    pub(crate) warnings: Vec<String>,
    /// Per component, its weights not read at load.
    unscanned: Vec<(&'static str, UnscannedWeights)>,
}

impl LoadReport {
    /// Records `weights`' warnings and unscanned weights for `component`.
    pub(crate) fn loaded(&mut self, component: &'static str, weights: &Weights) {
        warn_non_finite(component, weights.non_finite_keys(), &mut self.warnings);
        // Entries of components since dropped (loaded again each run when
        // not resident) have nothing left to scan.
        self.unscanned.retain(|(_, u)| u.pending() > 0);
        let u = weights.unscanned();
        if u.pending() > 0 {
            self.unscanned.push((component, u));
        }
    }

    /// Scans every component's unscanned weights still in use and returns
    /// `component: key` for each one holding NaN or infinity.
    pub(crate) fn scan(&self) -> Vec<String> {
        self.unscanned
            .iter()
            .flat_map(|(c, u)| u.scan().into_iter().map(move |k| format!("{c}: {k}")))
            .collect()
    }

    /// `e` with, when it is [`Error::NonFinite`], the weights still in use
    /// that [`LoadReport::scan`] finds broken.
    pub(crate) fn name_broken(&self, e: Error) -> Error {
        match e {
            Error::NonFinite {
                step,
                steps,
                count,
                mut weights,
            } => {
                weights.extend(self.scan());
                Error::NonFinite {
                    step,
                    steps,
                    count,
                    weights,
                }
            }
            e => e,
        }
    }

    /// After an encode: when an embedding of a real token (`mask` 1; all
    /// tokens without a mask) is not finite, a warning naming the text
    /// encoder's weights that hold NaN or infinity, if any do (only then
    /// are its unscanned weights read).
    pub(crate) fn check_encoder_output(
        &mut self,
        embeds: &[(&candle_core::Tensor, Option<&candle_core::Tensor>)],
    ) -> Result<()> {
        let mut bad = false;
        for (e, mask) in embeds {
            bad |= match mask {
                None => crate::stages::count_non_finite(e)? > 0,
                Some(m) => non_finite_where_kept(e, m)?,
            };
        }
        if bad {
            let keys: Vec<String> = self
                .unscanned
                .iter()
                .filter(|(c, _)| *c == "text encoder")
                .flat_map(|(_, u)| u.scan())
                .collect();
            warn_non_finite("text encoder", keys, &mut self.warnings);
        }
        Ok(())
    }
}

/// Whether `[B, L, D]` `embeds` hold NaN or infinity at a position whose
/// `[B, L]` `mask` is not zero.
fn non_finite_where_kept(embeds: &candle_core::Tensor, mask: &candle_core::Tensor) -> Result<bool> {
    let (_, _, d) = embeds.dims3()?;
    let e = embeds
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let m = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(e.chunks(d.max(1))
        .zip(&m)
        .any(|(row, &keep)| keep != 0.0 && row.iter().any(|x| !x.is_finite())))
}

/// Adds a warning (and logs it) when a component's weights hold NaN or
/// infinite values: the run goes on, but its output is likely black or noise.
pub(crate) fn warn_non_finite(component: &str, keys: Vec<String>, warnings: &mut Vec<String>) {
    if keys.is_empty() {
        return;
    }
    let shown: Vec<&str> = keys.iter().take(5).map(String::as_str).collect();
    let more = if keys.len() > shown.len() {
        format!(" and {} more", keys.len() - shown.len())
    } else {
        String::new()
    };
    let w = format!(
        "the {component} weights hold NaN or infinite values in {} tensor(s): {}{more}; the output is likely broken",
        keys.len(),
        shown.join(", ")
    );
    tracing::warn!("{w}");
    warnings.push(w);
}

/// Opens the transformer's weights (LoRAs applied) without building the model.
pub fn transformer_weights(
    source: &TransformerSource,
    loras: &[LoraSpec],
    cfg: &TransformerConfig,
) -> Result<Arc<dyn WeightSource>> {
    let base: Arc<dyn WeightSource> = match source {
        TransformerSource::Folder(dir) => folder_source(dir)?,
        TransformerSource::File { path, .. } => lumina2_loader::open_transformer_file(path, cfg)?,
    };
    if loras.is_empty() {
        return Ok(base);
    }
    crate::lora::apply(base, loras, cfg)
}

/// The safetensors of a diffusers component folder (sharded or not), as one source.
pub(crate) fn folder_source(dir: &Path) -> Result<Arc<dyn WeightSource>> {
    let folder = lumina2_loader::ComponentFolder::open(dir)?;
    Ok(Arc::new(lumina2_weights::SafetensorsSource::open(
        folder.safetensors_files(),
    )?))
}

pub(crate) fn load_transformer(
    sources: &PipelineSources,
    cfg: &TransformerConfig,
    (dtype, int8): (DType, bool),
    device: &Device,
    report: &mut LoadReport,
) -> Result<Lumina2Transformer> {
    let source = transformer_weights(&sources.transformer, &sources.loras, cfg)?;
    let weights = Weights::new(source, dtype, device).with_int8_linears(int8);
    let model = Lumina2Transformer::new(cfg, &weights)?;
    report.loaded("transformer", &weights);
    Ok(model)
}

pub(crate) fn load_vae(
    path: &Path,
    cfg: &AutoencoderKLConfig,
    (dtype, tiling): (DType, bool),
    device: &Device,
    report: &mut LoadReport,
) -> Result<AutoencoderKL> {
    let weights = if is_safetensors(path) {
        // A BFL/ComfyUI VAE file or the all-in-one checkpoint, in diffusers' names.
        let source = lumina2_loader::SingleFile::open(path)?.vae()?;
        Weights::new(source, dtype, device)
    } else {
        // The same sharded-folder reader as every other component: shards
        // checked against their index, a key in two shards refused, only the
        // tensors the config names read, each after its declared shape.
        let folder = lumina2_loader::ComponentFolder::open(path)?;
        Weights::from_safetensors(folder.safetensors_files(), dtype, device)?
    };
    let mut vae = AutoencoderKL::new(cfg, &weights)?;
    if tiling {
        vae.enable_tiling();
    }
    report.loaded("VAE", &weights);
    Ok(vae)
}
