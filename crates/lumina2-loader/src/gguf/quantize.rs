//! Quantisation kernels: f32 rows to GGUF blocks.
//!
//! Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 are bit-identical to gguf-py 0.19.0's
//! `gguf.quants.quantize` (`quants.py`, classes `Q8_0` .. `Q5_1`): the same
//! float32 operations in the same order, never fused, half-precision scales
//! rounded to nearest even as numpy's `astype(np.float16)`. gguf-py has no
//! quantiser for the K-quants; Q4_K, Q5_K and Q6_K follow llama.cpp's
//! reference quantisers (`ggml-quants.c`: `quantize_row_q4_K_ref`,
//! `quantize_row_q5_K_ref`, `quantize_row_q6_K_ref`, with `make_qkx2_quants`
//! and `make_qx_quants`), evaluated in float32 without fused multiply-adds.
//! Blocks are independent, so runs of blocks go to rayon's pool.

use rayon::prelude::*;

use super::GgmlType;

/// Why a buffer could not be quantised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantizeError {
    /// The type has no quantiser here.
    #[error("quantising to {0} is not supported")]
    Unsupported(GgmlType),
    /// The element count is not a whole number of blocks.
    #[error(
        "{ggml_type}: {n_elements} elements are not a whole number of {block_size}-element blocks"
    )]
    NotWholeBlocks {
        /// The type.
        ggml_type: GgmlType,
        /// Input elements.
        n_elements: usize,
        /// Elements per block of the type.
        block_size: usize,
    },
}

/// The block types [`quantize`] writes.
pub const QUANTIZE_TYPES: [GgmlType; 8] = [
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Blocks per rayon task.
const ELEMS_PER_TASK: usize = 16 * 1024;

/// f32 to f16 bits, rounded to nearest even (numpy's `astype(np.float16)`
/// and ggml's `GGML_FP32_TO_FP16`).
#[inline(always)]
fn f16_bits(x: f32) -> [u8; 2] {
    half::f16::from_f32(x).to_le_bytes()
}

/// The f32 value of an f16 scale as written, for the K-quants' requantisation.
#[inline(always)]
fn f16_round(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// Quantises `x` (a whole number of blocks of `ty`) into `ty`'s blocks.
pub fn quantize(ty: GgmlType, x: &[f32]) -> Result<Vec<u8>, QuantizeError> {
    if !QUANTIZE_TYPES.contains(&ty) {
        return Err(QuantizeError::Unsupported(ty));
    }
    let (bs, ts) = (ty.block_size(), ty.type_size());
    if !x.len().is_multiple_of(bs) {
        return Err(QuantizeError::NotWholeBlocks {
            ggml_type: ty,
            n_elements: x.len(),
            block_size: bs,
        });
    }
    let mut out = vec![0u8; x.len() / bs * ts];
    match ty {
        GgmlType::Q8_0 => run(x, &mut out, q8_0),
        GgmlType::Q4_0 => run(x, &mut out, q4_0),
        GgmlType::Q4_1 => run(x, &mut out, q4_1),
        GgmlType::Q5_0 => run(x, &mut out, q5_0),
        GgmlType::Q5_1 => run(x, &mut out, q5_1),
        GgmlType::Q4_K => run(x, &mut out, q4_k),
        GgmlType::Q5_K => run(x, &mut out, q5_k),
        GgmlType::Q6_K => run(x, &mut out, q6_k),
        other => return Err(QuantizeError::Unsupported(other)),
    }
    Ok(out)
}

/// Runs `kernel` over every block of `x` (blocks of `BS` floats) into `out`
/// (blocks of `TS` bytes), in parallel.
fn run<const BS: usize, const TS: usize>(
    x: &[f32],
    out: &mut [u8],
    kernel: fn(&[f32; BS], &mut [u8; TS]),
) {
    let blocks_per_task = (ELEMS_PER_TASK / BS).max(1);
    x.par_chunks(BS * blocks_per_task)
        .zip(out.par_chunks_mut(TS * blocks_per_task))
        .for_each(|(src, dst)| {
            for (b, o) in src.chunks_exact(BS).zip(dst.chunks_exact_mut(TS)) {
                if let (Ok(b), Ok(o)) = (<&[f32; BS]>::try_from(b), <&mut [u8; TS]>::try_from(o)) {
                    kernel(b, o);
                }
            }
        });
}

/// The first element of largest magnitude (numpy's `abs(x).argmax()`, and
/// ggml's strict `amax < fabsf(v)` scan), with its sign.
fn signed_absmax(x: &[f32]) -> f32 {
    let mut amax = 0f32;
    let mut max = 0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// `1 / d`, or 0 for a zero scale (`np.where(d == 0, 0, 1 / d)`).
fn inverse(d: f32) -> f32 {
    if d == 0.0 {
        0.0
    } else {
        1.0 / d
    }
}

fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

// gguf-py `Q8_0.quantize_blocks`: d = max|x| / 127, q = round-half-away(x / d).
fn q8_0(x: &[f32; 32], o: &mut [u8; 34]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse(d);
    o[..2].copy_from_slice(&f16_bits(d));
    for (q, &v) in o[2..].iter_mut().zip(x) {
        *q = ((v * id).round() as i8) as u8;
    }
}

// gguf-py `Q4_0.quantize_blocks`: d = signed absmax / -8, q = trunc(x / d + 8.5) clipped to 15.
fn q4_0(x: &[f32; 32], o: &mut [u8; 18]) {
    let d = signed_absmax(x) / -8.0;
    let id = inverse(d);
    o[..2].copy_from_slice(&f16_bits(d));
    let q = |v: f32| ((v * id + 8.5).trunc() as u8).min(15);
    for j in 0..16 {
        o[2 + j] = q(x[j]) | (q(x[j + 16]) << 4);
    }
}

// gguf-py `Q4_1.quantize_blocks`: d = (max - min) / 15, m = min, q = trunc((x - min) / d + 0.5).
fn q4_1(x: &[f32; 32], o: &mut [u8; 20]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = inverse(d);
    o[..2].copy_from_slice(&f16_bits(d));
    o[2..4].copy_from_slice(&f16_bits(min));
    let q = |v: f32| (((v - min) * id + 0.5).trunc() as u8).min(15);
    for j in 0..16 {
        o[4 + j] = q(x[j]) | (q(x[j + 16]) << 4);
    }
}

/// The 5-bit quants' low nibbles and the little-endian bit plane of their
/// fifth bits (`np.packbits(q >> 4, bitorder="little")`).
fn pack5(q: &[u8; 32], qh: &mut [u8], qs: &mut [u8]) {
    let bits = q
        .iter()
        .enumerate()
        .fold(0u32, |acc, (j, &v)| acc | (u32::from(v >> 4) << j));
    qh.copy_from_slice(&bits.to_le_bytes());
    for j in 0..16 {
        qs[j] = (q[j] & 0x0F) | (q[j + 16] << 4);
    }
}

// gguf-py `Q5_0.quantize_blocks`: d = signed absmax / -16, q = trunc(x / d + 16.5) clipped to 31.
fn q5_0(x: &[f32; 32], o: &mut [u8; 22]) {
    let d = signed_absmax(x) / -16.0;
    let id = inverse(d);
    o[..2].copy_from_slice(&f16_bits(d));
    let q: [u8; 32] = std::array::from_fn(|j| ((x[j] * id + 16.5).trunc() as u8).min(31));
    let (qh, qs) = o[2..].split_at_mut(4);
    pack5(&q, qh, qs);
}

// gguf-py `Q5_1.quantize_blocks`: d = (max - min) / 31, m = min.
fn q5_1(x: &[f32; 32], o: &mut [u8; 24]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = inverse(d);
    o[..2].copy_from_slice(&f16_bits(d));
    o[2..4].copy_from_slice(&f16_bits(min));
    let q: [u8; 32] = std::array::from_fn(|j| (((x[j] - min) * id + 0.5).trunc() as u8).min(31));
    let (qh, qs) = o[4..].split_at_mut(4);
    pack5(&q, qh, qs);
}

/// ggml's `nearest_int`: round half to even through the float mantissa.
#[inline(always)]
fn nearest_int(f: f32) -> i32 {
    let val = f + 12_582_912.0;
    (val.to_bits() as i32 & 0x007F_FFFF) - 0x0040_0000
}

/// ggml's `GROUP_MAX_EPS`: below it a group counts as all zero.
const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `make_qkx2_quants`: an asymmetric scale and minimum for `x` with
/// levels 0..=nmax, searched over `nstep + 1` trial scales minimising the
/// weighted squared error. Returns (scale, -min).
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l_out: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let nmax_f = nmax as f32;
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l_out.fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax_f / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l_out[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    let mut laux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax_f) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = l as u8;
            let (w, lf) = (weights[i], l as f32);
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                l_out[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// The 6-bit scales and mins of Q4_K and Q5_K, packed as `get_scale_min_k4` reads them.
fn pack_scale_min_k4(ls: &[u8; 8], lm: &[u8; 8], s: &mut [u8]) {
    for j in 0..8 {
        if j < 4 {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (ls[j] & 0x0F) | ((lm[j] & 0x0F) << 4);
            s[j - 4] |= (ls[j] >> 4) << 6;
            s[j] |= (lm[j] >> 4) << 6;
        }
    }
}

fn scale_min_k4(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// The shared part of `quantize_row_q4_K_ref` and `quantize_row_q5_K_ref`:
/// per 32-element sub-block levels 0..=nmax, the d/dmin pair and the packed
/// 6-bit scales written to `head` (d, dmin, 12 scale bytes).
fn k_quant_levels(x: &[f32; 256], nmax: i32, rmin: f32, nstep: i32, head: &mut [u8]) -> [u8; 256] {
    let mut l = [0u8; 256];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let sum_x2 = xs.iter().fold(0f32, |s, &v| s + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: [f32; 32] = std::array::from_fn(|i| av_x + xs[i].abs());
        let (scale, min) = make_qkx2_quants(
            nmax,
            xs,
            &weights,
            &mut l[32 * j..32 * j + 32],
            rmin,
            0.1,
            nstep,
        );
        scales[j] = scale;
        mins[j] = min;
        if scale > max_scale {
            max_scale = scale;
        }
        if min > max_min {
            max_min = min;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    // C stores nearest_int's int in a uint8_t (modulo 256) before MIN(63, ..).
    let ls: [u8; 8] = std::array::from_fn(|j| (nearest_int(inv_scale * scales[j]) as u8).min(63));
    let lm: [u8; 8] = std::array::from_fn(|j| (nearest_int(inv_min * mins[j]) as u8).min(63));
    let (dd, sc) = head.split_at_mut(4);
    pack_scale_min_k4(&ls, &lm, sc);
    dd[..2].copy_from_slice(&f16_bits(max_scale / 63.0));
    dd[2..].copy_from_slice(&f16_bits(max_min / 63.0));
    let d = f16_round(max_scale / 63.0);
    let dmin = f16_round(max_min / 63.0);
    for j in 0..8 {
        let (s, m) = scale_min_k4(sc, j);
        let dl = d * s as f32;
        if dl == 0.0 {
            continue;
        }
        let dm = dmin * m as f32;
        for i in 0..32 {
            l[32 * j + i] = nearest_int((x[32 * j + i] + dm) / dl).clamp(0, nmax) as u8;
        }
    }
    l
}

// llama.cpp `quantize_row_q4_K_ref`.
fn q4_k(x: &[f32; 256], o: &mut [u8; 144]) {
    let (head, qs) = o.split_at_mut(16);
    let l = k_quant_levels(x, 15, -1.0, 20, head);
    for (c, q) in qs.chunks_exact_mut(32).enumerate() {
        for i in 0..32 {
            q[i] = l[64 * c + i] | (l[64 * c + 32 + i] << 4);
        }
    }
}

// llama.cpp `quantize_row_q5_K_ref`.
fn q5_k(x: &[f32; 256], o: &mut [u8; 176]) {
    let (head, rest) = o.split_at_mut(16);
    let l = k_quant_levels(x, 31, -0.5, 15, head);
    let (qh, ql) = rest.split_at_mut(32);
    qh.fill(0);
    for c in 0..4 {
        let (m1, m2) = (1u8 << (2 * c), 2u8 << (2 * c));
        for j in 0..32 {
            let mut l1 = l[64 * c + j];
            if l1 > 15 {
                l1 -= 16;
                qh[j] |= m1;
            }
            let mut l2 = l[64 * c + 32 + j];
            if l2 > 15 {
                l2 -= 16;
                qh[j] |= m2;
            }
            ql[32 * c + j] = l1 | (l2 << 4);
        }
    }
}

/// ggml's `make_qx_quants` with `rmse_type = 1` and no importance weights
/// (weights x²): a symmetric scale for levels -nmax..nmax-1, refined over 18
/// trial scales. Levels are written offset by nmax.
fn make_qx_quants(nmax: i32, x: &[f32], l_out: &mut [i8]) -> f32 {
    let n = x.len();
    let nmax_f = nmax as f32;
    let mut max = 0f32;
    let mut amax = 0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l_out[..n].fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let mut iscale = -nmax_f / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for i in 0..n {
        let l = level(iscale, x[i]);
        l_out[i] = (l + nmax) as i8;
        let (w, lf) = (x[i] * x[i], l as f32);
        sumlx += w * x[i] * lf;
        suml2 += w * lf * lf;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax_f + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &v in x {
            let (w, lf) = (v * v, level(iscale, v) as f32);
            sumlx += w * v * lf;
            suml2 += w * lf * lf;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for i in 0..n {
                l_out[i] = (level(iscale, x[i]) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

// llama.cpp `quantize_row_q6_K_ref`.
fn q6_k(x: &[f32; 256], o: &mut [u8; 210]) {
    let mut l = [0i8; 256];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for ib in 0..16 {
        let scale = make_qx_quants(32, &x[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
        scales[ib] = scale;
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = scale;
        }
    }
    o.fill(0);
    if max_abs_scale < GROUP_MAX_EPS {
        return;
    }
    let (ql, rest) = o.split_at_mut(128);
    let (qh, rest) = rest.split_at_mut(64);
    let (sc, dd) = rest.split_at_mut(16);
    let iscale = -128.0 / max_scale;
    dd.copy_from_slice(&f16_bits(1.0 / iscale));
    let d = f16_round(1.0 / iscale);
    for ib in 0..16 {
        // MIN(127, nearest_int(..)) stored in an int8_t.
        sc[ib] = (nearest_int(iscale * scales[ib]).min(127) as i8) as u8;
    }
    for j in 0..16 {
        let dl = d * (sc[j] as i8) as f32;
        if dl == 0.0 {
            continue;
        }
        for i in 0..16 {
            l[16 * j + i] = (nearest_int(x[16 * j + i] / dl).clamp(-32, 31) + 32) as i8;
        }
    }
    let l = l.map(|v| v as u8);
    for h in 0..2 {
        let (lh, qlh, qhh) = (&l[128 * h..], &mut ql[64 * h..], &mut qh[32 * h..]);
        for i in 0..32 {
            let (q1, q2, q3, q4) = (lh[i], lh[i + 32], lh[i + 64], lh[i + 96]);
            qlh[i] = (q1 & 0x0F) | ((q3 & 0x0F) << 4);
            qlh[i + 32] = (q2 & 0x0F) | ((q4 & 0x0F) << 4);
            qhh[i] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::dequantize;

    fn sample(n: usize, seed: u64) -> Vec<f32> {
        // A deterministic, heavy-tailed mix: mostly small weights, a few outliers.
        let mut s = seed;
        (0..n)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = ((s >> 40) as f32) / (1u64 << 24) as f32 - 0.5;
                if i % 997 == 0 {
                    u * 2.0
                } else {
                    u * 0.1
                }
            })
            .collect()
    }

    #[test]
    fn round_trip_error_is_bounded_per_type() {
        let x = sample(256 * 64, 7);
        let rms = (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32).sqrt();
        // Relative RMS error of quantise-dequantise, an upper bound per type
        // from the number of levels (the K-quants search their scales).
        for (ty, bound) in [
            (GgmlType::Q8_0, 0.01),
            (GgmlType::Q6_K, 0.03),
            (GgmlType::Q5_0, 0.08),
            (GgmlType::Q5_1, 0.08),
            (GgmlType::Q5_K, 0.08),
            (GgmlType::Q4_0, 0.15),
            (GgmlType::Q4_1, 0.15),
            (GgmlType::Q4_K, 0.15),
        ] {
            let q = quantize(ty, &x).unwrap();
            assert_eq!(q.len(), x.len() / ty.block_size() * ty.type_size());
            let y = dequantize(ty, &q, x.len()).unwrap();
            let err = (x
                .iter()
                .zip(&y)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f32>()
                / x.len() as f32)
                .sqrt();
            eprintln!("{ty}: relative rms error {}", err / rms);
            assert!(err / rms < bound, "{ty}: relative rms error {}", err / rms);
        }
    }

    #[test]
    fn zeros_quantise_to_zeros() {
        let x = vec![0f32; 256];
        for ty in QUANTIZE_TYPES {
            let y = dequantize(ty, &quantize(ty, &x).unwrap(), 256).unwrap();
            assert!(y.iter().all(|&v| v == 0.0), "{ty}");
        }
    }

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!(nearest_int(0.5), 0);
        assert_eq!(nearest_int(1.5), 2);
        assert_eq!(nearest_int(-2.5), -2);
        assert_eq!(nearest_int(3.4), 3);
    }

    #[test]
    fn refuses_partial_blocks_and_other_types() {
        assert!(matches!(
            quantize(GgmlType::Q4_K, &[0.0; 32]),
            Err(QuantizeError::NotWholeBlocks { .. })
        ));
        assert!(matches!(
            quantize(GgmlType::Q2_K, &[0.0; 256]),
            Err(QuantizeError::Unsupported(_))
        ));
    }
}
