//! PyTorch `torch.save` zip checkpoints (`.pth`), read without executing
//! pickle code.
//!
//! The archive's directory is read by `archive`, its `data.pkl` by our
//! bounded interpreter ([`parse_state_dict`]); a tensor is a strided view of
//! a storage entry, checked to fit the bytes the entry really holds, and read
//! into a contiguous buffer on demand.

mod archive;
mod pickle;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lumina2_transformer::WeightSource;
use lumina2_weights::fs::open_regular;

use crate::folder::Error;
pub use crate::pickle_guard::StorageType;
pub use archive::{MAX_DEFLATE_RATIO, MAX_DIRECTORY_BYTES};
pub use pickle::{
    parse_state_dict, PickleError, StateDict, TensorView, MAX_DEPTH, MAX_MARKS, MAX_MEMO,
    MAX_OBJECTS, MAX_RANK, MAX_REFERENCES, MAX_STACK,
};

/// Largest `data.pkl` we read (a state dict's pickle is about 150 bytes per
/// tensor).
pub const MAX_PICKLE_BYTES: u64 = 64 << 20;

/// A tensor may be larger than its storage entry only by broadcasting (a
/// stride-0 view of a few values); it may then materialise at most this many
/// bytes.
pub const MAX_BROADCAST_BYTES: u64 = 64 << 20;

/// A `torch.save` archive holding a flat state dict.
pub struct PthFile {
    path: PathBuf,
    tensors: HashMap<String, Located>,
}

/// A tensor and where its storage's bytes are.
struct Located {
    view: TensorView,
    dims: Vec<usize>,
    entry: archive::Entry,
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl PthFile {
    /// Reads the archive's directory and pickle (refusing any global beyond
    /// tensor rebuilding and storage types) and checks every tensor against
    /// its storage entry. Tensor data is read on demand.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref().to_path_buf();
        let bad = |reason: String| Error::Pth {
            path: path.clone(),
            reason,
        };
        let mut file = open_regular(&path).map_err(io_error(&path))?;
        let file_len = file.metadata().map_err(io_error(&path))?.len();
        let dir = archive::Directory::read(&mut file, file_len)
            .map_err(|e| bad(format!("not a torch.save zip archive: {e}")))?;
        let pkl: Vec<&str> = dir
            .names()
            .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
            .collect();
        let pkl_name = match pkl.as_slice() {
            [one] => one.to_string(),
            [] => return Err(bad("no data.pkl in the archive".into())),
            _ => return Err(bad(format!("several pickles in the archive: {pkl:?}"))),
        };
        let prefix = &pkl_name[..pkl_name.len() - "data.pkl".len()];
        let read_entry = |file: &mut File, name: &str, max: u64| -> Result<Vec<u8>, Error> {
            let e = dir.entry(file, name).map_err(&bad)?;
            if e.len > max {
                return Err(bad(format!("{name} is {} bytes, more than {max}", e.len)));
            }
            e.read(file, 0, e.len)
                .map_err(|e| bad(format!("{name}: {e}")))
        };
        let byteorder = format!("{prefix}byteorder");
        if dir.names().any(|n| n == byteorder) {
            let order = read_entry(&mut file, &byteorder, 16)?;
            if order != b"little" {
                return Err(bad(format!(
                    "byte order `{}`; only little-endian checkpoints are read",
                    String::from_utf8_lossy(&order)
                )));
            }
        }
        let data = read_entry(&mut file, &pkl_name, MAX_PICKLE_BYTES)?;
        let state = parse_state_dict(&data).map_err(|e| match e {
            PickleError::Global { .. } => Error::UnsafePickle {
                path: path.clone(),
                reason: format!("{pkl_name}: {e}"),
            },
            other => bad(format!("{pkl_name}: {other}")),
        })?;
        let mut storages: HashMap<String, archive::Entry> = HashMap::new();
        let mut tensors = HashMap::new();
        for (name, view) in state.tensors {
            let bad_tensor = |reason: String| bad(format!("tensor `{name}`: {reason}"));
            let entry = match storages.get(&view.storage_key) {
                Some(e) => *e,
                None => {
                    let e = dir
                        .entry(&mut file, &format!("{prefix}data/{}", view.storage_key))
                        .map_err(&bad_tensor)?;
                    storages.insert(view.storage_key.clone(), e);
                    e
                }
            };
            let esz = view.storage_type.elem_size();
            // The pickle's view fits the storage's declared length; the
            // declared length must fit the bytes the entry really holds.
            let declared = view.storage_numel.checked_mul(esz);
            if declared.is_none_or(|d| d > entry.len) {
                return Err(bad_tensor(format!(
                    "storage `{}` holds {} bytes, its {} {} elements need {}",
                    view.storage_key,
                    entry.len,
                    view.storage_numel,
                    view.storage_type.name(),
                    declared.map_or("more than 2^64".to_string(), |d| d.to_string())
                )));
            }
            let out = view.numel().and_then(|n| n.checked_mul(esz));
            if out.is_none_or(|o| o > entry.len.max(MAX_BROADCAST_BYTES)) {
                return Err(bad_tensor(format!(
                    "a view of shape {:?} would expand storage `{}` of {} bytes to more than {} bytes",
                    view.size,
                    view.storage_key,
                    entry.len,
                    entry.len.max(MAX_BROADCAST_BYTES)
                )));
            }
            let dims = view
                .size
                .iter()
                .map(|&d| usize::try_from(d))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| bad_tensor(format!("shape {:?} overflows", view.size)))?;
            tensors.insert(name, Located { view, dims, entry });
        }
        Ok(Self { path, tensors })
    }

    /// The state-dict keys.
    pub fn keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self.tensors.keys().cloned().collect();
        k.sort();
        k
    }

    /// The shape of a tensor, from the pickle.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|t| t.dims.clone())
    }

    /// The strided view a tensor is, from the pickle.
    pub fn view(&self, name: &str) -> Option<&TensorView> {
        self.tensors.get(name).map(|t| &t.view)
    }

    /// Reads one tensor as a contiguous CPU tensor. Only the storage bytes the
    /// view reaches are read; `open` checked they are in the file.
    pub fn tensor(&self, name: &str) -> Result<Tensor, Error> {
        let bad = |reason: String| Error::Pth {
            path: self.path.clone(),
            reason: format!("tensor `{name}`: {reason}"),
        };
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| bad("not in the checkpoint".into()))?;
        let v = &t.view;
        let dtype: DType = v.storage_type.dtype().ok_or_else(|| {
            bad(format!(
                "torch.{} has no matching candle dtype",
                v.storage_type.name()
            ))
        })?;
        let esz = v.storage_type.elem_size();
        // `open` checked that these products fit the storage entry.
        let numel = v.numel().unwrap_or(0);
        let end = v.storage_end().unwrap_or(0);
        let raw = if numel == 0 {
            Vec::new()
        } else {
            let mut file = open_regular(&self.path).map_err(io_error(&self.path))?;
            let start = v.offset * esz;
            if v.is_contiguous() {
                t.entry.read(&mut file, start, numel * esz)
            } else {
                t.entry
                    .read(&mut file, start, (end - v.offset) * esz)
                    .and_then(|span| {
                        gather(&span, v, esz as usize)
                            .ok_or_else(|| "the view runs past the bytes read".to_string())
                    })
            }
            .map_err(|e| bad(format!("storage `{}`: {e}", v.storage_key)))?
        };
        Tensor::from_raw_buffer(&raw, dtype, &t.dims, &Device::Cpu).map_err(|e| bad(e.to_string()))
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The elements of a strided view, in row-major order. `span` holds the
/// storage from the view's first element to its last (`None` if it does not).
fn gather(span: &[u8], v: &TensorView, esz: usize) -> Option<Vec<u8>> {
    let numel = v.numel().unwrap_or(0) as usize;
    let mut out = Vec::with_capacity(numel * esz);
    let mut index = vec![0u64; v.size.len()];
    // Element position relative to the view's offset. An odometer over the
    // index: each step adds a stride, a carry takes back a whole dimension.
    // Wrapping arithmetic: a stride of a size-1 dimension may be any value,
    // and is added then taken back before any element is read.
    let mut at = 0u64;
    for _ in 0..numel {
        let b = usize::try_from(at).ok()?.checked_mul(esz)?;
        out.extend_from_slice(span.get(b..b.checked_add(esz)?)?);
        for d in (0..index.len()).rev() {
            index[d] += 1;
            at = at.wrapping_add(v.stride[d]);
            if index[d] < v.size[d] {
                break;
            }
            at = at.wrapping_sub(v.stride[d].wrapping_mul(v.size[d]));
            index[d] = 0;
        }
    }
    Some(out)
}

impl WeightSource for PthFile {
    fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }
    fn tensor(&self, key: &str) -> lumina2_weights::Result<Tensor> {
        PthFile::tensor(self, key).map_err(|e| lumina2_weights::Error::WeightLoad {
            key: key.to_string(),
            source_name: self.path.display().to_string(),
            reason: e.to_string(),
        })
    }
    fn keys(&self) -> Vec<String> {
        PthFile::keys(self)
    }
    fn name(&self) -> String {
        self.path.display().to_string()
    }
    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        PthFile::shape(self, key)
    }
}
