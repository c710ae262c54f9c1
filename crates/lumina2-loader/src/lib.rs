//! # lumina2-loader
//!
//! Finds and opens Lumina-Image 2.0 checkpoints for the model crates.
//!
//! Built so far: [`ComponentFolder`], which resolves the safetensors files of a
//! diffusers or transformers component folder (one file, or shards listed by an
//! `*.safetensors.index.json`); single-file transformer checkpoints in the
//! original, ComfyUI or diffusers layout, from `.pth` (read without executing
//! pickle code) or `.safetensors` ([`open_transformer_file`]); GGUF files
//! ([`gguf`]). The Hub cache and LoRA are planned (see the README).

#![warn(missing_docs)]

mod folder;
pub mod gguf;
mod gguf_source;
pub mod original;
mod pickle_guard;
pub mod pth;

pub use folder::{ComponentFolder, Error};
pub use original::{detect_layout, open_transformer_file, TransformerLayout};
pub use pth::PthFile;
