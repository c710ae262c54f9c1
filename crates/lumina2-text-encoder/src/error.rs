//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong when loading or running the text encoder or
/// encoding prompts.
///
/// Variants carry what a user needs to fix the problem: the file, the tensor
/// key, the expected and the found shape.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file that was read.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A JSON file (config, shard index) is not valid for its purpose.
    #[error("invalid JSON in {origin}: {source}")]
    Json {
        /// The file (or `<string>`) that was parsed.
        origin: String,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// The config parsed but describes a model this crate cannot build.
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    /// A folder does not hold the safetensors files of a model.
    #[error("no model weights in {path}: {reason}")]
    NoWeights {
        /// The folder.
        path: PathBuf,
        /// What was missing.
        reason: String,
    },
    /// The tokenizer file could not be loaded or used.
    #[error("tokenizer {origin}: {reason}")]
    Tokenizer {
        /// The tokenizer file (or what was being done with it).
        origin: String,
        /// What went wrong.
        reason: String,
    },
    /// A chat template could not be parsed or rendered (syntax error, its
    /// own `raise_exception`, a limit reached).
    #[error("chat template {origin}: {reason}")]
    ChatTemplate {
        /// The file (and key) the template came from.
        origin: String,
        /// What went wrong.
        reason: String,
    },
    /// A SentencePiece `tokenizer.model` is malformed or not a BPE model.
    #[error("SentencePiece model {origin}: {source}")]
    SentencePiece {
        /// The file (or file and tensor key) the model came from.
        origin: String,
        /// What was wrong.
        source: crate::sentencepiece::SentencePieceError,
    },
    /// An input has the wrong shape, dtype or content.
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
