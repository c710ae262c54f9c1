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
                avx512::block(
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
mod avx512;
