//! Writing ComfyUI's files: the all-in-one checkpoint and the split
//! transformer, text encoder and VAE files, in the layouts [`crate::comfy`]
//! reads (see there for the keys and where ComfyUI defines them).
//!
//! The parts come from a diffusers pipeline folder, a ComfyUI all-in-one
//! checkpoint, or one source per part ([`PipelineParts`]). Every tensor keeps
//! its stored float type (fp8 is widened to f32), so an unquantised
//! conversion is lossless; names change, and the VAE's mid-attention linear
//! weights `[C, C]` are stored as BFL's 1x1 convolutions `[C, C, 1, 1]` (the
//! same bytes). Tensors are read and written one at a time, every file is
//! written under a temporary name and the files are renamed into place only
//! once all of them are complete: a failure leaves nothing.
//!
//! What ComfyUI adds besides the weights:
//! - `text_encoders.gemma2_2b.logit_scale`: the scalar 4.6055 (f32) every
//!   CLIP-style text encoder wrapper holds (`comfy/sd1_clip.py`
//!   `SDClipModel.__init__`: `self.logit_scale =
//!   torch.nn.Parameter(torch.tensor(4.6055))`), saved with the checkpoint
//!   and unused by Lumina2;
//! - `spiece_model` (`text_encoders.spiece_model` in the checkpoint): the
//!   bytes of Gemma's SentencePiece `tokenizer.model` as a 1-D uint8 tensor,
//!   written only when the source has one (a pipeline folder's
//!   `tokenizer/tokenizer.model`, or a ComfyUI file's own): a
//!   `tokenizer.json` is not a SentencePiece model.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::DType;
use lumina2_weights::{SafetensorsSource, WeightSource};

use crate::bfl_vae::diffusers_key_to_bfl;
use crate::comfy::{
    CHECKPOINT_SPIECE_KEY, MAX_SPIECE_BYTES, SPIECE_KEY, TEXT_ENCODER_PREFIX, TRANSFORMER_PREFIX,
    VAE_PREFIX,
};
use crate::convert::{float_bytes, plan, ConvertError, ConvertReport, Out, Progress, Source};
use crate::gguf::{GgufWriteError, TempFile};
use crate::st_write::{write_safetensors_pending, StPlan};
use crate::{ComponentFolder, SingleFile, SingleFileLayout};

/// The logit scale key of the all-in-one checkpoint.
pub const LOGIT_SCALE_KEY: &str = "text_encoders.gemma2_2b.logit_scale";
/// The value ComfyUI's text encoder wrapper initialises it to.
pub const LOGIT_SCALE: f32 = 4.6055;

/// The split files, relative to the destination folder: ComfyUI's
/// `models/` folder layout, so the destination can be that folder.
pub const SPLIT_FILES: [&str; 3] = [
    "diffusion_models/lumina_2_model.safetensors",
    "text_encoders/gemma_2_2b.safetensors",
    "vae/ae.safetensors",
];

/// Which ComfyUI files to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComfyFormat {
    /// One `.safetensors` checkpoint with every part.
    AllInOne,
    /// A folder with the three split files ([`SPLIT_FILES`]).
    Split,
}

/// Where each part of a pipeline is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineParts {
    /// Anything `lumina2 convert` reads a transformer from.
    pub transformer: PathBuf,
    /// A diffusers pipeline or text encoder folder, or a ComfyUI file (the
    /// all-in-one checkpoint or a split text encoder).
    pub text_encoder: PathBuf,
    /// A diffusers pipeline or VAE folder, or a `.safetensors` VAE (BFL or
    /// diffusers keys) or the all-in-one checkpoint.
    pub vae: PathBuf,
    /// The SentencePiece model: a `tokenizer.model`, a folder holding one,
    /// or a ComfyUI file with `spiece_model`. `None`: the text encoder's
    /// own, when it is a ComfyUI file that has one.
    pub tokenizer: Option<PathBuf>,
}

impl PipelineParts {
    /// Every part from one source: a diffusers pipeline folder (the
    /// tokenizer is its `tokenizer/tokenizer.model`, when there is one) or a
    /// ComfyUI all-in-one checkpoint.
    pub fn from_source(path: &Path) -> Result<Self, ConvertError> {
        if path.join("model_index.json").is_file() {
            let spm = path.join("tokenizer").join("tokenizer.model");
            return Ok(Self {
                transformer: path.to_path_buf(),
                text_encoder: path.to_path_buf(),
                vae: path.to_path_buf(),
                tokenizer: spm.is_file().then_some(spm),
            });
        }
        let file = open_single(path)?;
        if file.layout() != SingleFileLayout::Checkpoint {
            return Err(ConvertError::Options(format!(
                "{}: holds a {}, not a whole pipeline: give the text encoder and the VAE \
                 (--text-encoder, --vae)",
                path.display(),
                file.layout().describe()
            )));
        }
        Ok(Self {
            transformer: path.to_path_buf(),
            text_encoder: path.to_path_buf(),
            vae: path.to_path_buf(),
            tokenizer: None,
        })
    }
}

pub(crate) fn open_single(path: &Path) -> Result<SingleFile, ConvertError> {
    SingleFile::open(path).map_err(|e| ConvertError::Source {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Where a tensor's bytes come from.
pub(crate) enum Data {
    /// One of the transformer plan's tensors.
    Transformer(usize),
    /// A stored tensor, by its key in `src`.
    Tensor(Arc<SafetensorsSource>, String),
    /// Bytes written as they are.
    Bytes(Vec<u8>),
}

pub(crate) struct Item {
    pub(crate) name: String,
    pub(crate) shape: Vec<usize>,
    pub(crate) dtype: DType,
    pub(crate) data: Data,
}

/// The float type a stored tensor is written as: its own, fp8 (listed as
/// U8) and other types widened to f32.
pub(crate) fn float_type(src: &SafetensorsSource, key: &str) -> (DType, Vec<usize>) {
    match src.tensor_info(key) {
        Some((d @ (DType::F16 | DType::BF16 | DType::F32), s)) => (d, s.to_vec()),
        Some((_, s)) => (DType::F32, s.to_vec()),
        None => (DType::F32, Vec::new()),
    }
}

/// A component folder (or a pipeline folder's `component/`) as one source.
pub(crate) fn open_folder(
    path: &Path,
    component: &str,
) -> Result<Arc<SafetensorsSource>, ConvertError> {
    let dir = if path.join("model_index.json").is_file() {
        path.join(component)
    } else {
        path.to_path_buf()
    };
    let err = |reason: String| ConvertError::Source {
        path: dir.clone(),
        reason,
    };
    let folder = ComponentFolder::open(&dir).map_err(|e| err(e.to_string()))?;
    Ok(Arc::new(
        SafetensorsSource::open(folder.safetensors_files()).map_err(|e| err(e.to_string()))?,
    ))
}

pub(crate) fn not_a_file(path: &Path, part: &str) -> ConvertError {
    ConvertError::Options(format!(
        "{}: a {part} is read from a diffusers folder or a .safetensors file",
        path.display()
    ))
}

pub(crate) fn is_safetensors(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
}

/// The Gemma-2 tensors in transformers' names (`model.` included), and the
/// embedded tokenizer of a ComfyUI file.
pub(crate) fn text_encoder_items(
    path: &Path,
) -> Result<(Vec<Item>, Option<Vec<u8>>), ConvertError> {
    if path.is_dir() {
        let st = open_folder(path, "text_encoder")?;
        let keys = st.keys();
        // transformers' `Gemma2Model` saves its keys without `model.`.
        let items: Vec<Item> = keys
            .iter()
            .map(|k| {
                let (dtype, shape) = float_type(&st, k);
                let name = if k.starts_with("model.") {
                    k.clone()
                } else {
                    format!("model.{k}")
                };
                Item {
                    name,
                    shape,
                    dtype,
                    data: Data::Tensor(st.clone(), k.clone()),
                }
            })
            .collect();
        if !items.iter().any(|i| i.name == "model.embed_tokens.weight") {
            return Err(ConvertError::Keys {
                path: path.to_path_buf(),
                reason: "not a Gemma-2 text encoder (no `embed_tokens.weight`)".into(),
            });
        }
        return Ok((items, None));
    }
    if !is_safetensors(path) {
        return Err(not_a_file(path, "text encoder"));
    }
    let file = open_single(path)?;
    let te = file.text_encoder().map_err(|e| ConvertError::Source {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let prefix = if file.layout() == SingleFileLayout::Checkpoint {
        TEXT_ENCODER_PREFIX
    } else {
        ""
    };
    let st = file.source().clone();
    let items = te
        .weights()
        .keys()
        .into_iter()
        .filter(|k| Some(k.as_str()) != te.spiece_key())
        .map(|k| {
            let key = format!("{prefix}{k}");
            let (dtype, shape) = float_type(&st, &key);
            Item {
                name: k,
                shape,
                dtype,
                data: Data::Tensor(st.clone(), key),
            }
        })
        .collect();
    let spiece = te.spiece_model().map_err(|e| ConvertError::Source {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok((items, spiece))
}

/// Diffusers `AutoencoderKL` tensors renamed to BFL's keys.
fn bfl_from_diffusers(path: &Path, st: &Arc<SafetensorsSource>) -> Result<Vec<Item>, ConvertError> {
    let keys = st.keys();
    let levels = keys
        .iter()
        .filter_map(|k| {
            k.strip_prefix("encoder.down_blocks.")?
                .split_once('.')?
                .0
                .parse::<usize>()
                .ok()
        })
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let mut unknown = Vec::new();
    let mut items = Vec::new();
    for k in keys {
        let Some((name, unsqueeze)) = diffusers_key_to_bfl(&k, levels) else {
            unknown.push(k);
            continue;
        };
        let (dtype, mut shape) = float_type(st, &k);
        if unsqueeze && shape.len() == 2 {
            shape.extend([1, 1]);
        }
        items.push(Item {
            name,
            shape,
            dtype,
            data: Data::Tensor(st.clone(), k),
        });
    }
    if levels == 0 || !unknown.is_empty() {
        return Err(ConvertError::Keys {
            path: path.to_path_buf(),
            reason: format!(
                "not the keys of a Flux VAE in diffusers' names (no `encoder.down_blocks.*`, \
                 or keys with no BFL name: {unknown:?})"
            ),
        });
    }
    Ok(items)
}

/// The VAE in BFL's keys (no prefix).
fn vae_items(path: &Path) -> Result<Vec<Item>, ConvertError> {
    if path.is_dir() {
        let st = open_folder(path, "vae")?;
        return bfl_from_diffusers(path, &st);
    }
    if !is_safetensors(path) {
        return Err(not_a_file(path, "VAE"));
    }
    let file = open_single(path)?;
    // Every key of the VAE must be one the loader maps.
    file.vae().map_err(|e| ConvertError::Source {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let st = file.source().clone();
    let prefix = match file.layout() {
        SingleFileLayout::DiffusersVae => return bfl_from_diffusers(path, &st),
        SingleFileLayout::Checkpoint => VAE_PREFIX,
        _ => "",
    };
    Ok(st
        .keys()
        .into_iter()
        .filter_map(|key| {
            let name = key.strip_prefix(prefix)?.to_string();
            let (dtype, shape) = float_type(&st, &key);
            Some(Item {
                name,
                shape,
                dtype,
                data: Data::Tensor(st.clone(), key),
            })
        })
        .collect())
}

/// The SentencePiece model's bytes from a `tokenizer.model`, a folder
/// holding one, or a ComfyUI file's `spiece_model`.
pub(crate) fn read_tokenizer(path: &Path) -> Result<Vec<u8>, ConvertError> {
    let err = |reason: String| ConvertError::Source {
        path: path.to_path_buf(),
        reason,
    };
    if is_safetensors(path) {
        let te = open_single(path)?
            .text_encoder()
            .map_err(|e| err(e.to_string()))?;
        return te
            .spiece_model()
            .map_err(|e| err(e.to_string()))?
            .ok_or_else(|| {
                err(format!(
                    "no `{SPIECE_KEY}` (embedded tokenizer) in the file"
                ))
            });
    }
    let file = if path.is_dir() {
        path.join("tokenizer.model")
    } else {
        path.to_path_buf()
    };
    let bytes = lumina2_weights::fs::read_bounded(&file, MAX_SPIECE_BYTES as u64).map_err(|e| {
        ConvertError::Source {
            path: file.clone(),
            reason: format!("the SentencePiece model: {e}"),
        }
    })?;
    if bytes.is_empty() {
        return Err(ConvertError::Source {
            path: file,
            reason: "empty, not a SentencePiece model".into(),
        });
    }
    Ok(bytes)
}

fn prefixed(prefix: &str, items: Vec<Item>) -> Vec<Item> {
    items
        .into_iter()
        .map(|mut i| {
            i.name = format!("{prefix}{}", i.name);
            i
        })
        .collect()
}

/// The bytes of one item.
pub(crate) fn item_bytes(
    item: &Item,
    transformer: &Source,
    outs: &[Out],
) -> Result<Vec<u8>, String> {
    match &item.data {
        Data::Transformer(i) => {
            let o = outs.get(*i).ok_or("transformer tensor out of range")?;
            float_bytes(&transformer.piece(&o.piece)?, item.dtype)
        }
        Data::Tensor(src, key) => {
            let t = src.tensor(key).map_err(|e| e.to_string())?;
            float_bytes(&t, item.dtype)
        }
        Data::Bytes(b) => Ok(b.clone()),
    }
}

/// Writes the ComfyUI files of `parts` to `dst`: a `.safetensors` file for
/// [`ComfyFormat::AllInOne`], a folder (created if needed) for
/// [`ComfyFormat::Split`]. `progress` is called before each tensor and at
/// the end, as [`crate::convert_transformer`] does.
pub fn convert_to_comfy(
    parts: &PipelineParts,
    dst: &Path,
    format: ComfyFormat,
    progress: Progress<'_>,
) -> Result<ConvertReport, ConvertError> {
    let source = Source::open(&parts.transformer)?;
    let outs = plan(&source, false)?;
    let transformer: Vec<Item> = outs
        .iter()
        .enumerate()
        .map(|(i, o)| Item {
            name: o.name.clone(),
            shape: o.shape.clone(),
            dtype: o.dtype,
            data: Data::Transformer(i),
        })
        .collect();
    let (text_encoder, own_spiece) = text_encoder_items(&parts.text_encoder)?;
    let vae = vae_items(&parts.vae)?;
    let spiece = match &parts.tokenizer {
        Some(p) => Some(read_tokenizer(p)?),
        None => own_spiece,
    };
    let mut report = ConvertReport::default();
    if spiece.is_none() {
        report.notes.push(
            "no SentencePiece tokenizer.model in the source: the text encoder carries no \
             spiece_model (give one with --tokenizer; ComfyUI needs it to load the file)"
                .into(),
        );
    }
    let spiece_item = |key: &str, b: Vec<u8>| Item {
        name: key.to_string(),
        shape: vec![b.len()],
        dtype: DType::U8,
        data: Data::Bytes(b),
    };
    let files: Vec<(PathBuf, Vec<Item>)> = match format {
        ComfyFormat::AllInOne => {
            let mut items = prefixed(TRANSFORMER_PREFIX, transformer);
            items.extend(prefixed(TEXT_ENCODER_PREFIX, text_encoder));
            items.push(Item {
                name: LOGIT_SCALE_KEY.into(),
                shape: Vec::new(),
                dtype: DType::F32,
                data: Data::Bytes(LOGIT_SCALE.to_le_bytes().to_vec()),
            });
            if let Some(b) = spiece {
                items.push(spiece_item(CHECKPOINT_SPIECE_KEY, b));
            }
            items.extend(prefixed(VAE_PREFIX, vae));
            vec![(dst.to_path_buf(), items)]
        }
        ComfyFormat::Split => {
            let mut te = text_encoder;
            if let Some(b) = spiece {
                te.push(spiece_item(SPIECE_KEY, b));
            }
            SPLIT_FILES
                .iter()
                .map(|f| dst.join(f))
                .zip([transformer, te, vae])
                .collect()
        }
    };
    let total: usize = files.iter().map(|(_, items)| items.len()).sum();
    report.tensors = total;

    // Folders this call makes, removed again (when empty) on failure.
    let mut created = Vec::new();
    let result = (|| {
        let mut pending: Vec<TempFile> = Vec::new();
        let mut done = 0usize;
        for (path, items) in &files {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                let mut missing: Vec<PathBuf> = dir
                    .ancestors()
                    .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
                    .map(Path::to_path_buf)
                    .collect();
                std::fs::create_dir_all(dir).map_err(|source| GgufWriteError::Io {
                    path: dir.to_path_buf(),
                    source,
                })?;
                missing.reverse();
                created.extend(missing);
            }
            let plans: Vec<StPlan> = items
                .iter()
                .map(|i| StPlan {
                    name: i.name.clone(),
                    shape: i.shape.clone(),
                    dtype: i.dtype,
                })
                .collect();
            pending.push(write_safetensors_pending(
                path,
                &[("format", "pt")],
                &plans,
                |i| {
                    progress(done, total)?;
                    done += 1;
                    item_bytes(&items[i], &source, &outs)
                },
            )?);
        }
        progress(total, total).map_err(ConvertError::Options)?;
        // Every file is complete: put them in place together.
        for ((path, _), guard) in files.iter().zip(pending) {
            guard.commit().map_err(|source| GgufWriteError::Io {
                path: path.clone(),
                source,
            })?;
        }
        Ok::<(), ConvertError>(())
    })();
    if let Err(e) = result {
        for dir in created.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
        return Err(e);
    }
    for (path, items) in &files {
        report.files.push(path.clone());
        for i in items {
            *report
                .by_type
                .entry(format!("{:?}", i.dtype).to_uppercase())
                .or_default() += 1;
        }
    }
    Ok(report)
}
