//! The plain-Rust form of the packed GEMM's register tile: the same panels,
//! the same arithmetic as `vdpbf16ps` (each pair's two exact bf16 products
//! added to the f32 sum, the odd element's first), the bias added in f32
//! and one rounding to bf16. It runs on every CPU; production keeps
//! candle's matmul where AVX512-BF16 is missing (the packed layout is not
//! built there), so this is the path the tests compare on every machine.

use super::{round_bf16, Out, PANEL};

/// `h` rows of inputs times one panel, as `super::avx512::tile`.
///
/// # Safety
/// `a` points at `h` rows of `lda` u32 pairs (reading `pairs` of each), `b`
/// at `pairs * 32` lanes, `bias` at 32 f32, `out` at `h` rows of stride
/// `ldo` with `cols` (<= 32) writable.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tile(
    h: usize,
    a: *const u32,
    lda: usize,
    b: *const u32,
    pairs: usize,
    bias: *const f32,
    out: Out,
    ldo: usize,
    cols: usize,
) {
    let widen = |bits: u32| f32::from_bits(bits << 16);
    // SAFETY: the caller's sizes.
    let (b, bias) = unsafe {
        (
            std::slice::from_raw_parts(b, pairs * PANEL),
            std::slice::from_raw_parts(bias, PANEL),
        )
    };
    for r in 0..h {
        // SAFETY: row `r` holds `pairs` pairs.
        let row = unsafe { std::slice::from_raw_parts(a.add(r * lda), pairs) };
        let mut acc = [0f32; PANEL];
        for (&x, lanes) in row.iter().zip(b.chunks_exact(PANEL)) {
            let (x_lo, x_hi) = (widen(x & 0xffff), widen(x >> 16));
            for (s, &w) in acc.iter_mut().zip(lanes) {
                *s += x_hi * widen(w >> 16);
                *s += x_lo * widen(w & 0xffff);
            }
        }
        // SAFETY: row `r` of `out` has `cols` writable elements.
        unsafe {
            match out.add(r * ldo) {
                Out::Bf16(o) => {
                    for (c, (&s, &bv)) in acc.iter().zip(bias).take(cols).enumerate() {
                        *o.add(c) = round_bf16(s + bv);
                    }
                }
                Out::F32(o, scale) => {
                    for (c, &s) in acc.iter().take(cols).enumerate() {
                        *o.add(c) = s * scale;
                    }
                }
            }
        }
    }
}
