//! `ZImagePipeline`: diffusers' `ZImagePipeline.__call__`, step for step,
//! and with an init image `ZImageImg2ImgPipeline.__call__` /
//! `ZImageInpaintPipeline.__call__` (the shared steps of [`crate::img2img`]).

use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};
use lumina2_scheduler::{FlowMatchEulerDiscreteScheduler, TimestepRequest};
use lumina2_text_encoder::Qwen3Config;
use lumina2_transformer::{ZImageConfig, ZImageTransformer};

use crate::error::{invalid, Result};
use crate::img2img::{self, Inpaint, Start};
use crate::noise;
use crate::options::MAX_SIDE;
use crate::pipeline::{Generation, Observer};
use crate::preview;
use crate::progress::{Event, Stage, StageTimings, StepInfo};
use crate::settings::{check_latent_channels, pipeline_builder, BuildSettings};
use crate::stages::{end_step, shared_accessors, Denoised, Shared};
use crate::torch_linspace::linspace_f32;

use super::guidance;
use super::options::{ZImageOptions, ZIMAGE_DEFAULT_SIZE};
use super::sources::{self, ZImagePromptEncoder, ZImageSources};

/// Z-Image text-to-image: diffusers' `ZImagePipeline` (Z-Image and
/// Z-Image-Turbo), built from the same transformer blocks, VAE, scheduler,
/// noise and progress reporting as [`crate::Lumina2Pipeline`].
///
/// ```no_run
/// # fn main() -> lumina2_pipeline::Result<()> {
/// use lumina2_pipeline::{Noise, ZImageOptions, ZImagePipeline, ZImageSources};
///
/// let sources = ZImageSources::from_pipeline_folder("Z-Image-Turbo")?;
/// let mut pipe = ZImagePipeline::builder(sources).build()?;
/// let mut opts = ZImageOptions::new("a lighthouse at dawn, oil painting");
/// opts.num_inference_steps = 8;
/// opts.guidance_scale = 0.0;
/// opts.noise = Noise::Seed(42);
/// let out = pipe.generate(&opts, &mut |_| Default::default())?;
/// out.rgb_images()?[0].save("lighthouse.png").ok();
/// # Ok(()) }
/// ```
pub struct ZImagePipeline {
    sources: ZImageSources,
    transformer_config: ZImageConfig,
    text_encoder_config: Qwen3Config,
    prompt_encoder: Option<ZImagePromptEncoder>,
    transformer: Option<ZImageTransformer>,
    /// The settings, the VAE, the scheduler's configuration and the load
    /// report, as Lumina2 holds them.
    shared: Shared,
}

impl std::fmt::Debug for ZImagePipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.shared.fmt_pipeline(f, "ZImagePipeline", &self.sources)
    }
}

pipeline_builder! {
    /// Builds a [`ZImagePipeline`].
    ZImagePipelineBuilder(ZImageSources) -> ZImagePipeline;

    /// The compute dtype of every component (f32 by default). The latents
    /// and the scheduler stay in f32 whatever it is, as the reference.
    dtype;

    /// Keep every component loaded between stages and generations.
    keep_resident;

    /// Quantise the transformer's attention and feed-forward linears (those
    /// of its blocks) to int8 as they load, as
    /// [`crate::PipelineBuilder::int8_transformer`] does for Lumina2: the
    /// embedders, modulation and output layer keep the compute dtype. CPU only.
    int8_transformer;
}

impl ZImagePipeline {
    /// Reads and checks the configurations (`build`, after the settings).
    fn new(sources: ZImageSources, settings: BuildSettings) -> Result<Self> {
        let transformer_config = sources.transformer_config()?;
        let text_encoder_config = sources.text_encoder_config()?;
        let vae_config = sources.vae_config()?;
        let scheduler_config = sources.scheduler()?;
        check_latent_channels(vae_config.latent_channels, transformer_config.in_channels)?;
        if text_encoder_config.hidden_size != transformer_config.cap_feat_dim {
            return Err(invalid(
                "text_encoder",
                format!(
                    "the text encoder's hidden_size is {}, the transformer's cap_feat_dim {}",
                    text_encoder_config.hidden_size, transformer_config.cap_feat_dim
                ),
            ));
        }
        Ok(Self {
            sources,
            transformer_config,
            text_encoder_config,
            prompt_encoder: None,
            transformer: None,
            shared: Shared::new(settings, vae_config, scheduler_config),
        })
    }

    /// Starts a pipeline over these component files.
    pub fn builder(sources: ZImageSources) -> ZImagePipelineBuilder {
        ZImagePipelineBuilder {
            sources,
            settings: BuildSettings::default(),
        }
    }

    shared_accessors!(ZImageConfig);

    /// `vae_scale_factor`: `2 ** (len(block_out_channels) - 1)`.
    pub fn vae_scale_factor(&self) -> usize {
        let levels = self.shared.vae_config.block_out_channels.len().max(1);
        1usize << (levels - 1).min(16)
    }

    /// The image size a request resolves to (width, height): 1024 where
    /// absent, each a multiple of twice the VAE's factor, as the reference
    /// requires. With an init image, the image's size rounded down to the
    /// multiple where absent, and refused where it differs from it: the
    /// references resize the image to that size whatever the request says,
    /// and fail mixing its latents with noise of another size.
    pub fn resolve_size(&self, opts: &ZImageOptions) -> Result<(usize, usize)> {
        let multiple = self.vae_scale_factor() * 2;
        let default = match &opts.image_to_image {
            Some(i2i) => img2img::default_size(&i2i.image, multiple),
            None => (ZIMAGE_DEFAULT_SIZE, ZIMAGE_DEFAULT_SIZE),
        };
        let w = opts.width.unwrap_or(default.0);
        let h = opts.height.unwrap_or(default.1);
        for (name, v) in [("width", w), ("height", h)] {
            if v == 0 || !v.is_multiple_of(multiple) {
                return Err(invalid(
                    name,
                    format!(
                        "{v} is not a positive multiple of {multiple} (twice the VAE's factor)"
                    ),
                ));
            }
            if v > MAX_SIDE {
                return Err(invalid(
                    name,
                    format!("{v} is larger than {MAX_SIDE} pixels"),
                ));
            }
        }
        if let Some(i2i) = &opts.image_to_image {
            if (w, h) != default {
                let (iw, ih) = i2i.image.dimensions();
                return Err(invalid(
                    if w != default.0 { "width" } else { "height" },
                    format!(
                        "{w}x{h} is not the size of the init image ({iw}x{ih}, resized to {}x{}, \
                         its size rounded down to a multiple of {multiple}); leave the size unset",
                        default.0, default.1
                    ),
                ));
            }
        }
        Ok((w, h))
    }

    /// The latent shape of `prepare_latents`: `2 * (side // (vae_scale_factor * 2))`.
    fn latent_shape(&self, batch: usize, (w, h): (usize, usize)) -> (usize, usize, usize, usize) {
        let f = self.vae_scale_factor() * 2;
        (
            batch,
            self.transformer_config.in_channels,
            2 * (h / f),
            2 * (w / f),
        )
    }

    /// The sigmas the scheduler is given: the request's, or
    /// `torch.linspace(1.0, 1 / N, N)` (float32).
    fn sigmas(opts: &ZImageOptions) -> Vec<f64> {
        match &opts.sigmas {
            Some(s) => s.clone(),
            None => {
                let n = opts.num_inference_steps;
                let end = (1.0 / n as f64) as f32;
                linspace_f32(1.0, end, n)
                    .into_iter()
                    .map(f64::from)
                    .collect()
            }
        }
    }

    /// Runs one generation. `observer` sees each stage and step; returning
    /// [`Control::Stop`] after a step ends the run with [`Error::Stopped`].
    pub fn generate(
        &mut self,
        opts: &ZImageOptions,
        observer: &mut Observer<'_>,
    ) -> Result<Generation> {
        opts.validate()?;
        let size = self.resolve_size(opts)?;
        let batch = opts.batch_size()?;
        let cfg = opts.do_classifier_free_guidance();
        let mut timings = StageTimings::default();

        // 1. Prompts -> per-prompt embeddings, each repeated per image.
        let mut warnings = Vec::new();
        let (prompt_embeds, negative_embeds) =
            self.encode(opts, cfg, observer, &mut timings, &mut warnings)?;

        let shape = self.latent_shape(batch, size);

        // 2. The schedule: `mu` from the image's token count, passed as the
        //    reference passes it (the scheduler uses it only with dynamic shifting).
        let c = &self.shared.scheduler_config;
        let image_seq_len = (shape.2 / 2) * (shape.3 / 2);
        let mu = lumina2_scheduler::calculate_shift(
            image_seq_len,
            c.base_image_seq_len,
            c.max_image_seq_len,
            c.base_shift.unwrap_or(0.5),
            c.max_shift.unwrap_or(1.15),
        )?;
        let mut scheduler = FlowMatchEulerDiscreteScheduler::new(c.clone())?;
        scheduler.set_timesteps(&TimestepRequest::sigmas(Self::sigmas(opts)).with_mu(mu))?;

        // 3. Initial latents: noise drawn in f32 whatever the compute dtype,
        //    or the init image noised to the first step that runs (in the
        //    compute dtype, as the reference: the first step returns f32).
        let start = match &opts.image_to_image {
            None => Start::from_noise(noise::initial_latents(
                &opts.noise,
                shape,
                DType::F32,
                &self.shared.settings.device,
            )?),
            Some(i2i) => {
                let (iw, ih) = i2i.image.dimensions();
                if (iw as usize, ih as usize) != size {
                    warnings.push(format!(
                        "the init image is {iw}x{ih}: resized to {}x{} (Lanczos)",
                        size.0, size.1
                    ));
                }
                self.shared.image_start(
                    &self.sources.vae,
                    i2i,
                    &opts.noise,
                    (shape, size),
                    &scheduler,
                    observer,
                    &mut timings,
                )?
            }
        };
        scheduler.set_begin_index(start.begin);

        // 4. Denoise.
        let transformer = self.shared.take_transformer(
            &mut self.transformer,
            (
                sources::load_transformer,
                &self.sources,
                &self.transformer_config,
            ),
            observer,
            &mut timings,
        )?;
        let run = Denoise {
            latents: start.latents.clone(),
            begin: start.begin,
            inpaint: start.inpaint.as_ref(),
            prompt: &prompt_embeds,
            negative: &negative_embeds,
            opts,
            cfg,
        };
        let latents =
            self.shared
                .denoise_with(&mut self.transformer, transformer, |transformer| {
                    denoise(transformer, &mut scheduler, run, observer, &mut timings)
                })?;

        // 5. Decode, the latents cast to the VAE's dtype.
        let run = Denoised {
            start,
            latents,
            size,
            timings,
            warnings,
            cache_computed: None,
        };
        self.shared
            .finish(&self.sources.vae, run, (opts.output, true), observer)
    }

    /// `encode_prompt`: the prompts' embeddings and, with guidance, the
    /// negatives', each repeated `num_images_per_prompt` times (`p0 p0 p1 p1`).
    fn encode(
        &mut self,
        opts: &ZImageOptions,
        cfg: bool,
        observer: &mut Observer<'_>,
        timings: &mut StageTimings,
        warnings: &mut Vec<String>,
    ) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        let (zsources, te_config) = (&self.sources, &self.text_encoder_config);
        let load = |s: &BuildSettings, report: &mut _| {
            sources::load_prompt_encoder(zsources, te_config, s.dtype, &s.device, report)
        };
        let run = |encoder: &ZImagePromptEncoder| -> Result<(Vec<Tensor>, Vec<Tensor>)> {
            let n = opts.num_images_per_prompt;
            let pos = encode_prompts(encoder, &opts.prompts, opts.max_sequence_length, warnings)?;
            let neg = if cfg {
                encode_prompts(
                    encoder,
                    &opts.negatives(),
                    opts.max_sequence_length,
                    warnings,
                )?
            } else {
                Vec::new()
            };
            Ok((repeat_each(pos, n), repeat_each(neg, n)))
        };
        self.shared
            .encode_stage(&mut self.prompt_encoder, load, observer, timings, run)
    }
}

/// `_encode_prompt`: each prompt rendered with the chat template, the batch
/// tokenized to `max_sequence_length`, `hidden_states[-2]` of the text
/// encoder, and each prompt's rows where the attention mask is set.
fn encode_prompts(
    encoder: &ZImagePromptEncoder,
    prompts: &[String],
    max_len: usize,
    warnings: &mut Vec<String>,
) -> Result<Vec<Tensor>> {
    let tokens = encoder.tokenizer.encode_prompts(prompts, max_len)?;
    for (i, cut) in tokens.truncated.iter().enumerate() {
        if let Some(cut) = cut {
            let w = format!(
                "prompt {i} is longer than {max_len} tokens with its chat template; the end was cut: {cut:?}"
            );
            tracing::warn!("{w}");
            warnings.push(w);
        }
    }
    let device = encoder.encoder.device().clone();
    let b = tokens.input_ids.len();
    // The padding is on the right and the encoder is causal: a real token
    // never sees a pad, so the batch is cut after its longest prompt.
    // diffusers runs all `max_len` positions and then drops the pads'
    // states; the real tokens' states do not depend on the pads (every op
    // is per token, or sums over keys where a pad's weight is 0; only a
    // matmul's order of summation may change with its number of rows:
    // text encoder test `right_padding_does_not_change_real_tokens`), and
    // the usual short prompt costs a fraction of 512 positions (the default).
    let len = tokens.longest().max(1);
    let cut = |rows: &[Vec<u32>]| -> Vec<u32> {
        rows.iter()
            .flat_map(|r| r[..len.min(r.len())].iter().copied())
            .collect()
    };
    let ids = Tensor::from_vec(cut(&tokens.input_ids), (b, len), &device)?;
    let mask_t = Tensor::from_vec(cut(&tokens.attention_mask), (b, len), &device)?;
    let hidden = encoder.encoder.forward(&ids, Some(&mask_t))?;
    let mut out = Vec::with_capacity(b);
    for (i, row) in tokens.attention_mask.iter().enumerate() {
        let keep: Vec<u32> = row
            .iter()
            .enumerate()
            .filter(|(_, m)| **m != 0)
            .map(|(j, _)| j as u32)
            .collect();
        if keep.is_empty() {
            return Err(invalid("prompt", format!("prompt {i} has no tokens")));
        }
        let idx = Tensor::from_vec(keep.clone(), keep.len(), &device)?;
        out.push(hidden.get(i)?.index_select(&idx, 0)?);
    }
    Ok(out)
}

/// `[pe for pe in embeds for _ in range(n)]`.
fn repeat_each(embeds: Vec<Tensor>, n: usize) -> Vec<Tensor> {
    embeds
        .into_iter()
        .flat_map(|e| std::iter::repeat_n(e, n))
        .collect()
}

/// What the denoising loop runs on.
struct Denoise<'a> {
    latents: Tensor,
    /// The first step of the schedule that runs (image-to-image).
    begin: usize,
    /// Inpainting: what each step puts back.
    inpaint: Option<&'a Inpaint>,
    prompt: &'a [Tensor],
    negative: &'a [Tensor],
    opts: &'a ZImageOptions,
    cfg: bool,
}

/// The denoising loop of `ZImagePipeline.__call__`: latents in f32, the
/// model on `(1000 - t) / 1000`, guidance per image, the negated prediction
/// to the Euler step; from the begin index on, and with inpainting the known
/// region put back after each step (`ZImageInpaintPipeline`).
fn denoise(
    transformer: &ZImageTransformer,
    scheduler: &mut FlowMatchEulerDiscreteScheduler,
    run: Denoise<'_>,
    observer: &mut Observer<'_>,
    timings: &mut StageTimings,
) -> Result<Tensor> {
    let Denoise {
        mut latents,
        begin,
        inpaint,
        prompt,
        negative,
        opts,
        cfg,
    } = run;
    observer(Event::StageStarted(Stage::Denoise));
    let denoise_start = Instant::now();
    let batch = latents.dim(0)?;
    let device = latents.device().clone();
    let model_dtype = transformer.dtype();
    let timesteps: Vec<f32> = scheduler.timesteps().get(begin..).unwrap_or(&[]).to_vec();
    let sigmas: Vec<f32> = scheduler.sigmas().get(begin..).unwrap_or(&[]).to_vec();
    let num_steps = timesteps.len();
    for (i, &t) in timesteps.iter().enumerate() {
        let step_start = Instant::now();
        let t_norm = guidance::normalised_time(t);
        let scale = if cfg {
            guidance::step_scale(opts.guidance_scale, opts.cfg_truncation, t_norm)
        } else {
            opts.guidance_scale
        };
        let apply_cfg = cfg && scale > 0.0;
        let typed = latents.to_dtype(model_dtype)?;
        let pred = if apply_cfg {
            let input = Tensor::cat(&[&typed, &typed], 0)?;
            let captions: Vec<Tensor> = prompt.iter().chain(negative).cloned().collect();
            let timestep = Tensor::full(t_norm, 2 * batch, &device)?;
            let out = transformer.forward(&input, &timestep, &captions)?;
            let guided = (0..batch)
                .map(|j| {
                    guidance::combine(
                        &out.get(j)?,
                        &out.get(batch + j)?,
                        scale,
                        opts.cfg_normalization,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            Tensor::stack(&guided, 0)?
        } else {
            let timestep = Tensor::full(t_norm, batch, &device)?;
            transformer
                .forward(&typed, &timestep, prompt)?
                .to_dtype(DType::F32)?
        };
        let sigma = sigmas.get(i).copied().unwrap_or(0.0);
        let denoised = if opts.preview_every.is_some_and(|k| (i + 1) % k == 0) {
            Some(preview::predicted_x0(&latents, &pred, sigma)?)
        } else {
            None
        };
        // The flow's velocity is the negated model output.
        latents = scheduler.step(&pred.neg()?, t, &latents, None)?;
        if let Some(inpaint) = inpaint {
            latents = inpaint.blend(&latents, i, num_steps)?;
        }
        let info = StepInfo {
            step: i + 1,
            num_steps,
            timestep: t,
            sigma,
            guidance: apply_cfg,
            model_calls: 1,
            elapsed: Duration::ZERO,
            latents: &latents,
            denoised: denoised.as_ref(),
        };
        end_step(info, step_start, observer, timings)?;
    }
    let d = denoise_start.elapsed();
    timings.stages.push((Stage::Denoise, d));
    observer(Event::StageFinished(Stage::Denoise, d));
    Ok(latents)
}
