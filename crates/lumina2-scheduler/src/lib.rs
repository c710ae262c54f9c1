//! Flow-matching schedules and ODE solvers for Lumina-Image 2.0 on candle.
//!
//! - [`FlowMatchEulerDiscreteScheduler`]: diffusers' scheduler of the same name
//!   (0.42.1), configured from `scheduler_config.json` ([`SchedulerConfig`]), with
//!   every sigma schedule it offers (static or dynamic shifting, `shift_terminal`,
//!   Karras, exponential, beta, inverted sigmas), custom sigmas or timesteps, the
//!   Euler `step` (deterministic or stochastic with caller-supplied noise) and
//!   `scale_noise`. Schedule arithmetic mirrors diffusers' float32/float64 casts,
//!   so sigmas and timesteps match bit for bit.
//! - [`Solver`]: one interface for solvers that need one or more model
//!   evaluations per step; [`EulerSolver`] (diffusers' step) and
//!   [`MidpointSolver`] (the original Lumina-Image 2.0 sampler's method).
//! - Lumina2Pipeline's schedule: [`lumina2_sigmas`], [`calculate_shift`],
//!   [`FlowMatchEulerDiscreteScheduler::set_timesteps_lumina2`].
#![warn(missing_docs)]
// Library code returns errors on bad input; it never unwraps (tests may).
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod beta;
mod config;
mod error;
mod flow_match;
pub mod numpy;
mod solver;

pub use config::{
    SchedulerConfig, TimeShiftType, MAX_IMAGE_SEQ_LEN, MAX_INFERENCE_STEPS, MAX_TRAIN_TIMESTEPS,
};
pub use error::{Result, SchedulerError};
pub use flow_match::{FlowMatchEulerDiscreteScheduler, TimestepRequest};
pub use solver::{EulerSolver, Evaluation, MidpointSolver, Solver, SolverKind};

/// The sigmas Lumina2Pipeline passes to the scheduler when none are given:
/// `np.linspace(1.0, 1 / N, N)` (float64, NumPy's arithmetic).
pub fn lumina2_sigmas(num_inference_steps: usize) -> Vec<f64> {
    if num_inference_steps == 0 {
        return Vec::new();
    }
    numpy::linspace(1.0, 1.0 / num_inference_steps as f64, num_inference_steps)
}

/// diffusers' `calculate_shift` (Flux, Lumina2): `mu` linear in the image
/// sequence length, `base_shift` at `base_seq_len` and `max_shift` at `max_seq_len`.
pub fn calculate_shift(
    image_seq_len: usize,
    base_seq_len: usize,
    max_seq_len: usize,
    base_shift: f64,
    max_shift: f64,
) -> Result<f64> {
    if max_seq_len == base_seq_len {
        return Err(SchedulerError::InvalidConfig(
            "`max_image_seq_len` must differ from `base_image_seq_len`".into(),
        ));
    }
    // Python ints subtract exactly, then divide as floats.
    let m = (max_shift - base_shift) / (max_seq_len as f64 - base_seq_len as f64);
    let b = base_shift - m * base_seq_len as f64;
    Ok(image_seq_len as f64 * m + b)
}
