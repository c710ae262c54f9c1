//! AVX-512 helpers (in `avx512.rs`) shared by the vectorised kernels ([`crate::attention::softmax`],
//! [`crate::elementwise::fused`]).

#[cfg(target_arch = "x86_64")]
pub(crate) use avx512::*;

#[cfg(target_arch = "x86_64")]
mod avx512;

/// Whether the bf16 kernels may run: AVX-512F/BW/VL and BF16 conversions,
/// not switched off ([`crate::Caps::avx512_bf16`]).
pub(crate) fn has_avx512_bf16() -> bool {
    crate::caps().avx512_bf16
}
