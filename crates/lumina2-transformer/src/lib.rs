//! # lumina2-transformer
//!
//! The Lumina-Image 2.0 diffusion transformer (NextDiT) on [candle]: the same
//! forward as diffusers' `Lumina2Transformer2DModel`, for any configuration
//! diffusers accepts.
//!
//! The model is built from a [`Config`] (diffusers' `config.json`) and
//! [`Weights`] (any [`WeightSource`]: a candle `VarBuilder`, safetensors
//! files, tensors in memory, or the loader crate's original and GGUF
//! checkpoints). Its parts ([`TransformerBlock`], [`Attention`], [`RopeEmbedder`],
//! the embedders and [`OutputNorm`]) are public so that other pipelines can
//! compose them; [`zimage`] composes them into Z-Image's transformer.
//!
//! ```no_run
//! use candle_core::{DType, Device, Tensor};
//! use lumina2_transformer::{Config, Lumina2Transformer, Weights};
//!
//! # fn main() -> lumina2_transformer::Result<()> {
//! let dev = Device::Cpu;
//! let cfg = Config::from_file("Lumina-Image-2.0/transformer/config.json")?;
//! let weights = Weights::from_safetensors(
//!     &["Lumina-Image-2.0/transformer/diffusion_pytorch_model.safetensors"],
//!     DType::F32,
//!     &dev,
//! )?;
//! let model = Lumina2Transformer::new(&cfg, &weights)?;
//! let latents = Tensor::randn(0f32, 1., (1, 16, 64, 64), &dev)?;
//! let t = Tensor::new(&[0.5f32], &dev)?;
//! let caption = Tensor::randn(0f32, 1., (1, 256, cfg.cap_feat_dim), &dev)?;
//! let mask = Tensor::ones((1, 256), DType::U8, &dev)?;
//! let flow = model.forward(&latents, &t, &caption, &mask)?; // [1, 16, 64, 64]
//! # Ok(()) }
//! ```
//!
//! [candle]: https://github.com/huggingface/candle

#![warn(missing_docs)]
// Library code returns errors on bad input; it never unwraps (tests may).
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod attention;
pub mod block;
pub mod config;
pub mod embed;
pub mod error;
pub mod model;
pub mod norm;
pub mod rope;
pub mod weights;
pub mod zimage;

pub use attention::{grouped_attention, grouped_attention_packed, Attention, KeyMask};
pub use block::{
    BlockKeys, BlockSpec, FeedForward, FeedForwardKeys, Modulation, ModulationInput, ModulationOut,
    TransformerBlock,
};
pub use config::{Config, Limits};
pub use embed::{patchify, timestep_features, unpatchify, CaptionEmbedder, TimestepEmbedder};
pub use error::{Error, Result};
/// Errors of weight loading (inside [`Error::Weight`]).
pub use lumina2_weights::Error as WeightError;
pub use model::{weight_shapes, JointInput, Lumina2Transformer, SequenceLayout};
pub use norm::{OutputNorm, RmsNorm};
pub use rope::{Position, Rope, RopeAngles, RopeEmbedder};
pub use weights::{Linear, LinearWeight, VarBuilderSource, WeightSource, Weights};
pub use zimage::{ZImageConfig, ZImageTransformer};

pub use candle_core;

// Compiles the README's example as a doctest.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
