//! The AVX-512 helpers: lane masks, `exp`, `tanh`, bf16 widening and rounding of 16 lanes.

use std::arch::x86_64::*;

/// The first `min(n, 16)` lanes.
#[inline(always)]
pub(crate) fn mask16(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        (1u16 << n) - 1
    }
}

/// The masks of the two 16-lane halves of a 32-wide row with `n` valid
/// values.
#[inline(always)]
pub(crate) fn masks32(n: usize) -> (__mmask16, __mmask16) {
    (mask16(n), mask16(n.saturating_sub(16)))
}

/// `exp(x)` of 16 lanes; `-inf` and anything below about -103 give 0.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn exp16(x: __m512) -> __m512 {
    let log2e = _mm512_set1_ps(std::f32::consts::LOG2_E);
    // ln 2 split so that n * LN2_HI is exact.
    let ln2_hi = _mm512_set1_ps(0.693_145_75);
    let ln2_lo = _mm512_set1_ps(1.428_606_8e-6);
    // Below this exp underflows to 0 anyway; above, it overflows.
    let lo = _mm512_set1_ps(-103.972_08);
    let hi = _mm512_set1_ps(88.722_84);
    let zero_mask = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, lo);
    let xc = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(xc, log2e),
    );
    let r = _mm512_fnmadd_ps(n, ln2_hi, xc);
    let r = _mm512_fnmadd_ps(n, ln2_lo, r);
    // exp(r) = 1 + r + r^2/2 + ... + r^6/720 (Horner).
    let mut p = _mm512_set1_ps(1.0 / 720.0);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0 / 120.0));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0 / 24.0));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0 / 6.0));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0));
    let y = _mm512_scalef_ps(p, n);
    // NaN inputs stay NaN (the compare above is false for them).
    let y = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x), y, x);
    _mm512_maskz_mov_ps(!zero_mask, y)
}

/// `tanh(x)` of 16 lanes, within a few f32 ulps: the odd Taylor series to
/// x^11 below |x| = 0.3 (where `1 - 2 / (e^2x + 1)` would cancel), that
/// form above, with the sign of `x`; +-1 for large |x|, NaN stays NaN.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn tanh16(x: __m512) -> __m512 {
    let one = _mm512_set1_ps(1.0);
    let ax = _mm512_abs_ps(x);
    let e = exp16(_mm512_add_ps(ax, ax));
    let big = _mm512_sub_ps(
        one,
        _mm512_div_ps(_mm512_set1_ps(2.0), _mm512_add_ps(e, one)),
    );
    let x2 = _mm512_mul_ps(x, x);
    // x + x^3 (-1/3 + x^2 (2/15 + x^2 (-17/315 + x^2 (62/2835 - x^2 1382/155925))))
    let mut p = _mm512_set1_ps(-1382.0 / 155_925.0);
    p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(62.0 / 2835.0));
    p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-17.0 / 315.0));
    p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(2.0 / 15.0));
    p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-1.0 / 3.0));
    let small = _mm512_fmadd_ps(_mm512_mul_ps(p, x2), x, x);
    // The sign of x on |tanh|.
    let signed = _mm512_castsi512_ps(_mm512_or_si512(
        _mm512_castps_si512(big),
        _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(i32::MIN)),
    ));
    let is_small = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(ax, _mm512_set1_ps(0.3));
    let y = _mm512_mask_blend_ps(is_small, signed, small);
    _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x), y, x)
}

/// 16 bf16 values (bits) widened to f32.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn widen16(x: __m256i) -> __m512 {
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(x)))
}

/// 16 f32 rounded to bf16 (nearest even; NaN stays NaN).
#[inline]
#[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
pub(crate) fn round16(x: __m512) -> __m256i {
    // SAFETY: same size, plain bits.
    unsafe { std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(x)) }
}
