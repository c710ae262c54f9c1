//! TeaCache step caching, as ali-vilab/TeaCache's `TeaCache4Lumina2`
//! defines it (`TeaCache4Lumina2/teacache_lumina2.py`, commit 7c10efc,
//! `teacache_forward_working`).
//!
//! Each transformer call measures how far the first joint layer's modulated
//! input moved since the previous call of the same sequence length (the
//! relative L1 change), maps it through a fitted polynomial and adds it to an
//! accumulator. While the accumulator stays below the threshold, the joint
//! layers are skipped and their input gets the residual the last computed
//! call added; once it reaches the threshold they run and it restarts at 0.
//!
//! The reference's bookkeeping is kept as it is, quirks included, so that the
//! same calls are skipped:
//! - the state is kept per joint sequence length (`max_seq_len`), which is
//!   how it tells the conditional and unconditional calls of a guided step
//!   apart (two prompts padded to the same length share one state);
//! - its step counter advances only on calls whose length differs from the
//!   first call's, that is on the unconditional calls: without guidance (or
//!   after guidance stops, or with equal lengths) it stays where it is;
//! - counter 0 and `num_steps - 1` always compute (the first and last step);
//!   past `num_steps` the counter wraps to 0.

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use lumina2_transformer::Lumina2Transformer;

use crate::error::Result;

/// The reference's "v1" polynomial (highest power first, as `np.poly1d`),
/// `teacache_lumina2.py` line 72.
pub const COEFFICIENTS: [f64; 5] = [
    393.76566581,
    -603.50993606,
    209.10239044,
    -23.00726601,
    0.86377344,
];

/// The caching state of one run. Build a new one for every generation.
#[derive(Debug)]
pub struct TeaCache {
    threshold: f64,
    num_steps: usize,
    /// The reference's `cnt`.
    counter: usize,
    /// The reference's `uncond_seq_len`: the first call's sequence length.
    first_len: Option<usize>,
    states: HashMap<usize, LengthState>,
    /// One entry per transformer call: whether its joint layers ran.
    computed: Vec<bool>,
}

/// The reference's `cache[max_seq_len]`.
#[derive(Debug, Default)]
struct LengthState {
    accumulated: f64,
    previous_modulated: Option<Tensor>,
    previous_residual: Option<Tensor>,
}

impl TeaCache {
    /// `threshold` is the reference's `rel_l1_thresh`; `num_steps` the number
    /// of denoising steps.
    pub fn new(threshold: f64, num_steps: usize) -> Self {
        Self {
            threshold,
            num_steps,
            counter: 0,
            first_len: None,
            states: HashMap::new(),
            computed: Vec::new(),
        }
    }

    /// Whether each transformer call so far ran its joint layers.
    pub fn computed(&self) -> &[bool] {
        &self.computed
    }

    /// How many calls skipped their joint layers.
    pub fn skipped(&self) -> usize {
        self.computed.iter().filter(|&&c| !c).count()
    }

    /// The transformer's forward (same arguments as
    /// [`Lumina2Transformer::forward`]), skipping the joint layers where the
    /// cache allows.
    pub fn forward(
        &mut self,
        model: &Lumina2Transformer,
        latents: &Tensor,
        timestep: &Tensor,
        caption: &Tensor,
        caption_mask: &Tensor,
    ) -> Result<Tensor> {
        let input = model.embed(latents, timestep, caption, caption_mask)?;
        let Some(modulated) = model.first_modulated_input(&input)? else {
            // No joint layer: nothing to skip.
            self.computed.push(true);
            let hidden = model.joint_layers(&input)?;
            return Ok(model.output(&input, &hidden)?);
        };
        let len = input.layout().max_seq_len();
        let edge = self.counter == 0 || self.counter + 1 == self.num_steps;
        let state = self.states.entry(len).or_default();
        // Lines 66-91.
        let mut compute = true;
        if edge {
            state.accumulated = 0.0;
        } else if let Some(previous) = &state.previous_modulated {
            state.accumulated += rescale(relative_l1(&modulated, previous)?);
            if state.accumulated < self.threshold {
                compute = false;
            } else {
                state.accumulated = 0.0;
            }
        } else {
            state.accumulated = 0.0;
        }
        state.previous_modulated = Some(modulated);
        // Lines 95-100.
        let first = *self.first_len.get_or_insert(len);
        if len != first {
            self.counter += 1;
            if self.counter >= self.num_steps {
                self.counter = 0;
            }
        }
        // Lines 102-124: a skipped call adds the cached residual (or computes
        // when there is none yet).
        let hidden = match (&state.previous_residual, compute) {
            (Some(residual), false) => (input.hidden() + residual)?,
            _ => {
                compute = true;
                let out = model.joint_layers(&input)?;
                state.previous_residual = Some((&out - input.hidden())?);
                out
            }
        };
        self.computed.push(compute);
        Ok(model.output(&input, &hidden)?)
    }
}

/// `|a - b|.mean() / |b|.mean()` as the reference computes it (lines 75-80),
/// in f32 (`.item()` of the compute-dtype result), then widened to Python's
/// float.
fn relative_l1(current: &Tensor, previous: &Tensor) -> Result<f64> {
    let previous = previous.to_dtype(DType::F32)?;
    let current = current.to_dtype(DType::F32)?;
    let prev_mean = previous.abs()?.mean_all()?.to_scalar::<f32>()?;
    if prev_mean > 1e-9 {
        let change = (&current - &previous)?
            .abs()?
            .mean_all()?
            .to_scalar::<f32>()?;
        Ok(f64::from(change / prev_mean))
    } else if current.abs()?.mean_all()?.to_scalar::<f32>()? < 1e-9 {
        Ok(0.0)
    } else {
        Ok(f64::INFINITY)
    }
}

/// `np.poly1d(COEFFICIENTS)(x)`: Horner's rule in f64, as numpy evaluates it.
fn rescale(x: f64) -> f64 {
    COEFFICIENTS.iter().fold(0.0, |acc, &c| acc * x + c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rescale_is_the_reference_polynomial() {
        assert_eq!(rescale(0.0), 0.86377344);
        // np.poly1d([393.76566581, -603.50993606, 209.10239044, -23.00726601, 0.86377344])(0.1)
        let x: f64 = 0.1;
        let direct = 393.76566581 * x.powi(4) - 603.50993606 * x.powi(3) + 209.10239044 * x * x
            - 23.00726601 * x
            + 0.86377344;
        assert!((rescale(x) - direct).abs() < 1e-12);
    }

    #[test]
    fn relative_l1_matches_its_definition() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let a = Tensor::new(&[1f32, -2., 3., 4.], &dev)?;
        let b = Tensor::new(&[1f32, -1., 3., 2.], &dev)?;
        // mean |a - b| = 3/4, mean |b| = 7/4.
        assert!((relative_l1(&a, &b)? - 3.0 / 7.0).abs() < 1e-7);
        let z = Tensor::zeros(4, DType::F32, &dev)?;
        assert_eq!(relative_l1(&z, &z)?, 0.0);
        assert_eq!(relative_l1(&a, &z)?, f64::INFINITY);
        Ok(())
    }
}
