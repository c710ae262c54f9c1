//! The AVX2/FMA builds of the group norm's sums and affine-activation pass:
//! the portable loops compiled with AVX2 and FMA enabled, so that they
//! vectorise.

use super::{apply_generic, sum_lanes, Elem, FusedAct};

#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn sum_avx2<I: Elem>(b: &[I], centre: Option<f32>) -> f32 {
    sum_lanes(b, centre)
}

#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn apply_avx2<I: Elem, O: Elem, R: Fn(f32) -> f32>(
    x: &[I],
    o: &mut [O],
    scale: f32,
    shift: f32,
    act: FusedAct,
    round: &R,
) {
    apply_generic(x, o, scale, shift, act, round)
}
