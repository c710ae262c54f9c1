//! The AVX-512 block of [`super::attention_f32`]: 12x32 register tiles of
//! transposed scores and outputs, the online softmax as vertical operations.

use std::arch::x86_64::*;

use super::{Scratch, Shape, KP, MR, QB};
use crate::simd::exp16;

/// `sum_k A[k][r] B[k][0..32]` for the 12 rows `r`: `A` `[n][12]`, `B`
/// `[n][32]`.
///
/// # Safety
/// AVX-512F/FMA are available; `a` and `b` cover `n` rows.
#[inline]
#[target_feature(enable = "avx512f,fma")]
unsafe fn tile(n: usize, a: *const f32, b: *const f32) -> [[__m512; 2]; MR] {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    unsafe {
        for kk in 0..n {
            let b0 = _mm512_loadu_ps(b.add(kk * QB));
            let b1 = _mm512_loadu_ps(b.add(kk * QB + 16));
            let ar = a.add(kk * MR);
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*ar.add(r));
                acc[0] = _mm512_fmadd_ps(x, b0, acc[0]);
                acc[1] = _mm512_fmadd_ps(x, b1, acc[1]);
            }
        }
    }
    acc
}

/// One block of `n <= 32` queries (`q`: `n` rows of `d`) against all
/// keys, written to `out` (`n` rows of `d`).
///
/// # Safety
/// AVX-512F/FMA are available; `keys`, `values` and `s` are packed for
/// `shape`; `bias` (if any) has `s_kv` values.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,fma")]
pub(super) unsafe fn block(
    q: &[f32],
    n: usize,
    shape: &Shape,
    keys: &[f32],
    values: &[f32],
    bias: Option<&[f32]>,
    scale: f32,
    s: &mut Scratch,
    out: &mut [f32],
) {
    let Shape {
        d,
        s_kv,
        kpanels,
        dpanels,
    } = *shape;
    let s_pad = kpanels * MR;
    // Q^T, scaled; lanes past n zero.
    s.qt.fill(0.0);
    for (j, row) in q.chunks_exact(d).enumerate().take(n) {
        for (c, &x) in row.iter().enumerate() {
            s.qt[c * QB + j] = x * scale;
        }
    }
    s.ot.fill(0.0);
    let neg = _mm512_set1_ps(f32::NEG_INFINITY);
    let (mut m, mut l) = ([neg; 2], [_mm512_setzero_ps(); 2]);
    unsafe {
        let mut kp = 0;
        while kp < kpanels {
            let np = KP.min(kpanels - kp);
            let rows = np * MR;
            // Scores, transposed: row = key, lanes = queries.
            for i in 0..np {
                let acc = tile(d, keys.as_ptr().add((kp + i) * d * MR), s.qt.as_ptr());
                for (r, acc) in acc.iter().enumerate() {
                    let key = (kp + i) * MR + r;
                    let add = match key < s_kv {
                        true => bias.map_or(0.0, |b| b[key]),
                        false => f32::NEG_INFINITY,
                    };
                    let row = s.p.as_mut_ptr().add((i * MR + r) * QB);
                    let add = _mm512_set1_ps(add);
                    _mm512_storeu_ps(row, _mm512_add_ps(acc[0], add));
                    _mm512_storeu_ps(row.add(16), _mm512_add_ps(acc[1], add));
                }
            }
            // The running maximum per query, the rescaling of what was
            // summed so far, the probabilities and their sum.
            let mut mx = m;
            for r in 0..rows {
                let row = s.p.as_ptr().add(r * QB);
                mx[0] = _mm512_max_ps(mx[0], _mm512_loadu_ps(row));
                mx[1] = _mm512_max_ps(mx[1], _mm512_loadu_ps(row.add(16)));
            }
            let corr = [
                exp16(_mm512_sub_ps(m[0], mx[0])),
                exp16(_mm512_sub_ps(m[1], mx[1])),
            ];
            for h in 0..2 {
                l[h] = _mm512_mul_ps(l[h], corr[h]);
            }
            for r in 0..dpanels * MR {
                let row = s.ot.as_mut_ptr().add(r * QB);
                _mm512_storeu_ps(row, _mm512_mul_ps(_mm512_loadu_ps(row), corr[0]));
                let hi = row.add(16);
                _mm512_storeu_ps(hi, _mm512_mul_ps(_mm512_loadu_ps(hi), corr[1]));
            }
            for r in 0..rows {
                let row = s.p.as_mut_ptr().add(r * QB);
                for h in 0..2 {
                    let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(row.add(16 * h)), mx[h]));
                    _mm512_storeu_ps(row.add(16 * h), e);
                    l[h] = _mm512_add_ps(l[h], e);
                }
            }
            m = mx;
            // O^T += V^T P^T over this step's keys.
            for p in 0..dpanels {
                let a = values.as_ptr().add((p * s_pad + kp * MR) * MR);
                let acc = tile(rows, a, s.p.as_ptr());
                for (r, acc) in acc.iter().enumerate() {
                    let row = s.ot.as_mut_ptr().add((p * MR + r) * QB);
                    _mm512_storeu_ps(row, _mm512_add_ps(_mm512_loadu_ps(row), acc[0]));
                    let hi = row.add(16);
                    _mm512_storeu_ps(hi, _mm512_add_ps(_mm512_loadu_ps(hi), acc[1]));
                }
            }
            kp += np;
        }
        // Divide by the sums, transpose back.
        let mut sum = [0f32; QB];
        _mm512_storeu_ps(sum.as_mut_ptr(), l[0]);
        _mm512_storeu_ps(sum.as_mut_ptr().add(16), l[1]);
        for (j, row) in out.chunks_exact_mut(d).enumerate().take(n) {
            for (c, o) in row.iter_mut().enumerate() {
                *o = s.ot[c * QB + j] / sum[j];
            }
        }
    }
}
