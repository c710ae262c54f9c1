//! Typed errors of the crate.

use std::path::PathBuf;

/// Everything that can go wrong when building or running the autoencoder.
#[derive(Debug, thiserror::Error)]
pub enum VaeError {
    /// A weight the configuration requires is absent.
    #[error("weight `{key}` is missing")]
    MissingWeight {
        /// Full tensor key, e.g. `decoder.conv_in.weight`.
        key: String,
    },
    /// A weight has another shape than the configuration implies.
    #[error("weight `{key}` has shape {found:?}, expected {expected:?}")]
    WeightShape {
        /// Full tensor key.
        key: String,
        /// Shape the configuration implies.
        expected: Vec<usize>,
        /// Shape found in the weights.
        found: Vec<usize>,
    },
    /// The weight source failed to produce a tensor.
    #[error("loading weight `{key}`: {source}")]
    WeightLoad {
        /// Full tensor key.
        key: String,
        /// The underlying candle error.
        source: candle_core::Error,
    },
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
