//! # lumina2-parity
//!
//! The parity case format of lumina2-rs, described in `docs/parity-cases.md`:
//! a folder with `case.json`, `inputs.safetensors` and `expected.safetensors`
//! written by a PyTorch reference. This crate reads a case ([`Case`]),
//! compares an output with the reference ([`compare`]) and formats report
//! rows ([`Row`]); running the model is left to the caller (`cargo xtask
//! parity` and each crate's fixture tests).

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod case;
mod compare;
mod error;
mod report;

pub use case::{find_cases, input, Case, Tolerance, MAX_CASE_JSON_BYTES, MAX_DEPTH};
pub use compare::{compare, Comparison};
pub use error::Error;
pub use report::{format_report, format_row, Row};

/// Results of this crate.
pub type Result<T> = std::result::Result<T, Error>;
