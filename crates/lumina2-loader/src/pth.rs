//! PyTorch `torch.save` zip checkpoints (`.pth`), read without executing pickle code.

use std::collections::HashMap;
use std::io::{BufReader, Cursor, Read};
use std::path::{Path, PathBuf};

use candle_core::pickle::{Object, Stack, TensorInfo};
use candle_core::{Device, Tensor};
use lumina2_transformer::WeightSource;

use crate::folder::Error;
use crate::pickle_guard::check_globals;

/// Largest `data.pkl` we read (a state dict's pickle is a few MB at most).
const MAX_PICKLE_BYTES: u64 = 256 << 20;

/// A `torch.save` archive holding a flat state dict.
pub struct PthFile {
    path: PathBuf,
    infos: HashMap<String, TensorInfo>,
}

impl PthFile {
    /// Reads the archive's pickle (refusing any global beyond tensor rebuilding
    /// and storage types) and its tensor table. Tensor data is read on demand.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref().to_path_buf();
        let bad = |reason: String| Error::Pth {
            path: path.clone(),
            reason,
        };
        let file = std::fs::File::open(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let mut zip = zip::ZipArchive::new(BufReader::new(file))
            .map_err(|e| bad(format!("not a torch.save zip archive: {e}")))?;
        let pkl: Vec<String> = zip
            .file_names()
            .map(str::to_string)
            .filter(|n| n == "data.pkl" || n.ends_with("/data.pkl"))
            .collect();
        let pkl_name = match pkl.as_slice() {
            [one] => one.clone(),
            [] => return Err(bad("no data.pkl in the archive".into())),
            _ => return Err(bad(format!("several pickles in the archive: {pkl:?}"))),
        };
        let mut entry = zip
            .by_name(&pkl_name)
            .map_err(|e| bad(format!("{pkl_name}: {e}")))?;
        if entry.size() > MAX_PICKLE_BYTES {
            return Err(bad(format!(
                "{pkl_name} is {} bytes, too large for a state dict",
                entry.size()
            )));
        }
        let mut data = Vec::new();
        entry
            .by_ref()
            .take(MAX_PICKLE_BYTES)
            .read_to_end(&mut data)
            .map_err(|e| bad(format!("{pkl_name}: {e}")))?;
        drop(entry);
        check_globals(&data).map_err(|reason| Error::UnsafePickle {
            path: path.clone(),
            reason,
        })?;
        let mut stack = Stack::empty();
        stack
            .read_loop(&mut Cursor::new(&data))
            .map_err(|e| bad(format!("{pkl_name}: {e}")))?;
        let obj = stack
            .finalize()
            .map_err(|e| bad(format!("{pkl_name}: {e}")))?;
        let dir = PathBuf::from(pkl_name.trim_end_matches(".pkl"));
        let Object::Dict(items) = obj else {
            return Err(bad(
                "the pickle is not a state dict (a dict of tensors)".into()
            ));
        };
        let mut infos = HashMap::new();
        for (k, v) in items {
            let Object::Unicode(name) = k.clone() else {
                return Err(bad(format!("a state-dict key is not a string: {k:?}")));
            };
            let info = v
                .into_tensor_info(k, &dir)
                .map_err(|e| bad(format!("tensor `{name}`: {e}")))?
                .ok_or_else(|| bad(format!("`{name}` is not a tensor")))?;
            if infos.insert(name.clone(), info).is_some() {
                return Err(bad(format!("duplicate key `{name}`")));
            }
        }
        Ok(Self { path, infos })
    }

    /// The state-dict keys.
    pub fn keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self.infos.keys().cloned().collect();
        k.sort();
        k
    }

    /// The shape of a tensor, from the pickle.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.infos.get(name).map(|i| i.layout.dims().to_vec())
    }

    /// Reads one tensor. Its claimed size is checked against its storage entry
    /// before anything is allocated.
    pub fn tensor(&self, name: &str) -> Result<Tensor, Error> {
        let bad = |reason: String| Error::Pth {
            path: self.path.clone(),
            reason: format!("tensor `{name}`: {reason}"),
        };
        let info = self
            .infos
            .get(name)
            .ok_or_else(|| bad("not in the checkpoint".into()))?;
        if !info.layout.is_contiguous() {
            return Err(bad(format!(
                "non-contiguous storage layout {:?}",
                info.layout
            )));
        }
        let elems = info.layout.shape().elem_count();
        let bytes = elems
            .checked_mul(info.dtype.size_in_bytes())
            .and_then(|b| b.checked_add(info.layout.start_offset() * info.dtype.size_in_bytes()))
            .ok_or_else(|| bad("size overflows".into()))?;
        let file = std::fs::File::open(&self.path).map_err(|source| Error::Io {
            path: self.path.clone(),
            source,
        })?;
        let mut zip = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| bad(e.to_string()))?;
        let mut entry = zip
            .by_name(&info.path)
            .map_err(|e| bad(format!("storage {}: {e}", info.path)))?;
        if (entry.size() as usize) < bytes {
            return Err(bad(format!(
                "storage {} holds {} bytes, the tensor needs {bytes}",
                info.path,
                entry.size()
            )));
        }
        let skip = (info.layout.start_offset() * info.dtype.size_in_bytes()) as u64;
        std::io::copy(&mut entry.by_ref().take(skip), &mut std::io::sink())
            .map_err(|e| bad(e.to_string()))?;
        let mut raw = vec![0u8; elems * info.dtype.size_in_bytes()];
        entry.read_exact(&mut raw).map_err(|e| bad(e.to_string()))?;
        Tensor::from_raw_buffer(&raw, info.dtype, info.layout.dims(), &Device::Cpu)
            .map_err(|e| bad(e.to_string()))
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl WeightSource for PthFile {
    fn contains(&self, key: &str) -> bool {
        self.infos.contains_key(key)
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
}
