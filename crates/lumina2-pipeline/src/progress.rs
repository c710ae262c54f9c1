//! What a run reports while it works, and what it measured.

use std::time::Duration;

use candle_core::Tensor;

/// The stages of a generation, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Loading the tokenizer and the text encoder.
    LoadTextEncoder,
    /// Encoding the prompts.
    Encode,
    /// Encoding the init image of an image-to-image run (the VAE is loaded first).
    EncodeImage,
    /// Loading the transformer (and applying LoRAs).
    LoadTransformer,
    /// The denoising loop.
    Denoise,
    /// Loading the VAE.
    LoadVae,
    /// Decoding the latents.
    Decode,
}

impl Stage {
    /// A short lower-case name (`"encode"`, `"denoise"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Stage::LoadTextEncoder => "load text encoder",
            Stage::Encode => "encode",
            Stage::EncodeImage => "encode image",
            Stage::LoadTransformer => "load transformer",
            Stage::Denoise => "denoise",
            Stage::LoadVae => "load vae",
            Stage::Decode => "decode",
        }
    }
}

/// One finished denoising step.
#[derive(Debug, Clone, Copy)]
pub struct StepInfo<'a> {
    /// Steps done so far (1-based).
    pub step: usize,
    /// Steps planned.
    pub num_steps: usize,
    /// diffusers' timestep of the step (`sigma * 1000`).
    pub timestep: f32,
    /// The noise level the step started from.
    pub sigma: f32,
    /// Whether guidance ran at this step.
    pub guidance: bool,
    /// Transformer calls made by this step.
    pub model_calls: usize,
    /// Time the step took.
    pub elapsed: Duration,
    /// The latents after the step.
    pub latents: &'a Tensor,
    /// On the steps `GenerateOptions::preview_every` asks for: the
    /// prediction of the clean latents at the step's first evaluation,
    /// `x0 = latents - sigma * velocity` ([`crate::preview`]).
    pub denoised: Option<&'a Tensor>,
}

/// What a run tells its observer.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// A stage starts.
    StageStarted(Stage),
    /// A stage ended after the given time.
    StageFinished(Stage, Duration),
    /// A denoising step ended.
    Step(StepInfo<'a>),
}

/// The observer's answer after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Control {
    /// Go on.
    #[default]
    Continue,
    /// Stop the run: it returns [`crate::Error::Stopped`] and no output.
    Stop,
}

/// How long each stage took.
#[derive(Debug, Clone, Default)]
pub struct StageTimings {
    /// Each stage that ran, in order, with its time.
    pub stages: Vec<(Stage, Duration)>,
    /// Each denoising step's time.
    pub steps: Vec<Duration>,
}

impl StageTimings {
    /// The time of a stage (zero when it did not run, e.g. a resident model's load).
    pub fn get(&self, stage: Stage) -> Duration {
        self.stages
            .iter()
            .filter(|(s, _)| *s == stage)
            .map(|(_, d)| *d)
            .sum()
    }

    /// The sum of all stages.
    pub fn total(&self) -> Duration {
        self.stages.iter().map(|(_, d)| *d).sum()
    }
}

/// Runs `run` as `stage`: the observer is told when it starts and when it
/// finishes, and its time is recorded in `timings` (not when it fails).
pub(crate) fn timed_stage<T>(
    stage: Stage,
    observer: &mut crate::pipeline::Observer<'_>,
    timings: &mut StageTimings,
    run: impl FnOnce() -> crate::error::Result<T>,
) -> crate::error::Result<T> {
    let start = std::time::Instant::now();
    observer(Event::StageStarted(stage));
    let out = run()?;
    let d = start.elapsed();
    timings.stages.push((stage, d));
    observer(Event::StageFinished(stage, d));
    Ok(out)
}
