//! Fused bf16 attention on AMX tiles ("flash attention"): the scores of a
//! block of 32 queries against 512 keys are made, turned into
//! probabilities and multiplied into the output without leaving the core's
//! caches, with the running maximum and sum of the online softmax.
//!
//! The arithmetic is PyTorch's CPU flash attention for bf16 inputs
//! (`aten/src/ATen/native/cpu/FlashAttentionKernel.cpp`): `q k^T` summed in
//! f32, scaled and masked in f32, `exp(s - running max)` in f32 and rounded
//! to bf16 for the product with `v` (summed in f32), the running sum kept in
//! f32 from the unrounded values, the output divided by it at the end and
//! rounded once. Key blocks of 512, as PyTorch's, so the running maximum
//! is taken over the same keys (blocks of 128 made the kernel about 12%
//! slower at Z-Image's sizes: more rescaling of the output, more row
//! reductions);
//! PyTorch's query blocks are larger for long sequences, which does not
//! change the values.
//!
//! [`attention_bf16`] returns `None` where AMX is not usable; callers keep
//! their unfused path for those CPUs.

use candle_core::{DType, Device, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::cpu::{Aligned, CpuView};
use crate::gemm::packed::PackedBf16;

pub use crate::attention::flash_f32::attention_f32;

/// The sizes of an attention call.
pub(crate) struct Operands {
    pub(crate) b: usize,
    pub(crate) h: usize,
    pub(crate) s_q: usize,
    pub(crate) d: usize,
    pub(crate) kv: usize,
    pub(crate) s_kv: usize,
}

/// Checks `q` `[B, H, S_q, d]`, `k`, `v` `[B, KV, S_kv, d]` (all of
/// `dtype`, `H` a multiple of `KV`, `d > 0`) and the optional key bias
/// (`B * S_kv` values), which it returns as f32.
pub(crate) fn operands(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_bias: Option<&Tensor>,
    dtype: DType,
) -> candle_core::Result<(Operands, Option<Vec<f32>>)> {
    let (b, h, s_q, d) = q.dims4()?;
    let (bk, kv, s_kv, dk) = k.dims4()?;
    if bk != b || dk != d || v.dims() != k.dims() || kv == 0 || h % kv != 0 || d == 0 {
        candle_core::bail!(
            "flash attention: q {:?}, k {:?}, v {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if q.dtype() != dtype || k.dtype() != dtype || v.dtype() != dtype {
        candle_core::bail!("flash attention: q, k and v must be {dtype:?}");
    }
    let bias = match key_bias {
        Some(t) => {
            if t.elem_count() != b * s_kv {
                candle_core::bail!(
                    "flash attention: key bias {:?}, expected [{b}, {s_kv}]",
                    t.dims()
                );
            }
            Some(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        }
        None => None,
    };
    Ok((
        Operands {
            b,
            h,
            s_q,
            d,
            kv,
            s_kv,
        },
        bias,
    ))
}

/// Queries per block (two AMX row tiles).
const QB: usize = 32;
/// Keys per online-softmax step (four 32-key tiles).
const KB: usize = 512;
/// 32-key tiles per step.
const KSUB: usize = KB / 32;
/// Row stride of the score block, in f32: `KB` plus a cache line, so that
/// the 16 rows a tile store writes do not share a few L1 sets (2 KiB apart).
const SROW: usize = KB + 16;

/// Softmax attention of bf16 `q` `[B, H, S_q, d]` over `k`, `v` `[B, KV,
/// S_kv, d]` (`H` a multiple of `KV`: query head `i` reads key head
/// `i / (H / KV)`), with `scale` applied to `q k^T` and an optional f32
/// `key_bias` `[B, S_kv]` added to the scores (0 or `-inf` for a key mask).
/// Returns the bf16 `[B, H, S_q, d]` output, or `None` when the CPU (or the
/// OS) does not allow AMX, or `LUMINA2_NO_AMX=1` / the packed kernel is off.
///
/// A row whose keys are all masked gives NaN, as PyTorch's.
pub fn attention_bf16(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_bias: Option<&Tensor>,
    scale: f32,
) -> candle_core::Result<Option<Tensor>> {
    if !crate::gemm::packed::available() || !crate::gemm::packed::use_amx() || !q.device().is_cpu()
    {
        return Ok(None);
    }
    let (
        Operands {
            b,
            h,
            s_q,
            d,
            kv,
            s_kv,
        },
        bias,
    ) = operands(q, k, v, key_bias, DType::BF16)?;
    let rep = h / kv;
    let q = q.contiguous()?;
    let view = CpuView::of(&q);
    let Some(qs) = view.as_ref().and_then(|v| v.slice::<bf16>()) else {
        return Ok(None);
    };
    // Keys as panels of 32 keys (pairs over d); values transposed, as panels
    // of 32 output columns (pairs over keys): the B operands of the two
    // products. Packed from the contiguous `[B, KV, S_kv, d]` rows, all
    // heads in parallel (the values' transpose through candle's strided
    // copy, one head after another, took as long as the products at
    // Z-Image's 30 heads).
    let (k, v) = (k.contiguous()?, v.contiguous()?);
    let (kview, vview) = (CpuView::of(&k), CpuView::of(&v));
    let (Some(ks), Some(vs)) = (
        kview.as_ref().and_then(|v| v.slice::<bf16>()),
        vview.as_ref().and_then(|v| v.slice::<bf16>()),
    ) else {
        return Ok(None);
    };
    let head = s_kv * d;
    let packed: Vec<(PackedBf16, PackedBf16)> = (0..b * kv)
        .into_par_iter()
        .map(|item| {
            let (kh, vh) = (
                &ks[item * head..(item + 1) * head],
                &vs[item * head..(item + 1) * head],
            );
            let keys = PackedBf16::from_rows(s_kv, d, |n, k0, out| {
                out.copy_from_slice(bytemuck::cast_slice(&kh[n * d + k0..][..out.len()]));
            });
            let values = PackedBf16::from_rows(d, s_kv, |c, j0, out| {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = vh[(j0 + i) * d + c].to_bits();
                }
            });
            (keys, values)
        })
        .collect();
    let mut out = vec![bf16::ZERO; b * h * s_q * d];
    let rows = rep * s_q; // the query heads of one key head, stacked
    let blocks = rows.div_ceil(QB);
    let dst = OutPtr(out.as_mut_ptr().cast());
    (0..b * kv * blocks).into_par_iter().for_each_init(
        || Scratch::new(d),
        |scratch, t| {
            let (item, blk) = (t / blocks, t % blocks);
            let (bi, g) = (item / kv, item % kv);
            let (keys, values) = &packed[item];
            // Query rows of head `g * rep + r / s_q`, position `r % s_q`:
            // contiguous in `q` and in the output.
            let first = (bi * h + g * rep) * s_q;
            let r0 = blk * QB;
            let n = QB.min(rows - r0);
            let bias = bias.as_ref().map(|v| &v[bi * s_kv..(bi + 1) * s_kv]);
            let qrows = &qs[(first + r0) * d..(first + r0 + n) * d];
            // SAFETY: AMX and AVX-512 are usable (checked above); the packed
            // operands and scratch buffers have the sizes `block` expects;
            // tasks write disjoint rows of `out`.
            unsafe {
                amx::block(
                    qrows,
                    n,
                    d,
                    keys,
                    values,
                    s_kv,
                    bias,
                    scale,
                    scratch,
                    dst.at((first + r0) * d),
                )
            };
        },
    );
    drop((view, kview, vview));
    Ok(Some(Tensor::from_vec(out, (b, h, s_q, d), &Device::Cpu)?))
}

/// The output, written by tasks at disjoint rows.
#[derive(Clone, Copy)]
struct OutPtr(*mut u16);
// SAFETY: only used for disjoint writes inside one `attention_bf16` call.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The element `n` places further (a method, so that closures capture
    /// the whole `Send` wrapper rather than its raw pointer).
    ///
    /// # Safety
    /// `n` stays inside the output.
    unsafe fn at(self, n: usize) -> *mut u16 {
        unsafe { self.0.add(n) }
    }
}

/// One task's working memory (reused across the tasks of a thread).
struct Scratch {
    /// Queries as AMX A tiles: (row tile `t`, step `s`) at `(t * steps + s) * 512`.
    q: Aligned<bf16>,
    /// Scores of the current key block, `QB x KB` f32.
    s: Aligned<f32>,
    /// Probabilities as A tiles: (row tile `t`, 32-key step `j`) at `(t * KSUB + j) * 512`.
    p: Aligned<bf16>,
    /// Output sums, `QB x dp` f32 (`dp`: d padded to 32).
    o: Aligned<f32>,
    m: [f32; QB],
    l: [f32; QB],
}

impl Scratch {
    fn new(d: usize) -> Self {
        let steps = d.div_ceil(32);
        Self {
            q: Aligned::zeroed(2 * steps * 512),
            s: Aligned::zeroed(QB * SROW),
            p: Aligned::zeroed(2 * KSUB * 512),
            o: Aligned::zeroed(QB * steps * 32),
            m: [0.0; QB],
            l: [0.0; QB],
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod amx;
mod portable;

pub use portable::attention as attention_portable;

#[cfg(not(target_arch = "x86_64"))]
mod amx {
    use half::bf16;

    use super::Scratch;
    use crate::gemm::packed::PackedBf16;

    /// Never called: AMX is never usable off x86-64.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn block(
        _q: &[bf16],
        _n: usize,
        _d: usize,
        _keys: &PackedBf16,
        _values: &PackedBf16,
        _s_kv: usize,
        _bias: Option<&[f32]>,
        _scale: f32,
        _sc: &mut Scratch,
        _out: *mut u16,
    ) {
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The attention of [`attention_bf16`] and [`attention_f32`] in f64 from
    /// the inputs' values (`[B, H, S_q, d]`, `[B, KV, S_kv, d]`, flattened),
    /// for the tests: the `[B, H, S_q, d]` output, flattened.
    fn f64_attention(
        qs: &[f32],
        ks: &[f32],
        vs: &[f32],
        bias: Option<&[f32]>,
        (b, h, kv, s_q, s_kv, d): (usize, usize, usize, usize, usize, usize),
        scale: f32,
    ) -> Vec<f64> {
        let mut out = Vec::with_capacity(b * h * s_q * d);
        for bi in 0..b {
            for hi in 0..h {
                let g = hi / (h / kv);
                let kv_row = |t: &[f32], j: usize| -> Vec<f64> {
                    t[((bi * kv + g) * s_kv + j) * d..][..d]
                        .iter()
                        .map(|&x| x as f64)
                        .collect()
                };
                for i in 0..s_q {
                    let qrow = &qs[((bi * h + hi) * s_q + i) * d..][..d];
                    let scores: Vec<f64> = (0..s_kv)
                        .map(|j| {
                            let dot: f64 = qrow
                                .iter()
                                .zip(kv_row(ks, j))
                                .map(|(a, c)| *a as f64 * c)
                                .sum();
                            dot * scale as f64 + bias.map_or(0.0, |bv| bv[bi * s_kv + j] as f64)
                        })
                        .collect();
                    let m = scores.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x));
                    let e: Vec<f64> = scores.iter().map(|&x| (x - m).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    let mut o = vec![0f64; d];
                    for (j, ej) in e.iter().enumerate() {
                        for (oc, vc) in o.iter_mut().zip(kv_row(vs, j)) {
                            *oc += ej * vc;
                        }
                    }
                    out.extend(o.iter().map(|x| x / sum));
                }
            }
        }
        out
    }

    /// The fused kernel of `dtype`: bf16 on AMX, f32 on AVX-512 (`None`
    /// where it does not run); with `portable`, the plain-Rust form, which
    /// runs everywhere.
    fn fused(
        dtype: DType,
        portable: bool,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        bias: Option<&Tensor>,
        scale: f32,
    ) -> candle_core::Result<Option<Tensor>> {
        if portable {
            return attention_portable(q, k, v, bias, scale).map(Some);
        }
        match dtype {
            DType::BF16 => attention_bf16(q, k, v, bias, scale),
            _ => attention_f32(q, k, v, bias, scale),
        }
    }

    /// The paths of `dtype` the tests run: portable always, the fused
    /// kernel where it runs (checked by calling it).
    fn paths(dtype: DType) -> candle_core::Result<Vec<bool>> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 1, 1, 32), dtype, &dev)?;
        if fused(dtype, false, (&x, &x, &x), None, 1.0)?.is_some() {
            eprintln!("flash attention {dtype:?}: portable and fused x86 paths");
            return Ok(vec![true, false]);
        }
        eprintln!("flash attention {dtype:?}: portable path only");
        Ok(vec![true])
    }

    /// Both kernels against an f64 softmax attention of the same inputs:
    /// partial query blocks, partial key blocks and tiles (and f32 key
    /// panels), head sizes that are not multiples of 32 (or 12), grouped
    /// heads, a key mask.
    #[test]
    fn matches_f64_attention() -> candle_core::Result<()> {
        crate::report_paths("matches_f64_attention");
        let dev = Device::Cpu;
        for (dtype, portable) in [DType::BF16, DType::F32].into_iter().flat_map(|dt| {
            paths(dt)
                .unwrap_or_default()
                .into_iter()
                .map(move |p| (dt, p))
        }) {
            for &(b, h, kv, s_q, s_kv, d, masked) in &[
                (1usize, 2usize, 1usize, 5usize, 7usize, 16usize, false),
                (2, 6, 2, 37, 150, 40, true),
                (1, 3, 1, 70, 301, 96, false),
                (1, 2, 2, 33, 129, 96, true),
            ] {
                let q = Tensor::randn(0f32, 1., (b, h, s_q, d), &dev)?.to_dtype(dtype)?;
                let k = Tensor::randn(0f32, 1., (b, kv, s_kv, d), &dev)?.to_dtype(dtype)?;
                let v = Tensor::randn(0f32, 1., (b, kv, s_kv, d), &dev)?.to_dtype(dtype)?;
                let bias: Vec<f32> = (0..b * s_kv)
                    .map(|i| match masked && i % 5 == 2 {
                        true => f32::NEG_INFINITY,
                        false => 0.0,
                    })
                    .collect();
                let bias_t = Tensor::from_vec(bias.clone(), (b, s_kv), &dev)?;
                let scale = 1.0 / (d as f32).sqrt();
                let Some(out) = fused(
                    dtype,
                    portable,
                    (&q, &k, &v),
                    masked.then_some(&bias_t),
                    scale,
                )?
                else {
                    eprintln!("skipped: no fused {dtype:?} kernel on this CPU");
                    break;
                };
                assert_eq!(out.dims(), &[b, h, s_q, d]);
                let f = |t: &Tensor| -> candle_core::Result<Vec<f32>> {
                    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
                };
                let (out, qs, ks, vs) = (f(&out)?, f(&q)?, f(&k)?, f(&v)?);
                let vmax = vs.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
                let bias = masked.then_some(&bias[..]);
                let dims = (b, h, kv, s_q, s_kv, d);
                let want = f64_attention(&qs, &ks, &vs, bias, dims, scale);
                for (i, (&got, &want)) in out.iter().zip(&want).enumerate() {
                    let tol = match dtype {
                        // Probabilities rounded to bf16 (2^-9 relative each,
                        // so at most 2^-9 max|v| in the sum) and the output
                        // rounded once (2^-9 relative).
                        DType::BF16 => 2f64.powi(-9) * (vmax + want.abs()) + 1e-5,
                        // f32 scores, exp and sums: about 1e-6 of the values.
                        _ => 1e-5 * (vmax + want.abs()),
                    };
                    assert!(
                        (got as f64 - want).abs() <= tol,
                        "{dtype:?} portable {portable} ({b},{h},{kv},{s_q},{s_kv},{d}) element {i}: {got} vs {want}"
                    );
                }
            }
        }
        Ok(())
    }

    /// A row with every key masked gives NaN (as PyTorch), not garbage.
    #[test]
    fn all_masked_gives_nan() -> candle_core::Result<()> {
        crate::report_paths("all_masked_gives_nan");
        let dev = Device::Cpu;
        for dtype in [DType::BF16, DType::F32] {
            let q = Tensor::randn(0f32, 1., (1, 1, 3, 32), &dev)?.to_dtype(dtype)?;
            let k = Tensor::randn(0f32, 1., (1, 1, 5, 32), &dev)?.to_dtype(dtype)?;
            let bias = Tensor::full(f32::NEG_INFINITY, (1, 5), &dev)?;
            for portable in paths(dtype)? {
                if let Some(out) = fused(dtype, portable, (&q, &k, &k), Some(&bias), 0.2)? {
                    let v = out.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                    assert!(
                        v.iter().all(|x| x.is_nan()),
                        "{dtype:?} portable {portable}"
                    );
                }
            }
        }
        Ok(())
    }
}
