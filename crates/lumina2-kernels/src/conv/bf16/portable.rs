//! The plain-Rust form of [`super::ConvBf16`]: a direct convolution with the
//! AMX kernel's arithmetic (the exact bf16 products summed in f32, the bias
//! added in f32, one rounding to bf16), reading the weight back from its
//! tiles. It runs on every CPU but slowly; production takes the f32 or
//! candle path where AMX is missing ([`crate::ops::conv2d_bf16`]), so this
//! is the path the tests compare on every machine.

use half::bf16;
use rayon::prelude::*;

use super::{ConvBf16, Geometry};
use crate::gemm::packed::round_bf16;

/// [`ConvBf16::forward`] in plain Rust; `None` when the sizes do not fit.
pub(super) fn forward(
    conv: &ConvBf16,
    x: &[bf16],
    batch: usize,
    (h, w): (usize, usize),
    g: Geometry,
) -> Option<(Vec<bf16>, usize, usize)> {
    if g.upsample == 0 || g.stride == 0 || h == 0 || w == 0 {
        return None;
    }
    if x.len()
        != batch
            .checked_mul(conv.c_in)?
            .checked_mul(h)?
            .checked_mul(w)?
    {
        return None;
    }
    let k = conv.kernel;
    let (ho, wo) = g.out_size((h, w), k)?;
    let n = ho.checked_mul(wo)?;
    let mut out = vec![bf16::ZERO; batch.checked_mul(conv.c_out)?.checked_mul(n)?];
    // Weight element (o, j), `j = (c, ky, kx)`, in the A tiles of `tile_inputs`.
    let steps = conv.width / 32;
    let weight = |o: usize, j: usize| {
        conv.a[((o / 16) * steps + j / 32) * 512 + (o % 16) * 32 + j % 32].to_f32()
    };
    let (up, st) = (g.upsample as isize, g.stride as isize);
    let (hu, wu) = (h as isize * up, w as isize * up);
    out.par_chunks_mut(n.max(1))
        .enumerate()
        .for_each(|(plane, dst)| {
            let (bi, o) = (plane / conv.c_out, plane % conv.c_out);
            let xb = &x[bi * conv.c_in * h * w..(bi + 1) * conv.c_in * h * w];
            for (p, d) in dst.iter_mut().enumerate() {
                let (oy, ox) = ((p / wo) as isize, (p % wo) as isize);
                let mut acc = 0f32;
                for c in 0..conv.c_in {
                    for ky in 0..k {
                        // Row in the (upsampled, padded) input; outside: zero.
                        let iy = oy * st + ky as isize - g.pad.0 as isize;
                        if iy < 0 || iy >= hu {
                            continue;
                        }
                        let row = &xb[(c * h + (iy / up) as usize) * w..][..w];
                        for kx in 0..k {
                            let ix = ox * st + kx as isize - g.pad.1 as isize;
                            if ix < 0 || ix >= wu {
                                continue;
                            }
                            let xv = row[(ix / up) as usize].to_f32();
                            acc += xv * weight(o, (c * k + ky) * k + kx);
                        }
                    }
                }
                *d = bf16::from_bits(round_bf16(acc + conv.bias[o]));
            }
        });
    Some((out, ho, wo))
}
