//! The AVX512-BF16 forms of the packed GEMM: the 12-row register tiles
//! (`vdpbf16ps`), the bias-and-round row store, Q4_0 decoding and the
//! register transpose that packs Q4_0 blocks straight into panels.

use std::arch::x86_64::*;

use super::PANEL;

/// Q4_0 blocks (18 bytes: f16 scale, 16 bytes of nibbles) to bf16 bits,
/// `bf16(f32(d) * (q - 8))`, 32 values a block.
///
/// # Safety
/// AVX-512F/BW/VL/BF16 are available; `out.len() == src.len() / 18 * 32`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn decode_q4_0(src: &[u8], out: &mut [u16]) {
    let eight = _mm512_set1_epi32(8);
    let low = _mm512_set1_epi32(0xf);
    for (blk, o) in src.chunks_exact(18).zip(out.chunks_exact_mut(32)) {
        let d = half::f16::from_bits(u16::from_le_bytes([blk[0], blk[1]])).to_f32();
        let d = _mm512_set1_ps(d);
        unsafe {
            let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(blk.as_ptr().add(2).cast()));
            let lo = _mm512_sub_epi32(_mm512_and_si512(bytes, low), eight);
            let hi = _mm512_sub_epi32(_mm512_srli_epi32::<4>(bytes), eight);
            let lo = _mm512_mul_ps(_mm512_cvtepi32_ps(lo), d);
            let hi = _mm512_mul_ps(_mm512_cvtepi32_ps(hi), d);
            _mm256_storeu_si256(o.as_mut_ptr().cast(), crate::simd::round16(lo));
            _mm256_storeu_si256(o.as_mut_ptr().add(16).cast(), crate::simd::round16(hi));
        }
    }
}

/// One Q4_0 block (18 bytes) as 32 bf16, `bf16(f32(d) * (q - 8))`, in a
/// register: u32 lane `i` holds values `2i` (low half) and `2i + 1`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn q4_0_pairs(blk: &[u8]) -> __m512i {
    let d = half::f16::from_bits(u16::from_le_bytes([blk[0], blk[1]])).to_f32();
    let d = _mm512_set1_ps(d);
    unsafe {
        let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(blk.as_ptr().add(2).cast()));
        let eight = _mm512_set1_epi32(8);
        let lo = _mm512_sub_epi32(_mm512_and_si512(bytes, _mm512_set1_epi32(0xf)), eight);
        let hi = _mm512_sub_epi32(_mm512_srli_epi32::<4>(bytes), eight);
        let lo = crate::simd::round16(_mm512_mul_ps(_mm512_cvtepi32_ps(lo), d));
        let hi = crate::simd::round16(_mm512_mul_ps(_mm512_cvtepi32_ps(hi), d));
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
    }
}

/// Transposes a 16 x 16 matrix of u32 held as 16 rows.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn transpose16(r: [__m512i; 16]) -> [__m512i; 16] {
    let z = _mm512_setzero_si512();
    let mut t = [z; 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // u[4i + j], 128-bit lane L: column 4L + j of rows 4i..4i+4.
    let mut u = [z; 16];
    for i in 0..4 {
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    let mut out = [z; 16];
    for j in 0..4 {
        let even_a = _mm512_shuffle_i32x4::<0x88>(u[j], u[4 + j]);
        let even_b = _mm512_shuffle_i32x4::<0x88>(u[8 + j], u[12 + j]);
        let odd_a = _mm512_shuffle_i32x4::<0xdd>(u[j], u[4 + j]);
        let odd_b = _mm512_shuffle_i32x4::<0xdd>(u[8 + j], u[12 + j]);
        out[j] = _mm512_shuffle_i32x4::<0x88>(even_a, even_b);
        out[8 + j] = _mm512_shuffle_i32x4::<0xdd>(even_a, even_b);
        out[4 + j] = _mm512_shuffle_i32x4::<0x88>(odd_a, odd_b);
        out[12 + j] = _mm512_shuffle_i32x4::<0xdd>(odd_a, odd_b);
    }
    out
}

/// Packs `rows` (<= 32) rows of Q4_0 blocks (`row_bytes` each) into one
/// panel: per block column, each row decoded to 16 pairs in a register,
/// the two 16-row halves transposed so that pair `i` of all rows is one
/// store. Rows past `rows` are written as zeros (every lane of `panel` is
/// written).
///
/// # Safety
/// AVX-512F/BW/VL/BF16 are available; `src` holds `rows * row_bytes`
/// bytes of whole blocks; `panel` has `row_bytes / 18 * 16 * 32` lanes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn pack_q4_0_panel(src: &[u8], row_bytes: usize, rows: usize, panel: &mut [u32]) {
    let blocks = row_bytes / 18;
    let z = _mm512_setzero_si512();
    for b in 0..blocks {
        for half in 0..2 {
            let mut r = [z; 16];
            for (i, reg) in r.iter_mut().enumerate() {
                let n = half * 16 + i;
                if n < rows {
                    let at = n * row_bytes + b * 18;
                    *reg = unsafe { q4_0_pairs(&src[at..at + 18]) };
                }
            }
            // (Rows past `rows` are zero registers: padding written too.)
            let cols = transpose16(r);
            for (i, c) in cols.iter().enumerate() {
                let at = (b * 16 + i) * PANEL + half * 16;
                unsafe { _mm512_storeu_si512(panel[at..at + 16].as_mut_ptr().cast(), *c) };
            }
        }
    }
}

/// Adds the bias to one row's 32 f32 sums, rounds them to bf16 and stores
/// the columns the masks allow.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(crate) unsafe fn store_row(
    row: super::Out,
    acc0: __m512,
    acc1: __m512,
    bias0: __m512,
    bias1: __m512,
    m0: __mmask16,
    m1: __mmask16,
) {
    unsafe {
        match row {
            super::Out::Bf16(row) => {
                let y0: __m256i =
                    std::mem::transmute(_mm512_cvtneps_pbh(_mm512_add_ps(acc0, bias0)));
                let y1: __m256i =
                    std::mem::transmute(_mm512_cvtneps_pbh(_mm512_add_ps(acc1, bias1)));
                _mm256_mask_storeu_epi16(row.cast(), m0, y0);
                _mm256_mask_storeu_epi16(row.add(16).cast(), m1, y1);
            }
            super::Out::F32(row, scale) => {
                let s = _mm512_set1_ps(scale);
                _mm512_mask_storeu_ps(row, m0, _mm512_mul_ps(acc0, s));
                _mm512_mask_storeu_ps(row.add(16), m1, _mm512_mul_ps(acc1, s));
            }
        }
    }
}

/// Dispatches a tile of `h` (1..=12) rows to the kernel compiled for it,
/// so that the accumulators of every height stay in registers.
///
/// # Safety
/// The CPU has AVX512F/BW/VL/BF16; `a` points at `h` rows of `lda` u32
/// pairs (reading `pairs` of each), `b` at `pairs * 32` lanes, `bias` at 32
/// f32, `out` at `h` rows of stride `ldo` with `cols` (<= 32) writable.
#[allow(clippy::too_many_arguments)]
pub unsafe fn tile(
    h: usize,
    a: *const u32,
    lda: usize,
    b: *const u32,
    pairs: usize,
    bias: *const f32,
    out: super::Out,
    ldo: usize,
    cols: usize,
) {
    unsafe {
        match h {
            12 => tile_n::<12>(a, lda, b, pairs, bias, out, ldo, cols),
            11 => tile_n::<11>(a, lda, b, pairs, bias, out, ldo, cols),
            10 => tile_n::<10>(a, lda, b, pairs, bias, out, ldo, cols),
            9 => tile_n::<9>(a, lda, b, pairs, bias, out, ldo, cols),
            8 => tile_n::<8>(a, lda, b, pairs, bias, out, ldo, cols),
            7 => tile_n::<7>(a, lda, b, pairs, bias, out, ldo, cols),
            6 => tile_n::<6>(a, lda, b, pairs, bias, out, ldo, cols),
            5 => tile_n::<5>(a, lda, b, pairs, bias, out, ldo, cols),
            4 => tile_n::<4>(a, lda, b, pairs, bias, out, ldo, cols),
            3 => tile_n::<3>(a, lda, b, pairs, bias, out, ldo, cols),
            2 => tile_n::<2>(a, lda, b, pairs, bias, out, ldo, cols),
            _ => tile_n::<1>(a, lda, b, pairs, bias, out, ldo, cols),
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn tile_n<const H: usize>(
    a: *const u32,
    lda: usize,
    b: *const u32,
    pairs: usize,
    bias: *const f32,
    out: super::Out,
    ldo: usize,
    cols: usize,
) {
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; H];
        let mut bp = b;
        for kk in 0..pairs {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.cast()));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(16).cast()));
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_epi32(a.add(r * lda + kk).read_unaligned() as i32);
                let x: __m512bh = std::mem::transmute(x);
                acc[0] = _mm512_dpbf16_ps(acc[0], x, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], x, b1);
            }
            bp = bp.add(32);
        }
        let bias0 = _mm512_loadu_ps(bias);
        let bias1 = _mm512_loadu_ps(bias.add(16));
        let (m0, m1) = crate::simd::masks32(cols);
        for (r, acc) in acc.iter().enumerate() {
            store_row(out.add(r * ldo), acc[0], acc[1], bias0, bias1, m0, m1);
        }
    }
}
