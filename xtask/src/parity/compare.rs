//! Element-wise comparison with `atol + rtol * |expected|`.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// Result of comparing one tensor.
#[derive(Debug, Clone, Copy)]
pub struct Comparison {
    /// Max |ours - expected|.
    pub max_abs: f64,
    /// Max |ours - expected| / (atol + rtol |expected|); the tensor passes when <= 1.
    pub worst: f64,
    /// ||ours - expected|| / ||expected|| (Euclidean norms over all elements;
    /// infinite when either side is not finite where the other is).
    pub rel_rms: f64,
}

/// Compares `ours` with `expected` (any dtypes, same shape). A NaN or infinity
/// where the reference has a finite value (or the reverse) makes `worst` infinite.
pub fn compare(ours: &Tensor, expected: &Tensor, atol: f64, rtol: f64) -> Result<Comparison> {
    if ours.dims() != expected.dims() {
        bail!("shape {:?}, expected {:?}", ours.dims(), expected.dims());
    }
    let a = ours.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let e = expected
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let mut max_abs = 0f64;
    let mut worst = 0f64;
    let (mut diff2, mut ref2) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(&e) {
        if y.is_finite() {
            ref2 += y * y;
        }
        if x == y {
            continue;
        }
        let d = (x - y).abs();
        diff2 += d * d;
        if !d.is_finite() {
            max_abs = f64::INFINITY;
            worst = f64::INFINITY;
            continue;
        }
        max_abs = max_abs.max(d);
        let bound = atol + rtol * y.abs();
        let r = if bound > 0.0 {
            d / bound
        } else {
            f64::INFINITY
        };
        worst = worst.max(r);
    }
    let rel_rms = if diff2 == 0.0 {
        0.0
    } else {
        (diff2 / ref2).sqrt()
    };
    Ok(Comparison {
        max_abs,
        worst,
        rel_rms,
    })
}
