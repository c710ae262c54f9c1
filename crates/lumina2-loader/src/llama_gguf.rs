//! What the GGUF text-encoder readers ([`crate::gemma_gguf`],
//! [`crate::qwen3_gguf`]) share: llama.cpp's tensor names mapped to and from
//! transformers' keys through a table per architecture, the check of
//! `general.architecture`, the file as a [`WeightSource`] in transformers'
//! key names, and the reading of the `ARCH.*` metadata that a config needs.
//! Each reader states only what differs: its [`Arch`] (name, tables, norm
//! storage), its error type and the config it builds.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use lumina2_weights::{LinearWeight, WeightSource};

use crate::gguf::{GgufError, GgufFile, MetadataValue};

/// A model's table of names: (transformers, llama.cpp) outside the layers,
/// and inside layer N after `layers.N.` / `blk.N.`.
#[derive(Debug)]
pub(crate) struct NameTables {
    pub global: &'static [(&'static str, &'static str)],
    pub layer: &'static [(&'static str, &'static str)],
}

impl NameTables {
    /// The llama.cpp name of a transformers key (without `model.`).
    pub(crate) fn llama_cpp_name(&self, key: &str) -> Option<String> {
        rename(self, key, "layers.", "blk.", 0)
    }

    /// The transformers key of a llama.cpp name.
    pub(crate) fn transformers_name(&self, name: &str) -> Option<String> {
        rename(self, name, "blk.", "layers.", 1)
    }
}

/// Maps `name` from one naming to the other: `from_prefix`/`to_prefix` are the
/// layer prefixes (`layers.`, `blk.`), `side` picks the column of the tables
/// that `name` is in (0: transformers, 1: llama.cpp).
fn rename(
    tables: &NameTables,
    name: &str,
    from_prefix: &str,
    to_prefix: &str,
    side: usize,
) -> Option<String> {
    let pick = |pair: &(&'static str, &'static str)| if side == 0 { pair.0 } else { pair.1 };
    let other = |pair: &(&'static str, &'static str)| if side == 0 { pair.1 } else { pair.0 };
    if let Some(pair) = tables.global.iter().find(|p| pick(p) == name) {
        return Some(other(pair).to_string());
    }
    let (layer, tail) = name.strip_prefix(from_prefix)?.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let pair = tables.layer.iter().find(|p| pick(p) == tail)?;
    Some(format!("{to_prefix}{layer}.{}", other(pair)))
}

/// What differs between the architectures that [`EncoderGguf`] reads.
#[derive(Debug)]
pub(crate) struct Arch {
    /// `general.architecture` (`gemma2`), also the prefix of the metadata
    /// keys of the config (`gemma2.embedding_length`).
    pub name: &'static str,
    /// The model in errors: "not a {label} weight".
    pub label: &'static str,
    /// The tensor names.
    pub names: NameTables,
    /// Whether llama.cpp's converter stored every `*norm.weight` as
    /// `weight + 1` (Gemma), so that it is read back minus one (in f32) from
    /// files in llama.cpp's names.
    pub norms_plus_one: bool,
}

/// `general.architecture` names another model than the reader's.
pub(crate) struct ArchMismatch {
    /// The file.
    pub path: PathBuf,
    /// The architecture found.
    pub found: String,
}

/// A GGUF file of a text encoder as a [`WeightSource`] in transformers' key
/// names (with or without `model.`): linear weights stay quantised where
/// candle has the block type.
#[derive(Debug)]
pub(crate) struct EncoderGguf {
    file: GgufFile,
    arch: &'static Arch,
    /// Whether the tensors carry llama.cpp's names (else transformers').
    llama_cpp_names: bool,
}

impl EncoderGguf {
    /// Wraps an open GGUF file, checking `general.architecture` when present.
    pub(crate) fn new(file: GgufFile, arch: &'static Arch) -> Result<Self, ArchMismatch> {
        if let Some(found) = file.metadata().get("general.architecture") {
            let found = found.as_str().unwrap_or("<not a string>");
            if found != arch.name {
                return Err(ArchMismatch {
                    path: file.path().to_path_buf(),
                    found: found.to_string(),
                });
            }
        }
        let llama_cpp_names = file.tensor_info("token_embd.weight").is_ok();
        Ok(Self {
            file,
            arch,
            llama_cpp_names,
        })
    }

    /// The underlying GGUF file.
    pub(crate) fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The name of `key` (a transformers key) in the file, and whether it is
    /// a norm weight stored as `weight + 1`.
    fn resolve(&self, key: &str) -> Option<(String, bool)> {
        let key = key.strip_prefix("model.").unwrap_or(key);
        if !self.llama_cpp_names {
            let name = if self.file.tensor_info(key).is_ok() {
                key.to_string()
            } else {
                format!("model.{key}")
            };
            return Some((name, false));
        }
        let name = self.arch.names.llama_cpp_name(key)?;
        let shifted = self.arch.norms_plus_one && key.ends_with("norm.weight");
        Some((name, shifted))
    }

    fn err(&self, key: &str, e: impl std::fmt::Display) -> lumina2_weights::Error {
        lumina2_weights::Error::WeightLoad {
            key: key.to_string(),
            source_name: self.file.path().display().to_string(),
            reason: e.to_string(),
        }
    }

    fn resolve_or_err(&self, key: &str) -> lumina2_weights::Result<(String, bool)> {
        self.resolve(key)
            .ok_or_else(|| self.err(key, format!("not a {} weight", self.arch.label)))
    }

    /// The `ARCH.*` metadata of the file, read for a config; `bad(key,
    /// reason)` makes the reader's error for a missing or wrong value.
    pub(crate) fn metadata<'a, E>(
        &'a self,
        bad: &'a dyn Fn(String, String) -> E,
    ) -> ConfigMetadata<'a, E> {
        ConfigMetadata { gguf: self, bad }
    }
}

impl WeightSource for EncoderGguf {
    fn contains(&self, key: &str) -> bool {
        self.resolve(key)
            .is_some_and(|(name, _)| self.file.tensor_info(&name).is_ok())
    }

    fn tensor(&self, key: &str) -> lumina2_weights::Result<Tensor> {
        let (name, shifted) = self.resolve_or_err(key)?;
        let t = self
            .file
            .tensor(&name, DType::F32, &Device::Cpu)
            .map_err(|e| self.err(key, e))?;
        if shifted {
            // llama.cpp's converter stored `weight + 1` (see `Arch::norms_plus_one`).
            return (t - 1.0).map_err(|e| self.err(key, e));
        }
        Ok(t)
    }

    fn linear(&self, key: &str) -> lumina2_weights::Result<LinearWeight> {
        let (name, shifted) = self.resolve_or_err(key)?;
        if shifted {
            return Ok(LinearWeight::Dense(WeightSource::tensor(self, key)?));
        }
        WeightSource::linear(&self.file, &name)
    }

    fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .file
            .tensor_infos()
            .iter()
            .map(|t| {
                if self.llama_cpp_names {
                    self.arch
                        .names
                        .transformers_name(&t.name)
                        .unwrap_or_else(|| t.name.clone())
                } else {
                    t.name.clone()
                }
            })
            .collect();
        keys.sort();
        keys
    }

    fn name(&self) -> String {
        self.file.path().display().to_string()
    }
}

/// A config field that the file may give: its `config.json` name and its
/// metadata key (without the architecture's prefix). Absent from the file,
/// the config's default stays.
pub(crate) enum Optional {
    /// An integer ([`ConfigMetadata::opt_int`]).
    Int(&'static str, &'static str),
    /// A number ([`ConfigMetadata::float`]).
    Float(&'static str, &'static str),
}

/// The `ARCH.*` metadata of an [`EncoderGguf`], read for a config: every
/// `name` is a key without the architecture's prefix (`embedding_length`
/// reads `gemma2.embedding_length`), and errors name the whole key.
pub(crate) struct ConfigMetadata<'a, E> {
    gguf: &'a EncoderGguf,
    bad: &'a dyn Fn(String, String) -> E,
}

impl<E: From<GgufError>> ConfigMetadata<'_, E> {
    fn key(&self, name: &str) -> String {
        format!("{}.{name}", self.gguf.arch.name)
    }

    /// The error for metadata `name`.
    pub(crate) fn bad(&self, name: &str, reason: &str) -> E {
        (self.bad)(self.key(name), reason.to_string())
    }

    /// A non-negative integer that fits `usize`, if present.
    pub(crate) fn opt_int(&self, name: &str) -> Result<Option<usize>, E> {
        let Some(v) = self.gguf.file.metadata().get(&self.key(name)) else {
            return Ok(None);
        };
        let n = v
            .as_u64()
            .ok_or_else(|| self.bad(name, "not a non-negative integer"))?;
        usize::try_from(n)
            .map(Some)
            .map_err(|_| self.bad(name, "too large"))
    }

    /// A non-negative integer that fits `usize`, required.
    pub(crate) fn int(&self, name: &str) -> Result<usize, E> {
        self.opt_int(name)?.ok_or_else(|| self.bad(name, "missing"))
    }

    /// A number (float or integer), if present.
    pub(crate) fn float(&self, name: &str) -> Result<Option<f64>, E> {
        match self.gguf.file.metadata().get(&self.key(name)) {
            None => Ok(None),
            Some(MetadataValue::F32(v)) => Ok(Some(f64::from(*v))),
            Some(MetadataValue::F64(v)) => Ok(Some(*v)),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as f64))
                .ok_or_else(|| self.bad(name, "not a number")),
        }
    }

    /// The head width: `attention.key_length` when present, else
    /// `hidden / heads` (llama.cpp's own default); `attention.value_length`,
    /// when present, must equal it.
    pub(crate) fn head_dim(&self, hidden: usize, heads: usize) -> Result<usize, E> {
        let head_dim = self
            .opt_int("attention.key_length")?
            .unwrap_or(hidden / heads.max(1));
        if let Some(v) = self.opt_int("attention.value_length")? {
            if v != head_dim {
                return Err(self.bad(
                    "attention.value_length",
                    &format!("{v} differs from the key length {head_dim}"),
                ));
            }
        }
        Ok(head_dim)
    }

    /// The vocabulary size: the rows of the token embedding, whose width must
    /// be `hidden` (`embedding_length`).
    pub(crate) fn vocab(&self, hidden: usize) -> Result<usize, E> {
        let embd_name = self
            .gguf
            .resolve("embed_tokens.weight")
            .map_or_else(|| "token_embd.weight".to_string(), |(n, _)| n);
        let embd = self.gguf.file.tensor_info(&embd_name)?.shape();
        match embd.as_slice() {
            [v, h] if *h == hidden => Ok(*v),
            _ => Err(self.bad(
                "embedding_length",
                &format!("{hidden} does not match the token embedding's shape {embd:?}"),
            )),
        }
    }

    /// Sets each of `fields` in `cfg` that the file gives, read in order.
    pub(crate) fn set_optional(
        &self,
        cfg: &mut serde_json::Value,
        fields: &[Optional],
    ) -> Result<(), E> {
        for field in fields {
            let (name, v): (_, Option<serde_json::Value>) = match *field {
                Optional::Int(name, key) => (name, self.opt_int(key)?.map(Into::into)),
                Optional::Float(name, key) => (name, self.float(key)?.map(Into::into)),
            };
            if let (Some(o), Some(v)) = (cfg.as_object_mut(), v) {
                o.insert(name.to_string(), v);
            }
        }
        Ok(())
    }
}

/// `impl WeightSource` for a public reader that wraps an [`EncoderGguf`] in
/// its `inner` field: the five methods that [`EncoderGguf`] implements are
/// passed on, the others keep the trait's defaults.
macro_rules! delegate_weight_source {
    ($reader:ty) => {
        impl lumina2_weights::WeightSource for $reader {
            fn contains(&self, key: &str) -> bool {
                lumina2_weights::WeightSource::contains(&self.inner, key)
            }

            fn tensor(&self, key: &str) -> lumina2_weights::Result<candle_core::Tensor> {
                lumina2_weights::WeightSource::tensor(&self.inner, key)
            }

            fn linear(&self, key: &str) -> lumina2_weights::Result<lumina2_weights::LinearWeight> {
                lumina2_weights::WeightSource::linear(&self.inner, key)
            }

            fn keys(&self) -> Vec<String> {
                lumina2_weights::WeightSource::keys(&self.inner)
            }

            fn name(&self) -> String {
                lumina2_weights::WeightSource::name(&self.inner)
            }
        }
    };
}
pub(crate) use delegate_weight_source;
