//! The AVX2/FMA micro-kernel of [`super::PackedConv`]: an `MR x NR` tile in
//! 12 ymm accumulators.

use super::{MR, NR};
use std::arch::x86_64::*;

/// `C[MR x NR] (+)= A[kc x MR]^T B[kc x NR]`: twelve accumulators, two
/// pixel vectors and one broadcast weight per step, all in registers; when
/// accumulating, the block's sum is added to `C` at the end.
///
/// # Safety
/// `a` holds `kc * MR` f32, `b` `kc * NR`, `c` `MR` rows of stride `ldc`
/// with `NR` writable f32 each (read too when `bias` is `None`; `bias`
/// holds `MR` f32; `res`, when given, `MR` rows of stride `ldc` with `NR`
/// readable f32 each); AVX2 and FMA are available.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn kernel(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    bias: Option<*const f32>,
    res: Option<*const f32>,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    match bias {
        Some(bias) => {
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let v = _mm256_broadcast_ss(&*bias.add(r));
                *acc_r = [v, v];
            }
        }
        None => {
            // The partial sums are added at the end: ask for them now so
            // that they arrive (typically from L3) while the loop runs.
            for r in 0..MR {
                let row = c.add(r * ldc) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(row);
                _mm_prefetch::<_MM_HINT_T0>(row.add(4 * NR - 4));
            }
        }
    }
    let (mut a, mut b) = (a, b);
    for _ in 0..kc {
        let b0 = _mm256_loadu_ps(b);
        let b1 = _mm256_loadu_ps(b.add(8));
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let w = _mm256_broadcast_ss(&*a.add(r));
            acc_r[0] = _mm256_fmadd_ps(w, b0, acc_r[0]);
            acc_r[1] = _mm256_fmadd_ps(w, b1, acc_r[1]);
        }
        a = a.add(MR);
        b = b.add(NR);
    }
    if bias.is_none() {
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let row = c.add(r * ldc);
            acc_r[0] = _mm256_add_ps(_mm256_loadu_ps(row), acc_r[0]);
            acc_r[1] = _mm256_add_ps(_mm256_loadu_ps(row.add(8)), acc_r[1]);
        }
    }
    if let Some(res) = res {
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let row = res.add(r * ldc);
            acc_r[0] = _mm256_add_ps(acc_r[0], _mm256_loadu_ps(row));
            acc_r[1] = _mm256_add_ps(acc_r[1], _mm256_loadu_ps(row.add(8)));
        }
    }
    for (r, acc_r) in acc.iter().enumerate() {
        let row = c.add(r * ldc);
        _mm256_storeu_ps(row, acc_r[0]);
        _mm256_storeu_ps(row.add(8), acc_r[1]);
    }
}
