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
pub fn safetensors_files(path: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
    let path = path.as_ref();
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if !path.is_dir() {
        return Err(Error::NoWeights {
            path: path.to_path_buf(),
            reason: "no such file or folder".into(),
        });
    }
    let index = path.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|source| Error::Io {
            path: index.clone(),
            source,
        })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| Error::Json {
                origin: index.display().to_string(),
                source,
            })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::NoWeights {
                path: index.clone(),
                reason: "the index has no `weight_map` object".into(),
            })?;
        let mut names = Vec::new();
        for (key, v) in map {
            let name = v.as_str().ok_or_else(|| Error::NoWeights {
                path: index.clone(),
                reason: format!("weight_map entry `{key}` is not a file name"),
            })?;
            if !names.iter().any(|n| n == name) {
                names.push(name.to_string());
            }
        }
        names.sort();
        let mut files = Vec::with_capacity(names.len());
        for name in names {
            let f = path.join(&name);
            if !f.is_file() {
                return Err(Error::NoWeights {
                    path: path.to_path_buf(),
                    reason: format!("shard `{name}` named by {} is missing", index.display()),
                });
            }
            files.push(f);
        }
        if files.is_empty() {
            return Err(Error::NoWeights {
                path: index,
                reason: "the index names no shard".into(),
            });
        }
        return Ok(files);
    }
    let single = path.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let entries = std::fs::read_dir(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let p = entry.path();
        if p.is_file() && p.extension().is_some_and(|e| e == "safetensors") {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(Error::NoWeights {
            path: path.to_path_buf(),
            reason: "no model.safetensors.index.json, model.safetensors or *.safetensors file"
                .into(),
        });
    }
    Ok(files)
}
