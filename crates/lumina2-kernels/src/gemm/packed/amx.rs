//! The AMX-BF16 forms of the packed GEMM: the tile configuration, the
//! 2x2-tile depth steps (shared with the flash attention and the bf16
//! convolution) and the block of rows times panels.

use std::arch::asm;
use std::arch::x86_64::*;

use super::avx512::store_row;
use super::{CHUNK_PAIRS, PANEL};

/// The tile configuration: palette 1, eight tiles of 16 rows x 64 bytes
/// (C: 16x16 f32; A: 16 rows x 32 bf16; B: 16 pairs x 16 columns). The
/// int8 kernel ([`crate::gemm::int8`]) uses the same shapes (64 int8 a row).
#[repr(C, align(64))]
pub(crate) struct TileConfig(pub(crate) [u8; 64]);

pub(crate) const fn tile_config() -> TileConfig {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64;
        c[48 + t] = 16;
        t += 1;
    }
    TileConfig(c)
}

/// `steps` depth steps of the 2x2 tile product: A tiles at `a0`/`a1`
/// (rows 64 bytes apart; `+a_step` bytes a step), B tiles at `b` (the two
/// 16-column halves of a panel, 64 bytes apart, rows 128 bytes apart;
/// `+b_step` bytes a step), accumulated into tiles 0-3 (tiles 4-7 are
/// overwritten). Shared with [`crate::attention::flash`].
///
/// # Safety
/// AMX-BF16 is usable with [`tile_config`] loaded; the tiles read are in
/// bounds.
#[inline(always)]
pub(crate) unsafe fn bf16_steps(
    a0: *const u8,
    a1: *const u8,
    a_step: usize,
    b: *const u8,
    b_step: usize,
    steps: usize,
) {
    for s in 0..steps {
        unsafe {
            asm!(
                "tileloadd tmm4, [{a0} + {lda}*1]",
                "tileloadd tmm5, [{a1} + {lda}*1]",
                "tileloadd tmm6, [{b0} + {ldb}*1]",
                "tileloadd tmm7, [{b1} + {ldb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0.add(s * a_step),
                a1 = in(reg) a1.add(s * a_step),
                lda = in(reg) 64usize,
                b0 = in(reg) b.add(s * b_step),
                b1 = in(reg) b.add(s * b_step + 64),
                ldb = in(reg) PANEL * 4,
                options(nostack)
            );
        }
    }
}

/// Prefetches into L1 the tiles of the next depth step of a 2x2 tile
/// product: the two A tiles after `ap` and after `ap + a_rows` (the
/// second row tile), the two B tiles after `bp` (2 KiB).
///
/// # Safety
/// None beyond pointer arithmetic: prefetches do not fault.
#[inline(always)]
pub(crate) unsafe fn prefetch_next(ap: *const u8, a_rows: usize, bp: *const u8) {
    for l in 0..16 {
        _mm_prefetch::<_MM_HINT_T0>(ap.wrapping_add(1024 + 64 * l).cast());
        _mm_prefetch::<_MM_HINT_T0>(ap.wrapping_add(a_rows + 1024 + 64 * l).cast());
    }
    for l in 0..32 {
        _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(2048 + 64 * l).cast());
    }
}

/// Zeroes tiles 0-3 (the 32x32 sums).
///
/// # Safety
/// AMX is usable with [`tile_config`] loaded.
#[inline(always)]
pub(crate) unsafe fn zero_c() {
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack)
        )
    };
}

/// Loads (`load`) or stores tiles 0-3 from/to the 32x32 f32 (or int32)
/// block at `c`, rows `ld` values apart: tiles 0/1 rows 0-15, columns
/// 0-15/16-31; tiles 2/3 rows 16-31.
///
/// # Safety
/// AMX is usable with [`tile_config`] loaded; the block is in bounds.
#[inline(always)]
pub(crate) unsafe fn c_tiles(c: *mut f32, ld: usize, load: bool) {
    unsafe {
        let (c0, c1, c2, c3) = (c, c.add(16), c.add(16 * ld), c.add(16 * ld + 16));
        if load {
            asm!(
                "tileloadd tmm0, [{c0} + {ldc}*1]",
                "tileloadd tmm1, [{c1} + {ldc}*1]",
                "tileloadd tmm2, [{c2} + {ldc}*1]",
                "tileloadd tmm3, [{c3} + {ldc}*1]",
                c0 = in(reg) c0, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3,
                ldc = in(reg) ld * 4,
                options(nostack)
            );
        } else {
            asm!(
                "tilestored [{c0} + {ldc}*1], tmm0",
                "tilestored [{c1} + {ldc}*1], tmm1",
                "tilestored [{c2} + {ldc}*1], tmm2",
                "tilestored [{c3} + {ldc}*1], tmm3",
                c0 = in(reg) c0, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3,
                ldc = in(reg) ld * 4,
                options(nostack)
            );
        }
    }
}

/// Rows `r0..r1` times panels `p0..p1` with AMX: a 32x32 block in tiles
/// 0-3 (f32), A in tiles 4-5, B in tiles 6-7, over the whole depth.
///
/// # Safety
/// AMX is usable; `a` holds the inputs tiled (see `matmul_with`) in whole
/// 32-row blocks covering `r1` (rounded up), `pairs` pairs wide; `data`
/// holds the panels of the packed weight (`ldo` columns) from panel
/// `first` on, covering `p0..p1`;
/// `bias` points at `p1 * 32` f32; `dest` covers rows `r0..r1` and the
/// columns of panels `p0..p1`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn amx_block(
    a: *const u32,
    pairs: usize,
    (r0, r1): (usize, usize),
    (data, first): (&[u32], usize),
    (p0, p1): (usize, usize),
    bias: *const f32,
    dest: super::Dest,
) {
    let cfg = tile_config();
    let mut c = [0f32; 32 * 32];
    // `a` is tiled: tile (row tile t, step s) at byte (t * steps + s) * 1024.
    let steps = pairs / 16;
    // Deep inputs in chunks: over the whole depth, a 32-row block of
    // inputs and a panel are 576 KiB each at 9216 inputs and the task's
    // blocks no longer fit L2 (the feed-forward's last layer ran at half
    // the speed of the others). Between chunks the sums wait in `acc`.
    let chunks = if pairs > 2 * CHUNK_PAIRS {
        pairs.div_ceil(CHUNK_PAIRS)
    } else {
        1
    };
    let chunk = pairs.div_ceil(chunks).div_ceil(16) * 16;
    let ld = (p1 - p0) * PANEL;
    let mut acc = crate::cpu::Aligned::<f32>::zeroed(match chunks {
        1 => 0,
        _ => (r1 - r0).div_ceil(32) * 32 * ld,
    });
    unsafe {
        asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack));
        for ci in 0..chunks {
            let (k0, k1) = (ci * chunk, ((ci + 1) * chunk).min(pairs));
            if k0 >= k1 {
                break;
            }
            for p in p0..p1 {
                let cols = PANEL.min(dest.cols - p * PANEL);
                let panel = data.as_ptr().add((p - first) * pairs * PANEL).cast::<u8>();
                let (m0, m1) = crate::simd::masks32(cols);
                let bias0 = _mm512_loadu_ps(bias.add(p * PANEL));
                let bias1 = _mm512_loadu_ps(bias.add(p * PANEL + 16));
                let mut r = r0;
                while r < r1 {
                    let h = 32.min(r1 - r);
                    let arow = a.cast::<u8>().add((r / 16) * steps * 1024);
                    // This block's sums between chunks (`r - r0` is a
                    // multiple of 32).
                    let saved = acc.as_mut_ptr().add((r - r0) * ld + (p - p0) * PANEL);
                    if k0 == 0 {
                        zero_c();
                    } else {
                        c_tiles(saved, ld, true);
                    }
                    let mut kk = k0;
                    while kk < k1 {
                        let ap = arow.add((kk / 16) * 1024);
                        let bp = panel.add(kk * PANEL * 4);
                        // The next step's tiles, into L1: a tile load that
                        // misses L1 stalls the multiplies that wait on it
                        // (1.1-1.5x on this project's machine).
                        if kk + 16 < k1 {
                            prefetch_next(ap, steps * 1024, bp);
                        }
                        bf16_steps(ap, ap.add(steps * 1024), 0, bp, 0, 1);
                        kk += 16;
                    }
                    if k1 < pairs {
                        c_tiles(saved, ld, false);
                        r += h;
                        continue;
                    }
                    c_tiles(c.as_mut_ptr(), 32, false);
                    for i in 0..h {
                        let acc0 = _mm512_loadu_ps(c.as_ptr().add(i * 32));
                        let acc1 = _mm512_loadu_ps(c.as_ptr().add(i * 32 + 16));
                        store_row(dest.at(r + i, p * PANEL), acc0, acc1, bias0, bias1, m0, m1);
                    }
                    r += h;
                }
            }
        }
        asm!("tilerelease", options(nostack));
    }
}
