//! `lumina2 convert`: a transformer checkpoint from one layout to another
//! (the work is `lumina2_loader::convert_transformer`; this is its front end).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use lumina2_loader::gguf::GgmlType;
use lumina2_loader::{convert_transformer, ConvertFormat, ConvertOptions};

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
    #[arg(long)]
    from: PathBuf,
    /// Where to write: a folder (diffusers), a .safetensors file (original
    /// keys) or a .gguf file. An existing file is replaced only once the new
    /// one is complete.
    #[arg(long)]
    to: PathBuf,
    /// The layout to write (default: from --to's extension).
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// Quantise the GGUF file's large tensors to this block type (1-D and
    /// small tensors stay F32, rows that are not whole blocks F16).
    #[arg(long, value_enum)]
    quantize: Option<Quant>,
    /// The transformer's config.json, for writing a diffusers folder from a
    /// single file (default: derived from the shapes and the released model).
    #[arg(long)]
    config: Option<PathBuf>,
}

/// Runs `lumina2 convert`.
pub fn run(args: ConvertArgs, quiet: bool) -> Result<()> {
    signals::install()?;
    let format = match args.format {
        Some(Format::Diffusers) => ConvertFormat::Diffusers,
        Some(Format::Original) => ConvertFormat::Original,
        Some(Format::Gguf) => ConvertFormat::Gguf,
        None => ConvertFormat::from_destination(&args.to),
    };
    let config = args
        .config
        .as_ref()
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
    let report = convert_transformer(&args.from, &args.to, &opts, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        signals::check(|| "; nothing was written".into()).map_err(|e| e.to_string())
    });
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
    Ok(())
}
