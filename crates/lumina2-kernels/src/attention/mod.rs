//! Attention and its softmax.

pub mod flash;
pub(crate) mod flash_f32;
pub mod softmax;
pub mod vae;
