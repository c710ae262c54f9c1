//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong when building or running the transformer.
///
/// Variants carry what a user needs to fix the problem: the file, the tensor
/// key, the expected and the found shape.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    ConfigIo {
        /// The file that was read.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The config file is not valid JSON for this model.
    #[error("invalid config {origin}: {source}")]
    ConfigParse {
        /// The file (or `<string>`) that was parsed.
        origin: String,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// The config parsed but describes a model that cannot exist.
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    /// The config or input asks for a mode of the reference model this crate
    /// does not implement (Z-Image's omni mode with SigLIP features).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// An input to `forward` has the wrong shape, dtype or content.
    #[error("invalid input `{name}`: {reason}")]
    InvalidInput {
        /// Which input.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A weight is missing, has the wrong shape or cannot be read (the
    /// error names the key, the source and the shapes).
    #[error(transparent)]
    Weight(#[from] lumina2_weights::Error),
    /// An error raised by candle while computing.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn invalid_input(name: &'static str, reason: impl Into<String>) -> Error {
    Error::InvalidInput {
        name,
        reason: reason.into(),
    }
}
