//! The AVX-512 rows of the softmax kernels: maximum, `exp` and sum, the
//! division, Gemma-2's soft cap, the rounding to bf16.

use std::arch::x86_64::*;

use crate::simd::exp16;

/// The rounded chain of [`super::softcapped_softmax_bf16`] before the
/// softmax, into `t` (f32 holding bf16 values).
///
/// # Safety
/// AVX-512F/BW/VL/BF16 are available; the slices have one length.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn softcap_row(
    x: &[half::bf16],
    mask: &[f32],
    scaling: f32,
    cap: Option<f32>,
    t: &mut [f32],
) {
    use crate::simd::{round16, tanh16, widen16};
    let r = |v: __m512| widen16(round16(v));
    let sc = _mm512_set1_ps(scaling);
    let mut i = 0;
    while i < x.len() {
        let len = 16.min(x.len() - i);
        let m: __mmask16 = ((1u32 << len) - 1) as __mmask16;
        unsafe {
            let s = widen16(_mm256_maskz_loadu_epi16(m, x.as_ptr().add(i).cast()));
            let mut v = r(_mm512_mul_ps(s, sc));
            if let Some(c) = cap {
                let c = _mm512_set1_ps(c);
                v = r(_mm512_div_ps(v, c));
                v = r(tanh16(v));
                v = r(_mm512_mul_ps(v, c));
            }
            v = r(_mm512_add_ps(
                v,
                _mm512_maskz_loadu_ps(m, mask.as_ptr().add(i)),
            ));
            _mm512_mask_storeu_ps(t.as_mut_ptr().add(i), m, v);
        }
        i += 16;
    }
}

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
            _mm256_mask_storeu_epi16(dst.as_mut_ptr().add(i).cast(), m, crate::simd::round16(v));
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
