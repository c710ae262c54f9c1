//! Qwen3 text encoders (Z-Image's Qwen3-4B) from one safetensors file:
//! ComfyUI's `text_encoders/qwen_3_4b.safetensors` (transformers' keys
//! under `model.`: `model.embed_tokens.weight`, `model.layers.N...`), a
//! transformers `Qwen3Model` file (no prefix), or the text encoder of a
//! checkpoint that holds it under a longer prefix
//! (`text_encoders.qwen3_4b.transformer.model.`).
//!
//! The names under the prefix are transformers' own, so the file is read
//! through a [`Prefixed`] view; the encoder itself accepts keys with and
//! without `model.`.

use std::path::Path;
use std::sync::Arc;

use lumina2_weights::{SafetensorsSource, WeightSource};

use crate::folder::Error;
use crate::prefixed::Prefixed;

/// The key that locates the encoder in the file, its prefix being
/// everything before it.
const EMBEDDING: &str = "embed_tokens.weight";

/// Opens a single safetensors file holding a Qwen3 text encoder, seen with
/// transformers' `Qwen3Model` keys (`embed_tokens.weight`, `layers.N...`,
/// `norm.weight`) whatever prefix the file puts before them. A file with no
/// `embed_tokens.weight`, or with several (two models), is
/// [`Error::Unsupported`].
pub fn open_qwen3_file(path: &Path) -> Result<Arc<dyn WeightSource>, Error> {
    let unsupported = |reason: String| Error::Unsupported {
        path: path.to_path_buf(),
        reason,
    };
    let st: Arc<dyn WeightSource> =
        Arc::new(SafetensorsSource::open(&[path]).map_err(|e| unsupported(e.to_string()))?);
    let keys = st.keys();
    let mut prefixes: Vec<&str> = keys
        .iter()
        .filter_map(|k| k.strip_suffix(EMBEDDING))
        .filter(|p| p.is_empty() || p.ends_with('.'))
        .map(|p| p.strip_suffix("model.").unwrap_or(p))
        .collect();
    prefixes.sort_unstable();
    prefixes.dedup();
    match prefixes[..] {
        [""] => Ok(st),
        [prefix] => Ok(Arc::new(Prefixed::new(st.clone(), prefix.to_string()))),
        [] => Err(unsupported(format!(
            "not a Qwen3 text encoder (no `{EMBEDDING}` key, bare or under a prefix such as `model.`)"
        ))),
        _ => Err(unsupported(format!(
            "holds several text encoders (`{EMBEDDING}` under {prefixes:?})"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn write(path: &Path, keys: &[&str]) {
        let t = Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let map: std::collections::HashMap<String, Tensor> =
            keys.iter().map(|k| (k.to_string(), t.clone())).collect();
        candle_core::safetensors::save(&map, path).unwrap();
    }

    #[test]
    fn the_prefix_before_the_embedding_is_taken_off() {
        let dir = std::env::temp_dir().join(format!("qwen3-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, prefix) in [
            ("bare", ""),
            ("comfy", "model."),
            ("ckpt", "text_encoders.qwen3_4b.transformer.model."),
        ] {
            let path = dir.join(format!("{name}.safetensors"));
            let keys = [
                format!("{prefix}embed_tokens.weight"),
                format!("{prefix}layers.0.input_layernorm.weight"),
                format!("{prefix}norm.weight"),
            ];
            write(&path, &keys.iter().map(String::as_str).collect::<Vec<_>>());
            let s = open_qwen3_file(&path).unwrap();
            // `model.` is left to the encoder, which takes keys with or without it.
            let mut got = s.keys();
            got.sort();
            let m = if prefix.is_empty() { "" } else { "model." };
            assert_eq!(
                got,
                vec![
                    format!("{m}embed_tokens.weight"),
                    format!("{m}layers.0.input_layernorm.weight"),
                    format!("{m}norm.weight"),
                ],
                "{name}"
            );
        }
        let path = dir.join("none.safetensors");
        write(&path, &["x.weight"]);
        let e = open_qwen3_file(&path).err().unwrap().to_string();
        assert!(e.contains("not a Qwen3 text encoder"), "{e}");
        let path = dir.join("two.safetensors");
        write(&path, &["a.embed_tokens.weight", "b.embed_tokens.weight"]);
        let e = open_qwen3_file(&path).err().unwrap().to_string();
        assert!(e.contains("several"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
