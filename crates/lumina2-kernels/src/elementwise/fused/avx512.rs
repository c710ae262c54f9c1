//! The AVX-512 (with BF16 conversions) rows of the fused element-wise
//! kernels.

use std::arch::x86_64::*;

use half::bf16;

use crate::simd::{exp16, round16, widen16};

/// Loads `len` (<= 16) bf16 at `p` as f32 (missing lanes 0).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn load(p: *const bf16, len: usize) -> __m512 {
    unsafe {
        if len == 16 {
            widen16(_mm256_loadu_si256(p.cast()))
        } else {
            let m: __mmask16 = ((1u32 << len) - 1) as __mmask16;
            widen16(_mm256_maskz_loadu_epi16(m, p.cast()))
        }
    }
}

/// Rounds 16 f32 to bf16 and stores `len` (<= 16) of them at `p`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn store(p: *mut bf16, v: __m512, len: usize) {
    let m: __mmask16 = if len == 16 {
        0xffff
    } else {
        ((1u32 << len) - 1) as __mmask16
    };
    unsafe { _mm256_mask_storeu_epi16(p.cast(), m, round16(v)) }
}

/// One row of [`super::rope_rotate_half`]: with `h = d / 2`,
/// `o[i] = E(E(x[i] c[i]) - E(x[i + h] s[i]))` and
/// `o[i + h] = E(E(x[i + h] c[i + h]) + E(x[i] s[i + h]))` for `i < h`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn rope_row<E: super::Lanes>(x: &[E], c: &[E], s: &[E], o: &mut [E]) {
    let h = x.len() / 2;
    let mut i = 0;
    while i < h {
        let len = 16.min(h - i);
        unsafe {
            let ld = |v: &[E], at: usize| E::load16(v.as_ptr().add(at), len);
            let (a, b) = (ld(x, i), ld(x, i + h));
            let lo = _mm512_sub_ps(
                E::round(_mm512_mul_ps(a, ld(c, i))),
                E::round(_mm512_mul_ps(b, ld(s, i))),
            );
            let hi = _mm512_add_ps(
                E::round(_mm512_mul_ps(b, ld(c, i + h))),
                E::round(_mm512_mul_ps(a, ld(s, i + h))),
            );
            E::store16(o.as_mut_ptr().add(i), lo, len);
            E::store16(o.as_mut_ptr().add(i + h), hi, len);
        }
        i += len;
    }
}

/// One row of [`super::rope_pairs_to_heads`]: each pair `(x[2i], x[2i+1])`
/// rotated by `(c[i], s[i])` in f32, `o[2i] = x[2i] c[i] - x[2i+1] s[i]`,
/// `o[2i+1] = x[2i] s[i] + x[2i+1] c[i]`, rounded once to `E`. Written as
/// `x * c' + swap(x) * s'` with `c' = (c0, c0, c1, c1, ...)` and `s' = (-s0,
/// s0, -s1, s1, ...)`: the same products and one addition each (a negated
/// product added is the subtraction, and the sum's order does not matter),
/// no fused multiply-add, so the bits of candle's `rope_i`. `x.len()` even,
/// `c` and `s` `x.len() / 2` long.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn rope_pairs_row<E: super::Lanes>(x: &[E], c: &[f32], s: &[f32], o: &mut [E]) {
    let dup = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    // The sign bit on the even lanes.
    let neg_even = _mm512_set_epi32(
        0,
        i32::MIN,
        0,
        i32::MIN,
        0,
        i32::MIN,
        0,
        i32::MIN,
        0,
        i32::MIN,
        0,
        i32::MIN,
        0,
        i32::MIN,
        0,
        i32::MIN,
    );
    let mut j = 0;
    while j < x.len() {
        let len = 16.min(x.len() - j);
        unsafe {
            let half_mask = crate::simd::mask16(len / 2);
            let cv = _mm512_maskz_loadu_ps(half_mask, c.as_ptr().add(j / 2));
            let sv = _mm512_maskz_loadu_ps(half_mask, s.as_ptr().add(j / 2));
            let cd = _mm512_permutexvar_ps(dup, cv);
            let sd = _mm512_castsi512_ps(_mm512_xor_si512(
                _mm512_castps_si512(_mm512_permutexvar_ps(dup, sv)),
                neg_even,
            ));
            let xv = E::load16(x.as_ptr().add(j), len);
            let swapped = _mm512_permute_ps::<0b1011_0001>(xv);
            let r = _mm512_add_ps(_mm512_mul_ps(xv, cd), _mm512_mul_ps(swapped, sd));
            E::store16(o.as_mut_ptr().add(j), r, len);
        }
        j += len;
    }
}

/// `o = E(x + y)`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn add<E: super::Lanes>(x: &[E], y: &[E], o: &mut [E]) {
    let mut i = 0;
    while i < x.len() {
        let len = 16.min(x.len() - i);
        unsafe {
            let s = _mm512_add_ps(
                E::load16(x.as_ptr().add(i), len),
                E::load16(y.as_ptr().add(i), len),
            );
            E::store16(o.as_mut_ptr().add(i), s, len);
        }
        i += len;
    }
}

impl super::Lanes for bf16 {
    #[inline]
    unsafe fn load16(p: *const Self, len: usize) -> __m512 {
        unsafe { load(p, len) }
    }
    #[inline]
    unsafe fn store16(p: *mut Self, v: __m512, len: usize) {
        unsafe { store(p, v, len) }
    }
    #[inline]
    unsafe fn round(v: __m512) -> __m512 {
        unsafe { widen16(round16(v)) }
    }
}

impl super::Lanes for f32 {
    #[inline]
    unsafe fn load16(p: *const Self, len: usize) -> __m512 {
        unsafe { _mm512_maskz_loadu_ps(crate::simd::mask16(len), p) }
    }
    #[inline]
    unsafe fn store16(p: *mut Self, v: __m512, len: usize) {
        unsafe { _mm512_mask_storeu_ps(p, crate::simd::mask16(len), v) }
    }
    #[inline]
    unsafe fn round(v: __m512) -> __m512 {
        v
    }
}

/// `o = E(E(act(x)) * y)`: SiLU `x / (1 + exp(-x))` or GELU (tanh).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn act_mul<E: super::Lanes, const GELU: bool>(x: &[E], y: &[E], o: &mut [E]) {
    let one = _mm512_set1_ps(1.0);
    // sqrt(2 / pi) and the cubic coefficient of the tanh approximation.
    let beta = _mm512_set1_ps(0.797_884_6);
    let kappa = _mm512_set1_ps(0.044_715);
    let (half, two) = (_mm512_set1_ps(0.5), _mm512_set1_ps(2.0));
    let mut i = 0;
    while i < x.len() {
        let len = 16.min(x.len() - i);
        unsafe {
            let a = E::load16(x.as_ptr().add(i), len);
            let b = E::load16(y.as_ptr().add(i), len);
            let s = match GELU {
                // a / (1 + exp(-a))
                false => _mm512_div_ps(
                    a,
                    _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), a))),
                ),
                // PyTorch's 0.5 a (1 + tanh(u)), tanh(u) = 1 - 2 / (exp(2u) + 1):
                // the same saturation to exactly 0 for very negative a.
                true => {
                    let cube = _mm512_mul_ps(_mm512_mul_ps(a, a), a);
                    let u = _mm512_mul_ps(beta, _mm512_add_ps(a, _mm512_mul_ps(kappa, cube)));
                    let e = exp16(_mm512_add_ps(u, u));
                    let t = _mm512_sub_ps(one, _mm512_div_ps(two, _mm512_add_ps(e, one)));
                    _mm512_mul_ps(_mm512_mul_ps(half, a), _mm512_add_ps(one, t))
                }
            };
            // The activation rounded (in bf16) before the product, as
            // the unfused ops.
            let s = E::round(s);
            E::store16(o.as_mut_ptr().add(i), _mm512_mul_ps(s, b), len);
        }
        i += 16;
    }
}

/// `o = x * v`, or `o = x + bf16(v * y)` with `y`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn mul_bcast_row(x: &[bf16], v: &[bf16], y: Option<&[bf16]>, o: &mut [bf16]) {
    let mut i = 0;
    while i < x.len() {
        let len = 16.min(x.len() - i);
        unsafe {
            let a = load(x.as_ptr().add(i), len);
            let g = load(v.as_ptr().add(i), len);
            let r = match y {
                None => _mm512_mul_ps(a, g),
                Some(y) => {
                    let p = widen16(round16(_mm512_mul_ps(g, load(y.as_ptr().add(i), len))));
                    _mm512_add_ps(a, p)
                }
            };
            store(o.as_mut_ptr().add(i), r, len);
        }
        i += 16;
    }
}

/// One row of the RMS norm.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn rms_norm_row(x: &[bf16], w: Option<&[bf16]>, eps: f32, o: &mut [bf16]) {
    let n = x.len();
    unsafe {
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i < n {
            let v = load(x.as_ptr().add(i), 16.min(n - i));
            acc = _mm512_fmadd_ps(v, v, acc);
            i += 16;
        }
        let ms = _mm512_reduce_add_ps(acc) / n as f32;
        let r = _mm512_set1_ps(1.0 / (ms + eps).sqrt());
        let mut i = 0;
        while i < n {
            let len = 16.min(n - i);
            let y = _mm512_mul_ps(load(x.as_ptr().add(i), len), r);
            let y = match w {
                // bf16(y) * w, rounded again: two bf16 ops in PyTorch.
                Some(w) => _mm512_mul_ps(widen16(round16(y)), load(w.as_ptr().add(i), len)),
                None => y,
            };
            store(o.as_mut_ptr().add(i), y, len);
            i += 16;
        }
    }
}
