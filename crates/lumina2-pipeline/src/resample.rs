//! PIL's `Image.resize` for 8-bit images, bit for bit: the Lanczos filter of
//! Pillow 13.0's `src/libImaging/Resample.c` (`precompute_coeffs`,
//! `normalize_coeffs_8bpc`: coefficients in 22-bit fixed point, each pass
//! rounded back to 8 bits), which diffusers' `VaeImageProcessor.resize` uses
//! (`resample="lanczos"`, no reducing gap). When both axes change, the order
//! of the two passes is Pillow's (`ImagingResampleInner`, see
//! [`vertical_first`]): the rounding between the passes makes it visible.

/// Pillow's `PRECISION_BITS`: 32 bits minus 8 for the value and 2 of headroom.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Lanczos-3's support in source pixels at scale 1.
const SUPPORT: f64 = 3.0;

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

/// Pillow's truncated sinc `lanczos_filter`.
fn lanczos(x: f64) -> f64 {
    if (-SUPPORT..SUPPORT).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// The taps of one output pixel: the first source pixel and its weights.
struct Taps {
    first: usize,
    weights: Vec<i32>,
}

/// `precompute_coeffs` then `normalize_coeffs_8bpc` for a whole-image box:
/// the weights of each output pixel, normalised to sum 1 in f64 and rounded
/// half away from zero to fixed point.
fn coefficients(in_size: usize, out_size: usize) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    let ss = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's `(int)` truncates; a negative start is clamped to 0 anyway.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let n = xmax.saturating_sub(xmin);
            let w: Vec<f64> = (0..n)
                .map(|x| lanczos((x as f64 + xmin as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = w.iter().sum();
            let one = f64::from(1u32 << PRECISION_BITS);
            let weights = w
                .iter()
                .map(|&k| {
                    let k = if total != 0.0 { k / total } else { k };
                    if k < 0.0 {
                        (-0.5 + k * one) as i32
                    } else {
                        (0.5 + k * one) as i32
                    }
                })
                .collect();
            Taps {
                first: xmin,
                weights,
            }
        })
        .collect()
}

/// Pillow's `clip8`: the rounded fixed-point sum back to 8 bits.
fn clip8(v: i64) -> u8 {
    if v >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Whether Pillow runs the vertical pass before the horizontal one:
/// `ImagingResampleInner` in Pillow 13.0's `src/libImaging/Resample.c`
/// ("If height is being scaled down more than twice the amount the width
/// is, run the vertical pass first"):
/// `horizontal_first = !((in_h - out_h) > 0 && (in_h - out_h) > (in_w - out_w) * 2)`,
/// in C `int`s, so a width that grows makes `in_w - out_w` negative. The
/// order only matters when both passes run (`need_horizontal` and
/// `need_vertical`; with no box, each axis whose size changes).
pub fn vertical_first((width, height): (usize, usize), (out_w, out_h): (usize, usize)) -> bool {
    // Image sizes fit in i64 with room for the doubling.
    let dh = height as i64 - out_h as i64;
    let dw = width as i64 - out_w as i64;
    dh > 0 && dh > dw * 2
}

/// One horizontal pass (`ImagingResampleHorizontal_8bpc`): each of `rows`
/// rows of `width` pixels to `out_w`.
fn horizontal(
    pixels: &[u8],
    (width, rows): (usize, usize),
    channels: usize,
    out_w: usize,
) -> Vec<u8> {
    let taps = coefficients(width, out_w);
    let mut out = vec![0u8; out_w * rows * channels];
    for y in 0..rows {
        let row = &pixels[y * width * channels..(y + 1) * width * channels];
        for (xx, t) in taps.iter().enumerate() {
            for c in 0..channels {
                let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                for (k, &w) in t.weights.iter().enumerate() {
                    ss += i64::from(row[(t.first + k) * channels + c]) * i64::from(w);
                }
                out[(y * out_w + xx) * channels + c] = clip8(ss);
            }
        }
    }
    out
}

/// One vertical pass (`ImagingResampleVertical_8bpc`): every column of
/// `height` pixels to `out_h`, rows of `stride` values.
fn vertical(pixels: &[u8], height: usize, stride: usize, out_h: usize) -> Vec<u8> {
    let taps = coefficients(height, out_h);
    let mut out = vec![0u8; out_h * stride];
    for (yy, t) in taps.iter().enumerate() {
        for i in 0..stride {
            let mut ss: i64 = 1 << (PRECISION_BITS - 1);
            for (k, &w) in t.weights.iter().enumerate() {
                ss += i64::from(pixels[(t.first + k) * stride + i]) * i64::from(w);
            }
            out[yy * stride + i] = clip8(ss);
        }
    }
    out
}

/// Resizes interleaved 8-bit pixels (`channels` per pixel, rows of `width`)
/// to `out_w` x `out_h` with PIL's Lanczos filter, passes in Pillow's order
/// ([`vertical_first`]). A size equal to the input's returns the pixels
/// unchanged, as `Image.resize` does. (Pillow's horizontal-first path
/// filters only the rows the vertical pass reads, `ybox_first..ybox_last`:
/// the same values as filtering every row.)
pub fn lanczos_u8(
    pixels: &[u8],
    (width, height): (usize, usize),
    channels: usize,
    (out_w, out_h): (usize, usize),
) -> Vec<u8> {
    let (need_h, need_v) = (out_w != width, out_h != height);
    if need_h && need_v && vertical_first((width, height), (out_w, out_h)) {
        let v = vertical(pixels, height, width * channels, out_h);
        return horizontal(&v, (width, out_h), channels, out_w);
    }
    let mut cur = pixels.to_vec();
    if need_h {
        cur = horizontal(&cur, (width, height), channels, out_w);
    }
    if need_v {
        cur = vertical(&cur, height, out_w * channels, out_h);
    }
    cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point_and_same_size_is_identity() {
        for (i, o) in [(7, 3), (3, 7), (64, 48), (10, 10)] {
            for t in coefficients(i, o) {
                let s: i32 = t.weights.iter().sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= t.weights.len() as i32,
                    "{s}"
                );
            }
        }
        let px: Vec<u8> = (0..5 * 4 * 3).map(|v| (v * 7) as u8).collect();
        assert_eq!(lanczos_u8(&px, (5, 4), 3, (5, 4)), px);
        // A constant image stays constant.
        let flat = vec![200u8; 9 * 6];
        assert!(lanczos_u8(&flat, (9, 6), 1, (4, 13))
            .iter()
            .all(|&v| v == 200));
    }

    #[test]
    fn pass_order_is_pillows_rule() {
        // Height shrinks by more than twice what the width shrinks.
        assert!(vertical_first((23, 17), (32, 16)));
        assert!(vertical_first((23, 17), (22, 14)));
        assert!(!vertical_first((23, 17), (22, 15)));
        assert!(!vertical_first((23, 17), (48, 32)));
        assert!(!vertical_first((23, 17), (11, 9)));
        assert!(vertical_first((1024, 1024), (2048, 512)));
        assert!(!vertical_first((2048, 512), (1024, 1024)));
    }
}
