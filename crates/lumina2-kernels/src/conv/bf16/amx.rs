//! The AMX-BF16 form of [`super::ConvBf16`]: the input packed into B panels
//! with AVX-512 masked loads (upsampling and strides resolved while
//! packing), multiplied by the weight's A tiles.

use std::arch::asm;
use std::arch::x86_64::*;

use super::{ConvBf16, Source, PANEL};
use crate::gemm::packed::{
    bf16_steps, c_tiles, prefetch_next, store_row, tile_config, zero_c, Out,
};

/// How a panel's vectors are read from an input row.
#[derive(Clone, Copy)]
enum Read {
    /// Stride 1, no upsampling: one masked load per vector.
    Direct,
    /// Stride 1, nearest 2x upsampling, left padding <= 2, kernel <= 3:
    /// one masked load of source columns from `ox0 / 2 - 1` and a lane
    /// permutation (`(j + kx - pad) div 2 + 1` for output lane `j`).
    Up2,
    /// Anything else: a gather, lane by lane.
    Gather,
}

fn read_mode(s: &Source) -> Read {
    let g = s.g;
    match (g.stride, g.upsample) {
        (1, 1) => Read::Direct,
        (1, 2) if g.pad.1 <= 2 && s.kernel <= 3 => Read::Up2,
        _ => Read::Gather,
    }
}

/// Lanes `lo..hi` (clamped to 0..32).
#[inline(always)]
fn lanes(lo: isize, hi: isize) -> __mmask32 {
    let lo = lo.clamp(0, 32) as u32;
    let hi = hi.clamp(0, 32) as u32;
    if hi <= lo {
        return 0;
    }
    let upto = |n: u32| if n >= 32 { u32::MAX } else { (1u32 << n) - 1 };
    upto(hi) & !upto(lo)
}

/// Packs panel `q`: `pairs` rows of 32 lanes, lane `j` of row `i` holding
/// the input values of `k = 2i` (low half) and `2i + 1` (high half) for
/// the panel's pixel `j`; zeros past the depth.
///
/// # Safety
/// AVX-512F/BW are available; `dst` holds `pairs * 32` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn pack(s: &Source, q: usize, dst: &mut [u32]) {
    let p = s.panel(q);
    let plane = s.h * s.w;
    let item = &s.x[p.item * s.c_in * plane..(p.item + 1) * s.c_in * plane];
    let mode = read_mode(s);
    let (pt, pl) = (s.g.pad.0 as isize, s.g.pad.1 as isize);
    let (h, w) = (s.h as isize, s.w as isize);
    // Interleaving indices: lane 2j <- v0[j], 2j + 1 <- v1[j] (low half:
    // j < 16; high half: j >= 16).
    let mut lo_idx = [0u16; 32];
    let mut hi_idx = [0u16; 32];
    for j in 0..16 {
        lo_idx[2 * j] = j as u16;
        lo_idx[2 * j + 1] = 32 + j as u16;
        hi_idx[2 * j] = 16 + j as u16;
        hi_idx[2 * j + 1] = 48 + j as u16;
    }
    // The upsampling's lane permutation per kernel column.
    let mut up_idx = [[0u16; 32]; 3];
    if let Read::Up2 = mode {
        for (kx, idx) in up_idx.iter_mut().enumerate().take(s.kernel) {
            for (j, v) in idx.iter_mut().enumerate() {
                *v = ((j as isize + kx as isize - pl).div_euclid(2) + 1) as u16;
            }
        }
    }
    unsafe {
        let lo_idx = _mm512_loadu_si512(lo_idx.as_ptr().cast());
        let hi_idx = _mm512_loadu_si512(hi_idx.as_ptr().cast());
        let mut rows = Rows {
            out: dst.as_mut_ptr(),
            row: 0,
            pending: None,
            lo_idx,
            hi_idx,
        };
        for ci in 0..s.c_in {
            let chan = item.as_ptr().add(ci * plane).cast::<i16>();
            for ky in 0..s.kernel {
                match mode {
                    Read::Direct => {
                        let iy = p.oy as isize + ky as isize - pt;
                        for kx in 0..s.kernel {
                            let col0 = p.ox0 as isize + kx as isize - pl;
                            let v = if iy < 0 || iy >= h {
                                _mm512_setzero_si512()
                            } else {
                                let m = lanes(-col0, (w - col0).min(p.cols as isize));
                                // Masked-off lanes are not read (they may
                                // lie outside the row, even the tensor).
                                let at = chan.wrapping_offset(iy * w + col0);
                                _mm512_maskz_loadu_epi16(m, at)
                            };
                            rows.push(v);
                        }
                    }
                    Read::Up2 => {
                        let iy_up = p.oy as isize + ky as isize - pt;
                        let src = if iy_up < 0 || iy_up >= 2 * h {
                            None
                        } else {
                            let s0 = p.ox0 as isize / 2 - 1;
                            let m = lanes(-s0, w - s0);
                            let at = chan.wrapping_offset((iy_up / 2) * w + s0);
                            Some(_mm512_maskz_loadu_epi16(m, at))
                        };
                        for idx in up_idx.iter().take(s.kernel) {
                            let v = match src {
                                None => _mm512_setzero_si512(),
                                Some(v) => _mm512_permutexvar_epi16(
                                    _mm512_loadu_si512(idx.as_ptr().cast()),
                                    v,
                                ),
                            };
                            rows.push(v);
                        }
                    }
                    Read::Gather => {
                        let (st, up) = (s.g.stride as isize, s.g.upsample as isize);
                        let iy_up = p.oy as isize * st + ky as isize - pt;
                        for kx in 0..s.kernel {
                            let mut vals = [0i16; 32];
                            if iy_up >= 0 && iy_up < h * up {
                                for (j, v) in vals.iter_mut().enumerate().take(p.cols) {
                                    let ix_up = (p.ox0 + j) as isize * st + kx as isize - pl;
                                    if ix_up >= 0 && ix_up < w * up {
                                        *v = *chan.offset((iy_up / up) * w + ix_up / up);
                                    }
                                }
                            }
                            rows.push(_mm512_loadu_si512(vals.as_ptr().cast()));
                        }
                    }
                }
            }
        }
        rows.finish(s.pairs);
    }
}

/// Writes the packed rows of a panel: vectors of consecutive `k` arrive
/// one at a time and leave interleaved two by two.
struct Rows {
    out: *mut u32,
    row: usize,
    pending: Option<__m512i>,
    lo_idx: __m512i,
    hi_idx: __m512i,
}

impl Rows {
    /// The vector of the next `k`.
    ///
    /// # Safety
    /// AVX-512BW is available; the row written is inside the panel.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn push(&mut self, v: __m512i) {
        match self.pending.take() {
            None => self.pending = Some(v),
            Some(v0) => unsafe {
                let d = self.out.add(self.row * PANEL).cast::<__m512i>();
                _mm512_storeu_si512(d, _mm512_permutex2var_epi16(v0, self.lo_idx, v));
                _mm512_storeu_si512(d.add(1), _mm512_permutex2var_epi16(v0, self.hi_idx, v));
                self.row += 1;
            },
        }
    }

    /// Completes the last pair with a zero and zeroes the rows up to `pairs`.
    ///
    /// # Safety
    /// As [`Self::push`]; the panel holds `pairs` rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn finish(&mut self, pairs: usize) {
        unsafe {
            if self.pending.is_some() {
                self.push(_mm512_setzero_si512());
            }
            while self.row < pairs {
                let d = self.out.add(self.row * PANEL).cast::<__m512i>();
                _mm512_storeu_si512(d, _mm512_setzero_si512());
                _mm512_storeu_si512(d.add(1), _mm512_setzero_si512());
                self.row += 1;
            }
        }
    }
}

/// The 32x32 f32 sums of one tile block, 64-byte aligned for the tile
/// stores.
#[repr(C, align(64))]
struct Block([f32; 32 * 32]);

/// Multiplies the packed panels `qs` (in `buf`) by every output channel
/// and writes them, bias added and rounded to bf16, to `out`
/// (`[batch, c_out, ho, wo]`).
///
/// # Safety
/// AMX-BF16 is usable and AVX-512F/BW/VL/BF16 available; `buf` holds the
/// panels `qs` packed by [`pack`]; `out` points at the whole output, and
/// no other writer touches these panels' pixels.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn multiply(
    conv: &ConvBf16,
    s: &Source,
    buf: &[u32],
    qs: std::ops::Range<usize>,
    out: *mut u16,
) {
    let cfg = tile_config();
    let steps = conv.width / 32;
    let pairs = conv.width / 2;
    let mut c = Block([0f32; 32 * 32]);
    unsafe {
        asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack));
        for cb in 0..conv.c_out.div_ceil(32) {
            // Row tiles 2cb and 2cb + 1: tile (t, step) at byte (t * steps + step) * 1024.
            let a0 = conv.a.as_ptr().cast::<u8>().add(2 * cb * steps * 1024);
            let a1 = a0.add(steps * 1024);
            let rows = 32.min(conv.c_out - cb * 32);
            for q in qs.clone() {
                let bp = buf
                    .as_ptr()
                    .add((q - qs.start) * pairs * PANEL)
                    .cast::<u8>();
                zero_c();
                for st in 0..steps {
                    // The next step's tiles into L1 (see `packed::amx_block`).
                    if st + 1 < steps {
                        prefetch_next(a0.add(st * 1024), steps * 1024, bp.add(st * 2048));
                    }
                    bf16_steps(
                        a0.add(st * 1024),
                        a1.add(st * 1024),
                        0,
                        bp.add(st * 2048),
                        0,
                        1,
                    );
                }
                c_tiles(c.0.as_mut_ptr(), 32, false);
                let p = s.panel(q);
                let (m0, m1) = crate::simd::masks32(p.cols);
                for i in 0..rows {
                    let co = cb * 32 + i;
                    let bias = _mm512_set1_ps(conv.bias[co]);
                    let at = ((p.item * conv.c_out + co) * s.ho + p.oy) * s.wo + p.ox0;
                    store_row(
                        Out::Bf16(out.add(at)),
                        _mm512_loadu_ps(c.0.as_ptr().add(i * 32)),
                        _mm512_loadu_ps(c.0.as_ptr().add(i * 32 + 16)),
                        bias,
                        bias,
                        m0,
                        m1,
                    );
                }
            }
        }
        asm!("tilerelease", options(nostack));
    }
}
