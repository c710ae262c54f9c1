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
use rayon::prelude::*;

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
            avx512::softmax_row(s, d)
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
            avx512::softmax_row(s, row);
            avx512::round_row(row, d);
        };
    });
    drop(view);
    Tensor::from_vec(out, x.dims(), x.device())
}

/// Gemma-2's eager attention weights in bf16, one pass per row:
/// `p = bf16(softmax_f32(t))` with `t = bf16(bf16(s * scaling)` then, with a
/// soft cap `c`, `t = bf16(c * bf16(tanh(bf16(t / c))))`, then
/// `t = bf16(t + mask)`: every intermediate rounded to bf16 as transformers
/// computes it on bf16 tensors (tanh within a few f32 ulps of PyTorch's).
/// `scores`: `[B, H, L, S]` bf16 (the bf16 products `q k^T`), `mask`:
/// additive f32 `[B, 1, L, S]`. `None` where the fast path does not apply
/// (other dtypes or shapes, no AVX512-BF16): the caller computes it op by op.
pub fn softcapped_softmax_bf16(
    scores: &Tensor,
    scaling: f32,
    cap: Option<f32>,
    mask: &Tensor,
) -> candle_core::Result<Option<Tensor>> {
    let Ok((b, h, l, s)) = scores.dims4() else {
        return Ok(None);
    };
    let fast = scores.device().is_cpu()
        && scores.dtype() == DType::BF16
        && mask.dtype() == DType::F32
        && mask.dims() == [b, 1, l, s]
        && s > 0
        && crate::simd::has_avx512_bf16();
    if !fast {
        return Ok(None);
    }
    let (scores, mask) = (scores.contiguous()?, mask.contiguous()?);
    let (vs, vm) = (CpuView::of(&scores), CpuView::of(&mask));
    let (Some(src), Some(bias)) = (
        vs.as_ref().and_then(|v| v.slice::<half::bf16>()),
        vm.as_ref().and_then(|v| v.slice::<f32>()),
    ) else {
        return Ok(None);
    };
    let mut out = vec![half::bf16::ZERO; src.len()];
    out.par_chunks_mut(s)
        .zip(src.par_chunks(s))
        .enumerate()
        .for_each_init(
            || (vec![0f32; s], vec![0f32; s]),
            |(t, p), (i, (d, x))| {
                let (bi, li) = (i / (h * l), i % l);
                let m = &bias[(bi * l + li) * s..(bi * l + li + 1) * s];
                // SAFETY: AVX-512F/BW/VL/BF16 were detected; every slice has
                // `s` elements.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    avx512::softcap_row(x, m, scaling, cap, t);
                    avx512::softmax_row(t, p);
                    avx512::round_row(p, d);
                }
                #[cfg(not(target_arch = "x86_64"))]
                let _ = (t, p, d, x, m);
            },
        );
    drop((vs, vm));
    Ok(Some(Tensor::from_vec(out, (b, h, l, s), scores.device())?))
}

/// [`softmax_last_dim`] on the plain-Rust rows, for f32 tensors on every
/// CPU (the reference path the tests compare everywhere; production falls
/// back to candle's softmax instead).
pub fn softmax_last_dim_portable(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.dtype() != DType::F32 || x.rank() == 0 {
        candle_core::bail!("portable softmax: f32 tensors of rank >= 1");
    }
    let x = x.contiguous()?;
    let n = x.dims().last().copied().unwrap_or(1).max(1);
    let src = x.flatten_all()?.to_vec1::<f32>()?;
    let out = map_rows(&src, n, |_, s, d: &mut [f32]| portable::softmax_row(s, d));
    Tensor::from_vec(out, x.dims(), x.device())
}

/// [`softcapped_softmax_bf16`] on the plain-Rust rows, on every CPU (the
/// reference path the tests compare everywhere; production returns `None`
/// off AVX512-BF16 and the caller computes it op by op). Same operands.
pub fn softcapped_softmax_bf16_portable(
    scores: &Tensor,
    scaling: f32,
    cap: Option<f32>,
    mask: &Tensor,
) -> candle_core::Result<Tensor> {
    let (b, h, l, s) = scores.dims4()?;
    if scores.dtype() != DType::BF16 || mask.dtype() != DType::F32 || mask.dims() != [b, 1, l, s] {
        candle_core::bail!(
            "portable soft-capped softmax: bf16 [B, H, L, S] scores, f32 [B, 1, L, S] mask"
        );
    }
    let src = scores.flatten_all()?.to_vec1::<half::bf16>()?;
    let bias = mask.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![half::bf16::ZERO; src.len()];
    let (mut t, mut p) = (vec![0f32; s], vec![0f32; s]);
    for (i, (d, x)) in out
        .chunks_mut(s.max(1))
        .zip(src.chunks(s.max(1)))
        .enumerate()
    {
        let (bi, li) = (i / (h * l), i % l);
        let m = &bias[(bi * l + li) * s..(bi * l + li + 1) * s];
        portable::softcap_row(x, m, scaling, cap, &mut t);
        portable::softmax_row(&t, &mut p);
        for (d, &v) in d.iter_mut().zip(&p) {
            *d = half::bf16::from_f32(v);
        }
    }
    Tensor::from_vec(out, (b, h, l, s), scores.device())
}

fn avx512() -> bool {
    crate::caps().avx512f
}

#[cfg(target_arch = "x86_64")]
mod avx512;
mod portable;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// `tanh16` against f64's tanh: a few f32 ulps (relative), across the
    /// Taylor/exp switch, tiny, large and special values.
    #[test]
    fn tanh_is_accurate() {
        crate::report_paths("tanh_is_accurate");
        if !crate::simd::has_avx512_bf16() {
            return;
        }
        let mut xs: Vec<f32> = (-4000..=4000).map(|i| i as f32 * 1e-3).collect();
        xs.extend([
            0.3, -0.3, 0.29999998, 1e-30, -1e-30, 0.0, -0.0, 20.0, -20.0, 1e4,
        ]);
        xs.extend([f32::INFINITY, f32::NEG_INFINITY]);
        for chunk in xs.chunks(16) {
            let mut buf = [0f32; 16];
            buf[..chunk.len()].copy_from_slice(chunk);
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512F was detected; 16 lanes in and out.
            let got: [f32; 16] = unsafe {
                use std::arch::x86_64::*;
                std::mem::transmute::<__m512, [f32; 16]>(crate::simd::tanh16(_mm512_loadu_ps(
                    buf.as_ptr(),
                )))
            };
            #[cfg(not(target_arch = "x86_64"))]
            let got = buf;
            for (&x, &g) in chunk.iter().zip(&got) {
                let want = (x as f64).tanh();
                let err = (g as f64 - want).abs() / want.abs().max(f64::MIN_POSITIVE);
                assert!(
                    err <= 4.0 * f32::EPSILON as f64,
                    "tanh({x}) = {g}, want {want}"
                );
            }
        }
        let mut nan = [f32::NAN; 16];
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        unsafe {
            use std::arch::x86_64::*;
            nan = std::mem::transmute::<__m512, [f32; 16]>(crate::simd::tanh16(_mm512_loadu_ps(
                nan.as_ptr(),
            )));
        }
        assert!(nan.iter().all(|v| v.is_nan()));
    }

    /// The fused Gemma-2 chain against the same ops one by one in candle
    /// (bf16 tensors, f32 opmath): equal except a last-bit difference where
    /// the two tanh round to different bf16 values, in few elements.
    #[test]
    fn softcapped_softmax_matches_ops() -> candle_core::Result<()> {
        crate::report_paths("softcapped_softmax_matches_ops");
        let avx = crate::simd::has_avx512_bf16();
        eprintln!("softcapped_softmax_matches_ops: portable rows, AVX512-BF16 rows {avx}");
        let dev = Device::Cpu;
        let (b, h, l, s) = (2usize, 3usize, 7usize, 37usize);
        let scores = (Tensor::randn(0f32, 30., (b, h, l, s), &dev)?).to_dtype(DType::BF16)?;
        // Causal with the dtype's minimum, one padded key in item 1.
        let minv = f32::from_bits(0xFF7F_0000);
        let mut m = vec![0f32; b * l * s];
        for bi in 0..b {
            for q in 0..l {
                for k in 0..s {
                    if k > q + 30 || (bi == 1 && k == 3) {
                        m[(bi * l + q) * s + k] = minv;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(m, (b, 1, l, s), &dev)?;
        let r = |t: Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
        for (scaling, cap) in [(0.0625f32, Some(50f32)), (0.0625, None)] {
            let mut paths = vec![softcapped_softmax_bf16_portable(
                &scores, scaling, cap, &mask,
            )?];
            if avx {
                paths.push(softcapped_softmax_bf16(&scores, scaling, cap, &mask)?.unwrap());
            }
            let mut t = r((scores.to_dtype(DType::F32)? * scaling as f64)?)?;
            if let Some(c) = cap {
                t = r((t / c as f64)?)?;
                t = r(t.tanh()?)?;
                t = r((t * c as f64)?)?;
            }
            let t = r(t.broadcast_add(&mask)?)?;
            let want = softmax_last_dim(&t)?.to_dtype(DType::BF16)?;
            let bits = |t: &Tensor| -> candle_core::Result<Vec<i32>> {
                Ok(t.flatten_all()?
                    .to_vec1::<half::bf16>()?
                    .iter()
                    .map(|v| v.to_bits() as i32)
                    .collect())
            };
            for (path, got) in paths.iter().enumerate() {
                let (g, w) = (bits(got)?, bits(&want)?);
                let off = g.iter().zip(&w).filter(|(a, b)| a != b).count();
                let worst = g
                    .iter()
                    .zip(&w)
                    .map(|(a, b)| (a - b).abs())
                    .max()
                    .unwrap_or(0);
                assert!(
                    worst <= 1 && off * 50 <= g.len(),
                    "path {path} cap {cap:?}: {off} differ, worst {worst}"
                );
            }
        }
        Ok(())
    }

    /// Against an f64 softmax: rows of several lengths (tails), masked keys,
    /// large and tiny values, an all-masked row.
    #[test]
    fn matches_f64() -> candle_core::Result<()> {
        crate::report_paths("matches_f64");
        eprintln!("matches_f64: softmax paths portable, avx512 {}", avx512());
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
            let mut paths = vec![softmax_last_dim_portable(&t)?.to_vec2::<f32>()?];
            if avx512() {
                paths.push(softmax_last_dim(&t)?.to_vec2::<f32>()?);
            }
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
            for (row, g) in paths.iter().flat_map(|got| rows.iter().zip(got)) {
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
