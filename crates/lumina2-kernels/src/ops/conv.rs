//! Which kernel a 2-D convolution (and the VAE's other matmul-like work)
//! runs on, and in which dtype.
//!
//! candle has no half-precision CPU convolution, and PyTorch accumulates
//! half products in f32 on the CPU: there a half model's convolutions and
//! linear layers compute in f32 ([`compute_dtype`]) and round their output
//! to the model dtype. A bf16 model on a CPU with AMX convolves on the bf16
//! kernel instead.

use candle_core::{DType, Device};

/// Where a convolution runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// bf16 on AMX tiles ([`crate::conv::bf16`]).
    Bf16,
    /// f32 on AVX2/FMA or AVX-512 ([`crate::conv::f32`], and
    /// [`crate::conv::upsample`] for an `Upsample2D` convolution).
    F32,
    /// candle's `conv2d` (the portable and GPU path).
    Candle,
}

/// The dtype a model of `dtype` convolves (and multiplies) in on `device`:
/// f32 on the CPU for every dtype but f64, the model dtype elsewhere.
pub fn compute_dtype(dtype: DType, device: &Device) -> DType {
    if device.is_cpu() && dtype != DType::F64 {
        DType::F32
    } else {
        dtype
    }
}

/// Whether a convolution of a `dtype` model on `device` runs on the bf16
/// AMX kernel ([`crate::conv::bf16`]); where the kernel declines a layer,
/// its caller asks [`f32_kernel`] with the [`compute_dtype`].
pub fn bf16_kernel(device: &Device, dtype: DType) -> bool {
    device.is_cpu() && dtype == DType::BF16 && crate::conv::bf16::available()
}

/// Whether a convolution computed in `compute_dtype` on `device` runs on
/// the f32 kernel ([`crate::conv::f32`], [`crate::conv::upsample`]);
/// otherwise candle's `conv2d`.
pub fn f32_kernel(device: &Device, compute_dtype: DType) -> bool {
    device.is_cpu() && compute_dtype == DType::F32 && crate::conv::f32::available()
}

/// The path a convolution of a `dtype` model on `device` takes (where its
/// kernel accepts the layer's shape).
pub fn path(device: &Device, dtype: DType) -> Path {
    if bf16_kernel(device, dtype) {
        Path::Bf16
    } else if f32_kernel(device, compute_dtype(dtype, device)) {
        Path::F32
    } else {
        Path::Candle
    }
}
