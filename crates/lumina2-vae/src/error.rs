//! Typed errors of the crate.

use std::path::PathBuf;

/// Everything that can go wrong when building or running the autoencoder.
#[derive(Debug, thiserror::Error)]
pub enum VaeError {
    /// A weight is missing, has another shape than the configuration
    /// implies, or cannot be read (the error names the key, the file and
    /// the shapes).
    #[error(transparent)]
    Weight(#[from] lumina2_weights::Error),
    /// The configuration is inconsistent or uses something not implemented.
    #[error("invalid VAE config: {0}")]
    Config(String),
    /// The configuration file could not be read.
    #[error("reading {path}: {source}")]
    ConfigIo {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The configuration file is not valid JSON for this config.
    #[error("parsing VAE config: {0}")]
    ConfigParse(#[from] serde_json::Error),
    /// An input tensor has the wrong rank, channels, size or dtype.
    #[error("invalid input `{name}`: {reason}")]
    Input {
        /// Which input.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, VaeError>;

pub(crate) fn input_err(name: &'static str, reason: impl Into<String>) -> VaeError {
    VaeError::Input {
        name,
        reason: reason.into(),
    }
}
