//! `lumina2 generate`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use lumina2_pipeline::candle_core::{DType, Device};
use lumina2_pipeline::{
    Conditioning, Control, Error as PipelineError, Event, GenerateOptions, GuidanceMode, LoraSpec,
    Lumina2Pipeline, Noise, OutputKind, PipelineSources, SolverKind, Stage, StageTimings,
    SystemPrompt, TransformerSource,
};

use crate::batch;
use crate::init_image;
use crate::output;
use crate::signals;

/// The default model: the Hub repo of Lumina-Image 2.0 in diffusers' layout.
const DEFAULT_MODEL: &str = "Alpha-VLLM/Lumina-Image-2.0";

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum DtypeArg {
    /// bf16 where the device computes it natively (GPUs; CPUs with AMX or
    /// AVX512-BF16), f32 elsewhere.
    Auto,
    F32,
    Bf16,
    F16,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum SamplerArg {
    /// diffusers' FlowMatchEulerDiscrete step (1 model call per step).
    Euler,
    /// Second-order midpoint (2 model calls per step), the original sampler's default.
    Midpoint,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum GuidanceArg {
    /// diffusers' Lumina2Pipeline semantics (the default).
    Diffusers,
    /// The Alpha-VLLM sampler's semantics.
    Original,
}

/// Arguments of `lumina2 generate`, named after diffusers' in kebab case.
#[derive(Args, Clone)]
pub struct GenerateArgs {
    /// The prompt; repeat for a batch of prompts.
    #[arg(
        short,
        long,
        required_unless_present = "from_file",
        conflicts_with = "from_file"
    )]
    pub(crate) prompt: Vec<String>,
    /// Negative prompt: one for all prompts, or one per prompt (default "").
    #[arg(short, long)]
    pub(crate) negative_prompt: Vec<String>,
    /// Image width in pixels, a multiple of 16, at most 16384 (default: the model's sample_size * 8).
    #[arg(long)]
    pub(crate) width: Option<usize>,
    /// Image height in pixels, a multiple of 16, at most 16384 (default: the model's sample_size * 8).
    #[arg(long)]
    pub(crate) height: Option<usize>,
    /// Denoising steps, 1 to 10000 [default: 30; Z-Image: 50, as diffusers].
    #[arg(long, visible_alias = "steps")]
    pub(crate) num_inference_steps: Option<usize>,
    /// Classifier-free guidance scale, 0 to 100 [default: 4; Z-Image: 5, as
    /// diffusers] (Lumina2: diffusers' mode guides only above 1, the original
    /// mode at every scale; Z-Image guides above 0, Z-Image-Turbo uses 0).
    #[arg(long)]
    pub(crate) guidance_scale: Option<f64>,
    /// Z-Image only: cap the guided prediction's norm at F times the
    /// positive one's (diffusers' `cfg_normalization`; 0, the default: off).
    #[arg(long, value_name = "F")]
    pub(crate) cfg_normalization: Option<f64>,
    /// Z-Image only: no guidance at the steps whose normalised time
    /// (1000 - t) / 1000 is above T (diffusers' `cfg_truncation`, default 1).
    #[arg(long, value_name = "T")]
    pub(crate) cfg_truncation: Option<f64>,
    /// Fraction of the run with guidance, 0 to 1 (see --guidance-mode).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) cfg_trunc_ratio: f64,
    /// Do not renormalise the guided prediction.
    #[arg(long)]
    pub(crate) no_cfg_normalization: bool,
    /// With --guidance-mode original: clamp the guided norm to F times the
    /// conditional one (the original's renorm_cfg; 0: off).
    #[arg(long, value_name = "F", default_value_t = 1.0)]
    pub(crate) renorm_cfg: f64,
    /// TeaCache step caching with this threshold (off when absent; the
    /// reference suggests 0.2 to 0.5: higher skips more). Faster, not exact.
    #[arg(long)]
    pub(crate) cache_threshold: Option<f64>,
    /// System prompt put in front of each prompt (default: diffusers').
    #[arg(long, conflicts_with = "system_preset")]
    pub(crate) system_prompt: Option<String>,
    /// A system prompt preset of the original sampler: align, base, aesthetics, real, 4grid, empty.
    #[arg(long)]
    pub(crate) system_preset: Option<String>,
    /// Text tokens per prompt, at most 512 [default: 256; Z-Image: 512, as diffusers].
    #[arg(long)]
    pub(crate) max_sequence_length: Option<usize>,
    /// Images per prompt (at most 256 images in all: prompts x images).
    #[arg(long, default_value_t = 1)]
    pub(crate) num_images_per_prompt: usize,
    /// Seed of image 0; image i uses seed + i, drawn as
    /// torch.Generator("cpu").manual_seed(seed + i) does (random when absent).
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Custom sigmas, comma-separated, each in [0, 1], at most 10000 (diffusers'
    /// `sigmas`; overrides the step count).
    #[arg(long, value_delimiter = ',')]
    pub(crate) sigmas: Option<Vec<f64>>,
    /// Output path; `{seed}` and `{index}` are replaced. Several images without
    /// a placeholder get `_{index}` before the extension. Must be a new path or
    /// a regular file (replaced); a device, FIFO, socket, folder or symbolic
    /// link there is refused.
    #[arg(short, long, default_value = "lumina2_{seed}.png")]
    pub(crate) output: String,
    /// Also write the final latents (before the VAE) to this .safetensors file
    /// (a new path or a regular file, as -o).
    #[arg(long, conflicts_with = "from_file")]
    pub(crate) output_latents: Option<PathBuf>,
    /// Write only the latents (no VAE decode, no image); needs --output-latents.
    #[arg(long, requires = "output_latents")]
    pub(crate) latents_only: bool,
    /// Live preview: every --preview-every steps, the current prediction of the
    /// clean image (the first image of the batch, at latent resolution,
    /// projected with ComfyUI's Flux latent-to-RGB matrix) is written to this
    /// PNG, atomically (a viewer can reload it).
    #[arg(long)]
    pub(crate) preview: Option<PathBuf>,
    /// Steps between previews (1 = every step); needs --preview.
    #[arg(long, requires = "preview", default_value_t = 1)]
    pub(crate) preview_every: usize,
    /// Previews every `preview_every` steps kept in memory rather than
    /// written to --preview (a server job's `preview_every`; no flag).
    #[arg(skip)]
    pub(crate) preview_in_memory: bool,

    /// Hub repo id, local diffusers pipeline folder, or ComfyUI all-in-one
    /// checkpoint (.safetensors) [default: Alpha-VLLM/Lumina-Image-2.0; not
    /// needed when --transformer, --text-encoder and --vae all name files].
    #[arg(long)]
    pub(crate) model: Option<String>,
    /// Hub revision (branch, tag or commit).
    #[arg(long, default_value = "main")]
    pub(crate) revision: String,
    /// Never touch the network: use the Hugging Face cache only (also HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub(crate) offline: bool,
    /// Transformer checkpoint file (.safetensors original/ComfyUI/diffusers, .pth, .gguf)
    /// or diffusers folder, instead of the model's.
    #[arg(long)]
    pub(crate) transformer: Option<PathBuf>,
    /// Folder or file with the config.json of --transformer, or of a
    /// checkpoint's transformer (default: the model's folder's; with no
    /// model folder, Lumina-Image 2.0's with the file's sizes).
    #[arg(long)]
    pub(crate) transformer_config: Option<PathBuf>,
    /// Folder with the config.json of a ComfyUI text encoder file (default:
    /// the model's folder's; with no model folder, Gemma-2-2B's with the file's sizes).
    #[arg(long)]
    pub(crate) text_encoder_config: Option<PathBuf>,
    /// Folder with the config.json of a VAE file (default: the model's
    /// folder's; with no model folder, the Flux VAE's with the file's sizes).
    #[arg(long)]
    pub(crate) vae_config: Option<PathBuf>,
    /// Text encoder: folder (transformers' Gemma-2 layout), GGUF file (llama.cpp's
    /// Gemma-2 names, e.g. a community gemma-2-2b Q4_0/Q8_0), or ComfyUI Gemma-2
    /// file (gemma_2_2b_fp16.safetensors), instead of the model's.
    #[arg(long)]
    pub(crate) text_encoder: Option<PathBuf>,
    /// tokenizer.json (or its folder), or a ComfyUI file with the tokenizer
    /// embedded, instead of the model's.
    #[arg(long)]
    pub(crate) tokenizer: Option<PathBuf>,
    /// VAE: diffusers folder, or Flux VAE file in Black Forest Labs'/ComfyUI's
    /// keys (ae.safetensors), instead of the model's.
    #[arg(long)]
    pub(crate) vae: Option<PathBuf>,
    /// scheduler_config.json, instead of the model's.
    #[arg(long)]
    pub(crate) scheduler_config: Option<PathBuf>,
    /// LoRA file with an optional scale (-100 to 100, default 1), FILE[:SCALE]; repeatable.
    #[arg(long)]
    pub(crate) lora: Vec<String>,

    /// Compute dtype: auto picks bf16 where the device computes it natively (GPUs, CPUs
    /// with AMX or AVX512-BF16) and f32 elsewhere; f32 matches PyTorch's f32 exactly.
    #[arg(long, value_enum, default_value = "auto")]
    pub(crate) dtype: DtypeArg,
    /// Quantise the transformer's attention and feed-forward layers to int8
    /// (faster on CPUs with AMX or AVX512-VNNI; about 1% relative error on
    /// each denoising step's output). Best with `--dtype bf16`.
    #[arg(long)]
    pub(crate) int8: bool,
    /// Device: cpu, cuda[:N] or metal[:N] (GPU builds only).
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
    /// Worker threads, at most 4 per core (default: RAYON_NUM_THREADS, else all cores).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
    /// ODE solver.
    #[arg(long, value_enum, default_value = "euler")]
    pub(crate) sampler: SamplerArg,
    /// Guidance semantics.
    #[arg(long, value_enum, default_value = "diffusers")]
    pub(crate) guidance_mode: GuidanceArg,
    /// Decode the image tile by tile (bounds the VAE's memory for large images).
    #[arg(long)]
    pub(crate) vae_tiling: bool,
    /// Skip the up-front memory check.
    #[arg(long)]
    pub(crate) no_memory_check: bool,

    #[command(flatten)]
    pub(crate) init: init_image::InitImageArgs,

    #[command(flatten)]
    pub(crate) batch: batch::BatchArgs,
}

/// The command's defaults for Lumina2 (Z-Image takes diffusers' own).
const LUMINA2_STEPS: usize = 30;
const LUMINA2_GUIDANCE_SCALE: f64 = 4.0;
const LUMINA2_MAX_SEQUENCE_LENGTH: usize = 256;

/// The largest LoRA scale magnitude: trained for 1, used between -2 and 2;
/// far past that the merged weights overflow.
const MAX_LORA_SCALE: f64 = 100.0;

/// Threads allowed per core the process may use: more only adds contention
/// to CPU-bound kernels; a little oversubscription is left for whoever
/// measures otherwise.
const THREADS_PER_CORE: usize = 4;

/// The thread limit where the core count is unknown.
const MAX_THREADS_UNKNOWN_CORES: usize = 256;

pub(crate) fn parse_lora(s: &str) -> Result<LoraSpec> {
    // FILE:SCALE, where FILE may itself hold ':' (take the last one only when
    // what follows parses as a number).
    if let Some((file, scale)) = s.rsplit_once(':') {
        if let Ok(v) = scale.parse::<f64>() {
            if !(-MAX_LORA_SCALE..=MAX_LORA_SCALE).contains(&v) {
                bail!("--lora {s}: the scale is not in [-{MAX_LORA_SCALE}, {MAX_LORA_SCALE}]");
            }
            return Ok(LoraSpec {
                path: PathBuf::from(file),
                scale: v,
            });
        }
    }
    Ok(LoraSpec {
        path: PathBuf::from(s),
        scale: 1.0,
    })
}

pub(crate) fn parse_device(s: &str) -> Result<Device> {
    let (kind, ordinal) = match s.split_once(':') {
        Some((k, n)) => (
            k,
            n.parse::<usize>()
                .with_context(|| format!("--device {s}: `{n}` is not a device number"))?,
        ),
        None => (s, 0),
    };
    match kind {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(ordinal).with_context(|| {
            if cfg!(feature = "cuda") {
                format!("--device {s}: CUDA device {ordinal} could not be opened")
            } else {
                format!(
                    "--device {s}: this lumina2 was built without CUDA (`{}`)",
                    install("cuda")
                )
            }
        }),
        "metal" => Device::new_metal(ordinal).with_context(|| {
            if cfg!(feature = "metal") {
                format!("--device {s}: Metal device {ordinal} could not be opened")
            } else {
                format!(
                    "--device {s}: this lumina2 was built without Metal (`{}`)",
                    install("metal")
                )
            }
        }),
        other => bail!("--device: unknown device `{other}` (cpu, cuda[:N], metal[:N])"),
    }
}

/// The command that builds `lumina2` with a backend `feature`.
fn install(feature: &str) -> String {
    format!("cargo install --path crates/lumina2-cli --features {feature}")
}

/// The most worker threads: [`THREADS_PER_CORE`] per core this process may
/// use, and the text that explains it.
fn thread_limit() -> (usize, String) {
    match std::thread::available_parallelism() {
        Ok(n) => (
            n.get().saturating_mul(THREADS_PER_CORE),
            format!("{THREADS_PER_CORE} x the {n} cores this process may use"),
        ),
        Err(_) => (
            MAX_THREADS_UNKNOWN_CORES,
            "the limit where the core count is unknown".to_string(),
        ),
    }
}

/// Checks the thread count (`--threads`, else `RAYON_NUM_THREADS`, which
/// rayon and candle read) against [`thread_limit`] before any thread is
/// started, then sizes the thread pool.
pub(crate) fn set_threads(threads: Option<usize>) -> Result<()> {
    let (limit, why) = thread_limit();
    let Some(n) = threads else {
        // rayon ignores a value that is not a number; a number is its thread count.
        if let Some(v) = std::env::var_os("RAYON_NUM_THREADS") {
            let text = v.to_string_lossy();
            if let Ok(n) = text.trim().parse::<u128>() {
                if n > limit as u128 {
                    bail!("RAYON_NUM_THREADS={text}: at most {limit} ({why})");
                }
            }
        }
        return Ok(());
    };
    if n == 0 {
        bail!("--threads 0: at least 1");
    }
    if n > limit {
        bail!("--threads {n}: at most {limit} ({why})");
    }
    // candle's CPU kernels read RAYON_NUM_THREADS; rayon's global pool is built
    // on first use, before any model code runs.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .context("setting the thread count")?;
    Ok(())
}

/// Resolves `--model` (a folder or a Hub repo) and the component overrides.
fn sources(
    args: &GenerateArgs,
    loras: Vec<LoraSpec>,
    quiet: bool,
) -> Result<(PipelineSources, String)> {
    let is_file = |p: &Option<PathBuf>| p.as_ref().is_some_and(|p| p.is_file());
    let single_files = args.model.is_none()
        && is_file(&args.transformer)
        && is_file(&args.text_encoder)
        && is_file(&args.vae);
    let model = args.model.as_deref().unwrap_or(DEFAULT_MODEL);
    let model_path = Path::new(model);
    // Files given alone carry no config: Lumina-Image 2.0's, sizes from the files.
    let mut s = if single_files {
        let te = args.text_encoder.clone().unwrap_or_default();
        PipelineSources {
            transformer: TransformerSource::File {
                path: args.transformer.clone().unwrap_or_default(),
                config: None,
            },
            loras: Vec::new(),
            tokenizer: te.clone(),
            text_encoder: te,
            text_encoder_config: None,
            vae: args.vae.clone().unwrap_or_default(),
            vae_config: None,
            scheduler_config: None,
        }
    } else if model_path.is_file() {
        PipelineSources::from_checkpoint(model_path)
            .with_context(|| format!("opening checkpoint {}", model_path.display()))?
    } else if model_path.is_dir() {
        PipelineSources::from_pipeline_folder(model_path)
            .with_context(|| format!("opening pipeline folder {}", model_path.display()))?
    } else {
        let offline = args.offline || hub_offline_env();
        let folder = lumina2_loader::hub::HubRepo::new(model)
            .revision(&args.revision)
            .offline(offline)
            .download_pipeline(!quiet)
            .with_context(|| format!("getting `{model}` from the Hugging Face Hub"))?;
        PipelineSources::from_folder(&folder)
    };
    Components {
        transformer: &mut s.transformer,
        text_encoder: &mut s.text_encoder,
        text_encoder_config: &mut s.text_encoder_config,
        tokenizer: &mut s.tokenizer,
        vae: &mut s.vae,
        vae_config: &mut s.vae_config,
    }
    .override_with(args);
    if let Some(p) = &args.scheduler_config {
        s.scheduler_config = Some(p.clone());
    }
    if s.scheduler_config.is_none() && !quiet {
        eprintln!(
            "no scheduler config in these files: using Lumina-Image 2.0's \
             (FlowMatchEulerDiscreteScheduler, shift 6.0)"
        );
    }
    s.loras = loras;
    Ok((s, model_name(args)))
}

/// The components of a pipeline's sources that the command line can
/// replace, whatever the pipeline (Lumina2's [`PipelineSources`], Z-Image's
/// `ZImageSources`).
pub(crate) struct Components<'a> {
    pub(crate) transformer: &'a mut TransformerSource,
    pub(crate) text_encoder: &'a mut PathBuf,
    pub(crate) text_encoder_config: &'a mut Option<PathBuf>,
    pub(crate) tokenizer: &'a mut PathBuf,
    pub(crate) vae: &'a mut PathBuf,
    pub(crate) vae_config: &'a mut Option<PathBuf>,
}

impl Components<'_> {
    /// Puts in `--transformer`, `--text-encoder`, `--tokenizer`, `--vae` and
    /// their `--*-config`. A single file takes the config of the model's
    /// folder for that component, when there is one, unless one is given.
    pub(crate) fn override_with(self, args: &GenerateArgs) {
        if let Some(t) = &args.transformer {
            let config = args
                .transformer_config
                .clone()
                .or_else(|| self.transformer.config_path().map(Path::to_path_buf));
            *self.transformer = if t.is_dir() {
                TransformerSource::Folder(t.clone())
            } else {
                TransformerSource::File {
                    path: t.clone(),
                    config,
                }
            };
        }
        if let Some(p) = &args.text_encoder {
            // A safetensors file takes the config of the model's folder,
            // when there is one (a GGUF file keeps its metadata's).
            if self.text_encoder.is_dir()
                && p.is_file()
                && p.extension().is_some_and(|e| e == "safetensors")
            {
                *self.text_encoder_config = Some(self.text_encoder.clone());
            }
            *self.text_encoder = p.clone();
        }
        if let Some(p) = &args.tokenizer {
            *self.tokenizer = p.clone();
        }
        if let Some(p) = &args.vae {
            if self.vae.is_dir() && p.is_file() {
                *self.vae_config = Some(self.vae.clone());
            }
            *self.vae = p.clone();
        }
        if let (Some(c), TransformerSource::File { config, .. }) =
            (&args.transformer_config, &mut *self.transformer)
        {
            *config = Some(c.clone());
        }
        if let Some(p) = &args.text_encoder_config {
            *self.text_encoder_config = Some(p.clone());
        }
        if let Some(p) = &args.vae_config {
            *self.vae_config = Some(p.clone());
        }
    }
}

/// The model name images record: the transformer file when one is given,
/// else the model (repo id or folder).
pub(crate) fn model_name(args: &GenerateArgs) -> String {
    match &args.transformer {
        Some(t) => t.display().to_string(),
        None => args
            .model
            .clone()
            .unwrap_or_else(|| DEFAULT_MODEL.to_string()),
    }
}

fn hub_offline_env() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

pub(crate) fn options(args: &GenerateArgs, seed: u64) -> Result<GenerateOptions> {
    options_named(args, seed, |option| {
        format!("--{}", option.replace('_', "-"))
    })
}

/// [`options`], with `name` spelling the library's option names in errors.
pub(crate) fn options_named(
    args: &GenerateArgs,
    seed: u64,
    name: impl Fn(&str) -> String,
) -> Result<GenerateOptions> {
    let named = |e| named_option(e, &name);
    let mut o = GenerateOptions::with_prompts(args.prompt.clone());
    if !args.negative_prompt.is_empty() {
        o.conditioning = Conditioning::Prompts {
            prompts: args.prompt.clone(),
            negative_prompts: Some(args.negative_prompt.clone()),
        };
    }
    o.width = args.width;
    o.height = args.height;
    for (flag, given) in [
        ("--cfg-normalization", args.cfg_normalization.is_some()),
        ("--cfg-truncation", args.cfg_truncation.is_some()),
    ] {
        if given {
            bail!("{flag} applies to Z-Image pipelines only (Lumina2: --no-cfg-normalization, --cfg-trunc-ratio)");
        }
    }
    o.num_inference_steps = args.num_inference_steps.unwrap_or(LUMINA2_STEPS);
    o.guidance_scale = args.guidance_scale.unwrap_or(LUMINA2_GUIDANCE_SCALE);
    o.cfg_trunc_ratio = args.cfg_trunc_ratio;
    o.cfg_normalization = !args.no_cfg_normalization;
    o.renorm_cfg = args.renorm_cfg;
    o.cache_threshold = args.cache_threshold;
    o.preview_every =
        (args.preview.is_some() || args.preview_in_memory).then_some(args.preview_every);
    o.system_prompt = match (&args.system_prompt, &args.system_preset) {
        (Some(t), _) => SystemPrompt::Text(t.clone()),
        (None, Some(p)) => SystemPrompt::preset(p)?,
        (None, None) => SystemPrompt::default(),
    };
    o.sigmas = args.sigmas.clone();
    o.num_images_per_prompt = args.num_images_per_prompt;
    o.max_sequence_length = args
        .max_sequence_length
        .unwrap_or(LUMINA2_MAX_SEQUENCE_LENGTH);
    o.output = if args.latents_only {
        OutputKind::Latents
    } else {
        OutputKind::Images
    };
    o.solver = match args.sampler {
        SamplerArg::Euler => SolverKind::Euler,
        SamplerArg::Midpoint => SolverKind::Midpoint,
    };
    o.guidance_mode = match args.guidance_mode {
        GuidanceArg::Diffusers => GuidanceMode::Diffusers,
        GuidanceArg::Original => GuidanceMode::Original,
    };
    init_image::apply(&args.init, &mut o)?;
    // The counts are bounded before the per-image seed list is made.
    o.noise = Noise::Seed(seed);
    o.validate().map_err(named)?;
    let batch = o.batch_size().map_err(named)?;
    let seeds = (0..batch as u64)
        .map(|i| {
            seed.checked_add(i)
                .with_context(|| format!("--seed {seed}: seed + {i} overflows"))
        })
        .collect::<Result<Vec<_>>>()?;
    o.noise = Noise::Seeds(seeds);
    o.validate().map_err(named)?;
    Ok(o)
}

/// An invalid option of the library, named as the command line spells it
/// (`num_images_per_prompt` -> `--num-images-per-prompt`).
pub(crate) fn cli_option(e: PipelineError) -> anyhow::Error {
    named_option(e, |option| format!("--{}", option.replace('_', "-")))
}

/// An invalid option of the library, named by `name`.
pub(crate) fn named_option(e: PipelineError, name: impl Fn(&str) -> String) -> anyhow::Error {
    match e {
        PipelineError::InvalidOption { option, reason } => {
            anyhow::anyhow!("{}: {reason}", name(option))
        }
        other => other.into(),
    }
}

/// The seed of each image (the options hold one per image).
fn seeds_of(opts: &GenerateOptions) -> &[u64] {
    match &opts.noise {
        Noise::Seeds(s) => s,
        _ => &[],
    }
}

/// Test-only: `LUMINA2_TEST_DECODE_DELAY_MS` makes the run wait this long
/// (at most a minute) when decoding starts, so that the tests can signal a
/// run that is decoding. Not an option: nothing else should set it.
pub(crate) fn test_decode_delay() -> Option<Duration> {
    let ms: u64 = std::env::var("LUMINA2_TEST_DECODE_DELAY_MS")
        .ok()?
        .parse()
        .ok()?;
    Some(Duration::from_millis(ms.min(60_000)))
}

pub(crate) fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    // Seeds users can type: 2^53 keeps them exact in JSON and Python floats.
    h.finish() % (1u64 << 53)
}

/// A command line that asks for something impossible (exit status 2, as
/// clap's own usage errors).
#[derive(Debug)]
pub struct Usage(pub anyhow::Error);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", crate::error_chain(&self.0))
    }
}

impl std::error::Error for Usage {}

pub(crate) fn usage<T>(r: Result<T>) -> Result<T> {
    r.map_err(|e| Usage(e).into())
}

pub fn run(args: GenerateArgs, quiet: bool) -> Result<()> {
    if crate::zimage::is_zimage(&args)? {
        return crate::zimage::run(args, quiet);
    }
    if args.batch.from_file.is_some() {
        return batch::run(args, quiet);
    }
    usage(args.batch.check_need_file())?;
    let seed = args.seed.unwrap_or_else(random_seed);
    // Options are checked before anything is loaded, downloaded or sized by
    // them: the thread count before the pool is built, the image count
    // before the file names are listed.
    let opts = usage(options(&args, seed))?;
    let loras = usage(parse_loras(&args))?;
    usage(set_threads(args.threads))?;
    let outputs = if args.latents_only {
        Vec::new()
    } else {
        output_paths(&args.output, &opts)
    };
    for p in outputs
        .iter()
        .chain(args.output_latents.iter())
        .chain(args.preview.iter())
    {
        prepare_output(p)?;
    }
    // SIGINT/SIGTERM/SIGHUP: the first stops the run at the next step, or
    // before the first file once decoding started (nothing is written); a
    // second quits at once, removing the temporary files.
    signals::install()?;
    let mut model = load(&args, loras, false, quiet)?;
    render(&mut model, &args, &opts, &outputs, quiet)?;
    Ok(())
}

impl GenerateArgs {
    /// Whether latents are asked for (`--output-latents`, `--latents-only`).
    pub(crate) fn writes_latents(&self) -> bool {
        self.output_latents.is_some() || self.latents_only
    }
}

pub(crate) fn parse_loras(args: &GenerateArgs) -> Result<Vec<LoraSpec>> {
    args.lora.iter().map(|l| parse_lora(l)).collect()
}

/// The image files of a request: `pattern` (`-o`) expanded for each image.
pub(crate) fn output_paths(pattern: &str, opts: &GenerateOptions) -> Vec<PathBuf> {
    let seeds = seeds_of(opts);
    seeds
        .iter()
        .enumerate()
        .map(|(i, &s)| output::output_path(pattern, Some(s), i, seeds.len()))
        .collect()
}

/// Removes what killed runs left for `path` and checks it can be written.
pub(crate) fn prepare_output(path: &Path) -> Result<()> {
    for stale in output::remove_stale_temps(path) {
        tracing::info!("removed {}, left by a run that was killed", stale.display());
    }
    output::check_writable(path)
}

/// A built pipeline and the model name its images record.
pub(crate) struct Model {
    pub(crate) pipe: Lumina2Pipeline,
    pub(crate) name: String,
}

/// Opens the device, resolves the sources and builds the pipeline (`keep_resident`: every component stays loaded
/// between generations).
pub(crate) fn load(
    args: &GenerateArgs,
    loras: Vec<LoraSpec>,
    keep_resident: bool,
    quiet: bool,
) -> Result<Model> {
    let device = usage(parse_device(&args.device))?;
    check_int8_device(args, &device)?;
    let dtype = resolve_dtype(args, &device, quiet);

    let (sources, model_name) = sources(args, loras, quiet)?;
    signals::check(|| " before loading; no image was written".into())?;
    check_lora_files(&sources.loras)?;
    let pipe = Lumina2Pipeline::builder(sources)
        .dtype(dtype)
        .device(device)
        .vae_tiling(args.vae_tiling)
        .int8_transformer(args.int8)
        .keep_resident(keep_resident)
        .build()?;
    Ok(Model {
        pipe,
        name: model_name,
    })
}

/// `--int8` runs on the CPU only (a usage error elsewhere).
pub(crate) fn check_int8_device(args: &GenerateArgs, device: &Device) -> Result<()> {
    if args.int8 && !device.is_cpu() {
        return Err(Usage(anyhow::anyhow!(
            "--int8 runs on the CPU only, not with --device {}: on a GPU use --dtype bf16 or a GGUF transformer",
            args.device
        ))
        .into());
    }
    Ok(())
}

/// Every `--lora` names a regular file (a usage error otherwise).
pub(crate) fn check_lora_files(loras: &[LoraSpec]) -> Result<()> {
    if let Some(bad) = loras
        .iter()
        .find(|l| !lumina2_weights::fs::is_regular_file(&l.path))
    {
        return Err(Usage(anyhow::anyhow!(
            "--lora {}: no such file",
            bad.path.display()
        ))
        .into());
    }
    Ok(())
}

/// The compute dtype `--dtype` asks for on `device` (`auto` says what it picked).
pub(crate) fn resolve_dtype(args: &GenerateArgs, device: &Device, quiet: bool) -> DType {
    match args.dtype {
        DtypeArg::Auto => {
            let auto = lumina2_pipeline::auto_dtype(device);
            if !quiet {
                eprintln!(
                    "dtype: {} ({}; --dtype f32 or bf16 to choose)",
                    auto.dtype.as_str(),
                    auto.reason
                );
            }
            auto.dtype
        }
        DtypeArg::F32 => DType::F32,
        DtypeArg::Bf16 => DType::BF16,
        DtypeArg::F16 => DType::F16,
    }
}

/// The PNG of the first image's preview (`x0`: the step's clean-latent
/// prediction; None for an empty batch). `--preview` writes these bytes and a
/// server job sends them, so both are the same image.
pub(crate) fn preview_png(x0: &lumina2_pipeline::candle_core::Tensor) -> Result<Option<Vec<u8>>> {
    let imgs = lumina2_pipeline::preview::latents_to_rgb(x0)?;
    let Some(img) = imgs.first() else {
        return Ok(None);
    };
    let mut png = Vec::new();
    output::encode_png(&mut png, img, &[])?;
    Ok(Some(png))
}

/// Writes the first image's preview; a failure is logged, the run goes on.
pub(crate) fn write_preview(path: &std::path::Path, x0: &lumina2_pipeline::candle_core::Tensor) {
    let result = preview_png(x0).and_then(|png| match png {
        Some(png) => output::write_atomically(path, |w| Ok(w.write_all(&png)?)),
        None => Ok(()),
    });
    if let Err(e) = result {
        tracing::warn!("preview {}: {e:#}", path.display());
    }
}

/// What TeaCache did in a run: the transformer calls that skipped their
/// joint layers, and all calls.
pub(crate) fn cache_summary(computed: &[bool]) -> (usize, usize) {
    (computed.iter().filter(|&&c| !c).count(), computed.len())
}

/// What [`render`] measured.
pub(crate) struct Rendered {
    pub(crate) timings: StageTimings,
    /// With TeaCache: [`cache_summary`].
    pub(crate) cache: Option<(usize, usize)>,
}

/// Generates `opts` on `model` and writes the latents (`--output-latents`)
/// and each image to its path in `outputs`; returns the stage timings.
pub(crate) fn render(
    model: &mut Model,
    args: &GenerateArgs,
    opts: &GenerateOptions,
    outputs: &[PathBuf],
    quiet: bool,
) -> Result<Rendered> {
    let pipe = &mut model.pipe;
    let decode_delay = test_decode_delay();
    let (width, height) = usage(pipe.resolve_size(opts).map_err(cli_option))?;
    if !args.no_memory_check {
        pipe.check_memory(opts)?;
    }
    signals::check(|| " before denoising; no image was written".into())?;
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template(
                "{prefix:>9} [{bar:30}] {pos}/{len} steps  {msg}  ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b.set_prefix("denoising");
        b
    };
    let steps_done = AtomicUsize::new(0);
    let mut observer = |e: Event<'_>| -> Control {
        match e {
            Event::StageStarted(stage) => {
                tracing::info!("{} ...", stage.name());
                if let (Stage::Decode, Some(d)) = (stage, decode_delay) {
                    std::thread::sleep(d);
                }
            }
            Event::StageFinished(stage, d) => {
                tracing::info!("{} done in {:.2} s", stage.name(), d.as_secs_f64());
            }
            Event::Step(s) => {
                steps_done.store(s.step, Ordering::SeqCst);
                if bar.length() != Some(s.num_steps as u64) {
                    bar.set_length(s.num_steps as u64);
                    bar.reset_eta();
                }
                bar.set_position(s.step as u64);
                let secs = s.elapsed.as_secs_f64().max(1e-9);
                bar.set_message(if secs >= 1.0 {
                    format!("{secs:.2} s/it")
                } else {
                    format!("{:.2} it/s", 1.0 / secs)
                });
                if let (Some(x0), Some(path)) = (s.denoised, &args.preview) {
                    write_preview(path, x0);
                }
                tracing::debug!(
                    "step {}/{} t={} sigma={} guidance={} calls={} {:.3} s",
                    s.step,
                    s.num_steps,
                    s.timestep,
                    s.sigma,
                    s.guidance,
                    s.model_calls,
                    secs
                );
            }
        }
        if signals::received().is_some() {
            Control::Stop
        } else {
            Control::Continue
        }
    };
    let result = pipe.generate(opts, &mut observer);
    bar.finish_and_clear();
    let out = match result {
        Ok(out) => out,
        Err(PipelineError::Stopped { step, steps }) => {
            signals::check(|| format!(" after step {step} of {steps}; no image was written"))?;
            bail!("stopped after step {step} of {steps}");
        }
        Err(e) => return Err(e.into()),
    };
    // A signal while decoding: the images are dropped, not written.
    signals::check(|| " after decoding; no image was written".into())?;
    for w in &out.warnings {
        tracing::warn!("{w}");
    }
    let cache = out.cache_computed.as_deref().map(cache_summary);
    if let (Some((skipped, calls)), false) = (cache, quiet) {
        eprintln!("TeaCache: skipped the joint layers in {skipped} of {calls} transformer calls");
    }
    if let Some(path) = &args.output_latents {
        let tensors = std::collections::HashMap::from([
            ("latents".to_string(), out.latents.clone()),
            ("initial_latents".to_string(), out.initial_latents.clone()),
        ]);
        output::write_via_temp(path, |tmp| {
            lumina2_pipeline::candle_core::safetensors::save(&tensors, tmp)
                .context("writing the latents")
        })?;
        if !quiet {
            eprintln!("wrote {}", path.display());
        }
    }
    if !args.latents_only {
        let images = out.rgb_images()?;
        let texts = png_texts(model, args, opts, width, height);
        for (i, ((img, path), meta)) in images.iter().zip(outputs).zip(&texts).enumerate() {
            output::write_png(path, img, meta).map_err(|e| written_so_far(e, &outputs[..i]))?;
            if !quiet {
                eprintln!("wrote {}", path.display());
            }
        }
    }
    let t = out.timings;
    if !quiet {
        print_timings(&t);
    }
    Ok(Rendered { timings: t, cache })
}

/// The `timings:` and `denoising:` lines on stderr (read by `cargo xtask
/// bench --what e2e`).
pub(crate) fn print_timings(t: &StageTimings) {
    let parts: Vec<String> = t
        .stages
        .iter()
        .map(|(s, d)| format!("{} {:.2} s", s.name(), d.as_secs_f64()))
        .collect();
    eprintln!(
        "timings: {} (total {:.2} s)",
        parts.join(", "),
        t.total().as_secs_f64()
    );
    if let Some(mean) = mean(&t.steps) {
        eprintln!(
            "denoising: {} steps, {:.3} s/step",
            t.steps.len(),
            mean.as_secs_f64()
        );
    }
}

/// The PNG text chunks of each image of a request (`width` x `height`, as
/// resolved) on the model named `model`, in batch order.
pub(crate) fn png_texts(
    model: &Model,
    args: &GenerateArgs,
    opts: &GenerateOptions,
    width: usize,
    height: usize,
) -> Vec<Vec<(String, String)>> {
    let prompts_per_image = prompt_of_each_image(opts);
    seeds_of(opts)
        .iter()
        .enumerate()
        .map(|(i, &seed)| {
            metadata(
                args,
                opts,
                model,
                seed,
                width,
                height,
                &prompts_per_image,
                i,
            )
        })
        .collect()
}

/// An interruption between two images says which were written before it.
fn written_so_far(e: anyhow::Error, written: &[PathBuf]) -> anyhow::Error {
    match e.downcast::<signals::Interrupted>() {
        Ok(mut i) => {
            i.when.push_str(&match written.len() {
                0 => "; no image was written".to_string(),
                n => format!("; the {n} image(s) before it were written"),
            });
            i.into()
        }
        Err(e) => e,
    }
}

fn mean(d: &[Duration]) -> Option<Duration> {
    if d.is_empty() {
        None
    } else {
        Some(d.iter().sum::<Duration>() / d.len() as u32)
    }
}

/// Prompt and negative prompt of each image, in batch order (p0 p0 p1 p1).
fn prompt_of_each_image(opts: &GenerateOptions) -> Vec<(String, String)> {
    let Conditioning::Prompts {
        prompts,
        negative_prompts,
    } = &opts.conditioning
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let neg = match negative_prompts {
            Some(n) if n.len() == 1 => n[0].clone(),
            Some(n) => n.get(i).cloned().unwrap_or_default(),
            None => String::new(),
        };
        for _ in 0..opts.num_images_per_prompt {
            out.push((p.clone(), neg.clone()));
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn metadata(
    args: &GenerateArgs,
    opts: &GenerateOptions,
    model: &Model,
    seed: u64,
    width: usize,
    height: usize,
    prompts: &[(String, String)],
    index: usize,
) -> Vec<(String, String)> {
    let (prompt, negative) = prompts.get(index).cloned().unwrap_or_default();
    let sampler = match args.sampler {
        SamplerArg::Euler => "euler",
        SamplerArg::Midpoint => "midpoint",
    };
    let guidance_mode = match args.guidance_mode {
        GuidanceArg::Diffusers => "diffusers",
        GuidanceArg::Original => "original",
    };
    let mut m = vec![
        ("pipeline".to_string(), "Lumina2Pipeline".to_string()),
        ("prompt".to_string(), prompt),
        ("negative_prompt".to_string(), negative),
        ("seed".to_string(), seed.to_string()),
        (
            "num_inference_steps".to_string(),
            opts.num_inference_steps.to_string(),
        ),
        (
            "guidance_scale".to_string(),
            opts.guidance_scale.to_string(),
        ),
        (
            "cfg_trunc_ratio".to_string(),
            opts.cfg_trunc_ratio.to_string(),
        ),
        (
            "cfg_normalization".to_string(),
            opts.cfg_normalization.to_string(),
        ),
        ("width".to_string(), width.to_string()),
        ("height".to_string(), height.to_string()),
        ("sampler".to_string(), sampler.to_string()),
        ("guidance_mode".to_string(), guidance_mode.to_string()),
        ("model".to_string(), model.name.clone()),
        ("dtype".to_string(), model.pipe.dtype().as_str().to_string()),
        (
            "max_sequence_length".to_string(),
            opts.max_sequence_length.to_string(),
        ),
        (
            "software".to_string(),
            format!("lumina2-rs {}", env!("CARGO_PKG_VERSION")),
        ),
    ];
    if let Some(s) = Lumina2Pipeline::system_prompt_text(opts) {
        m.push(("system_prompt".to_string(), s.to_string()));
    }
    if let Some(s) = &opts.sigmas {
        let v: Vec<String> = s.iter().map(|x| x.to_string()).collect();
        m.push(("sigmas".to_string(), v.join(",")));
    }
    for l in &args.lora {
        m.push(("lora".to_string(), l.clone()));
    }
    if let Some(t) = opts.cache_threshold {
        m.push(("cache_threshold".to_string(), t.to_string()));
    }
    if opts.guidance_mode == GuidanceMode::Original {
        m.push(("renorm_cfg".to_string(), opts.renorm_cfg.to_string()));
    }
    m.extend(init_image::metadata(
        &args.init,
        init_image::DEFAULT_STRENGTH,
    ));
    let parameters = a1111_parameters(&A1111 {
        prompt: &m[1].1,
        negative_prompt: &m[2].1,
        steps: opts.num_inference_steps,
        sampler,
        cfg_scale: opts.guidance_scale,
        seed,
        width,
        height,
        model: &model.name,
    });
    m.push(("parameters".to_string(), parameters));
    m
}

/// The fields of the `parameters` text chunk.
pub(crate) struct A1111<'a> {
    pub(crate) prompt: &'a str,
    pub(crate) negative_prompt: &'a str,
    pub(crate) steps: usize,
    pub(crate) sampler: &'a str,
    pub(crate) cfg_scale: f64,
    pub(crate) seed: u64,
    pub(crate) width: usize,
    pub(crate) height: usize,
    pub(crate) model: &'a str,
}

/// The `parameters` text of AUTOMATIC1111's web UI, which image browsers and
/// sharing sites parse: the prompt, `Negative prompt: ...` when there is one,
/// then `key: value` pairs on one last line. Values holding `,` or `:` are
/// quoted as A1111 quotes them, so the line still splits.
pub(crate) fn a1111_parameters(p: &A1111) -> String {
    let sampler = match p.sampler {
        "euler" => "Euler",
        "midpoint" => "Midpoint",
        other => other,
    };
    let mut s = p.prompt.to_string();
    if !p.negative_prompt.is_empty() {
        s.push_str("\nNegative prompt: ");
        s.push_str(p.negative_prompt);
    }
    let pairs = [
        ("Steps", p.steps.to_string()),
        ("Sampler", sampler.to_string()),
        ("CFG scale", python_float(p.cfg_scale)),
        ("Seed", p.seed.to_string()),
        ("Size", format!("{}x{}", p.width, p.height)),
        ("Model", p.model.to_string()),
        (
            "Version",
            format!("lumina2-rs {}", env!("CARGO_PKG_VERSION")),
        ),
    ];
    let line: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}: {}", a1111_quote(v)))
        .collect();
    s.push('\n');
    s.push_str(&line.join(", "));
    s
}

/// A1111's `quote`: a value with a comma, a colon or a newline is written as
/// a JSON string (non-ASCII kept, as its `ensure_ascii=False`).
fn a1111_quote(v: &str) -> String {
    if v.contains([',', ':', '\n']) {
        serde_json::to_string(v).unwrap_or_else(|_| v.to_string())
    } else {
        v.to_string()
    }
}

/// A float as Python's `str` writes it (`4.0`, `4.5`), as A1111's files hold.
fn python_float(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e16 {
        format!("{v:.1}")
    } else {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lumina2_pipeline::candle_core::Tensor;

    /// What a server job sends is the file `--preview` writes.
    #[test]
    fn the_preview_bytes_are_the_preview_file() {
        let x0 = Tensor::randn(0f32, 1., (2, 16, 4, 6), &Device::Cpu).unwrap();
        let png = preview_png(&x0).unwrap().unwrap();
        let path = std::env::temp_dir().join(format!("lumina2-preview-{}.png", std::process::id()));
        write_preview(&path, &x0);
        let file = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(png, file);
        // The first image of the batch, at latent resolution.
        let img = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (6, 4));
        let first = x0.narrow(0, 0, 1).unwrap();
        let expect = lumina2_pipeline::preview::latents_to_rgb(&first).unwrap();
        assert_eq!(img.as_raw(), expect[0].as_raw());
        // Other channel counts make none (the job goes on without).
        let four = Tensor::zeros((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(preview_png(&four).is_err());
    }
}
