//! Element-wise comparison against `atol + rtol * |expected|`.

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// How far one output is from its reference.
#[derive(Debug, Clone, Copy)]
pub struct Comparison {
    /// max |ours - expected|.
    pub max_abs: f64,
    /// max |ours - expected| / (atol + rtol |expected|); the tensor passes when <= 1.
    pub worst: f64,
    /// ||ours - expected|| / ||expected|| (Euclidean norms over all elements;
    /// infinite when either side is not finite where the other is).
    pub rel_rms: f64,
}

impl Comparison {
    /// The format's pass rule: every element within its tolerance.
    pub fn passes(&self) -> bool {
        self.worst <= 1.0
    }
}

/// Compares `ours` with `expected` (any dtypes, same shape). Equal elements
/// count as no error even when atol = rtol = 0 (bit-exact cases); a NaN or
/// infinity where the reference differs makes `worst` infinite.
pub fn compare(ours: &Tensor, expected: &Tensor, atol: f64, rtol: f64) -> Result<Comparison> {
    if ours.dims() != expected.dims() {
        return Err(Error::Shape {
            expected: expected.dims().to_vec(),
            found: ours.dims().to_vec(),
        });
    }
    let flat = |t: &Tensor| -> Result<Vec<f64>> {
        t.to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f64>())
            .map_err(Error::Compare)
    };
    let (a, e) = (flat(ours)?, flat(expected)?);
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
        worst = worst.max(if bound > 0.0 {
            d / bound
        } else {
            f64::INFINITY
        });
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn worst_is_the_error_over_the_tolerance() {
        let c = compare(&t(&[1.0, 2.5]), &t(&[1.0, 2.0]), 0.1, 0.2).unwrap();
        assert_eq!(c.max_abs, 0.5);
        assert!((c.worst - 0.5 / 0.5).abs() < 1e-12);
        assert!(c.passes());
        assert!((c.rel_rms - (0.25f64 / 5.0).sqrt()).abs() < 1e-12);
        // Bit-exact: equal passes with zero tolerance, any difference fails.
        assert_eq!(
            compare(&t(&[3.0]), &t(&[3.0]), 0.0, 0.0).unwrap().worst,
            0.0
        );
        assert!(!compare(&t(&[3.0]), &t(&[3.5]), 0.0, 0.0).unwrap().passes());
    }

    #[test]
    fn non_finite_and_shapes_fail() {
        let c = compare(&t(&[f32::NAN]), &t(&[1.0]), 1.0, 1.0).unwrap();
        assert!(c.worst.is_infinite() && !c.passes());
        let c = compare(&t(&[f32::INFINITY]), &t(&[1.0]), 1.0, 1.0).unwrap();
        assert!(!c.passes());
        let err = compare(&t(&[1.0]), &t(&[1.0, 2.0]), 1.0, 1.0).unwrap_err();
        assert!(err.to_string().contains("[1]") && err.to_string().contains("[2]"));
    }
}
