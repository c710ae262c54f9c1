//! The AMX-BF16 product of a row-major weight with packed inputs: the
//! weight's rows are the A tiles (loaded with the file's row stride), the
//! inputs the B tiles, and the 32x32 sums are transposed on the way out.

use std::arch::asm;
use std::arch::x86_64::*;

use super::Operand;
use crate::cpu::Aligned;
use crate::gemm::packed::{c_tiles, store_row, tile_config, transpose16, zero_c, Out, CHUNK_PAIRS};

/// Per-thread sums between depth chunks and copied weight rows.
type Scratch = (Option<Aligned<f32>>, Option<Aligned<u8>>);

thread_local! {
    static SCRATCH: std::cell::Cell<Scratch> = const { std::cell::Cell::new((None, None)) };
}

/// One depth step: tiles 0-3 += (weight rows 0-15, 16-31 at `a`, rows `lda`
/// bytes apart) x (the two 16-token halves of the input panel at `b`).
/// Tile 0 is outputs 0-15 x tokens 0-15, tile 1 outputs 0-15 x tokens
/// 16-31, tiles 2/3 the same for outputs 16-31.
///
/// # Safety
/// AMX-BF16 usable with [`tile_config`] loaded; 32 rows of 64 bytes at `a`
/// and 1 KiB x 2 at `b` readable.
#[inline(always)]
unsafe fn step(a: *const u8, lda: usize, b: *const u8) {
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
            a0 = in(reg) a,
            a1 = in(reg) a.add(16 * lda),
            lda = in(reg) lda,
            b0 = in(reg) b,
            b1 = in(reg) b.add(64),
            ldb = in(reg) 128usize,
            options(nostack)
        );
    }
}

/// Output blocks `b0..b1` (32 outputs each) times token panels `t0..t1`
/// (32 tokens each) over the whole depth, in the depth chunks and order of
/// the packed kernel (`packed::amx::amx_block`), so the sums are the same
/// bits; the bias added and rounded once to bf16 into `out` (`rows` rows
/// of `w.out_dim`).
///
/// The blocks' weight rows of a depth chunk are first copied into a
/// contiguous buffer (at most 1.1 MiB, in L2) that every token panel then
/// reads: tile loads straight from the file's rows, a row stride of 4.5 or
/// 18 KiB apart, fall into a few L1 sets and were re-read from L2 or memory
/// for every panel (the forward ran 8-12% slower than on packed weights).
/// The copy reads each weight row once, in order.
///
/// # Safety
/// AMX is usable; `w`'s pointers are valid as [`Operand`] says; `x` holds
/// the packed inputs (`pairs` pairs a panel) covering panel `t1 - 1`;
/// `bias` points at `b1 * 32` f32; tasks write disjoint blocks of `out`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn block(
    w: &Operand,
    x: &[u32],
    pairs: usize,
    rows: usize,
    (t0, t1): (usize, usize),
    (b0, b1): (usize, usize),
    bias: *const f32,
    out: *mut u16,
) {
    let cfg = tile_config();
    let mut c = [0f32; 32 * 32];
    // Depth chunks of at most `CHUNK_PAIRS` pairs (72 steps), for every
    // depth: the blocks' rows of a chunk (8 x 144 KiB) and a token panel's
    // (144 KiB) stay in L2 while every panel and block reads them. Whole
    // 3840-deep rows (Z-Image's width, in one chunk before) made the
    // buffer 1.9 MiB and ran 15-20% slower (`gemm_probe mapped zimage`).
    // The chunking does not change the sums' bits: the partial sums wait
    // in `acc` in f32, as they would in the tiles.
    let chunks = pairs.div_ceil(CHUNK_PAIRS).max(1);
    let chunk = pairs.div_ceil(chunks).div_ceil(16) * 16;
    let panels = t1 - t0;
    // Both buffers are this thread's, kept between calls: fresh ones were
    // 2 MiB of new pages to fault in and zero per call. Every element read
    // is written first (`acc` at chunk 0, the rows before their panel).
    let (old_acc, old_rows) = SCRATCH.with(|s| s.take());
    let mut acc = Aligned::reuse_unzeroed(
        old_acc,
        match chunks {
            1 => 0,
            _ => (b1 - b0) * panels * 1024,
        },
    );
    // One depth chunk of the blocks' rows: 2 KiB (32 rows x 64 bytes) a
    // step and block.
    let steps = chunk.div_ceil(16);
    let mut rows_buf = Aligned::reuse_unzeroed(old_rows, (b1 - b0) * steps * 2048);
    unsafe {
        asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack));
        for ci in 0..chunks {
            let (k0, k1) = (ci * chunk, ((ci + 1) * chunk).min(pairs));
            if k0 >= k1 {
                break;
            }
            let (s0, s1) = (k0 / 16, k1 / 16);
            let buf = rows_buf.as_mut_ptr();
            for ob in b0..b1 {
                let dst = buf.add((ob - b0) * steps * 2048);
                for r in 0..32 {
                    for s in s0..s1 {
                        let (a, lda) = w.a_tiles(ob, s);
                        let v = _mm512_loadu_si512(a.add(r * lda).cast());
                        _mm512_storeu_si512(dst.add((s - s0) * 2048 + r * 64).cast(), v);
                    }
                }
            }
            // Tokens outside, blocks inside: a token panel is read from
            // memory once and used by every block of the group in L2.
            for tp in t0..t1 {
                for ob in b0..b1 {
                    let o0 = ob * 32;
                    let cols = 32.min(w.out_dim - o0);
                    let (m0, m1) = crate::simd::masks32(cols);
                    let bias0 = _mm512_loadu_ps(bias.add(o0));
                    let bias1 = _mm512_loadu_ps(bias.add(o0 + 16));
                    let wb = buf.add((ob - b0) * steps * 2048);
                    let saved = acc
                        .as_mut_ptr()
                        .add(((ob - b0) * panels + (tp - t0)) * 1024);
                    if k0 == 0 {
                        zero_c();
                    } else {
                        c_tiles(saved, 32, true);
                    }
                    let panel = x.as_ptr().add(tp * pairs * 32).cast::<u8>();
                    for s in s0..s1 {
                        let b = panel.add(s * 2048);
                        if s + 1 < s1 {
                            for l in 0..32 {
                                _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(2048 + 64 * l).cast());
                            }
                        }
                        step(wb.add((s - s0) * 2048), 64, b);
                    }
                    if k1 < pairs {
                        c_tiles(saved, 32, false);
                        continue;
                    }
                    // c[o * 32 + t]: outputs down, tokens across.
                    c_tiles(c.as_mut_ptr(), 32, false);
                    let quadrant = |oh: usize, th: usize| {
                        let mut r = [_mm512_setzero_si512(); 16];
                        for (i, v) in r.iter_mut().enumerate() {
                            *v = _mm512_loadu_si512(
                                c.as_ptr().add((oh * 16 + i) * 32 + th * 16).cast(),
                            );
                        }
                        transpose16(r)
                    };
                    let h = 32.min(rows - tp * 32);
                    for th in 0..h.div_ceil(16) {
                        let (lo, hi) = (quadrant(0, th), quadrant(1, th));
                        for j in 0..16.min(h - th * 16) {
                            let t = tp * 32 + th * 16 + j;
                            store_row(
                                Out::Bf16(out.add(t * w.out_dim + o0)),
                                _mm512_castsi512_ps(lo[j]),
                                _mm512_castsi512_ps(hi[j]),
                                bias0,
                                bias1,
                                m0,
                                m1,
                            );
                        }
                    }
                }
            }
        }
        asm!("tilerelease", options(nostack));
    }
    SCRATCH.with(|s| s.set((Some(acc), Some(rows_buf))));
}
