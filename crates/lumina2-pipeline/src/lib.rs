//! # lumina2-pipeline
//!
//! Lumina-Image 2.0 text-to-image on candle: diffusers' `Lumina2Pipeline`
//! wired from the lumina2-rs model crates, as a library (the `lumina2` command
//! is the `lumina2-cli` crate).
//!
//! - [`Lumina2Pipeline`] is built from a diffusers pipeline folder, a Hub repo
//!   (through `lumina2-loader`), or component files the caller brings
//!   ([`PipelineSources`]: any transformer checkpoint the loader reads, LoRAs).
//! - [`GenerateOptions`] holds every argument of diffusers'
//!   `Lumina2Pipeline.__call__` with its defaults; a seed draws the same noise
//!   as `torch.Generator("cpu").manual_seed(seed)` ([`torch_rng`]).
//! - [`ImageToImage`] starts a run from an image (and inpaints with a mask)
//!   as diffusers' Flux img2img and inpaint pipelines do; images are read and
//!   resized as PIL does ([`source_image`], [`resample`]).
//! - [`ZImagePipeline`] runs Z-Image (diffusers' `ZImagePipeline`, and with
//!   an [`ImageToImage`] its `ZImageImg2ImgPipeline` / `ZImageInpaintPipeline`)
//!   from the same pieces around the Z-Image transformer and the Qwen3 text
//!   encoder.
//! - Components are loaded one at a time and released after their stage unless
//!   [`PipelineBuilder::keep_resident`] is set.
//!
//! This crate holds wiring only; the model math lives in the model crates.

#![warn(missing_docs)]
// Library code returns errors on bad input; it never unwraps (tests may).
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod components;
mod dtype;
pub mod error;
pub mod guidance;
pub mod img2img;
mod lora;
pub mod memory;
pub mod noise;
pub mod options;
pub mod original_time;
pub mod pipeline;
pub mod preview;
pub mod progress;
pub mod resample;
mod settings;
pub mod source_image;
mod stages;
pub mod teacache;
pub mod torch_linspace;
pub mod torch_rng;
pub mod zimage;

pub use components::{LoraSpec, PipelineSources, TransformerSource};
pub use dtype::{auto_dtype, AutoDtype};
pub use error::{Error, Result};
pub use img2img::ImageToImage;
pub use options::{
    Conditioning, GenerateOptions, GuidanceMode, Noise, OutputKind, PromptEmbeddingsInput,
};
pub use pipeline::{Generation, Lumina2Pipeline, MemoryCheck, PipelineBuilder};
pub use progress::{Control, Event, Stage, StageTimings, StepInfo};
pub use teacache::TeaCache;
pub use zimage::{ZImageOptions, ZImagePipeline, ZImagePipelineBuilder, ZImageSources};

pub use candle_core;
pub use lumina2_scheduler::SolverKind;
pub use lumina2_text_encoder::SystemPrompt;
