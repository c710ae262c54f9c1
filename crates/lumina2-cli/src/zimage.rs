//! `lumina2 generate` on a Z-Image pipeline folder: `--model` names a
//! diffusers folder whose `model_index.json` says `ZImagePipeline`.
//!
//! The Lumina2-only options are refused with the reason, rather than
//! silently ignored; the shared ones left unset take diffusers'
//! `ZImagePipeline` defaults (50 steps, guidance 5, 512 tokens). The
//! component options (`--transformer`, `--text-encoder`, `--vae`, ...),
//! `--lora`, `--int8`, `--preview`, `--vae-tiling` and `--from-file` mean
//! what they mean for Lumina2 (see `generate` and `batch`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lumina2_loader::{PipelineFolder, PipelineKind};
use lumina2_pipeline::{
    Control, Event, LoraSpec, Noise, OutputKind, ZImageOptions, ZImagePipeline, ZImageSources,
};

use crate::generate::{
    a1111_parameters, check_int8_device, check_lora_files, model_name, named_option, parse_device,
    parse_loras, prepare_output, random_seed, resolve_dtype, usage, write_preview, Components,
    GenerateArgs, GuidanceArg, Rendered, SamplerArg, A1111,
};
use crate::{batch, output, signals};

/// Whether `--model` is a local folder holding a Z-Image pipeline.
pub(crate) fn is_zimage(args: &GenerateArgs) -> Result<bool> {
    let Some(model) = args.model.as_deref() else {
        return Ok(false);
    };
    let root = Path::new(model);
    if !root.join("model_index.json").is_file() {
        return Ok(false);
    }
    // Any kind is read here; a Lumina2 folder is opened again by its own path.
    match PipelineFolder::open_any(root) {
        Ok(f) => Ok(f.kind() == PipelineKind::ZImage),
        Err(_) => Ok(false),
    }
}

/// The Lumina2 options a Z-Image run refuses: (flag, given, why).
fn lumina2_only(args: &GenerateArgs) -> Vec<(&'static str, bool, &'static str)> {
    vec![
        (
            "--system-prompt",
            args.system_prompt.is_some(),
            "Z-Image has no system prompt (its prompt goes through Qwen3's chat template)",
        ),
        (
            "--system-preset",
            args.system_preset.is_some(),
            "Z-Image has no system prompt",
        ),
        (
            "--cfg-trunc-ratio",
            args.cfg_trunc_ratio != 1.0,
            "use --cfg-truncation",
        ),
        (
            "--no-cfg-normalization",
            args.no_cfg_normalization,
            "Z-Image's normalization is off unless --cfg-normalization is given",
        ),
        (
            "--renorm-cfg",
            args.renorm_cfg != 1.0,
            "use --cfg-normalization",
        ),
        (
            "--cache-threshold",
            args.cache_threshold.is_some(),
            "TeaCache is calibrated for Lumina2",
        ),
        (
            "--sampler",
            !matches!(args.sampler, SamplerArg::Euler),
            "Z-Image runs diffusers' Euler steps",
        ),
        (
            "--guidance-mode",
            !matches!(args.guidance_mode, GuidanceArg::Diffusers),
            "the original mode is Lumina2's sampler",
        ),
    ]
}

/// The request of the command line, with diffusers' Z-Image defaults for
/// what is not given; each image `i` uses seed `seed + i`.
pub(crate) fn options(args: &GenerateArgs, seed: u64) -> Result<ZImageOptions> {
    options_named(args, seed, |option| {
        format!("--{}", option.replace('_', "-"))
    })
}

/// [`options`], with `name` spelling the library's option names in errors
/// (a batch line's fields).
pub(crate) fn options_named(
    args: &GenerateArgs,
    seed: u64,
    name: impl Fn(&str) -> String,
) -> Result<ZImageOptions> {
    let named = |e| named_option(e, &name);
    for (flag, given, why) in lumina2_only(args) {
        if given {
            bail!("{flag} does not apply to a Z-Image pipeline: {why}");
        }
    }
    let mut o = ZImageOptions::with_prompts(args.prompt.clone());
    if !args.negative_prompt.is_empty() {
        o.negative_prompts = Some(args.negative_prompt.clone());
    }
    o.width = args.width;
    o.height = args.height;
    if let Some(n) = args.num_inference_steps {
        o.num_inference_steps = n;
    }
    if let Some(g) = args.guidance_scale {
        o.guidance_scale = g;
    }
    if let Some(f) = args.cfg_normalization {
        o.cfg_normalization = f;
    }
    if let Some(t) = args.cfg_truncation {
        o.cfg_truncation = t;
    }
    if let Some(n) = args.max_sequence_length {
        o.max_sequence_length = n;
    }
    o.sigmas = args.sigmas.clone();
    // `--image` / `--mask-image`: ZImageImg2ImgPipeline / ZImageInpaintPipeline
    // (strength defaults 0.6 and 1.0, as theirs).
    o.image_to_image = crate::init_image::read_request(&args.init, zimage_strength(args))?;
    o.num_images_per_prompt = args.num_images_per_prompt;
    o.output = if args.latents_only {
        OutputKind::Latents
    } else {
        OutputKind::Images
    };
    o.preview_every = args.preview.is_some().then_some(args.preview_every);
    o.validate().map_err(named)?;
    let batch = o.batch_size().map_err(named)?;
    let seeds = (0..batch as u64)
        .map(|i| {
            seed.checked_add(i)
                .with_context(|| format!("--seed {seed}: seed + {i} overflows"))
        })
        .collect::<Result<Vec<_>>>()?;
    o.noise = Noise::Seeds(seeds);
    Ok(o)
}

/// `lumina2 generate --model <Z-Image folder>`.
pub(crate) fn run(args: GenerateArgs, quiet: bool) -> Result<()> {
    if args.batch.from_file.is_some() {
        return batch::run_zimage(args, quiet);
    }
    usage(args.batch.check_need_file())?;
    let seed = args.seed.unwrap_or_else(random_seed);
    let opts = usage(options(&args, seed))?;
    let loras = usage(parse_loras(&args))?;
    usage(crate::generate::set_threads(args.threads))?;
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
    signals::install()?;
    let mut model = load(&args, loras, false, quiet)?;
    render(&mut model, &args, &opts, &outputs, quiet)?;
    Ok(())
}

/// The seed of each image (the options hold one per image).
pub(crate) fn seeds_of(opts: &ZImageOptions) -> &[u64] {
    match &opts.noise {
        Noise::Seeds(s) => s,
        _ => &[],
    }
}

/// The image files of a request: `pattern` (`-o`) expanded for each image.
pub(crate) fn output_paths(pattern: &str, opts: &ZImageOptions) -> Vec<PathBuf> {
    let seeds = seeds_of(opts);
    seeds
        .iter()
        .enumerate()
        .map(|(i, &s)| output::output_path(pattern, Some(s), i, seeds.len()))
        .collect()
}

/// A built Z-Image pipeline and the model name its images record.
pub(crate) struct ZModel {
    pub(crate) pipe: ZImagePipeline,
    pub(crate) name: String,
}

/// The pipeline folder of `--model` with the command line's components
/// put in, as Lumina2's `generate` puts them in.
fn sources(args: &GenerateArgs, loras: Vec<LoraSpec>) -> Result<ZImageSources> {
    let model = args.model.clone().unwrap_or_default();
    let mut s = ZImageSources::from_pipeline_folder(&model)
        .with_context(|| format!("opening pipeline folder {model}"))?;
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
        s.scheduler_config = p.clone();
    }
    s.loras = loras;
    Ok(s)
}

/// Opens the device, resolves the sources and builds the pipeline
/// (`keep_resident`: every component stays loaded between generations).
pub(crate) fn load(
    args: &GenerateArgs,
    loras: Vec<LoraSpec>,
    keep_resident: bool,
    quiet: bool,
) -> Result<ZModel> {
    let device = usage(parse_device(&args.device))?;
    check_int8_device(args, &device)?;
    let dtype = resolve_dtype(args, &device, quiet);
    let sources = sources(args, loras)?;
    signals::check(|| " before loading; no image was written".into())?;
    check_lora_files(&sources.loras)?;
    let pipe = ZImagePipeline::builder(sources)
        .dtype(dtype)
        .device(device)
        .vae_tiling(args.vae_tiling)
        .int8_transformer(args.int8)
        .keep_resident(keep_resident)
        .build()?;
    Ok(ZModel {
        pipe,
        name: model_name(args),
    })
}

/// Generates `opts` on `model` and writes the latents (`--output-latents`)
/// and each image to its path in `outputs`; returns the stage timings.
pub(crate) fn render(
    model: &mut ZModel,
    args: &GenerateArgs,
    opts: &ZImageOptions,
    outputs: &[PathBuf],
    quiet: bool,
) -> Result<Rendered> {
    let pipe = &mut model.pipe;
    let (width, height) = usage(pipe.resolve_size(opts).map_err(crate::generate::cli_option))?;
    signals::check(|| " before denoising; no image was written".into())?;
    let mut observer = |e: Event<'_>| -> Control {
        match e {
            Event::StageStarted(stage) => tracing::info!("{} ...", stage.name()),
            Event::StageFinished(stage, d) => {
                tracing::info!("{} done in {:.2} s", stage.name(), d.as_secs_f64())
            }
            Event::Step(s) => {
                if !quiet {
                    eprintln!(
                        "step {}/{} ({:.2} s)",
                        s.step,
                        s.num_steps,
                        s.elapsed.as_secs_f64()
                    );
                }
                if let (Some(x0), Some(path)) = (s.denoised, &args.preview) {
                    write_preview(path, x0);
                }
            }
        }
        if signals::received().is_some() {
            Control::Stop
        } else {
            Control::Continue
        }
    };
    let out = match pipe.generate(opts, &mut observer) {
        Ok(out) => out,
        Err(lumina2_pipeline::Error::Stopped { step, steps }) => {
            signals::check(|| format!(" after step {step} of {steps}; no image was written"))?;
            bail!("stopped after step {step} of {steps}");
        }
        Err(e) => return Err(e.into()),
    };
    signals::check(|| " after decoding; no image was written".into())?;
    for w in &out.warnings {
        tracing::warn!("{w}");
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
        let negatives = opts.negatives();
        let seeds = seeds_of(opts);
        for (i, (img, path)) in images.iter().zip(outputs).enumerate() {
            let p = i / opts.num_images_per_prompt.max(1);
            let prompt = opts.prompts.get(p).cloned().unwrap_or_default();
            let negative = negatives.get(p).cloned().unwrap_or_default();
            let mut meta = metadata(
                args,
                opts,
                (&prompt, &negative),
                seeds.get(i).copied().unwrap_or_default(),
                (width, height),
                (&model.name, pipe),
            );
            meta.extend(crate::init_image::metadata(
                &args.init,
                zimage_strength(args),
            ));
            output::write_png(path, img, &meta)?;
            if !quiet {
                eprintln!("wrote {}", path.display());
            }
        }
    }
    if !quiet {
        crate::generate::print_timings(&out.timings);
    }
    Ok(Rendered {
        timings: out.timings,
        cache: None,
    })
}

/// The default `--strength` of diffusers' Z-Image pipelines: 0.6 for
/// image-to-image, 1.0 for inpainting.
fn zimage_strength(args: &GenerateArgs) -> f64 {
    if args.init.mask_image.is_some() {
        1.0
    } else {
        crate::init_image::DEFAULT_STRENGTH
    }
}

/// diffusers' class of the run: `ZImagePipeline`, or, with `--image`,
/// `ZImageImg2ImgPipeline` / `ZImageInpaintPipeline` (with `--mask-image`),
/// the classes whose semantics the run follows. (Lumina2's image runs keep
/// `Lumina2Pipeline`: diffusers has no Lumina2 image-to-image class.)
fn pipeline_class(args: &GenerateArgs) -> &'static str {
    match (&args.init.image, &args.init.mask_image) {
        (None, _) => "ZImagePipeline",
        (Some(_), None) => "ZImageImg2ImgPipeline",
        (Some(_), Some(_)) => "ZImageInpaintPipeline",
    }
}

/// The PNG text chunks of one image; `pipeline` says which pipeline made it.
fn metadata(
    args: &GenerateArgs,
    opts: &ZImageOptions,
    (prompt, negative): (&str, &str),
    seed: u64,
    (width, height): (usize, usize),
    (model, pipe): (&str, &ZImagePipeline),
) -> Vec<(String, String)> {
    let mut m = vec![
        ("pipeline".to_string(), pipeline_class(args).to_string()),
        ("prompt".to_string(), prompt.to_string()),
        ("negative_prompt".to_string(), negative.to_string()),
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
            "cfg_normalization".to_string(),
            opts.cfg_normalization.to_string(),
        ),
        (
            "cfg_truncation".to_string(),
            opts.cfg_truncation.to_string(),
        ),
        ("width".to_string(), width.to_string()),
        ("height".to_string(), height.to_string()),
        ("sampler".to_string(), "euler".to_string()),
        ("model".to_string(), model.to_string()),
        ("dtype".to_string(), pipe.dtype().as_str().to_string()),
        (
            "max_sequence_length".to_string(),
            opts.max_sequence_length.to_string(),
        ),
        (
            "software".to_string(),
            format!("lumina2-rs {}", env!("CARGO_PKG_VERSION")),
        ),
    ];
    if let Some(s) = &opts.sigmas {
        let v: Vec<String> = s.iter().map(|x| x.to_string()).collect();
        m.push(("sigmas".to_string(), v.join(",")));
    }
    for l in &args.lora {
        m.push(("lora".to_string(), l.clone()));
    }
    let parameters = a1111_parameters(&A1111 {
        prompt,
        negative_prompt: negative,
        steps: opts.num_inference_steps,
        sampler: "euler",
        cfg_scale: opts.guidance_scale,
        seed,
        width,
        height,
        model,
    });
    m.push(("parameters".to_string(), parameters));
    m
}
