//! `zimage_pipeline` cases: prompts to images through [`ZImagePipeline`];
//! with `args.image` (and `args.mask_image`, `args.strength`) image-to-image
//! and inpainting (diffusers' `ZImageImg2ImgPipeline` / `ZImageInpaintPipeline`).

use std::collections::BTreeMap;

use anyhow::{anyhow, Context, Result};
use candle_core::{Device, Tensor};
use lumina2_pipeline::{Noise, ZImageOptions, ZImagePipeline, ZImageSources};

use super::pipeline::{set_length_batch_sigmas, set_size_steps_guidance, CaseArgs};
use super::Case;
use super::Prepared;

struct ZImagePipelineCase {
    pipe: ZImagePipeline,
    opts: ZImageOptions,
}

pub fn prepare(case: &Case) -> Result<Box<dyn Prepared>> {
    let args = CaseArgs(case);
    let get = |k: &str| args.get(k);
    let (prompts, negative_prompts) = args.prompts()?;
    let mut opts = ZImageOptions::with_prompts(prompts);
    opts.negative_prompts = negative_prompts;
    set_size_steps_guidance!(opts, args);
    // diffusers takes a bool or a float: `True` caps at 1x the positive norm.
    if let Some(v) = get("cfg_normalization") {
        opts.cfg_normalization = match (v.as_bool(), v.as_f64()) {
            (Some(b), _) => f64::from(u8::from(b)),
            (None, Some(f)) => f,
            _ => return Err(anyhow!("`cfg_normalization` must be a boolean or a number")),
        };
    }
    if let Some(v) = args.float("cfg_truncation")? {
        opts.cfg_truncation = v;
    }
    set_length_batch_sigmas!(opts, args);
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
        // The latents and the image come from one run, as diffusers' two
        // (output_type "latent" and "np") from the same seed.
        let out = self
            .pipe
            .generate(&self.opts, &mut |_| Default::default())?;
        super::pipeline::outputs(out)
    }
}
