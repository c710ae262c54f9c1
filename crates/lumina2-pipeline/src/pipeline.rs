//! `Lumina2Pipeline`: diffusers' `Lumina2Pipeline.__call__`, step for step.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use lumina2_scheduler::{FlowMatchEulerDiscreteScheduler, TimestepRequest};
use lumina2_text_encoder::{PromptEncoder, PromptOptions, SystemPrompt};
use lumina2_transformer::{Config as TransformerConfig, Lumina2Transformer};
use lumina2_vae::AutoencoderKLConfig;

use crate::components::{self, PipelineSources, TransformerSource};
use crate::error::{invalid, Error, Result};
use crate::guidance;
use crate::img2img::Start;
use crate::memory::{self, MemoryEstimate};
use crate::noise;
use crate::options::{check_size, Conditioning, GenerateOptions, GuidanceMode, OutputKind};
use crate::original_time;
use crate::preview;
use crate::progress::{Control, Event, Stage, StageTimings, StepInfo};
use crate::settings::{check_latent_channels, device_name, pipeline_builder, BuildSettings};
use crate::stages::{end_step, shared_accessors, Denoised, Shared};
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

pipeline_builder! {
    /// Builds a [`Lumina2Pipeline`].
    PipelineBuilder(PipelineSources) -> Lumina2Pipeline;

    /// The compute dtype of every component (f32 by default; bf16 halves the
    /// memory of the weights).
    dtype;

    /// Keep every component loaded between stages and generations (faster
    /// repeated generations; peak memory is the sum of the components).
    /// By default each is loaded when needed and released after its stage,
    /// so the peak is the largest component plus activations.
    keep_resident;

    /// Quantise the transformer's attention and feed-forward linears to int8
    /// as they load (`lumina2_kernels::gemm::int8`; the embedders, modulation and
    /// output layer keep the compute dtype). Faster on CPUs with AMX or
    /// AVX512-VNNI, less exact: about 1% relative error on the transformer's
    /// output in the parity cases (`cargo xtask parity --int8`).
    int8_transformer;
}

impl Lumina2Pipeline {
    /// Reads and checks the configurations (`build`, after the settings).
    fn new(sources: PipelineSources, settings: BuildSettings) -> Result<Self> {
        let transformer_config = sources.transformer.config()?;
        let vae_config = sources.vae_config()?;
        let scheduler_config =
            components::read_scheduler_config(sources.scheduler_config.as_deref())?;
        check_latent_channels(vae_config.latent_channels, transformer_config.in_channels)?;
        Ok(Self {
            sources,
            transformer_config,
            prompt_encoder: None,
            transformer: None,
            shared: Shared::new(settings, vae_config, scheduler_config),
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
    transformer_config: TransformerConfig,
    prompt_encoder: Option<PromptEncoder>,
    transformer: Option<Lumina2Transformer>,
    /// The settings, the VAE, the scheduler's configuration and the load
    /// report, as Z-Image holds them.
    shared: Shared,
}

impl std::fmt::Debug for Lumina2Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.shared
            .fmt_pipeline(f, "Lumina2Pipeline", &self.sources)
    }
}

/// Observer of a run; returning [`Control::Stop`] after a step stops it.
pub type Observer<'a> = dyn FnMut(Event<'_>) -> Control + 'a;

impl Lumina2Pipeline {
    /// Starts a pipeline over these component files.
    pub fn builder(sources: PipelineSources) -> PipelineBuilder {
        PipelineBuilder {
            sources,
            settings: BuildSettings::default(),
        }
    }

    shared_accessors!(TransformerConfig);

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
        let scheduler_config = &self.shared.scheduler_config;
        let mut scheduler = FlowMatchEulerDiscreteScheduler::new(scheduler_config.clone())?;
        let sigmas = opts
            .sigmas
            .clone()
            .unwrap_or_else(|| lumina2_scheduler::lumina2_sigmas(opts.num_inference_steps));
        let mut req = TimestepRequest::sigmas(sigmas);
        if scheduler_config.use_dynamic_shifting {
            let c = scheduler_config;
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
        let num_train = scheduler_config.num_train_timesteps as f32;
        let shift = scheduler_config.shift as f32;

        // 3. Initial latents: noise in the dtype of the embeddings as diffusers
        //    draws it, or the init image noised to the first step that runs.
        let mut start = match &opts.image_to_image {
            None => {
                let settings = &self.shared.settings;
                Start::from_noise(noise::initial_latents(
                    &opts.noise,
                    shape,
                    settings.dtype,
                    &settings.device,
                )?)
            }
            // The image resized to the output size, as diffusers' Flux pipelines.
            Some(i2i) => self.shared.image_start(
                &self.sources.vae,
                i2i,
                &opts.noise,
                (shape, (width, height)),
                &scheduler,
                observer,
                &mut timings,
            )?,
        };
        let inpaint = start.inpaint.take();
        let mut solver = opts
            .solver
            .build_at(scheduler, start.latents.clone(), start.begin)?;
        let num_steps = solver.num_steps();
        // The original mode's model times: the Alpha-VLLM sampler's own grid
        // over the same schedule (custom sigmas have none).
        let original_grid = (opts.guidance_mode == GuidanceMode::Original && opts.sigmas.is_none())
            .then(|| original_time::time_grid(num_steps, shift));

        // 4. Denoise.
        let transformer = self.shared.take_transformer(
            &mut self.transformer,
            (
                components::load_transformer,
                &self.sources,
                &self.transformer_config,
            ),
            observer,
            &mut timings,
        )?;
        let device = self.shared.settings.device.clone();
        let mut cache = opts
            .cache_threshold
            .map(|t| TeaCache::new(t, opts.num_inference_steps));
        let denoise = |transformer: &Lumina2Transformer| -> Result<Tensor> {
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
                    transformer,
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
                            transformer,
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
                let info = StepInfo {
                    step: step + 1,
                    num_steps,
                    timestep: t,
                    sigma,
                    guidance: step_guided,
                    model_calls: calls,
                    elapsed: Duration::ZERO,
                    latents: solver.sample(),
                    denoised: denoised.as_ref(),
                };
                end_step(info, step_start, observer, &mut timings)?;
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
        let latents = self
            .shared
            .denoise_with(&mut self.transformer, transformer, denoise)?;
        let cache_computed = cache.map(|c| c.computed().to_vec());

        // 5. Decode.
        let run = Denoised {
            start,
            latents,
            size: (width, height),
            timings,
            warnings,
            cache_computed,
        };
        self.shared
            .finish(&self.sources.vae, run, (opts.output, false), observer)
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
        let sources = &self.sources;
        let out = self.shared.encode_stage(
            &mut self.prompt_encoder,
            |s, report| components::load_prompt_encoder(sources, s.dtype, &s.device, report),
            observer,
            timings,
            |encoder| Ok(encoder.encode(prompts, &popts)?),
        )?;
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

    /// What sizes requests: a copy of the configuration the estimate needs,
    /// so that requests can be checked while the pipeline renders another
    /// (a server checks each request before queueing it).
    pub fn memory_check(&self) -> MemoryCheck {
        let settings = &self.shared.settings;
        MemoryCheck {
            sources: self.sources.clone(),
            dtype: settings.dtype,
            device: settings.device.clone(),
            keep_resident: settings.keep_resident,
            vae_tiling: settings.vae_tiling,
            transformer_config: self.transformer_config.clone(),
            vae_config: self.shared.vae_config.clone(),
            loaded: Loaded {
                text_encoder: self.prompt_encoder.is_some(),
                transformer: self.transformer.is_some(),
                vae: self.shared.vae_loaded(),
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
