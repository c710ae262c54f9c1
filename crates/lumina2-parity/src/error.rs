//! Errors of reading a case and comparing tensors.

use std::path::PathBuf;

/// Why a case could not be read or compared.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or folder of the case could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file of the case is not a regular file (a folder, a FIFO, a device).
    #[error("{}: not a regular file", path.display())]
    NotRegularFile {
        /// The path.
        path: PathBuf,
    },
    /// `case.json` is larger than any case needs.
    #[error("{}: {size} bytes, more than the {limit} a case.json may have", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size (at least).
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// `case.json` is not valid JSON of the expected shape.
    #[error("{}: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A field of `case.json` has a value the format does not allow.
    #[error("{}: `{field}` is {found}, expected {expected}", path.display())]
    InvalidField {
        /// The `case.json` file.
        path: PathBuf,
        /// The field.
        field: &'static str,
        /// What it holds.
        found: String,
        /// What it may hold.
        expected: &'static str,
    },
    /// A path in the case names something outside the case folder.
    #[error(
        "{}: `{field}` is `{value}`: paths must be relative and stay inside the case folder",
        path.display()
    )]
    PathEscapes {
        /// The `case.json` file.
        path: PathBuf,
        /// The field naming the path.
        field: String,
        /// The path as written.
        value: String,
    },
    /// A path in the case names nothing.
    #[error("{}: `{field}` is `{value}`, which does not exist in the case", path.display())]
    Missing {
        /// The `case.json` file.
        path: PathBuf,
        /// The field naming the path.
        field: String,
        /// The path as written.
        value: String,
    },
    /// The component needs a field the case does not have.
    #[error("{}: no `{field}`", path.display())]
    MissingField {
        /// The `case.json` file.
        path: PathBuf,
        /// The field.
        field: &'static str,
    },
    /// A tensor file has no tensor of that name.
    #[error("{file} has no tensor `{name}`")]
    MissingTensor {
        /// The file name (`inputs.safetensors`, `expected.safetensors`).
        file: &'static str,
        /// The tensor name.
        name: String,
    },
    /// Reading a tensor file or converting a tensor failed.
    #[error("{}: {source}", path.display())]
    Tensor {
        /// The file (or the case folder, for a conversion).
        path: PathBuf,
        /// candle's error.
        source: candle_core::Error,
    },
    /// Our output and the reference have different shapes.
    #[error("shape {found:?}, expected {expected:?}")]
    Shape {
        /// The reference's shape.
        expected: Vec<usize>,
        /// Ours.
        found: Vec<usize>,
    },
    /// Converting a tensor for the comparison failed.
    #[error("comparing: {0}")]
    Compare(#[source] candle_core::Error),
}
