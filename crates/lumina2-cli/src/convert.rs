//! `lumina2 convert`: a transformer checkpoint from one layout to another,
//! a whole pipeline to ComfyUI's files, or ComfyUI's files to a whole
//! diffusers pipeline folder (the work is
//! `lumina2_loader::convert_transformer`, `convert_to_comfy` and
//! `convert_to_diffusers_pipeline`; this is their front end).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use lumina2_loader::gguf::GgmlType;
use lumina2_loader::{
    convert_to_comfy, convert_to_diffusers_pipeline, convert_transformer, ComfyFormat,
    ConvertFormat, ConvertOptions, PipelineConfigs, PipelineParts, SingleFile, SingleFileLayout,
};

use crate::signals;

/// The layouts `--format` names.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    /// A diffusers transformer folder (config.json, diffusion_pytorch_model.safetensors).
    Diffusers,
    /// One .safetensors file with the original Alpha-VLLM keys (ComfyUI reads it).
    Original,
    /// One GGUF file with the original keys, as ComfyUI-GGUF writes them.
    Gguf,
    /// ComfyUI's all-in-one checkpoint (.safetensors): transformer, Gemma-2
    /// text encoder, tokenizer and Flux VAE.
    Comfy,
    /// ComfyUI's split files, in a folder laid out as ComfyUI's models/:
    /// diffusion_models/lumina_2_model.safetensors,
    /// text_encoders/gemma_2_2b.safetensors, vae/ae.safetensors.
    ComfySplit,
    /// A whole diffusers Lumina2Pipeline folder (model_index.json,
    /// transformer, text_encoder, tokenizer, vae, scheduler) from ComfyUI's
    /// all-in-one checkpoint, or from its split files (--from the
    /// transformer, with --text-encoder and --vae). The default when --from
    /// is an all-in-one checkpoint and --to a folder.
    DiffusersPipeline,
}

/// The block types `--quantize` takes.
#[derive(Debug, Clone, Copy, ValueEnum)]
#[allow(non_camel_case_types)]
enum Quant {
    #[value(name = "Q8_0")]
    Q8_0,
    #[value(name = "Q6_K")]
    Q6_K,
    #[value(name = "Q5_K")]
    Q5_K,
    #[value(name = "Q5_1")]
    Q5_1,
    #[value(name = "Q5_0")]
    Q5_0,
    #[value(name = "Q4_K")]
    Q4_K,
    #[value(name = "Q4_1")]
    Q4_1,
    #[value(name = "Q4_0")]
    Q4_0,
}

impl Quant {
    fn ggml(self) -> GgmlType {
        match self {
            Quant::Q8_0 => GgmlType::Q8_0,
            Quant::Q6_K => GgmlType::Q6_K,
            Quant::Q5_K => GgmlType::Q5_K,
            Quant::Q5_1 => GgmlType::Q5_1,
            Quant::Q5_0 => GgmlType::Q5_0,
            Quant::Q4_K => GgmlType::Q4_K,
            Quant::Q4_1 => GgmlType::Q4_1,
            Quant::Q4_0 => GgmlType::Q4_0,
        }
    }
}

/// Arguments of `lumina2 convert`.
#[derive(Args)]
pub struct ConvertArgs {
    /// The transformer: a diffusers pipeline or transformer folder, or a
    /// single .safetensors, .pth or .gguf file (original, ComfyUI or diffusers keys).
    /// With --format comfy, comfy-split or diffusers-pipeline: the whole
    /// pipeline, a diffusers pipeline folder or a ComfyUI all-in-one
    /// checkpoint (or the transformer alone, with --text-encoder and --vae).
    #[arg(long)]
    from: PathBuf,
    /// Where to write: a folder (diffusers), a .safetensors file (original
    /// keys) or a .gguf file; with --format comfy a .safetensors file, with
    /// --format comfy-split a folder; with --format diffusers-pipeline a new
    /// or empty folder. An existing file is replaced only once the new one
    /// is complete. An all-in-one checkpoint converted to a folder (no
    /// --format) gives the whole pipeline folder.
    #[arg(long)]
    to: PathBuf,
    /// The layout to write (default: from --to's extension: .gguf, .safetensors
    /// is original, else diffusers; diffusers-pipeline when --from is a
    /// ComfyUI all-in-one checkpoint).
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// --format comfy/comfy-split/diffusers-pipeline: the Gemma-2 text
    /// encoder (a diffusers folder or a ComfyUI .safetensors file) instead
    /// of --from's.
    #[arg(long)]
    text_encoder: Option<PathBuf>,
    /// --format comfy/comfy-split/diffusers-pipeline: the VAE (a diffusers
    /// folder, or a BFL or diffusers-keyed .safetensors file) instead of
    /// --from's.
    #[arg(long)]
    vae: Option<PathBuf>,
    /// --format comfy/comfy-split/diffusers-pipeline: the SentencePiece
    /// tokenizer.model (or a
    /// folder holding one, or a ComfyUI file with spiece_model) to embed
    /// (default: --from's tokenizer/tokenizer.model, or the text encoder
    /// file's own).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Quantise the GGUF file's large tensors to this block type (1-D and
    /// small tensors stay F32, rows that are not whole blocks F16).
    #[arg(long, value_enum)]
    quantize: Option<Quant>,
    /// The transformer's config.json, for writing a diffusers folder from a
    /// single file (default: derived from the shapes and the released model).
    #[arg(long)]
    config: Option<PathBuf>,
    /// --format diffusers-pipeline: the text encoder's config.json (or its
    /// folder) for the written folder (default: Gemma-2-2B's settings with
    /// the sizes of the tensors), checked against the tensors.
    #[arg(long)]
    text_encoder_config: Option<PathBuf>,
    /// --format diffusers-pipeline: the VAE's config.json (or its folder)
    /// (default: the Flux VAE's, scaling 0.3611, shift 0.1159, with the sizes
    /// of the tensors), checked against the tensors.
    #[arg(long)]
    vae_config: Option<PathBuf>,
    /// --format diffusers-pipeline: the scheduler_config.json (or its folder)
    /// (default: Lumina-Image 2.0's FlowMatchEulerDiscreteScheduler, shift 6.0).
    #[arg(long)]
    scheduler_config: Option<PathBuf>,
}

/// A config file, or the folder holding it as `name`.
fn config_file(p: &Option<PathBuf>, name: &str) -> Option<PathBuf> {
    p.as_ref()
        .map(|p| if p.is_dir() { p.join(name) } else { p.clone() })
}

/// Whether `path` is ComfyUI's all-in-one checkpoint.
fn is_checkpoint(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
        && SingleFile::open(path).is_ok_and(|f| f.layout() == SingleFileLayout::Checkpoint)
}

/// Runs `lumina2 convert`.
pub fn run(args: ConvertArgs, quiet: bool) -> Result<()> {
    signals::install()?;
    // An all-in-one checkpoint to a folder: the whole pipeline, not only
    // its transformer (--format diffusers writes the transformer alone).
    let to_pipeline = matches!(args.format, Some(Format::DiffusersPipeline))
        || (args.format.is_none()
            && ConvertFormat::from_destination(&args.to) == ConvertFormat::Diffusers
            && is_checkpoint(&args.from));
    if to_pipeline && args.format.is_none() && !quiet {
        eprintln!(
            "{} is an all-in-one checkpoint: writing a whole diffusers pipeline folder \
             (--format diffusers writes the transformer alone)",
            args.from.display()
        );
    }
    let comfy = match args.format {
        Some(Format::Comfy) => Some(ComfyFormat::AllInOne),
        Some(Format::ComfySplit) => Some(ComfyFormat::Split),
        _ => None,
    };
    let whole = comfy.is_some() || to_pipeline;
    if !whole && (args.text_encoder.is_some() || args.vae.is_some() || args.tokenizer.is_some()) {
        bail!(
            "--text-encoder, --vae and --tokenizer go with --format comfy, comfy-split or \
             diffusers-pipeline"
        );
    }
    if !to_pipeline
        && (args.text_encoder_config.is_some()
            || args.vae_config.is_some()
            || args.scheduler_config.is_some())
    {
        bail!(
            "--text-encoder-config, --vae-config and --scheduler-config go with --format \
             diffusers-pipeline"
        );
    }
    if whole && args.quantize.is_some() {
        bail!("--quantize goes with a transformer conversion, not a whole pipeline");
    }
    if comfy.is_some() && args.config.is_some() {
        bail!("--config does not go with --format comfy or comfy-split");
    }
    let format = match args.format {
        Some(Format::Diffusers) => ConvertFormat::Diffusers,
        Some(Format::Original) => ConvertFormat::Original,
        Some(Format::Gguf) => ConvertFormat::Gguf,
        Some(Format::Comfy | Format::ComfySplit | Format::DiffusersPipeline) | None => {
            ConvertFormat::from_destination(&args.to)
        }
    };
    let config = args
        .config
        .as_ref()
        .filter(|_| !to_pipeline)
        .map(|p| {
            lumina2_loader::convert::Config::from_file(p)
                .with_context(|| format!("reading {}", p.display()))
        })
        .transpose()?;
    let opts = ConvertOptions {
        format,
        quantize: args.quantize.map(Quant::ggml),
        config,
    };
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template("{prefix:>9} [{bar:30}] {pos}/{len} tensors  ETA {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b.set_prefix("convert");
        b
    };
    let mut progress = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        signals::check(|| "; nothing was written".into()).map_err(|e| e.to_string())
    };
    let report = match comfy {
        Some(kind) => pipeline_parts(&args)
            .and_then(|parts| convert_to_comfy(&parts, &args.to, kind, &mut progress)),
        None if to_pipeline => {
            let configs = PipelineConfigs {
                transformer: config_file(&args.config, "config.json"),
                text_encoder: config_file(&args.text_encoder_config, "config.json"),
                vae: config_file(&args.vae_config, "config.json"),
                scheduler: config_file(&args.scheduler_config, "scheduler_config.json"),
            };
            pipeline_parts(&args).and_then(|parts| {
                convert_to_diffusers_pipeline(&parts, &configs, &args.to, &mut progress)
            })
        }
        None => convert_transformer(&args.from, &args.to, &opts, &mut progress),
    };
    bar.finish_and_clear();
    let report = report?;
    if !quiet {
        let types: Vec<String> = report
            .by_type
            .iter()
            .map(|(t, n)| format!("{n} {t}"))
            .collect();
        for f in &report.files {
            eprintln!("wrote {}", f.display());
        }
        eprintln!("{} tensors ({})", report.tensors, types.join(", "));
    }
    for note in &report.notes {
        eprintln!("note: {note}");
    }
    Ok(())
}

/// The parts to write: all from --from, unless --text-encoder and --vae
/// name theirs (then --from is the transformer alone).
fn pipeline_parts(args: &ConvertArgs) -> Result<PipelineParts, lumina2_loader::ConvertError> {
    let mut parts = match (&args.text_encoder, &args.vae) {
        (Some(te), Some(vae)) => PipelineParts {
            transformer: args.from.clone(),
            text_encoder: te.clone(),
            vae: vae.clone(),
            tokenizer: None,
        },
        _ => PipelineParts::from_source(&args.from)?,
    };
    if let Some(te) = &args.text_encoder {
        parts.text_encoder = te.clone();
    }
    if let Some(vae) = &args.vae {
        parts.vae = vae.clone();
    }
    if let Some(t) = &args.tokenizer {
        parts.tokenizer = Some(t.clone());
    }
    Ok(parts)
}
