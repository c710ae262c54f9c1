//! PyTorch's CPU random number generator, bit for bit: what
//! `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=D)`
//! returns for `D` = float32, bfloat16 and float16, so that a seed gives the
//! same initial latents as diffusers.
//!
//! What torch does (ATen, read in torch 2.15's installed headers
//! `ATen/core/MT19937RNGEngine.h`, `ATen/core/DistributionsHelper.h`,
//! `ATen/core/TransformationHelper.h`, `ATen/native/cpu/DistributionTemplates.h`,
//! `ATen/native/cpu/avx_mathfun.h`):
//!
//! - `manual_seed(seed)` seeds a 32-bit Mersenne Twister (mt19937) with the low
//!   32 bits of the seed and clears the cached normal sample.
//! - A tensor of 16 or more values is filled with float uniforms
//!   `(u32 & (2^24 - 1)) * 2^-24` first, then turned into normals 16 at a time by
//!   Box-Muller over the pairs `(j, j + 8)` of each block; when the length is not
//!   a multiple of 16, the last 16 values are drawn again from fresh uniforms and
//!   recomputed. bfloat16 and float16 go through the same float arithmetic, block
//!   by block, and are rounded to the half type at the end.
//! - A tensor of fewer than 16 values is drawn one value at a time from the
//!   double-precision Box-Muller of `at::normal_distribution<double>` (53-bit
//!   uniforms from two draws each), which returns the cosine branch and caches
//!   the sine branch in the generator for the next value, across tensors. The
//!   double is narrowed to float and then, for the half types, to the half type
//!   (c10's half types only convert from float).
//!
//! The 16-value Box-Muller block is compiled once per CPU capability, and torch
//! picks one at run time ([`NormalKernel`]): on x86 CPUs with AVX2 and FMA it
//! uses Julien Pommier's Cephes-derived `log256_ps`/`sincos256_ps` polynomials,
//! otherwise the C library's `logf`/`sinf`/`cosf`. The two give different last
//! bits for about 4 values in 10, so **torch's own output differs between
//! machines**; we follow the local torch by default ([`NormalKernel::detect`]).
//! AVX-512 machines run the AVX2 block too: torch registers its normal kernel
//! with `REGISTER_DISPATCH`, which leaves the AVX-512 slot empty, and the
//! dispatcher falls back to AVX2. Checked on an AVX2-only machine with
//! `ATEN_CPU_CAPABILITY=avx512`, which torch obeys without checking the CPU: its
//! AVX-512 kernels then run where they exist (`torch.sigmoid` dies of an illegal
//! instruction) and `randn` gives the AVX2 bits, 0 differences in 5.2 million
//! values.
//!
//! Both blocks are matched bit for bit: against torch 2.15 on 20 seeds x 262144
//! values per kernel and dtype with 0 differences, and, for the AVX2 block, the
//! `log`/`sincos` lane emulation against `avx_mathfun.h` compiled by GCC on all
//! 2^24 possible uniforms (see `xtask/parity/gen_torch_rng.py`).

use half::{bf16, f16};
use std::f64::consts::PI;

/// Which of torch's two CPU Box-Muller blocks to reproduce.
///
/// The choice changes the last bits of about 4 values in 10; it is the only
/// machine-dependent part of torch's CPU `randn`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NormalKernel {
    /// torch's `AVX2` build of the block (also used on AVX-512 machines): Cephes
    /// polynomials for `log` and `sincos` in float, evaluated as GCC compiled
    /// them, with every multiply that feeds an add fused.
    Avx2,
    /// torch's `DEFAULT` build (CPUs without AVX2 and FMA, non-x86 machines, or
    /// `ATEN_CPU_CAPABILITY=default`): the C library's `logf`, `cosf` and `sinf`,
    /// with the angle `2 pi u` computed in double. We call the same functions
    /// (Rust's `f32::ln`, `cos`, `sin` go to the platform libm), so this matches
    /// torch on the same system; checked on glibc 2.36.
    Scalar,
}

impl NormalKernel {
    /// The block the local torch would use: what torch's dispatcher chooses from
    /// the `ATEN_CPU_CAPABILITY` environment variable and the CPU.
    ///
    /// `ATEN_CPU_CAPABILITY=default` selects [`NormalKernel::Scalar`]; on x86,
    /// `avx2` and `avx512` select [`NormalKernel::Avx2`] (torch trusts the
    /// variable without checking the CPU). Any other value is ignored, as torch
    /// ignores it (with a warning), and the CPU decides: [`NormalKernel::Avx2`]
    /// when it has AVX2 and FMA (or the AVX-512 VL, BW and DQ set torch requires
    /// for its AVX-512 level, which also runs the AVX2 block), else
    /// [`NormalKernel::Scalar`].
    pub fn detect() -> Self {
        let capability = std::env::var("ATEN_CPU_CAPABILITY").ok();
        Self::from_capability(capability.as_deref(), cpu_runs_avx2_kernel())
    }

    /// [`NormalKernel::detect`] without the environment: `capability` is the
    /// value of `ATEN_CPU_CAPABILITY`, `cpu_avx2` whether the CPU would get
    /// torch's AVX2 (or AVX-512) level.
    fn from_capability(capability: Option<&str>, cpu_avx2: bool) -> Self {
        let x86 = cfg!(any(target_arch = "x86", target_arch = "x86_64"));
        match capability {
            Some("default") => Self::Scalar,
            // torch only knows these names in its x86 builds.
            Some("avx2" | "avx512") if x86 => Self::Avx2,
            _ if cpu_avx2 => Self::Avx2,
            _ => Self::Scalar,
        }
    }
}

/// Whether torch's CPU detection (cpuinfo) would pick its AVX2 or AVX-512
/// level: the CPU's own features, whatever switches our kernels run under
/// (never off x86-64).
fn cpu_runs_avx2_kernel() -> bool {
    let cpu = lumina2_kernels::caps().cpu;
    let avx512 = cpu.avx512vl && cpu.avx512bw && cpu.avx512dq;
    cpu.fma && (cpu.avx2 || avx512)
}

/// A CPU `torch.Generator` after `manual_seed(seed)`.
///
/// Each `randn_*` or `fill_*` call draws one tensor, as one `torch.randn` call
/// with this generator does, and the state carries over to the next call as in
/// torch: drawing `[a]` then `[b]` gives what torch gives for two calls, not
/// what it gives for one tensor of `a + b` values. diffusers draws the initial
/// latents with one call, or with one call per batch item when it is given a
/// list of generators (one `TorchGenerator` each).
#[derive(Clone)]
pub struct TorchGenerator {
    seed: u64,
    engine: Mt19937,
    /// The sine branch of the last double-precision Box-Muller pair, which torch
    /// keeps in the generator (`next_double_normal_sample`).
    next_double_normal: Option<f64>,
    kernel: NormalKernel,
}

impl std::fmt::Debug for TorchGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchGenerator")
            .field("seed", &self.seed)
            .field("kernel", &self.kernel)
            .field("next_double_normal", &self.next_double_normal)
            .finish_non_exhaustive()
    }
}

impl TorchGenerator {
    /// `torch.Generator("cpu").manual_seed(seed)`, with the Box-Muller block of
    /// the local torch ([`NormalKernel::detect`]). Like torch, only the low 32
    /// bits of the seed reach the Mersenne Twister.
    pub fn new(seed: u64) -> Self {
        Self::with_kernel(seed, NormalKernel::detect())
    }

    /// [`TorchGenerator::new`] with an explicit Box-Muller block, to reproduce
    /// torch as it runs on another kind of machine.
    pub fn with_kernel(seed: u64, kernel: NormalKernel) -> Self {
        Self {
            seed,
            engine: Mt19937::new(seed),
            next_double_normal: None,
            kernel,
        }
    }

    /// The seed given at construction (torch's `initial_seed()`).
    pub fn initial_seed(&self) -> u64 {
        self.seed
    }

    /// The Box-Muller block this generator reproduces.
    pub fn kernel(&self) -> NormalKernel {
        self.kernel
    }

    /// One raw 32-bit draw of the Mersenne Twister (torch's `random()`).
    pub fn next_u32(&mut self) -> u32 {
        self.engine.next_u32()
    }

    /// `torch.randn(numel, generator=self, dtype=torch.float32)`; any shape
    /// with `numel` values gives the same values in row-major order. `numel` 0
    /// returns an empty vector without drawing.
    ///
    /// The vector is allocated as any `Vec` is (a size beyond the address space
    /// panics, running out of memory aborts); [`TorchGenerator::fill_f32`] draws
    /// into a caller's buffer instead.
    pub fn randn_f32(&mut self, numel: usize) -> Vec<f32> {
        let mut out = vec![0.0; numel];
        self.fill_f32(&mut out);
        out
    }

    /// `torch.randn(numel, generator=self, dtype=torch.bfloat16)`, as
    /// [`TorchGenerator::randn_f32`].
    pub fn randn_bf16(&mut self, numel: usize) -> Vec<bf16> {
        let mut out = vec![bf16::ZERO; numel];
        self.fill_bf16(&mut out);
        out
    }

    /// `torch.randn(numel, generator=self, dtype=torch.float16)`, as
    /// [`TorchGenerator::randn_f32`].
    pub fn randn_f16(&mut self, numel: usize) -> Vec<f16> {
        let mut out = vec![f16::ZERO; numel];
        self.fill_f16(&mut out);
        out
    }

    /// Fills `out` with what `torch.randn(out.len(), generator=self,
    /// dtype=torch.float32)` returns; an empty slice draws nothing.
    pub fn fill_f32(&mut self, out: &mut [f32]) {
        if out.len() < 16 {
            for value in out.iter_mut() {
                *value = self.normal_f64() as f32;
            }
            return;
        }
        // torch draws every uniform into the output first, then transforms it in
        // place; the tail block is drawn after all of them.
        for value in out.iter_mut() {
            *value = self.uniform_f32();
        }
        for block in out.chunks_exact_mut(16) {
            if let Ok(block) = <&mut [f32; 16]>::try_from(block) {
                self.kernel.box_muller_16(block);
            }
        }
        if !out.len().is_multiple_of(16) {
            if let Some(tail) = out.last_chunk_mut::<16>() {
                for value in tail.iter_mut() {
                    *value = self.uniform_f32();
                }
                self.kernel.box_muller_16(tail);
            }
        }
    }

    /// Fills `out` with what `torch.randn(out.len(), generator=self,
    /// dtype=torch.bfloat16)` returns; an empty slice draws nothing.
    pub fn fill_bf16(&mut self, out: &mut [bf16]) {
        self.fill_half(out, bf16::from_f32);
    }

    /// Fills `out` with what `torch.randn(out.len(), generator=self,
    /// dtype=torch.float16)` returns; an empty slice draws nothing.
    pub fn fill_f16(&mut self, out: &mut [f16]) {
        self.fill_half(out, f16::from_f32);
    }

    /// The half-type path: the float arithmetic of [`TorchGenerator::fill_f32`]
    /// done block by block in a float buffer, each value rounded to nearest
    /// even. Values of the per-element path go double -> float -> half, two
    /// roundings, as c10's half types convert only from float.
    fn fill_half<T>(&mut self, out: &mut [T], from_f32: fn(f32) -> T) {
        if out.len() < 16 {
            for value in out.iter_mut() {
                *value = from_f32(self.normal_f64() as f32);
            }
            return;
        }
        for block in out.chunks_exact_mut(16) {
            self.half_block(block, from_f32);
        }
        if !out.len().is_multiple_of(16) {
            if let Some(tail) = out.last_chunk_mut::<16>() {
                self.half_block(tail, from_f32);
            }
        }
    }

    /// Draws 16 uniforms, transforms them and writes them rounded into `out`
    /// (16 values long).
    fn half_block<T>(&mut self, out: &mut [T], from_f32: fn(f32) -> T) {
        let mut buffer = [0.0f32; 16];
        for value in buffer.iter_mut() {
            *value = self.uniform_f32();
        }
        self.kernel.box_muller_16(&mut buffer);
        for (value, normal) in out.iter_mut().zip(buffer) {
            *value = from_f32(normal);
        }
    }

    /// `at::uniform_real_distribution<float>(0, 1)`: the low 24 bits of one draw,
    /// scaled to `[0, 1)` (exact). torch's `x * (to - from) + from` is `x` here.
    fn uniform_f32(&mut self) -> f32 {
        const SCALE: f32 = 1.0 / (1u32 << 24) as f32;
        (self.engine.next_u32() & 0x00ff_ffff) as f32 * SCALE
    }

    /// `at::uniform_real_distribution<double>(0, 1)`: torch's `random64()` puts the
    /// first draw in the high half and the second in the low half; the low 53
    /// bits are scaled to `[0, 1)` (exact).
    fn uniform_f64(&mut self) -> f64 {
        const SCALE: f64 = 1.0 / (1u64 << 53) as f64;
        let high = u64::from(self.engine.next_u32());
        let low = u64::from(self.engine.next_u32());
        (((high << 32) | low) & ((1u64 << 53) - 1)) as f64 * SCALE
    }

    /// `at::normal_distribution<double>(0, 1)`: returns the cached sine branch if
    /// there is one, else draws a pair (glibc's `log1p`, `sin`, `cos` in double),
    /// caches the sine branch and returns the cosine branch.
    fn normal_f64(&mut self) -> f64 {
        let value = match self.next_double_normal.take() {
            Some(cached) => cached,
            None => {
                let u1 = self.uniform_f64();
                let u2 = self.uniform_f64();
                let radius = (-2.0 * (-u2).ln_1p()).sqrt();
                let theta = 2.0 * PI * u1;
                self.next_double_normal = Some(radius * theta.sin());
                radius * theta.cos()
            }
        };
        // torch's `val * std + mean` with std 1 and mean 0: exact, but -0 becomes +0.
        value + 0.0
    }
}

impl NormalKernel {
    /// torch's `NormalFill16` with mean 0 and std 1: `data` holds 16 uniforms in
    /// `[0, 1)`; each pair `(j, j + 8)` becomes `r cos(theta)`, `r sin(theta)`
    /// with `r = sqrt(-2 log(1 - data[j]))` and `theta = 2 pi data[j + 8]`.
    /// torch's final `fma(n, std, mean)` is `n + 0.0` for std 1 and mean 0.
    fn box_muller_16(self, data: &mut [f32; 16]) {
        for j in 0..8 {
            let u1 = 1.0 - data[j];
            let u2 = data[j + 8];
            let (radius, sin, cos) = match self {
                Self::Avx2 => {
                    let radius = (-2.0 * cephes_log(u1)).sqrt();
                    // `_mm256_set1_ps(2.0f * c10::pi<double>)`: 2 pi rounded to float.
                    let (sin, cos) = cephes_sincos((2.0 * PI) as f32 * u2);
                    (radius, sin, cos)
                }
                Self::Scalar => {
                    let radius = (-2.0 * u1.ln()).sqrt();
                    // `2.0f * c10::pi<double> * u2` is a double, narrowed to float.
                    let theta = (2.0 * PI * f64::from(u2)) as f32;
                    (radius, theta.sin(), theta.cos())
                }
            };
            data[j] = radius * cos + 0.0;
            data[j + 8] = radius * sin + 0.0;
        }
    }
}

/// The coefficients of `log256_ps` (Cephes' `logf`), as the floats the C source
/// gives: 7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
/// 1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
/// 3.3333331174e-1. Written as bit patterns so that no literal rounding is in
/// question.
const LOG_P: [f32; 9] = [
    f32::from_bits(0x3d90_21bb),
    f32::from_bits(0xbdeb_d1b8),
    f32::from_bits(0x3def_251a),
    f32::from_bits(0xbdfe_5d4f),
    f32::from_bits(0x3e11_e9bf),
    f32::from_bits(0xbe2a_ae50),
    f32::from_bits(0x3e4c_ceac),
    f32::from_bits(0xbe7f_fffc),
    f32::from_bits(0x3eaa_aaaa),
];
/// log(2) split in two: -2.12194440e-4 ...
const LOG_Q1: f32 = f32::from_bits(0xb95e_8083);
/// ... and 0.693359375 (9 significant bits, so `e * LOG_Q2` is exact).
const LOG_Q2: f32 = f32::from_bits(0x3f31_8000);
/// sqrt(1/2), 0.707106781186547524.
const SQRT_HALF: f32 = f32::from_bits(0x3f35_04f3);

/// One lane of torch's `log256_ps` (AVX2), as GCC compiles it with FMA
/// contraction: each Horner step `y * x + p` and the `y * z + e * q1` sum are
/// single fused operations. The inputs the kernel passes are `1 - u`, in
/// `[2^-24, 1]`.
fn cephes_log(x: f32) -> f32 {
    if x.is_nan() || x <= 0.0 {
        return f32::NAN;
    }
    // Denormals are cut off, as the vector code does.
    let x = x.max(f32::MIN_POSITIVE);
    let bits = x.to_bits();
    let mut e = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
    // The mantissa as a float in [0.5, 1).
    let mut m = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    let below = m < SQRT_HALF;
    let tmp = if below { m } else { 0.0 };
    m -= 1.0;
    e -= if below { 1.0 } else { 0.0 };
    m += tmp;
    let z = m * m;
    let mut y = LOG_P[0];
    for p in &LOG_P[1..] {
        y = y.mul_add(m, *p);
    }
    y *= m;
    // GCC fuses the first of the two products into the add.
    y = y.mul_add(z, e * LOG_Q1);
    // z * 0.5 is exact, so fusing it or not gives the same value.
    y -= z * 0.5;
    let sum = m + y;
    // e * LOG_Q2 is exact (e is a small integer, LOG_Q2 has 9 significant bits).
    e.mul_add(LOG_Q2, sum)
}

/// -pi/4 split in three for the extended-precision argument reduction:
/// -0.78515625, -2.4187564849853515625e-4, -3.77489497744594108e-8.
const MINUS_DP1: f32 = f32::from_bits(0xbf49_0000);
const MINUS_DP2: f32 = f32::from_bits(0xb97d_a000);
const MINUS_DP3: f32 = f32::from_bits(0xb322_2169);
/// 4 / pi, 1.27323954473516.
const FOUR_OVER_PI: f32 = f32::from_bits(0x3fa2_f983);
/// Cosine polynomial: 2.443315711809948e-5, -1.388731625493765e-3,
/// 4.166664568298827e-2.
const COS_P: [f32; 3] = [
    f32::from_bits(0x37cc_f5ce),
    f32::from_bits(0xbab6_061a),
    f32::from_bits(0x3d2a_aaa5),
];
/// Sine polynomial: -1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1.
const SIN_P: [f32; 3] = [
    f32::from_bits(0xb94c_a1f9),
    f32::from_bits(0x3c08_839e),
    f32::from_bits(0xbe2a_aaa3),
];

/// One lane of torch's `sincos256_ps` (AVX2), as GCC compiles it with FMA
/// contraction: the three reduction steps, the Horner steps, the cosine
/// polynomial's `y * z - z / 2` and the sine polynomial's `y * x + x` are single
/// fused operations. Returns `(sin, cos)`. The kernel passes angles in
/// `[0, 2 pi)`; the integer conversions saturate (the vector code's would give
/// `i32::MIN`), which only matters far outside that range.
fn cephes_sincos(x: f32) -> (f32, f32) {
    let sign_in = x.to_bits() & 0x8000_0000;
    let x = x.abs();
    // The octant, rounded up to even.
    let j = ((x * FOUR_OVER_PI) as i32).wrapping_add(1) & !1;
    let y = j as f32;
    let swap_sin = ((j & 4) as u32) << 29;
    let sin_uses_sin_poly = (j & 2) == 0;
    let sign_cos = ((!j.wrapping_sub(2) & 4) as u32) << 29;
    let sign_sin = sign_in ^ swap_sin;

    let x = y.mul_add(MINUS_DP1, x);
    let x = y.mul_add(MINUS_DP2, x);
    let x = y.mul_add(MINUS_DP3, x);
    let z = x * x;

    let mut cos_poly = COS_P[0].mul_add(z, COS_P[1]).mul_add(z, COS_P[2]);
    cos_poly *= z;
    cos_poly = cos_poly.mul_add(z, -(z * 0.5));
    cos_poly += 1.0;

    let mut sin_poly = SIN_P[0].mul_add(z, SIN_P[1]).mul_add(z, SIN_P[2]);
    sin_poly *= z;
    sin_poly = sin_poly.mul_add(x, x);

    // The vector code selects with masks, subtractions and additions; adding and
    // subtracting zeros keeps the values (and turns -0 into +0, as it does).
    let sin_from_sin = if sin_uses_sin_poly { sin_poly } else { 0.0 };
    let sin_from_cos = if sin_uses_sin_poly { 0.0 } else { cos_poly };
    let cos_from_sin = sin_poly - sin_from_sin;
    let cos_from_cos = cos_poly - sin_from_cos;
    let sin = sin_from_cos + sin_from_sin;
    let cos = cos_from_cos + cos_from_sin;
    (
        f32::from_bits(sin.to_bits() ^ sign_sin),
        f32::from_bits(cos.to_bits() ^ sign_cos),
    )
}

/// The 32-bit Mersenne Twister of `at::mt19937`: the reference mt19937
/// (Matsumoto and Nishimura) seeded with `init_genrand` on the low 32 bits.
#[derive(Clone)]
struct Mt19937 {
    state: [u32; MT_N],
    /// The next state word to temper; `MT_N` means the state must be regenerated.
    index: usize,
}

const MT_N: usize = 624;
const MT_M: usize = 397;
const MT_MATRIX_A: u32 = 0x9908_b0df;

impl Mt19937 {
    fn new(seed: u64) -> Self {
        let mut state = [0u32; MT_N];
        // torch keeps the full seed but seeds the engine with its low 32 bits.
        let mut previous = seed as u32;
        state[0] = previous;
        for (i, word) in state.iter_mut().enumerate().skip(1) {
            previous = 1_812_433_253u32
                .wrapping_mul(previous ^ (previous >> 30))
                .wrapping_add(i as u32);
            *word = previous;
        }
        Self { state, index: MT_N }
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= MT_N {
            self.regenerate();
        }
        let mut y = self.state[self.index % MT_N];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// The twist, in place: words past `MT_N - MT_M` read words already updated
    /// in this pass, as the reference does.
    fn regenerate(&mut self) {
        for k in 0..MT_N {
            let next = self.state[(k + 1) % MT_N];
            let mixed = (self.state[k] & 0x8000_0000) | (next & 0x7fff_ffff);
            let mut word = self.state[(k + MT_M) % MT_N] ^ (mixed >> 1);
            if next & 1 != 0 {
                word ^= MT_MATRIX_A;
            }
            self.state[k] = word;
        }
        self.index = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_the_reference_sequence() {
        // The C++ standard's check: the 10000th output of mt19937 seeded 5489.
        let mut engine = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10_000 {
            last = engine.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn only_the_low_32_bits_of_the_seed_matter() {
        let mut a = TorchGenerator::with_kernel(5, NormalKernel::Scalar);
        let mut b = TorchGenerator::with_kernel((1 << 63) + 5, NormalKernel::Scalar);
        assert_eq!(a.next_u32(), b.next_u32());
        assert_eq!(b.initial_seed(), (1 << 63) + 5);
    }

    #[test]
    fn zero_values_draw_nothing() {
        let mut a = TorchGenerator::with_kernel(3, NormalKernel::Avx2);
        let mut b = a.clone();
        assert!(a.randn_f32(0).is_empty());
        assert!(a.randn_bf16(0).is_empty());
        assert!(a.randn_f16(0).is_empty());
        assert_eq!(a.next_u32(), b.next_u32());
    }

    #[test]
    fn capability_variable_is_read_as_torch_reads_it() {
        use NormalKernel::{Avx2, Scalar};
        let x86 = cfg!(any(target_arch = "x86", target_arch = "x86_64"));
        assert_eq!(NormalKernel::from_capability(Some("default"), true), Scalar);
        assert_eq!(NormalKernel::from_capability(None, true), Avx2);
        assert_eq!(NormalKernel::from_capability(None, false), Scalar);
        // Unknown values (torch compares case-sensitively) are ignored.
        assert_eq!(NormalKernel::from_capability(Some("AVX2"), false), Scalar);
        assert_eq!(NormalKernel::from_capability(Some("foo"), true), Avx2);
        let forced = if x86 { Avx2 } else { Scalar };
        assert_eq!(NormalKernel::from_capability(Some("avx2"), false), forced);
        assert_eq!(NormalKernel::from_capability(Some("avx512"), false), forced);
    }

    /// Our AVX2 lane emulation against torch's `avx_mathfun.h` compiled by GCC
    /// with FMA, on every argument the kernel can give it (all 2^24 uniforms).
    #[test]
    #[ignore = "needs TORCH_RNG_AVX_MATHFUN_DIR from xtask/parity/gen_torch_rng.py --avx-mathfun"]
    fn avx_mathfun_matches_gcc_on_every_uniform() {
        let Some(dir) = std::env::var_os("TORCH_RNG_AVX_MATHFUN_DIR") else {
            panic!(
                "set TORCH_RNG_AVX_MATHFUN_DIR to the folder gen_torch_rng.py --avx-mathfun wrote"
            );
        };
        let read = |name: &str| -> Vec<u32> {
            let path = std::path::Path::new(&dir).join(name);
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let (log, sin, cos) = (read("log.bin"), read("sin.bin"), read("cos.bin"));
        assert_eq!(log.len(), 1 << 24);
        let two_pi = (2.0 * PI) as f32;
        let mut bad = [0usize; 3];
        for k in 0..1u32 << 24 {
            let u = k as f32 / (1u32 << 24) as f32;
            let (s, c) = cephes_sincos(two_pi * u);
            let i = k as usize;
            bad[0] += usize::from(cephes_log(1.0 - u).to_bits() != log[i]);
            bad[1] += usize::from(s.to_bits() != sin[i]);
            bad[2] += usize::from(c.to_bits() != cos[i]);
        }
        assert_eq!(bad, [0, 0, 0], "log, sin, cos mismatches");
    }

    #[test]
    fn cephes_log_stays_close_to_ln() {
        for k in [1u32, 2, 1000, 1 << 20, (1 << 24) - 1] {
            let x = 1.0 - k as f32 / (1u32 << 24) as f32;
            let x = if x == 0.0 { f32::EPSILON } else { x };
            assert!((cephes_log(x) - x.ln()).abs() <= 2e-7 * x.ln().abs().max(1.0));
        }
    }
}
