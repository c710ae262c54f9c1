//! Errors of weight loading.

/// What can go wrong while a model takes its weights.
///
/// The model crates map these onto their own error types (same variant names),
/// so their users see one error type per crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A weight the model needs is not in the weight source.
    #[error("missing weight `{key}` in {source_name}")]
    MissingWeight {
        /// The full tensor key.
        key: String,
        /// The weight source (usually file names).
        source_name: String,
    },
    /// A weight exists but has the wrong shape for the config.
    #[error("weight `{key}` in {source_name} has shape {found:?}, expected {expected:?}")]
    WeightShape {
        /// The full tensor key.
        key: String,
        /// The weight source (usually file names).
        source_name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape found in the source.
        found: Vec<usize>,
    },
    /// A weight could not be read from its source.
    #[error("cannot load weight `{key}` from {source_name}: {reason}")]
    WeightLoad {
        /// The full tensor key (empty when a whole file is refused).
        key: String,
        /// The weight source.
        source_name: String,
        /// What went wrong.
        reason: String,
    },
    /// An error raised by candle while converting a weight.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
