//! The crate's error type.

use candle_core::DType;

/// Everything that can go wrong when configuring or running a scheduler or solver.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// A configuration value is out of its valid range.
    #[error("invalid scheduler configuration: {0}")]
    InvalidConfig(String),
    /// `scheduler_config.json` could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file that could not be read.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `scheduler_config.json` is not valid JSON for this scheduler.
    #[error("parsing scheduler config: {0}")]
    Json(#[from] serde_json::Error),
    /// The arguments of `set_timesteps` are inconsistent.
    #[error("invalid set_timesteps arguments: {0}")]
    InvalidTimesteps(String),
    /// Dynamic shifting is configured but no `mu` was given.
    #[error("`mu` must be passed when `use_dynamic_shifting` is true")]
    MuRequired,
    /// A value that must be finite is NaN or infinite.
    #[error("{what} is not finite ({value})")]
    NonFinite {
        /// What the value is.
        what: String,
        /// The offending value.
        value: f64,
    },
    /// `step` (or a solver) was used before `set_timesteps`.
    #[error("`set_timesteps` must be called before stepping")]
    NotInitialized,
    /// The timestep given to `step`/`scale_noise` is not in the schedule.
    #[error("timestep {0} is not in the schedule")]
    TimestepNotFound(f32),
    /// `step` was called more times than the schedule has steps.
    #[error("step index {index} is past the end of a schedule of {steps} steps")]
    StepOutOfRange {
        /// The step index that was requested.
        index: usize,
        /// The number of steps of the schedule.
        steps: usize,
    },
    /// Two tensors that must have the same shape do not.
    #[error("shape mismatch: {what}: {left:?} vs {right:?}")]
    ShapeMismatch {
        /// Which tensors.
        what: String,
        /// The first shape.
        left: Vec<usize>,
        /// The second shape.
        right: Vec<usize>,
    },
    /// Two tensors that must have the same dtype do not.
    #[error("dtype mismatch: {what}: {left:?} vs {right:?}")]
    DTypeMismatch {
        /// Which tensors.
        what: String,
        /// The first dtype.
        left: DType,
        /// The second dtype.
        right: DType,
    },
    /// Stochastic sampling is configured but no noise was supplied to `step`
    /// (this crate never draws noise on its own).
    #[error("`stochastic_sampling` is on: `step` needs the caller's noise")]
    NoiseRequired,
    /// Noise was supplied to a deterministic `step`, where it would be ignored.
    #[error("noise was passed to `step` but `stochastic_sampling` is off")]
    UnexpectedNoise,
    /// A solver was given a model output when it was not waiting for one.
    #[error("the solver has finished: no model evaluation is pending")]
    SolverFinished,
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, SchedulerError>;

/// Fails with [`SchedulerError::NonFinite`] when `value` is NaN or infinite.
pub(crate) fn ensure_finite(what: &str, value: f64) -> Result<()> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(SchedulerError::NonFinite {
            what: what.to_string(),
            value,
        })
    }
}
