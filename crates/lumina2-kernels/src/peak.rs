//! The arithmetic peak of this CPU, measured: how many floating-point
//! operations per second one thread can issue with no memory traffic at all,
//! for each instruction family the kernels use. A GEMM's achieved GFLOP/s is
//! judged against these figures (`cargo run -p xtask --release --example
//! peak_probe`).
//!
//! Each loop keeps every operand in registers (or tiles) and runs enough
//! independent accumulators to cover the instruction's latency, so it is
//! bound by issue throughput only:
//! - AVX-512 f32 FMA (`vfmadd231ps zmm`): 16 lanes x 2 FLOP an instruction;
//! - AVX512-BF16 dot (`vdpbf16ps zmm`): 32 bf16 products summed into 16 f32
//!   lanes, 64 FLOP an instruction;
//! - AMX-BF16 (`tdpbf16ps`): a 16x32 by 32x16 bf16 tile product into 16x16
//!   f32 sums, 16384 FLOP an instruction.
//!
//! The loops are written in assembly (nothing spills to memory, nothing is
//! folded away); the operands are finite and small, so no denormal or
//! overflow slows a unit down.

/// One measured peak.
#[derive(Debug, Clone, Copy)]
pub struct Peak {
    /// Floating-point operations counted (2 per multiply-add).
    pub flop: f64,
    /// Wall time of the loop, seconds.
    pub seconds: f64,
    /// A value computed by the loop (keeps it from being optimised away).
    pub checksum: f32,
}

impl Peak {
    /// GFLOP/s.
    pub fn gflops(&self) -> f64 {
        self.flop / self.seconds / 1e9
    }
}

/// Times `run(iters)` (the loop runs at least once), counting
/// `flop_per_iter` operations an iteration.
#[cfg(target_arch = "x86_64")]
fn timed(iters: usize, flop_per_iter: f64, run: impl FnOnce(usize) -> f32) -> Peak {
    let t = std::time::Instant::now();
    let checksum = run(iters);
    Peak {
        flop: iters.max(1) as f64 * flop_per_iter,
        seconds: t.elapsed().as_secs_f64(),
        checksum,
    }
}

/// AVX-512 f32 FMA peak of the calling thread over `iters` iterations of 12
/// independent FMAs; `None` where the CPU lacks AVX-512F or the portable
/// paths are forced.
pub fn avx512_f32_fma(iters: usize) -> Option<Peak> {
    #[cfg(target_arch = "x86_64")]
    if crate::caps().avx512f_fma {
        // SAFETY: AVX-512F is present (checked above).
        return Some(timed(iters, 12.0 * 32.0, |n| unsafe { x86::fma_loop(n) }));
    }
    let _ = iters;
    None
}

/// AVX512-BF16 `vdpbf16ps` peak of the calling thread (12 independent dot
/// products an iteration); `None` without AVX512-BF16.
pub fn avx512_bf16_dot(iters: usize) -> Option<Peak> {
    #[cfg(target_arch = "x86_64")]
    if crate::caps().avx512_bf16 {
        // SAFETY: AVX512-BF16 is present (checked above).
        return Some(timed(iters, 12.0 * 64.0, |n| unsafe {
            x86::bf16_dot_loop(n)
        }));
    }
    let _ = iters;
    None
}

/// AMX-BF16 `tdpbf16ps` peak of the calling thread (four independent tile
/// products an iteration, operands resident in tiles); `None` without usable
/// AMX (the CPU, the Linux tile permission, or `LUMINA2_NO_AMX`).
pub fn amx_bf16(iters: usize) -> Option<Peak> {
    #[cfg(target_arch = "x86_64")]
    if crate::caps().amx_bf16 {
        // SAFETY: AMX-BF16 is usable in this process (checked above,
        // including the tile permission).
        return Some(timed(iters, 4.0 * 16384.0, |n| unsafe { x86::amx_loop(n) }));
    }
    let _ = iters;
    None
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::arch::x86_64::*;

    use crate::gemm::packed::tile_config;

    /// Twelve independent `vfmadd231ps` chains in zmm0-zmm11, the operands
    /// in zmm12/zmm13: written in assembly so that nothing spills to memory.
    ///
    /// # Safety
    /// AVX-512F must be present.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma_loop(iters: usize) -> f32 {
        let a = _mm512_set1_ps(0.999_999);
        let b = _mm512_set1_ps(1e-7);
        let mut out = [0f32; 16];
        unsafe {
            asm!(
                "vbroadcastss zmm0, [{one}]",
                "vmovaps zmm1, zmm0", "vmovaps zmm2, zmm0", "vmovaps zmm3, zmm0",
                "vmovaps zmm4, zmm0", "vmovaps zmm5, zmm0", "vmovaps zmm6, zmm0",
                "vmovaps zmm7, zmm0", "vmovaps zmm8, zmm0", "vmovaps zmm9, zmm0",
                "vmovaps zmm10, zmm0", "vmovaps zmm11, zmm0",
                "2:",
                "vfmadd213ps zmm0, {a}, {b}", "vfmadd213ps zmm1, {a}, {b}",
                "vfmadd213ps zmm2, {a}, {b}", "vfmadd213ps zmm3, {a}, {b}",
                "vfmadd213ps zmm4, {a}, {b}", "vfmadd213ps zmm5, {a}, {b}",
                "vfmadd213ps zmm6, {a}, {b}", "vfmadd213ps zmm7, {a}, {b}",
                "vfmadd213ps zmm8, {a}, {b}", "vfmadd213ps zmm9, {a}, {b}",
                "vfmadd213ps zmm10, {a}, {b}", "vfmadd213ps zmm11, {a}, {b}",
                "dec {n}",
                "jnz 2b",
                "vaddps zmm0, zmm0, zmm1", "vaddps zmm2, zmm2, zmm3",
                "vaddps zmm4, zmm4, zmm5", "vaddps zmm6, zmm6, zmm7",
                "vaddps zmm8, zmm8, zmm9", "vaddps zmm10, zmm10, zmm11",
                "vaddps zmm0, zmm0, zmm2", "vaddps zmm4, zmm4, zmm6",
                "vaddps zmm8, zmm8, zmm10", "vaddps zmm0, zmm0, zmm4",
                "vaddps zmm0, zmm0, zmm8",
                "vmovups [{out}], zmm0",
                one = in(reg) &1.0f32,
                a = in(zmm_reg) a,
                b = in(zmm_reg) b,
                n = inout(reg) iters.max(1) => _,
                out = in(reg) out.as_mut_ptr(),
                out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
                out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
                out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                options(nostack)
            );
        }
        out.iter().sum()
    }

    /// Twelve independent `vdpbf16ps` chains in zmm0-zmm11, as [`fma_loop`].
    ///
    /// # Safety
    /// AVX512-BF16 (and AVX-512F) must be present.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn bf16_dot_loop(iters: usize) -> f32 {
        let x = _mm512_set1_ps(1e-3);
        let a: __m512bh = _mm512_cvtne2ps_pbh(x, x);
        let mut out = [0f32; 16];
        unsafe {
            asm!(
                "vpxord zmm0, zmm0, zmm0",
                "vmovaps zmm1, zmm0", "vmovaps zmm2, zmm0", "vmovaps zmm3, zmm0",
                "vmovaps zmm4, zmm0", "vmovaps zmm5, zmm0", "vmovaps zmm6, zmm0",
                "vmovaps zmm7, zmm0", "vmovaps zmm8, zmm0", "vmovaps zmm9, zmm0",
                "vmovaps zmm10, zmm0", "vmovaps zmm11, zmm0",
                "2:",
                "vdpbf16ps zmm0, {a}, {a}", "vdpbf16ps zmm1, {a}, {a}",
                "vdpbf16ps zmm2, {a}, {a}", "vdpbf16ps zmm3, {a}, {a}",
                "vdpbf16ps zmm4, {a}, {a}", "vdpbf16ps zmm5, {a}, {a}",
                "vdpbf16ps zmm6, {a}, {a}", "vdpbf16ps zmm7, {a}, {a}",
                "vdpbf16ps zmm8, {a}, {a}", "vdpbf16ps zmm9, {a}, {a}",
                "vdpbf16ps zmm10, {a}, {a}", "vdpbf16ps zmm11, {a}, {a}",
                "dec {n}",
                "jnz 2b",
                "vaddps zmm0, zmm0, zmm1", "vaddps zmm2, zmm2, zmm3",
                "vaddps zmm4, zmm4, zmm5", "vaddps zmm6, zmm6, zmm7",
                "vaddps zmm8, zmm8, zmm9", "vaddps zmm10, zmm10, zmm11",
                "vaddps zmm0, zmm0, zmm2", "vaddps zmm4, zmm4, zmm6",
                "vaddps zmm8, zmm8, zmm10", "vaddps zmm0, zmm0, zmm4",
                "vaddps zmm0, zmm0, zmm8",
                "vmovups [{out}], zmm0",
                a = in(zmm_reg) a,
                n = inout(reg) iters.max(1) => _,
                out = in(reg) out.as_mut_ptr(),
                out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
                out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
                out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                options(nostack)
            );
        }
        out.iter().sum()
    }

    /// # Safety
    /// AMX-BF16 must be usable by this process (tile permission granted).
    pub unsafe fn amx_loop(iters: usize) -> f32 {
        let cfg = tile_config();
        // 16 rows x 64 bytes of bf16 ones / 1000 (0x3a83), one tile's worth.
        let ops = [0x3a83_u16; 16 * 32];
        let mut out = [0f32; 16 * 16];
        unsafe {
            asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack));
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                "tileloadd tmm4, [{p} + {ld}*1]",
                "tileloadd tmm5, [{p} + {ld}*1]",
                "tileloadd tmm6, [{p} + {ld}*1]",
                "tileloadd tmm7, [{p} + {ld}*1]",
                p = in(reg) ops.as_ptr(),
                ld = in(reg) 64usize,
                options(nostack)
            );
            asm!(
                "2:",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "dec {n}",
                "jnz 2b",
                n = inout(reg) iters.max(1) => _,
                options(nostack)
            );
            asm!(
                "tilestored [{p} + {ld}*1], tmm0",
                p = in(reg) out.as_mut_ptr(),
                ld = in(reg) 64usize,
                options(nostack)
            );
            asm!("tilerelease", options(nostack));
        }
        out.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_available_peak_runs_and_counts_its_work() {
        for (name, p) in [
            ("avx512 f32 fma", avx512_f32_fma(1000)),
            ("avx512 bf16 dot", avx512_bf16_dot(1000)),
            ("amx bf16", amx_bf16(1000)),
        ] {
            match p {
                Some(p) => {
                    assert!(p.checksum.is_finite() && p.checksum > 0.0, "{name}: {p:?}");
                    assert!(p.flop > 0.0 && p.seconds > 0.0, "{name}: {p:?}");
                    println!("{name}: ran");
                }
                None => println!("{name}: not on this CPU"),
            }
        }
    }
}
