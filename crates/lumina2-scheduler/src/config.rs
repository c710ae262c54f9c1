//! `scheduler_config.json`: diffusers' `FlowMatchEulerDiscreteScheduler` configuration.

use std::path::Path;

use serde::Deserialize;

use crate::error::{ensure_finite, Result, SchedulerError};

/// Largest `num_train_timesteps` accepted: every real flow-matching model
/// uses 1000, and the scheduler holds one sigma per training timestep.
pub const MAX_TRAIN_TIMESTEPS: usize = 1_000_000;

/// Largest number of inference steps a schedule may have (real runs use
/// 4 to 250; a schedule is a few vectors of this length).
pub const MAX_INFERENCE_STEPS: usize = 100_000;

/// Largest `base_image_seq_len` / `max_image_seq_len` accepted (real: 256 and
/// 4096; 2^24 tokens is a 65536x65536 image at 16 px per token).
pub const MAX_IMAGE_SEQ_LEN: usize = 1 << 24;

/// How `mu` shifts the sigmas when dynamic shifting is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeShiftType {
    /// `exp(mu) / (exp(mu) + (1 / t - 1))` (diffusers' default).
    #[default]
    Exponential,
    /// `mu / (mu + (1 / t - 1))`.
    Linear,
}

/// The configuration of [`crate::FlowMatchEulerDiscreteScheduler`], field for field
/// diffusers' (0.42.1), with diffusers' defaults for missing keys. Unknown keys
/// (`_class_name`, `_diffusers_version`, ...) are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// Number of training timesteps (default 1000); timesteps are `sigma * num_train_timesteps`.
    pub num_train_timesteps: usize,
    /// Static shift of the sigmas, `shift * s / (1 + (shift - 1) * s)` (default 1.0).
    pub shift: f64,
    /// Shift the sigmas by `mu` (given to `set_timesteps`) instead of `shift`.
    pub use_dynamic_shifting: bool,
    /// `mu` at `base_image_seq_len` (default 0.5), for [`crate::calculate_shift`].
    pub base_shift: Option<f64>,
    /// `mu` at `max_image_seq_len` (default 1.15), for [`crate::calculate_shift`].
    pub max_shift: Option<f64>,
    /// Image sequence length of `base_shift` (default 256).
    pub base_image_seq_len: usize,
    /// Image sequence length of `max_shift` (default 4096).
    pub max_image_seq_len: usize,
    /// Use `1 - sigma` (and a terminal sigma of 1), as Mochi does.
    pub invert_sigmas: bool,
    /// Stretch the shifted schedule so that it ends at this value (`None` or 0: off).
    pub shift_terminal: Option<f64>,
    /// Replace the sigmas by a Karras (rho = 7) schedule between their ends.
    pub use_karras_sigmas: bool,
    /// Replace the sigmas by a log-linear schedule between their ends.
    pub use_exponential_sigmas: bool,
    /// Replace the sigmas by a Beta(0.6, 0.6) quantile schedule between their ends.
    pub use_beta_sigmas: bool,
    /// The kind of dynamic shifting.
    pub time_shift_type: TimeShiftType,
    /// Stochastic sampling: each step re-noises the predicted clean sample with
    /// noise that the caller supplies.
    pub stochastic_sampling: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: false,
            base_shift: Some(0.5),
            max_shift: Some(1.15),
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
            invert_sigmas: false,
            shift_terminal: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            time_shift_type: TimeShiftType::Exponential,
            stochastic_sampling: false,
        }
    }
}

impl SchedulerConfig {
    /// Lumina-Image 2.0's `scheduler/scheduler_config.json`: shift 6, no dynamic shifting.
    pub fn lumina2() -> Self {
        Self {
            shift: 6.0,
            ..Self::default()
        }
    }

    /// Parses a `scheduler_config.json` text and validates it.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads `scheduler_config.json` from a file, or from a folder holding one.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = if path.is_dir() {
            path.join("scheduler_config.json")
        } else {
            path.to_path_buf()
        };
        let text = lumina2_weights::fs::read_to_string_bounded(
            &file,
            lumina2_weights::fs::MAX_CONFIG_BYTES,
        )
        .map_err(|source| SchedulerError::Io {
            path: file.display().to_string(),
            source,
        })?;
        Self::from_json_str(&text)
    }

    /// Checks the values diffusers rejects, and those that would only give NaNs.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(SchedulerError::InvalidConfig(m));
        if self.num_train_timesteps == 0 {
            return bad("`num_train_timesteps` must be at least 1".into());
        }
        // The training schedule is built whole (one sigma per timestep).
        if self.num_train_timesteps > MAX_TRAIN_TIMESTEPS {
            return bad(format!(
                "`num_train_timesteps` {} is over the limit of {MAX_TRAIN_TIMESTEPS}",
                self.num_train_timesteps
            ));
        }
        for (name, v) in [
            ("`base_image_seq_len`", self.base_image_seq_len),
            ("`max_image_seq_len`", self.max_image_seq_len),
        ] {
            if v > MAX_IMAGE_SEQ_LEN {
                return bad(format!(
                    "{name} {v} is over the limit of {MAX_IMAGE_SEQ_LEN}"
                ));
            }
        }
        ensure_finite("`shift`", self.shift)?;
        if self.shift <= 0.0 {
            return bad(format!("`shift` must be positive, got {}", self.shift));
        }
        for (name, v) in [
            ("`base_shift`", self.base_shift),
            ("`max_shift`", self.max_shift),
        ] {
            if let Some(v) = v {
                ensure_finite(name, v)?;
            }
        }
        if let Some(t) = self.shift_terminal {
            ensure_finite("`shift_terminal`", t)?;
            if t >= 1.0 {
                return bad(format!("`shift_terminal` must be below 1, got {t}"));
            }
        }
        let n = [
            self.use_karras_sigmas,
            self.use_exponential_sigmas,
            self.use_beta_sigmas,
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if n > 1 {
            return bad(
                "only one of `use_beta_sigmas`, `use_exponential_sigmas`, `use_karras_sigmas` can be used"
                    .into(),
            );
        }
        Ok(())
    }
}
