//! diffusers' `FlowMatchEulerDiscreteScheduler` (0.42.1), quirks included.

use std::ops::{Add, Div, Mul, Sub};

use candle_core::{DType, Tensor};

use crate::beta::beta_ppf;
use crate::config::{SchedulerConfig, TimeShiftType};
use crate::error::{ensure_finite, Result, SchedulerError};
use crate::numpy::linspace;

/// The float types diffusers' NumPy schedule math runs in: float32 once sigmas or
/// timesteps were given as lists (`astype(np.float32)`), float64 otherwise.
trait Real:
    Copy + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self> + Div<Output = Self>
{
    /// A Python float meeting a NumPy array of this type (NEP 50: cast to it).
    fn of(v: f64) -> Self;
}

impl Real for f32 {
    fn of(v: f64) -> Self {
        v as f32
    }
}

impl Real for f64 {
    fn of(v: f64) -> Self {
        v
    }
}

/// Schedule values in the precision NumPy holds them in.
enum Values {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl Values {
    fn map<F32F: Fn(&[f32]) -> Vec<f32>, F64F: Fn(&[f64]) -> Vec<f64>>(
        self,
        f32f: F32F,
        f64f: F64F,
    ) -> Self {
        match self {
            Values::F32(v) => Values::F32(f32f(&v)),
            Values::F64(v) => Values::F64(f64f(&v)),
        }
    }

    /// (first, last) as Python floats (`.item()`).
    fn ends(&self) -> Option<(f64, f64)> {
        match self {
            Values::F32(v) => Some((*v.first()? as f64, *v.last()? as f64)),
            Values::F64(v) => Some((*v.first()?, *v.last()?)),
        }
    }

    /// `torch.from_numpy(v).to(torch.float32)`.
    fn into_f32(self) -> Vec<f32> {
        match self {
            Values::F32(v) => v,
            Values::F64(v) => v.into_iter().map(|x| x as f32).collect(),
        }
    }
}

fn static_shift<T: Real>(s: &[T], shift: f64) -> Vec<T> {
    s.iter()
        .map(|&s| T::of(shift) * s / (T::of(1.0) + T::of(shift - 1.0) * s))
        .collect()
}

fn time_shift<T: Real>(s: &[T], kind: TimeShiftType, mu: f64) -> Vec<T> {
    // `(1 / t - 1) ** sigma` with sigma = 1.0 is exact, so the power is left out.
    let m = match kind {
        TimeShiftType::Exponential => T::of(mu.exp()),
        TimeShiftType::Linear => T::of(mu),
    };
    s.iter()
        .map(|&t| m / (m + (T::of(1.0) / t - T::of(1.0))))
        .collect()
}

fn stretch_to_terminal<T: Real>(s: &[T], shift_terminal: f64) -> Vec<T> {
    let one_minus: Vec<T> = s.iter().map(|&t| T::of(1.0) - t).collect();
    let Some(&last) = one_minus.last() else {
        return Vec::new();
    };
    let scale = last / T::of(1.0 - shift_terminal);
    one_minus.iter().map(|&z| T::of(1.0) - z / scale).collect()
}

fn karras(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

fn exponential(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    linspace(sigma_max.ln(), sigma_min.ln(), n)
        .into_iter()
        .map(f64::exp)
        .collect()
}

fn beta(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let (alpha, beta) = (0.6, 0.6);
    linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| sigma_min + beta_ppf(1.0 - r, alpha, beta) * (sigma_max - sigma_min))
        .collect()
}

/// What `set_timesteps` is given: a step count, custom sigmas, custom timesteps
/// (any consistent combination) and `mu` for dynamic shifting. Sigmas and
/// timesteps are Python floats (f64), cast to f32 as diffusers does.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TimestepRequest {
    /// Number of inference steps (may be left out when sigmas or timesteps are given).
    pub num_inference_steps: Option<usize>,
    /// Custom sigmas, one per step, without the terminal one.
    pub sigmas: Option<Vec<f64>>,
    /// Custom timesteps, one per step, used as given.
    pub timesteps: Option<Vec<f64>>,
    /// The dynamic-shifting parameter (required with `use_dynamic_shifting`).
    pub mu: Option<f64>,
}

impl TimestepRequest {
    /// `set_timesteps(num_inference_steps)`.
    pub fn steps(num_inference_steps: usize) -> Self {
        Self {
            num_inference_steps: Some(num_inference_steps),
            ..Self::default()
        }
    }

    /// `set_timesteps(sigmas=sigmas)`.
    pub fn sigmas(sigmas: Vec<f64>) -> Self {
        Self {
            sigmas: Some(sigmas),
            ..Self::default()
        }
    }

    /// `set_timesteps(timesteps=timesteps)`.
    pub fn timesteps(timesteps: Vec<f64>) -> Self {
        Self {
            timesteps: Some(timesteps),
            ..Self::default()
        }
    }

    /// Adds `mu`.
    pub fn with_mu(mut self, mu: f64) -> Self {
        self.mu = Some(mu);
        self
    }
}

/// diffusers' `FlowMatchEulerDiscreteScheduler`: the sigma schedule (bit-exact
/// with diffusers' float32/float64 arithmetic) and the Euler step on candle tensors.
///
/// The model output it steps with is the flow velocity `dx/dsigma`, with
/// `x = (1 - sigma) x0 + sigma noise`; Lumina2Pipeline passes the negated
/// transformer output.
#[derive(Debug, Clone)]
pub struct FlowMatchEulerDiscreteScheduler {
    config: SchedulerConfig,
    shift: f64,
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    sigma_min: f64,
    sigma_max: f64,
    num_inference_steps: Option<usize>,
    step_index: Option<usize>,
    begin_index: Option<usize>,
}

impl FlowMatchEulerDiscreteScheduler {
    /// diffusers' `__init__`: validates `config` and builds the training schedule
    /// (`num_train_timesteps` sigmas, statically shifted unless dynamic shifting is on).
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        config.validate()?;
        let n = config.num_train_timesteps;
        let nf = n as f32;
        // np.linspace(1, n, n, dtype=float32)[::-1] / n, in torch float32.
        let train: Vec<f32> = linspace(1.0, n as f64, n)
            .into_iter()
            .rev()
            .map(|t| t as f32 / nf)
            .collect();
        let sigmas = if config.use_dynamic_shifting {
            train
        } else {
            static_shift(&train, config.shift)
        };
        let timesteps = sigmas.iter().map(|s| s * nf).collect();
        let (sigma_max, sigma_min) = match (sigmas.first(), sigmas.last()) {
            (Some(&a), Some(&b)) => (a as f64, b as f64),
            _ => {
                return Err(SchedulerError::InvalidConfig(
                    "`num_train_timesteps` must be at least 1".into(),
                ))
            }
        };
        Ok(Self {
            shift: config.shift,
            config,
            timesteps,
            sigmas,
            sigma_min,
            sigma_max,
            num_inference_steps: None,
            step_index: None,
            begin_index: None,
        })
    }

    /// Reads `scheduler_config.json` (a file, or a folder holding one) and builds the scheduler.
    pub fn from_config_file(path: impl AsRef<std::path::Path>) -> Result<Self> {
        Self::new(SchedulerConfig::from_file(path)?)
    }

    /// The configuration.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The static shift in use (the config's, unless [`Self::set_shift`] changed it).
    pub fn shift(&self) -> f64 {
        self.shift
    }

    /// Changes the static shift for the next `set_timesteps` (diffusers' `set_shift`).
    pub fn set_shift(&mut self, shift: f64) -> Result<()> {
        ensure_finite("`shift`", shift)?;
        if shift <= 0.0 {
            return Err(SchedulerError::InvalidConfig(format!(
                "`shift` must be positive, got {shift}"
            )));
        }
        self.shift = shift;
        Ok(())
    }

    /// The solver order (1: one model evaluation per step).
    pub fn order(&self) -> usize {
        1
    }

    /// The timesteps of the schedule, `sigma * num_train_timesteps` (one per step).
    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    /// The sigmas of the schedule, with the terminal one (one more than timesteps).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// The number of steps set by `set_timesteps` (`None` before it).
    pub fn num_inference_steps(&self) -> Option<usize> {
        self.num_inference_steps
    }

    /// The index of the next step (`None` until the first step or `set_begin_index`).
    pub fn step_index(&self) -> Option<usize> {
        self.step_index
    }

    /// The index the first step starts from, when set.
    pub fn begin_index(&self) -> Option<usize> {
        self.begin_index
    }

    /// Makes the first step start at `begin_index` instead of looking the
    /// timestep up (Lumina2Pipeline sets 0).
    pub fn set_begin_index(&mut self, begin_index: usize) {
        self.begin_index = Some(begin_index);
    }

    /// diffusers' `set_timesteps`: builds the inference schedule.
    pub fn set_timesteps(&mut self, req: &TimestepRequest) -> Result<()> {
        let cfg = &self.config;
        if cfg.use_dynamic_shifting && req.mu.is_none() {
            return Err(SchedulerError::MuRequired);
        }
        if let Some(mu) = req.mu {
            ensure_finite("`mu`", mu)?;
        }
        let bad = |m: &str| Err(SchedulerError::InvalidTimesteps(m.to_string()));
        if let (Some(s), Some(t)) = (&req.sigmas, &req.timesteps) {
            if s.len() != t.len() {
                return bad("`sigmas` and `timesteps` should have the same length");
            }
        }
        let n = match req.num_inference_steps {
            Some(n) => {
                if req.sigmas.as_ref().is_some_and(|s| s.len() != n)
                    || req.timesteps.as_ref().is_some_and(|t| t.len() != n)
                {
                    return bad("`sigmas` and `timesteps` should have the same length as num_inference_steps");
                }
                n
            }
            None => match (&req.sigmas, &req.timesteps) {
                (Some(s), _) => s.len(),
                (None, Some(t)) => t.len(),
                (None, None) => {
                    return bad("one of `num_inference_steps`, `sigmas`, `timesteps` is needed")
                }
            },
        };
        if n == 0 {
            return bad("the schedule needs at least one step");
        }
        if n > crate::MAX_INFERENCE_STEPS {
            return Err(SchedulerError::InvalidTimesteps(format!(
                "{n} steps are over the limit of {}",
                crate::MAX_INFERENCE_STEPS
            )));
        }
        for (what, list) in [("sigma", &req.sigmas), ("timestep", &req.timesteps)] {
            for v in list.iter().flatten() {
                ensure_finite(what, *v)?;
            }
        }
        let nt = cfg.num_train_timesteps;

        // 1. Default sigmas.
        let given_timesteps: Option<Vec<f32>> = req
            .timesteps
            .as_ref()
            .map(|t| t.iter().map(|&v| v as f32).collect());
        let sigmas = match (&req.sigmas, &given_timesteps) {
            (Some(s), _) => Values::F32(s.iter().map(|&v| v as f32).collect()),
            (None, Some(t)) => Values::F32(t.iter().map(|&v| v / nt as f32).collect()),
            (None, None) => Values::F64(
                linspace(self.sigma_max * nt as f64, self.sigma_min * nt as f64, n)
                    .into_iter()
                    .map(|t| t / nt as f64)
                    .collect(),
            ),
        };

        // 2. Shifting.
        let sigmas = if cfg.use_dynamic_shifting {
            let mu = req.mu.unwrap_or_default();
            let kind = cfg.time_shift_type;
            sigmas.map(|s| time_shift(s, kind, mu), |s| time_shift(s, kind, mu))
        } else {
            let shift = self.shift;
            sigmas.map(|s| static_shift(s, shift), |s| static_shift(s, shift))
        };

        // 3. Stretch to `shift_terminal` (Python truthiness: 0.0 is off).
        let sigmas = match cfg.shift_terminal {
            Some(st) if st != 0.0 => sigmas.map(
                |s| stretch_to_terminal(s, st),
                |s| stretch_to_terminal(s, st),
            ),
            _ => sigmas,
        };

        // 4. Karras / exponential / beta, between the ends of the shifted schedule.
        let converted = cfg.use_karras_sigmas || cfg.use_exponential_sigmas || cfg.use_beta_sigmas;
        let sigmas = if converted {
            let (sigma_max, sigma_min) = sigmas
                .ends()
                .ok_or_else(|| SchedulerError::InvalidTimesteps("empty schedule".into()))?;
            ensure_finite("sigma_min", sigma_min)?;
            ensure_finite("sigma_max", sigma_max)?;
            if cfg.use_karras_sigmas {
                Values::F64(karras(sigma_min, sigma_max, n))
            } else if cfg.use_exponential_sigmas {
                if sigma_min <= 0.0 || sigma_max <= 0.0 {
                    return bad("exponential sigmas need positive sigma_min and sigma_max");
                }
                Values::F64(exponential(sigma_min, sigma_max, n))
            } else {
                Values::F64(beta(sigma_min, sigma_max, n))
            }
        } else {
            sigmas
        };

        // 5. float32 sigmas; timesteps as given or sigma * num_train_timesteps.
        let mut sigmas = sigmas.into_f32();
        let ntf = nt as f32;
        let mut timesteps = match given_timesteps {
            Some(t) => t,
            None => sigmas.iter().map(|s| s * ntf).collect(),
        };

        // 6. Terminal sigma.
        if cfg.invert_sigmas {
            sigmas = sigmas.iter().map(|s| 1.0 - s).collect();
            timesteps = sigmas.iter().map(|s| s * ntf).collect();
            sigmas.push(1.0);
        } else {
            sigmas.push(0.0);
        }
        for s in &sigmas {
            ensure_finite("a computed sigma", *s as f64)?;
        }
        for t in &timesteps {
            ensure_finite("a computed timestep", *t as f64)?;
        }

        self.timesteps = timesteps;
        self.sigmas = sigmas;
        self.num_inference_steps = Some(n);
        self.step_index = None;
        self.begin_index = None;
        Ok(())
    }

    /// Lumina2Pipeline's schedule: sigmas `np.linspace(1, 1/N, N)` passed
    /// explicitly, with `mu` from [`crate::calculate_shift`] of the image sequence
    /// length (it only matters with dynamic shifting).
    pub fn set_timesteps_lumina2(
        &mut self,
        num_inference_steps: usize,
        image_seq_len: usize,
    ) -> Result<()> {
        let mu = if self.config.use_dynamic_shifting {
            let c = &self.config;
            let need = |v: Option<f64>, name: &str| {
                v.ok_or_else(|| SchedulerError::InvalidConfig(format!("`{name}` is null")))
            };
            Some(crate::calculate_shift(
                image_seq_len,
                c.base_image_seq_len,
                c.max_image_seq_len,
                need(c.base_shift, "base_shift")?,
                need(c.max_shift, "max_shift")?,
            )?)
        } else {
            None
        };
        let req = TimestepRequest {
            sigmas: Some(crate::lumina2_sigmas(num_inference_steps)),
            mu,
            ..TimestepRequest::default()
        };
        self.set_timesteps(&req)
    }

    /// diffusers' `index_for_timestep`: the position of `timestep` in the
    /// schedule, the second one when it occurs more than once.
    pub fn index_for_timestep(&self, timestep: f32) -> Result<usize> {
        let hits: Vec<usize> = self
            .timesteps
            .iter()
            .enumerate()
            .filter(|(_, t)| **t == timestep)
            .map(|(i, _)| i)
            .collect();
        let pos = if hits.len() > 1 { 1 } else { 0 };
        hits.get(pos)
            .copied()
            .ok_or(SchedulerError::TimestepNotFound(timestep))
    }

    fn current_index(&mut self, timestep: f32) -> Result<usize> {
        if self.num_inference_steps.is_none() {
            return Err(SchedulerError::NotInitialized);
        }
        let idx = match (self.step_index, self.begin_index) {
            (Some(i), _) => i,
            (None, Some(b)) => b,
            (None, None) => self.index_for_timestep(timestep)?,
        };
        self.step_index = Some(idx);
        Ok(idx)
    }

    /// The sigma of step `index` and the next one.
    fn sigma_pair(&self, index: usize) -> Result<(f32, f32)> {
        match (self.sigmas.get(index), self.sigmas.get(index + 1)) {
            (Some(&s), Some(&n)) => Ok((s, n)),
            _ => Err(SchedulerError::StepOutOfRange {
                index,
                steps: self.sigmas.len().saturating_sub(1),
            }),
        }
    }

    /// diffusers' `step`: one Euler step from `timestep` to the next sigma.
    ///
    /// `model_output` is the velocity `dx/dsigma`. As diffusers does, `sample` is
    /// upcast to f32, the product `dt * model_output` is computed in the model
    /// output's dtype, `dt` rounded to it first (PyTorch's type promotion with a
    /// 0-dim tensor), and the
    /// result is cast back to the model output's dtype. With
    /// `stochastic_sampling`, `noise` (same shape; never drawn here) is required:
    /// `x0 = x - sigma v`, then `(1 - sigma_next) x0 + sigma_next noise`.
    pub fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f32,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        same_shape("model_output and sample", model_output, sample)?;
        match (self.config.stochastic_sampling, noise) {
            (true, None) => return Err(SchedulerError::NoiseRequired),
            (false, Some(_)) => return Err(SchedulerError::UnexpectedNoise),
            (true, Some(n)) => same_shape("noise and sample", n, sample)?,
            (false, None) => {}
        }
        let idx = self.current_index(timestep)?;
        let (sigma, sigma_next) = self.sigma_pair(idx)?;
        let out_dtype = model_output.dtype();
        let sample = sample.to_dtype(DType::F32)?;
        // `scalar * model_output` with a 0-dim f32 tensor: PyTorch computes it in
        // the model output's dtype, the scalar rounded to that dtype first.
        let scaled = |s: f32| -> Result<Tensor> {
            let s = Tensor::new(s, &candle_core::Device::Cpu)?
                .to_dtype(out_dtype)?
                .to_dtype(DType::F32)?
                .to_scalar::<f32>()?;
            Ok(model_output
                .to_dtype(DType::F32)?
                .affine(s as f64, 0.0)?
                .to_dtype(out_dtype)?
                .to_dtype(DType::F32)?)
        };
        let prev = match noise {
            Some(noise) => {
                let x0 = (&sample - scaled(sigma)?)?;
                let noise = noise.to_dtype(DType::F32)?;
                (x0.affine((1.0 - sigma_next) as f64, 0.0)?
                    + noise.affine(sigma_next as f64, 0.0)?)?
            }
            None => (&sample + scaled(sigma_next - sigma)?)?,
        };
        self.step_index = Some(idx + 1);
        Ok(prev.to_dtype(out_dtype)?)
    }

    /// diffusers' `scale_noise` (the forward process, for image-to-image):
    /// `sigma * noise + (1 - sigma) * sample`, in the sample's dtype, with one
    /// timestep per batch element (or one for all). The sigma is looked up as
    /// diffusers does: by timestep without a begin index, else at the step index,
    /// else at the begin index.
    pub fn scale_noise(
        &self,
        sample: &Tensor,
        timesteps: &[f32],
        noise: &Tensor,
    ) -> Result<Tensor> {
        same_shape("noise and sample", noise, sample)?;
        if noise.dtype() != sample.dtype() {
            return Err(SchedulerError::DTypeMismatch {
                what: "noise and sample".into(),
                left: noise.dtype(),
                right: sample.dtype(),
            });
        }
        let dims = sample.dims();
        let batch = dims.first().copied().unwrap_or(1);
        if timesteps.is_empty() || (timesteps.len() != 1 && timesteps.len() != batch) {
            return Err(SchedulerError::InvalidTimesteps(format!(
                "scale_noise needs 1 or {batch} timesteps, got {}",
                timesteps.len()
            )));
        }
        let mut sig = Vec::with_capacity(timesteps.len());
        for &t in timesteps {
            let idx = match (self.begin_index, self.step_index) {
                (None, _) => self.index_for_timestep(t)?,
                (Some(_), Some(s)) => s,
                (Some(b), None) => b,
            };
            let s = self
                .sigmas
                .get(idx)
                .copied()
                .ok_or(SchedulerError::StepOutOfRange {
                    index: idx,
                    steps: self.sigmas.len().saturating_sub(1),
                })?;
            sig.push(s);
        }
        let mut shape = vec![sig.len()];
        shape.extend(std::iter::repeat_n(1, dims.len().saturating_sub(1)));
        let dtype = sample.dtype();
        let dev = sample.device();
        // sigmas.to(sample.dtype), then `1.0 - sigma` in that dtype.
        let sigma = Tensor::from_vec(sig, shape.as_slice(), dev)?.to_dtype(dtype)?;
        let one_minus = sigma.affine(-1.0, 1.0)?;
        Ok((sigma.broadcast_mul(noise)? + one_minus.broadcast_mul(sample)?)?)
    }
}

fn same_shape(what: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.dims() != b.dims() {
        return Err(SchedulerError::ShapeMismatch {
            what: what.to_string(),
            left: a.dims().to_vec(),
            right: b.dims().to_vec(),
        });
    }
    Ok(())
}
