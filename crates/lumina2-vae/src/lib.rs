//! diffusers' `AutoencoderKL` on candle: the 16-channel Flux VAE that
//! Lumina-Image 2.0 uses, and any other config of that class.
//!
//! - [`AutoencoderKL::decode`] / [`AutoencoderKL::encode`]: the same outputs as
//!   diffusers' `decode` and `encode(x).latent_dist` (mean, clamped log-variance;
//!   sampling only with caller-supplied noise).
//! - [`AutoencoderKL::unscale_latents`] / [`AutoencoderKL::scale_latents`]: the
//!   pipeline's latent transform and its inverse.
//! - [`image::to_rgb_images`]: 8-bit RGB exactly as `VaeImageProcessor`.
//! - Tiled decoding and encoding ([`AutoencoderKL::enable_tiling`]).
//!
//! Weights come through the project's weight interface ([`Weights`], from
//! `lumina2-weights`) with diffusers' keys: any [`lumina2_weights::WeightSource`]
//! (safetensors files, tensors in memory, a loader's converted layouts). Only
//! the tensors the config names are read, each after its declared shape is
//! checked.
#![warn(missing_docs)]
// Library code returns errors on bad input; it never unwraps (tests may).
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod attention;
mod autoencoder;
mod blocks;
pub mod config;
mod decoder;
mod encoder;
pub mod error;
pub mod image;
mod layers;
pub mod profile;
mod resnet;
pub mod tiling;

pub use autoencoder::{AutoencoderKL, DiagonalGaussian};
pub use config::{AutoencoderKLConfig, Limits};
pub use decoder::Decoder;
pub use encoder::Encoder;
pub use error::{Result, VaeError};
pub use tiling::Tiling;

/// The weight handle the constructors take, re-exported for convenience.
pub use lumina2_weights::Weights;
