//! Softmax over the last dimension of an f32 CPU tensor, vectorised with
//! AVX-512.
//!
//! Why: the attention of a 512x512 transformer forward takes about 200 million
//! exponentials; candle's CPU softmax computes them one at a time with the
//! scalar `exp`, which took longer than the two attention matmuls together
//! (0.93 s against 0.85 s in one forward of the benchmark model). Here each
//! row is three passes of 16 lanes: maximum, `exp(x - max)` with its sum, and
//! the division.
//!
//! The exponential is the usual range reduction `exp(x) = 2^n exp(r)`,
//! `|r| <= ln2 / 2`, with a degree-6 polynomial for `exp(r)` (relative error
//! about 2e-7, within two f32 ulps of the correctly rounded value); `-inf`
//! (masked keys) gives exactly 0, and a row that is all `-inf` gives NaN,
//! as PyTorch's softmax does.

use crate::cpu::{map_rows, CpuView};
use candle_core::{DType, Tensor};

/// `softmax(x)` over the last dimension. f32 CPU tensors on CPUs with
/// AVX-512F take the vectorised path; anything else candle's.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if !(x.device().is_cpu() && x.dtype() == DType::F32 && avx512()) || x.rank() == 0 {
        return candle_nn::ops::softmax_last_dim(x);
    }
    let x = x.contiguous()?;
    let n = x.dims().last().copied().unwrap_or(1).max(1);
    let view = CpuView::of(&x);
    let Some(src) = view.as_ref().and_then(|v| v.slice::<f32>()) else {
        return candle_nn::ops::softmax_last_dim(&x);
    };
    let out = map_rows(src, n, |_, s, d: &mut [f32]| {
        // SAFETY: AVX-512F was detected; `d` and `s` have the same length.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            kernel::softmax_row(s, d)
        };
    });
    drop(view);
    Tensor::from_vec(out, x.dims(), x.device())
}

/// `softmax(x)` over the last dimension of an f32 tensor, rounded to bf16 in
/// the same pass (the probabilities of the bf16 attention's weighted sum).
/// Equal to `softmax_last_dim(x)?.to_dtype(BF16)`, except that values below
/// bf16's normal range (1.2e-38) become 0, as the conversion instruction does.
pub fn softmax_last_dim_to_bf16(x: &Tensor) -> candle_core::Result<Tensor> {
    let fast = x.device().is_cpu()
        && x.dtype() == DType::F32
        && x.rank() > 0
        && crate::simd::has_avx512_bf16();
    if !fast {
        return softmax_last_dim(x)?.to_dtype(DType::BF16);
    }
    let x = x.contiguous()?;
    let n = x.dims().last().copied().unwrap_or(1).max(1);
    let view = CpuView::of(&x);
    let Some(src) = view.as_ref().and_then(|v| v.slice::<f32>()) else {
        return softmax_last_dim(&x)?.to_dtype(DType::BF16);
    };
    let out = map_rows(src, n, |row, s, d: &mut [half::bf16]| {
        // SAFETY: AVX-512F/BW/VL/BF16 were detected; lengths match.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            kernel::softmax_row(s, row);
            kernel::round_row(row, d);
        };
    });
    drop(view);
    Tensor::from_vec(out, x.dims(), x.device())
}

fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use std::arch::x86_64::*;

    use crate::simd::exp16;

    /// `dst = bf16(src)`, nearest even.
    ///
    /// # Safety
    /// AVX-512F/BW/VL/BF16 are available; `dst.len() == src.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn round_row(src: &[f32], dst: &mut [half::bf16]) {
        let mut i = 0;
        while i < src.len() {
            let len = 16.min(src.len() - i);
            let m: __mmask16 = ((1u32 << len) - 1) as __mmask16;
            unsafe {
                let v = _mm512_maskz_loadu_ps(m, src.as_ptr().add(i));
                _mm256_mask_storeu_epi16(
                    dst.as_mut_ptr().add(i).cast(),
                    m,
                    crate::simd::round16(v),
                );
            }
            i += 16;
        }
    }

    /// One row: `dst = exp(src - max) / sum`.
    ///
    /// # Safety
    /// AVX-512F is available; `dst.len() == src.len()`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn softmax_row(src: &[f32], dst: &mut [f32]) {
        let n = src.len();
        let full = n / 16 * 16;
        let tail: __mmask16 = ((1u32 << (n - full)) - 1) as __mmask16;
        let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
        unsafe {
            let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
            let mut i = 0;
            while i < full {
                m = _mm512_max_ps(m, _mm512_loadu_ps(sp.add(i)));
                i += 16;
            }
            let t = _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), tail, sp.add(full));
            m = _mm512_max_ps(m, t);
            let max = _mm512_set1_ps(_mm512_reduce_max_ps(m));
            let mut sum = _mm512_setzero_ps();
            let mut i = 0;
            while i < full {
                let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sp.add(i)), max));
                _mm512_storeu_ps(dp.add(i), e);
                sum = _mm512_add_ps(sum, e);
                i += 16;
            }
            if tail != 0 {
                let t = _mm512_maskz_loadu_ps(tail, sp.add(full));
                let e = _mm512_maskz_mov_ps(tail, exp16(_mm512_sub_ps(t, max)));
                _mm512_mask_storeu_ps(dp.add(full), tail, e);
                sum = _mm512_add_ps(sum, e);
            }
            let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
            let mut i = 0;
            while i < full {
                _mm512_storeu_ps(dp.add(i), _mm512_mul_ps(_mm512_loadu_ps(dp.add(i)), inv));
                i += 16;
            }
            if tail != 0 {
                let t = _mm512_maskz_loadu_ps(tail, dp.add(full));
                _mm512_mask_storeu_ps(dp.add(full), tail, _mm512_mul_ps(t, inv));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Against an f64 softmax: rows of several lengths (tails), masked keys,
    /// large and tiny values, an all-masked row.
    #[test]
    fn matches_f64() -> candle_core::Result<()> {
        if !avx512() {
            return Ok(());
        }
        for n in [1usize, 5, 16, 17, 100, 1280] {
            let mut rows: Vec<Vec<f32>> = Vec::new();
            let x = Tensor::randn(0f32, 4.0, (6, n), &Device::Cpu)?.to_vec2::<f32>()?;
            rows.extend(x);
            let mut masked = rows[0].clone();
            for (i, v) in masked.iter_mut().enumerate() {
                if i % 3 == 1 {
                    *v = f32::NEG_INFINITY;
                }
            }
            rows.push(masked);
            rows.push(rows[1].iter().map(|v| v * 30.0).collect());
            rows.push(vec![f32::NEG_INFINITY; n]);
            let flat: Vec<f32> = rows.concat();
            let t = Tensor::from_vec(flat, (rows.len(), n), &Device::Cpu)?;
            let got = softmax_last_dim(&t)?.to_vec2::<f32>()?;
            // The bf16 variant is the f32 result rounded.
            let b16 = softmax_last_dim_to_bf16(&t)?;
            let via = softmax_last_dim(&t)?.to_dtype(DType::BF16)?;
            let bits = |t: &Tensor| -> candle_core::Result<Vec<u16>> {
                Ok(t.flatten_all()?
                    .to_vec1::<half::bf16>()?
                    .iter()
                    .map(|v| v.to_bits())
                    .collect())
            };
            // Except that vcvtneps2bf16 flushes subnormal f32 values (below
            // 2^-126, 1.2e-38) to zero, where candle's conversion rounds them:
            // to a bf16 subnormal, or up to the smallest normal (0x0080).
            for (a, b) in bits(&b16)?.into_iter().zip(bits(&via)?) {
                let subnormal = b & 0x7fff <= 0x0080;
                assert!(a == b || (subnormal && a & 0x7fff == 0), "{a:#x} vs {b:#x}");
            }
            for (row, g) in rows.iter().zip(&got) {
                let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
                let e: Vec<f64> = row.iter().map(|&v| (v as f64 - max).exp()).collect();
                let s: f64 = e.iter().sum();
                for (j, (&ej, &gj)) in e.iter().zip(g).enumerate() {
                    let want = ej / s;
                    if max == f64::NEG_INFINITY {
                        assert!(gj.is_nan(), "all-masked row gives NaN");
                        continue;
                    }
                    if row[j] == f32::NEG_INFINITY {
                        assert_eq!(gj, 0.0);
                        continue;
                    }
                    // The f32 rounding of x - max alone is 2^-24 |x - max|
                    // relative in exp; the polynomial and the division add a
                    // few ulps; the f32 sum of n terms (16 lanes, then the
                    // lanes) up to (n / 16 + 4) 2^-24 relative (the classic
                    // bound of recursive summation: a 1.2e-6 error at n = 1280
                    // was seen once in 2400 random rows).
                    let sum_err = (n as f64 / 16.0 + 4.0) * 2f64.powi(-24);
                    let tol = want
                        * (6e-7 + sum_err + 2f64.powi(-24) * (row[j] as f64 - max).abs())
                        + 1e-30;
                    assert!(
                        (gj as f64 - want).abs() <= tol,
                        "n {n} [{j}]: {gj} vs {want}"
                    );
                }
            }
        }
        Ok(())
    }
}
