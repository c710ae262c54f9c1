//! Z-Image transformers from the single files people download: ComfyUI's
//! (`diffusion_models/z_image_turbo_bf16.safetensors`, or the all-in-one
//! checkpoint under `model.diffusion_model.`), the community GGUF
//! quantisations made with ComfyUI-GGUF's `tools/convert.py` (kept
//! quantised), and diffusers-key single files.
//!
//! The original (Tongyi / ComfyUI) layout differs from diffusers'
//! `ZImageTransformer2DModel` in a few names only, as diffusers 0.42.1's
//! `convert_z_image_transformer_checkpoint_to_diffusers` maps them:
//!
//! | original | diffusers |
//! |---|---|
//! | `x_embedder.*` | `all_x_embedder.2-1.*` |
//! | `final_layer.*` | `all_final_layer.2-1.*` |
//! | `*.attention.qkv.weight` (q, k, v rows) | `*.attention.to_q/to_k/to_v.weight` |
//! | `*.attention.out.weight` | `*.attention.to_out.0.weight` |
//! | `*.attention.q_norm/k_norm.weight` | `*.attention.norm_q/norm_k.weight` |
//! | `norm_final.weight` (unused) | dropped |
//!
//! Everything else (`t_embedder.mlp.*`, `cap_embedder.*`, `x_pad_token`,
//! `cap_pad_token`, `adaLN_modulation.0`, `attention_norm1/2`,
//! `ffn_norm1/2`, `feed_forward.w1..w3`) has the same name in both. The
//! patch key is the config's (diffusers hard-codes `2-1`, the only patch
//! size of the released models); the original layout holds one patch size.
//! The files are read through the same [`OriginalTransformer`] view as
//! Lumina2's original checkpoints.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};
use lumina2_transformer::zimage::{ZImageConfig, ZImageTransformer};
use lumina2_transformer::{WeightSource, Weights};

use crate::folder::Error;
use crate::gguf::GgufFile;
use crate::model_keys::{strip_comfy, ModelKeys, COMFY_PREFIX};
use crate::original::{check_keys, OriginalTransformer};
use crate::pth::PthFile;

/// Key layout of a Z-Image transformer file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZImageLayout {
    /// diffusers' `ZImageTransformer2DModel` names (`all_x_embedder.2-1`, `attention.to_q`, ...).
    Diffusers,
    /// The original names (`x_embedder`, fused `attention.qkv`, `attention.out`, ...).
    Original,
    /// Original (or diffusers) names under ComfyUI's `model.diffusion_model.` prefix.
    ComfyUi,
}

impl ZImageLayout {
    /// A short description, for `lumina2 inspect` and messages.
    pub fn describe(self) -> &'static str {
        match self {
            ZImageLayout::Diffusers => "Z-Image transformer, diffusers keys",
            ZImageLayout::Original => {
                "Z-Image transformer, original keys (ComfyUI / Tongyi: fused attention.qkv)"
            }
            ZImageLayout::ComfyUi => {
                "Z-Image transformer, ComfyUI checkpoint (keys under model.diffusion_model.)"
            }
        }
    }
}

/// Recognises a Z-Image transformer from its keys: the learnt pad tokens or
/// the unmodulated-by-SiLU `adaLN_modulation.0` of its blocks (diffusers'
/// `CHECKPOINT_KEY_NAMES["z-image-turbo"]` marker; Lumina2's is
/// `adaLN_modulation.1`). `None` for anything else.
pub fn detect_zimage_layout<'a>(keys: impl IntoIterator<Item = &'a str>) -> Option<ZImageLayout> {
    let (mut zimage, mut prefixed, mut diffusers) = (false, false, false);
    for key in keys {
        let plain = strip_comfy(key);
        prefixed |= plain.len() != key.len();
        zimage |= matches!(plain, "x_pad_token" | "cap_pad_token")
            || (plain.ends_with(".adaLN_modulation.0.weight")
                && (plain.starts_with("layers.") || plain.starts_with("noise_refiner.")));
        diffusers |= plain.starts_with("all_x_embedder.") || plain.starts_with("all_final_layer.");
    }
    zimage.then_some(if prefixed {
        ZImageLayout::ComfyUi
    } else if diffusers {
        ZImageLayout::Diffusers
    } else {
        ZImageLayout::Original
    })
}

/// The patch key of the original layout's one patch embedder and final layer.
fn original_patch_key(cfg: &ZImageConfig) -> String {
    let p = cfg.all_patch_size.first().copied().unwrap_or(2);
    let f = cfg.all_f_patch_size.first().copied().unwrap_or(1);
    ZImageConfig::patch_key(p, f)
}

/// The diffusers name of an original Z-Image key (ComfyUI prefix removed
/// first; a fused `qkv` keeps `qkv`). Diffusers names come back unchanged.
pub fn original_key_to_diffusers(cfg: &ZImageConfig, key: &str) -> String {
    let plain = strip_comfy(key);
    let pk = original_patch_key(cfg);
    let mut k = if let Some(rest) = plain.strip_prefix("x_embedder.") {
        format!("all_x_embedder.{pk}.{rest}")
    } else if let Some(rest) = plain.strip_prefix("final_layer.") {
        format!("all_final_layer.{pk}.{rest}")
    } else {
        plain.to_string()
    };
    for (from, to) in [
        (".attention.out.", ".attention.to_out.0."),
        (".attention.q_norm.", ".attention.norm_q."),
        (".attention.k_norm.", ".attention.norm_k."),
    ] {
        k = k.replace(from, to);
    }
    k
}

/// The keys of an original-layout Z-Image file for `cfg` (no prefix, no
/// `norm_final.weight`), derived from the model's own weight list: its first
/// patch size's embedder and final layer under their original names, each
/// block's `to_q`/`to_k`/`to_v` as one `qkv`.
pub fn original_weight_keys(cfg: &ZImageConfig) -> Vec<String> {
    let pk = original_patch_key(cfg);
    let (x_emb, final_layer) = (
        format!("all_x_embedder.{pk}."),
        format!("all_final_layer.{pk}."),
    );
    let mut out = Vec::new();
    for (k, _) in lumina2_transformer::zimage::weight_shapes(cfg) {
        let k = if let Some(rest) = k.strip_prefix(&x_emb) {
            format!("x_embedder.{rest}")
        } else if let Some(rest) = k.strip_prefix(&final_layer) {
            format!("final_layer.{rest}")
        } else if k.starts_with("all_x_embedder.") || k.starts_with("all_final_layer.") {
            // Other patch sizes have no original name.
            continue;
        } else if k.ends_with(".attention.to_k.weight") || k.ends_with(".attention.to_v.weight") {
            continue;
        } else {
            k.replace(".attention.to_q.", ".attention.qkv.")
                .replace(".attention.to_out.0.", ".attention.out.")
                .replace(".attention.norm_q.", ".attention.q_norm.")
                .replace(".attention.norm_k.", ".attention.k_norm.")
        };
        out.push(k);
    }
    out
}

fn unsupported(path: &Path, reason: impl Into<String>) -> Error {
    Error::Unsupported {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// The architectures a Z-Image GGUF may declare: ComfyUI-GGUF's
/// `tools/convert.py` detects Z-Image as `lumina2` (its `ModelLumina2`
/// matches `cap_embedder.1.weight` and `context_refiner.0.attention.qkv.weight`),
/// and its loader accepts only the architectures of `IMG_ARCH_LIST`.
const GGUF_ARCHITECTURES: [&str; 1] = ["lumina2"];

/// A file's raw tensors, and the GGUF file itself when it is one (its
/// linear weights are then cut while quantised).
type RawFile = (Arc<dyn WeightSource>, Option<Arc<GgufFile>>);

/// Opens the raw tensors of a single file (`.safetensors`, `.pth`/`.pt`/`.bin`, `.gguf`).
fn open_raw(path: &Path) -> Result<RawFile, Error> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "gguf" => {
            let g = Arc::new(GgufFile::open(path).map_err(|e| unsupported(path, e.to_string()))?);
            let arch = g.metadata().get("general.architecture");
            if let Some(a) = arch {
                match a.as_str() {
                    Some(s) if GGUF_ARCHITECTURES.contains(&s) => {}
                    _ => {
                        return Err(unsupported(
                            path,
                            format!(
                                "general.architecture is {a:?}, a Z-Image GGUF has {GGUF_ARCHITECTURES:?}"
                            ),
                        ))
                    }
                }
            }
            Ok((g.clone(), Some(g)))
        }
        "pth" | "pt" | "bin" => Ok((Arc::new(PthFile::open(path)?), None)),
        "safetensors" => Ok((
            Arc::new(
                lumina2_transformer::weights::SafetensorsSource::open(&[path])
                    .map_err(|e| unsupported(path, e.to_string()))?,
            ),
            None,
        )),
        _ => Err(unsupported(
            path,
            format!("unknown checkpoint extension `.{ext}` (expected .safetensors, .gguf or .pth)"),
        )),
    }
}

/// Opens a single-file Z-Image transformer in any layout (diffusers,
/// original, ComfyUI; `.safetensors`, `.gguf`, `.pth`) as a source with
/// diffusers' key names for `cfg`. Linear weights of a GGUF file stay
/// quantised, the parts of a fused `qkv` too. Every missing and unexpected
/// key is listed in one [`Error::KeyMismatch`], a tensor of the wrong shape
/// is [`Error::Shape`] naming the file's key, a file that is no Z-Image
/// transformer is [`Error::Unsupported`].
pub fn open_zimage_transformer_file(
    path: &Path,
    cfg: &ZImageConfig,
) -> Result<Arc<dyn WeightSource>, Error> {
    let (raw, gguf) = open_raw(path)?;
    let keys = raw.keys();
    let layout = detect_zimage_layout(keys.iter().map(String::as_str)).ok_or_else(|| {
        unsupported(
            path,
            "not a Z-Image transformer (no `x_pad_token`, `cap_pad_token` or `layers.N.adaLN_modulation.0` key, bare or under `model.diffusion_model.`)",
        )
    })?;
    if layout == ZImageLayout::Diffusers {
        check_keys(raw.as_ref(), path, cfg)?;
        check_shapes(raw.as_ref(), path, cfg, str::to_string)?;
        return Ok(raw);
    }
    let mapped = match gguf {
        Some(g) => OriginalTransformer::from_gguf(g, path, cfg)?,
        None => OriginalTransformer::new(raw, path, cfg)?,
    };
    check_shapes(&mapped, path, cfg, |k| mapped.file_key(k))?;
    Ok(Arc::new(mapped))
}

/// The config of a Z-Image transformer file that comes without one (ComfyUI
/// and GGUF files never have one): diffusers' defaults (Z-Image-Turbo's)
/// with the sizes the tensors give: width and latent channels from the
/// patch embedder (at the default patch 2x2x1), caption width from
/// `cap_embedder.0`, head width from `q_norm`, block counts. What shapes do
/// not fix (RoPE theta and axes, `t_scale`) is the released model's; a head
/// width that does not fit its RoPE axes asks for the `config.json`. Every
/// tensor is checked against it when the file is opened.
pub fn infer_zimage_config(source: &dyn WeightSource, path: &Path) -> Result<ZImageConfig, Error> {
    let keys = source.keys();
    let prefix = if keys.iter().any(|k| k.starts_with(COMFY_PREFIX)) {
        COMFY_PREFIX
    } else {
        ""
    };
    let mut cfg = ZImageConfig::default();
    let pk = original_patch_key(&cfg);
    let find = |names: &[String]| -> Result<(String, Vec<usize>), Error> {
        names
            .iter()
            .find_map(|n| {
                let full = format!("{prefix}{n}");
                source.shape(&full).map(|s| (full, s))
            })
            .ok_or_else(|| Error::KeyMismatch {
                path: path.to_path_buf(),
                missing: vec![format!("{prefix}{}", names[0])],
                unexpected: Vec::new(),
            })
    };
    let dims2 = |names: &[String]| -> Result<(String, usize, usize), Error> {
        let (key, s) = find(names)?;
        match s[..] {
            [a, b] => Ok((key, a, b)),
            _ => Err(Error::Shape {
                path: path.to_path_buf(),
                key,
                expected: vec![0, 0],
                found: s,
            }),
        }
    };
    let (_, dim, patch_in) = dims2(&[
        "x_embedder.weight".to_string(),
        format!("all_x_embedder.{pk}.weight"),
    ])?;
    let (_, _, cap) = dims2(&["cap_embedder.1.weight".to_string()])?;
    let (qn_key, qn) = find(&[
        "layers.0.attention.q_norm.weight".to_string(),
        "layers.0.attention.norm_q.weight".to_string(),
    ])?;
    let head_dim = match qn[..] {
        [h] => h,
        _ => {
            return Err(Error::Shape {
                path: path.to_path_buf(),
                key: qn_key,
                expected: vec![0],
                found: qn,
            })
        }
    };
    let ask = |reason: String| {
        unsupported(
            path,
            format!("{reason}: give the transformer's config.json"),
        )
    };
    let p2 = cfg.patch_dim(2, 1) / cfg.in_channels.max(1);
    if p2 == 0 || !patch_in.is_multiple_of(p2) {
        return Err(ask(format!(
            "the patch embedder takes {patch_in} values, not a whole number of 2x2 patches"
        )));
    }
    if head_dim == 0 || !dim.is_multiple_of(head_dim) {
        return Err(ask(format!(
            "head width {head_dim} does not divide the width {dim}"
        )));
    }
    let count = |stack: &str| -> usize {
        keys.iter()
            .filter_map(|k| {
                let rest = k.strip_prefix(prefix)?.strip_prefix(stack)?;
                rest.split_once('.')?.0.parse::<usize>().ok()
            })
            .collect::<BTreeSet<usize>>()
            .len()
    };
    cfg.dim = dim;
    cfg.in_channels = patch_in / p2;
    cfg.cap_feat_dim = cap;
    cfg.n_heads = dim / head_dim;
    cfg.n_kv_heads = cfg.n_heads;
    cfg.n_layers = count("layers.");
    cfg.n_refiner_layers = count("noise_refiner.");
    if cfg.axes_dims.iter().sum::<usize>() != head_dim {
        return Err(ask(format!(
            "head width {head_dim}, the released model's RoPE axes {:?} need {}",
            cfg.axes_dims,
            cfg.axes_dims.iter().sum::<usize>()
        )));
    }
    cfg.validate().map_err(|e| ask(e.to_string()))?;
    Ok(cfg)
}

/// The config of a single Z-Image transformer file opened on its own
/// ([`infer_zimage_config`] over its raw tensors, any layout or format).
pub fn zimage_file_config(path: &Path) -> Result<ZImageConfig, Error> {
    let (raw, _) = open_raw(path)?;
    infer_zimage_config(raw.as_ref(), path)
}

/// Every tensor's shape against `cfg`: a wrong one is [`Error::Shape`]
/// naming the file's key (`file_key`).
fn check_shapes(
    source: &dyn WeightSource,
    path: &Path,
    cfg: &ZImageConfig,
    file_key: impl Fn(&str) -> String,
) -> Result<(), Error> {
    for (key, want) in cfg.weight_shapes() {
        if let Some(found) = source.shape(&key) {
            if found != want {
                return Err(Error::Shape {
                    path: path.to_path_buf(),
                    key: file_key(&key),
                    expected: want,
                    found,
                });
            }
        }
    }
    Ok(())
}

/// A Z-Image transformer from a single file, ready to run: the file opened
/// in whatever layout it has ([`open_zimage_transformer_file`]), with the
/// given config or, without one, the config its tensors imply
/// ([`infer_zimage_config`]), every key and shape checked, the LoRAs (each
/// with its strength) on top. Returns the model and the config used: the
/// same [`ZImageTransformer`] a diffusers folder gives.
pub fn load_zimage_transformer_file<P: AsRef<Path>>(
    path: &Path,
    cfg: Option<&ZImageConfig>,
    loras: &[(P, f64)],
    dtype: DType,
    device: &Device,
) -> Result<(ZImageTransformer, ZImageConfig), Error> {
    let cfg = match cfg {
        Some(c) => c.clone(),
        None => zimage_file_config(path)?,
    };
    let mut source = open_zimage_transformer_file(path, &cfg)?;
    if !loras.is_empty() {
        source = Arc::new(crate::lora::LoraSource::open(source, &cfg, loras)?);
    }
    let model =
        ZImageTransformer::new(&cfg, &Weights::new(source, dtype, device)).map_err(|source| {
            Error::Model {
                path: path.to_path_buf(),
                source: Box::new(source),
            }
        })?;
    Ok((model, cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ZImageConfig {
        ZImageConfig {
            dim: 16,
            n_layers: 2,
            n_refiner_layers: 1,
            n_heads: 2,
            n_kv_heads: 2,
            cap_feat_dim: 24,
            in_channels: 4,
            axes_dims: vec![2, 2, 4],
            axes_lens: vec![128, 32, 32],
            ..ZImageConfig::default()
        }
    }

    #[test]
    fn original_keys_map_onto_exactly_the_diffusers_keys() {
        for cfg in [tiny(), ZImageConfig::default()] {
            let mut mapped: Vec<String> = original_weight_keys(&cfg)
                .iter()
                .map(|k| original_key_to_diffusers(&cfg, k))
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
            let mut want: Vec<String> = cfg.weight_shapes().into_iter().map(|(k, _)| k).collect();
            want.sort();
            assert_eq!(mapped, want);
            // The ComfyUI prefix maps the same, and diffusers names are fixed points.
            for (k, _) in cfg.weight_shapes() {
                assert_eq!(original_key_to_diffusers(&cfg, &k), k);
            }
            assert_eq!(
                original_key_to_diffusers(
                    &cfg,
                    "model.diffusion_model.layers.0.attention.out.weight"
                ),
                "layers.0.attention.to_out.0.weight"
            );
        }
    }

    #[test]
    fn layouts_are_told_apart() {
        let cfg = tiny();
        let orig = original_weight_keys(&cfg);
        let diff: Vec<String> = cfg.weight_shapes().into_iter().map(|(k, _)| k).collect();
        let comfy: Vec<String> = orig.iter().map(|k| format!("{COMFY_PREFIX}{k}")).collect();
        let lumina = crate::original::original_weight_keys(&lumina2_transformer::Config::default());
        let of = |v: &[String]| detect_zimage_layout(v.iter().map(String::as_str));
        assert_eq!(of(&orig), Some(ZImageLayout::Original));
        assert_eq!(of(&diff), Some(ZImageLayout::Diffusers));
        assert_eq!(of(&comfy), Some(ZImageLayout::ComfyUi));
        assert_eq!(of(&lumina), None);
    }
}
