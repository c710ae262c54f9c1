//! Classifier-free guidance: when it runs and how the two predictions combine.

use candle_core::{DType, Tensor, D};

use crate::error::Result;
use crate::options::GuidanceMode;

/// Whether guidance runs at an evaluation.
///
/// - [`GuidanceMode::Diffusers`]: `(step + 1) / num_steps > cfg_trunc_ratio`
///   switches it off (diffusers' `do_classifier_free_truncation`).
/// - [`GuidanceMode::Original`]: on while the model time is below
///   `cfg_trunc_ratio` (`forward_with_cfg`'s `t[0] < cfg_trunc`, which torch
///   compares in float32, the dtype of `t`).
pub fn guidance_active(
    mode: GuidanceMode,
    cfg_trunc_ratio: f64,
    step: usize,
    num_steps: usize,
    model_time: f32,
) -> bool {
    match mode {
        GuidanceMode::Diffusers => ((step + 1) as f64 / num_steps as f64) <= cfg_trunc_ratio,
        GuidanceMode::Original => model_time < cfg_trunc_ratio as f32,
    }
}

/// Rounds an f32 tensor to `dtype` and back: torch rounds every elementwise
/// op of a bf16/f16 tensor to that dtype, so the guidance arithmetic does too.
fn rounded(x: Tensor, dtype: DType) -> Result<Tensor> {
    Ok(match dtype {
        DType::F32 | DType::F64 => x,
        d => x.to_dtype(d)?.to_dtype(DType::F32)?,
    })
}

/// Combines the conditional and unconditional predictions (raw transformer
/// outputs, `[B, C, H, W]`) into the guided one, in their dtype.
///
/// In [`GuidanceMode::Original`], `renorm_cfg` is `forward_with_cfg`'s
/// factor: the guided norm is clamped to `renorm_cfg` times the conditional
/// one, and a factor of 0 or less switches the clamp off. Diffusers' mode
/// ignores it.
pub fn combine(
    cond: &Tensor,
    uncond: &Tensor,
    scale: f64,
    normalization: bool,
    mode: GuidanceMode,
    renorm_cfg: f64,
) -> Result<Tensor> {
    let dtype = cond.dtype();
    let c = cond.to_dtype(DType::F32)?;
    let u = uncond.to_dtype(DType::F32)?;
    // uncond + scale * (cond - uncond), rounded after each op as torch does.
    let diff = rounded((&c - &u)?, dtype)?;
    let scaled = rounded(diff.affine(scale as f32 as f64, 0.0)?, dtype)?;
    let guided = rounded((&u + scaled)?, dtype)?;
    if !normalization || (mode == GuidanceMode::Original && renorm_cfg <= 0.0) {
        return Ok(guided.to_dtype(dtype)?);
    }
    let out = match mode {
        GuidanceMode::Diffusers => {
            // torch.norm(x, dim=-1, keepdim=True): over each latent row (the
            // last axis), accumulated in f32; the rescale is unconditional.
            let cond_norm = rounded(c.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?, dtype)?;
            let pred_norm = rounded(guided.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?, dtype)?;
            let ratio = rounded(cond_norm.broadcast_div(&pred_norm)?, dtype)?;
            guided.broadcast_mul(&ratio)?
        }
        GuidanceMode::Original => {
            // Norms over each image's whole latent; only ever scaled down,
            // to at most `renorm_cfg` times the conditional norm.
            let b = c.dim(0)?;
            let cond_norm = rounded(c.reshape((b, ()))?.sqr()?.sum_keepdim(1)?.sqrt()?, dtype)?;
            let max_norm = rounded(cond_norm.affine(renorm_cfg as f32 as f64, 0.0)?, dtype)?;
            let pred_norm = rounded(
                guided.reshape((b, ()))?.sqr()?.sum_keepdim(1)?.sqrt()?,
                dtype,
            )?;
            let ratio = rounded(max_norm.broadcast_div(&pred_norm)?, dtype)?;
            let clamp = pred_norm.ge(&max_norm)?;
            let ones = Tensor::ones_like(&ratio)?;
            let factor = clamp.where_cond(&ratio, &ones)?;
            let shape: Vec<usize> = std::iter::once(b)
                .chain(std::iter::repeat_n(1, c.rank() - 1))
                .collect();
            guided.broadcast_mul(&factor.reshape(shape)?)?
        }
    };
    Ok(rounded(out, dtype)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn diffusers_truncation_counts_steps() {
        // 10 steps, ratio 0.25: steps 0 and 1 ((i+1)/10 <= 0.25) have guidance.
        let on: Vec<bool> = (0..10)
            .map(|i| guidance_active(GuidanceMode::Diffusers, 0.25, i, 10, 0.5))
            .collect();
        assert_eq!(on.iter().filter(|b| **b).count(), 2);
        assert!(on[0] && on[1] && !on[2]);
        assert!((0..10).all(|i| guidance_active(GuidanceMode::Diffusers, 1.0, i, 10, 0.5)));
    }

    #[test]
    fn original_truncation_uses_model_time() {
        assert!(guidance_active(GuidanceMode::Original, 0.5, 9, 10, 0.4));
        assert!(!guidance_active(GuidanceMode::Original, 0.5, 0, 10, 0.6));
        // A ratio on a grid point: compared in f32 as torch does, so the
        // point itself (f32(1/7) > 1/7) has no guidance.
        let t = (1.0f64 / 7.0) as f32;
        assert!(t as f64 > 1.0 / 7.0);
        assert!(!guidance_active(GuidanceMode::Original, 1.0 / 7.0, 2, 4, t));
    }

    #[test]
    fn no_normalization_is_plain_cfg() -> Result<()> {
        let dev = Device::Cpu;
        let c = Tensor::new(&[[[[1f32, 2.0], [3.0, 4.0]]]], &dev)?;
        let u = Tensor::new(&[[[[0f32, 1.0], [1.0, 1.0]]]], &dev)?;
        let g = combine(&c, &u, 2.0, false, GuidanceMode::Diffusers, 1.0)?;
        let v: Vec<f32> = g.flatten_all()?.to_vec1()?;
        assert_eq!(v, vec![2.0, 3.0, 5.0, 7.0]);
        Ok(())
    }

    #[test]
    fn diffusers_normalization_matches_cond_row_norms() -> Result<()> {
        let dev = Device::Cpu;
        let c = Tensor::new(&[[[[3f32, 4.0], [0.0, 1.0]]]], &dev)?;
        let u = Tensor::new(&[[[[1f32, 1.0], [1.0, 0.0]]]], &dev)?;
        let g = combine(&c, &u, 3.0, true, GuidanceMode::Diffusers, 1.0)?;
        let norms: Vec<f32> = g.sqr()?.sum(D::Minus1)?.sqrt()?.flatten_all()?.to_vec1()?;
        assert!((norms[0] - 5.0).abs() < 1e-5 && (norms[1] - 1.0).abs() < 1e-5);
        Ok(())
    }

    #[test]
    fn original_normalization_only_scales_down() -> Result<()> {
        let dev = Device::Cpu;
        let c = Tensor::new(&[[[[3f32, 4.0]]], [[[3.0, 4.0]]]], &dev)?;
        // Image 0: guided norm grows (clamped); image 1: it shrinks (kept).
        let u = Tensor::new(&[[[[1f32, 1.0]]], [[[3.5, 4.5]]]], &dev)?;
        let g = combine(&c, &u, 2.0, true, GuidanceMode::Original, 1.0)?;
        let v: Vec<f32> = g.flatten_all()?.to_vec1()?;
        let n0 = (v[0] * v[0] + v[1] * v[1]).sqrt();
        assert!((n0 - 5.0).abs() < 1e-5);
        assert_eq!(&v[2..], &[2.5, 3.5]);
        Ok(())
    }

    #[test]
    fn original_renorm_factor_scales_the_clamp_or_turns_it_off() -> Result<()> {
        let dev = Device::Cpu;
        let c = Tensor::new(&[[[[3f32, 4.0]]]], &dev)?;
        let u = Tensor::new(&[[[[1f32, 1.0]]]], &dev)?;
        // Guided: 1 + 2 * (2, 3) = (5, 7), norm ~8.6 against the cond's 5.
        let norm =
            |t: &Tensor| -> Result<f32> { Ok(t.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?) };
        let half = combine(&c, &u, 2.0, true, GuidanceMode::Original, 0.5)?;
        assert!((norm(&half)? - 2.5).abs() < 1e-5);
        let loose = combine(&c, &u, 2.0, true, GuidanceMode::Original, 2.0)?;
        assert_eq!(loose.flatten_all()?.to_vec1::<f32>()?, vec![5.0, 7.0]);
        let off = combine(&c, &u, 2.0, true, GuidanceMode::Original, 0.0)?;
        assert_eq!(off.flatten_all()?.to_vec1::<f32>()?, vec![5.0, 7.0]);
        Ok(())
    }
}
