//! The safetensors files of a diffusers or transformers component folder.
//!
//! One resolution for every model crate and the loader: a folder holds either
//! one weight file or shards listed by an `*.safetensors.index.json`. The
//! index is validated before anything is opened: every shard is a relative
//! path inside the folder, exists, and no tensor key is listed twice.
//!
//! The order follows diffusers and transformers: the index of the standard
//! name (`model.safetensors.index.json`, `diffusion_pytorch_model.safetensors.index.json`),
//! then the standard single file (`model.safetensors`,
//! `diffusion_pytorch_model.safetensors`), then the only index of another name,
//! then every `*.safetensors` file of the folder, sorted by name.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};

/// Index file names diffusers and transformers write, preferred in this order.
const STANDARD_INDEXES: [&str; 2] = [
    "model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors.index.json",
];
/// Single weight file names diffusers and transformers write, preferred in this order.
const STANDARD_FILES: [&str; 2] = ["model.safetensors", "diffusion_pytorch_model.safetensors"];
const INDEX_SUFFIX: &str = ".safetensors.index.json";

/// Why a folder's weights could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum FolderError {
    /// The path is neither a file nor a folder.
    #[error("{0}: no such file or folder")]
    NotFound(PathBuf),
    /// A file or folder could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// What was read.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The folder holds no weights.
    #[error("no .safetensors file or *.safetensors.index.json in {0}")]
    NoWeights(PathBuf),
    /// The folder holds several indexes of non-standard names.
    #[error("{dir} holds several shard indexes ({}); keep one", list(.indexes))]
    AmbiguousIndex {
        /// The folder.
        dir: PathBuf,
        /// The index files found.
        indexes: Vec<PathBuf>,
    },
    /// An index file is not valid JSON.
    #[error("invalid JSON in index file {index}: {source}")]
    IndexJson {
        /// The index file.
        index: PathBuf,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// An index file is JSON but not a shard index.
    #[error("invalid index file {index}: {reason}")]
    IndexFormat {
        /// The index file.
        index: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An index names a shard outside its folder (absolute, or through `..`).
    #[error("{index} maps `{key}` to `{shard}`, which is not a path inside {}", parent(.index))]
    ShardOutsideFolder {
        /// The index file.
        index: PathBuf,
        /// The tensor key.
        key: String,
        /// The shard name as written in the index.
        shard: String,
    },
    /// An index names a shard that is not there.
    #[error("{index} lists shard {shard}, which does not exist")]
    MissingShard {
        /// The index file.
        index: PathBuf,
        /// The missing shard.
        shard: PathBuf,
    },
    /// An index lists the same tensor key twice.
    #[error("{index} lists tensor `{key}` twice (in `{first}` and in `{second}`)")]
    DuplicateKey {
        /// The index file.
        index: PathBuf,
        /// The tensor key.
        key: String,
        /// The shard of the first entry.
        first: String,
        /// The shard of the second entry.
        second: String,
    },
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn parent(p: &Path) -> String {
    p.parent().unwrap_or(Path::new(".")).display().to_string()
}

impl FolderError {
    /// The file or folder the error is about.
    pub fn path(&self) -> &Path {
        match self {
            Self::NotFound(p) | Self::NoWeights(p) => p,
            Self::Io { path, .. } => path,
            Self::AmbiguousIndex { dir, .. } => dir,
            Self::IndexJson { index, .. }
            | Self::IndexFormat { index, .. }
            | Self::ShardOutsideFolder { index, .. }
            | Self::MissingShard { index, .. }
            | Self::DuplicateKey { index, .. } => index,
        }
    }
}

/// A parsed and validated `*.safetensors.index.json`.
///
/// Validation needs no other file: every shard name is a relative path made of
/// plain components (it cannot leave the folder), ends in `.safetensors`, and
/// no key is listed twice. Whether the shards exist is checked by
/// [`ComponentFolder::open`], or by the caller (a downloader fetches the index
/// first, then the shards it names).
#[derive(Debug, Clone)]
pub struct ShardIndex {
    path: PathBuf,
    weight_map: BTreeMap<String, String>,
}

impl ShardIndex {
    /// Reads and validates an index file.
    pub fn read(path: impl AsRef<Path>) -> Result<Self, FolderError> {
        let path = path.as_ref();
        let text = crate::fs::read_bounded(path, crate::fs::MAX_INDEX_BYTES).map_err(|source| {
            FolderError::Io {
                path: path.to_path_buf(),
                source,
            }
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates the bytes of an index file; `path` names it in errors.
    pub fn parse(path: impl AsRef<Path>, bytes: &[u8]) -> Result<Self, FolderError> {
        let path = path.as_ref().to_path_buf();
        let raw: RawIndex =
            serde_json::from_slice(bytes).map_err(|source| FolderError::IndexJson {
                index: path.clone(),
                source,
            })?;
        let bad = |reason: &str| FolderError::IndexFormat {
            index: path.clone(),
            reason: reason.to_string(),
        };
        let entries = raw
            .weight_map
            .ok_or_else(|| bad("no `weight_map` object"))?
            .0;
        if entries.is_empty() {
            return Err(bad("`weight_map` is empty"));
        }
        let mut weight_map: BTreeMap<String, String> = BTreeMap::new();
        for (key, shard) in entries {
            let p = Path::new(&shard);
            let plain = p.components().all(|c| matches!(c, Component::Normal(_)));
            if shard.is_empty() || !plain {
                return Err(FolderError::ShardOutsideFolder {
                    index: path,
                    key,
                    shard,
                });
            }
            if !shard.ends_with(".safetensors") {
                return Err(bad(&format!(
                    "`{key}` maps to `{shard}`, which is not a .safetensors file"
                )));
            }
            if let Some(first) = weight_map.get(&key) {
                return Err(FolderError::DuplicateKey {
                    index: path,
                    first: first.clone(),
                    key,
                    second: shard,
                });
            }
            weight_map.insert(key, shard);
        }
        Ok(Self { path, weight_map })
    }

    /// The index file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor key -> shard name (relative to the index's folder).
    pub fn weight_map(&self) -> &BTreeMap<String, String> {
        &self.weight_map
    }

    /// The shard names, each once, sorted.
    pub fn shard_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.weight_map.values().map(String::as_str).collect();
        names.sort_unstable();
        names.dedup();
        names
    }
}

/// The JSON shape of an index; `weight_map` keeps every entry, duplicates
/// included (a `serde_json::Value` would silently keep only the last one).
#[derive(serde::Deserialize)]
struct RawIndex {
    weight_map: Option<Entries>,
}

struct Entries(Vec<(String, String)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object mapping tensor keys to shard file names")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Entries, A::Error> {
                let mut v = Vec::new();
                while let Some(entry) = m.next_entry::<String, String>()? {
                    v.push(entry);
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// A component folder (`config.json` and its safetensors weights), resolved.
#[derive(Debug, Clone)]
pub struct ComponentFolder {
    dir: PathBuf,
    index: Option<PathBuf>,
    files: Vec<PathBuf>,
}

impl ComponentFolder {
    /// Resolves the weights of `path`: a folder (see the [module docs](self)
    /// for the order), or a single `.safetensors` file, taken as is (its
    /// folder is then [`ComponentFolder::dir`]). With an index, every shard it
    /// lists must exist.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, FolderError> {
        let path = path.as_ref();
        if path.is_file() {
            let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            return Ok(Self {
                dir,
                index: None,
                files: vec![path.to_path_buf()],
            });
        }
        if !path.is_dir() {
            return Err(FolderError::NotFound(path.to_path_buf()));
        }
        let dir = path.to_path_buf();
        let io = |source| FolderError::Io {
            path: dir.clone(),
            source,
        };
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            // Snapshot folders of the Hub cache hold symlinks: `is_file` follows them.
            if entry.path().is_file() {
                if let Ok(name) = entry.file_name().into_string() {
                    names.push(name);
                }
            }
        }
        names.sort();
        let has = |n: &str| names.iter().any(|x| x == n);
        let index = match STANDARD_INDEXES.iter().find(|n| has(n)) {
            Some(n) => Some(dir.join(n)),
            None if STANDARD_FILES.iter().any(|n| has(n)) => None,
            None => {
                let others: Vec<PathBuf> = names
                    .iter()
                    .filter(|n| n.ends_with(INDEX_SUFFIX))
                    .map(|n| dir.join(n))
                    .collect();
                if others.len() > 1 {
                    return Err(FolderError::AmbiguousIndex {
                        dir,
                        indexes: others,
                    });
                }
                others.into_iter().next()
            }
        };
        let files = match &index {
            Some(index) => Self::shards(&dir, index)?,
            None => match STANDARD_FILES.iter().find(|n| has(n)) {
                Some(n) => vec![dir.join(n)],
                None => names
                    .iter()
                    .filter(|n| n.ends_with(".safetensors"))
                    .map(|n| dir.join(n))
                    .collect(),
            },
        };
        if files.is_empty() {
            return Err(FolderError::NoWeights(dir));
        }
        Ok(Self { dir, index, files })
    }

    fn shards(dir: &Path, index: &Path) -> Result<Vec<PathBuf>, FolderError> {
        let parsed = ShardIndex::read(index)?;
        let mut files = Vec::new();
        for name in parsed.shard_names() {
            let shard = dir.join(name);
            if !shard.is_file() {
                return Err(FolderError::MissingShard {
                    index: index.to_path_buf(),
                    shard,
                });
            }
            files.push(shard);
        }
        Ok(files)
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `config.json` of the folder.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    /// The index file the shards came from, if any.
    pub fn index_file(&self) -> Option<&Path> {
        self.index.as_deref()
    }

    /// The weight files: the shards in name order, or the single file.
    pub fn safetensors_files(&self) -> &[PathBuf] {
        &self.files
    }
}

/// The safetensors files of `path` (see [`ComponentFolder::open`]).
pub fn safetensors_files(path: impl AsRef<Path>) -> Result<Vec<PathBuf>, FolderError> {
    Ok(ComponentFolder::open(path)?.files)
}
