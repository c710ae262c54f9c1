//! Fused bf16 attention on AMX tiles ("flash attention"): the scores of a
//! block of 32 queries against 128 keys are made, turned into
//! probabilities and multiplied into the output without leaving the core's
//! caches, with the running maximum and sum of the online softmax.
//!
//! The arithmetic is PyTorch's CPU flash attention for bf16 inputs
//! (`aten/src/ATen/native/cpu/FlashAttentionKernel.cpp`): `q k^T` summed in
//! f32, scaled and masked in f32, `exp(s - running max)` in f32 and rounded
//! to bf16 for the product with `v` (summed in f32), the running sum kept in
//! f32 from the unrounded values, the output divided by it at the end and
//! rounded once. PyTorch takes 512 keys a block, this kernel 128, so the
//! running maximum (and with it which values are rounded) can differ.
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
const KB: usize = 128;
/// 32-key tiles per step.
const KSUB: usize = KB / 32;

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
    // products.
    let mut packed = Vec::with_capacity(b * kv);
    for bi in 0..b {
        for g in 0..kv {
            let keys = PackedBf16::pack(&k.get(bi)?.get(g)?)?;
            let values = PackedBf16::pack(&v.get(bi)?.get(g)?.t()?)?;
            packed.push((keys, values));
        }
    }
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
                kernel::block(
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
    drop(view);
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
            s: Aligned::zeroed(QB * KB),
            p: Aligned::zeroed(2 * KSUB * 512),
            o: Aligned::zeroed(QB * steps * 32),
            m: [0.0; QB],
            l: [0.0; QB],
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use std::arch::asm;
    use std::arch::x86_64::*;

    use half::bf16;

    use super::{Scratch, KB, KSUB, QB};
    use crate::gemm::packed::PackedBf16;
    use crate::gemm::packed::{bf16_steps as product, c_tiles, zero_c};
    use crate::simd::mask16;

    /// One block of `n` (<= 32) query rows `q` (`n x d`, contiguous) against
    /// all keys; writes `n` rows of `d` bf16 at `out`.
    ///
    /// # Safety
    /// AMX-BF16 is usable and AVX-512F/BW/VL/BF16 are available; `keys` packs
    /// `[s_kv, d]`, `values` `[d, s_kv]`; `scratch` was made for `d`; `bias`
    /// has `s_kv` values; `out` has room for `n * d` values.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn block(
        q: &[bf16],
        n: usize,
        d: usize,
        keys: &PackedBf16,
        values: &PackedBf16,
        s_kv: usize,
        bias: Option<&[f32]>,
        scale: f32,
        sc: &mut Scratch,
        out: *mut u16,
    ) {
        let steps = d.div_ceil(32); // depth steps of q k^T
        let dp = steps * 32;
        // Queries into A tiles (zero rows and columns beyond n x d).
        sc.q.fill(bf16::ZERO);
        for i in 0..n {
            let (t, r) = (i / 16, i % 16);
            for (s, chunk) in q[i * d..(i + 1) * d].chunks(32).enumerate() {
                let at = (t * steps + s) * 512 + r * 32;
                sc.q[at..at + chunk.len()].copy_from_slice(chunk);
            }
        }
        sc.o.fill(0.0);
        sc.m = [f32::NEG_INFINITY; QB];
        sc.l = [0.0; QB];
        let cfg = crate::gemm::packed::tile_config();
        let (kpairs, vpairs) = (keys.pairs(), values.pairs());
        let kdata = keys.data().as_ptr().cast::<u8>();
        let vdata = values.data().as_ptr().cast::<u8>();
        let qa = sc.q.as_ptr().cast::<u8>();
        let vscale = _mm512_set1_ps(scale);
        unsafe {
            asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack));
            let mut kb = 0;
            while kb < s_kv {
                let nk = KB.min(s_kv - kb);
                let nsub = nk.div_ceil(32);
                // 1. Scores of the 32 queries against 32-key sub-blocks.
                for j in 0..nsub {
                    let panel = kdata.add((kb / 32 + j) * kpairs * 128);
                    zero_c();
                    product(qa, qa.add(steps * 1024), 1024, panel, 16 * 128, steps);
                    c_tiles(sc.s.as_mut_ptr().add(j * 32), KB, false);
                }
                // 2. Online softmax, row by row: probabilities into A tiles.
                let width = nsub * 32;
                for i in 0..QB {
                    let row = sc.s.as_mut_ptr().add(i * KB);
                    let mut vmax = _mm512_set1_ps(f32::NEG_INFINITY);
                    let mut c = 0;
                    while c < width {
                        let m: __mmask16 = mask16(nk.saturating_sub(c));
                        let x = _mm512_mul_ps(_mm512_loadu_ps(row.add(c)), vscale);
                        let x = match bias {
                            Some(b) => {
                                _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, b.as_ptr().add(kb + c)))
                            }
                            None => x,
                        };
                        // Keys past the end: -inf.
                        let x = _mm512_mask_blend_ps(m, _mm512_set1_ps(f32::NEG_INFINITY), x);
                        _mm512_storeu_ps(row.add(c), x);
                        vmax = _mm512_max_ps(vmax, x);
                        c += 16;
                    }
                    let m_old = sc.m[i];
                    let m_new = m_old.max(_mm512_reduce_max_ps(vmax));
                    let (t, r) = (i / 16, i % 16);
                    if m_new == f32::NEG_INFINITY {
                        // Nothing to attend to yet (or ever): p = 0.
                        for j in 0..nsub {
                            let p = sc.p.as_mut_ptr().add((t * KSUB + j) * 512 + r * 32);
                            std::ptr::write_bytes(p, 0, 32);
                        }
                        continue;
                    }
                    let alpha = crate::simd::exp16(_mm512_set1_ps(m_old - m_new));
                    let vm = _mm512_set1_ps(m_new);
                    let mut vsum = _mm512_setzero_ps();
                    let mut c = 0;
                    while c < width {
                        let e = crate::simd::exp16(_mm512_sub_ps(_mm512_loadu_ps(row.add(c)), vm));
                        vsum = _mm512_add_ps(vsum, e);
                        let (j, h) = (c / 32, c % 32);
                        let p = sc.p.as_mut_ptr().add((t * KSUB + j) * 512 + r * 32 + h);
                        _mm256_storeu_si256(p.cast(), crate::simd::round16(e));
                        c += 16;
                    }
                    let a = _mm512_cvtss_f32(alpha);
                    sc.l[i] = sc.l[i] * a + _mm512_reduce_add_ps(vsum);
                    sc.m[i] = m_new;
                    if a != 1.0 {
                        let o = sc.o.as_mut_ptr().add(i * dp);
                        for c in (0..dp).step_by(16) {
                            _mm512_storeu_ps(
                                o.add(c),
                                _mm512_mul_ps(_mm512_loadu_ps(o.add(c)), alpha),
                            );
                        }
                    }
                }
                // 3. o += p v, one 32-column panel of the output at a time.
                let pa = sc.p.as_ptr().cast::<u8>();
                for pd in 0..steps {
                    let o = sc.o.as_mut_ptr().add(pd * 32);
                    c_tiles(o, dp, true);
                    let panel = vdata.add(pd * vpairs * 128 + (kb / 2) * 128);
                    product(pa, pa.add(KSUB * 1024), 1024, panel, 16 * 128, nsub);
                    c_tiles(o, dp, false);
                }
                kb += nk;
            }
            asm!("tilerelease", options(nostack));
            // 4. Divide by the sums, round once.
            for i in 0..n {
                let inv = _mm512_set1_ps(sc.l[i]);
                let o = sc.o.as_ptr().add(i * dp);
                let dst = out.add(i * d);
                let mut c = 0;
                while c < d {
                    let m = mask16(d - c);
                    let y = _mm512_div_ps(_mm512_loadu_ps(o.add(c)), inv);
                    _mm256_mask_storeu_epi16(dst.add(c).cast(), m, crate::simd::round16(y));
                    c += 16;
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
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
    /// where it does not run).
    fn fused(
        dtype: DType,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        bias: Option<&Tensor>,
        scale: f32,
    ) -> candle_core::Result<Option<Tensor>> {
        match dtype {
            DType::BF16 => attention_bf16(q, k, v, bias, scale),
            _ => attention_f32(q, k, v, bias, scale),
        }
    }

    /// Both kernels against an f64 softmax attention of the same inputs:
    /// partial query blocks, partial key blocks and tiles (and f32 key
    /// panels), head sizes that are not multiples of 32 (or 12), grouped
    /// heads, a key mask.
    #[test]
    fn matches_f64_attention() -> candle_core::Result<()> {
        crate::report_paths("matches_f64_attention");
        let dev = Device::Cpu;
        for dtype in [DType::BF16, DType::F32] {
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
                let Some(out) = fused(dtype, (&q, &k, &v), masked.then_some(&bias_t), scale)?
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
                        "{dtype:?} ({b},{h},{kv},{s_q},{s_kv},{d}) element {i}: {got} vs {want}"
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
            if let Some(out) = fused(dtype, (&q, &k, &k), Some(&bias), 0.2)? {
                let v = out.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                assert!(v.iter().all(|x| x.is_nan()), "{dtype:?}");
            }
        }
        Ok(())
    }
}
