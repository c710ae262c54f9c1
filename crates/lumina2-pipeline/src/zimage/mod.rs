//! Z-Image text-to-image: diffusers' `ZImagePipeline`, built from the same
//! pieces as the Lumina2 pipeline (noise, scheduler, VAE decode, progress)
//! around the Z-Image transformer and the Qwen3 text encoder.
//!
//! - [`ZImageSources`]: the components' files (a diffusers folder whose
//!   `model_index.json` names `ZImagePipeline`).
//! - [`ZImageOptions`]: the arguments of `ZImagePipeline.__call__` with its defaults.
//! - [`ZImagePipeline`]: the run, step for step as the reference.

pub mod guidance;
pub mod options;
pub mod pipeline;
pub mod sources;

pub use options::ZImageOptions;
pub use pipeline::{ZImagePipeline, ZImagePipelineBuilder};
pub use sources::ZImageSources;
