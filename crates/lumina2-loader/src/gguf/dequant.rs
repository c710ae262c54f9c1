//! Dequantisation kernels, bit-exact with gguf-py's `gguf.quants.dequantize`
//! (and ggml's reference C code): the same float32 operations in the same order,
//! never fused. Blocks are independent, so runs of blocks go to rayon's pool.

use rayon::prelude::*;

use super::GgmlType;

/// Why a buffer could not be dequantised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DequantError {
    /// The type has no kernel here.
    #[error("dequantising {0} is not supported")]
    Unsupported(GgmlType),
    /// The byte and element counts do not match whole blocks of the type.
    #[error("{ggml_type}: {n_bytes} bytes cannot hold exactly {n_elements} elements")]
    SizeMismatch {
        /// The type.
        ggml_type: GgmlType,
        /// Input bytes.
        n_bytes: usize,
        /// Output elements.
        n_elements: usize,
    },
}

/// Elements per rayon task (a few tens of KB of output).
const ELEMS_PER_TASK: usize = 16 * 1024;

/// f16 bits to f32 exactly as numpy's `astype(np.float32)` (which gguf-py
/// uses): exact for every finite value and infinity, and NaN payloads are
/// shifted without setting the quiet bit (hardware F16C would set it).
#[inline(always)]
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    // Branch-free (all three cases computed, one selected) so loops vectorise.
    let sign = u32::from(h & 0x8000) << 16;
    let exp = h & 0x7C00;
    let man = u32::from(h & 0x03FF);
    let special = sign | 0x7F80_0000 | (man << 13);
    // Zero or subnormal: man * 2^-24, exact in f32.
    let subnormal = sign | (man as f32 * f32::from_bits(0x3380_0000)).to_bits();
    let normal = sign | ((u32::from(h & 0x7FFF) + 0x1_C000) << 13);
    let bits = if exp == 0x7C00 {
        special
    } else if exp == 0 {
        subnormal
    } else {
        normal
    };
    f32::from_bits(bits)
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// Runs `kernel` over every block of `bytes` (blocks of `TS` bytes) into `out`
/// (blocks of `BS` floats), in parallel.
fn run<const TS: usize, const BS: usize>(
    bytes: &[u8],
    out: &mut [f32],
    kernel: fn(&[u8; TS], &mut [f32; BS]),
) {
    let blocks_per_task = (ELEMS_PER_TASK / BS).max(1);
    bytes
        .par_chunks(TS * blocks_per_task)
        .zip(out.par_chunks_mut(BS * blocks_per_task))
        .for_each(|(src, dst)| {
            for (b, o) in src.chunks_exact(TS).zip(dst.chunks_exact_mut(BS)) {
                if let (Ok(b), Ok(o)) = (<&[u8; TS]>::try_from(b), <&mut [f32; BS]>::try_from(o)) {
                    kernel(b, o);
                }
            }
        });
}

fn q4_0(b: &[u8; 18], o: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for j in 0..16 {
        let q = b[2 + j];
        o[j] = d * ((q & 0x0F) as i32 - 8) as f32;
        o[j + 16] = d * ((q >> 4) as i32 - 8) as f32;
    }
}

fn q4_1(b: &[u8; 20], o: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    for j in 0..16 {
        let q = b[4 + j];
        o[j] = d * (q & 0x0F) as f32 + m;
        o[j + 16] = d * (q >> 4) as f32 + m;
    }
}

fn q5_0(b: &[u8; 22], o: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for j in 0..16 {
        let q = b[6 + j];
        let lo = (q & 0x0F) as u32 | (((qh >> j) & 1) << 4);
        let hi = (q >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4);
        o[j] = d * (lo as i32 - 16) as f32;
        o[j + 16] = d * (hi as i32 - 16) as f32;
    }
}

fn q5_1(b: &[u8; 24], o: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for j in 0..16 {
        let q = b[8 + j];
        let lo = (q & 0x0F) as u32 | (((qh >> j) & 1) << 4);
        let hi = (q >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4);
        o[j] = d * lo as f32 + m;
        o[j + 16] = d * hi as f32 + m;
    }
}

fn q8_0(b: &[u8; 34], o: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        o[j] = (b[2 + j] as i8) as f32 * d;
    }
}

fn q2_k(b: &[u8; 84], o: &mut [f32; 256]) {
    let (scales, rest) = b.split_at(16);
    let (qs, dd) = rest.split_at(64);
    let d = f16_at(dd, 0);
    let dmin = f16_at(dd, 2);
    for g in 0..16 {
        let sc = scales[g];
        let dl = d * (sc & 0x0F) as f32;
        let ml = dmin * (sc >> 4) as f32;
        // Group g covers elements 16g..16g+16: half j = g / 8, shift s = (g / 2) % 4,
        // bytes 32j + 16(g % 2) ..
        let j = g / 8;
        let s = (g / 2) % 4;
        let base = 32 * j + 16 * (g % 2);
        for l in 0..16 {
            let q = (qs[base + l] >> (2 * s)) & 3;
            o[16 * g + l] = dl * q as f32 - ml;
        }
    }
}

fn q3_k(b: &[u8; 110], o: &mut [f32; 256]) {
    let (hmask, rest) = b.split_at(32);
    let (qs, rest) = rest.split_at(64);
    let (sc, dd) = rest.split_at(12);
    let d = f16_at(dd, 0);
    for g in 0..16 {
        let low = if g < 8 { sc[g] & 0x0F } else { sc[g - 8] >> 4 };
        let high = (sc[8 + g % 4] >> (2 * (g / 4))) & 3;
        let scale = ((low | (high << 4)) as i32 - 32) as f32;
        let dl = d * scale;
        // Elements 16g..16g+16 lie in 32-element row r = g / 2 (half j = r / 4,
        // shift s = r % 4), at l = 16(g % 2) ..
        let r = g / 2;
        let j = r / 4;
        let s = r % 4;
        for i in 0..16 {
            let l = 16 * (g % 2) + i;
            let ql = ((qs[32 * j + l] >> (2 * s)) & 3) as i32;
            let h = ((hmask[l] >> r) & 1) as i32;
            let q = ql - ((h ^ 1) << 2);
            o[16 * g + i] = dl * q as f32;
        }
    }
}

/// The 6-bit scales and mins of Q4_K and Q5_K.
#[inline(always)]
fn scale_min_k4(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 2) & 0x30),
            (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30),
        )
    }
}

fn q4_k(b: &[u8; 144], o: &mut [f32; 256]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let (scales, qs) = b[4..].split_at(12);
    for sb in 0..8 {
        let (sc, m) = scale_min_k4(scales, sb);
        let dl = d * sc as f32;
        let ml = dmin * m as f32;
        let c = sb / 2;
        let shift = 4 * (sb % 2);
        for l in 0..32 {
            let q = (qs[32 * c + l] >> shift) & 0x0F;
            o[32 * sb + l] = dl * q as f32 - ml;
        }
    }
}

fn q5_k(b: &[u8; 176], o: &mut [f32; 256]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let (scales, rest) = b[4..].split_at(12);
    let (qh, qs) = rest.split_at(32);
    for sb in 0..8 {
        let (sc, m) = scale_min_k4(scales, sb);
        let dl = d * sc as f32;
        let ml = dmin * m as f32;
        let c = sb / 2;
        let shift = 4 * (sb % 2);
        for l in 0..32 {
            let q = ((qs[32 * c + l] >> shift) & 0x0F) | (((qh[l] >> sb) & 1) << 4);
            o[32 * sb + l] = dl * q as f32 - ml;
        }
    }
}

fn q6_k(b: &[u8; 210], o: &mut [f32; 256]) {
    let (ql, rest) = b.split_at(128);
    let (qh, rest) = rest.split_at(64);
    let (scales, dd) = rest.split_at(16);
    let d = f16_at(dd, 0);
    // Each half of 128 elements: quarter k holds elements 32k..32k+32 of the half,
    // low nibbles from ql[64j + l (+32)], high bits from qh[32j + l] >> 2k.
    for j in 0..2 {
        let ql = &ql[64 * j..64 * j + 64];
        let qh = &qh[32 * j..32 * j + 32];
        let o = &mut o[128 * j..128 * j + 128];
        for half16 in 0..2 {
            let dl: [f32; 4] =
                std::array::from_fn(|k| d * (scales[8 * j + 2 * k + half16] as i8) as f32);
            for i in 0..16 {
                let l = 16 * half16 + i;
                let (a, c, h) = (ql[l], ql[l + 32], qh[l]);
                let q0 = ((a & 0x0F) | ((h & 3) << 4)) as i32 - 32;
                let q1 = ((c & 0x0F) | (((h >> 2) & 3) << 4)) as i32 - 32;
                let q2 = ((a >> 4) | (((h >> 4) & 3) << 4)) as i32 - 32;
                let q3 = ((c >> 4) | (((h >> 6) & 3) << 4)) as i32 - 32;
                o[l] = dl[0] * q0 as f32;
                o[l + 32] = dl[1] * q1 as f32;
                o[l + 64] = dl[2] * q2 as f32;
                o[l + 96] = dl[3] * q3 as f32;
            }
        }
    }
}

/// Plain float types: one element per "block", converted in runs.
fn run_floats(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    bytes
        .par_chunks(ty.type_size() * ELEMS_PER_TASK)
        .zip(out.par_chunks_mut(ELEMS_PER_TASK))
        .for_each(|(src, dst)| match ty {
            GgmlType::F16 => {
                for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *o = f16_to_f32(u16::from_le_bytes([c[0], c[1]]));
                }
            }
            GgmlType::BF16 => {
                for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *o = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
                }
            }
            _ => {
                for (o, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
        });
}

/// Dequantises `bytes` of type `ty` into `out` (row-major, one f32 per element).
///
/// `bytes` must hold exactly `out.len()` elements in whole blocks.
pub fn dequantize_into(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), DequantError> {
    let (bs, ts) = (ty.block_size(), ty.type_size());
    let n_blocks = out.len() / bs;
    if !out.len().is_multiple_of(bs) || n_blocks.checked_mul(ts) != Some(bytes.len()) {
        return Err(DequantError::SizeMismatch {
            ggml_type: ty,
            n_bytes: bytes.len(),
            n_elements: out.len(),
        });
    }
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => run_floats(ty, bytes, out),
        GgmlType::Q4_0 => run(bytes, out, q4_0),
        GgmlType::Q4_1 => run(bytes, out, q4_1),
        GgmlType::Q5_0 => run(bytes, out, q5_0),
        GgmlType::Q5_1 => run(bytes, out, q5_1),
        GgmlType::Q8_0 => run(bytes, out, q8_0),
        GgmlType::Q2_K => run(bytes, out, q2_k),
        GgmlType::Q3_K => run(bytes, out, q3_k),
        GgmlType::Q4_K => run(bytes, out, q4_k),
        GgmlType::Q5_K => run(bytes, out, q5_k),
        GgmlType::Q6_K => run(bytes, out, q6_k),
        other => return Err(DequantError::Unsupported(other)),
    }
    Ok(())
}

/// Dequantises `bytes` of type `ty` holding `n_elements` elements.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n_elements: usize) -> Result<Vec<f32>, DequantError> {
    if !ty.can_dequantize() {
        return Err(DequantError::Unsupported(ty));
    }
    let bs = ty.block_size();
    // Refuse before allocating: the output must match the input's block count.
    if !n_elements.is_multiple_of(bs)
        || (n_elements / bs).checked_mul(ty.type_size()) != Some(bytes.len())
    {
        return Err(DequantError::SizeMismatch {
            ggml_type: ty,
            n_bytes: bytes.len(),
            n_elements,
        });
    }
    let mut out = vec![0f32; n_elements];
    dequantize_into(ty, bytes, &mut out)?;
    Ok(out)
}
