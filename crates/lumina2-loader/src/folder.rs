//! The loader's error type, and component folders.
//!
//! The resolution of a component folder into its safetensors files lives in
//! `lumina2_weights::folder`, shared with the text encoder (which cannot depend
//! on this crate); [`ComponentFolder`] wraps it so that its errors are this
//! crate's [`Error`].

use std::path::{Path, PathBuf};

pub use lumina2_weights::folder::{FolderError, ShardIndex};

/// A component folder (`config.json` and its safetensors weights), resolved
/// by `lumina2_weights::folder::ComponentFolder::open`: the standard shard
/// index, else the standard single file, else the one index of another name,
/// else every `*.safetensors`; an index is validated (shards inside the
/// folder, present, no key twice).
#[derive(Debug, Clone)]
pub struct ComponentFolder(lumina2_weights::folder::ComponentFolder);

impl ComponentFolder {
    /// Resolves the weights of `path`, a folder or a single `.safetensors` file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        Ok(Self(lumina2_weights::folder::ComponentFolder::open(path)?))
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        self.0.dir()
    }

    /// `config.json` of the folder.
    pub fn config_path(&self) -> PathBuf {
        self.0.config_path()
    }

    /// The index file the shards came from, if any.
    pub fn index_file(&self) -> Option<&Path> {
        self.0.index_file()
    }

    /// The weight files: the shards in name order, or the single file.
    pub fn safetensors_files(&self) -> &[PathBuf] {
        self.0.safetensors_files()
    }
}

impl From<lumina2_weights::folder::ComponentFolder> for ComponentFolder {
    fn from(f: lumina2_weights::folder::ComponentFolder) -> Self {
        Self(f)
    }
}

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
    /// A component folder's weights could not be resolved (no weights, a bad
    /// or incomplete shard index).
    #[error(transparent)]
    Folder(#[from] FolderError),
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
    /// The model could not be built from a file's weights.
    #[error("{path}: {source}")]
    Model {
        /// The checkpoint.
        path: PathBuf,
        /// The model's error (boxed: it is large and rare).
        #[source]
        source: Box<lumina2_transformer::Error>,
    },
    /// The file's format is not one this loader knows.
    #[error("{path}: {reason}")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is not supported.
        reason: String,
    },
    /// `model_index.json` is missing, unreadable, or not a diffusers pipeline index.
    #[error("invalid pipeline index {path}: {reason}")]
    ModelIndex {
        /// The `model_index.json` file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The pipeline's `_class_name` is not a Lumina2 pipeline.
    #[error("{path}: pipeline class `{found}` is not a Lumina2 pipeline (expected {})", .expected.join(" or "))]
    PipelineClass {
        /// The `model_index.json` file.
        path: PathBuf,
        /// The class found.
        found: String,
        /// The classes accepted.
        expected: Vec<String>,
    },
    /// A component Lumina2 needs is absent from `model_index.json`, or null there.
    #[error("{path}: component `{component}` is {}", if *.null { "null" } else { "missing" })]
    MissingComponent {
        /// The `model_index.json` file.
        path: PathBuf,
        /// The component (`transformer`, `vae`, ...).
        component: String,
        /// Whether it is listed as null rather than absent.
        null: bool,
    },
    /// `model_index.json` lists a component Lumina2 does not use.
    #[error(
        "{path}: unexpected component `{component}` ({library}.{class}) for a Lumina2 pipeline"
    )]
    UnexpectedComponent {
        /// The `model_index.json` file.
        path: PathBuf,
        /// The component.
        component: String,
        /// Its library.
        library: String,
        /// Its class.
        class: String,
    },
    /// A component has a library or class this project cannot load.
    #[error("{path}: component `{component}` is {found}, expected {}", .expected.join(" or "))]
    ComponentClass {
        /// The `model_index.json` file.
        path: PathBuf,
        /// The component.
        component: String,
        /// `library.Class` found.
        found: String,
        /// The `library.Class` names accepted.
        expected: Vec<String>,
    },
    /// A file or folder a component needs is not in the pipeline folder.
    #[error("component `{component}`: {path} does not exist")]
    ComponentFile {
        /// The component.
        component: String,
        /// The missing file or folder.
        path: PathBuf,
    },
    /// A repo id, revision or file name cannot be used with the Hub.
    #[error("invalid Hub {what} `{value}`: {reason}")]
    InvalidHubName {
        /// `repo id`, `revision` or `file name`.
        what: &'static str,
        /// The value given.
        value: String,
        /// Why it is refused.
        reason: String,
    },
    /// The revision is not in the local Hub cache and the Hub may not be asked.
    #[error(
        "revision `{revision}` of {repo} is not in the Hugging Face cache \
         (looked for {searched}) and offline mode forbids asking the Hub"
    )]
    RevisionNotCached {
        /// The repo id.
        repo: String,
        /// The revision.
        revision: String,
        /// The ref file or snapshot folder looked for.
        searched: PathBuf,
    },
    /// A file is not in the local Hub cache and the Hub may not be asked.
    #[error(
        "`{file}` of {repo} at revision `{revision}` is not in the Hugging Face cache \
         (looked for {searched}) and offline mode forbids downloading it"
    )]
    NotCached {
        /// The repo id.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The file, relative to the repo.
        file: String,
        /// The snapshot path looked for.
        searched: PathBuf,
    },
    /// A download from the Hub failed.
    #[error("cannot download `{file}` of {repo} at revision `{revision}`: {source}")]
    Download {
        /// The repo id.
        repo: String,
        /// The revision.
        revision: String,
        /// The file, relative to the repo.
        file: String,
        /// The error of the Hub client.
        source: Box<dyn std::error::Error + Send + Sync>,
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
