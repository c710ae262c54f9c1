//! # lumina2-kernels
//!
//! The CPU compute kernels of lumina2-rs: every `std::arch` use and every
//! `unsafe` block of the project's compute code, organised by operation.
//!
//! - [`gemm`]: the packed bf16 GEMM (AMX, AVX512-BF16) and the int8 GEMM
//!   (AMX-INT8, AVX512-VNNI).
//! - [`attention`]: flash attention (bf16 on AMX, f32 on AVX-512), the
//!   softmax kernels, the VAE's f32 attention.
//! - [`conv`]: the bf16 AMX convolution, the f32 AVX2/AVX-512 convolution, the
//!   fused nearest-upsample convolution.
//! - [`norm`]: group norm fused with its activation.
//! - [`elementwise`]: fused bf16 element-wise ops (gates, RoPE, adds).
//! - [`cast`]: parallel dtype conversions; [`profile`]: per-op-group timing.
//! - [`ops`]: the dispatch layer the model crates call: each op with its
//!   math, on a kernel here or on candle, chosen from the device, the dtype
//!   and [`caps`].
//!
//! Which path runs is decided by one probe, [`caps`], computed once; its
//! environment switches are listed there and in the crate README. Each
//! kernel is a module whose instruction-set code sits in files of its own
//! (`amx.rs`, `avx512.rs`, `avx2.rs`, compiled on x86-64 only), next to its
//! portable code (`mod.rs`, `portable.rs`). Off x86-64, on CPUs without the
//! instruction set, or with `LUMINA2_PORTABLE=1`, the kernel's caller gets
//! `None` / `false` from `available` and uses candle's ops, or the kernel
//! runs its portable code; every kernel's portable form is tested on every
//! machine.

#![warn(missing_docs)]
// Library code returns errors on bad input; it never unwraps (tests may).
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod attention;
mod caps;
pub mod conv;
mod cpu;
pub mod elementwise;
pub mod gemm;
pub mod memory;
pub mod norm;
pub mod ops;
pub mod peak;
pub mod profile;
mod simd;

pub use caps::{caps, report_paths, Caps, CpuFeatures, Overrides};
pub use cpu::{any_non_finite, bf16_bits_non_finite, cast, f32_non_finite, widen_bf16, widen_f16};
