//! The parts of a run that Lumina2 and Z-Image do the same way.
//!
//! The two pipelines differ in their text encoders, transformers, schedules
//! and denoising loops. Around those they load each component when its stage
//! needs it (a timed load stage), give it back to the pipeline only with
//! `keep_resident` (even when the stage failed), encode and decode as timed
//! stages, decode with the same VAE and report each step to the observer
//! alike. Those parts live here once, so that each pipeline states only what
//! differs.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use lumina2_scheduler::{FlowMatchEulerDiscreteScheduler, SchedulerConfig};
use lumina2_text_encoder::PromptEmbeddings;
use lumina2_vae::{AutoencoderKL, AutoencoderKLConfig};

use crate::components::{self, LoadReport};
use crate::error::{Error, Result};
use crate::img2img::{self, ImageToImage, Start, StartSpec};
use crate::options::{Noise, OutputKind};
use crate::pipeline::{Generation, Observer};
use crate::progress::{timed_stage, Control, Event, Stage, StageTimings, StepInfo};
use crate::settings::BuildSettings;

/// What both pipelines hold besides their sources, configurations, text
/// encoder and transformer: the settings, the VAE (the same `AutoencoderKL`
/// in both) and what loading reported.
pub(crate) struct Shared {
    pub settings: BuildSettings,
    pub vae_config: AutoencoderKLConfig,
    pub scheduler_config: SchedulerConfig,
    /// The VAE while it is loaded.
    vae: Option<AutoencoderKL>,
    /// Warnings of the components loaded during the current run, and
    /// their weights not read at load.
    pub load_report: LoadReport,
}

/// A family's transformer loader: its sources and configuration, then
/// `(dtype, int8)`, the device and the load report.
pub(crate) type LoadTransformer<S, C, T> =
    fn(&S, &C, (DType, bool), &Device, &mut LoadReport) -> Result<T>;

/// What a text encoder stage produced: the embeddings and their masks where
/// there are masks, for [`LoadReport::check_encoder_output`].
pub(crate) trait EncoderOutput {
    fn embeds(&self) -> Vec<(&Tensor, Option<&Tensor>)>;
}

impl EncoderOutput for PromptEmbeddings {
    fn embeds(&self) -> Vec<(&Tensor, Option<&Tensor>)> {
        let mut produced = vec![(&self.prompt_embeds, Some(&self.prompt_attention_mask))];
        if let (Some(e), Some(m)) = (
            &self.negative_prompt_embeds,
            &self.negative_prompt_attention_mask,
        ) {
            produced.push((e, Some(m)));
        }
        produced
    }
}

/// Z-Image's per-prompt embeddings and negatives (no masks: each holds only
/// its prompt's rows).
impl EncoderOutput for (Vec<Tensor>, Vec<Tensor>) {
    fn embeds(&self) -> Vec<(&Tensor, Option<&Tensor>)> {
        self.0.iter().chain(&self.1).map(|e| (e, None)).collect()
    }
}

/// What a run holds when its denoising has ended.
pub(crate) struct Denoised {
    pub start: Start,
    pub latents: Tensor,
    /// Width and height in pixels.
    pub size: (usize, usize),
    pub timings: StageTimings,
    pub warnings: Vec<String>,
    pub cache_computed: Option<Vec<bool>>,
}

impl Shared {
    pub fn new(
        settings: BuildSettings,
        vae_config: AutoencoderKLConfig,
        scheduler_config: SchedulerConfig,
    ) -> Self {
        Self {
            settings,
            vae_config,
            scheduler_config,
            vae: None,
            load_report: LoadReport::default(),
        }
    }

    /// Whether the VAE is loaded now.
    pub fn vae_loaded(&self) -> bool {
        self.vae.is_some()
    }

    /// The `Debug` of a pipeline: its sources and the settings that matter.
    pub fn fmt_pipeline(
        &self,
        f: &mut std::fmt::Formatter<'_>,
        name: &str,
        sources: &dyn std::fmt::Debug,
    ) -> std::fmt::Result {
        f.debug_struct(name)
            .field("sources", sources)
            .field("dtype", &self.settings.dtype)
            .field("keep_resident", &self.settings.keep_resident)
            .finish_non_exhaustive()
    }

    /// Takes a component from `slot`, or loads it as the timed stage `stage`
    /// (`load` gets the settings and the load report).
    pub fn take_or_load<T>(
        &mut self,
        slot: &mut Option<T>,
        stage: Stage,
        observer: &mut Observer<'_>,
        timings: &mut StageTimings,
        load: impl FnOnce(&BuildSettings, &mut LoadReport) -> Result<T>,
    ) -> Result<T> {
        let (settings, report) = (&self.settings, &mut self.load_report);
        take_or_load(slot, stage, observer, timings, || load(settings, report))
    }

    /// The transformer from `slot`, or loaded (stage
    /// [`Stage::LoadTransformer`]) in the compute dtype, int8 where asked.
    pub fn take_transformer<S, C, T>(
        &mut self,
        slot: &mut Option<T>,
        (load, sources, config): (LoadTransformer<S, C, T>, &S, &C),
        observer: &mut Observer<'_>,
        timings: &mut StageTimings,
    ) -> Result<T> {
        self.take_or_load(slot, Stage::LoadTransformer, observer, timings, |s, r| {
            load(sources, config, (s.dtype, s.int8_transformer), &s.device, r)
        })
    }

    /// Runs the denoising on `transformer`, then gives it back to `slot`
    /// where resident, even when the run failed or stopped. A non-finite
    /// result names the transformer's broken weights while it is still
    /// loaded.
    pub fn denoise_with<T, R>(
        &self,
        slot: &mut Option<T>,
        transformer: T,
        run: impl FnOnce(&T) -> Result<R>,
    ) -> Result<R> {
        let result = run(&transformer).map_err(|e| self.load_report.name_broken(e));
        give_back(slot, transformer, self.settings.keep_resident);
        result
    }

    /// The encode stage: the text encoder from `slot` or loaded (stage
    /// [`Stage::LoadTextEncoder`] through `load`), `run` on it as the timed
    /// stage [`Stage::Encode`], the encoder given back where resident, and
    /// the embeddings checked for non-finite values (naming the encoder's
    /// broken weights).
    pub fn encode_stage<E, R: EncoderOutput>(
        &mut self,
        slot: &mut Option<E>,
        load: impl FnOnce(&BuildSettings, &mut LoadReport) -> Result<E>,
        observer: &mut Observer<'_>,
        timings: &mut StageTimings,
        run: impl FnOnce(&E) -> Result<R>,
    ) -> Result<R> {
        let encoder = self.take_or_load(slot, Stage::LoadTextEncoder, observer, timings, load)?;
        let keep = self.settings.keep_resident;
        let report = &mut self.load_report;
        timed_stage(Stage::Encode, observer, timings, || {
            let result = run(&encoder);
            give_back(slot, encoder, keep);
            let out = result?;
            report.check_encoder_output(&out.embeds())?;
            Ok(out)
        })
    }

    /// The VAE, loaded (stage [`Stage::LoadVae`]) where not resident.
    fn take_vae(
        &mut self,
        vae_path: &Path,
        observer: &mut Observer<'_>,
        timings: &mut StageTimings,
    ) -> Result<AutoencoderKL> {
        let (settings, report, config) = (&self.settings, &mut self.load_report, &self.vae_config);
        take_or_load(&mut self.vae, Stage::LoadVae, observer, timings, || {
            components::load_vae(
                vae_path,
                config,
                (settings.dtype, settings.vae_tiling),
                &settings.device,
                report,
            )
        })
    }

    /// The start of an image-to-image run (see [`img2img::image_start`])
    /// with latents of `shape`, the image resized to `size`.
    #[allow(clippy::too_many_arguments)]
    pub fn image_start(
        &mut self,
        vae_path: &Path,
        i2i: &ImageToImage,
        noise: &Noise,
        (shape, size): ((usize, usize, usize, usize), (usize, usize)),
        scheduler: &FlowMatchEulerDiscreteScheduler,
        observer: &mut Observer<'_>,
        timings: &mut StageTimings,
    ) -> Result<Start> {
        let vae = self.take_vae(vae_path, observer, timings)?;
        let spec = StartSpec {
            noise,
            shape,
            size,
            dtype: self.settings.dtype,
            device: &self.settings.device,
        };
        let start = img2img::image_start(&vae, i2i, &spec, scheduler, observer, timings);
        give_back(&mut self.vae, vae, self.settings.keep_resident);
        start
    }

    /// The end of a run: the latents decoded (stage [`Stage::Decode`]) where
    /// images are asked for, first cast to the compute dtype with
    /// `cast_latents` (Z-Image's `latents.to(vae.dtype)`), then what loading
    /// reported added to the warnings.
    pub fn finish(
        &mut self,
        vae_path: &Path,
        run: Denoised,
        (output, cast_latents): (OutputKind, bool),
        observer: &mut Observer<'_>,
    ) -> Result<Generation> {
        let Denoised {
            start,
            latents,
            size,
            mut timings,
            mut warnings,
            cache_computed,
        } = run;
        let images = match output {
            OutputKind::Latents => None,
            OutputKind::Images => {
                let vae = self.take_vae(vae_path, observer, &mut timings)?;
                let dtype = cast_latents.then_some(self.settings.dtype);
                let result = timed_stage(Stage::Decode, observer, &mut timings, || match dtype {
                    Some(dtype) => decode_latents(&vae, &latents.to_dtype(dtype)?),
                    None => decode_latents(&vae, &latents),
                });
                give_back(&mut self.vae, vae, self.settings.keep_resident);
                Some(result?)
            }
        };
        warnings.append(&mut self.load_report.warnings);
        Ok(Generation {
            images,
            latents,
            initial_latents: start.noise,
            noised_latents: start.image_latents.as_ref().map(|_| start.latents.clone()),
            image_latents: start.image_latents,
            size,
            timings,
            warnings,
            cache_computed,
        })
    }
}

/// Takes a component from `slot`, or loads it as the timed stage `stage`.
fn take_or_load<T>(
    slot: &mut Option<T>,
    stage: Stage,
    observer: &mut Observer<'_>,
    timings: &mut StageTimings,
    load: impl FnOnce() -> Result<T>,
) -> Result<T> {
    match slot.take() {
        Some(component) => Ok(component),
        None => timed_stage(stage, observer, timings, load),
    }
}

/// Gives a component back to its pipeline where components stay resident;
/// otherwise it is released here.
fn give_back<T>(slot: &mut Option<T>, component: T, keep_resident: bool) {
    if keep_resident {
        *slot = Some(component);
    }
}

/// The end of a denoising step, as both pipelines report it: non-finite
/// latents fail the run (before the observer sees them), then the step's
/// time since `step_start` is recorded and given to the observer (`info`'s
/// `elapsed` is replaced), and the run stops where the observer asks.
pub(crate) fn end_step(
    mut info: StepInfo<'_>,
    step_start: Instant,
    observer: &mut Observer<'_>,
    timings: &mut StageTimings,
) -> Result<()> {
    let (step, steps) = (info.step, info.num_steps);
    let bad = count_non_finite(info.latents)?;
    if bad > 0 {
        return Err(Error::NonFinite {
            step,
            steps,
            count: bad,
            weights: Vec::new(),
        });
    }
    info.elapsed = step_start.elapsed();
    timings.steps.push(info.elapsed);
    if observer(Event::Step(info)) == Control::Stop {
        return Err(Error::Stopped { step, steps });
    }
    Ok(())
}

/// Latents to `[B, H, W, 3]` images in `[0, 1]`: `latents / scaling_factor
/// + shift_factor`, decoded, denormalised (diffusers' `output_type="np"`).
pub(crate) fn decode_latents(vae: &AutoencoderKL, latents: &Tensor) -> Result<Tensor> {
    let z = vae.unscale_latents(latents)?;
    let decoded = vae.decode(&z)?;
    Ok(lumina2_vae::image::denormalize(&decoded)?)
}

/// How many values of `t` are NaN or infinite.
pub(crate) fn count_non_finite(t: &Tensor) -> Result<usize> {
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(v.iter().filter(|x| !x.is_finite()).count())
}

/// The accessors both pipelines have over their [`Shared`] part (a field
/// `shared`) and their transformer configuration `$config`.
macro_rules! shared_accessors {
    ($config:ty) => {
        /// The transformer's configuration.
        pub fn transformer_config(&self) -> &$config {
            &self.transformer_config
        }

        /// The VAE's configuration.
        pub fn vae_config(&self) -> &lumina2_vae::AutoencoderKLConfig {
            &self.shared.vae_config
        }

        /// The scheduler's configuration.
        pub fn scheduler_config(&self) -> &lumina2_scheduler::SchedulerConfig {
            &self.shared.scheduler_config
        }

        /// The compute dtype.
        pub fn dtype(&self) -> candle_core::DType {
            self.shared.settings.dtype
        }
    };
}
pub(crate) use shared_accessors;
