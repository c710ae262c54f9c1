//! Writing GGUF v3 files, one tensor at a time, atomically.
//!
//! The header (metadata, then every tensor's name, dims, type and offset) is
//! known before any data: offsets follow from the shapes and types. Tensor
//! data is then asked for one tensor at a time, so memory holds one tensor,
//! never the model. The file is written under a temporary name in the
//! destination's folder and renamed over the destination only once complete
//! and synced; on any error (or a panic) the temporary file is removed and an
//! existing destination is left untouched.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::parse::DEFAULT_ALIGNMENT;
use super::types::{MetadataArray, MetadataValue};
use super::GgmlType;

/// Why a GGUF file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum GgufWriteError {
    /// Creating, writing, syncing or renaming the file failed.
    #[error("writing {path}: {source}")]
    Io {
        /// The file being written (the destination, not its temporary name).
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A tensor's shape does not fit its type's blocks.
    #[error("{path}: tensor `{name}` of shape {shape:?} cannot be stored as {ggml_type} (rows must be whole {block_size}-element blocks)")]
    Shape {
        /// The destination.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// Its shape (PyTorch order).
        shape: Vec<usize>,
        /// The type asked for.
        ggml_type: GgmlType,
        /// Elements per block of the type.
        block_size: usize,
    },
    /// The data handed in for a tensor is not the size its header says.
    #[error("{path}: tensor `{name}`: {got} bytes of data, its header says {expected}")]
    DataSize {
        /// The destination.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// Bytes expected.
        expected: u64,
        /// Bytes given.
        got: u64,
    },
    /// The source of the tensor data failed.
    #[error("{path}: tensor `{name}`: {reason}")]
    Source {
        /// The destination.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// What went wrong.
        reason: String,
    },
}

/// One tensor of a file to be written: its name, PyTorch shape and storage type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorPlan {
    /// The tensor's name.
    pub name: String,
    /// Shape, outermost first (PyTorch's order; GGUF stores it reversed).
    pub shape: Vec<usize>,
    /// Storage type.
    pub ggml_type: GgmlType,
}

impl TensorPlan {
    /// Bytes of data, or `None` when the innermost dimension is not a whole
    /// number of blocks (or the size overflows).
    pub fn n_bytes(&self) -> Option<u64> {
        let (bs, ts) = (self.ggml_type.block_size(), self.ggml_type.type_size());
        let inner = self.shape.last().copied().unwrap_or(1);
        if !inner.is_multiple_of(bs) {
            return None;
        }
        let n: usize = self
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))?;
        u64::try_from((n / bs).checked_mul(ts)?).ok()
    }
}

/// A file under a temporary name next to its destination, removed on drop
/// unless [`TempFile::commit`] renamed it.
pub(crate) struct TempFile {
    tmp: PathBuf,
    dest: PathBuf,
    done: bool,
}

impl TempFile {
    /// Creates a new, empty temporary file in `dest`'s folder.
    pub(crate) fn create(dest: &Path) -> std::io::Result<(Self, File)> {
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into());
        let dir = dest.parent().filter(|p| !p.as_os_str().is_empty());
        let mut last = None;
        for attempt in 0..100u32 {
            let tmp_name = format!(".{name}.{}.{attempt}.partial", std::process::id());
            let tmp = dir.map_or_else(|| PathBuf::from(&tmp_name), |d| d.join(&tmp_name));
            match OpenOptions::new().write(true).create_new(true).open(&tmp) {
                Ok(f) => {
                    return Ok((
                        Self {
                            tmp,
                            dest: dest.to_path_buf(),
                            done: false,
                        },
                        f,
                    ))
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no free temporary name")))
    }

    /// Renames the finished file over the destination.
    pub(crate) fn commit(mut self) -> std::io::Result<()> {
        std::fs::rename(&self.tmp, &self.dest)?;
        self.done = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes a GGUF v3 file at `path`: `metadata` in order, then `tensors`,
/// whose bytes `data(i)` supplies one tensor at a time (exactly
/// [`TensorPlan::n_bytes`] of them, in the plan's type). Tensor data is
/// aligned to 32 bytes, gguf-py's default.
pub fn write_gguf(
    path: &Path,
    metadata: &[(String, MetadataValue)],
    tensors: &[TensorPlan],
    mut data: impl FnMut(usize) -> Result<Vec<u8>, String>,
) -> Result<(), GgufWriteError> {
    let io = |source| GgufWriteError::Io {
        path: path.to_path_buf(),
        source,
    };
    let align = DEFAULT_ALIGNMENT;
    let mut sizes = Vec::with_capacity(tensors.len());
    for t in tensors {
        let n = t.n_bytes().ok_or_else(|| GgufWriteError::Shape {
            path: path.to_path_buf(),
            name: t.name.clone(),
            shape: t.shape.clone(),
            ggml_type: t.ggml_type,
            block_size: t.ggml_type.block_size(),
        })?;
        sizes.push(n);
    }
    let (guard, file) = TempFile::create(path).map_err(io)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut head = Vec::new();
    head.extend_from_slice(b"GGUF");
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_str(&mut head, k);
        put_value(&mut head, v);
    }
    let mut offset = 0u64;
    for (t, &n) in tensors.iter().zip(&sizes) {
        put_str(&mut head, &t.name);
        head.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for &d in t.shape.iter().rev() {
            head.extend_from_slice(&(d as u64).to_le_bytes());
        }
        head.extend_from_slice(&t.ggml_type.id().to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        offset = (offset + n).next_multiple_of(align);
    }
    pad(&mut head, align);
    w.write_all(&head).map_err(io)?;
    for (i, (t, &n)) in tensors.iter().zip(&sizes).enumerate() {
        let bytes = data(i).map_err(|reason| GgufWriteError::Source {
            path: path.to_path_buf(),
            name: t.name.clone(),
            reason,
        })?;
        if bytes.len() as u64 != n {
            return Err(GgufWriteError::DataSize {
                path: path.to_path_buf(),
                name: t.name.clone(),
                expected: n,
                got: bytes.len() as u64,
            });
        }
        w.write_all(&bytes).map_err(io)?;
        let padded = n.next_multiple_of(align);
        w.write_all(&vec![0u8; (padded - n) as usize]).map_err(io)?;
    }
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    drop(file);
    guard.commit().map_err(io)
}

fn pad(v: &mut Vec<u8>, align: u64) {
    let len = (v.len() as u64).next_multiple_of(align) as usize;
    v.resize(len, 0);
}

fn put_str(v: &mut Vec<u8>, s: &str) {
    v.extend_from_slice(&(s.len() as u64).to_le_bytes());
    v.extend_from_slice(s.as_bytes());
}

/// `gguf_type` ids of the value types.
fn type_id(v: &MetadataValue) -> u32 {
    use MetadataValue::*;
    match v {
        U8(_) => 0,
        I8(_) => 1,
        U16(_) => 2,
        I16(_) => 3,
        U32(_) => 4,
        I32(_) => 5,
        F32(_) => 6,
        Bool(_) => 7,
        String(_) => 8,
        Array(_) => 9,
        U64(_) => 10,
        I64(_) => 11,
        F64(_) => 12,
    }
}

fn array_type_id(a: &MetadataArray) -> u32 {
    use MetadataArray::*;
    match a {
        U8(_) => 0,
        I8(_) => 1,
        U16(_) => 2,
        I16(_) => 3,
        U32(_) => 4,
        I32(_) => 5,
        F32(_) => 6,
        Bool(_) => 7,
        String(_) => 8,
        Array(_) => 9,
        U64(_) => 10,
        I64(_) => 11,
        F64(_) => 12,
    }
}

fn put_value(v: &mut Vec<u8>, value: &MetadataValue) {
    v.extend_from_slice(&type_id(value).to_le_bytes());
    put_payload(v, value);
}

fn put_payload(v: &mut Vec<u8>, value: &MetadataValue) {
    use MetadataValue as M;
    match value {
        M::U8(x) => v.push(*x),
        M::I8(x) => v.extend_from_slice(&x.to_le_bytes()),
        M::U16(x) => v.extend_from_slice(&x.to_le_bytes()),
        M::I16(x) => v.extend_from_slice(&x.to_le_bytes()),
        M::U32(x) => v.extend_from_slice(&x.to_le_bytes()),
        M::I32(x) => v.extend_from_slice(&x.to_le_bytes()),
        M::F32(x) => v.extend_from_slice(&x.to_le_bytes()),
        M::Bool(x) => v.push(u8::from(*x)),
        M::String(s) => put_str(v, s),
        M::Array(a) => put_array(v, a),
        M::U64(x) => v.extend_from_slice(&x.to_le_bytes()),
        M::I64(x) => v.extend_from_slice(&x.to_le_bytes()),
        M::F64(x) => v.extend_from_slice(&x.to_le_bytes()),
    }
}

fn put_array(v: &mut Vec<u8>, a: &MetadataArray) {
    use MetadataArray as A;
    v.extend_from_slice(&array_type_id(a).to_le_bytes());
    v.extend_from_slice(&(a.len() as u64).to_le_bytes());
    match a {
        A::U8(x) => v.extend_from_slice(x),
        A::I8(x) => x.iter().for_each(|e| v.extend_from_slice(&e.to_le_bytes())),
        A::U16(x) => x.iter().for_each(|e| v.extend_from_slice(&e.to_le_bytes())),
        A::I16(x) => x.iter().for_each(|e| v.extend_from_slice(&e.to_le_bytes())),
        A::U32(x) => x.iter().for_each(|e| v.extend_from_slice(&e.to_le_bytes())),
        A::I32(x) => x.iter().for_each(|e| v.extend_from_slice(&e.to_le_bytes())),
        A::F32(x) => x.iter().for_each(|e| v.extend_from_slice(&e.to_le_bytes())),
        A::Bool(x) => x.iter().for_each(|e| v.push(u8::from(*e))),
        A::String(x) => x.iter().for_each(|s| put_str(v, s)),
        A::Array(x) => x.iter().for_each(|e| put_array(v, e)),
        A::U64(x) => x.iter().for_each(|e| v.extend_from_slice(&e.to_le_bytes())),
        A::I64(x) => x.iter().for_each(|e| v.extend_from_slice(&e.to_le_bytes())),
        A::F64(x) => x.iter().for_each(|e| v.extend_from_slice(&e.to_le_bytes())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{quantize, GgufFile};

    fn dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("lumina2-gguf-write-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn written_files_read_back() {
        let d = dir("rt");
        let path = d.join("t.gguf");
        let w: Vec<f32> = (0..64 * 32).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..5).map(|i| i as f32).collect();
        let q = quantize::quantize(GgmlType::Q8_0, &w).unwrap();
        let plans = vec![
            TensorPlan {
                name: "w".into(),
                shape: vec![64, 32],
                ggml_type: GgmlType::Q8_0,
            },
            TensorPlan {
                name: "b".into(),
                shape: vec![5],
                ggml_type: GgmlType::F32,
            },
        ];
        let meta = vec![
            (
                "general.architecture".to_string(),
                MetadataValue::String("lumina2".into()),
            ),
            (
                "general.quantization_version".to_string(),
                MetadataValue::U32(2),
            ),
            (
                "x.arr".to_string(),
                MetadataValue::Array(MetadataArray::U64(vec![1, 2])),
            ),
        ];
        let fb: Vec<u8> = b.iter().flat_map(|v| v.to_le_bytes()).collect();
        write_gguf(&path, &meta, &plans, |i| {
            Ok(if i == 0 { q.clone() } else { fb.clone() })
        })
        .unwrap();
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.version(), 3);
        assert_eq!(
            f.metadata()["general.architecture"].as_str(),
            Some("lumina2")
        );
        assert_eq!(
            f.metadata()["x.arr"],
            MetadataValue::Array(MetadataArray::U64(vec![1, 2]))
        );
        assert_eq!(f.tensor_info("w").unwrap().shape(), vec![64, 32]);
        assert_eq!(f.tensor_data("w").unwrap(), &q[..]);
        assert_eq!(f.dequantize("b").unwrap(), b);
        assert_eq!(
            std::fs::read_dir(&d).unwrap().count(),
            1,
            "no temporary file left"
        );
    }

    #[test]
    fn a_failure_leaves_nothing_and_keeps_the_old_file() {
        let d = dir("fail");
        let path = d.join("t.gguf");
        std::fs::write(&path, b"old").unwrap();
        let plans = vec![
            TensorPlan {
                name: "a".into(),
                shape: vec![4],
                ggml_type: GgmlType::F32,
            },
            TensorPlan {
                name: "b".into(),
                shape: vec![4],
                ggml_type: GgmlType::F32,
            },
        ];
        let e = write_gguf(&path, &[], &plans, |i| {
            if i == 0 {
                Ok(vec![0; 16])
            } else {
                Err("source failed".into())
            }
        })
        .unwrap_err();
        assert!(e.to_string().contains("tensor `b`: source failed"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
        // Wrong data sizes and impossible block shapes are refused too.
        let e = write_gguf(&path, &[], &plans, |_| Ok(vec![0; 15])).unwrap_err();
        assert!(matches!(e, GgufWriteError::DataSize { .. }), "{e}");
        let bad = vec![TensorPlan {
            name: "q".into(),
            shape: vec![2, 48],
            ggml_type: GgmlType::Q8_0,
        }];
        let e = write_gguf(&path, &[], &bad, |_| Ok(vec![])).unwrap_err();
        assert!(matches!(e, GgufWriteError::Shape { .. }), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
    }
}
