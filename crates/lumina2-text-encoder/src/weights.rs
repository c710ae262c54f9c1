//! How the encoder receives its weights: the interface of the `lumina2-weights`
//! crate, shared with the transformer and implemented by the loader.
//!
//! The encoder asks a [`WeightSource`] for tensors by their transformers key
//! (`layers.0.self_attn.q_proj.weight`, with or without the `model.` prefix);
//! [`safetensors_files`] resolves a transformers folder, sharded or not.

use std::path::{Path, PathBuf};

pub use lumina2_weights::{
    Linear, LinearWeight, SafetensorsSource, VarBuilderSource, WeightSource, Weights,
};

use crate::error::{Error, Result};

/// The safetensors files of a transformers model folder: the shards named by
/// `model.safetensors.index.json` when it exists, else `model.safetensors`,
/// else every `*.safetensors` file of the folder (sorted). A path to a single
/// `.safetensors` file is returned as is.
///
/// The resolution (and the validation of the index: shards inside the folder,
/// present, no key listed twice) is `lumina2_weights::folder`'s, shared with
/// the loader; its errors come back as [`Error::NoWeights`] naming the path
/// asked for, the reason naming the file at fault.
pub fn safetensors_files(path: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
    use lumina2_weights::FolderError;
    let path = path.as_ref();
    lumina2_weights::folder::safetensors_files(path).map_err(|e| {
        let reason = match &e {
            FolderError::NotFound(_) => "no such file or folder".to_string(),
            FolderError::NoWeights(_) => {
                "no *.safetensors file or *.safetensors.index.json".to_string()
            }
            _ => e.to_string(),
        };
        Error::NoWeights {
            path: path.to_path_buf(),
            reason,
        }
    })
}
