//! `zimage_pipeline` cases: prompts to images through [`ZImagePipeline`];
//! with `args.image` (and `args.mask_image`, `args.strength`) image-to-image
//! and inpainting (diffusers' `ZImageImg2ImgPipeline` / `ZImageInpaintPipeline`).

use std::collections::BTreeMap;

use anyhow::{anyhow, Context, Result};
use candle_core::{Device, Tensor};
use lumina2_pipeline::{Noise, ZImageOptions, ZImagePipeline, ZImageSources};

use super::text_encoder::strings;
use super::Case;
use super::Prepared;

struct ZImagePipelineCase {
    pipe: ZImagePipeline,
    opts: ZImageOptions,
}

pub fn prepare(case: &Case) -> Result<Box<dyn Prepared>> {
    let a = &case.args;
    let get = |k: &str| a.get(k).filter(|v| !v.is_null());
    let prompts = strings(
        get("prompt").ok_or_else(|| anyhow!("args has no `prompt`"))?,
        "prompt",
    )?;
    let mut opts = ZImageOptions::with_prompts(prompts);
    opts.negative_prompts = get("negative_prompt")
        .map(|v| strings(v, "negative_prompt"))
        .transpose()?;
    let uint = |k: &str| -> Result<Option<usize>> {
        get(k)
            .map(|v| {
                v.as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| anyhow!("`{k}` must be a non-negative integer"))
            })
            .transpose()
    };
    let float = |k: &str| -> Result<Option<f64>> {
        get(k)
            .map(|v| v.as_f64().ok_or_else(|| anyhow!("`{k}` must be a number")))
            .transpose()
    };
    opts.height = uint("height")?;
    opts.width = uint("width")?;
    if let Some(n) = uint("num_inference_steps")? {
        opts.num_inference_steps = n;
    }
    if let Some(v) = float("guidance_scale")? {
        opts.guidance_scale = v;
    }
    // diffusers takes a bool or a float: `True` caps at 1x the positive norm.
    if let Some(v) = get("cfg_normalization") {
        opts.cfg_normalization = match (v.as_bool(), v.as_f64()) {
            (Some(b), _) => f64::from(u8::from(b)),
            (None, Some(f)) => f,
            _ => return Err(anyhow!("`cfg_normalization` must be a boolean or a number")),
        };
    }
    if let Some(v) = float("cfg_truncation")? {
        opts.cfg_truncation = v;
    }
    if let Some(n) = uint("max_sequence_length")? {
        opts.max_sequence_length = n;
    }
    if let Some(n) = uint("num_images_per_prompt")? {
        opts.num_images_per_prompt = n;
    }
    if let Some(v) = get("sigmas") {
        let s = v
            .as_array()
            .and_then(|a| a.iter().map(|x| x.as_f64()).collect::<Option<Vec<_>>>())
            .ok_or_else(|| anyhow!("`sigmas` must be a list of numbers"))?;
        opts.sigmas = Some(s);
    }
    // Image-to-image and inpainting: PNG files inside the case.
    opts.image_to_image = super::pipeline::image_to_image(case)?;
    opts.noise = Noise::Seed(
        get("seed")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| anyhow!("the case needs an integer `seed`"))?,
    );
    let model_path = case.model()?;
    let sources = ZImageSources::from_pipeline_folder(model_path)
        .with_context(|| format!("opening {}", model_path.display()))?;
    let pipe = ZImagePipeline::builder(sources)
        .dtype(case.dtype)
        .device(Device::Cpu)
        .keep_resident(true)
        .build()?;
    Ok(Box::new(ZImagePipelineCase { pipe, opts }))
}

impl Prepared for ZImagePipelineCase {
    fn run(&mut self) -> Result<BTreeMap<String, Tensor>> {
        let mut m = BTreeMap::new();
        // The latents and the image come from one run, as diffusers' two
        // (output_type "latent" and "np") from the same seed.
        let out = self
            .pipe
            .generate(&self.opts, &mut |_| Default::default())?;
        if let Some(images) = out.images {
            m.insert("image".to_string(), images);
        }
        m.insert("initial_latents".to_string(), out.initial_latents);
        m.insert("latents".to_string(), out.latents);
        if let Some(l) = out.image_latents {
            m.insert("image_latents".to_string(), l);
        }
        if let Some(l) = out.noised_latents {
            m.insert("noised_latents".to_string(), l);
        }
        Ok(m)
    }
}
