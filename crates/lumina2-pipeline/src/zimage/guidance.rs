//! Z-Image's classifier-free guidance (`ZImagePipeline.__call__`): the
//! per-step truncation and the per-image combination with its norm cap.

use candle_core::{DType, Tensor};

use crate::error::Result;

/// The guidance scale a step runs with: `cfg_truncation` applies when it is
/// at most 1, and turns guidance off (scale 0) at the steps whose normalised
/// time `(1000 - t) / 1000` (float32, as the reference precomputes it and
/// compares it as a Python float) is above it.
pub fn step_scale(guidance_scale: f64, cfg_truncation: f64, t_norm: f32) -> f64 {
    if cfg_truncation <= 1.0 && f64::from(t_norm) > cfg_truncation {
        0.0
    } else {
        guidance_scale
    }
}

/// The normalised time of a timestep: `(1000 - t) / 1000` in float32 (the
/// reference writes 1000, not `num_train_timesteps`).
pub fn normalised_time(t: f32) -> f32 {
    (1000f32 - t) / 1000f32
}

/// One image's guided prediction, in f32: `pos + scale * (pos - neg)`; with
/// `normalization > 0`, scaled down to at most `normalization` times the
/// norm of `pos` (`torch.linalg.vector_norm` over the whole image).
pub fn combine(pos: &Tensor, neg: &Tensor, scale: f64, normalization: f64) -> Result<Tensor> {
    let pos = pos.to_dtype(DType::F32)?;
    let neg = neg.to_dtype(DType::F32)?;
    let pred = (&pos + (&pos - &neg)?.affine(scale, 0.0)?)?;
    if normalization <= 0.0 {
        return Ok(pred);
    }
    let ori_pos_norm = norm(&pos)?;
    let new_pos_norm = norm(&pred)?;
    // float32 scalars, as the 0-d tensors of the reference.
    let max_new_norm = ori_pos_norm * normalization as f32;
    if new_pos_norm > max_new_norm {
        return Ok(pred.affine(f64::from(max_new_norm / new_pos_norm), 0.0)?);
    }
    Ok(pred)
}

/// The Euclidean norm of every element (accumulated in f64, rounded to f32).
fn norm(t: &Tensor) -> Result<f32> {
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    let sum: f64 = v.iter().map(|x| f64::from(*x) * f64::from(*x)).sum();
    Ok(sum.sqrt() as f32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn truncation_compares_the_normalised_time() {
        assert_eq!(step_scale(4.0, 1.0, 0.999), 4.0);
        assert_eq!(step_scale(4.0, 0.5, 0.6), 0.0);
        assert_eq!(step_scale(4.0, 0.5, 0.5), 4.0);
        // Above 1 the truncation is off.
        assert_eq!(step_scale(4.0, 1.5, 0.999), 4.0);
        assert_eq!(normalised_time(1000.0), 0.0);
    }

    #[test]
    fn normalization_caps_the_norm() -> Result<()> {
        let d = Device::Cpu;
        let pos = Tensor::new(&[3f32, 4.0], &d)?;
        let neg = Tensor::new(&[0f32, 0.0], &d)?;
        let free = combine(&pos, &neg, 1.0, 0.0)?.to_vec1::<f32>()?;
        assert_eq!(free, [6.0, 8.0]);
        let capped = combine(&pos, &neg, 1.0, 1.0)?.to_vec1::<f32>()?;
        assert!((capped[0] - 3.0).abs() < 1e-6 && (capped[1] - 4.0).abs() < 1e-6);
        Ok(())
    }
}
