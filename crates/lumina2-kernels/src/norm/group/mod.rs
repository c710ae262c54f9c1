//! The CPU fast path of group norm followed by an activation: one task per
//! (batch item, group), two passes over the group's contiguous NCHW slice
//! (statistics, then normalise + affine + activation), instead of a dozen
//! candle ops each writing a tensor.
//!
//! Numerics: per block of 4096 values, the mean and the centred sum of
//! squares in f32; blocks merged in f64 (no `E[x^2] - E[x]^2` cancellation). SiLU uses a
//! vectorisable `exp` accurate to a few ulp (PyTorch's CPU kernel uses SLEEF's).

use rayon::prelude::*;

/// Activation fused into the normalisation pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FusedAct {
    /// No activation.
    None,
    /// `x * sigmoid(x)`.
    Silu,
    /// `max(x, 0)`.
    Relu,
}

/// Sizes of one group norm over a [b, c, hw] tensor.
#[derive(Debug, Clone, Copy)]
pub struct NormShape {
    /// Batch items `b`.
    pub batch: usize,
    /// Channels `c`, a multiple of `groups`.
    pub channels: usize,
    /// Pixels per channel `hw`.
    pub hw: usize,
    /// Groups the channels are split into.
    pub groups: usize,
}

/// An element the norm reads or writes: f32, or bf16 (widened exactly on
/// load, rounded to nearest even on store, as PyTorch stores a bf16 result).
pub trait Elem: Copy + Send + Sync {
    /// Zero.
    const ZERO: Self;
    /// The value as f32 (exact).
    fn get(self) -> f32;
    /// `v` stored in this type (rounded to nearest even for bf16).
    fn put(v: f32) -> Self;
}

impl Elem for f32 {
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn get(self) -> f32 {
        self
    }
    #[inline(always)]
    fn put(v: f32) -> Self {
        v
    }
}

impl Elem for half::bf16 {
    const ZERO: Self = half::bf16::ZERO;
    #[inline(always)]
    fn get(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
    #[inline(always)]
    fn put(v: f32) -> Self {
        half::bf16::from_bits((round_bf16(v).to_bits() >> 16) as u16)
    }
}

/// Values whose statistics are taken in f32 before merging in f64 (16 KiB: L1).
const BLOCK: usize = 4096;

/// `act(round(norm(x) * weight + bias))` for contiguous NCHW `x`; `round`
/// rounds the norm's output to the model dtype (identity for f32), as
/// PyTorch stores it before the activation reads it. `None` when the sizes
/// do not fit (the caller falls back to candle).
pub fn group_norm_act<I: Elem, O: Elem, R>(
    x: &[I],
    s: NormShape,
    eps: f64,
    weight: &[f32],
    bias: &[f32],
    act: FusedAct,
    round: R,
) -> Option<Vec<O>>
where
    R: Fn(f32) -> f32 + Sync,
{
    let simd = crate::conv::f32::available();
    group_norm_act_with(x, s, (eps, weight, bias), act, round, simd)
}

/// [`group_norm_act`] with its loops built for AVX2/FMA (`simd`, only where
/// [`crate::caps`] allows it) or portable.
fn group_norm_act_with<I: Elem, O: Elem, R>(
    x: &[I],
    s: NormShape,
    (eps, weight, bias): (f64, &[f32], &[f32]),
    act: FusedAct,
    round: R,
    simd: bool,
) -> Option<Vec<O>>
where
    R: Fn(f32) -> f32 + Sync,
{
    let NormShape {
        batch,
        channels,
        hw,
        groups,
    } = s;
    if groups == 0
        || channels % groups != 0
        || x.len() != batch * channels * hw
        || weight.len() != channels
        || bias.len() != channels
        || x.is_empty()
    {
        return None;
    }
    let cg = channels / groups;
    let len = cg * hw;
    let mut out = vec![O::ZERO; x.len()];
    x.par_chunks(len)
        .zip(out.par_chunks_mut(len))
        .enumerate()
        .for_each(|(i, (xs, os))| {
            let (mean, var) = moments(xs, simd);
            let rstd = 1.0 / (var + eps).sqrt();
            let c0 = (i % groups) * cg;
            for (c, (xr, or)) in xs.chunks(hw).zip(os.chunks_mut(hw)).enumerate() {
                let scale = (rstd * weight[c0 + c] as f64) as f32;
                let shift = (bias[c0 + c] as f64 - mean * rstd * weight[c0 + c] as f64) as f32;
                apply(xr, or, scale, shift, act, &round, simd);
            }
        });
    Some(out)
}

/// Mean and (biased) variance of `xs`, reading memory once: each block of
/// `BLOCK` values gets its own mean and centred sum of squares in f32 (the
/// second pass over the block hits the L1 cache), and the blocks are merged
/// in f64 (Chan et al.'s pairwise update).
fn moments<I: Elem>(xs: &[I], simd: bool) -> (f64, f64) {
    let (mut n, mut mean, mut m2) = (0f64, 0f64, 0f64);
    for b in xs.chunks(BLOCK) {
        let nb = b.len() as f64;
        let mb = dispatch_sum(b, None, simd) as f64 / nb;
        let m2b = dispatch_sum(b, Some(mb as f32), simd) as f64;
        let tot = n + nb;
        let d = mb - mean;
        mean += d * nb / tot;
        m2 += m2b + d * d * n * nb / tot;
        n = tot;
    }
    (mean, m2 / n.max(1.0))
}

/// Sum of `b` (or of `(b - m)^2` with `Some(m)`) in 16 f32 lanes.
fn dispatch_sum<I: Elem>(b: &[I], centre: Option<f32>, simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { avx2::sum_avx2(b, centre) };
    }
    sum_lanes(b, centre)
}

#[inline(always)]
fn sum_lanes<I: Elem>(b: &[I], centre: Option<f32>) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = b.chunks_exact(16);
    let tail = chunks.remainder();
    let mut t = 0f32;
    match centre {
        None => {
            for ch in chunks {
                for (a, &v) in acc.iter_mut().zip(ch) {
                    *a += v.get();
                }
            }
            for &v in tail {
                t += v.get();
            }
        }
        Some(m) => {
            for ch in chunks {
                for (a, &v) in acc.iter_mut().zip(ch) {
                    let d = v.get() - m;
                    *a += d * d;
                }
            }
            for &v in tail {
                t += (v.get() - m) * (v.get() - m);
            }
        }
    }
    acc.iter().sum::<f32>() + t
}

fn apply<I: Elem, O: Elem, R: Fn(f32) -> f32>(
    x: &[I],
    o: &mut [O],
    scale: f32,
    shift: f32,
    act: FusedAct,
    round: &R,
    simd: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { avx2::apply_avx2(x, o, scale, shift, act, round) };
    }
    apply_generic(x, o, scale, shift, act, round)
}

#[inline(always)]
fn apply_generic<I: Elem, O: Elem, R: Fn(f32) -> f32>(
    x: &[I],
    o: &mut [O],
    scale: f32,
    shift: f32,
    act: FusedAct,
    round: &R,
) {
    let it = o.iter_mut().zip(x);
    match act {
        FusedAct::None => it.for_each(|(o, &v)| *o = O::put(round(v.get() * scale + shift))),
        FusedAct::Relu => {
            it.for_each(|(o, &v)| *o = O::put(round(v.get() * scale + shift).max(0.0)))
        }
        FusedAct::Silu => it.for_each(|(o, &v)| *o = O::put(silu(round(v.get() * scale + shift)))),
    }
}

/// `x` rounded to bf16 (nearest even) and widened back, NaN kept NaN: what
/// `half::bf16::from_f32(x).to_f32()` gives, written without branches so
/// that the normalisation loop vectorises (through `half` it ran per value).
#[inline(always)]
pub fn round_bf16(x: f32) -> f32 {
    let b = x.to_bits();
    let r = f32::from_bits(b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000);
    if x.is_nan() {
        x
    } else {
        r
    }
}

/// `x / (1 + exp(-x))`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `e^x` for f32, branch-free so that loops over it vectorise: `x = n ln2 + r`
/// with |r| <= ln2 / 2, a degree-7 polynomial for `e^r` (Cephes' `expf`
/// coefficients), `2^n` built in the exponent bits. Inputs are clamped to the
/// range whose result is a normal float (below it the result is ~0, above inf
/// is not needed by SiLU).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    // t = ROUND + n exactly, so n also sits in t's low mantissa bits: integer
    // arithmetic builds 2^n without a float-to-int conversion (which would not
    // vectorise).
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    let bits = (t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127)) << 23;
    er * f32::from_bits(bits)
}

#[cfg(target_arch = "x86_64")]
mod avx2;

#[cfg(test)]
mod tests {
    /// The branch-free rounding is `half`'s, special values included.
    #[test]
    fn round_bf16_is_half() {
        crate::report_paths("round_bf16_is_half");
        let mut v: Vec<f32> = (0..200_000u32)
            .map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761)))
            .collect();
        v.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN,
            1e-40,
        ]);
        for x in v {
            let want = half::bf16::from_f32(x).to_f32();
            let got = super::round_bf16(x);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{x:e}: {got:e} vs {want:e}"
            );
        }
    }

    use super::*;

    /// The vectorisable `exp` against the standard library's over SiLU's range.
    #[test]
    fn exp_is_within_a_few_ulp() {
        crate::report_paths("exp_is_within_a_few_ulp");
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x), x.exp());
            worst = worst.max((got - want).abs() / want);
            x += 0.0137;
        }
        assert!(worst < 4.0 * f32::EPSILON, "relative error {worst}");
        // PyTorch gives -0 here (exp overflows to inf); ours is as negligible.
        assert!(silu(-1000.0).abs() < 1e-30);
        assert_eq!(silu(1000.0), 1000.0);
    }

    /// Group norm + SiLU against a direct f64 computation.
    #[test]
    fn group_norm_silu_matches_f64_reference() {
        crate::report_paths("group_norm_silu_matches_f64_reference");
        let (b, c, hw, g) = (2, 6, 37, 3);
        let x: Vec<f32> = (0..b * c * hw)
            .map(|i| ((i * 7919 % 1000) as f32 / 100.0 - 5.0) * (1.0 + (i % 3) as f32))
            .collect();
        let w: Vec<f32> = (0..c).map(|i| 0.5 + i as f32 * 0.1).collect();
        let bi: Vec<f32> = (0..c).map(|i| i as f32 * 0.05 - 0.1).collect();
        let shape = NormShape {
            batch: b,
            channels: c,
            hw,
            groups: g,
        };
        let mut paths = vec![false];
        if crate::conv::f32::available() {
            paths.push(true);
        }
        eprintln!("group_norm_silu_matches_f64_reference: avx2 builds {paths:?}");
        for simd in paths {
            let got = group_norm_act_with(&x, shape, (1e-6, &w, &bi), FusedAct::Silu, |v| v, simd);
            let got: Vec<f32> = got.unwrap_or_default();
            assert_eq!(got.len(), x.len());
            let len = c / g * hw;
            for (gi, xs) in x.chunks(len).enumerate() {
                let mean = xs.iter().map(|&v| v as f64).sum::<f64>() / len as f64;
                let var = xs.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / len as f64;
                for (i, &v) in xs.iter().enumerate() {
                    let ch = (gi % g) * (c / g) + i / hw;
                    let y = (v as f64 - mean) / (var + 1e-6).sqrt() * w[ch] as f64 + bi[ch] as f64;
                    let want = y / (1.0 + (-y).exp());
                    let d = (got[gi * len + i] as f64 - want).abs();
                    assert!(
                        d <= 1e-5 + 1e-5 * want.abs(),
                        "avx2 {simd}: {d} at {gi}/{i}"
                    );
                }
            }
        }
    }
}
