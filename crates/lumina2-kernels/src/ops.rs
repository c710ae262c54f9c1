//! Where an op runs: one of this crate's kernels or candle's op. The model
//! crates ask here instead of combining device, dtype and CPU features
//! themselves (so far: the VAE's convolutions and attention, the bf16
//! attention of the transformer and the text encoder).

use candle_core::{DType, Device};

/// Whether a bf16 convolution on `device` runs on [`crate::conv::bf16`]
/// (AMX); otherwise the caller computes in f32 or with candle.
pub fn conv2d_bf16(device: &Device, dtype: DType) -> bool {
    device.is_cpu() && dtype == DType::BF16 && crate::conv::bf16::available()
}

/// Whether a convolution computed in `dtype` on `device` runs on
/// [`crate::conv::f32`] (or its upsampling form [`crate::conv::upsample`]);
/// otherwise candle's `conv2d`.
pub fn conv2d_f32(device: &Device, dtype: DType) -> bool {
    device.is_cpu() && dtype == DType::F32 && crate::conv::f32::available()
}

/// Whether the VAE's attention in `dtype` on `device` runs on
/// [`crate::attention::vae`]; otherwise candle's ops.
pub fn vae_attention_f32(device: &Device, dtype: DType) -> bool {
    conv2d_f32(device, dtype)
}

/// Whether a bf16 attention on `device` multiplies on the packed bf16 kernel
/// ([`crate::gemm::packed`], and [`crate::attention::flash`] where AMX is
/// usable); otherwise candle's matmul.
pub fn attention_bf16_packed(device: &Device, dtype: DType) -> bool {
    dtype == DType::BF16 && device.is_cpu() && crate::gemm::packed::available()
}
