//! Element-wise ops with PyTorch's roundings: one fused pass of
//! [`crate::elementwise::fused`] for bf16 (and f32) CPU tensors on CPUs with
//! AVX512-BF16, which choose that path themselves; candle's ops otherwise.

use candle_core::Tensor;

use crate::elementwise::fused;

/// Where an element-wise op runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// One fused pass ([`crate::elementwise::fused`]).
    Fused,
    /// candle's ops.
    Candle,
}

/// The path of an element-wise op on bf16 or f32 tensors on `device`.
pub fn path(device: &candle_core::Device) -> Path {
    if device.is_cpu() && crate::caps().avx512_bf16 {
        Path::Fused
    } else {
        Path::Candle
    }
}

/// `x + y`, same shapes; in a half dtype each sum in f32 rounded once.
pub fn add(x: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
    fused::add(x, y)
}

/// `x * v` with `v` `[B, 1, D]` broadcast over the sequence of `x` `[B, S,
/// D]` (the adaLN scale `norm(x) * (1 + scale)`).
pub fn mul_broadcast(x: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    fused::mul_bcast(x, v, None)
}

/// `x + v * y` with `v` `[B, 1, D]` broadcast over the sequence, the product
/// rounded before the sum as the unfused ops round it (the gated residual
/// `x + tanh(gate) * y`).
pub fn add_mul_broadcast(x: &Tensor, v: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
    fused::mul_bcast(x, v, Some(y))
}

/// `silu(a) * b` (diffusers' SwiGLU gate): SiLU in f32 rounded to the dtype,
/// then the product rounded.
pub fn silu_mul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    fused::silu_mul(a, b)
}

/// `gelu_tanh(a) * b` (Gemma-2's gate), rounded as [`silu_mul`].
pub fn gelu_tanh_mul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    fused::gelu_tanh_mul(a, b)
}
