//! Fused f32 attention on AVX-512 ("flash attention" in f32): for a block of
//! 32 queries, the scores against 48 keys at a time are made in registers,
//! turned into probabilities with the running maximum and sum of the online
//! softmax, and multiplied into the output, which stays in L1; the
//! `[heads, S, S]` score matrix never exists.
//!
//! Why: unfused, the f32 attention ran candle's batched matmul with a
//! 96-deep product (about 90 GFLOP/s, every call repacking its operands),
//! then a softmax pass over the whole score block in memory (157 MB a layer
//! at 1280 tokens), then the weighted sum: 0.22 s a layer, where PyTorch's
//! fused CPU kernel takes about 0.1 s.
//!
//! How: everything is computed transposed, so that the 32 queries of a
//! block are the 32 lanes of two registers and every per-query quantity
//! (maximum, sum, rescaling) is a vertical operation:
//! - `S^T = K Q^T`: a 12x32 register tile (12 keys x 32 queries) over the
//!   head size, the keys packed once per key head as `[d][12]` panels, the
//!   scaled queries of the block as `[d][32]`;
//! - the key bias added per key row, the running maximum per lane, `exp`;
//! - `O^T += V^T P^T`: 12 value dimensions x 32 queries over the 48 keys,
//!   the values packed once per key head as `[keys][12]` panels.
//!
//! The arithmetic is PyTorch's f32 flash attention (`q k^T` summed in f32,
//! scaled, masked, `exp(s - running max)`, the output divided by the running
//! sum at the end), with the scale folded into the queries and other block
//! sizes: results differ in the last bits. Tested with the bf16 kernel, in
//! [`crate::attention::flash`], against the same f64 attention.

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::cpu::{Aligned, CpuView};

/// Rows of a register tile: keys of a score tile, value dimensions of an
/// output tile.
const MR: usize = 12;
/// Queries per block: the 32 lanes of a tile's two registers.
const QB: usize = 32;
/// Key panels (of [`MR`] keys) per online-softmax step.
const KP: usize = 4;

/// Whether [`attention_f32`] runs here: AVX-512F and FMA.
fn available() -> bool {
    crate::caps().avx512f_fma
}

/// Softmax attention of f32 `q` `[B, H, S_q, d]` over `k`, `v` `[B, KV,
/// S_kv, d]` (`H` a multiple of `KV`: query head `i` reads key head
/// `i / (H / KV)`), with `scale` applied to `q k^T` and an optional f32
/// `key_bias` `[B, S_kv]` added to the scores (0 or `-inf` for a key mask).
/// Returns the f32 `[B, H, S_q, d]` output, or `None` on CPUs without
/// AVX-512 (or tensors not on the CPU).
///
/// A row whose keys are all masked gives NaN, as PyTorch's.
pub fn attention_f32(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_bias: Option<&Tensor>,
    scale: f32,
) -> candle_core::Result<Option<Tensor>> {
    if !available() || !q.device().is_cpu() {
        return Ok(None);
    }
    let (
        crate::attention::flash::Operands {
            b,
            h,
            s_q,
            d,
            kv,
            s_kv,
        },
        bias,
    ) = crate::attention::flash::operands(q, k, v, key_bias, DType::F32)?;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let views = (CpuView::of(&q), CpuView::of(&k), CpuView::of(&v));
    let (Some(qs), Some(ks), Some(vs)) = (
        views.0.as_ref().and_then(|t| t.slice::<f32>()),
        views.1.as_ref().and_then(|t| t.slice::<f32>()),
        views.2.as_ref().and_then(|t| t.slice::<f32>()),
    ) else {
        return Ok(None);
    };
    let shape = Shape {
        d,
        s_kv,
        kpanels: s_kv.div_ceil(MR),
        dpanels: d.div_ceil(MR),
    };
    // Per (batch item, key head): keys as [d][12] panels, values as
    // [keys][12] panels of 12 dimensions; zeros past the ends.
    let packed: Vec<(Aligned<f32>, Aligned<f32>)> = (0..b * kv)
        .into_par_iter()
        .map(|item| {
            let range = item * s_kv * d..(item + 1) * s_kv * d;
            (
                shape.pack_keys(&ks[range.clone()]),
                shape.pack_values(&vs[range]),
            )
        })
        .collect();
    let rep = h / kv;
    let blocks = s_q.div_ceil(QB);
    let mut out = vec![0f32; b * h * s_q * d];
    let dst = OutPtr(out.as_mut_ptr());
    let dst = &dst;
    (0..b * h * blocks).into_par_iter().for_each_init(
        || Scratch::new(&shape),
        |scratch, t| {
            let (head, blk) = (t / blocks, t % blocks);
            let (bi, hi) = (head / h, head % h);
            let (keys, values) = &packed[bi * kv + hi / rep];
            let r0 = blk * QB;
            let n = QB.min(s_q - r0);
            let first = (head * s_q + r0) * d;
            let bias = bias.as_ref().map(|v| &v[bi * s_kv..(bi + 1) * s_kv]);
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512F/FMA were checked; the packed operands and the
            // scratch have the sizes of `shape`; tasks write disjoint rows.
            unsafe {
                let o = std::slice::from_raw_parts_mut(dst.0.add(first), n * d);
                x86::block(
                    &qs[first..first + n * d],
                    n,
                    &shape,
                    keys,
                    values,
                    bias,
                    scale,
                    scratch,
                    o,
                );
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (keys, values, n, first, bias, scratch, dst);
        },
    );
    drop(views);
    Ok(Some(Tensor::from_vec(out, (b, h, s_q, d), q.device())?))
}

/// The output, shared by tasks that write disjoint rows.
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint rows (see `attention_f32`).
unsafe impl Sync for OutPtr {}

/// Sizes shared by the packing and the kernel.
struct Shape {
    d: usize,
    s_kv: usize,
    /// Key panels of [`MR`] keys.
    kpanels: usize,
    /// Value panels of [`MR`] dimensions.
    dpanels: usize,
}

impl Shape {
    /// `[kpanels][d][12]`: key `12 p + r`, dimension `c` at `(p d + c) 12 + r`.
    fn pack_keys(&self, k: &[f32]) -> Aligned<f32> {
        let mut a = Aligned::<f32>::zeroed(self.kpanels * self.d * MR);
        for (key, row) in k.chunks_exact(self.d).enumerate() {
            let (p, r) = (key / MR, key % MR);
            for (c, &x) in row.iter().enumerate() {
                a[(p * self.d + c) * MR + r] = x;
            }
        }
        a
    }

    /// `[dpanels][kpanels * 12][12]`: key `j`, dimension `12 p + r` at
    /// `(p S + j) 12 + r` with `S = kpanels * 12`.
    fn pack_values(&self, v: &[f32]) -> Aligned<f32> {
        let s = self.kpanels * MR;
        let mut a = Aligned::<f32>::zeroed(self.dpanels * s * MR);
        for (key, row) in v.chunks_exact(self.d).enumerate() {
            for (c, &x) in row.iter().enumerate() {
                a[((c / MR) * s + key) * MR + c % MR] = x;
            }
        }
        a
    }
}

/// Per-task buffers: the scaled queries transposed, the scores or
/// probabilities of one step (transposed), the output transposed.
struct Scratch {
    qt: Aligned<f32>,
    p: Aligned<f32>,
    ot: Aligned<f32>,
}

impl Scratch {
    fn new(s: &Shape) -> Self {
        Self {
            qt: Aligned::zeroed(s.d * QB),
            p: Aligned::zeroed(KP * MR * QB),
            ot: Aligned::zeroed(s.dpanels * MR * QB),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Scratch, Shape, KP, MR, QB};
    use crate::simd::exp16;

    /// `sum_k A[k][r] B[k][0..32]` for the 12 rows `r`: `A` `[n][12]`, `B`
    /// `[n][32]`.
    ///
    /// # Safety
    /// AVX-512F/FMA are available; `a` and `b` cover `n` rows.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn tile(n: usize, a: *const f32, b: *const f32) -> [[__m512; 2]; MR] {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        unsafe {
            for kk in 0..n {
                let b0 = _mm512_loadu_ps(b.add(kk * QB));
                let b1 = _mm512_loadu_ps(b.add(kk * QB + 16));
                let ar = a.add(kk * MR);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*ar.add(r));
                    acc[0] = _mm512_fmadd_ps(x, b0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(x, b1, acc[1]);
                }
            }
        }
        acc
    }

    /// One block of `n <= 32` queries (`q`: `n` rows of `d`) against all
    /// keys, written to `out` (`n` rows of `d`).
    ///
    /// # Safety
    /// AVX-512F/FMA are available; `keys`, `values` and `s` are packed for
    /// `shape`; `bias` (if any) has `s_kv` values.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn block(
        q: &[f32],
        n: usize,
        shape: &Shape,
        keys: &[f32],
        values: &[f32],
        bias: Option<&[f32]>,
        scale: f32,
        s: &mut Scratch,
        out: &mut [f32],
    ) {
        let Shape {
            d,
            s_kv,
            kpanels,
            dpanels,
        } = *shape;
        let s_pad = kpanels * MR;
        // Q^T, scaled; lanes past n zero.
        s.qt.fill(0.0);
        for (j, row) in q.chunks_exact(d).enumerate().take(n) {
            for (c, &x) in row.iter().enumerate() {
                s.qt[c * QB + j] = x * scale;
            }
        }
        s.ot.fill(0.0);
        let neg = _mm512_set1_ps(f32::NEG_INFINITY);
        let (mut m, mut l) = ([neg; 2], [_mm512_setzero_ps(); 2]);
        unsafe {
            let mut kp = 0;
            while kp < kpanels {
                let np = KP.min(kpanels - kp);
                let rows = np * MR;
                // Scores, transposed: row = key, lanes = queries.
                for i in 0..np {
                    let acc = tile(d, keys.as_ptr().add((kp + i) * d * MR), s.qt.as_ptr());
                    for (r, acc) in acc.iter().enumerate() {
                        let key = (kp + i) * MR + r;
                        let add = match key < s_kv {
                            true => bias.map_or(0.0, |b| b[key]),
                            false => f32::NEG_INFINITY,
                        };
                        let row = s.p.as_mut_ptr().add((i * MR + r) * QB);
                        let add = _mm512_set1_ps(add);
                        _mm512_storeu_ps(row, _mm512_add_ps(acc[0], add));
                        _mm512_storeu_ps(row.add(16), _mm512_add_ps(acc[1], add));
                    }
                }
                // The running maximum per query, the rescaling of what was
                // summed so far, the probabilities and their sum.
                let mut mx = m;
                for r in 0..rows {
                    let row = s.p.as_ptr().add(r * QB);
                    mx[0] = _mm512_max_ps(mx[0], _mm512_loadu_ps(row));
                    mx[1] = _mm512_max_ps(mx[1], _mm512_loadu_ps(row.add(16)));
                }
                let corr = [
                    exp16(_mm512_sub_ps(m[0], mx[0])),
                    exp16(_mm512_sub_ps(m[1], mx[1])),
                ];
                for h in 0..2 {
                    l[h] = _mm512_mul_ps(l[h], corr[h]);
                }
                for r in 0..dpanels * MR {
                    let row = s.ot.as_mut_ptr().add(r * QB);
                    _mm512_storeu_ps(row, _mm512_mul_ps(_mm512_loadu_ps(row), corr[0]));
                    let hi = row.add(16);
                    _mm512_storeu_ps(hi, _mm512_mul_ps(_mm512_loadu_ps(hi), corr[1]));
                }
                for r in 0..rows {
                    let row = s.p.as_mut_ptr().add(r * QB);
                    for h in 0..2 {
                        let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(row.add(16 * h)), mx[h]));
                        _mm512_storeu_ps(row.add(16 * h), e);
                        l[h] = _mm512_add_ps(l[h], e);
                    }
                }
                m = mx;
                // O^T += V^T P^T over this step's keys.
                for p in 0..dpanels {
                    let a = values.as_ptr().add((p * s_pad + kp * MR) * MR);
                    let acc = tile(rows, a, s.p.as_ptr());
                    for (r, acc) in acc.iter().enumerate() {
                        let row = s.ot.as_mut_ptr().add((p * MR + r) * QB);
                        _mm512_storeu_ps(row, _mm512_add_ps(_mm512_loadu_ps(row), acc[0]));
                        let hi = row.add(16);
                        _mm512_storeu_ps(hi, _mm512_add_ps(_mm512_loadu_ps(hi), acc[1]));
                    }
                }
                kp += np;
            }
            // Divide by the sums, transpose back.
            let mut sum = [0f32; QB];
            _mm512_storeu_ps(sum.as_mut_ptr(), l[0]);
            _mm512_storeu_ps(sum.as_mut_ptr().add(16), l[1]);
            for (j, row) in out.chunks_exact_mut(d).enumerate().take(n) {
                for (c, o) in row.iter_mut().enumerate() {
                    *o = s.ot[c * QB + j] / sum[j];
                }
            }
        }
    }
}
