//! Single-file transformer checkpoints: the original Alpha-VLLM layout
//! (`consolidated.00-of-01.pth`, or the same keys in `.safetensors`), ComfyUI
//! files (keys under `model.diffusion_model.`), and diffusers-key files.
//!
//! The format is detected from the keys, as diffusers does; original keys are
//! mapped to diffusers' names as `convert_lumina2_to_diffusers` does, with two
//! differences: the fused `qkv` is split with sizes taken from the config
//! (diffusers hard-codes the 2B model's 2304/768/768), and any number of
//! context-refiner blocks is handled (diffusers lists blocks 0 and 1).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Tensor};
use lumina2_transformer::{weight_shapes, Config, WeightSource};

use crate::folder::Error;
use crate::gguf::GgufFile;
use crate::model_keys::{ModelKeys, COMFY_PREFIX};
use crate::pth::PthFile;

/// Key layout of a transformer checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransformerLayout {
    /// diffusers' `Lumina2Transformer2DModel` names.
    Diffusers,
    /// The original Alpha-VLLM names (`cap_embedder`, `layers.N.attention.qkv`, ...).
    Original,
    /// Original names under ComfyUI's `model.diffusion_model.` prefix.
    ComfyUi,
}

/// Detects the layout from the keys (diffusers' `CHECKPOINT_KEY_NAMES["lumina2"]` markers).
pub fn detect_layout<'a>(keys: impl IntoIterator<Item = &'a str>) -> Option<TransformerLayout> {
    let mut found = None;
    for k in keys {
        if k == "model.diffusion_model.cap_embedder.0.weight" {
            return Some(TransformerLayout::ComfyUi);
        }
        if k == "cap_embedder.0.weight" {
            found = Some(TransformerLayout::Original);
        } else if k == "time_caption_embed.caption_embedder.0.weight" && found.is_none() {
            found = Some(TransformerLayout::Diffusers);
        }
    }
    found
}

/// The diffusers name of an original key (ComfyUI prefix removed first).
/// `qkv` keys come back with `qkv` in them; [`OriginalTransformer`] splits them.
pub fn original_key_to_diffusers(key: &str) -> String {
    let mut k = key.strip_prefix(COMFY_PREFIX).unwrap_or(key).to_string();
    // The context refiner is not modulated: its norm1 is a plain RMS norm.
    if let Some(rest) = k.strip_prefix("context_refiner.") {
        if let Some((idx, tail)) = rest.split_once('.') {
            if let Some(t) = tail.strip_prefix("attention_norm1") {
                k = format!("context_refiner.{idx}.norm1{t}");
            } else if let Some(t) = tail.strip_prefix("attention_norm2") {
                k = format!("context_refiner.{idx}.norm2{t}");
            }
        }
    }
    const ORDERED: &[(&str, &str)] = &[
        ("final_layer.adaLN_modulation.1", "norm_out.linear_1"),
        ("final_layer.linear", "norm_out.linear_2"),
        ("attention_norm1", "norm1.norm"),
        ("attention_norm2", "norm2"),
        ("cap_embedder", "time_caption_embed.caption_embedder"),
        (
            "t_embedder.mlp.0",
            "time_caption_embed.timestep_embedder.linear_1",
        ),
        (
            "t_embedder.mlp.2",
            "time_caption_embed.timestep_embedder.linear_2",
        ),
        ("attention", "attn"),
        (".out.", ".to_out.0."),
        ("k_norm", "norm_k"),
        ("q_norm", "norm_q"),
        ("w1", "linear_1"),
        ("w2", "linear_2"),
        ("w3", "linear_3"),
        ("adaLN_modulation.1", "norm1.linear"),
    ];
    for (from, to) in ORDERED {
        k = k.replace(from, to);
    }
    k
}

/// Where a diffusers key comes from in the file: a key, and rows of it for the
/// parts of a fused `qkv`.
#[derive(Debug, Clone)]
struct Origin {
    key: String,
    rows: Option<(usize, usize)>,
}

/// An original-layout checkpoint seen through diffusers' key names.
pub struct OriginalTransformer {
    inner: Arc<dyn WeightSource>,
    /// Set when `inner` is a GGUF file: the parts of a fused `qkv` are then
    /// split while quantised.
    gguf: Option<Arc<GgufFile>>,
    map: HashMap<String, Origin>,
    name: String,
}

impl OriginalTransformer {
    /// Maps every key of `inner` (original or ComfyUI layout) to diffusers'
    /// names for `cfg`. Every missing and every unexpected key is reported at
    /// once; `norm_final.weight`, unused by the model, is dropped as diffusers does.
    pub fn new<M: ModelKeys + ?Sized>(
        inner: Arc<dyn WeightSource>,
        path: &Path,
        cfg: &M,
    ) -> Result<Self, Error> {
        let [q_rows, k_rows, v_rows] = cfg.qkv_rows();
        let mut map = HashMap::new();
        for key in inner.keys() {
            // The other models of ComfyUI's all-in-one checkpoint.
            if key.starts_with("text_encoders.") || key.starts_with("vae.") {
                continue;
            }
            if cfg.unused_original_key(&key) {
                continue;
            }
            let d = cfg.original_to_diffusers(&key);
            if d.contains("qkv") {
                let parts = [
                    ("to_q", 0, q_rows),
                    ("to_k", q_rows, k_rows),
                    ("to_v", q_rows + k_rows, v_rows),
                ];
                for (name, start, len) in parts {
                    map.insert(
                        d.replace("qkv", name),
                        Origin {
                            key: key.clone(),
                            rows: Some((start, len)),
                        },
                    );
                }
            } else {
                map.insert(d, Origin { key, rows: None });
            }
        }
        let this = Self {
            name: path.display().to_string(),
            inner,
            gguf: None,
            map,
        };
        check_keys(&this, path, cfg)?;
        Ok(this)
    }
}

/// Compares a source's keys with what the model needs for `cfg`.
pub fn check_keys<M: ModelKeys + ?Sized>(
    source: &dyn WeightSource,
    path: &Path,
    cfg: &M,
) -> Result<(), Error> {
    let needed: BTreeSet<String> = cfg.weight_shapes().into_iter().map(|(k, _)| k).collect();
    let have: BTreeSet<String> = source.keys().into_iter().collect();
    let missing: Vec<String> = needed.difference(&have).cloned().collect();
    let unexpected: Vec<String> = have.difference(&needed).cloned().collect();
    if missing.is_empty() && unexpected.is_empty() {
        Ok(())
    } else {
        Err(Error::KeyMismatch {
            path: path.to_path_buf(),
            missing,
            unexpected,
        })
    }
}

impl OriginalTransformer {
    /// The file's key of a diffusers key (for messages).
    pub(crate) fn file_key(&self, key: &str) -> String {
        self.map
            .get(key)
            .map_or_else(|| key.to_string(), |o| o.key.clone())
    }

    /// An original-layout GGUF file: linear weights, the `qkv` parts included, stay quantised.
    pub fn from_gguf<M: ModelKeys + ?Sized>(
        file: Arc<GgufFile>,
        path: &Path,
        cfg: &M,
    ) -> Result<Self, Error> {
        let mut this = Self::new(file.clone(), path, cfg)?;
        this.gguf = Some(file);
        Ok(this)
    }
}

impl WeightSource for OriginalTransformer {
    fn linear(&self, key: &str) -> lumina2_weights::Result<lumina2_transformer::LinearWeight> {
        let o = self
            .map
            .get(key)
            .ok_or_else(|| lumina2_weights::Error::MissingWeight {
                key: key.to_string(),
                source_name: self.name.clone(),
            })?;
        match (o.rows, &self.gguf) {
            (None, _) => self.inner.linear(&o.key),
            (Some((start, len)), Some(g)) => {
                match crate::gguf_source::quantized_rows(g, &o.key, start, len)? {
                    Some(q) => Ok(lumina2_transformer::LinearWeight::Quantized(Arc::new(q))),
                    None => Ok(lumina2_transformer::LinearWeight::Dense(self.tensor(key)?)),
                }
            }
            (Some(_), None) => Ok(lumina2_transformer::LinearWeight::Dense(self.tensor(key)?)),
        }
    }
    fn tensor_as(&self, key: &str, dtype: DType) -> lumina2_weights::Result<Tensor> {
        // A tensor stored whole (not a part of a fused `qkv`) is read as the
        // file's source reads it.
        match self.map.get(key) {
            Some(o) if o.rows.is_none() => self.inner.tensor_as(&o.key, dtype),
            _ => Ok(self.tensor(key)?.to_dtype(dtype)?),
        }
    }
    fn linear_as(
        &self,
        key: &str,
        dtype: DType,
    ) -> lumina2_weights::Result<lumina2_transformer::LinearWeight> {
        match self.map.get(key) {
            Some(o) if o.rows.is_none() => self.inner.linear_as(&o.key, dtype),
            _ => Ok(self.linear(key)?.dense_as(dtype)?),
        }
    }
    fn contains(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }
    fn tensor(&self, key: &str) -> lumina2_weights::Result<Tensor> {
        let o = self
            .map
            .get(key)
            .ok_or_else(|| lumina2_weights::Error::MissingWeight {
                key: key.to_string(),
                source_name: self.name.clone(),
            })?;
        let t = self.inner.tensor(&o.key)?;
        match o.rows {
            None => Ok(t),
            Some((start, len)) => {
                let rows = t.dims().first().copied().unwrap_or(0);
                if start + len > rows {
                    return Err(lumina2_weights::Error::WeightShape {
                        key: o.key.clone(),
                        source_name: self.name.clone(),
                        expected: vec![
                            rows.max(start + len),
                            t.dims().get(1).copied().unwrap_or(0),
                        ],
                        found: t.dims().to_vec(),
                    });
                }
                Ok(t.narrow(0, start, len)?)
            }
        }
    }
    fn name(&self) -> String {
        self.name.clone()
    }
    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        let o = self.map.get(key)?;
        let mut shape = self.inner.shape(&o.key)?;
        // A part of a fused `qkv`: its rows, when the whole holds them (else
        // the whole's shape, which the caller then refuses).
        if let (Some((start, len)), Some(rows)) = (o.rows, shape.first_mut()) {
            if start.checked_add(len).is_some_and(|end| end <= *rows) {
                *rows = len;
            }
        }
        Some(shape)
    }
    fn keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self.map.keys().cloned().collect();
        k.sort();
        k
    }
}

/// Opens a single-file transformer checkpoint (`.pth`/`.pt`, `.safetensors`) in
/// any of the layouts, as a source with diffusers' key names for `cfg`.
pub fn open_transformer_file(path: &Path, cfg: &Config) -> Result<Arc<dyn WeightSource>, Error> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let raw: Arc<dyn WeightSource> = match ext.as_str() {
        "gguf" => {
            let g = Arc::new(GgufFile::open(path).map_err(|e| Error::Unsupported {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?);
            let keys = WeightSource::keys(g.as_ref());
            return match lumina_layout(path, &keys)? {
                TransformerLayout::Diffusers => {
                    check_keys(g.as_ref(), path, cfg)?;
                    Ok(g)
                }
                _ => Ok(Arc::new(OriginalTransformer::from_gguf(g, path, cfg)?)),
            };
        }
        "pth" | "pt" | "bin" => Arc::new(PthFile::open(path)?),
        "safetensors" => Arc::new(
            lumina2_transformer::weights::SafetensorsSource::open(&[path]).map_err(|e| {
                Error::Unsupported {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                }
            })?,
        ),
        _ => {
            return Err(Error::Unsupported {
                path: PathBuf::from(path),
                reason: format!(
                    "unknown checkpoint extension `.{ext}` (expected .pth, .safetensors or .gguf)"
                ),
            })
        }
    };
    let keys = raw.keys();
    match lumina_layout(path, &keys)? {
        TransformerLayout::Diffusers => {
            check_keys(raw.as_ref(), path, cfg)?;
            Ok(raw)
        }
        _ => Ok(Arc::new(OriginalTransformer::new(raw, path, cfg)?)),
    }
}

/// The layout of a Lumina2 checkpoint's keys; a Z-Image transformer (whose
/// original keys look much like Lumina2's) is named as such.
fn lumina_layout(path: &Path, keys: &[String]) -> Result<TransformerLayout, Error> {
    if let Some(z) = crate::zimage_file::detect_zimage_layout(keys.iter().map(String::as_str)) {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            reason: format!(
                "a Z-Image transformer ({}), not a Lumina2 one: open it with `open_zimage_transformer_file`",
                z.describe()
            ),
        });
    }
    detect_layout(keys.iter().map(String::as_str)).ok_or_else(|| not_lumina(path))
}

/// The config of an original-layout (or ComfyUI) transformer file that
/// comes without one: diffusers' Lumina-Image 2.0 config, with the sizes the
/// tensors give (width from `x_embedder`, latent channels at the 2x2 patch,
/// caption width from `cap_embedder`, head width from `q_norm`, head counts
/// from the fused `qkv`, joint and refiner blocks counted). What shapes do
/// not fix (the RoPE split of the head, the feed-forward rounding) is the
/// real model's; a file that differs there fails the key and shape checks
/// and needs its `config.json`.
pub fn infer_config(source: Arc<dyn WeightSource>, path: &Path) -> Result<Config, Error> {
    let keys = source.keys();
    let prefix = if keys.iter().any(|k| k.starts_with(COMFY_PREFIX)) {
        COMFY_PREFIX
    } else {
        ""
    };
    let shape = |key: &str| -> Result<Vec<usize>, Error> {
        let full = format!("{prefix}{key}");
        source.shape(&full).ok_or_else(|| Error::KeyMismatch {
            path: path.to_path_buf(),
            missing: vec![full],
            unexpected: Vec::new(),
        })
    };
    let dim = |key: &str, i: usize| -> Result<usize, Error> {
        let s = shape(key)?;
        s.get(i).copied().ok_or_else(|| Error::Shape {
            path: path.to_path_buf(),
            key: format!("{prefix}{key}"),
            expected: vec![0; i + 1],
            found: s.clone(),
        })
    };
    let count = |stack: &str| -> usize {
        keys.iter()
            .filter_map(|k| {
                let rest = k.strip_prefix(prefix)?.strip_prefix(stack)?;
                rest.split_once('.')?.0.parse::<usize>().ok()
            })
            .collect::<BTreeSet<usize>>()
            .len()
    };
    let mut cfg = Config::default();
    let unsupported = |reason: String| Error::Unsupported {
        path: path.to_path_buf(),
        reason: format!("{reason}: give the transformer's config.json"),
    };
    cfg.hidden_size = dim("x_embedder.weight", 0)?;
    let patch_in = dim("x_embedder.weight", 1)?;
    let p2 = cfg.patch_size * cfg.patch_size;
    if !patch_in.is_multiple_of(p2) {
        return Err(unsupported(format!(
            "x_embedder takes {patch_in} values, not a whole number of {}x{} patches",
            cfg.patch_size, cfg.patch_size
        )));
    }
    cfg.in_channels = patch_in / p2;
    cfg.cap_feat_dim = dim("cap_embedder.0.weight", 0)?;
    let head_dim = dim("layers.0.attention.q_norm.weight", 0)?;
    let qkv = dim("layers.0.attention.qkv.weight", 0)?;
    if head_dim == 0
        || !cfg.hidden_size.is_multiple_of(head_dim)
        || qkv < cfg.hidden_size
        || !(qkv - cfg.hidden_size).is_multiple_of(2 * head_dim)
    {
        return Err(unsupported(format!(
            "head width {head_dim} does not divide the width {} and the fused qkv's {qkv} rows",
            cfg.hidden_size
        )));
    }
    cfg.num_attention_heads = cfg.hidden_size / head_dim;
    cfg.num_kv_heads = (qkv - cfg.hidden_size) / (2 * head_dim);
    if cfg.axes_dim_rope.iter().sum::<usize>() != head_dim {
        return Err(unsupported(format!(
            "head width {head_dim}, the real model's RoPE axes {:?} need {}",
            cfg.axes_dim_rope,
            cfg.axes_dim_rope.iter().sum::<usize>()
        )));
    }
    cfg.num_layers = count("layers.");
    cfg.num_refiner_layers = count("noise_refiner.");
    cfg.validate().map_err(|e| unsupported(e.to_string()))?;
    // Every tensor against the config: a feed-forward width other than the
    // real model's rounding shows up here.
    let mapped = OriginalTransformer::new(source.clone(), path, &cfg)?;
    for (key, want) in weight_shapes(&cfg) {
        if let Some(found) = mapped.shape(&key) {
            if found != want {
                return Err(Error::Shape {
                    path: path.to_path_buf(),
                    key: mapped.file_key(&key),
                    expected: want,
                    found,
                });
            }
        }
    }
    Ok(cfg)
}

fn not_lumina(path: &Path) -> Error {
    Error::Unsupported {
        path: path.to_path_buf(),
        reason: "not a Lumina2 transformer checkpoint (no caption embedder key in diffusers, original or ComfyUI layout)".into(),
    }
}

/// The keys of an original-layout checkpoint of the model `cfg` describes
/// (without the ComfyUI prefix and without `norm_final.weight`, which the
/// model does not use). Mapped through [`original_key_to_diffusers`], with each
/// `qkv` split into `to_q`, `to_k` and `to_v`, they are exactly the keys of
/// [`weight_shapes`] (a test checks it), so original module names can be
/// listed for any config without a file.
pub(crate) fn original_weight_keys(cfg: &Config) -> Vec<String> {
    let mut k: Vec<String> = Vec::new();
    let linear = |k: &mut Vec<String>, m: &str| {
        k.push(format!("{m}.weight"));
        k.push(format!("{m}.bias"));
    };
    linear(&mut k, "x_embedder");
    linear(&mut k, "t_embedder.mlp.0");
    linear(&mut k, "t_embedder.mlp.2");
    k.push("cap_embedder.0.weight".into());
    linear(&mut k, "cap_embedder.1");
    let stacks = [
        ("context_refiner", cfg.num_refiner_layers, false),
        ("noise_refiner", cfg.num_refiner_layers, true),
        ("layers", cfg.num_layers, true),
    ];
    for (stack, n, modulated) in stacks {
        for i in 0..n {
            let b = format!("{stack}.{i}");
            for w in [
                "attention.qkv",
                "attention.out",
                "attention.q_norm",
                "attention.k_norm",
                "feed_forward.w1",
                "feed_forward.w2",
                "feed_forward.w3",
                "attention_norm1",
                "attention_norm2",
                "ffn_norm1",
                "ffn_norm2",
            ] {
                k.push(format!("{b}.{w}.weight"));
            }
            if modulated {
                linear(&mut k, &format!("{b}.adaLN_modulation.1"));
            }
        }
    }
    linear(&mut k, "final_layer.linear");
    linear(&mut k, "final_layer.adaLN_modulation.1");
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_keys_map_onto_exactly_the_diffusers_keys() {
        let tiny = Config {
            hidden_size: 32,
            num_layers: 3,
            num_refiner_layers: 2,
            num_attention_heads: 4,
            num_kv_heads: 2,
            axes_dim_rope: vec![4, 2, 2],
            ..Config::default()
        };
        for cfg in [Config::default(), tiny] {
            let mut mapped: Vec<String> = original_weight_keys(&cfg)
                .iter()
                .map(|k| original_key_to_diffusers(k))
                .flat_map(|d| {
                    if d.contains("qkv") {
                        ["to_q", "to_k", "to_v"]
                            .map(|p| d.replace("qkv", p))
                            .to_vec()
                    } else {
                        vec![d]
                    }
                })
                .collect();
            mapped.sort();
            let mut want: Vec<String> = weight_shapes(&cfg).into_iter().map(|(k, _)| k).collect();
            want.sort();
            assert_eq!(mapped, want);
        }
    }
}
