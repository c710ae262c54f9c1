//! Image-to-image and inpainting, shared by both pipelines:
//!
//! - `Lumina2Pipeline`: diffusers 0.42.1's `FluxImg2ImgPipeline` and
//!   `FluxInpaintPipeline` (`prepare_latents`, `get_timesteps`,
//!   `prepare_mask_latents` and the inpainting step) transplanted onto it.
//! - `ZImagePipeline`: diffusers 0.42.1's `ZImageImg2ImgPipeline` and
//!   `ZImageInpaintPipeline`, the same steps with two differences: the image
//!   is not resized to the requested size but to its own size rounded down to
//!   a multiple of twice the VAE's factor (`preprocess(image)` without a size;
//!   the output size defaults to it and must equal it), and the noise is
//!   mixed into latents in the compute dtype that the first Euler step turns
//!   into f32.
//!
//! The steps:
//!
//! - The image is resized with PIL's Lanczos filter, scaled to [-1, 1]
//!   (`VaeImageProcessor.preprocess`), encoded, and a posterior sample taken
//!   with the run's generator (`retrieve_latents`, sample mode):
//!   `image_latents = (sample - shift_factor) * scaling_factor`.
//! - `strength` cuts the schedule (`get_timesteps`): the run starts at step
//!   `t_start = int(max(N - min(N * strength, N), 0))` (the scheduler's begin
//!   index), and the noise, drawn from the same generator after the posterior
//!   sample, is mixed in at that step's sigma (`scale_noise`). A strength that
//!   leaves no step is refused, as the reference raises.
//! - With a mask (white = repaint; of any size, resized to the output size as
//!   the image is, made grey as PIL's `convert("L")`, binarised at 0.5, then
//!   sampled to the latent grid by nearest neighbour),
//!   each step ends with `latents = (1 - mask) * scale_noise(image_latents,
//!   next t, noise) + mask * latents`, the last one with the clean image latents.
//!   (The references also encode the masked image, drawing a posterior sample
//!   after every draw that matters; neither pipeline's transformer reads it, so
//!   it is left out.)

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use lumina2_scheduler::FlowMatchEulerDiscreteScheduler;
use lumina2_vae::AutoencoderKL;

use crate::error::{invalid, Result};
use crate::noise;
use crate::options::Noise;
use crate::pipeline::Observer;
use crate::progress::{Event, Stage, StageTimings};
use crate::resample;
use crate::torch_rng::TorchGenerator;

/// The image (and mask) an image-to-image or inpainting run starts from.
#[derive(Debug, Clone)]
pub struct ImageToImage {
    /// The init image, 8-bit RGB (see [`crate::source_image::read_rgb`]);
    /// resized to the output size with PIL's Lanczos filter when it differs.
    pub image: RgbImage,
    /// Inpainting mask of any size, 8-bit RGB, resized to the output size
    /// (PIL's Lanczos filter, as the image) whatever the image's size: white
    /// (at least 128 after PIL's grey conversion) is repainted, black kept.
    pub mask: Option<RgbImage>,
    /// How much of the schedule runs, in [0, 1] (1: all of it, from pure
    /// noise; small values stay close to the image).
    pub strength: f64,
}

impl ImageToImage {
    /// Checks the inputs against a run of `num_inference_steps` steps.
    pub fn validate(&self, num_inference_steps: usize) -> Result<()> {
        if !(0.0..=1.0).contains(&self.strength) {
            return Err(invalid(
                "strength",
                format!("{} is not in [0, 1]", self.strength),
            ));
        }
        let (w, h) = self.image.dimensions();
        if w == 0 || h == 0 {
            return Err(invalid("image", format!("empty image ({w}x{h})")));
        }
        // Any mask size is taken, as diffusers' mask processor resizes the
        // mask to the output size whatever its own; only an empty one has
        // nothing to resize.
        if let Some(m) = &self.mask {
            let (mw, mh) = m.dimensions();
            if mw == 0 || mh == 0 {
                return Err(invalid("mask_image", format!("empty mask ({mw}x{mh})")));
            }
        }
        let (_, left) = start_step(num_inference_steps, self.strength);
        if left == 0 {
            return Err(invalid(
                "strength",
                format!(
                    "{} leaves no step of {num_inference_steps} to run (it must be above 0)",
                    self.strength
                ),
            ));
        }
        Ok(())
    }
}

/// The request checks both pipelines share: the image against a run of
/// `num_inference_steps` steps, and a seed (not given latents) to draw from.
pub(crate) fn check_request(
    i2i: &ImageToImage,
    num_inference_steps: usize,
    noise: &Noise,
) -> Result<()> {
    i2i.validate(num_inference_steps)?;
    if matches!(noise, Noise::Latents(_)) {
        return Err(invalid(
            "latents",
            "given initial latents cannot be combined with an init image (use a seed)",
        ));
    }
    Ok(())
}

/// The size `VaeImageProcessor.preprocess(image)` resizes an image to when
/// given no size (`get_default_height_width`): each side rounded down to a
/// multiple of `multiple` (width, height).
pub fn default_size(image: &RgbImage, multiple: usize) -> (usize, usize) {
    let round = |v: u32| {
        let v = v as usize;
        v - v % multiple.max(1)
    };
    (round(image.width()), round(image.height()))
}

/// `get_timesteps`: the first step that runs and the number of steps left,
/// in Python's float64 arithmetic (`init_timestep = min(N * strength, N)`,
/// `t_start = int(max(N - init_timestep, 0))`).
pub fn start_step(num_inference_steps: usize, strength: f64) -> (usize, usize) {
    let n = num_inference_steps as f64;
    let init_timestep = (n * strength).min(n);
    // `int()` truncates toward zero; the value is at least 0.
    let t_start = (n - init_timestep).max(0.0) as usize;
    (t_start, num_inference_steps.saturating_sub(t_start))
}

/// `VaeImageProcessor.preprocess` of the init image: resized (PIL Lanczos),
/// `x / 255` in f32 (`pil_to_numpy`), then `2x - 1` (`normalize`): `[1, 3, h, w]` f32.
pub fn image_tensor(
    image: &RgbImage,
    width: usize,
    height: usize,
    device: &Device,
) -> Result<Tensor> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let px = resample::lanczos_u8(image.as_raw(), (w, h), 3, (width, height));
    let mut planar = vec![0f32; 3 * width * height];
    for (i, p) in px.chunks_exact(3).enumerate() {
        for (c, &v) in p.iter().enumerate() {
            planar[c * width * height + i] = 2f32 * (f32::from(v) / 255f32) - 1f32;
        }
    }
    Ok(Tensor::from_vec(planar, (1, 3, height, width), device)?)
}

/// PIL's `convert("L")` of one RGB pixel (ITU-R 601-2 luma in 16-bit fixed point).
pub fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((u32::from(r) * 19595 + u32::from(g) * 38470 + u32::from(b) * 7471 + 0x8000) >> 16) as u8
}

/// The mask processor (`do_convert_grayscale`, `do_binarize`, no normalising):
/// resized in RGB (PIL Lanczos), made grey, `x / 255`, then 1 where at least
/// 0.5 and 0 elsewhere; `height * width` values, row-major.
pub fn mask_pixels(mask: &RgbImage, width: usize, height: usize) -> Vec<f32> {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    let px = resample::lanczos_u8(mask.as_raw(), (w, h), 3, (width, height));
    px.chunks_exact(3)
        .map(|p| {
            let v = f32::from(luma(p[0], p[1], p[2])) / 255f32;
            if v < 0.5 {
                0.0
            } else {
                1.0
            }
        })
        .collect()
}

/// `torch.nn.functional.interpolate(mask, size=(lh, lw))` (mode `nearest`):
/// source index `min(floor(dst * (in / out)), in - 1)` with the scale in f32.
fn nearest_index(dst: usize, input: usize, output: usize) -> usize {
    if input == output {
        return dst;
    }
    if output == 2 * input {
        return dst >> 1;
    }
    let scale = input as f32 / output as f32;
    ((dst as f32 * scale).floor() as usize).min(input - 1)
}

/// The mask on the latent grid, `[batch, 1, lh, lw]` in `dtype`
/// (`prepare_mask_latents`: interpolated, then repeated to the batch).
pub fn mask_latents(
    pixels: &[f32],
    (width, height): (usize, usize),
    (lh, lw): (usize, usize),
    batch: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let mut out = Vec::with_capacity(lh * lw);
    for y in 0..lh {
        let sy = nearest_index(y, height, lh);
        for x in 0..lw {
            out.push(pixels[sy * width + nearest_index(x, width, lw)]);
        }
    }
    let m = Tensor::from_vec(out, (1, 1, lh, lw), device)?.to_dtype(dtype)?;
    Ok(m.repeat((batch, 1, 1, 1))?)
}

/// The generator(s) of a run, drawn from in diffusers' order: the VAE
/// posterior sample, then the initial noise.
pub(crate) struct Generators {
    gens: Vec<TorchGenerator>,
}

impl Generators {
    /// One generator for a seed, one per image for a list of seeds.
    pub(crate) fn new(noise: &Noise) -> Result<Self> {
        let gens = match noise {
            Noise::Seed(s) => vec![TorchGenerator::new(*s)],
            Noise::Seeds(s) => s.iter().map(|s| TorchGenerator::new(*s)).collect(),
            Noise::Latents(_) => {
                return Err(invalid(
                    "latents",
                    "given initial latents cannot be combined with an init image (use a seed)",
                ))
            }
        };
        if gens.is_empty() {
            return Err(invalid("generator", "no seed given"));
        }
        Ok(Self { gens })
    }

    /// The posterior sample's noise for the one encoded image: from the single
    /// generator, or the first of a list (`_encode_vae_image` encodes image
    /// `i` with `generator[i]`, and there is one image).
    pub(crate) fn posterior_noise(&mut self, dims: &[usize], dtype: DType) -> Result<Tensor> {
        let n: usize = dims.iter().product();
        let t = noise::draw(&mut self.gens[0], n, dtype)?;
        Ok(t.reshape(dims)?)
    }

    /// The initial noise `[b, c, h, w]` (`randn_tensor`: one draw of the
    /// whole shape, or one per image from its own generator).
    pub(crate) fn latent_noise(
        &mut self,
        shape: (usize, usize, usize, usize),
        dtype: DType,
    ) -> Result<Tensor> {
        let (b, c, h, w) = shape;
        let t = if self.gens.len() == 1 {
            noise::draw(&mut self.gens[0], b * c * h * w, dtype)?
        } else {
            if self.gens.len() != b {
                return Err(invalid(
                    "generator",
                    format!("{} seeds for a batch of {b}", self.gens.len()),
                ));
            }
            let parts = self
                .gens
                .iter_mut()
                .map(|g| noise::draw(g, c * h * w, dtype))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&parts, 0)?
        };
        Ok(t.reshape(shape)?)
    }
}

/// `scheduler.scale_noise(sample, t, noise)` with the sigma of schedule step
/// `index` (the begin index before the loop, the step index inside it).
pub(crate) fn noise_at(
    scheduler: &FlowMatchEulerDiscreteScheduler,
    index: usize,
    sample: &Tensor,
    noise: &Tensor,
) -> Result<Tensor> {
    let mut s = scheduler.clone();
    s.set_begin_index(index);
    let t = scheduler
        .timesteps()
        .get(index)
        .copied()
        .ok_or_else(|| invalid("strength", format!("step {index} is past the schedule")))?;
    Ok(s.scale_noise(sample, &[t], noise)?)
}

/// What an inpainting run puts back after each step.
pub(crate) struct Inpaint {
    /// The clean image latents, repeated to the batch.
    pub image_latents: Tensor,
    /// The initial noise.
    pub noise: Tensor,
    /// `[b, 1, h, w]`: 1 where the image is repainted.
    pub mask: Tensor,
    /// The scheduler and the begin index of the run.
    pub scheduler: FlowMatchEulerDiscreteScheduler,
    pub begin: usize,
}

impl Inpaint {
    /// The latents after run step `step` (0-based) of `steps`:
    /// `(1 - mask) * init_latents_proper + mask * latents`. The kept part is
    /// computed in the image latents' dtype and the sum in the latents' (type
    /// promotion, where Z-Image's latents are f32 and the mask bf16).
    pub(crate) fn blend(&self, latents: &Tensor, step: usize, steps: usize) -> Result<Tensor> {
        let proper = if step + 1 < steps {
            noise_at(
                &self.scheduler,
                self.begin + step + 1,
                &self.image_latents,
                &self.noise,
            )?
        } else {
            self.image_latents.clone()
        };
        let keep = self
            .mask
            .affine(-1.0, 1.0)?
            .broadcast_mul(&proper)?
            .to_dtype(latents.dtype())?;
        let repaint = self
            .mask
            .to_dtype(latents.dtype())?
            .broadcast_mul(latents)?;
        Ok((keep + repaint)?)
    }
}

/// Where the denoising starts.
pub(crate) struct Start {
    /// The first latents.
    pub latents: Tensor,
    /// The noise drawn for them.
    pub noise: Tensor,
    /// The first step of the schedule that runs.
    pub begin: usize,
    /// Image-to-image: the image latents, repeated to the batch.
    pub image_latents: Option<Tensor>,
    /// Inpainting: what each step puts back.
    pub inpaint: Option<Inpaint>,
}

impl Start {
    /// A text-to-image start: the noise itself, from the first step.
    pub fn from_noise(noise: Tensor) -> Self {
        Self {
            latents: noise.clone(),
            noise,
            begin: 0,
            image_latents: None,
            inpaint: None,
        }
    }
}

/// What an image-to-image start depends on besides the image.
pub(crate) struct StartSpec<'a> {
    /// The request's noise (seeds).
    pub noise: &'a Noise,
    /// The latent shape `[b, c, h, w]`.
    pub shape: (usize, usize, usize, usize),
    /// The pixel size the image and mask are resized to (width, height).
    pub size: (usize, usize),
    /// The dtype of the image latents, the noise and the mask.
    pub dtype: DType,
    /// The device of the run.
    pub device: &'a Device,
}

/// The start of an image-to-image run, in the order of diffusers'
/// pipelines: the image encoded and its posterior sampled with the
/// generator (stage [`Stage::EncodeImage`]), then the noise drawn from it,
/// then `scale_noise` at the first step that runs (the scheduler's schedule
/// must be set).
pub(crate) fn image_start(
    vae: &AutoencoderKL,
    i2i: &ImageToImage,
    spec: &StartSpec<'_>,
    scheduler: &FlowMatchEulerDiscreteScheduler,
    observer: &mut Observer<'_>,
    timings: &mut StageTimings,
) -> Result<Start> {
    let StartSpec {
        noise,
        shape,
        size: (width, height),
        dtype,
        device,
    } = *spec;
    let (begin, _) = start_step(scheduler.timesteps().len(), i2i.strength);
    let mut gens = Generators::new(noise)?;
    let pixels = image_tensor(&i2i.image, width, height, device)?;
    let started = Instant::now();
    observer(Event::StageStarted(Stage::EncodeImage));
    let posterior = vae.encode(&pixels.to_dtype(vae.dtype())?)?;
    let eps = gens
        .posterior_noise(posterior.mean.dims(), vae.dtype())?
        .to_device(vae.device())?;
    let image_latents = vae
        .scale_latents(&posterior.sample(&eps)?)?
        .to_dtype(dtype)?;
    let d = started.elapsed();
    timings.stages.push((Stage::EncodeImage, d));
    observer(Event::StageFinished(Stage::EncodeImage, d));
    // One image for the whole batch (prompts x images per prompt).
    let image_latents = image_latents.repeat((shape.0, 1, 1, 1))?;
    let noise = gens.latent_noise(shape, dtype)?.to_device(device)?;
    let latents = noise_at(scheduler, begin, &image_latents, &noise)?;
    let inpaint = match &i2i.mask {
        None => None,
        Some(mask) => {
            let pixels = mask_pixels(mask, width, height);
            let mask = mask_latents(
                &pixels,
                (width, height),
                (shape.2, shape.3),
                shape.0,
                dtype,
                device,
            )?;
            Some(Inpaint {
                image_latents: image_latents.clone(),
                noise: noise.clone(),
                mask,
                scheduler: scheduler.clone(),
                begin,
            })
        }
    };
    Ok(Start {
        latents,
        noise,
        begin,
        image_latents: Some(image_latents),
        inpaint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_step_is_get_timesteps() {
        // int(max(N - min(N * s, N), 0)) in float64.
        assert_eq!(start_step(30, 0.6), (12, 18));
        assert_eq!(start_step(4, 1.0), (0, 4));
        assert_eq!(start_step(4, 0.0), (4, 0));
        assert_eq!(start_step(10, 0.7), (3, 7));
        // 100 * 0.29 = 28.999999999999996: 71.00000000000001 truncates to 71.
        assert_eq!(start_step(100, 0.29), (71, 29));
        // 3 * 0.3 = 0.8999999999999999: 2.1 truncates to 2.
        assert_eq!(start_step(3, 0.3), (2, 1));
        assert_eq!(start_step(5, 0.1), (4, 1));
        assert_eq!(start_step(5, 0.19), (4, 1));
        assert_eq!(start_step(10, 0.09), (9, 1));
        // Any strength above 0 runs a step, unless N * strength vanishes
        // next to N in f64 (30 - 3e-300 == 30).
        assert_eq!(start_step(30, 0.001), (29, 1));
        assert_eq!(start_step(30, 1e-300), (30, 0));
    }

    #[test]
    fn a_mask_of_any_non_empty_size_is_taken() {
        let request = |mask: (u32, u32)| ImageToImage {
            image: RgbImage::new(48, 32),
            mask: Some(RgbImage::new(mask.0, mask.1)),
            strength: 0.8,
        };
        for size in [(48, 32), (20, 36), (90, 50), (1, 1)] {
            assert!(request(size).validate(5).is_ok(), "{size:?}");
        }
        for size in [(0, 32), (48, 0)] {
            let e = request(size).validate(5).unwrap_err().to_string();
            assert!(e.contains("mask_image") && e.contains("empty mask"), "{e}");
        }
    }

    #[test]
    fn a_mask_of_another_size_is_resized_to_the_output() {
        // Left half white on a 10x4 mask: 48x32 binary values, the left
        // half repainted and the right half kept (Lanczos keeps the edge
        // in the middle, as the PIL tests check bit for bit).
        let mut mask = RgbImage::new(10, 4);
        for (x, _, p) in mask.enumerate_pixels_mut() {
            if x < 5 {
                *p = image::Rgb([255, 255, 255]);
            }
        }
        let px = mask_pixels(&mask, 48, 32);
        assert_eq!(px.len(), 48 * 32);
        for row in px.chunks_exact(48) {
            assert!(row[..20].iter().all(|&v| v == 1.0), "{row:?}");
            assert!(row[28..].iter().all(|&v| v == 0.0), "{row:?}");
        }
    }

    #[test]
    fn luma_is_pils_convert_l() {
        // PIL: Image.new("RGB", (1, 1), c).convert("L").getpixel((0, 0)).
        assert_eq!(luma(255, 255, 255), 255);
        assert_eq!(luma(0, 0, 0), 0);
        assert_eq!(luma(255, 0, 0), 76);
        assert_eq!(luma(0, 255, 0), 150);
        assert_eq!(luma(0, 0, 255), 29);
        assert_eq!(luma(128, 128, 128), 128);
    }

    #[test]
    fn nearest_is_torch_interpolate() {
        // F.interpolate(torch.arange(6.).view(1, 1, 1, 6), size=(1, 4)) -> 0 1 3 4.
        let idx: Vec<usize> = (0..4).map(|i| nearest_index(i, 6, 4)).collect();
        assert_eq!(idx, [0, 1, 3, 4]);
        // size 3 -> 7: 0 0 0 1 1 2 2.
        let idx: Vec<usize> = (0..7).map(|i| nearest_index(i, 3, 7)).collect();
        assert_eq!(idx, [0, 0, 0, 1, 1, 2, 2]);
    }
}
