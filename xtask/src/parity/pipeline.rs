//! `pipeline` cases: prompts to images through [`Lumina2Pipeline`].

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use lumina2_pipeline::{
    source_image, Conditioning, GenerateOptions, Generation, GuidanceMode, ImageToImage,
    Lumina2Pipeline, Noise, PipelineSources, SolverKind, SystemPrompt,
};

use super::text_encoder::strings;
use super::Case;
use super::Prepared;

struct PipelineCase {
    pipe: Lumina2Pipeline,
    opts: GenerateOptions,
}

pub fn prepare(case: &Case) -> Result<Box<dyn Prepared>> {
    let args = CaseArgs(case);
    let get = |k: &str| args.get(k);
    let (prompts, negative_prompts) = args.prompts()?;
    let mut opts = GenerateOptions::with_prompts(prompts.clone());
    opts.conditioning = Conditioning::Prompts {
        prompts,
        negative_prompts,
    };
    let float = |k: &str| args.float(k);
    set_size_steps_guidance!(opts, args);
    if let Some(v) = float("cfg_trunc_ratio")? {
        opts.cfg_trunc_ratio = v;
    }
    if let Some(v) = get("cfg_normalization") {
        opts.cfg_normalization = v
            .as_bool()
            .ok_or_else(|| anyhow!("`cfg_normalization` must be a boolean"))?;
    }
    match get("system_prompt") {
        None => {}
        Some(serde_json::Value::String(s)) => opts.system_prompt = SystemPrompt::Text(s.clone()),
        Some(_) => bail!("`system_prompt` must be a string or null"),
    }
    set_length_batch_sigmas!(opts, args);
    opts.cache_threshold = float("cache_threshold")?;
    opts.image_to_image = image_to_image(case)?;
    match get("guidance_mode").map(|v| v.as_str()) {
        None => {}
        Some(Some("diffusers")) => opts.guidance_mode = GuidanceMode::Diffusers,
        Some(Some("original")) => opts.guidance_mode = GuidanceMode::Original,
        Some(_) => bail!("`guidance_mode` must be \"diffusers\" or \"original\""),
    }
    match get("solver").map(|v| v.as_str()) {
        None => {}
        Some(Some("euler")) => opts.solver = SolverKind::Euler,
        Some(Some("midpoint")) => opts.solver = SolverKind::Midpoint,
        Some(_) => bail!("`solver` must be \"euler\" or \"midpoint\""),
    }
    if let Some(v) = float("renorm_cfg")? {
        opts.renorm_cfg = v;
    }
    let inputs = case.inputs()?;
    opts.noise = match inputs.get("latents") {
        Some(l) => Noise::Latents(l.clone()),
        None => Noise::Seed(
            get("seed")
                .and_then(|v| v.as_u64())
                .ok_or_else(|| anyhow!("a case without `latents` needs an integer `seed`"))?,
        ),
    };
    let model_path = case.model()?;
    let sources = PipelineSources::from_pipeline_folder(model_path)
        .with_context(|| format!("opening {}", model_path.display()))?;
    // Resident components: `--time` repeats the run without reloading.
    let pipe = Lumina2Pipeline::builder(sources)
        .dtype(case.dtype)
        .device(Device::Cpu)
        .keep_resident(true)
        .build()?;
    Ok(Box::new(PipelineCase { pipe, opts }))
}

impl Prepared for PipelineCase {
    fn run(&mut self) -> Result<BTreeMap<String, Tensor>> {
        let out = self
            .pipe
            .generate(&self.opts, &mut |_| Default::default())?;
        outputs(out)
    }
}

/// What a run of either pipeline gives the comparison: the images, the
/// initial and final latents, and where there are any, TeaCache's flags and
/// the image-to-image latents.
pub(super) fn outputs(out: Generation) -> Result<BTreeMap<String, Tensor>> {
    let mut m = BTreeMap::new();
    if let Some(images) = out.images {
        m.insert("image".to_string(), images);
    }
    m.insert("initial_latents".to_string(), out.initial_latents);
    m.insert("latents".to_string(), out.latents);
    if let Some(computed) = out.cache_computed {
        let flags: Vec<f32> = computed.iter().map(|&c| f32::from(u8::from(c))).collect();
        let n = flags.len();
        m.insert(
            "cache_computed".to_string(),
            Tensor::from_vec(flags, n, &Device::Cpu)?,
        );
    }
    if let Some(l) = out.image_latents {
        m.insert("image_latents".to_string(), l);
    }
    if let Some(l) = out.noised_latents {
        m.insert("noised_latents".to_string(), l);
    }
    Ok(m)
}

/// `args.image`, `args.mask_image` and `args.strength` of a case (PNG files
/// inside it): the image-to-image request of either pipeline, if any.
pub(super) fn image_to_image(case: &Case) -> Result<Option<ImageToImage>> {
    let get = |k: &str| case.args.get(k).filter(|v| !v.is_null());
    let Some(image) = get("image") else {
        return Ok(None);
    };
    let file = |field: &str, v: &serde_json::Value| -> Result<_> {
        let rel = v
            .as_str()
            .ok_or_else(|| anyhow!("`{field}` must be a path"))?;
        Ok(source_image::read_rgb(
            &case.path(&format!("args.{field}"), rel)?,
        )?)
    };
    let image = file("image", image)?;
    let mask = get("mask_image")
        .map(|m| file("mask_image", m))
        .transpose()?;
    let strength = get("strength")
        .and_then(|v| v.as_f64())
        .ok_or_else(|| anyhow!("a case with an `image` needs a number `strength`"))?;
    Ok(Some(ImageToImage {
        image,
        mask,
        strength,
    }))
}

/// A pipeline case's `args` (null reads as absent), with the readers both
/// pipelines' cases use.
pub(super) struct CaseArgs<'a>(pub &'a Case);

impl<'a> CaseArgs<'a> {
    pub fn get(&self, k: &str) -> Option<&'a serde_json::Value> {
        self.0.args.get(k).filter(|v| !v.is_null())
    }

    pub fn uint(&self, k: &str) -> Result<Option<usize>> {
        self.get(k)
            .map(|v| {
                v.as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| anyhow!("`{k}` must be a non-negative integer"))
            })
            .transpose()
    }

    pub fn float(&self, k: &str) -> Result<Option<f64>> {
        self.get(k)
            .map(|v| v.as_f64().ok_or_else(|| anyhow!("`{k}` must be a number")))
            .transpose()
    }

    /// `prompt` (required) and `negative_prompt`.
    pub fn prompts(&self) -> Result<(Vec<String>, Option<Vec<String>>)> {
        let prompts = strings(
            self.get("prompt")
                .ok_or_else(|| anyhow!("args has no `prompt`"))?,
            "prompt",
        )?;
        let negative_prompts = self
            .get("negative_prompt")
            .map(|v| strings(v, "negative_prompt"))
            .transpose()?;
        Ok((prompts, negative_prompts))
    }

    pub fn sigmas(&self) -> Result<Option<Vec<f64>>> {
        self.get("sigmas")
            .map(|v| {
                v.as_array()
                    .and_then(|a| a.iter().map(|x| x.as_f64()).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| anyhow!("`sigmas` must be a list of numbers"))
            })
            .transpose()
    }
}

/// `height`, `width`, `num_inference_steps` and `guidance_scale` from a
/// case's [`CaseArgs`]: the same fields in both pipelines' options.
macro_rules! set_size_steps_guidance {
    ($opts:ident, $args:ident) => {
        $opts.height = $args.uint("height")?;
        $opts.width = $args.uint("width")?;
        if let Some(n) = $args.uint("num_inference_steps")? {
            $opts.num_inference_steps = n;
        }
        if let Some(v) = $args.float("guidance_scale")? {
            $opts.guidance_scale = v;
        }
    };
}
pub(super) use set_size_steps_guidance;

/// `max_sequence_length`, `num_images_per_prompt` and `sigmas` from a
/// case's [`CaseArgs`]: the same fields in both pipelines' options.
macro_rules! set_length_batch_sigmas {
    ($opts:ident, $args:ident) => {
        if let Some(n) = $args.uint("max_sequence_length")? {
            $opts.max_sequence_length = n;
        }
        if let Some(n) = $args.uint("num_images_per_prompt")? {
            $opts.num_images_per_prompt = n;
        }
        if let Some(s) = $args.sigmas()? {
            $opts.sigmas = Some(s);
        }
    };
}
pub(super) use set_length_batch_sigmas;
