//! The AMX-BF16 block of [`super::attention_bf16`]: the scores of 32 queries
//! against 512 keys in tiles, the online softmax in AVX-512 registers, the
//! probabilities as bf16 A tiles for the product with the values.

use std::arch::asm;
use std::arch::x86_64::*;

use half::bf16;

use super::{Scratch, KB, KSUB, QB, SROW};
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
                c_tiles(sc.s.as_mut_ptr().add(j * 32), SROW, false);
            }
            // 2. Online softmax, row by row: probabilities into A tiles.
            let width = nsub * 32;
            for i in 0..QB {
                let row = sc.s.as_mut_ptr().add(i * SROW);
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
                        _mm512_storeu_ps(o.add(c), _mm512_mul_ps(_mm512_loadu_ps(o.add(c)), alpha));
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
