//! ODE solvers behind one interface, so that a pipeline drives any of them with
//! one loop whatever the number of model evaluations per step:
//!
//! ```no_run
//! # use lumina2_scheduler::{Solver, Result};
//! # use candle_core::Tensor;
//! # fn velocity(x: &Tensor, t: f32) -> Result<Tensor> { Ok(x.clone()) }
//! fn sample(mut solver: impl Solver) -> Result<Tensor> {
//!     while let Some(eval) = solver.pending() {
//!         // The model's velocity dx/dsigma at (eval.sample, eval.timestep).
//!         let v = velocity(eval.sample, eval.timestep)?;
//!         solver.submit(&v)?;
//!     }
//!     Ok(solver.sample().clone())
//! }
//! ```

use candle_core::{DType, Tensor};

use crate::error::{Result, SchedulerError};
use crate::flow_match::FlowMatchEulerDiscreteScheduler;

/// A point where the solver needs the model's velocity.
#[derive(Debug, Clone, Copy)]
pub struct Evaluation<'a> {
    /// The latent to evaluate the model on (in the dtype the caller gave).
    pub sample: &'a Tensor,
    /// diffusers' timestep, `sigma * num_train_timesteps` (Lumina's model time
    /// is `1 - timestep / num_train_timesteps`).
    pub timestep: f32,
    /// The noise level at this evaluation.
    pub sigma: f32,
    /// The step this evaluation belongs to (0-based).
    pub step: usize,
    /// Which evaluation of the step this is (0-based; 1 is a midpoint's second).
    pub stage: usize,
}

/// An ODE solver of the flow `dx/dsigma = v(x, sigma)` from the first sigma of a
/// schedule to the last, asking the caller for model evaluations one at a time.
pub trait Solver {
    /// The next evaluation the solver needs, or `None` once it has finished.
    fn pending(&self) -> Option<Evaluation<'_>>;
    /// Hands over the model's velocity `dx/dsigma` at the pending evaluation
    /// (same shape as the sample; Lumina2Pipeline's negated transformer output).
    fn submit(&mut self, velocity: &Tensor) -> Result<()>;
    /// The current sample (the result once [`Solver::pending`] is `None`).
    fn sample(&self) -> &Tensor;
    /// Number of steps of the schedule.
    fn num_steps(&self) -> usize;
    /// Model evaluations per step (the cost of a step).
    fn evaluations_per_step(&self) -> usize;
    /// Replaces the current sample between two steps (an inpainting pipeline
    /// puts the known region back after each step); an error while a step
    /// is half done.
    fn replace_sample(&mut self, sample: Tensor) -> Result<()>;
    /// The order of accuracy of the method.
    fn order(&self) -> usize;
}

/// Euler (first order, one evaluation per step): diffusers'
/// `FlowMatchEulerDiscreteScheduler.step` driven as Lumina2Pipeline drives it
/// (from the begin index, 0 unless an image-to-image run cut the schedule,
/// the schedule's timesteps in order).
#[derive(Debug, Clone)]
pub struct EulerSolver {
    scheduler: FlowMatchEulerDiscreteScheduler,
    sample: Tensor,
    /// The scheduler's begin index: the first step of the schedule that runs.
    begin: usize,
    /// Steps done since `begin`.
    step: usize,
}

impl EulerSolver {
    /// Starts at `sample` (the initial noise) with a scheduler whose
    /// `set_timesteps` was called. With `stochastic_sampling` use the
    /// scheduler's `step` directly: it needs noise at each step.
    pub fn new(scheduler: FlowMatchEulerDiscreteScheduler, sample: Tensor) -> Result<Self> {
        Self::starting_at(scheduler, sample, 0)
    }

    /// Starts at step `begin` of the schedule (diffusers' `set_begin_index`,
    /// as `get_timesteps` sets it for image-to-image): the steps before it are
    /// skipped, and [`Evaluation::step`] and [`Solver::num_steps`] count the
    /// steps that run.
    pub fn starting_at(
        mut scheduler: FlowMatchEulerDiscreteScheduler,
        sample: Tensor,
        begin: usize,
    ) -> Result<Self> {
        if scheduler.num_inference_steps().is_none() {
            return Err(SchedulerError::NotInitialized);
        }
        if scheduler.config().stochastic_sampling {
            return Err(SchedulerError::NoiseRequired);
        }
        check_begin(begin, scheduler.timesteps().len())?;
        scheduler.set_begin_index(begin);
        Ok(Self {
            scheduler,
            sample,
            begin,
            step: 0,
        })
    }

    /// The scheduler.
    pub fn scheduler(&self) -> &FlowMatchEulerDiscreteScheduler {
        &self.scheduler
    }
}

impl Solver for EulerSolver {
    fn pending(&self) -> Option<Evaluation<'_>> {
        let timestep = *self.scheduler.timesteps().get(self.begin + self.step)?;
        let sigma = *self.scheduler.sigmas().get(self.begin + self.step)?;
        Some(Evaluation {
            sample: &self.sample,
            timestep,
            sigma,
            step: self.step,
            stage: 0,
        })
    }

    fn submit(&mut self, velocity: &Tensor) -> Result<()> {
        let t = self
            .scheduler
            .timesteps()
            .get(self.begin + self.step)
            .copied()
            .ok_or(SchedulerError::SolverFinished)?;
        self.sample = self.scheduler.step(velocity, t, &self.sample, None)?;
        self.step += 1;
        Ok(())
    }

    fn sample(&self) -> &Tensor {
        &self.sample
    }

    fn num_steps(&self) -> usize {
        self.scheduler.timesteps().len() - self.begin
    }

    fn evaluations_per_step(&self) -> usize {
        1
    }

    fn replace_sample(&mut self, sample: Tensor) -> Result<()> {
        same_dims(&sample, &self.sample)?;
        self.sample = sample;
        Ok(())
    }

    fn order(&self) -> usize {
        1
    }
}

/// The explicit midpoint method (second order, two evaluations per step), the
/// fixed-grid `midpoint` of torchdiffeq that the original Lumina-Image 2.0
/// sampler uses: from sigma `s` to `s'` with `h = s' - s`,
/// `x_mid = x + h/2 v(x, s)`, then `x' = x + h v(x_mid, s + h/2)`.
///
/// Arithmetic runs in f32 (f64 for f64 samples); each evaluation's sample and
/// each step's result are cast to the dtype of the velocity, as the Euler step does.
#[derive(Debug, Clone)]
pub struct MidpointSolver {
    sigmas: Vec<f32>,
    num_train_timesteps: f32,
    /// The sample at the start of the current step.
    sample: Tensor,
    /// The midpoint sample while the second evaluation is pending.
    midpoint: Option<Tensor>,
    step: usize,
}

impl MidpointSolver {
    /// Integrates from `sigmas[0]` through each sigma to the last, starting at `sample`.
    /// `sigmas` must hold at least two finite values.
    pub fn new(sigmas: Vec<f32>, num_train_timesteps: usize, sample: Tensor) -> Result<Self> {
        if sigmas.len() < 2 {
            return Err(SchedulerError::InvalidTimesteps(
                "the midpoint solver needs at least two sigmas".into(),
            ));
        }
        for s in &sigmas {
            crate::error::ensure_finite("sigma", *s as f64)?;
        }
        if num_train_timesteps == 0 {
            return Err(SchedulerError::InvalidConfig(
                "`num_train_timesteps` must be at least 1".into(),
            ));
        }
        Ok(Self {
            sigmas,
            num_train_timesteps: num_train_timesteps as f32,
            sample,
            midpoint: None,
            step: 0,
        })
    }

    /// Uses the schedule of a scheduler whose `set_timesteps` was called (its
    /// sigmas, terminal one included).
    pub fn from_scheduler(
        scheduler: &FlowMatchEulerDiscreteScheduler,
        sample: Tensor,
    ) -> Result<Self> {
        Self::from_scheduler_at(scheduler, sample, 0)
    }

    /// The same from step `begin` of the schedule on (the sigmas before it skipped).
    pub fn from_scheduler_at(
        scheduler: &FlowMatchEulerDiscreteScheduler,
        sample: Tensor,
        begin: usize,
    ) -> Result<Self> {
        if scheduler.num_inference_steps().is_none() {
            return Err(SchedulerError::NotInitialized);
        }
        check_begin(begin, scheduler.timesteps().len())?;
        Self::new(
            scheduler.sigmas()[begin..].to_vec(),
            scheduler.config().num_train_timesteps,
            sample,
        )
    }

    fn interval(&self) -> Option<(f32, f32)> {
        Some((
            *self.sigmas.get(self.step)?,
            *self.sigmas.get(self.step + 1)?,
        ))
    }
}

fn compute_dtype(d: DType) -> DType {
    if d == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

impl Solver for MidpointSolver {
    fn pending(&self) -> Option<Evaluation<'_>> {
        let (s, s_next) = self.interval()?;
        let (sample, sigma, stage) = match &self.midpoint {
            None => (&self.sample, s, 0),
            Some(mid) => (mid, s + (s_next - s) * 0.5, 1),
        };
        Some(Evaluation {
            sample,
            timestep: sigma * self.num_train_timesteps,
            sigma,
            step: self.step,
            stage,
        })
    }

    fn submit(&mut self, velocity: &Tensor) -> Result<()> {
        let (s, s_next) = self.interval().ok_or(SchedulerError::SolverFinished)?;
        if velocity.dims() != self.sample.dims() {
            return Err(SchedulerError::ShapeMismatch {
                what: "velocity and sample".into(),
                left: velocity.dims().to_vec(),
                right: self.sample.dims().to_vec(),
            });
        }
        let out = velocity.dtype();
        let cd = compute_dtype(out);
        let h = (s_next - s) as f64;
        let x = self.sample.to_dtype(cd)?;
        let v = velocity.to_dtype(cd)?;
        match self.midpoint.take() {
            None => {
                let mid = (x + v.affine(0.5 * h, 0.0)?)?;
                self.midpoint = Some(mid.to_dtype(out)?);
            }
            Some(_) => {
                self.sample = (x + v.affine(h, 0.0)?)?.to_dtype(out)?;
                self.step += 1;
            }
        }
        Ok(())
    }

    fn sample(&self) -> &Tensor {
        &self.sample
    }

    fn num_steps(&self) -> usize {
        self.sigmas.len() - 1
    }

    fn evaluations_per_step(&self) -> usize {
        2
    }

    fn replace_sample(&mut self, sample: Tensor) -> Result<()> {
        if self.midpoint.is_some() {
            return Err(SchedulerError::InvalidTimesteps(
                "the sample cannot be replaced in the middle of a midpoint step".into(),
            ));
        }
        same_dims(&sample, &self.sample)?;
        self.sample = sample;
        Ok(())
    }

    fn order(&self) -> usize {
        2
    }
}

/// Which solver a pipeline should build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SolverKind {
    /// [`EulerSolver`]: diffusers' scheduler step, 1 model call per step.
    #[default]
    Euler,
    /// [`MidpointSolver`]: 2 model calls per step, second order.
    Midpoint,
}

impl SolverKind {
    /// Builds the solver over the schedule of `scheduler` (after `set_timesteps`).
    pub fn build(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        sample: Tensor,
    ) -> Result<Box<dyn Solver>> {
        self.build_at(scheduler, sample, 0)
    }

    /// The same, starting at step `begin` of the schedule (image-to-image).
    pub fn build_at(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        sample: Tensor,
        begin: usize,
    ) -> Result<Box<dyn Solver>> {
        Ok(match self {
            SolverKind::Euler => Box::new(EulerSolver::starting_at(scheduler, sample, begin)?),
            SolverKind::Midpoint => Box::new(MidpointSolver::from_scheduler_at(
                &scheduler, sample, begin,
            )?),
        })
    }
}

/// A begin index must leave at least one step of the schedule.
fn check_begin(begin: usize, steps: usize) -> Result<()> {
    if begin >= steps {
        return Err(SchedulerError::InvalidTimesteps(format!(
            "begin index {begin} leaves no step of a {steps}-step schedule"
        )));
    }
    Ok(())
}

fn same_dims(new: &Tensor, old: &Tensor) -> Result<()> {
    if new.dims() != old.dims() {
        return Err(SchedulerError::ShapeMismatch {
            what: "replacement sample and sample".into(),
            left: new.dims().to_vec(),
            right: old.dims().to_vec(),
        });
    }
    Ok(())
}
