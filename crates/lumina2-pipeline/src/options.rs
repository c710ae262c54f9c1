//! What to generate: the arguments of diffusers' `Lumina2Pipeline.__call__`,
//! with its defaults, plus the choices diffusers does not offer (solver,
//! guidance semantics, noise source).

use candle_core::Tensor;
use lumina2_scheduler::SolverKind;
use lumina2_text_encoder::SystemPrompt;

use crate::error::{invalid, Result};
use crate::img2img::ImageToImage;

/// diffusers rejects a longer `max_sequence_length`.
pub const MAX_SEQUENCE_LENGTH: usize = 512;

/// Width and height must be multiples of this (VAE factor 8 times patch 2).
pub const SIZE_MULTIPLE: usize = 16;

/// The largest image side. At 16384 pixels one image's latent sequence is a
/// million tokens and its RGB output 3 GiB of f32: past it the memory check
/// would refuse every machine anyway.
pub const MAX_SIDE: usize = 16384;

/// The most images one run makes (prompts times `num_images_per_prompt`).
/// The images share one batch through every stage; their seeds, prompts and
/// file names are listed before anything is loaded, so the count is bounded
/// before those lists are made. A larger set is several runs.
pub const MAX_BATCH_SIZE: usize = 256;

/// The most denoising steps, and the longest custom sigma list. Schedules
/// use 4 to 100 steps; the bound keeps the schedule's lists small.
pub const MAX_STEPS: usize = 10_000;

/// The largest classifier-free guidance scale (ComfyUI's bound too); usual
/// values are 3 to 15, and past a few dozen the latents overflow.
pub const MAX_GUIDANCE_SCALE: f64 = 100.0;

/// The longest prompt, negative prompt or system prompt, in bytes. A prompt
/// is tokenised whole before it is cut to `max_sequence_length` (at most 512)
/// tokens, so more text only costs time.
pub const MAX_PROMPT_BYTES: usize = 1 << 20;

/// What conditions the image.
#[derive(Debug, Clone)]
pub enum Conditioning {
    /// Prompts to encode (one image or `num_images_per_prompt` images each).
    Prompts {
        /// The prompts (the batch).
        prompts: Vec<String>,
        /// One negative prompt per prompt, or one for all; `None` is `""`.
        negative_prompts: Option<Vec<String>>,
    },
    /// Embeddings computed beforehand (diffusers' `prompt_embeds` and friends).
    Embeddings(PromptEmbeddingsInput),
}

/// Precomputed prompt embeddings: `[B, L, D]` embeddings and `[B, L]` masks
/// (1 = token, 0 = padding, real tokens first), as the text encoder returns
/// them. They are repeated `num_images_per_prompt` times like encoded prompts.
#[derive(Debug, Clone)]
pub struct PromptEmbeddingsInput {
    /// Positive prompt embeddings `[B, L, D]`.
    pub prompt_embeds: Tensor,
    /// Their mask `[B, L]`.
    pub prompt_attention_mask: Tensor,
    /// Negative embeddings, needed with guidance; same shape as `prompt_embeds`.
    pub negative_prompt_embeds: Option<Tensor>,
    /// Their mask.
    pub negative_prompt_attention_mask: Option<Tensor>,
}

/// Where the initial noise comes from.
#[derive(Debug, Clone)]
pub enum Noise {
    /// One generator for the whole batch: what diffusers draws with
    /// `generator=torch.Generator("cpu").manual_seed(seed)` (one `randn` of
    /// shape `[B, C, h, w]`).
    Seed(u64),
    /// One generator per image (diffusers' list of generators): image `i` is
    /// drawn from `manual_seed(seeds[i])`, so each image can be regenerated
    /// alone from its seed. The list length must equal the batch size.
    Seeds(Vec<u64>),
    /// Given initial latents `[B, C, h, w]` (diffusers' `latents` argument).
    Latents(Tensor),
}

/// Classifier-free guidance semantics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GuidanceMode {
    /// diffusers' `Lumina2Pipeline` (the parity reference): guidance stops once
    /// `(step + 1) / steps > cfg_trunc_ratio`; with `cfg_normalization` the
    /// guided prediction is rescaled to the conditional one's norm taken over
    /// the last axis (each latent row), always.
    #[default]
    Diffusers,
    /// The Alpha-VLLM sampler (`forward_with_cfg`; ComfyUI's `RenormCFG`
    /// node): guidance at every scale, below 1 too (the two predictions are
    /// always combined), while the model time is below `cfg_trunc_ratio`, the
    /// model time being the original's own float32 grid
    /// ([`crate::original_time`]) unless custom sigmas are given; the norm of
    /// the guided prediction, taken over the whole latent of each image, is
    /// clamped to [`GenerateOptions::renorm_cfg`] times the conditional one's
    /// (only scaled down); the system prompt is also put in front of a
    /// non-empty negative prompt.
    Original,
}

/// What the run returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputKind {
    /// Decoded images.
    #[default]
    Images,
    /// The final latents only (no VAE decode; diffusers' `output_type="latent"`).
    Latents,
}

/// Everything one generation needs, with diffusers' defaults.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// The prompts or precomputed embeddings.
    pub conditioning: Conditioning,
    /// Image width in pixels, a multiple of 16; `None`: the transformer's
    /// `sample_size * 8`.
    pub width: Option<usize>,
    /// Image height in pixels, a multiple of 16; `None`: `sample_size * 8`.
    pub height: Option<usize>,
    /// Denoising steps (30).
    pub num_inference_steps: usize,
    /// Guidance scale (4.0); diffusers' mode guides only above 1, the
    /// original mode at every scale.
    pub guidance_scale: f64,
    /// Fraction of the run with guidance (1.0 = all of it); see [`GuidanceMode`].
    pub cfg_trunc_ratio: f64,
    /// Renormalise the guided prediction (true); see [`GuidanceMode`].
    pub cfg_normalization: bool,
    /// [`GuidanceMode::Original`]'s `renorm_cfg` (1.0): the guided norm is
    /// clamped to this many times the conditional one; 0 switches the clamp
    /// off. Diffusers' mode ignores it.
    pub renorm_cfg: f64,
    /// Put in front of each prompt (diffusers' default system prompt).
    pub system_prompt: SystemPrompt,
    /// Custom sigmas instead of `linspace(1, 1/N, N)` (diffusers' `sigmas`).
    pub sigmas: Option<Vec<f64>>,
    /// Images per prompt (1).
    pub num_images_per_prompt: usize,
    /// Initial noise (seed 0 when not set by the caller).
    pub noise: Noise,
    /// Text tokens per prompt after padding or truncation (256, at most 512).
    pub max_sequence_length: usize,
    /// Images or latents.
    pub output: OutputKind,
    /// The ODE solver (diffusers' Euler step by default).
    pub solver: SolverKind,
    /// Guidance semantics.
    pub guidance_mode: GuidanceMode,
    /// TeaCache's threshold (`rel_l1_thresh`; `None`: off): transformer calls
    /// whose accumulated change stays below it reuse the cached residual of
    /// the joint layers ([`crate::teacache`]). The reference suggests 0.2 to 0.5.
    pub cache_threshold: Option<f64>,
    /// Every this many steps, [`crate::StepInfo::denoised`] carries the
    /// step's clean-image prediction for a live preview ([`crate::preview`];
    /// `None`: never).
    pub preview_every: Option<usize>,
    /// Start from an image (image-to-image, inpainting with a mask) instead
    /// of pure noise; `None`: text-to-image.
    pub image_to_image: Option<ImageToImage>,
}

impl GenerateOptions {
    /// Options for one prompt with diffusers' defaults.
    pub fn new(prompt: impl Into<String>) -> Self {
        Self::with_prompts(vec![prompt.into()])
    }

    /// Options for a batch of prompts with diffusers' defaults.
    pub fn with_prompts(prompts: Vec<String>) -> Self {
        Self {
            conditioning: Conditioning::Prompts {
                prompts,
                negative_prompts: None,
            },
            width: None,
            height: None,
            num_inference_steps: 30,
            guidance_scale: 4.0,
            cfg_trunc_ratio: 1.0,
            cfg_normalization: true,
            renorm_cfg: 1.0,
            system_prompt: SystemPrompt::default(),
            sigmas: None,
            num_images_per_prompt: 1,
            noise: Noise::Seed(0),
            max_sequence_length: 256,
            output: OutputKind::Images,
            solver: SolverKind::Euler,
            guidance_mode: GuidanceMode::Diffusers,
            cache_threshold: None,
            preview_every: None,
            image_to_image: None,
        }
    }

    /// Whether classifier-free guidance runs at all: diffusers' mode above a
    /// scale of 1; the original's `forward_with_cfg` at every scale.
    pub fn do_classifier_free_guidance(&self) -> bool {
        self.guidance_mode == GuidanceMode::Original || self.guidance_scale > 1.0
    }

    /// The number of prompts (before `num_images_per_prompt`).
    pub fn prompt_batch(&self) -> Result<usize> {
        match &self.conditioning {
            Conditioning::Prompts { prompts, .. } => Ok(prompts.len()),
            Conditioning::Embeddings(e) => Ok(e.prompt_embeds.dims().first().copied().unwrap_or(0)),
        }
    }

    /// The number of images the run makes (an error when the product
    /// overflows; [`Self::validate`] bounds it by [`MAX_BATCH_SIZE`]).
    pub fn batch_size(&self) -> Result<usize> {
        let prompts = self.prompt_batch()?;
        prompts
            .checked_mul(self.num_images_per_prompt)
            .ok_or_else(|| {
                invalid(
                    "num_images_per_prompt",
                    format!(
                        "{} images for each of {prompts} prompts is more than {MAX_BATCH_SIZE} images",
                        self.num_images_per_prompt
                    ),
                )
            })
    }

    /// Checks every option that can be checked without the models.
    pub fn validate(&self) -> Result<()> {
        match &self.conditioning {
            Conditioning::Prompts {
                prompts,
                negative_prompts,
            } => {
                if prompts.is_empty() {
                    return Err(invalid("prompt", "no prompt given"));
                }
                check_prompt_lengths("prompt", prompts)?;
                if let Some(n) = negative_prompts {
                    if n.len() != 1 && n.len() != prompts.len() {
                        return Err(invalid(
                            "negative_prompt",
                            format!("{} negative prompts for {} prompts", n.len(), prompts.len()),
                        ));
                    }
                    check_prompt_lengths("negative_prompt", n)?;
                }
            }
            Conditioning::Embeddings(e) => {
                let d = e.prompt_embeds.dims();
                if d.len() != 3 || d[0] == 0 {
                    return Err(invalid(
                        "prompt_embeds",
                        format!("shape {d:?}, expected [B, L, D] with B > 0"),
                    ));
                }
                check_mask("prompt_attention_mask", &e.prompt_attention_mask, d)?;
                match (&e.negative_prompt_embeds, &e.negative_prompt_attention_mask) {
                    (Some(n), Some(m)) => {
                        if n.dims() != d {
                            return Err(invalid(
                                "negative_prompt_embeds",
                                format!(
                                    "shape {:?}, expected {d:?} (that of prompt_embeds)",
                                    n.dims()
                                ),
                            ));
                        }
                        check_mask("negative_prompt_attention_mask", m, d)?;
                    }
                    (Some(_), None) => {
                        return Err(invalid(
                            "negative_prompt_attention_mask",
                            "required with negative_prompt_embeds",
                        ))
                    }
                    (None, Some(_)) => {
                        return Err(invalid(
                            "negative_prompt_embeds",
                            "a negative mask was given without embeddings",
                        ))
                    }
                    (None, None) if self.do_classifier_free_guidance() => {
                        return Err(invalid(
                            "negative_prompt_embeds",
                            "required with prompt_embeds when guidance_scale > 1",
                        ))
                    }
                    (None, None) => {}
                }
            }
        }
        for (name, v) in [("width", self.width), ("height", self.height)] {
            if let Some(v) = v {
                check_size(name, v)?;
            }
        }
        if let SystemPrompt::Text(t) = &self.system_prompt {
            check_prompt_lengths("system_prompt", std::slice::from_ref(t))?;
        }
        if self.num_inference_steps == 0 && self.sigmas.is_none() {
            return Err(invalid("num_inference_steps", "must be at least 1"));
        }
        if self.num_inference_steps > MAX_STEPS {
            return Err(invalid(
                "num_inference_steps",
                format!("{} is more than {MAX_STEPS}", self.num_inference_steps),
            ));
        }
        if let Some(s) = &self.sigmas {
            if s.is_empty() {
                return Err(invalid("sigmas", "empty list"));
            }
            if s.len() > MAX_STEPS {
                return Err(invalid(
                    "sigmas",
                    format!("{} values, more than {MAX_STEPS} steps", s.len()),
                ));
            }
            // Flow-matching sigmas are the noise fraction of the sample.
            if let Some(bad) = s.iter().find(|v| !(0.0..=1.0).contains(*v)) {
                return Err(invalid("sigmas", format!("{} is not in [0, 1]", num(*bad))));
            }
        }
        if !(0.0..=MAX_GUIDANCE_SCALE).contains(&self.guidance_scale) {
            return Err(invalid(
                "guidance_scale",
                format!(
                    "{} is not in [0, {MAX_GUIDANCE_SCALE}] (guidance runs above 1)",
                    num(self.guidance_scale)
                ),
            ));
        }
        // Both semantics compare it with a fraction of the run in [0, 1].
        if self.preview_every == Some(0) {
            return Err(invalid("preview_every", "0 steps; give at least 1"));
        }
        if let Some(t) = self.cache_threshold {
            if !(t.is_finite() && t >= 0.0) {
                return Err(invalid(
                    "cache_threshold",
                    format!("{} is not a finite number >= 0", num(t)),
                ));
            }
        }
        if !(self.renorm_cfg.is_finite() && self.renorm_cfg >= 0.0) {
            return Err(invalid(
                "renorm_cfg",
                format!("{} is not a finite number >= 0", num(self.renorm_cfg)),
            ));
        }
        if !(0.0..=1.0).contains(&self.cfg_trunc_ratio) {
            return Err(invalid(
                "cfg_trunc_ratio",
                format!("{} is not in [0, 1]", num(self.cfg_trunc_ratio)),
            ));
        }
        if self.num_images_per_prompt == 0 {
            return Err(invalid("num_images_per_prompt", "must be at least 1"));
        }
        if self.num_images_per_prompt > MAX_BATCH_SIZE {
            return Err(invalid(
                "num_images_per_prompt",
                format!(
                    "{} is more than {MAX_BATCH_SIZE} images",
                    self.num_images_per_prompt
                ),
            ));
        }
        if self.max_sequence_length == 0 || self.max_sequence_length > MAX_SEQUENCE_LENGTH {
            return Err(invalid(
                "max_sequence_length",
                format!(
                    "{} is not in [1, {MAX_SEQUENCE_LENGTH}]",
                    self.max_sequence_length
                ),
            ));
        }
        let batch = self.batch_size()?;
        if batch > MAX_BATCH_SIZE {
            return Err(invalid(
                "num_images_per_prompt",
                format!(
                    "{} images for each of {} prompts makes {batch} images, more than {MAX_BATCH_SIZE}",
                    self.num_images_per_prompt,
                    self.prompt_batch()?
                ),
            ));
        }
        if let Some(i2i) = &self.image_to_image {
            let steps = self
                .sigmas
                .as_ref()
                .map_or(self.num_inference_steps, Vec::len);
            crate::img2img::check_request(i2i, steps, &self.noise)?;
        }
        match &self.noise {
            Noise::Seeds(s) if s.len() != batch => Err(invalid(
                "generator",
                format!("{} seeds for an effective batch of {batch} images", s.len()),
            )),
            Noise::Latents(l) if l.dims().first() != Some(&batch) => Err(invalid(
                "latents",
                format!("shape {:?} for a batch of {batch} images", l.dims()),
            )),
            _ => Ok(()),
        }
    }
}

/// A number for a message: short even when huge (`1e300`, not 301 digits).
fn num(v: f64) -> String {
    if v != 0.0 && !(1e-6..1e16).contains(&v.abs()) {
        format!("{v:e}")
    } else {
        v.to_string()
    }
}

pub(crate) fn check_prompt_lengths(name: &'static str, prompts: &[String]) -> Result<()> {
    if let Some((i, p)) = prompts
        .iter()
        .enumerate()
        .find(|(_, p)| p.len() > MAX_PROMPT_BYTES)
    {
        return Err(invalid(
            name,
            format!(
                "{name} {i} has {} bytes, more than {MAX_PROMPT_BYTES}",
                p.len()
            ),
        ));
    }
    Ok(())
}

fn check_mask(name: &'static str, mask: &Tensor, embeds: &[usize]) -> Result<()> {
    if mask.dims() != [embeds[0], embeds[1]] {
        return Err(invalid(
            name,
            format!(
                "shape {:?}, expected [{}, {}]",
                mask.dims(),
                embeds[0],
                embeds[1]
            ),
        ));
    }
    Ok(())
}

/// Checks an image side: positive, a multiple of 16, at most [`MAX_SIDE`].
pub fn check_size(name: &'static str, v: usize) -> Result<()> {
    if v == 0 || !v.is_multiple_of(SIZE_MULTIPLE) {
        return Err(invalid(
            name,
            format!("{v} is not a positive multiple of {SIZE_MULTIPLE}"),
        ));
    }
    if v > MAX_SIDE {
        return Err(invalid(
            name,
            format!("{v} is larger than {MAX_SIDE} pixels"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(o: &GenerateOptions) -> String {
        o.validate().unwrap_err().to_string()
    }

    #[test]
    fn original_mode_guides_below_a_scale_of_one() {
        let mut o = GenerateOptions::new("x");
        o.guidance_scale = 0.5;
        assert!(!o.do_classifier_free_guidance());
        o.guidance_mode = GuidanceMode::Original;
        assert!(o.do_classifier_free_guidance());
    }

    #[test]
    fn counts_are_bounded_and_their_product_cannot_overflow() {
        let mut o = GenerateOptions::with_prompts(vec!["a".into(), "b".into()]);
        o.num_images_per_prompt = usize::MAX;
        assert!(o.batch_size().is_err());
        assert!(reason(&o).contains("more than 256"), "{}", reason(&o));
        o.num_images_per_prompt = 128;
        o.validate().unwrap();
        assert_eq!(o.batch_size().unwrap(), MAX_BATCH_SIZE);
        o.num_images_per_prompt = 129;
        assert!(reason(&o).contains("makes 258 images"), "{}", reason(&o));
        let o = GenerateOptions::with_prompts(vec!["a".into(); MAX_BATCH_SIZE + 1]);
        assert!(reason(&o).contains("more than 256"), "{}", reason(&o));
    }

    #[test]
    fn numbers_out_of_range_are_refused_with_the_limit() {
        let check = |f: &dyn Fn(&mut GenerateOptions), needle: &str| {
            let mut o = GenerateOptions::new("x");
            f(&mut o);
            let r = reason(&o);
            assert!(r.contains(needle), "{r}");
        };
        check(&|o| o.guidance_scale = f64::NAN, "NaN is not in [0, 100]");
        check(&|o| o.guidance_scale = 1e300, "1e300 is not in [0, 100]");
        check(&|o| o.guidance_scale = -0.5, "-0.5 is not in [0, 100]");
        check(&|o| o.cfg_trunc_ratio = 1.5, "1.5 is not in [0, 1]");
        check(&|o| o.renorm_cfg = -1.0, "-1 is not a finite number >= 0");
        check(
            &|o| o.renorm_cfg = f64::NAN,
            "NaN is not a finite number >= 0",
        );
        check(
            &|o| o.cfg_trunc_ratio = f64::INFINITY,
            "inf is not in [0, 1]",
        );
        check(
            &|o| o.num_inference_steps = MAX_STEPS + 1,
            "more than 10000",
        );
        check(
            &|o| o.sigmas = Some(vec![1.0, -0.1]),
            "-0.1 is not in [0, 1]",
        );
        check(
            &|o| o.sigmas = Some(vec![0.5; MAX_STEPS + 1]),
            "10001 values",
        );
        check(&|o| o.width = Some(MAX_SIDE + 16), "larger than 16384");
        check(&|o| o.max_sequence_length = 513, "not in [1, 512]");
        check(
            &|o| o.system_prompt = SystemPrompt::Text("s".repeat(MAX_PROMPT_BYTES + 1)),
            "more than 1048576",
        );
        let mut o = GenerateOptions::new("x");
        o.guidance_scale = MAX_GUIDANCE_SCALE;
        o.cfg_trunc_ratio = 0.0;
        o.sigmas = Some(vec![1.0, 0.0]);
        o.validate().unwrap();
    }
}
