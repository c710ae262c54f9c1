//! # lumina2-pipeline
//!
//! Wires the lumina2-rs model crates into diffusers' `Lumina2Pipeline`.
//! Work in progress: see this crate's README.md.

#![warn(missing_docs)]

pub mod torch_rng;
