//! The one capability probe: which instruction sets this CPU has, which of
//! them the kernels may use, computed once per process.
//!
//! Every kernel asks [`caps`] rather than the CPU or the environment, so one
//! place decides which path runs and one table (the crate README) documents
//! the switches:
//!
//! | Variable | Effect |
//! |---|---|
//! | `LUMINA2_PORTABLE=1` | every kernel takes its portable path (no x86 SIMD, no AMX) |
//! | `LUMINA2_NO_AMX=1` | no AMX: the bf16 kernels use AVX512-BF16, int8 uses VNNI |
//! | `LUMINA2_NO_PACKED_BF16=1` | bf16 linear weights are not repacked (candle's matmul) |
//! | `LUMINA2_NO_AVX512_CONV=1` | the f32 convolution keeps its AVX2 kernel |
//! | `LUMINA2_NO_MMAP=1` | bf16 safetensors weights are copied into the packed layout at load instead of used in place from a memory map |
//! | `LUMINA2_SYSTEM_MALLOC=1` | [`crate::memory::keep_freed_memory`] leaves glibc's malloc as configured |
//!
//! A switch counts when its value is exactly `1`; it is read once, at the
//! first call to [`caps`].

use std::sync::OnceLock;

/// What the CPU reports, before any switch: the raw answer for callers that
/// must mirror another program's choice (e.g. which kernels PyTorch picks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuFeatures {
    /// AVX2.
    pub avx2: bool,
    /// FMA3.
    pub fma: bool,
    /// AVX-512 Foundation.
    pub avx512f: bool,
    /// AVX-512 byte and word instructions.
    pub avx512bw: bool,
    /// AVX-512 vector-length extensions (256- and 128-bit forms).
    pub avx512vl: bool,
    /// AVX-512 doubleword and quadword instructions.
    pub avx512dq: bool,
    /// AVX-512 bf16 conversions and dot products.
    pub avx512_bf16: bool,
    /// AVX-512 int8 dot products (VNNI).
    pub avx512_vnni: bool,
    /// AMX tiles with bf16 products (AMX-TILE and AMX-BF16).
    pub amx_bf16: bool,
    /// AMX int8 products (AMX-INT8).
    pub amx_int8: bool,
}

impl CpuFeatures {
    /// Asks the CPU (all false off x86-64).
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            x86::detect()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Self::default()
        }
    }
}

/// The environment switches, as read once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `LUMINA2_PORTABLE=1`.
    pub portable: bool,
    /// `LUMINA2_NO_AMX=1`.
    pub no_amx: bool,
    /// `LUMINA2_NO_PACKED_BF16=1`.
    pub no_packed_bf16: bool,
    /// `LUMINA2_NO_AVX512_CONV=1`.
    pub no_avx512_conv: bool,
    /// `LUMINA2_NO_MMAP=1`.
    pub no_mmap: bool,
}

impl Overrides {
    fn from_env() -> Self {
        let on = |name: &str| std::env::var_os(name).is_some_and(|v| v == "1");
        Self {
            portable: on("LUMINA2_PORTABLE"),
            no_amx: on("LUMINA2_NO_AMX"),
            no_packed_bf16: on("LUMINA2_NO_PACKED_BF16"),
            no_avx512_conv: on("LUMINA2_NO_AVX512_CONV"),
            no_mmap: on("LUMINA2_NO_MMAP"),
        }
    }
}

/// The kernel paths this process may take: the CPU's features less what the
/// switches turn off. Each field names the features one kernel family needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// The CPU's own answer, switches not applied.
    pub cpu: CpuFeatures,
    /// The switches read from the environment.
    pub overrides: Overrides,
    /// AVX2 and FMA: the f32 convolution, group norm and VAE attention.
    pub avx2_fma: bool,
    /// AVX-512F and FMA: the f32 flash attention.
    pub avx512f_fma: bool,
    /// AVX-512F and BW: int8 row quantisation.
    pub avx512bw: bool,
    /// AVX-512F: the f32 convolution's wide kernel (unless
    /// `LUMINA2_NO_AVX512_CONV`) and the softmax kernels.
    pub avx512f: bool,
    /// AVX-512F/BW/VL and BF16: the packed bf16 GEMM, softmax and fused
    /// element-wise kernels.
    pub avx512_bf16: bool,
    /// AVX-512F/BW/VL and VNNI: the int8 GEMM without AMX.
    pub avx512_vnni: bool,
    /// AMX-BF16 usable: the CPU has it and AVX512-BF16, Linux granted this
    /// process the tile state, and `LUMINA2_NO_AMX` is not set.
    pub amx_bf16: bool,
    /// AMX-INT8 usable (as [`Caps::amx_bf16`], and the CPU has AMX-INT8).
    pub amx_int8: bool,
    /// Bf16 linear weights are repacked for the packed GEMM: AVX512-BF16 and
    /// not `LUMINA2_NO_PACKED_BF16`.
    pub packed_bf16: bool,
    /// The f32 convolution may use its AVX-512 kernel.
    pub avx512_conv: bool,
    /// Bf16 linear weights may be multiplied in their file layout, from a
    /// memory map ([`crate::gemm::mapped`]): AMX-BF16 usable, packed bf16
    /// linear layers on, and not `LUMINA2_NO_MMAP`.
    pub mapped_bf16: bool,
}

impl Caps {
    /// The paths for `cpu` under `overrides`. Asks Linux for the AMX tile
    /// state when AMX would be used.
    fn new(cpu: CpuFeatures, overrides: Overrides) -> Self {
        let simd = !overrides.portable;
        let avx512_bf16 = simd && cpu.avx512f && cpu.avx512bw && cpu.avx512vl && cpu.avx512_bf16;
        let amx_bf16 = avx512_bf16 && cpu.amx_bf16 && !overrides.no_amx && amx_permitted();
        Self {
            cpu,
            overrides,
            avx2_fma: simd && cpu.avx2 && cpu.fma,
            avx512f_fma: simd && cpu.avx512f && cpu.fma,
            avx512bw: simd && cpu.avx512f && cpu.avx512bw,
            avx512f: simd && cpu.avx512f,
            avx512_bf16,
            avx512_vnni: simd && cpu.avx512f && cpu.avx512bw && cpu.avx512vl && cpu.avx512_vnni,
            amx_bf16,
            amx_int8: amx_bf16 && cpu.amx_int8,
            packed_bf16: avx512_bf16 && !overrides.no_packed_bf16,
            avx512_conv: simd && cpu.avx512f && !overrides.no_avx512_conv,
            mapped_bf16: amx_bf16 && !overrides.no_packed_bf16 && !overrides.no_mmap,
        }
    }

    /// The names of the x86 paths enabled, `"portable"` alone when none is
    /// (for test output and reports).
    pub fn paths(&self) -> Vec<&'static str> {
        let all = [
            (self.avx2_fma, "avx2+fma"),
            (self.avx512f, "avx512f"),
            (self.avx512_bf16, "avx512-bf16"),
            (self.avx512_vnni, "avx512-vnni"),
            (self.amx_bf16, "amx-bf16"),
            (self.amx_int8, "amx-int8"),
        ];
        let on: Vec<_> = all.iter().filter(|(on, _)| *on).map(|(_, n)| *n).collect();
        if on.is_empty() {
            vec!["portable"]
        } else {
            on
        }
    }
}

/// This process's kernel paths, probed once.
pub fn caps() -> &'static Caps {
    static CAPS: OnceLock<Caps> = OnceLock::new();
    CAPS.get_or_init(|| Caps::new(CpuFeatures::detect(), Overrides::from_env()))
}

/// Prints which kernel paths this process takes, for tests: the portable path
/// always runs (as the reference's comparison or on its own), the x86 paths
/// where [`caps`] lists them.
pub fn report_paths(test: &str) {
    eprintln!("{test}: kernel paths {:?}", caps().paths());
}

/// Whether Linux lets this process use the AMX tile registers.
fn amx_permitted() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        x86::request_tile_permission()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::arch::is_x86_feature_detected as has;
    use std::arch::x86_64::__cpuid_count;

    use super::CpuFeatures;

    pub fn detect() -> CpuFeatures {
        // CPUID.(7,0):EDX bit 22 AMX-BF16, bit 24 AMX-TILE, bit 25 AMX-INT8.
        let edx = __cpuid_count(7, 0).edx;
        let bit = |n: u32| (edx >> n) & 1 == 1;
        CpuFeatures {
            avx2: has!("avx2"),
            fma: has!("fma"),
            avx512f: has!("avx512f"),
            avx512bw: has!("avx512bw"),
            avx512vl: has!("avx512vl"),
            avx512dq: has!("avx512dq"),
            avx512_bf16: has!("avx512bf16"),
            avx512_vnni: has!("avx512vnni"),
            amx_bf16: bit(22) && bit(24),
            amx_int8: bit(25) && bit(24),
        }
    }

    /// Asks Linux for the tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM,
    /// XFEATURE_XTILEDATA)`); asking twice is harmless.
    pub fn request_tile_permission() -> bool {
        if !cfg!(target_os = "linux") {
            return false;
        }
        const ARCH_PRCTL: i64 = 158;
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        let ret: i64;
        // SAFETY: a Linux system call that only widens this process's
        // permitted XSAVE features; it touches no memory of ours.
        unsafe {
            asm!(
                "syscall",
                inlateout("rax") ARCH_PRCTL => ret,
                in("rdi") ARCH_REQ_XCOMP_PERM,
                in("rsi") XFEATURE_XTILEDATA,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portable_turns_every_simd_path_off() {
        let cpu = CpuFeatures {
            avx2: true,
            fma: true,
            avx512f: true,
            avx512bw: true,
            avx512vl: true,
            avx512dq: true,
            avx512_bf16: true,
            avx512_vnni: true,
            amx_bf16: false,
            amx_int8: false,
        };
        let all = Caps::new(cpu, Overrides::default());
        assert!(all.avx2_fma && all.avx512_bf16 && all.avx512_vnni && all.packed_bf16);
        assert!(all.avx512_conv);
        let portable = Caps::new(
            cpu,
            Overrides {
                portable: true,
                ..Overrides::default()
            },
        );
        assert_eq!(portable.paths(), ["portable"]);
        assert!(!portable.packed_bf16 && !portable.avx512_conv && !portable.amx_int8);
        // The raw answer stays, for callers that mirror other programs.
        assert_eq!(portable.cpu, cpu);
        let no_packed = Caps::new(
            cpu,
            Overrides {
                no_packed_bf16: true,
                no_avx512_conv: true,
                ..Overrides::default()
            },
        );
        assert!(no_packed.avx512_bf16 && !no_packed.packed_bf16 && !no_packed.avx512_conv);
    }
}
