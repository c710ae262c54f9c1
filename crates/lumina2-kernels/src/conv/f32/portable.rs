//! The plain-Rust micro-tile of [`super::PackedConv`]: the same panels and
//! tiles as the AVX2 kernel, each output a chain of fused multiply-adds over
//! `k` from the bias (or the partial sum), then the residual. It runs on
//! every CPU; production calls candle's `conv2d` where AVX2/FMA is missing
//! ([`crate::ops::conv2d_f32`]), so this is the path the tests compare on
//! every machine.

use super::{MR, NR};

/// One `rows x cols` output tile, as `super::micro_tile`.
///
/// # Safety
/// `c` points to row 0 of a tile of `rows` rows of stride `ldc`, each with
/// `cols` writable f32; `res`, when given, holds `(rows - 1) * ldc + cols`
/// f32.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn micro_tile(
    kc: usize,
    a: &[f32],
    b: &[f32],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    bias: Option<&[f32]>,
    res: Option<&[f32]>,
) {
    for r in 0..rows {
        for j in 0..cols {
            // SAFETY: (r, j) lies inside the tile.
            let at = unsafe { c.add(r * ldc + j) };
            // SAFETY: as above.
            let mut acc = bias.map_or_else(|| unsafe { *at }, |bv| bv[r]);
            for k in 0..kc {
                acc = a[k * MR + r].mul_add(b[k * NR + j], acc);
            }
            if let Some(res) = res {
                acc += res[r * ldc + j];
            }
            // SAFETY: as above.
            unsafe { *at = acc };
        }
    }
}
