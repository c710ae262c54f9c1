//! What to generate with Z-Image: the arguments of diffusers'
//! `ZImagePipeline.__call__` (and, with an init image, of
//! `ZImageImg2ImgPipeline` / `ZImageInpaintPipeline`), with their defaults.

use crate::error::{invalid, Result};
use crate::img2img::{self, ImageToImage};
use crate::options::{
    check_prompt_lengths, Noise, OutputKind, MAX_BATCH_SIZE, MAX_GUIDANCE_SCALE, MAX_STEPS,
};

/// `ZImagePipeline.__call__`'s `max_sequence_length` default.
pub const ZIMAGE_MAX_SEQUENCE_LENGTH: usize = 512;

/// The default image side when no width or height is given (the reference's 1024).
pub const ZIMAGE_DEFAULT_SIZE: usize = 1024;

/// One Z-Image request.
#[derive(Debug, Clone)]
pub struct ZImageOptions {
    /// The prompts (a batch).
    pub prompts: Vec<String>,
    /// The negative prompts, used only with guidance: one per prompt (with
    /// guidance, another count is refused, as diffusers asserts it). `None`:
    /// the empty prompt, as diffusers.
    pub negative_prompts: Option<Vec<String>>,
    /// Image width in pixels (`None`: 1024, or with an init image its width
    /// rounded down to the multiple); a multiple of twice the VAE's factor
    /// (16 for the real VAE), checked by the pipeline.
    pub width: Option<usize>,
    /// Image height in pixels (`None`: 1024, or the init image's rounded height).
    pub height: Option<usize>,
    /// Denoising steps (50).
    pub num_inference_steps: usize,
    /// Custom sigmas instead of `torch.linspace(1, 1/N, N)`.
    pub sigmas: Option<Vec<f64>>,
    /// `guidance_scale` (5.0). Guidance runs when it is above 0, as the
    /// reference decides it; Z-Image-Turbo uses 0.
    pub guidance_scale: f64,
    /// `cfg_normalization`: 0 is off; a positive value caps the guided
    /// prediction's norm at this multiple of the positive one's (diffusers'
    /// `True` is 1.0).
    pub cfg_normalization: f64,
    /// `cfg_truncation` (1.0): guidance stops at the steps whose normalised
    /// time `(1000 - t) / 1000` exceeds it; applies when it is at most 1.
    pub cfg_truncation: f64,
    /// Images per prompt (1).
    pub num_images_per_prompt: usize,
    /// Where the initial latents come from (drawn in f32, as the reference).
    pub noise: Noise,
    /// Tokens per prompt after the chat template (512).
    pub max_sequence_length: usize,
    /// Images or only latents.
    pub output: OutputKind,
    /// Start from an image (`ZImageImg2ImgPipeline`), and inpaint with a mask
    /// (`ZImageInpaintPipeline`): the image is resized to its own size rounded
    /// down to the multiple, which the output size must equal. The
    /// references' `strength` defaults are 0.6 and 1.0 (inpainting).
    pub image_to_image: Option<ImageToImage>,
    /// Every this many steps, the step's clean-image prediction is handed
    /// to the observer ([`crate::StepInfo::denoised`]) for a live preview;
    /// `None`: no previews.
    pub preview_every: Option<usize>,
}

impl ZImageOptions {
    /// One prompt, every other argument at diffusers' default.
    pub fn new(prompt: impl Into<String>) -> Self {
        Self::with_prompts(vec![prompt.into()])
    }

    /// A batch of prompts, every other argument at diffusers' default.
    pub fn with_prompts(prompts: Vec<String>) -> Self {
        Self {
            prompts,
            negative_prompts: None,
            width: None,
            height: None,
            num_inference_steps: 50,
            sigmas: None,
            guidance_scale: 5.0,
            cfg_normalization: 0.0,
            cfg_truncation: 1.0,
            num_images_per_prompt: 1,
            noise: Noise::Seed(0),
            max_sequence_length: ZIMAGE_MAX_SEQUENCE_LENGTH,
            output: OutputKind::Images,
            image_to_image: None,
            preview_every: None,
        }
    }

    /// `do_classifier_free_guidance`: `guidance_scale > 0` in `ZImagePipeline`
    /// (not `> 1` as in most pipelines).
    pub fn do_classifier_free_guidance(&self) -> bool {
        self.guidance_scale > 0.0
    }

    /// Images in the batch: prompts times images per prompt.
    pub fn batch_size(&self) -> Result<usize> {
        let n = self.prompts.len();
        n.checked_mul(self.num_images_per_prompt)
            .filter(|b| *b <= MAX_BATCH_SIZE)
            .ok_or_else(|| {
                invalid(
                    "num_images_per_prompt",
                    format!(
                        "{} images for each of {n} prompts is more than {MAX_BATCH_SIZE} images",
                        self.num_images_per_prompt
                    ),
                )
            })
    }

    /// The negative prompt of each prompt (`""` by default).
    pub fn negatives(&self) -> Vec<String> {
        match &self.negative_prompts {
            Some(n) => n.clone(),
            None => vec![String::new(); self.prompts.len()],
        }
    }

    /// Checks the request before anything runs.
    pub fn validate(&self) -> Result<()> {
        if self.prompts.is_empty() {
            return Err(invalid("prompt", "no prompt given"));
        }
        check_prompt_lengths("prompt", &self.prompts)?;
        if let Some(n) = &self.negative_prompts {
            // `encode_prompt` asserts `len(prompt) == len(negative_prompt)`
            // with guidance (a single string counts as one); without, the
            // negative prompts are not read.
            if self.do_classifier_free_guidance() && n.len() != self.prompts.len() {
                return Err(invalid(
                    "negative_prompt",
                    format!(
                        "{} negative prompt(s) for {} prompt(s): give one per prompt",
                        n.len(),
                        self.prompts.len()
                    ),
                ));
            }
            check_prompt_lengths("negative_prompt", n)?;
        }
        if self.num_images_per_prompt == 0 {
            return Err(invalid("num_images_per_prompt", "must be at least 1"));
        }
        self.batch_size()?;
        match &self.sigmas {
            None if self.num_inference_steps == 0 => {
                return Err(invalid("num_inference_steps", "must be at least 1"))
            }
            None if self.num_inference_steps > MAX_STEPS => {
                return Err(invalid(
                    "num_inference_steps",
                    format!("{} is more than {MAX_STEPS}", self.num_inference_steps),
                ))
            }
            None => {}
            Some(s) => {
                if s.is_empty() || s.len() > MAX_STEPS {
                    return Err(invalid(
                        "sigmas",
                        format!("{} values: 1 to {MAX_STEPS} are allowed", s.len()),
                    ));
                }
                if let Some(bad) = s.iter().find(|v| !(0.0..=1.0).contains(*v)) {
                    return Err(invalid("sigmas", format!("{bad} is not in [0, 1]")));
                }
            }
        }
        if !self.guidance_scale.is_finite()
            || !(0.0..=MAX_GUIDANCE_SCALE).contains(&self.guidance_scale.abs())
        {
            return Err(invalid(
                "guidance_scale",
                format!(
                    "{} is not a finite value of magnitude at most {MAX_GUIDANCE_SCALE}",
                    self.guidance_scale
                ),
            ));
        }
        for (name, v) in [
            ("cfg_normalization", self.cfg_normalization),
            ("cfg_truncation", self.cfg_truncation),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(invalid(name, format!("{v} is not a finite value >= 0")));
            }
        }
        if let Some(i2i) = &self.image_to_image {
            let steps = self
                .sigmas
                .as_ref()
                .map_or(self.num_inference_steps, Vec::len);
            img2img::check_request(i2i, steps, &self.noise)?;
        }
        if self.preview_every == Some(0) {
            return Err(invalid("preview_every", "0 steps; give at least 1"));
        }
        if self.max_sequence_length == 0 || self.max_sequence_length > 1 << 16 {
            return Err(invalid(
                "max_sequence_length",
                format!("{}: 1 to 65536 tokens", self.max_sequence_length),
            ));
        }
        Ok(())
    }
}
