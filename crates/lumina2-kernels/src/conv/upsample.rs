//! diffusers' `Upsample2D` on the CPU path: nearest 2x upsampling then a 3x3
//! convolution with padding 1, computed as four 2x2 convolutions on the
//! source, one per output phase, with 2.25x fewer multiply-adds and without
//! the upsampled tensor.
//!
//! Why it is exact: output row `2y + py` reads upsampled rows `2y + py - 1 ..
//! 2y + py + 1`, i.e. source rows `y - 1, y, y` (py = 0) or `y, y, y + 1`
//! (py = 1): kernel rows that read the same source row are summed into one
//! tap. Likewise for columns. The merged weights are summed in f64 and rounded
//! once, so only the summation order differs from the upsampled convolution.

use rayon::prelude::*;

use crate::conv::f32::{Geometry, PackedConv, Path};

/// The kernel rows (or columns) of a 3x3 kernel merged into tap `a` of a
/// phase: phase 0 reads source offsets (-1, 0), phase 1 (0, +1).
const MERGED: [[&[usize]; 2]; 2] = [[&[0], &[1, 2]], [&[0, 1], &[2]]];

/// The four phase convolutions of one `Upsample2D` convolution.
#[derive(Debug, Clone)]
pub struct UpsampleConv {
    /// Phase `2 * py + px` produces output pixels `(2y + py, 2x + px)`.
    phases: [PackedConv; 4],
    c_in: usize,
    c_out: usize,
}

impl UpsampleConv {
    /// From the 3x3 convolution's `weight` ([c_out, c_in, 3, 3] flattened) and
    /// `bias`; `None` when the sizes do not fit.
    pub fn new(weight: &[f32], bias: &[f32], c_out: usize, c_in: usize) -> Option<Self> {
        if weight.len() != c_out * c_in * 9 {
            return None;
        }
        let phase = |py: usize, px: usize| {
            let mut w2 = Vec::with_capacity(c_out * c_in * 4);
            for k in weight.chunks_exact(9) {
                for rows in MERGED[py] {
                    for cols in MERGED[px] {
                        let s: f64 = rows
                            .iter()
                            .flat_map(|&ky| cols.iter().map(move |&kx| k[ky * 3 + kx] as f64))
                            .sum();
                        w2.push(s as f32);
                    }
                }
            }
            PackedConv::new(&w2, bias, c_out, c_in, 2)
        };
        Some(Self {
            phases: [phase(0, 0)?, phase(0, 1)?, phase(1, 0)?, phase(1, 1)?],
            c_in,
            c_out,
        })
    }

    /// Input channels.
    pub fn c_in(&self) -> usize {
        self.c_in
    }

    /// Output channels.
    pub fn c_out(&self) -> usize {
        self.c_out
    }

    /// `conv(upsample(x))` for `x` [b, c_in, h, w] contiguous f32: [b, c_out,
    /// 2h, 2w]. `None` when the sizes do not fit or the f32 convolution
    /// kernel does not run here ([`crate::conv::f32::available`]).
    pub fn forward(&self, x: &[f32], b: usize, hw: (usize, usize)) -> Option<Vec<f32>> {
        self.forward_with(x, b, hw, Path::best()?)
    }

    /// [`Self::forward`] on the f32 convolution's plain-Rust micro-tile, on
    /// every CPU (the reference path the tests compare everywhere).
    pub fn forward_portable(&self, x: &[f32], b: usize, hw: (usize, usize)) -> Option<Vec<f32>> {
        self.forward_with(x, b, hw, Path::Portable)
    }

    fn forward_with(
        &self,
        x: &[f32],
        b: usize,
        (h, w): (usize, usize),
        path: Path,
    ) -> Option<Vec<f32>> {
        let hw = h * w;
        let mut out = vec![0f32; b * self.c_out * 4 * hw];
        for (i, conv) in self.phases.iter().enumerate() {
            let (py, px) = (i / 2, i % 2);
            let g = Geometry {
                stride: 1,
                pad: (1 - py, 1 - px),
                upsample: 1,
                out: Some((h, w)),
            };
            let (ph, _, _) = conv.forward_with(x, b, (h, w), g, None, path)?;
            // Interleave: source pixel (y, x) of the phase goes to (2y + py, 2x + px).
            out.par_chunks_mut(4 * hw)
                .zip(ph.par_chunks(hw))
                .for_each(|(plane, src)| {
                    for (y, row) in src.chunks_exact(w).enumerate() {
                        let dst = &mut plane[(2 * y + py) * 2 * w..(2 * y + py + 1) * 2 * w];
                        for (d, &v) in dst.iter_mut().skip(px).step_by(2).zip(row) {
                            *d = v;
                        }
                    }
                });
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// Against candle's nearest upsampling then `conv2d`, odd sizes included.
    #[test]
    fn matches_upsample_then_conv() -> candle_core::Result<()> {
        crate::report_paths("matches_upsample_then_conv");
        let mut paths = vec![Path::Portable];
        paths.extend(Path::best());
        eprintln!("matches_upsample_then_conv: paths {paths:?}");
        let dev = Device::Cpu;
        for (b, ci, co, h, w) in [(1, 5, 7, 3, 4), (2, 16, 9, 5, 9), (1, 40, 12, 8, 16)] {
            let x = Tensor::randn(0f32, 1.0, (b, ci, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 0.2, (co, ci, 3, 3), &dev)?;
            let bias = Tensor::randn(0f32, 1.0, co, &dev)?;
            let want = x
                .upsample_nearest2d(2 * h, 2 * w)?
                .conv2d(&wt, 1, 1, 1, 1)?
                .broadcast_add(&bias.reshape((1, co, 1, 1))?)?;
            let up = UpsampleConv::new(&wt.flatten_all()?.to_vec1()?, &bias.to_vec1()?, co, ci)
                .ok_or_else(|| candle_core::Error::Msg("pack".into()))?;
            let want: Vec<f32> = want.flatten_all()?.to_vec1()?;
            for &path in &paths {
                let got = up
                    .forward_with(&x.flatten_all()?.to_vec1()?, b, (h, w), path)
                    .ok_or_else(|| candle_core::Error::Msg("forward".into()))?;
                assert_eq!(got.len(), want.len());
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(g, w)| (g - w).abs() / (1e-5 + 1e-5 * w.abs()))
                    .fold(0f32, f32::max);
                assert!(
                    worst <= 1.0,
                    "{path:?} {:?}: worst {worst}",
                    (b, ci, co, h, w)
                );
            }
        }
        Ok(())
    }
}
