//! The CPU f32 path of the middle block's attention, on the convolution
//! kernel of [`crate::conv::f32`] and without leaving the NCHW layout.
//!
//! Why: candle's path transposes to [tokens, channels], runs the gemm crate
//! and a scalar softmax; at 1024x1024 (16384 tokens) that was 1.5x PyTorch's
//! flash attention.
//!
//! How, for `hs` [c, n] (the normalised input, n = h * w tokens):
//! - `q`, `k`, `v` = 1x1 convolutions of `hs` (a linear layer over channels
//!   is a 1x1 convolution in NCHW), each [c, n];
//! - for a chunk of queries, `S[j, i] = sum_c k[c, j] q[c, i]` is a
//!   convolution whose weights are `k^T` (packed once per call) applied to the
//!   chunk's `q` columns: [n, chunk];
//! - softmax over `j` down each column, `exp((S - max) / sqrt(c))`, the
//!   column sums kept aside;
//! - `O = v P` is a convolution with weights `v` [c, n] applied to `P`
//!   [n, chunk]; dividing `O`'s columns by the sums normalises afterwards;
//! - `to_out` is a 1x1 convolution whose store adds the residual `x`.

use crate::conv::f32::{Geometry, PackedConv, Path};
use crate::norm::group::exp;

/// Queries per chunk: bounds the score block to `n x QUERY_CHUNK` f32.
const QUERY_CHUNK: usize = 1024;
/// Rows whose softmax sums are taken in f32 before moving to f64.
const SUM_BLOCK: usize = 256;

const ONE_BY_ONE: Geometry = Geometry {
    stride: 1,
    pad: (0, 0),
    upsample: 1,
    out: None,
};

/// The four projections packed for the convolution kernel.
#[derive(Debug, Clone)]
pub struct PackedAttention {
    q: PackedConv,
    k: PackedConv,
    v: PackedConv,
    out: PackedConv,
    channels: usize,
}

/// A linear layer's `weight` [out, in] and `bias` [out], row-major.
pub struct LinearWeights {
    /// `[out, in]`, row-major.
    pub weight: Vec<f32>,
    /// `[out]`.
    pub bias: Vec<f32>,
}

impl PackedAttention {
    /// Packs `to_q`, `to_k`, `to_v`, `to_out` ([c, c] weights); `None` when
    /// the kernel is not available or the sizes do not fit.
    pub fn new(
        q: &LinearWeights,
        k: &LinearWeights,
        v: &LinearWeights,
        out: &LinearWeights,
        channels: usize,
    ) -> Option<Self> {
        let pack = |l: &LinearWeights| PackedConv::new(&l.weight, &l.bias, channels, channels, 1);
        Some(Self {
            q: pack(q)?,
            k: pack(k)?,
            v: pack(v)?,
            out: pack(out)?,
            channels,
        })
    }

    /// `x + to_out(attention(hs))` for `hs` (group-normed `x`) and `x`, both
    /// [b, c, n] contiguous f32. `None` when the sizes do not fit or the
    /// f32 convolution kernel does not run here
    /// ([`crate::conv::f32::available`]).
    pub fn forward(&self, hs: &[f32], x: &[f32], b: usize, n: usize) -> Option<Vec<f32>> {
        self.forward_with(hs, x, b, n, Path::best()?)
    }

    /// [`Self::forward`] on the convolution's plain-Rust micro-tile and the
    /// portable column softmax, on every CPU (the reference path the tests
    /// compare everywhere; production uses [`crate::ops::vae_attention_f32`]
    /// to choose).
    pub fn forward_portable(&self, hs: &[f32], x: &[f32], b: usize, n: usize) -> Option<Vec<f32>> {
        self.forward_with(hs, x, b, n, Path::Portable)
    }

    fn forward_with(
        &self,
        hs: &[f32],
        x: &[f32],
        b: usize,
        n: usize,
        path: Path,
    ) -> Option<Vec<f32>> {
        let c = self.channels;
        if n == 0 || hs.len() != b * c * n || x.len() != b * c * n {
            return None;
        }
        let mut y = Vec::with_capacity(b * c * n);
        for (hb, xb) in hs.chunks_exact(c * n).zip(x.chunks_exact(c * n)) {
            let attn = self.attend(hb, n, path)?;
            let (yb, _, _) = self
                .out
                .forward_with(&attn, 1, (1, n), ONE_BY_ONE, Some(xb), path)?;
            y.extend_from_slice(&yb);
        }
        Some(y)
    }

    /// `softmax(q^T k / sqrt(c)) v` for one batch item, as [c, n].
    fn attend(&self, hs: &[f32], n: usize, path: Path) -> Option<Vec<f32>> {
        let c = self.channels;
        let (q, _, _) = self.q.forward_with(hs, 1, (1, n), ONE_BY_ONE, None, path)?;
        let (k, _, _) = self.k.forward_with(hs, 1, (1, n), ONE_BY_ONE, None, path)?;
        let (v, _, _) = self.v.forward_with(hs, 1, (1, n), ONE_BY_ONE, None, path)?;
        let kt = PackedConv::from_transposed(&k, n, c)?;
        drop(k);
        let vp = PackedConv::new(&v, &vec![0.0; c], c, n, 1)?;
        drop(v);
        let scale = 1.0 / (c as f32).sqrt();
        let mut attn = vec![0f32; c * n];
        let mut qc = Vec::with_capacity(c * QUERY_CHUNK.min(n));
        let mut i0 = 0;
        while i0 < n {
            let len = QUERY_CHUNK.min(n - i0);
            qc.clear();
            for row in q.chunks_exact(n) {
                qc.extend_from_slice(&row[i0..i0 + len]);
            }
            let (mut s, _, _) = kt.forward_with(&qc, 1, (1, len), ONE_BY_ONE, None, path)?;
            let inv_sum = softmax_columns(&mut s, len, scale, path);
            let (o, _, _) = vp.forward_with(&s, 1, (1, len), ONE_BY_ONE, None, path)?;
            for (dst, src) in attn.chunks_exact_mut(n).zip(o.chunks_exact(len)) {
                for ((d, &v), &r) in dst[i0..i0 + len].iter_mut().zip(src).zip(&inv_sum) {
                    *d = v * r;
                }
            }
            i0 += len;
        }
        Some(attn)
    }
}

/// Turns each column of `s` ([rows, len]) into `exp((s - max) * scale)` and
/// returns `1 / sum` per column (sums of `SUM_BLOCK` rows in f32, then f64).
fn softmax_columns(s: &mut [f32], len: usize, scale: f32, path: Path) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if path != Path::Portable {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { avx2::softmax_columns_avx2(s, len, scale) };
    }
    softmax_columns_generic(s, len, scale)
}

#[inline(always)]
fn softmax_columns_generic(s: &mut [f32], len: usize, scale: f32) -> Vec<f32> {
    let mut max = vec![f32::NEG_INFINITY; len];
    for row in s.chunks_exact(len) {
        for (m, &v) in max.iter_mut().zip(row) {
            *m = m.max(v);
        }
    }
    let mut total = vec![0f64; len];
    let mut part = vec![0f32; len];
    for block in s.chunks_mut(SUM_BLOCK * len) {
        part.fill(0.0);
        for row in block.chunks_exact_mut(len) {
            for ((v, &m), p) in row.iter_mut().zip(&max).zip(part.iter_mut()) {
                let e = exp((*v - m) * scale);
                *v = e;
                *p += e;
            }
        }
        for (t, &p) in total.iter_mut().zip(&part) {
            *t += p as f64;
        }
    }
    total.iter().map(|&t| (1.0 / t) as f32).collect()
}

#[cfg(target_arch = "x86_64")]
mod avx2;

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a direct f64 computation of `x + W_o softmax(..) v + b_o`.
    #[test]
    fn matches_f64_reference() {
        crate::report_paths("matches_f64_reference");
        let mut paths = vec![Path::Portable];
        paths.extend(Path::best());
        eprintln!("vae attention matches_f64_reference: paths {paths:?}");
        let (c, n) = (8, 37);
        let lin = |seed: usize| LinearWeights {
            weight: (0..c * c)
                .map(|i| (((i + seed) * 7919 % 97) as f32 / 97.0 - 0.5) * 0.6)
                .collect(),
            bias: (0..c)
                .map(|i| ((i + seed) % 5) as f32 * 0.1 - 0.2)
                .collect(),
        };
        let (wq, wk, wv, wo) = (lin(1), lin(2), lin(3), lin(4));
        let hs: Vec<f32> = (0..c * n)
            .map(|i| ((i * 31 % 53) as f32 / 53.0 - 0.5) * 3.0)
            .collect();
        let x: Vec<f32> = (0..c * n).map(|i| (i % 11) as f32 * 0.1).collect();
        let att = PackedAttention::new(&wq, &wk, &wv, &wo, c).expect("sizes fit");
        let proj = |l: &LinearWeights, inp: &[f32]| -> Vec<f64> {
            let mut o = vec![0f64; c * n];
            for co in 0..c {
                for p in 0..n {
                    o[co * n + p] = l.bias[co] as f64
                        + (0..c)
                            .map(|ci| l.weight[co * c + ci] as f64 * inp[ci * n + p] as f64)
                            .sum::<f64>();
                }
            }
            o
        };
        let (q, k, v) = (proj(&wq, &hs), proj(&wk, &hs), proj(&wv, &hs));
        let mut a = vec![0f32; c * n];
        for i in 0..n {
            let s: Vec<f64> = (0..n)
                .map(|j| {
                    (0..c).map(|ch| q[ch * n + i] * k[ch * n + j]).sum::<f64>() / (c as f64).sqrt()
                })
                .collect();
            let m = s.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for ch in 0..c {
                a[ch * n + i] = ((0..n).map(|j| v[ch * n + j] * e[j]).sum::<f64>() / z) as f32;
            }
        }
        let o = proj(&wo, &a);
        for path in paths {
            let got = att.forward_with(&hs, &x, 1, n, path).expect("runs");
            for (idx, (&g, &w)) in got.iter().zip(&o).enumerate() {
                let want = w + x[idx] as f64;
                let d = (g as f64 - want).abs();
                assert!(d <= 1e-5 + 1e-5 * want.abs(), "{path:?}: {d} at {idx}");
            }
        }
    }
}
