//! `lumina2 generate` on a Z-Image pipeline folder: `--model` names a
//! diffusers folder whose `model_index.json` says `ZImagePipeline`.
//!
//! The Lumina2-only options are refused with the reason, rather than
//! silently ignored; the shared ones left unset take diffusers'
//! `ZImagePipeline` defaults (50 steps, guidance 5, 512 tokens).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lumina2_loader::{PipelineFolder, PipelineKind};
use lumina2_pipeline::{
    Control, Event, Noise, OutputKind, ZImageOptions, ZImagePipeline, ZImageSources,
};

use crate::generate::{
    a1111_parameters, cli_option, parse_device, prepare_output, random_seed, resolve_dtype, usage,
    GenerateArgs, GuidanceArg, SamplerArg, A1111,
};
use crate::{output, signals};

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
        (
            "--int8",
            args.int8,
            "not wired for the Z-Image transformer yet",
        ),
        (
            "--lora",
            !args.lora.is_empty(),
            "Z-Image LoRAs are not supported yet",
        ),
        (
            "--transformer",
            args.transformer.is_some(),
            "the folder's components are used",
        ),
        (
            "--transformer-config",
            args.transformer_config.is_some(),
            "the folder's components are used",
        ),
        (
            "--text-encoder",
            args.text_encoder.is_some(),
            "the folder's components are used",
        ),
        (
            "--text-encoder-config",
            args.text_encoder_config.is_some(),
            "the folder's components are used",
        ),
        (
            "--tokenizer",
            args.tokenizer.is_some(),
            "the folder's components are used",
        ),
        (
            "--vae",
            args.vae.is_some(),
            "the folder's components are used",
        ),
        (
            "--vae-config",
            args.vae_config.is_some(),
            "the folder's components are used",
        ),
        (
            "--scheduler-config",
            args.scheduler_config.is_some(),
            "the folder's components are used",
        ),
        ("--vae-tiling", args.vae_tiling, "not wired for Z-Image yet"),
        (
            "--preview",
            args.preview.is_some(),
            "not wired for Z-Image yet",
        ),
        (
            "--from-file",
            args.batch.from_file.is_some(),
            "not wired for Z-Image yet",
        ),
    ]
}

/// The request of the command line, with diffusers' Z-Image defaults for
/// what is not given; each image `i` uses seed `seed + i`.
pub(crate) fn options(args: &GenerateArgs, seed: u64) -> Result<ZImageOptions> {
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
    o.validate().map_err(cli_option)?;
    let batch = o.batch_size().map_err(cli_option)?;
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
    let seed = args.seed.unwrap_or_else(random_seed);
    let opts = usage(options(&args, seed))?;
    usage(crate::generate::set_threads(args.threads))?;
    let seeds = match &opts.noise {
        Noise::Seeds(s) => s.clone(),
        _ => vec![seed],
    };
    let outputs: Vec<PathBuf> = if args.latents_only {
        Vec::new()
    } else {
        seeds
            .iter()
            .enumerate()
            .map(|(i, &s)| output::output_path(&args.output, Some(s), i, seeds.len()))
            .collect()
    };
    for p in outputs.iter().chain(args.output_latents.iter()) {
        prepare_output(p)?;
    }
    signals::install()?;
    let device = usage(parse_device(&args.device))?;
    let dtype = resolve_dtype(&args, &device, quiet);
    let model = args.model.clone().unwrap_or_default();
    let sources = ZImageSources::from_pipeline_folder(&model)?;
    let mut pipe = ZImagePipeline::builder(sources)
        .dtype(dtype)
        .device(device)
        .build()?;
    let (width, height) = usage(pipe.resolve_size(&opts).map_err(cli_option))?;
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
            }
        }
        if signals::received().is_some() {
            Control::Stop
        } else {
            Control::Continue
        }
    };
    let out = match pipe.generate(&opts, &mut observer) {
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
        for (i, (img, path)) in images.iter().zip(&outputs).enumerate() {
            let p = i / opts.num_images_per_prompt.max(1);
            let prompt = opts.prompts.get(p).cloned().unwrap_or_default();
            let negative = negatives.get(p).cloned().unwrap_or_default();
            let mut meta = metadata(
                &opts,
                (&prompt, &negative),
                seeds[i],
                (width, height),
                &model,
                &pipe,
            );
            meta.extend(crate::init_image::metadata(
                &args.init,
                zimage_strength(&args),
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
    Ok(())
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

/// The PNG text chunks of one image; `pipeline` says which pipeline made it.
fn metadata(
    opts: &ZImageOptions,
    (prompt, negative): (&str, &str),
    seed: u64,
    (width, height): (usize, usize),
    model: &str,
    pipe: &ZImagePipeline,
) -> Vec<(String, String)> {
    let mut m = vec![
        ("pipeline".to_string(), "ZImagePipeline".to_string()),
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
