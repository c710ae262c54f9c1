//! Converting a Lumina2 transformer checkpoint between layouts: a diffusers
//! folder (or its transformer folder), the original single file
//! (Alpha-VLLM keys, as ComfyUI and `from_single_file` read them), and GGUF
//! (original keys, as ComfyUI-GGUF's `tools/convert.py` writes them),
//! optionally quantised.
//!
//! Tensors are read, renamed (original `qkv` split into diffusers' `to_q`,
//! `to_k`, `to_v` rows, or fused back) and written one at a time, so memory
//! holds one tensor, not the model. Every file is written under a temporary
//! name and renamed into place when complete: a failure leaves nothing, and
//! an existing destination untouched.
//!
//! GGUF files follow ComfyUI-GGUF: `general.architecture` = `lumina2`,
//! `general.quantization_version` = 2, `general.file_type`; with
//! `--quantize`, 1-D tensors and tensors of at most 1024 elements stay F32
//! (`QUANTIZATION_THRESHOLD`), and tensors whose rows are not whole blocks
//! fall back to F16, as `convert.py` does. Without it, each tensor keeps its
//! own float type (BF16 1-D and small tensors become F32, as there), so a
//! round trip is lossless.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Tensor};
pub use lumina2_transformer::Config;
use lumina2_transformer::{weight_shapes, WeightSource};

use crate::gguf::{
    quantize, write_gguf, GgmlType, GgufFile, GgufWriteError, MetadataValue, TempFile, TensorPlan,
};
use crate::original::{detect_layout, original_key_to_diffusers, original_weight_keys};
use crate::st_write::{write_safetensors, StPlan};
use crate::{ComponentFolder, PthFile, TransformerLayout};

/// ComfyUI-GGUF's `QUANTIZATION_THRESHOLD`: tensors this small stay F32.
pub const QUANTIZATION_THRESHOLD: usize = 1024;

pub(crate) const COMFY_PREFIX: &str = "model.diffusion_model.";

/// The layout to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvertFormat {
    /// A diffusers transformer folder: `config.json` and
    /// `diffusion_pytorch_model.safetensors` (inside `transformer/` when the
    /// destination is a pipeline folder).
    Diffusers,
    /// One `.safetensors` file with the original Alpha-VLLM keys.
    Original,
    /// One GGUF file with the original keys.
    Gguf,
}

impl ConvertFormat {
    /// The format a destination's name implies: `.gguf`, `.safetensors`,
    /// else a folder.
    pub fn from_destination(dst: &Path) -> Self {
        match dst
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("gguf") => Self::Gguf,
            Some("safetensors") => Self::Original,
            _ => Self::Diffusers,
        }
    }
}

/// What to convert to.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// The layout to write.
    pub format: ConvertFormat,
    /// GGUF only: the block type of the large 2-D+ tensors.
    pub quantize: Option<GgmlType>,
    /// The model's config, for writing a diffusers folder from a single
    /// file (whose shapes do not say everything, e.g. the RoPE axes). Without
    /// it, the source folder's `config.json` is copied, or the config is
    /// derived from the shapes with the released model's other settings.
    pub config: Option<Config>,
}

/// Why a conversion failed.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The source could not be opened or read.
    #[error("{path}: {reason}")]
    Source {
        /// The source.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The source's keys are not those of a Lumina2 transformer.
    #[error("{path}: {reason}")]
    Keys {
        /// The source.
        path: PathBuf,
        /// Which keys.
        reason: String,
    },
    /// Options that do not fit together.
    #[error("{0}")]
    Options(String),
    /// An embedded or given tokenizer that cannot be read (the message
    /// names its file, and its key when it is a tensor).
    #[error("{0}")]
    Tokenizer(String),
    /// Writing failed (nothing was left behind).
    #[error(transparent)]
    Write(#[from] GgufWriteError),
}

/// What a conversion wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConvertReport {
    /// The files written.
    pub files: Vec<PathBuf>,
    /// Tensors written.
    pub tensors: usize,
    /// Tensors per storage type (`F32`, `BF16`, `Q4_K`, ...).
    pub by_type: BTreeMap<String, usize>,
    /// What the user should know about the output (such as a part the
    /// source did not have).
    pub notes: Vec<String>,
}

/// Where an output tensor comes from.
#[derive(Debug, Clone)]
pub(crate) enum Piece {
    Key(String),
    /// Rows `start..start + len` of a key (one part of a fused `qkv`).
    Rows(String, usize, usize),
    /// Keys concatenated along rows (`to_q`, `to_k`, `to_v` into `qkv`).
    Cat(Vec<String>),
}

pub(crate) struct Out {
    pub(crate) name: String,
    pub(crate) shape: Vec<usize>,
    pub(crate) dtype: DType,
    pub(crate) piece: Piece,
}

/// An opened source: its raw keys (ComfyUI prefix kept in `prefix`).
pub(crate) struct Source {
    path: PathBuf,
    raw: Arc<dyn WeightSource>,
    gguf: Option<Arc<GgufFile>>,
    /// Set for safetensors sources: dtypes come from the header.
    st: Option<Arc<lumina2_weights::SafetensorsSource>>,
    prefix: &'static str,
    layout: TransformerLayout,
    config_json: Option<PathBuf>,
}

impl Source {
    fn err(&self, reason: impl std::fmt::Display) -> ConvertError {
        ConvertError::Source {
            path: self.path.clone(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn open(path: &Path) -> Result<Self, ConvertError> {
        let err = |reason: String| ConvertError::Source {
            path: path.to_path_buf(),
            reason,
        };
        let mut gguf = None;
        let mut st = None;
        let mut config_json = None;
        let raw: Arc<dyn WeightSource> = if path.is_dir() {
            let dir = if path.join("model_index.json").is_file() {
                path.join("transformer")
            } else {
                path.to_path_buf()
            };
            let folder = ComponentFolder::open(&dir).map_err(|e| err(e.to_string()))?;
            let cfg = folder.config_path();
            config_json = cfg.is_file().then_some(cfg);
            let s = Arc::new(
                lumina2_weights::SafetensorsSource::open(folder.safetensors_files())
                    .map_err(|e| err(e.to_string()))?,
            );
            st = Some(s.clone());
            s
        } else {
            let ext = path
                .extension()
                .and_then(|e| e.to_str())
                .unwrap_or("")
                .to_ascii_lowercase();
            match ext.as_str() {
                "gguf" => {
                    let g = Arc::new(GgufFile::open(path).map_err(|e| err(e.to_string()))?);
                    gguf = Some(g.clone());
                    g
                }
                "pth" | "pt" | "bin" => {
                    Arc::new(PthFile::open(path).map_err(|e| err(e.to_string()))?)
                }
                "safetensors" => {
                    let s = Arc::new(
                        lumina2_weights::SafetensorsSource::open(&[path])
                            .map_err(|e| err(e.to_string()))?,
                    );
                    st = Some(s.clone());
                    s
                }
                _ => {
                    return Err(err(format!(
                        "unknown checkpoint extension `.{ext}` (expected a folder, .safetensors, .pth or .gguf)"
                    )))
                }
            }
        };
        let keys = raw.keys();
        let layout = detect_layout(keys.iter().map(String::as_str)).ok_or_else(|| {
            err("not a Lumina2 transformer checkpoint (no caption embedder key in diffusers, original or ComfyUI layout)".into())
        })?;
        let prefix = if layout == TransformerLayout::ComfyUi {
            COMFY_PREFIX
        } else {
            ""
        };
        Ok(Self {
            path: path.to_path_buf(),
            raw,
            gguf,
            st,
            prefix,
            layout,
            config_json,
        })
    }

    /// Keys without the ComfyUI prefix (other keys of an all-in-one file,
    /// such as the VAE's, are not the transformer's and are left out).
    fn keys(&self) -> Vec<String> {
        self.raw
            .keys()
            .into_iter()
            .filter_map(|k| k.strip_prefix(self.prefix).map(str::to_string))
            .collect()
    }

    fn shape(&self, key: &str) -> Result<Vec<usize>, ConvertError> {
        self.raw
            .shape(&format!("{}{key}", self.prefix))
            .ok_or_else(|| self.err(format!("no tensor `{key}`")))
    }

    /// The stored float type of a key (a quantised GGUF tensor reads as F32).
    fn dtype(&self, key: &str) -> Result<DType, ConvertError> {
        let full = format!("{}{key}", self.prefix);
        if let Some(g) = &self.gguf {
            let t = g.tensor_info(&full).map_err(|e| self.err(e))?;
            return Ok(match t.ggml_type {
                GgmlType::F16 => DType::F16,
                GgmlType::BF16 => DType::BF16,
                _ => DType::F32,
            });
        }
        if let Some((d, _)) = self.st.as_ref().and_then(|s| s.tensor_info(&full)) {
            // fp8 (listed as U8) is widened: to f32 like every other type.
            return Ok(match d {
                DType::F16 | DType::BF16 => d,
                _ => DType::F32,
            });
        }
        let t = self.raw.tensor(&full).map_err(|e| self.err(e))?;
        Ok(match t.dtype() {
            d @ (DType::F16 | DType::BF16) => d,
            _ => DType::F32,
        })
    }

    fn tensor(&self, key: &str) -> Result<Tensor, String> {
        self.raw
            .tensor(&format!("{}{key}", self.prefix))
            .map_err(|e| e.to_string())
    }

    /// Takes `config.json` from `path` (checked against the shapes by
    /// [`diffusers_config`]) instead of the source folder's own.
    pub(crate) fn set_config_json(&mut self, path: PathBuf) {
        self.config_json = Some(path);
    }

    pub(crate) fn piece(&self, p: &Piece) -> Result<Tensor, String> {
        let s = |e: candle_core::Error| e.to_string();
        match p {
            Piece::Key(k) => self.tensor(k),
            Piece::Rows(k, start, len) => self.tensor(k)?.narrow(0, *start, *len).map_err(s),
            Piece::Cat(keys) => {
                let parts = keys
                    .iter()
                    .map(|k| self.tensor(k))
                    .collect::<Result<Vec<_>, _>>()?;
                let dtype = parts.first().map_or(DType::F32, Tensor::dtype);
                let parts = if parts.iter().all(|t| t.dtype() == dtype) {
                    parts
                } else {
                    parts
                        .iter()
                        .map(|t| t.to_dtype(DType::F32))
                        .collect::<candle_core::Result<_>>()
                        .map_err(s)?
                };
                Tensor::cat(&parts, 0).map_err(s)
            }
        }
    }
}

/// The number of blocks of a stack (`layers`, `context_refiner`) in diffusers keys.
fn count_blocks(keys: &BTreeSet<String>, stack: &str) -> usize {
    keys.iter()
        .filter_map(|k| {
            k.strip_prefix(stack)?
                .strip_prefix('.')?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .map(|i| i + 1)
        .max()
        .unwrap_or(0)
}

/// The output tensors, named for `to`: original names for files, diffusers
/// names for a folder.
pub(crate) fn plan(src: &Source, to_diffusers: bool) -> Result<Vec<Out>, ConvertError> {
    let keys = src.keys();
    let mut out = Vec::new();
    let from_diffusers = src.layout == TransformerLayout::Diffusers;
    let keys_err = |reason: String| ConvertError::Keys {
        path: src.path.clone(),
        reason,
    };
    if from_diffusers == to_diffusers {
        for k in keys {
            let shape = src.shape(&k)?;
            let dtype = src.dtype(&k)?;
            out.push(Out {
                name: k.clone(),
                shape,
                dtype,
                piece: Piece::Key(k),
            });
        }
        return Ok(out);
    }
    if to_diffusers {
        // Original to diffusers, as `convert_lumina2_to_diffusers` (the
        // model's unused `norm_final` dropped; `qkv` split by its shape:
        // the query has as many rows as the model is wide).
        for k in keys {
            if k == "norm_final.weight" {
                continue;
            }
            let shape = src.shape(&k)?;
            let dtype = src.dtype(&k)?;
            let d = original_key_to_diffusers(&k);
            if d.contains("qkv") {
                let (rows, width) = match shape.as_slice() {
                    [r, w] if r > w && (r - w) % 2 == 0 => (*r, *w),
                    _ => {
                        return Err(keys_err(format!(
                            "`{k}` of shape {shape:?} is not a fused q, k, v projection"
                        )))
                    }
                };
                let kv = (rows - width) / 2;
                for (part, start, len) in [
                    ("to_q", 0, width),
                    ("to_k", width, kv),
                    ("to_v", width + kv, kv),
                ] {
                    out.push(Out {
                        name: d.replace("qkv", part),
                        shape: vec![len, width],
                        dtype,
                        piece: Piece::Rows(k.clone(), start, len),
                    });
                }
            } else {
                out.push(Out {
                    name: d,
                    shape,
                    dtype,
                    piece: Piece::Key(k),
                });
            }
        }
        return Ok(out);
    }
    // Diffusers to original: the original keys of a model with as many
    // blocks, each mapped to the diffusers keys it is made of.
    let have: BTreeSet<String> = keys.into_iter().collect();
    let shape_cfg = Config {
        num_layers: count_blocks(&have, "layers"),
        num_refiner_layers: count_blocks(&have, "context_refiner"),
        ..Config::default()
    };
    let mut used = BTreeSet::new();
    let mut missing = Vec::new();
    for k in original_weight_keys(&shape_cfg) {
        let d = original_key_to_diffusers(&k);
        let parts: Vec<String> = if d.contains("qkv") {
            ["to_q", "to_k", "to_v"]
                .map(|p| d.replace("qkv", p))
                .to_vec()
        } else {
            vec![d]
        };
        let absent: Vec<&String> = parts.iter().filter(|p| !have.contains(*p)).collect();
        if !absent.is_empty() {
            missing.extend(absent.into_iter().cloned());
            continue;
        }
        let shapes = parts
            .iter()
            .map(|p| src.shape(p))
            .collect::<Result<Vec<_>, _>>()?;
        let dtype = src.dtype(&parts[0])?;
        let mut shape = shapes[0].clone();
        if let Some(rows) = shape.first_mut() {
            *rows = shapes.iter().map(|s| s.first().copied().unwrap_or(0)).sum();
        }
        used.extend(parts.iter().cloned());
        let piece = if parts.len() == 1 {
            Piece::Key(parts[0].clone())
        } else {
            Piece::Cat(parts)
        };
        out.push(Out {
            name: k,
            shape,
            dtype,
            piece,
        });
    }
    let unexpected: Vec<&String> = have.difference(&used).collect();
    if !missing.is_empty() || !unexpected.is_empty() {
        return Err(keys_err(format!(
            "not the keys of a diffusers Lumina2 transformer: missing {missing:?}, unexpected {unexpected:?}"
        )));
    }
    Ok(out)
}

/// The bytes of `t` as `dtype`, little-endian.
pub(crate) fn float_bytes(t: &Tensor, dtype: DType) -> Result<Vec<u8>, String> {
    let s = |e: candle_core::Error| e.to_string();
    let t = t.to_dtype(dtype).and_then(|t| t.flatten_all()).map_err(s)?;
    Ok(match dtype {
        DType::F16 => t
            .to_vec1::<half::f16>()
            .map_err(s)?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()
            .map_err(s)?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        _ => t
            .to_vec1::<f32>()
            .map_err(s)?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
    })
}

/// The GGUF type of one tensor (see the module documentation).
fn gguf_type(o: &Out, quantize: Option<GgmlType>, raw: Option<GgmlType>) -> GgmlType {
    let n: usize = o.shape.iter().product();
    let small = o.shape.len() <= 1 || n <= QUANTIZATION_THRESHOLD;
    match quantize {
        Some(_) if small => GgmlType::F32,
        Some(q) => {
            if o.shape.last().is_some_and(|d| d % q.block_size() == 0) {
                q
            } else {
                GgmlType::F16
            }
        }
        None => match (raw, o.dtype) {
            // A GGUF tensor copied as stored.
            (Some(t), _) => t,
            (None, DType::F16) => GgmlType::F16,
            (None, DType::BF16) if !small => GgmlType::BF16,
            _ => GgmlType::F32,
        },
    }
}

/// `general.file_type` (llama.cpp's `llama_ftype`) of a file whose large
/// tensors are `ty`.
fn file_type(ty: GgmlType) -> u32 {
    match ty {
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        GgmlType::Q8_0 => 7,
        GgmlType::Q5_0 => 8,
        GgmlType::Q5_1 => 9,
        GgmlType::Q4_K => 14,
        GgmlType::Q5_K => 16,
        GgmlType::Q6_K => 18,
        GgmlType::BF16 => 32,
        _ => 0,
    }
}

/// A progress hook: called with (tensors done, total) before each tensor and
/// at the end; an `Err` stops the conversion (nothing is left behind).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize) -> Result<(), String>;

/// Converts the transformer at `src` (a diffusers pipeline or transformer
/// folder, or a single `.safetensors`, `.pth` or `.gguf` file in any layout)
/// to `dst` in `opts.format`.
pub fn convert_transformer(
    src: &Path,
    dst: &Path,
    opts: &ConvertOptions,
    progress: Progress<'_>,
) -> Result<ConvertReport, ConvertError> {
    if opts.quantize.is_some() && opts.format != ConvertFormat::Gguf {
        return Err(ConvertError::Options(
            "--quantize needs the GGUF format (a .gguf destination or --format gguf)".into(),
        ));
    }
    if let Some(q) = opts.quantize {
        if !crate::gguf::QUANTIZE_TYPES.contains(&q) {
            return Err(ConvertError::Options(format!("cannot quantise to {q}")));
        }
    }
    let source = Source::open(src)?;
    let outs = plan(&source, opts.format == ConvertFormat::Diffusers)?;
    let total = outs.len();
    let mut report = ConvertReport {
        tensors: total,
        ..Default::default()
    };
    match opts.format {
        ConvertFormat::Gguf => {
            let raw_types: Vec<Option<GgmlType>> = outs
                .iter()
                .map(|o| match (&source.gguf, &o.piece) {
                    (Some(g), Piece::Key(k)) => g
                        .tensor_info(&format!("{}{k}", source.prefix))
                        .ok()
                        .map(|t| t.ggml_type),
                    _ => None,
                })
                .collect();
            let plans: Vec<TensorPlan> = outs
                .iter()
                .zip(&raw_types)
                .map(|(o, raw)| TensorPlan {
                    name: o.name.clone(),
                    shape: o.shape.clone(),
                    ggml_type: gguf_type(o, opts.quantize, *raw),
                })
                .collect();
            let main = opts.quantize.unwrap_or_else(|| {
                // The type of most elements, as convert.py picks `main_dtype`.
                let mut by: BTreeMap<u32, usize> = BTreeMap::new();
                for p in &plans {
                    *by.entry(p.ggml_type.id()).or_default() += p.shape.iter().product::<usize>();
                }
                by.into_iter()
                    .max_by_key(|&(_, n)| n)
                    .and_then(|(id, _)| GgmlType::from_id(id))
                    .unwrap_or(GgmlType::F32)
            });
            let metadata = vec![
                (
                    "general.architecture".to_string(),
                    MetadataValue::String("lumina2".into()),
                ),
                (
                    "general.quantization_version".to_string(),
                    MetadataValue::U32(2),
                ),
                (
                    "general.file_type".to_string(),
                    MetadataValue::U32(file_type(main)),
                ),
            ];
            write_gguf(dst, &metadata, &plans, |i| {
                progress(i, total)?;
                let (o, p) = (&outs[i], &plans[i]);
                if raw_types[i] == Some(p.ggml_type) {
                    if let (Some(g), Piece::Key(k)) = (&source.gguf, &o.piece) {
                        return g
                            .tensor_data(&format!("{}{k}", source.prefix))
                            .map(<[u8]>::to_vec)
                            .map_err(|e| e.to_string());
                    }
                }
                let t = source.piece(&o.piece)?;
                match p.ggml_type {
                    GgmlType::F32 => float_bytes(&t, DType::F32),
                    GgmlType::F16 => float_bytes(&t, DType::F16),
                    GgmlType::BF16 => float_bytes(&t, DType::BF16),
                    q => {
                        let x: Vec<f32> = t
                            .to_dtype(DType::F32)
                            .and_then(|t| t.flatten_all())
                            .and_then(|t| t.to_vec1())
                            .map_err(|e| e.to_string())?;
                        quantize(q, &x).map_err(|e| e.to_string())
                    }
                }
            })?;
            for p in &plans {
                *report.by_type.entry(p.ggml_type.to_string()).or_default() += 1;
            }
            report.files.push(dst.to_path_buf());
        }
        ConvertFormat::Original => {
            write_st(&source, &outs, dst, progress, &mut report)?;
        }
        ConvertFormat::Diffusers => {
            let dir = if dst.join("model_index.json").is_file() {
                dst.join("transformer")
            } else {
                dst.to_path_buf()
            };
            let config = diffusers_config(&source, &outs, opts)?;
            let created = !dir.exists();
            let io = |source| GgufWriteError::Io {
                path: dir.clone(),
                source,
            };
            std::fs::create_dir_all(&dir).map_err(io)?;
            let result = (|| {
                write_st(
                    &source,
                    &outs,
                    &dir.join("diffusion_pytorch_model.safetensors"),
                    progress,
                    &mut report,
                )?;
                let cfg_path = dir.join("config.json");
                let cfg_io = |source| GgufWriteError::Io {
                    path: cfg_path.clone(),
                    source,
                };
                let (guard, file) = TempFile::create(&cfg_path).map_err(cfg_io)?;
                std::io::Write::write_all(&mut &file, &config)
                    .and_then(|()| file.sync_all())
                    .map_err(cfg_io)?;
                drop(file);
                guard.commit().map_err(cfg_io)?;
                report.files.push(cfg_path);
                Ok::<(), ConvertError>(())
            })();
            if result.is_err() && created {
                // Only a folder this call made, and only if nothing is in it.
                let _ = std::fs::remove_dir(&dir);
            }
            result?;
        }
    }
    progress(total, total).map_err(ConvertError::Options)?;
    Ok(report)
}

fn write_st(
    source: &Source,
    outs: &[Out],
    path: &Path,
    progress: Progress<'_>,
    report: &mut ConvertReport,
) -> Result<(), ConvertError> {
    let total = outs.len();
    let plans: Vec<StPlan> = outs
        .iter()
        .map(|o| StPlan {
            name: o.name.clone(),
            shape: o.shape.clone(),
            dtype: o.dtype,
        })
        .collect();
    write_safetensors(path, &[("format", "pt")], &plans, |i| {
        progress(i, total)?;
        let t = source.piece(&outs[i].piece)?;
        float_bytes(&t, plans[i].dtype)
    })?;
    for p in &plans {
        *report
            .by_type
            .entry(format!("{:?}", p.dtype).to_uppercase())
            .or_default() += 1;
    }
    report.files.push(path.to_path_buf());
    Ok(())
}

/// `config.json` of the written diffusers folder: the source folder's, or
/// `opts.config`, or one derived from the shapes; checked against every
/// written shape.
pub(crate) fn diffusers_config(
    source: &Source,
    outs: &[Out],
    opts: &ConvertOptions,
) -> Result<Vec<u8>, ConvertError> {
    let shapes: BTreeMap<&str, &[usize]> = outs
        .iter()
        .map(|o| (o.name.as_str(), o.shape.as_slice()))
        .collect();
    let (cfg, bytes) = if let (None, Some(p)) = (&opts.config, &source.config_json) {
        let bytes = lumina2_weights::fs::read_bounded(p, lumina2_weights::fs::MAX_CONFIG_BYTES)
            .map_err(|e| source.err(format!("{}: {e}", p.display())))?;
        let text = String::from_utf8_lossy(&bytes);
        let cfg = Config::from_json_str(&text).map_err(|e| source.err(e))?;
        (cfg, Some(bytes))
    } else if let Some(c) = &opts.config {
        (c.clone(), None)
    } else {
        (
            derive_config(&shapes).ok_or_else(|| {
                ConvertError::Options(format!(
                "{}: cannot derive the model's config from its shapes; pass the config (--config)",
                source.path.display()
            ))
            })?,
            None,
        )
    };
    let want: BTreeMap<String, Vec<usize>> = weight_shapes(&cfg).into_iter().collect();
    let mismatch: Vec<String> = want
        .iter()
        .filter(|(k, s)| shapes.get(k.as_str()) != Some(&s.as_slice()))
        .map(|(k, s)| {
            format!(
                "{k}: config says {s:?}, file has {:?}",
                shapes.get(k.as_str())
            )
        })
        .chain(
            shapes
                .keys()
                .filter(|k| !want.contains_key(**k))
                .map(|k| format!("{k}: not in the config's model")),
        )
        .collect();
    if !mismatch.is_empty() {
        return Err(ConvertError::Options(format!(
            "{}: the weights do not match the config ({}); pass the right config (--config)",
            source.path.display(),
            mismatch.join("; ")
        )));
    }
    if let Some(b) = bytes {
        return Ok(b);
    }
    let mut v = serde_json::to_value(&cfg).map_err(|e| ConvertError::Options(e.to_string()))?;
    if let Some(m) = v.as_object_mut() {
        m.insert("_class_name".into(), "Lumina2Transformer2DModel".into());
        m.insert("_diffusers_version".into(), "0.42.1".into());
    }
    serde_json::to_vec_pretty(&v).map_err(|e| ConvertError::Options(e.to_string()))
}

/// The released model's config with the sizes the shapes give (width,
/// depth, heads, caption width, FFN width); `None` where a shape is missing.
fn derive_config(shapes: &BTreeMap<&str, &[usize]>) -> Option<Config> {
    let get = |k: &str| shapes.get(k).copied();
    let hidden = *get("x_embedder.weight")?.first()?;
    let head_dim = *get("layers.0.attn.norm_q.weight")?.first()?;
    let kv_rows = *get("layers.0.attn.to_k.weight")?.first()?;
    let cap = *get("time_caption_embed.caption_embedder.0.weight")?.first()?;
    let keys: BTreeSet<String> = shapes.keys().map(|k| k.to_string()).collect();
    let d = Config::default();
    let patch_in = get("x_embedder.weight")?.get(1).copied()?;
    let cfg = Config {
        hidden_size: hidden,
        num_layers: count_blocks(&keys, "layers"),
        num_refiner_layers: count_blocks(&keys, "context_refiner"),
        num_attention_heads: hidden.checked_div(head_dim)?,
        num_kv_heads: kv_rows.checked_div(head_dim)?,
        cap_feat_dim: cap,
        in_channels: patch_in / (d.patch_size * d.patch_size),
        ..d
    };
    Some(cfg)
}
