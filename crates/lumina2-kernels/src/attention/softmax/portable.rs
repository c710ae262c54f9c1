//! The plain-Rust rows of the softmax kernels, the same passes as the
//! AVX-512 rows (maximum; `exp(x - max)` summed in 16 lanes, then the
//! lanes; the division), with the standard library's `exp` and `tanh`. They
//! run on every CPU; production keeps candle's softmax (and the caller's
//! op-by-op soft cap) where AVX-512 is missing, so these are the paths the
//! tests compare on every machine.

/// One row: `dst = exp(src - max) / sum`; an all `-inf` row gives NaN.
pub(super) fn softmax_row(src: &[f32], dst: &mut [f32]) {
    let m = src.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
    let mut lanes = [0f32; 16];
    for (s, d) in src.chunks(16).zip(dst.chunks_mut(16)) {
        for ((l, &x), y) in lanes.iter_mut().zip(s).zip(d) {
            *y = (x - m).exp();
            *l += *y;
        }
    }
    let sum: f32 = lanes.iter().sum();
    for y in dst.iter_mut() {
        *y /= sum;
    }
}

/// The rounded chain of [`super::softcapped_softmax_bf16`] before the
/// softmax, into `t` (f32 holding bf16 values).
pub(super) fn softcap_row(
    x: &[half::bf16],
    mask: &[f32],
    scaling: f32,
    cap: Option<f32>,
    t: &mut [f32],
) {
    let r = |v: f32| half::bf16::from_f32(v).to_f32();
    for ((&s, &m), t) in x.iter().zip(mask).zip(t.iter_mut()) {
        let mut v = r(s.to_f32() * scaling);
        if let Some(c) = cap {
            v = r(r(r(v / c).tanh()) * c);
        }
        *t = r(v + m);
    }
}
