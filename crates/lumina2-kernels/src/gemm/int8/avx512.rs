//! The AVX-512 forms of the int8 GEMM: row quantisation (AVX-512BW), the
//! VNNI block (`vpdpbusd`), the epilogue's row store.

use super::{Epilogue, Out, Row, PANEL, VNNI_ROWS};
use std::arch::x86_64::*;

/// [`super::quantize_row`] with AVX-512: the same maximum, division and
/// rounding (half to even), so the same bytes and scale.
///
/// # Safety
/// AVX-512F/BW are available; `out` is as long as the row.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn quantize_row(row: Row, out: &mut [i8]) -> f32 {
    let n = out.len();
    let load = |i: usize, m: __mmask16| unsafe {
        match row {
            Row::F32(x) => _mm512_maskz_loadu_ps(m, x.as_ptr().add(i)),
            Row::Bf16(x) => {
                crate::simd::widen16(_mm256_maskz_loadu_epi16(m, x.as_ptr().add(i).cast()))
            }
        }
    };
    let mask = |i: usize| -> __mmask16 {
        if n - i >= 16 {
            0xffff
        } else {
            (1u16 << (n - i)) - 1
        }
    };
    let abs_bits = _mm512_set1_epi32(0x7fff_ffff);
    let mut vmax = _mm512_setzero_ps();
    let mut nan: __mmask16 = 0;
    let mut i = 0;
    while i < n {
        let v = load(i, mask(i));
        nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        let a = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), abs_bits));
        vmax = _mm512_max_ps(vmax, a);
        i += 16;
    }
    let amax = _mm512_reduce_max_ps(vmax);
    if nan != 0 || amax.is_infinite() {
        out.fill(0);
        return f32::NAN;
    }
    if amax == 0.0 {
        out.fill(0);
        return 0.0;
    }
    let scale = amax / 127.0;
    let (vs, lo, hi) = (
        _mm512_set1_ps(scale),
        _mm512_set1_ps(-127.0),
        _mm512_set1_ps(127.0),
    );
    let mut i = 0;
    while i < n {
        let m = mask(i);
        let q = _mm512_div_ps(load(i, m), vs);
        let q = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(q);
        let q = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(q, lo), hi));
        // SAFETY: the mask keeps the store inside `out`.
        unsafe { _mm512_mask_cvtepi32_storeu_epi8(out.as_mut_ptr().add(i).cast(), m, q) };
        i += 16;
    }
    scale
}

/// 16 f32 to bf16 bits, rounding to nearest even with NaN kept NaN, in
/// integer operations: [`crate::gemm::packed::round_bf16`] lane by lane (no
/// AVX512-BF16 needed, and subnormals kept as the scalar kernel does).
#[inline]
#[target_feature(enable = "avx512f")]
fn round_bits16(y: __m512) -> __m256i {
    let b = _mm512_castps_si512(y);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
    let r = _mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), lsb);
    let r = _mm512_srli_epi32::<16>(r);
    let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(0x40));
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(y, y);
    _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, r, quiet))
}

/// Writes 32 sums of row `r`, panel `p` (`acc0`, `acc1`: columns 0-15 and
/// 16-31, `correction` already subtracted) through the epilogue.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn store_row(
    acc0: __m512i,
    acc1: __m512i,
    r: usize,
    p: usize,
    epi: &Epilogue,
    out: Out,
) {
    let (m0, m1) = crate::simd::masks32(PANEL.min(epi.ldo - p * PANEL));
    unsafe {
        let sx = _mm512_set1_ps(epi.sx[r]);
        let n = p * PANEL;
        let at = r * epi.ldo + n;
        for (h, acc, m) in [(0, acc0, m0), (16, acc1, m1)] {
            let sw = _mm512_loadu_ps(epi.sw.as_ptr().add(n + h));
            let b = _mm512_loadu_ps(epi.bias.as_ptr().add(n + h));
            let y = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), sw), sx, b);
            match out {
                Out::F32(o) => _mm512_mask_storeu_ps(o.add(at + h), m, y),
                Out::Bf16(o) => _mm256_mask_storeu_epi16(o.add(at + h).cast(), m, round_bits16(y)),
            }
        }
    }
}

/// Rows `r0..r1` times panels `p0..p1` with `vpdpbusd`: 8x32 blocks in
/// registers. `vpdpbusd` multiplies unsigned by signed bytes, so each
/// input byte is offset by 128 (`x ^ 0x80`) and `128 * sum_k q_w` taken
/// off the sums.
///
/// # Safety
/// AVX-512F/BW and AVX512-VNNI are available; `a` holds row-major rows
/// of `quads * 4` int8 covering `r1`; the rest as [`amx_block`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn vnni_block(
    a: &[i8],
    quads: usize,
    (r0, r1): (usize, usize),
    data: &[u32],
    (p0, p1): (usize, usize),
    epi: &Epilogue,
    out: Out,
) {
    let width = quads * 4;
    unsafe {
        for p in p0..p1 {
            let panel = data.as_ptr().add(p * quads * PANEL);
            let corr0 = _mm512_slli_epi32::<7>(_mm512_loadu_si512(
                epi.col_sums.as_ptr().add(p * PANEL).cast(),
            ));
            let corr1 = _mm512_slli_epi32::<7>(_mm512_loadu_si512(
                epi.col_sums.as_ptr().add(p * PANEL + 16).cast(),
            ));
            let mut r = r0;
            while r < r1 {
                if r1 - r >= VNNI_ROWS {
                    let acc = rows_n::<VNNI_ROWS>(a.as_ptr().add(r * width), width, panel, quads);
                    for (i, acc) in acc.iter().enumerate() {
                        let acc0 = _mm512_sub_epi32(acc[0], corr0);
                        let acc1 = _mm512_sub_epi32(acc[1], corr1);
                        store_row(acc0, acc1, r + i, p, epi, out);
                    }
                    r += VNNI_ROWS;
                } else {
                    let [acc] = rows_n::<1>(a.as_ptr().add(r * width), width, panel, quads);
                    let acc0 = _mm512_sub_epi32(acc[0], corr0);
                    let acc1 = _mm512_sub_epi32(acc[1], corr1);
                    store_row(acc0, acc1, r, p, epi, out);
                    r += 1;
                }
            }
        }
    }
}

/// The int32 sums of `H` rows (offset by 128) against one panel.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn rows_n<const H: usize>(
    a: *const i8,
    lda: usize,
    panel: *const u32,
    quads: usize,
) -> [[__m512i; 2]; H] {
    let mut acc = [[_mm512_setzero_si512(); 2]; H];
    let flip = _mm512_set1_epi32(0x8080_8080u32 as i32);
    unsafe {
        for kk in 0..quads {
            let b0 = _mm512_loadu_si512(panel.add(kk * PANEL).cast());
            let b1 = _mm512_loadu_si512(panel.add(kk * PANEL + 16).cast());
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = a.add(r * lda + 4 * kk).cast::<i32>().read_unaligned();
                let x = _mm512_xor_si512(_mm512_set1_epi32(x), flip);
                acc[0] = _mm512_dpbusd_epi32(acc[0], x, b0);
                acc[1] = _mm512_dpbusd_epi32(acc[1], x, b1);
            }
        }
    }
    acc
}
