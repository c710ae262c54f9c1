//! diffusers / transformers component folders.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Errors of the loader.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or folder could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// What was read.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An index file is not valid.
    #[error("invalid index file {path}: {reason}")]
    Index {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The folder holds no weights.
    #[error("no .safetensors file in {0}")]
    NoWeights(PathBuf),
    /// A `.pth` archive could not be read.
    #[error("invalid PyTorch checkpoint {path}: {reason}")]
    Pth {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A `.pth` pickle names a global outside the allow-list; nothing was executed.
    #[error("refusing {path}: {reason}")]
    UnsafePickle {
        /// The file.
        path: PathBuf,
        /// Which global or opcode.
        reason: String,
    },
    /// The checkpoint's keys do not match the model the config describes.
    #[error(
        "{path} does not match the model config: {}",
        key_lists(missing, unexpected)
    )]
    KeyMismatch {
        /// The file.
        path: PathBuf,
        /// Keys the model needs that the file lacks (diffusers names).
        missing: Vec<String>,
        /// Keys the file has that the model does not use (the file's names).
        unexpected: Vec<String>,
    },
    /// A tensor has the wrong shape for the config.
    #[error("{path}: tensor `{key}` has shape {found:?}, expected {expected:?}")]
    Shape {
        /// The file.
        path: PathBuf,
        /// The key, as in the file.
        key: String,
        /// Expected shape.
        expected: Vec<usize>,
        /// Found shape.
        found: Vec<usize>,
    },
    /// The file's format is not one this loader knows.
    #[error("{path}: {reason}")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is not supported.
        reason: String,
    },
    /// An index names a shard that is not there.
    #[error("{index} lists shard {shard}, which does not exist")]
    MissingShard {
        /// The index file.
        index: PathBuf,
        /// The missing shard.
        shard: PathBuf,
    },
}

fn key_lists(missing: &[String], unexpected: &[String]) -> String {
    let show = |v: &[String]| {
        let mut s = v.iter().take(20).cloned().collect::<Vec<_>>().join(", ");
        if v.len() > 20 {
            s.push_str(&format!(", ... ({} in all)", v.len()));
        }
        s
    };
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("missing keys: {}", show(missing)));
    }
    if !unexpected.is_empty() {
        parts.push(format!("unexpected keys: {}", show(unexpected)));
    }
    parts.join("; ")
}

/// A component folder: `config.json` and its safetensors weights.
#[derive(Debug, Clone)]
pub struct ComponentFolder {
    dir: PathBuf,
    files: Vec<PathBuf>,
}

impl ComponentFolder {
    /// Resolves the weights of `dir`. With an `*.safetensors.index.json` the
    /// shards it lists (every one must exist); otherwise the folder's
    /// `.safetensors` files, sorted by name.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, Error> {
        let dir = dir.as_ref().to_path_buf();
        let io = |source| Error::Io {
            path: dir.clone(),
            source,
        };
        let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        names.sort();
        let index = names.iter().find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(".safetensors.index.json"))
        });
        let files = match index {
            Some(index) => Self::shards(&dir, index)?,
            None => names
                .into_iter()
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect(),
        };
        if files.is_empty() {
            return Err(Error::NoWeights(dir));
        }
        Ok(Self { dir, files })
    }

    fn shards(dir: &Path, index: &Path) -> Result<Vec<PathBuf>, Error> {
        let text = std::fs::read_to_string(index).map_err(|source| Error::Io {
            path: index.to_path_buf(),
            source,
        })?;
        let bad = |reason: String| Error::Index {
            path: index.to_path_buf(),
            reason,
        };
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("no `weight_map` object".into()))?;
        let mut shards = BTreeSet::new();
        for (key, v) in map {
            let name = v
                .as_str()
                .ok_or_else(|| bad(format!("`{key}` maps to a non-string")))?;
            let p = Path::new(name);
            // Shards live next to the index: no absolute paths, no `..`.
            if p.components().count() != 1 {
                return Err(bad(format!("shard name `{name}` is not a plain file name")));
            }
            shards.insert(dir.join(p));
        }
        for shard in &shards {
            if !shard.is_file() {
                return Err(Error::MissingShard {
                    index: index.to_path_buf(),
                    shard: shard.clone(),
                });
            }
        }
        Ok(shards.into_iter().collect())
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `config.json` of the folder.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    /// The weight files.
    pub fn safetensors_files(&self) -> &[PathBuf] {
        &self.files
    }
}
