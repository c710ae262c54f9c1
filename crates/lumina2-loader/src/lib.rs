//! # lumina2-loader
//!
//! Finds and opens Lumina-Image 2.0 checkpoints for the model crates.
//!
//! Built so far: [`ComponentFolder`], which resolves the safetensors files of a
//! diffusers or transformers component folder (one file, or shards listed by an
//! `*.safetensors.index.json`). The Hub cache, original single files, GGUF and
//! LoRA are planned (see the README).

#![warn(missing_docs)]

mod folder;
pub mod gguf;

pub use folder::{ComponentFolder, Error};
