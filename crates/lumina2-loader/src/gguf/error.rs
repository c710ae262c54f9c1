//! Errors of the GGUF reader.

use std::path::PathBuf;

use super::GgmlType;

/// Everything that can go wrong reading a GGUF file. Each error names the file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened, measured or mapped.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The first four bytes are not `GGUF`.
    #[error("{}: not a GGUF file (magic {found:02x?}, expected \"GGUF\")", .path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The bytes found.
        found: Vec<u8>,
    },
    /// A GGUF version other than 2 or 3.
    #[error("{}: unsupported GGUF version {version} (2 and 3 are supported)", .path.display())]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version found.
        version: u32,
    },
    /// The file ends inside a structure.
    #[error("{}: truncated: the file ends at byte {len} while reading {what} at byte {offset}", .path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// What was being read.
        what: String,
        /// Where it starts.
        offset: u64,
        /// The file's length.
        len: u64,
    },
    /// A count or length that cannot fit in the rest of the file.
    #[error("{}: {what} claims {count} (at least {needed} bytes) but only {left} bytes are left in the file", .path.display())]
    CountTooLarge {
        /// The file.
        path: PathBuf,
        /// What was counted.
        what: String,
        /// The claimed count.
        count: u64,
        /// Bytes the claim needs at the least (saturating).
        needed: u64,
        /// Bytes left after the count.
        left: u64,
    },
    /// A string that is not UTF-8.
    #[error("{}: {what} is not valid UTF-8", .path.display())]
    InvalidUtf8 {
        /// The file.
        path: PathBuf,
        /// Which string.
        what: String,
    },
    /// A metadata value type id that GGUF does not define.
    #[error("{}: metadata `{key}` has unknown value type {id}", .path.display())]
    UnknownValueType {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The type id.
        id: u32,
    },
    /// A boolean byte other than 0 or 1.
    #[error("{}: metadata `{key}` holds the invalid boolean byte {byte}", .path.display())]
    InvalidBool {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The byte.
        byte: u8,
    },
    /// Arrays nested deeper than the reader allows.
    #[error("{}: metadata `{key}` nests arrays deeper than {max} levels", .path.display())]
    NestingTooDeep {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The limit.
        max: usize,
    },
    /// The same metadata key twice.
    #[error("{}: duplicate metadata key `{key}`", .path.display())]
    DuplicateKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// `general.alignment` of the wrong type or not a power of two.
    #[error("{}: invalid general.alignment {value}: must be a u32 power of two", .path.display())]
    BadAlignment {
        /// The file.
        path: PathBuf,
        /// The value as found.
        value: String,
    },
    /// The same tensor name twice.
    #[error("{}: duplicate tensor name `{name}`", .path.display())]
    DuplicateTensor {
        /// The file.
        path: PathBuf,
        /// The name.
        name: String,
    },
    /// A tensor type id that ggml does not define.
    #[error("{}: tensor `{name}` has unknown ggml type {id}", .path.display())]
    UnknownTensorType {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// The type id.
        id: u32,
    },
    /// Dimensions that are too many, too large, or not whole blocks.
    #[error("{}: tensor `{name}` has invalid dims {dims:?}: {why}", .path.display())]
    InvalidDims {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// The dims (innermost first), as many as were read.
        dims: Vec<u64>,
        /// What is wrong.
        why: String,
    },
    /// A tensor offset that is not a multiple of the alignment.
    #[error("{}: tensor `{name}` offset {offset} is not a multiple of the alignment {alignment}", .path.display())]
    MisalignedTensor {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// Its offset in the data section.
        offset: u64,
        /// The file's alignment.
        alignment: u64,
    },
    /// Tensor data that runs past the end of the file.
    #[error("{}: tensor `{name}` spans bytes {offset}..{end} of the data section, which holds only {data_len} bytes", .path.display())]
    TensorPastEnd {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// Start in the data section.
        offset: u64,
        /// End in the data section (saturating).
        end: u64,
        /// Length of the data section.
        data_len: u64,
    },
    /// Two tensors whose data overlap.
    #[error("{}: tensors `{first}` and `{second}` overlap in the data section", .path.display())]
    OverlappingTensors {
        /// The file.
        path: PathBuf,
        /// One tensor.
        first: String,
        /// The other.
        second: String,
    },
    /// No tensor of that name.
    #[error("{}: no tensor named `{name}`", .path.display())]
    NoSuchTensor {
        /// The file.
        path: PathBuf,
        /// The name asked for.
        name: String,
    },
    /// A tensor type that cannot be converted the way asked.
    #[error("{}: tensor `{name}` of type {ggml_type}: {what} is not supported", .path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// Its type.
        ggml_type: GgmlType,
        /// What was asked.
        what: String,
    },
    /// An error from candle while building a tensor.
    #[error("{}: tensor `{name}`: {source}", .path.display())]
    Candle {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// The cause.
        #[source]
        source: Box<candle_core::Error>,
    },
}
