//! 2-D convolutions of the VAE.

pub mod bf16;
pub mod f32;
pub mod upsample;
