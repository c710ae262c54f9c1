//! The AMX-INT8 block of the int8 GEMM (`tdpbssd`): 32x32 int32 sums in
//! tiles, the epilogue in AVX-512.

use super::{Epilogue, Out, PANEL};
use std::arch::asm;
use std::arch::x86_64::*;

use super::avx512::store_row;

/// Rows `r0..r1` times panels `p0..p1` with AMX-INT8: a 32x32 block in
/// tiles 0-3 (int32), A in tiles 4-5, B in tiles 6-7, over the whole
/// depth; the next step's tiles prefetched.
///
/// # Safety
/// AMX-INT8 is usable and granted; `a` holds the tiled inputs (see
/// `tile_rows`) in whole 32-row blocks covering `r1`; `data` is the
/// packed weight (`quads` quads a panel); `out` has `ldo`-wide rows
/// covering `r1`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn amx_block(
    a: &[i8],
    quads: usize,
    (r0, r1): (usize, usize),
    data: &[u32],
    (p0, p1): (usize, usize),
    epi: &Epilogue,
    out: Out,
) {
    let cfg = crate::gemm::packed::tile_config();
    let mut c = [0i32; 32 * 32];
    let steps = quads / 16;
    unsafe {
        asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack));
        for p in p0..p1 {
            let panel = data.as_ptr().add(p * quads * PANEL).cast::<u8>();
            let mut r = r0;
            while r < r1 {
                let h = 32.min(r1 - r);
                let arow = a.as_ptr().cast::<u8>().add((r / 16) * steps * 1024);
                crate::gemm::packed::zero_c();
                for s in 0..steps {
                    let ap = arow.add(s * 1024);
                    let bp = panel.add(s * 16 * PANEL * 4);
                    if s + 1 < steps {
                        crate::gemm::packed::prefetch_next(ap, steps * 1024, bp);
                    }
                    asm!(
                        "tileloadd tmm4, [{a0} + {lda}*1]",
                        "tileloadd tmm5, [{a1} + {lda}*1]",
                        "tileloadd tmm6, [{b0} + {ldb}*1]",
                        "tileloadd tmm7, [{b1} + {ldb}*1]",
                        "tdpbssd tmm0, tmm4, tmm6",
                        "tdpbssd tmm1, tmm4, tmm7",
                        "tdpbssd tmm2, tmm5, tmm6",
                        "tdpbssd tmm3, tmm5, tmm7",
                        a0 = in(reg) ap,
                        a1 = in(reg) ap.add(steps * 1024),
                        lda = in(reg) 64usize,
                        b0 = in(reg) bp,
                        b1 = in(reg) bp.add(64),
                        ldb = in(reg) PANEL * 4,
                        options(nostack)
                    );
                }
                // int32 sums: the same 4-byte lanes as f32.
                crate::gemm::packed::c_tiles(c.as_mut_ptr().cast(), 32, false);
                for i in 0..h {
                    let acc0 = _mm512_loadu_si512(c.as_ptr().add(i * 32).cast());
                    let acc1 = _mm512_loadu_si512(c.as_ptr().add(i * 32 + 16).cast());
                    store_row(acc0, acc1, r + i, p, epi, out);
                }
                r += h;
            }
        }
        asm!("tilerelease", options(nostack));
    }
}
