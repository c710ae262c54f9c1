//! The AVX2/FMA build of the column softmax: the portable loop compiled
//! with AVX2 and FMA enabled, so that it vectorises.

use super::softmax_columns_generic;

#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn softmax_columns_avx2(s: &mut [f32], len: usize, scale: f32) -> Vec<f32> {
    softmax_columns_generic(s, len, scale)
}
