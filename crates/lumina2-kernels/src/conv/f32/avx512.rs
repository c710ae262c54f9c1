//! The AVX-512 micro-kernel of [`super::PackedConv`]: two adjacent pixel
//! panels at once, `MR x 2NR` in 12 zmm accumulators.

use super::{MR, NR};
use std::arch::x86_64::*;

/// `C[MR x 2NR] (+)= A[kc x MR]^T [B0 B1]`: the AVX-512 form of
/// [`kernel`] over two adjacent pixel panels `b0` and `b1` (pixels
/// `q0..q0 + NR` and `q0 + NR..q0 + 2NR`), one zmm each: twelve
/// accumulators, two pixel loads and six broadcasts per step.
///
/// # Safety
/// As [`kernel`], with `b0` and `b1` each holding `kc * NR` f32 and `c`
/// (and `res`) rows holding `2 * NR` f32; AVX-512F is available.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn kernel_wide(
    kc: usize,
    a: *const f32,
    b0: *const f32,
    b1: *const f32,
    c: *mut f32,
    ldc: usize,
    bias: Option<*const f32>,
    res: Option<*const f32>,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    match bias {
        Some(bias) => {
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let v = _mm512_set1_ps(*bias.add(r));
                *acc_r = [v, v];
            }
        }
        None => {
            for r in 0..MR {
                let row = c.add(r * ldc) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(row);
                _mm_prefetch::<_MM_HINT_T0>(row.add(8 * NR - 4));
            }
        }
    }
    let (mut a, mut b0, mut b1) = (a, b0, b1);
    for _ in 0..kc {
        let x0 = _mm512_loadu_ps(b0);
        let x1 = _mm512_loadu_ps(b1);
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let w = _mm512_set1_ps(*a.add(r));
            acc_r[0] = _mm512_fmadd_ps(w, x0, acc_r[0]);
            acc_r[1] = _mm512_fmadd_ps(w, x1, acc_r[1]);
        }
        a = a.add(MR);
        b0 = b0.add(NR);
        b1 = b1.add(NR);
    }
    if bias.is_none() {
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let row = c.add(r * ldc);
            acc_r[0] = _mm512_add_ps(_mm512_loadu_ps(row), acc_r[0]);
            acc_r[1] = _mm512_add_ps(_mm512_loadu_ps(row.add(NR)), acc_r[1]);
        }
    }
    if let Some(res) = res {
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let row = res.add(r * ldc);
            acc_r[0] = _mm512_add_ps(acc_r[0], _mm512_loadu_ps(row));
            acc_r[1] = _mm512_add_ps(acc_r[1], _mm512_loadu_ps(row.add(NR)));
        }
    }
    for (r, acc_r) in acc.iter().enumerate() {
        let row = c.add(r * ldc);
        _mm512_storeu_ps(row, acc_r[0]);
        _mm512_storeu_ps(row.add(NR), acc_r[1]);
    }
}
