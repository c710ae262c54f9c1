//! `Lumina2Pipeline`: diffusers' `Lumina2Pipeline.__call__`, step for step.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use lumina2_scheduler::{FlowMatchEulerDiscreteScheduler, SchedulerConfig, TimestepRequest};
use lumina2_text_encoder::{PromptEncoder, PromptOptions, SystemPrompt};
use lumina2_transformer::{Config as TransformerConfig, Lumina2Transformer};
use lumina2_vae::{AutoencoderKL, AutoencoderKLConfig};

use crate::components::{self, LoadReport, PipelineSources, TransformerSource};
use crate::error::{invalid, Error, Result};
use crate::guidance;
use crate::img2img::{self, ImageToImage, Start};
use crate::memory::{self, MemoryEstimate};
use crate::noise;
use crate::options::{check_size, Conditioning, GenerateOptions, GuidanceMode, OutputKind};
use crate::original_time;
use crate::preview;
use crate::progress::{timed_stage, Control, Event, Stage, StageTimings, StepInfo};
use crate::teacache::TeaCache;

/// What a generation returns.
#[derive(Debug, Clone)]
pub struct Generation {
    /// `[B, H, W, 3]` f32 in `[0, 1]` (diffusers' `output_type="np"`), unless
    /// only latents were asked for.
    pub images: Option<Tensor>,
    /// The final latents `[B, C, h, w]`, before the VAE transform.
    pub latents: Tensor,
    /// The initial noise `[B, C, h, w]`.
    pub initial_latents: Tensor,
    /// Image-to-image: the init image's latents `[B, C, h, w]` (the scaled
    /// posterior sample, repeated to the batch).
    pub image_latents: Option<Tensor>,
    /// Image-to-image: the latents the denoising started from (the image
    /// latents noised to the first step that runs).
    pub noised_latents: Option<Tensor>,
    /// Width and height of the images in pixels.
    pub size: (usize, usize),
    /// Stage and step timings.
    pub timings: StageTimings,
    /// Things the user should know (prompt truncation, ...).
    pub warnings: Vec<String>,
    /// With TeaCache: for each transformer call in order, whether its joint
    /// layers ran (`false`: the cached residual was reused).
    pub cache_computed: Option<Vec<bool>>,
}

impl Generation {
    /// The images as 8-bit RGB, rounded as diffusers' `output_type="pil"`.
    pub fn rgb_images(&self) -> Result<Vec<image::RgbImage>> {
        let Some(images) = &self.images else {
            return Ok(Vec::new());
        };
        let (b, h, w, _) = images.dims4()?;
        let data = images.flatten_all()?.to_vec1::<f32>()?;
        let per = h * w * 3;
        let mut out = Vec::with_capacity(b);
        for chunk in data.chunks_exact(per.max(1)).take(b) {
            let bytes: Vec<u8> = chunk
                .iter()
                .copied()
                .map(lumina2_vae::image::to_u8)
                .collect();
            let img = image::RgbImage::from_raw(w as u32, h as u32, bytes).ok_or_else(|| {
                invalid("images", format!("{w}x{h} does not fit an image buffer"))
            })?;
            out.push(img);
        }
        Ok(out)
    }
}

/// Builds a [`Lumina2Pipeline`].
#[derive(Debug, Clone)]
pub struct PipelineBuilder {
    sources: PipelineSources,
    dtype: DType,
    device: Device,
    keep_resident: bool,
    vae_tiling: bool,
    int8_transformer: bool,
}

impl PipelineBuilder {
    /// The compute dtype of every component (f32 by default; bf16 halves the
    /// memory of the weights).
    pub fn dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    /// The device (CPU by default).
    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// Keep every component loaded between stages and generations (faster
    /// repeated generations; peak memory is the sum of the components).
    /// By default each is loaded when needed and released after its stage,
    /// so the peak is the largest component plus activations.
    pub fn keep_resident(mut self, keep: bool) -> Self {
        self.keep_resident = keep;
        self
    }

    /// Decode large images tile by tile (diffusers' `enable_tiling`).
    pub fn vae_tiling(mut self, tiling: bool) -> Self {
        self.vae_tiling = tiling;
        self
    }

    /// Quantise the transformer's attention and feed-forward linears to int8
    /// as they load (`lumina2_kernels::gemm::int8`; the embedders, modulation and
    /// output layer keep the compute dtype). Faster on CPUs with AMX or
    /// AVX512-VNNI, less exact: about 1% relative error on the transformer's
    /// output in the parity cases (`cargo xtask parity --int8`).
    pub fn int8_transformer(mut self, on: bool) -> Self {
        self.int8_transformer = on;
        self
    }

    /// Reads and checks the configurations; the weights are loaded when used.
    pub fn build(self) -> Result<Lumina2Pipeline> {
        if !matches!(self.dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(invalid(
                "dtype",
                format!("{:?} is not a compute dtype (f32, bf16, f16)", self.dtype),
            ));
        }
        if self.int8_transformer {
            check_int8_device(&self.device)?;
        }
        let transformer_config = self.sources.transformer.config()?;
        let vae_config = self.sources.vae_config()?;
        let scheduler_config =
            components::read_scheduler_config(self.sources.scheduler_config.as_deref())?;
        if vae_config.latent_channels != transformer_config.in_channels {
            return Err(invalid(
                "vae",
                format!(
                    "the VAE has {} latent channels, the transformer takes {}",
                    vae_config.latent_channels, transformer_config.in_channels
                ),
            ));
        }
        Ok(Lumina2Pipeline {
            sources: self.sources,
            dtype: self.dtype,
            device: self.device,
            keep_resident: self.keep_resident,
            vae_tiling: self.vae_tiling,
            int8_transformer: self.int8_transformer,
            transformer_config,
            vae_config,
            scheduler_config,
            prompt_encoder: None,
            transformer: None,
            vae: None,
            load_report: LoadReport::default(),
        })
    }
}

/// Lumina-Image 2.0 text-to-image: diffusers' `Lumina2Pipeline`.
///
/// ```no_run
/// # fn main() -> lumina2_pipeline::Result<()> {
/// use lumina2_pipeline::{GenerateOptions, Lumina2Pipeline, Noise, PipelineSources};
///
/// let sources = PipelineSources::from_pipeline_folder("Lumina-Image-2.0")?;
/// let mut pipe = Lumina2Pipeline::builder(sources).build()?;
/// let mut opts = GenerateOptions::new("a lighthouse at dawn, oil painting");
/// opts.num_inference_steps = 30;
/// opts.noise = Noise::Seed(42);
/// let out = pipe.generate(&opts, &mut |_| Default::default())?;
/// out.rgb_images()?[0].save("lighthouse.png").ok();
/// # Ok(()) }
/// ```
pub struct Lumina2Pipeline {
    sources: PipelineSources,
    dtype: DType,
    device: Device,
    keep_resident: bool,
    vae_tiling: bool,
    int8_transformer: bool,
    transformer_config: TransformerConfig,
    vae_config: AutoencoderKLConfig,
    scheduler_config: SchedulerConfig,
    prompt_encoder: Option<PromptEncoder>,
    transformer: Option<Lumina2Transformer>,
    vae: Option<AutoencoderKL>,
    /// Warnings of the components loaded during the current run, and
    /// their weights not read at load.
    load_report: LoadReport,
}

impl std::fmt::Debug for Lumina2Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lumina2Pipeline")
            .field("sources", &self.sources)
            .field("dtype", &self.dtype)
            .field("keep_resident", &self.keep_resident)
            .finish_non_exhaustive()
    }
}

/// Observer of a run; returning [`Control::Stop`] after a step stops it.
pub type Observer<'a> = dyn FnMut(Event<'_>) -> Control + 'a;

impl Lumina2Pipeline {
    /// Starts a pipeline over these component files.
    pub fn builder(sources: PipelineSources) -> PipelineBuilder {
        PipelineBuilder {
            sources,
            dtype: DType::F32,
            device: Device::Cpu,
            keep_resident: false,
            vae_tiling: false,
            int8_transformer: false,
        }
    }

    /// The transformer's configuration.
    pub fn transformer_config(&self) -> &TransformerConfig {
        &self.transformer_config
    }

    /// The VAE's configuration.
    pub fn vae_config(&self) -> &AutoencoderKLConfig {
        &self.vae_config
    }

    /// The scheduler's configuration.
    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_config
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The default image side: `sample_size * 8`, as diffusers.
    pub fn default_size(&self) -> usize {
        self.transformer_config.sample_size.saturating_mul(8)
    }

    /// The image size a request resolves to (width, height).
    pub fn resolve_size(&self, opts: &GenerateOptions) -> Result<(usize, usize)> {
        resolve_size(&self.transformer_config, opts)
    }

    /// Runs one generation. `observer` sees each stage and step; returning
    /// [`Control::Stop`] after a step ends the run with [`Error::Stopped`].
    pub fn generate(
        &mut self,
        opts: &GenerateOptions,
        observer: &mut Observer<'_>,
    ) -> Result<Generation> {
        opts.validate()?;
        let (width, height) = self.resolve_size(opts)?;
        let batch = opts.batch_size()?;
        let mut timings = StageTimings::default();
        let cfg = opts.do_classifier_free_guidance();

        // 1. Prompts -> embeddings (then the text encoder may go).
        let (embeds, warnings) = self.encode(opts, observer, &mut timings)?;
        let Embeds {
            prompt,
            prompt_mask,
            negative,
        } = embeds;

        let shape = noise::latent_shape(batch, self.transformer_config.in_channels, height, width);

        // 2. The schedule: linspace(1, 1/N, N) unless sigmas are given. diffusers
        //    computes `mu` from `latents.shape[1]` (the channel count, not the
        //    sequence length); it only matters with dynamic shifting, kept for parity.
        let mut scheduler = FlowMatchEulerDiscreteScheduler::new(self.scheduler_config.clone())?;
        let sigmas = opts
            .sigmas
            .clone()
            .unwrap_or_else(|| lumina2_scheduler::lumina2_sigmas(opts.num_inference_steps));
        let mut req = TimestepRequest::sigmas(sigmas);
        if self.scheduler_config.use_dynamic_shifting {
            let c = &self.scheduler_config;
            let mu = lumina2_scheduler::calculate_shift(
                shape.1,
                c.base_image_seq_len,
                c.max_image_seq_len,
                c.base_shift.unwrap_or(0.5),
                c.max_shift.unwrap_or(1.15),
            )?;
            req = req.with_mu(mu);
        }
        scheduler.set_timesteps(&req)?;
        scheduler.set_begin_index(0);
        let num_train = self.scheduler_config.num_train_timesteps as f32;

        // 3. Initial latents: noise in the dtype of the embeddings as diffusers
        //    draws it, or the init image noised to the first step that runs.
        let start = match &opts.image_to_image {
            None => {
                let initial = noise::initial_latents(&opts.noise, shape, self.dtype, &self.device)?;
                Start {
                    latents: initial.clone(),
                    noise: initial,
                    begin: 0,
                    image_latents: None,
                    inpaint: None,
                }
            }
            Some(i2i) => self.image_start(
                i2i,
                opts,
                (shape, (width, height)),
                &scheduler,
                observer,
                &mut timings,
            )?,
        };
        let inpaint = start.inpaint;
        let mut solver = opts
            .solver
            .build_at(scheduler, start.latents.clone(), start.begin)?;
        let num_steps = solver.num_steps();
        // The original mode's model times: the Alpha-VLLM sampler's own grid
        // over the same schedule (custom sigmas have none).
        let original_grid = (opts.guidance_mode == GuidanceMode::Original && opts.sigmas.is_none())
            .then(|| original_time::time_grid(num_steps, self.scheduler_config.shift as f32));

        // 4. Denoise.
        let transformer = self.take_transformer(observer, &mut timings)?;
        let device = self.device.clone();
        let mut cache = opts
            .cache_threshold
            .map(|t| TeaCache::new(t, opts.num_inference_steps));
        let mut denoise = || -> Result<Tensor> {
            observer(Event::StageStarted(Stage::Denoise));
            let denoise_start = Instant::now();
            let mut step_start = Instant::now();
            let mut calls = 0usize;
            let mut step_guided = false;
            let mut denoised: Option<Tensor> = None;
            while let Some(eval) = solver.pending() {
                let (step, stage, t, sigma) = (eval.step, eval.stage, eval.timestep, eval.sigma);
                // Lumina's model time, computed in f32 as the pipeline does,
                // or the original's grid point.
                let model_t = original_grid
                    .as_deref()
                    .and_then(|g| original_time::model_time(g, step, stage))
                    .unwrap_or(1f32 - t / num_train);
                let timestep = Tensor::full(model_t, batch, &device)?;
                let sample = eval.sample.clone();
                let cond = model_call(
                    &transformer,
                    cache.as_mut(),
                    (&sample, &timestep),
                    (&prompt, &prompt_mask),
                )?;
                calls += 1;
                let guided = cfg
                    && guidance::guidance_active(
                        opts.guidance_mode,
                        opts.cfg_trunc_ratio,
                        step,
                        num_steps,
                        model_t,
                    );
                let pred = match (&negative, guided) {
                    (Some((neg, neg_mask)), true) => {
                        let uncond = model_call(
                            &transformer,
                            cache.as_mut(),
                            (&sample, &timestep),
                            (neg, neg_mask),
                        )?;
                        calls += 1;
                        guidance::combine(
                            &cond,
                            &uncond,
                            opts.guidance_scale,
                            opts.cfg_normalization,
                            opts.guidance_mode,
                            opts.renorm_cfg,
                        )?
                    }
                    _ => cond,
                };
                step_guided |= guided;
                if stage == 0 && opts.preview_every.is_some_and(|k| (step + 1) % k == 0) {
                    denoised = Some(preview::predicted_x0(&sample, &pred, sigma)?);
                }
                // The flow's velocity is the negated model output.
                solver.submit(&pred.neg()?)?;
                if stage + 1 < solver.evaluations_per_step() {
                    continue;
                }
                if let Some(inpaint) = &inpaint {
                    let blended = inpaint.blend(solver.sample(), step, num_steps)?;
                    solver.replace_sample(blended)?;
                }
                let latents = solver.sample();
                let bad = count_non_finite(latents)?;
                if bad > 0 {
                    return Err(Error::NonFinite {
                        step: step + 1,
                        steps: num_steps,
                        count: bad,
                        weights: Vec::new(),
                    });
                }
                let elapsed = step_start.elapsed();
                timings.steps.push(elapsed);
                let control = observer(Event::Step(StepInfo {
                    step: step + 1,
                    num_steps,
                    timestep: t,
                    sigma,
                    guidance: step_guided,
                    model_calls: calls,
                    elapsed,
                    latents,
                    denoised: denoised.as_ref(),
                }));
                if control == Control::Stop {
                    return Err(Error::Stopped {
                        step: step + 1,
                        steps: num_steps,
                    });
                }
                calls = 0;
                step_guided = false;
                denoised = None;
                step_start = Instant::now();
            }

            let latents = solver.sample().clone();
            let d = denoise_start.elapsed();
            timings.stages.push((Stage::Denoise, d));
            observer(Event::StageFinished(Stage::Denoise, d));
            Ok(latents)
        };
        // The transformer is still loaded: a non-finite result names its
        // broken weights.
        let result = denoise().map_err(|e| self.load_report.name_broken(e));
        // A resident transformer stays loaded even when the run failed or stopped.
        if self.keep_resident {
            self.transformer = Some(transformer);
        }
        let latents = result?;
        let cache_computed = cache.map(|c| c.computed().to_vec());

        // 5. Decode.
        let images = match opts.output {
            OutputKind::Latents => None,
            OutputKind::Images => Some(self.decode(&latents, observer, &mut timings)?),
        };
        let mut warnings = warnings;
        warnings.append(&mut self.load_report.warnings);
        Ok(Generation {
            images,
            latents,
            initial_latents: start.noise,
            noised_latents: start.image_latents.as_ref().map(|_| start.latents.clone()),
            image_latents: start.image_latents,
            size: (width, height),
            timings,
            warnings,
            cache_computed,
        })
    }

    fn encode(
        &mut self,
        opts: &GenerateOptions,
        observer: &mut Observer<'_>,
        timings: &mut StageTimings,
    ) -> Result<(Embeds, Vec<String>)> {
        let cfg = opts.do_classifier_free_guidance();
        let n = opts.num_images_per_prompt;
        let (prompts, negatives) = match &opts.conditioning {
            Conditioning::Embeddings(e) => {
                let negative = match (&e.negative_prompt_embeds, &e.negative_prompt_attention_mask)
                {
                    (Some(ne), Some(nm)) if cfg => Some((repeat(ne, n)?, repeat(nm, n)?)),
                    _ => None,
                };
                return Ok((
                    Embeds {
                        prompt: repeat(&e.prompt_embeds, n)?,
                        prompt_mask: repeat(&e.prompt_attention_mask, n)?,
                        negative,
                    },
                    Vec::new(),
                ));
            }
            Conditioning::Prompts {
                prompts,
                negative_prompts,
            } => (prompts, negative_prompts),
        };
        let negatives = match (opts.guidance_mode, negatives) {
            // The Alpha-VLLM sampler templates a non-empty negative prompt too.
            (GuidanceMode::Original, Some(negs)) => Some(
                negs.iter()
                    .map(|p| {
                        if p.is_empty() {
                            p.clone()
                        } else {
                            opts.system_prompt.apply(p)
                        }
                    })
                    .collect(),
            ),
            (_, negs) => negs.clone(),
        };
        let encoder = match self.prompt_encoder.take() {
            Some(e) => e,
            None => timed_stage(Stage::LoadTextEncoder, observer, timings, || {
                components::load_prompt_encoder(
                    &self.sources,
                    self.dtype,
                    &self.device,
                    &mut self.load_report,
                )
            })?,
        };
        let start = Instant::now();
        observer(Event::StageStarted(Stage::Encode));
        let popts = PromptOptions {
            system_prompt: opts.system_prompt.clone(),
            negative_prompt: negatives,
            do_classifier_free_guidance: cfg,
            num_images_per_prompt: n,
            max_sequence_length: opts.max_sequence_length,
            // The transformer drops padded caption rows: they need not be
            // computed (the usual prompt is far shorter than 256 tokens).
            trim_padding: true,
        };
        let out = encoder.encode(prompts, &popts);
        if self.keep_resident {
            self.prompt_encoder = Some(encoder);
        }
        let out = out?;
        let mut produced = vec![(&out.prompt_embeds, Some(&out.prompt_attention_mask))];
        if let (Some(e), Some(m)) = (
            &out.negative_prompt_embeds,
            &out.negative_prompt_attention_mask,
        ) {
            produced.push((e, Some(m)));
        }
        self.load_report.check_encoder_output(&produced)?;
        let d = start.elapsed();
        timings.stages.push((Stage::Encode, d));
        observer(Event::StageFinished(Stage::Encode, d));
        let negative = match (
            out.negative_prompt_embeds,
            out.negative_prompt_attention_mask,
        ) {
            (Some(e), Some(m)) => Some((e, m)),
            _ => None,
        };
        Ok((
            Embeds {
                prompt: out.prompt_embeds,
                prompt_mask: out.prompt_attention_mask,
                negative,
            },
            out.warnings,
        ))
    }

    fn take_transformer(
        &mut self,
        observer: &mut Observer<'_>,
        timings: &mut StageTimings,
    ) -> Result<Lumina2Transformer> {
        if let Some(t) = self.transformer.take() {
            return Ok(t);
        }
        timed_stage(Stage::LoadTransformer, observer, timings, || {
            components::load_transformer(
                &self.sources,
                &self.transformer_config,
                (self.dtype, self.int8_transformer),
                &self.device,
                &mut self.load_report,
            )
        })
    }

    fn take_vae(
        &mut self,
        observer: &mut Observer<'_>,
        timings: &mut StageTimings,
    ) -> Result<AutoencoderKL> {
        if let Some(v) = self.vae.take() {
            return Ok(v);
        }
        timed_stage(Stage::LoadVae, observer, timings, || {
            components::load_vae(
                &self.sources.vae,
                &self.vae_config,
                (self.dtype, self.vae_tiling),
                &self.device,
                &mut self.load_report,
            )
        })
    }

    /// The start of an image-to-image run (see [`img2img::image_start`]):
    /// the image resized to the output size, as diffusers' Flux pipelines.
    fn image_start(
        &mut self,
        i2i: &ImageToImage,
        opts: &GenerateOptions,
        (shape, size): ((usize, usize, usize, usize), (usize, usize)),
        scheduler: &FlowMatchEulerDiscreteScheduler,
        observer: &mut Observer<'_>,
        timings: &mut StageTimings,
    ) -> Result<Start> {
        let vae = self.take_vae(observer, timings)?;
        let spec = img2img::StartSpec {
            noise: &opts.noise,
            shape,
            size,
            dtype: self.dtype,
            device: &self.device,
        };
        let start = img2img::image_start(&vae, i2i, &spec, scheduler, observer, timings);
        if self.keep_resident {
            self.vae = Some(vae);
        }
        start
    }

    fn decode(
        &mut self,
        latents: &Tensor,
        observer: &mut Observer<'_>,
        timings: &mut StageTimings,
    ) -> Result<Tensor> {
        let vae = self.take_vae(observer, timings)?;
        let start = Instant::now();
        observer(Event::StageStarted(Stage::Decode));
        let result = decode_latents(&vae, latents);
        if self.keep_resident {
            self.vae = Some(vae);
        }
        let images = result?;
        let d = start.elapsed();
        timings.stages.push((Stage::Decode, d));
        observer(Event::StageFinished(Stage::Decode, d));
        Ok(images)
    }

    /// What sizes requests: a copy of the configuration the estimate needs,
    /// so that requests can be checked while the pipeline renders another
    /// (a server checks each request before queueing it).
    pub fn memory_check(&self) -> MemoryCheck {
        MemoryCheck {
            sources: self.sources.clone(),
            dtype: self.dtype,
            device: self.device.clone(),
            keep_resident: self.keep_resident,
            vae_tiling: self.vae_tiling,
            transformer_config: self.transformer_config.clone(),
            vae_config: self.vae_config.clone(),
            loaded: Loaded {
                text_encoder: self.prompt_encoder.is_some(),
                transformer: self.transformer.is_some(),
                vae: self.vae.is_some(),
            },
        }
    }

    /// Estimates the memory of each stage of a request (see [`crate::memory`]).
    pub fn estimate_memory(&self, opts: &GenerateOptions) -> Result<MemoryEstimate> {
        self.memory_check().estimate(opts)
    }

    /// Refuses a request whose estimated peak exceeds the memory available
    /// now on the pipeline's device ([`Error::OutOfMemory`] with the
    /// estimate; [`memory::available_bytes`]); passes where the available
    /// memory is unknown.
    pub fn check_memory(&self, opts: &GenerateOptions) -> Result<()> {
        self.memory_check().check(opts)
    }

    /// The system prompt a request would use (for metadata).
    pub fn system_prompt_text(opts: &GenerateOptions) -> Option<&str> {
        match &opts.system_prompt {
            SystemPrompt::Text(t) => Some(t),
            SystemPrompt::None => None,
        }
    }
}

/// Latents to `[B, H, W, 3]` images in `[0, 1]`: `latents / scaling_factor
/// + shift_factor`, decoded, denormalised (diffusers' `output_type="np"`).
pub(crate) fn decode_latents(vae: &AutoencoderKL, latents: &Tensor) -> Result<Tensor> {
    let z = vae.unscale_latents(latents)?;
    let decoded = vae.decode(&z)?;
    Ok(lumina2_vae::image::denormalize(&decoded)?)
}

struct Embeds {
    prompt: Tensor,
    prompt_mask: Tensor,
    negative: Option<(Tensor, Tensor)>,
}

/// Repeats each row `n` times (`p0 p0 p1 p1`), embeddings and masks alike.
fn repeat(t: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(t.clone());
    }
    let b = t.dim(0)?;
    let idx: Vec<u32> = (0..b as u32)
        .flat_map(|i| std::iter::repeat_n(i, n))
        .collect();
    let idx = Tensor::from_vec(idx, b * n, t.device())?;
    Ok(t.index_select(&idx, 0)?)
}

/// One transformer call, through the step cache when there is one.
fn model_call(
    transformer: &Lumina2Transformer,
    cache: Option<&mut TeaCache>,
    (sample, timestep): (&Tensor, &Tensor),
    (caption, mask): (&Tensor, &Tensor),
) -> Result<Tensor> {
    match cache {
        Some(c) => c.forward(transformer, sample, timestep, caption, mask),
        None => Ok(transformer.forward(sample, timestep, caption, mask)?),
    }
}

pub(crate) fn count_non_finite(t: &Tensor) -> Result<usize> {
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(v.iter().filter(|x| !x.is_finite()).count())
}

/// The memory estimate of a pipeline's requests, apart from the pipeline
/// ([`Lumina2Pipeline::memory_check`]).
#[derive(Debug, Clone)]
pub struct MemoryCheck {
    sources: PipelineSources,
    dtype: DType,
    device: Device,
    keep_resident: bool,
    vae_tiling: bool,
    transformer_config: TransformerConfig,
    vae_config: AutoencoderKLConfig,
    loaded: Loaded,
}

/// Which components a pipeline held when its [`MemoryCheck`] was taken.
#[derive(Debug, Clone, Copy)]
struct Loaded {
    text_encoder: bool,
    transformer: bool,
    vae: bool,
}

impl MemoryCheck {
    /// Estimates the memory of each stage of a request (see [`crate::memory`]).
    pub fn estimate(&self, opts: &GenerateOptions) -> Result<MemoryEstimate> {
        // The batch, sizes and sequence length are bounded before they are
        // multiplied into byte counts.
        opts.validate()?;
        let (w, h) = resolve_size(&self.transformer_config, opts)?;
        let batch = opts.batch_size()?;
        let cfg = &self.transformer_config;
        let t_weights = match &self.sources.transformer {
            // A single file may be quantised: its size bounds what stays in memory.
            TransformerSource::File { path, .. } if components::is_gguf(path) => {
                memory::files_bytes(path)
            }
            _ => memory::transformer_weight_bytes(cfg, self.dtype),
        };
        // Guidance runs cond and uncond one after the other: one batch at a time.
        let denoise =
            memory::transformer_bytes(cfg, t_weights, batch, w, h, opts.max_sequence_length);
        // An all-in-one checkpoint counts each component's own tensors.
        let te_files = memory::component_bytes(
            &self.sources.text_encoder,
            lumina2_loader::comfy::TEXT_ENCODER_PREFIX,
        );
        let te_weights = if components::is_gguf(&self.sources.text_encoder) {
            // Quantised linears stay as stored; the embedding is dequantised.
            te_files.saturating_mul(1 + memory::dtype_bytes(self.dtype))
        } else {
            // bf16 files.
            te_files.saturating_mul(memory::dtype_bytes(self.dtype)) / 2
        };
        let encode = te_weights.saturating_add(
            (batch as u64)
                .saturating_mul(opts.max_sequence_length as u64)
                .saturating_mul(64 << 10),
        );
        let vae_weights =
            memory::component_bytes(&self.sources.vae, lumina2_loader::comfy::VAE_PREFIX);
        let decode = match opts.output {
            OutputKind::Latents => 0,
            OutputKind::Images => memory::vae_decode_bytes(
                &self.vae_config,
                vae_weights,
                batch,
                w,
                h,
                self.vae_tiling,
            ),
        };
        let held = |on: bool, bytes: u64| if on { bytes } else { 0 };
        let loaded = held(self.loaded.text_encoder, te_weights)
            .saturating_add(held(self.loaded.transformer, t_weights))
            .saturating_add(held(self.loaded.vae, vae_weights));
        Ok(MemoryEstimate {
            encode,
            denoise,
            decode,
            loaded,
        })
    }

    /// Refuses a request whose estimated peak exceeds the memory available
    /// now on the pipeline's device ([`Error::OutOfMemory`] with the
    /// estimate; [`memory::available_bytes`]); passes where the available
    /// memory is unknown.
    pub fn check(&self, opts: &GenerateOptions) -> Result<()> {
        let est = self.estimate(opts)?;
        let Some(avail) = memory::available_bytes(&self.device) else {
            return Ok(());
        };
        let peak = est.needed(self.keep_resident);
        if peak > avail {
            let (w, h) = resolve_size(&self.transformer_config, opts)?;
            let stage = if est.decode >= est.denoise && est.decode >= est.encode {
                "decoding"
            } else if est.denoise >= est.encode {
                "denoising"
            } else {
                "encoding"
            };
            return Err(Error::OutOfMemory {
                what: format!(
                    "{} image(s) of {w}x{h} on {} ({stage} is the largest stage)",
                    opts.batch_size()?,
                    device_name(&self.device)
                ),
                needed_mib: peak >> 20,
                available_mib: avail >> 20,
            });
        }
        Ok(())
    }
}

/// The image size a request resolves to: `sample_size * 8` where absent, as diffusers.
fn resolve_size(cfg: &TransformerConfig, opts: &GenerateOptions) -> Result<(usize, usize)> {
    let default = cfg.sample_size.saturating_mul(8);
    let w = opts.width.unwrap_or(default);
    let h = opts.height.unwrap_or(default);
    check_size("width", w)?;
    check_size("height", h)?;
    Ok((w, h))
}

/// int8 linears run on the CPU only: the kernels are CPU code (AMX-INT8,
/// AVX512-VNNI, plain Rust); on a GPU they would copy every activation to
/// the host and back at each layer.
pub(crate) fn check_int8_device(device: &Device) -> Result<()> {
    if device.is_cpu() {
        return Ok(());
    }
    Err(invalid(
        "int8",
        format!(
            "int8 linears run on the CPU only, not on {}; on a GPU use bf16, f16 or a GGUF transformer",
            device_name(device)
        ),
    ))
}

/// `cpu`, `cuda:N` or `metal:N`, as the CLI's `--device` spells it.
pub(crate) fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}
