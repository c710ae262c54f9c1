//! GGUF files: a reader that trusts nothing in the file, our own dequantisation
//! kernels (bit-exact with gguf-py), and conversion to candle tensors, either
//! dequantised ([`GgufFile::tensor`]) or kept quantised ([`GgufFile::qtensor`]);
//! our quantisers ([`quantize`]) and an atomic, one-tensor-at-a-time writer
//! ([`write_gguf`]).
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use lumina2_loader::gguf::GgufFile;
//! let f = GgufFile::open("model.gguf")?;
//! for t in f.tensor_infos() {
//!     println!("{} {:?} {}", t.name, t.shape(), t.ggml_type);
//! }
//! let w: Vec<f32> = f.dequantize("x_embedder.weight")?;
//! # Ok(()) }
//! ```

mod dequant;
mod error;
mod parse;
mod quantize;
mod types;
mod write;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::quantized::{QStorage, QTensor};
use candle_core::{DType, Device, Tensor};

pub use dequant::{dequantize, dequantize_into, DequantError};
pub use error::GgufError;
pub use parse::{DEFAULT_ALIGNMENT, MAX_DIMS, MAX_NESTING};
pub use quantize::{quantize, QuantizeError, QUANTIZE_TYPES};
pub use types::{GgmlType, MetadataArray, MetadataValue, TensorInfo};
pub(crate) use write::TempFile;
pub use write::{write_gguf, GgufWriteError, TensorPlan};

/// The bytes of a GGUF file: a memory map, or a buffer.
enum Bytes {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mmap(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// An open GGUF file (version 2 or 3), memory-mapped: tensors are read on demand.
pub struct GgufFile {
    path: PathBuf,
    bytes: Bytes,
    version: u32,
    metadata: BTreeMap<String, MetadataValue>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    alignment: u64,
    data_start: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens and memory-maps `path`, and reads and checks its header.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref();
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = lumina2_weights::fs::open_regular(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let bytes = if len == 0 {
            Bytes::Owned(Vec::new())
        } else {
            // SAFETY: the map is read-only; as with every memory-mapped model
            // loader, the file must not be truncated or modified while open.
            Bytes::Mmap(unsafe { memmap2::Mmap::map(&file) }.map_err(io)?)
        };
        Self::from_bytes_inner(path, bytes)
    }

    /// Reads a GGUF file held in memory; `path` only names it in errors.
    pub fn from_bytes(path: impl AsRef<Path>, bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::from_bytes_inner(path.as_ref(), Bytes::Owned(bytes))
    }

    fn from_bytes_inner(path: &Path, bytes: Bytes) -> Result<Self, GgufError> {
        let h = parse::parse(path, bytes.as_slice())?;
        let by_name = h
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            bytes,
            version: h.version,
            metadata: h.metadata,
            tensors: h.tensors,
            by_name,
            alignment: h.alignment,
            data_start: h.data_start,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// All metadata, by key.
    pub fn metadata(&self) -> &BTreeMap<String, MetadataValue> {
        &self.metadata
    }

    /// The tensors, in file order.
    pub fn tensor_infos(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The alignment of tensor data (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Where the data section starts in the file.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    /// One tensor's info.
    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.by_name
            .get(name)
            .and_then(|&i| self.tensors.get(i))
            .ok_or_else(|| GgufError::NoSuchTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })
    }

    /// A tensor's raw bytes, straight from the map.
    pub fn tensor_data(&self, name: &str) -> Result<&[u8], GgufError> {
        let t = self.tensor_info(name)?;
        self.data_of(t)
    }

    fn data_of(&self, t: &TensorInfo) -> Result<&[u8], GgufError> {
        // Checked at open; checked again so that no index can panic.
        self.data_start
            .checked_add(t.offset)
            .and_then(|s| Some((s, s.checked_add(t.n_bytes)?)))
            .and_then(|(s, e)| {
                self.bytes
                    .as_slice()
                    .get(usize::try_from(s).ok()?..usize::try_from(e).ok()?)
            })
            .ok_or_else(|| GgufError::TensorPastEnd {
                path: self.path.clone(),
                name: t.name.clone(),
                offset: t.offset,
                end: t.offset.saturating_add(t.n_bytes),
                data_len: (self.bytes.as_slice().len() as u64).saturating_sub(self.data_start),
            })
    }

    /// A tensor dequantised to f32, row-major in PyTorch's shape
    /// ([`TensorInfo::shape`]).
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let t = self.tensor_info(name)?;
        let data = self.data_of(t)?;
        let v = dequantize(t.ggml_type, data, t.n_elements as usize)
            .map_err(|e| self.dequant_err(t, e));
        self.release(data);
        v
    }

    /// Drops the pages of `data` (a slice of the memory map, already copied
    /// out) from this process's resident memory. The file's pages stay in the
    /// page cache; without this, a model loaded from a mapped GGUF counted
    /// every tensor twice in its peak RSS (the mapped bytes and the copy).
    fn release(&self, data: &[u8]) {
        #[cfg(unix)]
        if let Bytes::Mmap(m) = &self.bytes {
            const PAGE: usize = 4096;
            let Some(offset) = (data.as_ptr() as usize).checked_sub(m.as_ptr() as usize) else {
                return;
            };
            // Whole pages inside the range only: neighbours may still be read.
            let start = offset.div_ceil(PAGE) * PAGE;
            let end = (offset + data.len()) / PAGE * PAGE;
            if end > start && end <= m.len() {
                // SAFETY: a read-only shared file mapping: after MADV_DONTNEED
                // its pages read back from the file, unchanged (the file must
                // not change while open, as for the map itself). An error
                // (e.g. larger pages) only leaves the pages resident.
                let _ = unsafe {
                    m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
                };
            }
        }
    }

    fn dequant_err(&self, t: &TensorInfo, e: DequantError) -> GgufError {
        GgufError::Unsupported {
            path: self.path.clone(),
            name: t.name.clone(),
            ggml_type: t.ggml_type,
            what: e.to_string(),
        }
    }

    fn candle_err(&self, t: &TensorInfo) -> impl Fn(candle_core::Error) -> GgufError + '_ {
        let name = t.name.clone();
        move |source| GgufError::Candle {
            path: self.path.clone(),
            name: name.clone(),
            source: Box::new(source),
        }
    }

    /// A tensor dequantised to a candle [`Tensor`] of `dtype` (f32, bf16, f16,
    /// ...) in PyTorch's shape, on `device`.
    pub fn tensor(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor, GgufError> {
        let t = self.tensor_info(name)?;
        let v = self.dequantize(name)?;
        let err = self.candle_err(t);
        Tensor::from_vec(v, t.shape(), device)
            .and_then(|x| x.to_dtype(dtype))
            .map_err(err)
    }

    /// A tensor kept in its storage type, as candle's [`QTensor`] in PyTorch's
    /// shape, for the types candle supports ([`GgmlType::to_candle`]).
    pub fn qtensor(&self, name: &str, device: &Device) -> Result<QTensor, GgufError> {
        let t = self.tensor_info(name)?;
        let Some(ct) = t.ggml_type.to_candle() else {
            return Err(GgufError::Unsupported {
                path: self.path.clone(),
                name: t.name.clone(),
                ggml_type: t.ggml_type,
                what: "a candle QTensor".into(),
            });
        };
        let raw = self.data_of(t)?;
        let data = raw;
        // candle reinterprets the bytes as its block structs and asserts on
        // mismatches: make sure they cannot happen.
        if ct.block_size() != t.ggml_type.block_size()
            || ct.type_size() != t.ggml_type.type_size()
            || data.len() % ct.type_size() != 0
            || t.dims
                .first()
                .is_some_and(|&d| d % ct.block_size() as u64 != 0)
        {
            return Err(GgufError::Unsupported {
                path: self.path.clone(),
                name: t.name.clone(),
                ggml_type: t.ggml_type,
                what: "a candle QTensor (block layouts differ)".into(),
            });
        }
        // candle reinterprets the bytes as blocks and asserts their alignment:
        // copy into an 8-byte aligned buffer unless the map already is.
        let words: Vec<u64>;
        let data: &[u8] = if (data.as_ptr() as usize).is_multiple_of(8) {
            data
        } else {
            let mut w = vec![0u64; data.len().div_ceil(8)];
            if let Some(dst) = bytes_of_mut(&mut w).get_mut(..data.len()) {
                dst.copy_from_slice(data);
            }
            words = w;
            bytes_of(&words).get(..data.len()).unwrap_or_default()
        };
        let q = self.qtensor_from(t, ct, data, device);
        self.release(raw);
        q
    }

    fn qtensor_from(
        &self,
        t: &TensorInfo,
        ct: candle_core::quantized::GgmlDType,
        data: &[u8],
        device: &Device,
    ) -> Result<QTensor, GgufError> {
        let err = self.candle_err(t);
        let storage = QStorage::from_data(Cow::Borrowed(data), device, ct).map_err(&err)?;
        QTensor::new(storage, t.shape()).map_err(err)
    }
}

fn bytes_of(words: &[u64]) -> &[u8] {
    bytemuck::cast_slice(words)
}

pub(crate) fn bytes_of_mut(words: &mut [u64]) -> &mut [u8] {
    bytemuck::cast_slice_mut(words)
}
