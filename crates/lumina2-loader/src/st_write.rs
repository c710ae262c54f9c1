//! Writing a safetensors file one tensor at a time, atomically.
//!
//! The header (every tensor's dtype, shape and byte span) follows from the
//! shapes alone, so it is written first and the data is then asked for one
//! tensor at a time: memory holds one tensor, never the model. The file is
//! written under a temporary name next to the destination and renamed over it
//! only when complete and synced; on failure nothing is left and an existing
//! destination is untouched.

use std::io::{BufWriter, Write};
use std::path::Path;

use candle_core::DType;

use crate::gguf::{GgufWriteError, TempFile};

/// One tensor of a safetensors file to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StPlan {
    /// The key.
    pub name: String,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Element type: F32, F16, BF16, or U8 (raw bytes, such as an embedded
    /// tokenizer).
    pub dtype: DType,
}

fn st_name(d: DType) -> &'static str {
    match d {
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::U8 => "U8",
        _ => "F32",
    }
}

fn n_bytes(p: &StPlan) -> u64 {
    p.shape.iter().product::<usize>() as u64 * p.dtype.size_in_bytes() as u64
}

/// Writes `tensors` to `path` (with `__metadata__` = `metadata`), asking
/// `data(i)` for the little-endian bytes of tensor `i`. Errors reuse the GGUF
/// writer's type: the failure modes are the same.
pub fn write_safetensors(
    path: &Path,
    metadata: &[(&str, &str)],
    tensors: &[StPlan],
    data: impl FnMut(usize) -> Result<Vec<u8>, String>,
) -> Result<(), GgufWriteError> {
    let guard = write_safetensors_pending(path, metadata, tensors, data)?;
    guard.commit().map_err(|source| GgufWriteError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// [`write_safetensors`] up to the rename: the complete, synced file under
/// its temporary name, renamed into place by [`TempFile::commit`] (removed
/// if dropped), so that several files can be put in place together.
pub(crate) fn write_safetensors_pending(
    path: &Path,
    metadata: &[(&str, &str)],
    tensors: &[StPlan],
    mut data: impl FnMut(usize) -> Result<Vec<u8>, String>,
) -> Result<TempFile, GgufWriteError> {
    let io = |source| GgufWriteError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut header = serde_json::Map::new();
    let meta: serde_json::Map<String, serde_json::Value> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
        .collect();
    header.insert("__metadata__".into(), meta.into());
    let mut offset = 0u64;
    for t in tensors {
        let n = n_bytes(t);
        header.insert(
            t.name.clone(),
            serde_json::json!({
                "dtype": st_name(t.dtype),
                "shape": t.shape,
                "data_offsets": [offset, offset + n],
            }),
        );
        offset += n;
    }
    let mut head = serde_json::to_vec(&header).map_err(|e| io(std::io::Error::other(e)))?;
    // The format pads the header with spaces to a multiple of 8 bytes.
    head.resize(head.len().next_multiple_of(8), b' ');
    let (guard, file) = TempFile::create(path).map_err(io)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    w.write_all(&(head.len() as u64).to_le_bytes())
        .and_then(|()| w.write_all(&head))
        .map_err(io)?;
    for (i, t) in tensors.iter().enumerate() {
        let bytes = data(i).map_err(|reason| GgufWriteError::Source {
            path: path.to_path_buf(),
            name: t.name.clone(),
            reason,
        })?;
        if bytes.len() as u64 != n_bytes(t) {
            return Err(GgufWriteError::DataSize {
                path: path.to_path_buf(),
                name: t.name.clone(),
                expected: n_bytes(t),
                got: bytes.len() as u64,
            });
        }
        w.write_all(&bytes).map_err(io)?;
    }
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    drop(file);
    Ok(guard)
}
