//! The dispatch layer: the ops the model crates call, each written with its
//! math, each choosing from the tensor's device, its dtype and [`crate::caps`]
//! whether it runs on one of this crate's kernels or on candle's ops.
//!
//! The model crates (and `lumina2-weights`' `Linear`) ask nothing about the
//! device or the CPU: they call [`attention::sdpa`], [`norm::rms_norm`],
//! [`rope::interleaved`] and the rest with the shapes and the roundings of
//! the model they implement, and the candle fallback (the portable path,
//! and the path on a GPU) lives beside the kernel path here, with the same
//! roundings in the same order. Each family says which path it takes
//! (`path` functions and enums), for tests and reports.
//!
//! - [`attention`]: scaled dot-product attention with grouped key heads
//!   (the transformer), Gemma-2's eager attention (the text encoder), the
//!   VAE's single-head attention.
//! - [`linear`]: which kernel a linear layer multiplies on.
//! - [`conv`]: which kernel a convolution runs on, and in which dtype.
//! - [`norm`]: RMS norms, group norm with its activation.
//! - [`rope`]: rotary embeddings (interleaved pairs, rotate-half).
//! - [`elementwise`]: fused gates, adds and broadcast products.

pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod linear;
pub mod norm;
pub mod rope;
