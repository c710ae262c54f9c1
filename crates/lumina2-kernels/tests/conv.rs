//! The bf16 convolution, its portable path on every machine and its AMX
//! path where AMX is usable, against an f64 reference computed from the
//! same bf16 values: every geometry the VAE uses (3x3 padding 1, 1x1, nearest 2x
//! upsampling then 3x3, stride 2 with padding only below and right), widths
//! that are not multiples of a panel (32), depths that are not multiples of a
//! tile (32), channel counts that are not multiples of 32, two batch items.

use half::bf16;
use lumina2_kernels::conv::bf16::{available, ConvBf16, Geometry};

/// A deterministic pseudo-random bf16 in about [-scale, scale].
fn values(n: usize, seed: u64, scale: f32) -> Vec<bf16> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = ((s >> 40) as f32) / (1u64 << 24) as f32;
            bf16::from_f32((2.0 * u - 1.0) * scale)
        })
        .collect()
}

/// The reference: each output in f64 with the sum of its terms' magnitudes.
#[allow(clippy::too_many_arguments)]
fn reference(
    x: &[bf16],
    wt: &[bf16],
    bias: &[f32],
    (b, ci, co, k): (usize, usize, usize, usize),
    (h, w): (usize, usize),
    g: Geometry,
    (ho, wo): (usize, usize),
) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(b * co * ho * wo);
    let (up, st) = (g.upsample as isize, g.stride as isize);
    for bi in 0..b {
        for o in 0..co {
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut s = bias[o] as f64;
                    let mut mag = (bias[o] as f64).abs();
                    for c in 0..ci {
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = oy as isize * st + ky as isize - g.pad.0 as isize;
                                let ix = ox as isize * st + kx as isize - g.pad.1 as isize;
                                if iy < 0
                                    || ix < 0
                                    || iy >= h as isize * up
                                    || ix >= w as isize * up
                                {
                                    continue;
                                }
                                let (iy, ix) = ((iy / up) as usize, (ix / up) as usize);
                                let xv = x[((bi * ci + c) * h + iy) * w + ix].to_f64();
                                let wv = wt[((o * ci + c) * k + ky) * k + kx].to_f64();
                                s += xv * wv;
                                mag += (xv * wv).abs();
                            }
                        }
                    }
                    out.push((s, mag));
                }
            }
        }
    }
    out
}

#[test]
fn matches_f64_reference() {
    lumina2_kernels::report_paths("matches_f64_reference");
    let mut paths = vec!["portable"];
    if available() {
        paths.push("amx");
    }
    eprintln!("matches_f64_reference: bf16 convolution paths {paths:?}");
    let down = |h: usize, w: usize| Geometry {
        stride: 2,
        pad: (0, 0),
        upsample: 1,
        out: Some(((h - 2) / 2 + 1, (w - 2) / 2 + 1)),
    };
    let up2 = Geometry {
        upsample: 2,
        ..Geometry::symmetric(1, 1)
    };
    // (batch, c_in, c_out, kernel, h, w, geometry)
    let cases: Vec<(usize, usize, usize, usize, usize, usize, Geometry)> = vec![
        (1, 16, 32, 3, 8, 8, Geometry::symmetric(1, 1)),
        (2, 5, 40, 3, 7, 37, Geometry::symmetric(1, 1)),
        (1, 3, 3, 3, 5, 70, Geometry::symmetric(1, 1)),
        (1, 64, 33, 1, 6, 45, Geometry::symmetric(1, 0)),
        (2, 7, 20, 3, 5, 21, up2),
        (1, 40, 64, 3, 9, 16, up2),
        (2, 6, 12, 3, 9, 40, down(9 + 1, 40 + 1)),
        (1, 4, 8, 3, 11, 13, Geometry::symmetric(2, 1)),
    ];
    for (i, &(b, ci, co, k, h, w, g)) in cases.iter().enumerate() {
        let x = values(b * ci * h * w, 1 + i as u64, 2.0);
        let wt = values(co * ci * k * k, 100 + i as u64, 0.5);
        let bias: Vec<f32> = values(co, 200 + i as u64, 1.0)
            .iter()
            .map(|v| v.to_f32())
            .collect();
        let conv = ConvBf16::new(&wt, &bias, co, ci, k).expect("sizes fit");
        for &path in &paths {
            let (y, ho, wo) = match path {
                "amx" => conv.forward(&x, b, (h, w), g),
                _ => conv.forward_portable(&x, b, (h, w), g),
            }
            .expect("runs");
            assert_eq!((ho, wo), g.out_size((h, w), k).unwrap());
            let want = reference(&x, &wt, &bias, (b, ci, co, k), (h, w), g, (ho, wo));
            assert_eq!(y.len(), want.len());
            let depth = (ci * k * k + 1) as f64;
            for (j, (got, (r, mag))) in y.iter().zip(&want).enumerate() {
                // f32 sums of exact products: at most `depth` roundings of 2^-24
                // relative to the running magnitude; then one bf16 rounding (2^-8: 8 significant bits).
                let sum_err = depth * mag * 2f64.powi(-24);
                let bound = (r.abs() + sum_err) * 2f64.powi(-8) + sum_err + 1e-30;
                let err = (got.to_f64() - r).abs();
                assert!(
                    err <= bound,
                    "{path} case {i} {:?}, element {j}: got {got}, want {r} (bound {bound:e})",
                    (b, ci, co, k, h, w)
                );
            }
        }
    }
}

/// Whether a forward path accepts an input of the given size and geometry.
type Fits<'a> = dyn Fn(&[bf16], (usize, usize), Geometry) -> bool + 'a;

#[test]
fn rejects_sizes_that_do_not_fit() {
    lumina2_kernels::report_paths("rejects_sizes_that_do_not_fit");
    let wt = values(2 * 3 * 9, 1, 1.0);
    assert!(ConvBf16::new(&wt, &[0.0; 2], 2, 3, 3).is_some());
    assert!(ConvBf16::new(&wt, &[0.0; 3], 2, 3, 3).is_none());
    assert!(ConvBf16::new(&wt[1..], &[0.0; 2], 2, 3, 3).is_none());
    assert!(ConvBf16::new(&[], &[], 0, 3, 3).is_none());
    let conv = ConvBf16::new(&wt, &[0.0; 2], 2, 3, 3).unwrap();
    let x = values(3 * 4 * 4, 2, 1.0);
    let mut forwards: Vec<(&str, Box<Fits>)> = vec![(
        "portable",
        Box::new(|x, hw, g| conv.forward_portable(x, 1, hw, g).is_some()),
    )];
    if available() {
        forwards.push((
            "amx",
            Box::new(|x, hw, g| conv.forward(x, 1, hw, g).is_some()),
        ));
    }
    for (path, fits) in &forwards {
        assert!(fits(&x, (4, 4), Geometry::symmetric(1, 1)), "{path}");
        assert!(!fits(&x[1..], (4, 4), Geometry::symmetric(1, 1)), "{path}");
        // A 2x2 input is too small for a 3x3 kernel without padding.
        assert!(!fits(&x[..12], (2, 2), Geometry::symmetric(1, 0)), "{path}");
        assert!(!fits(&x, (4, 4), Geometry::symmetric(0, 1)), "{path}");
    }
}
