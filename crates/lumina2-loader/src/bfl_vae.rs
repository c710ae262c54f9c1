//! The Flux VAE in Black Forest Labs' original key names, as ComfyUI ships
//! it (`split_files/vae/ae.safetensors`, and under `vae.` in the all-in-one
//! checkpoint), seen through diffusers' `AutoencoderKL` names.
//!
//! The mapping (`VAE_KEYS`, one table read both ways) is diffusers
//! 0.42.1's `convert_ldm_vae_checkpoint` (`loaders/single_file_utils.py`),
//! read backwards: `down.N.block.M` is
//! `down_blocks.N.resnets.M`, `up.N` is `up_blocks.{n-1-N}` (the original
//! counts decoder levels from the lowest resolution), `mid.block_K` is
//! `mid_block.resnets.{K-1}`, `nin_shortcut` is `conv_shortcut`, `norm_out`
//! is `conv_norm_out`, and the mid attention's `norm, q, k, v, proj_out` are
//! `group_norm, to_q, to_k, to_v, to_out.0`, stored as 1x1 convolutions
//! (`[C, C, 1, 1]`) and read as the linear layers' `[C, C]`, as diffusers'
//! `update_vae_attentions_ldm_to_diffusers` reshapes them.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::Tensor;
use lumina2_vae::AutoencoderKLConfig;
use lumina2_weights::WeightSource;

use crate::folder::Error;

/// A key only the BFL layout has: the first resnet of the encoder.
pub const BFL_VAE_MARKER: &str = "encoder.down.0.block.0.conv1.weight";

/// Where a diffusers key is in the file, and whether a 1x1 convolution
/// weight is read as a linear one.
#[derive(Debug, Clone)]
struct Origin {
    key: String,
    squeeze: bool,
}

/// The Flux VAE's keys in both namings, one row per kind of tensor: the
/// BFL pattern, the diffusers pattern, and whether the row is a mid
/// attention linear layer (its weight is a `[C, C, 1, 1]` convolution in
/// BFL's file and `[C, C]` in diffusers'). Placeholders (a whole segment):
/// `{S}` encoder/decoder, `{D}` an encoder level (the same both sides),
/// `{U}` a decoder level (`up.N` is `up_blocks.{levels-1-N}`), `{J}` a
/// resnet index, `{R}` a resnet layer ([`RESNET_LAYERS`]), `{P}` weight or
/// bias. Read one way it is diffusers' `convert_ldm_vae_checkpoint`; read
/// the other way, what `lumina2 convert` writes ComfyUI's VAE with.
const VAE_KEYS: [(&str, &str, bool); 16] = [
    ("quant_conv.{P}", "quant_conv.{P}", false),
    ("post_quant_conv.{P}", "post_quant_conv.{P}", false),
    ("{S}.conv_in.{P}", "{S}.conv_in.{P}", false),
    ("{S}.conv_out.{P}", "{S}.conv_out.{P}", false),
    ("{S}.norm_out.{P}", "{S}.conv_norm_out.{P}", false),
    (
        "{S}.mid.block_1.{R}.{P}",
        "{S}.mid_block.resnets.0.{R}.{P}",
        false,
    ),
    (
        "{S}.mid.block_2.{R}.{P}",
        "{S}.mid_block.resnets.1.{R}.{P}",
        false,
    ),
    (
        "{S}.mid.attn_1.norm.{P}",
        "{S}.mid_block.attentions.0.group_norm.{P}",
        false,
    ),
    (
        "{S}.mid.attn_1.q.{P}",
        "{S}.mid_block.attentions.0.to_q.{P}",
        true,
    ),
    (
        "{S}.mid.attn_1.k.{P}",
        "{S}.mid_block.attentions.0.to_k.{P}",
        true,
    ),
    (
        "{S}.mid.attn_1.v.{P}",
        "{S}.mid_block.attentions.0.to_v.{P}",
        true,
    ),
    (
        "{S}.mid.attn_1.proj_out.{P}",
        "{S}.mid_block.attentions.0.to_out.0.{P}",
        true,
    ),
    (
        "encoder.down.{D}.block.{J}.{R}.{P}",
        "encoder.down_blocks.{D}.resnets.{J}.{R}.{P}",
        false,
    ),
    (
        "encoder.down.{D}.downsample.conv.{P}",
        "encoder.down_blocks.{D}.downsamplers.0.conv.{P}",
        false,
    ),
    (
        "decoder.up.{U}.block.{J}.{R}.{P}",
        "decoder.up_blocks.{U}.resnets.{J}.{R}.{P}",
        false,
    ),
    (
        "decoder.up.{U}.upsample.conv.{P}",
        "decoder.up_blocks.{U}.upsamplers.0.conv.{P}",
        false,
    ),
];

/// A resnet's layers: BFL name, diffusers name.
const RESNET_LAYERS: [(&str, &str); 5] = [
    ("norm1", "norm1"),
    ("conv1", "conv1"),
    ("norm2", "norm2"),
    ("conv2", "conv2"),
    ("nin_shortcut", "conv_shortcut"),
];

/// The segment a placeholder's segment `value` becomes on the other side
/// (`to_diffusers`: BFL to diffusers), `None` when it is not a valid value.
fn placeholder(kind: &str, value: &str, levels: usize, to_diffusers: bool) -> Option<String> {
    // Numbers as written (no sign, no leading zero), so that the renaming
    // is one to one.
    let number = || {
        value
            .parse::<usize>()
            .ok()
            .filter(|n| n.to_string() == value)
    };
    let level = || number().filter(|&l| l < levels);
    match kind {
        "{S}" => matches!(value, "encoder" | "decoder").then(|| value.to_string()),
        "{D}" => level().map(|l| l.to_string()),
        "{U}" => level().map(|l| (levels - 1 - l).to_string()),
        "{J}" => number().map(|j| j.to_string()),
        "{P}" => is_param(value).then(|| value.to_string()),
        "{R}" => RESNET_LAYERS.iter().find_map(|&(bfl, diffusers)| {
            let (from, to) = if to_diffusers {
                (bfl, diffusers)
            } else {
                (diffusers, bfl)
            };
            (from == value).then(|| to.to_string())
        }),
        _ => None,
    }
}

/// `key` renamed through [`VAE_KEYS`] (`to_diffusers`: BFL to diffusers),
/// and whether it is a mid attention linear weight.
fn rename(key: &str, levels: usize, to_diffusers: bool) -> Option<(String, bool)> {
    let segments: Vec<&str> = key.split('.').collect();
    VAE_KEYS.iter().find_map(|&(bfl, diffusers, linear)| {
        let (from, to) = if to_diffusers {
            (bfl, diffusers)
        } else {
            (diffusers, bfl)
        };
        let pattern: Vec<&str> = from.split('.').collect();
        if pattern.len() != segments.len() {
            return None;
        }
        // Each placeholder's value on the other side.
        let mut values: Vec<(&str, String)> = Vec::new();
        for (p, s) in pattern.iter().zip(&segments) {
            if p.starts_with('{') {
                values.push((p, placeholder(p, s, levels, to_diffusers)?));
            } else if p != s {
                return None;
            }
        }
        let renamed: Vec<&str> = to
            .split('.')
            .map(|p| {
                values
                    .iter()
                    .find(|(k, _)| *k == p)
                    .map_or(p, |(_, v)| v.as_str())
            })
            .collect();
        Some((renamed.join("."), linear && key.ends_with(".weight")))
    })
}

/// The diffusers name of a BFL VAE key, for a VAE of `levels` resolution
/// levels, and whether its `[C, C, 1, 1]` weight is read as `[C, C]`;
/// `None` for a key the VAE does not have (`VAE_KEYS` read forwards).
pub fn bfl_key_to_diffusers(key: &str, levels: usize) -> Option<(String, bool)> {
    rename(key, levels, true)
}

/// The BFL name of a diffusers `AutoencoderKL` key, for a VAE of `levels`
/// resolution levels, and whether its `[C, C]` linear weight is stored as a
/// `[C, C, 1, 1]` convolution: `VAE_KEYS` read backwards, hence exactly
/// the inverse of [`bfl_key_to_diffusers`] (what `lumina2 convert` writes
/// ComfyUI's VAE with); `None` for a key the Flux VAE does not have. The
/// quant convs keep their names: the BFL layout reads them as they are.
pub fn diffusers_key_to_bfl(key: &str, levels: usize) -> Option<(String, bool)> {
    rename(key, levels, false)
}

fn is_param(t: &str) -> bool {
    t == "weight" || t == "bias"
}

/// The number of resolution levels of a BFL VAE: the `encoder.down.N` there are.
pub(crate) fn levels(keys: &[String]) -> usize {
    let mut seen = BTreeSet::new();
    for k in keys {
        if let Some(level) = k
            .strip_prefix("encoder.down.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(n, _)| n.parse::<usize>().ok())
        {
            seen.insert(level);
        }
    }
    seen.len()
}

/// A BFL-layout VAE seen through diffusers' `AutoencoderKL` names.
pub struct BflVae {
    inner: Arc<dyn WeightSource>,
    map: HashMap<String, Origin>,
    name: String,
    prefix: String,
}

impl BflVae {
    /// Maps every key of `inner` (BFL names, any prefix already removed);
    /// a key that is not part of the Flux VAE's layout is an error naming
    /// it, as are levels that are not numbered `0..n`.
    /// `prefix` is what the file puts before the keys (for messages).
    pub fn new(inner: Arc<dyn WeightSource>, path: &Path, prefix: &str) -> Result<Self, Error> {
        let keys = inner.keys();
        let n = levels(&keys);
        let mut map = HashMap::new();
        let mut unexpected = Vec::new();
        for key in keys {
            match bfl_key_to_diffusers(&key, n) {
                Some((d, squeeze)) => {
                    map.insert(d, Origin { key, squeeze });
                }
                None => unexpected.push(format!("{prefix}{key}")),
            }
        }
        if !unexpected.is_empty() {
            return Err(Error::KeyMismatch {
                path: path.to_path_buf(),
                missing: Vec::new(),
                unexpected,
            });
        }
        Ok(Self {
            name: inner.name(),
            inner,
            map,
            prefix: prefix.to_string(),
        })
    }

    /// The Flux VAE's config (diffusers' `AutoencoderKL` of
    /// FLUX.1/Lumina-Image 2.0: group norms of 32, scale 0.3611, shift
    /// 0.1159, no quant convs), with the sizes the file's tensors give:
    /// channels per level, resnets per level, image and latent channels,
    /// quant convs and the mid attention when present.
    pub fn flux_config(&self, path: &Path) -> Result<AutoencoderKLConfig, Error> {
        let shape = |key: &str| -> Result<Vec<usize>, Error> {
            self.shape(key).ok_or_else(|| Error::KeyMismatch {
                path: path.to_path_buf(),
                missing: vec![self.file_key(key)],
                unexpected: Vec::new(),
            })
        };
        let dim = |key: &str, i: usize| -> Result<usize, Error> {
            let s = shape(key)?;
            s.get(i).copied().ok_or_else(|| Error::Shape {
                path: path.to_path_buf(),
                key: self.file_key(key),
                expected: vec![0; i + 1],
                found: s.clone(),
            })
        };
        let mut cfg = AutoencoderKLConfig::flux();
        let levels = levels(&self.inner.keys());
        if levels == 0 {
            return Err(Error::KeyMismatch {
                path: path.to_path_buf(),
                missing: vec![format!("{}{BFL_VAE_MARKER}", self.prefix)],
                unexpected: Vec::new(),
            });
        }
        cfg.block_out_channels = (0..levels)
            .map(|i| {
                dim(
                    &format!("encoder.down_blocks.{i}.resnets.0.conv1.weight"),
                    0,
                )
            })
            .collect::<Result<_, _>>()?;
        cfg.down_block_types = vec!["DownEncoderBlock2D".into(); levels];
        cfg.up_block_types = vec!["UpDecoderBlock2D".into(); levels];
        cfg.layers_per_block = (0..)
            .take_while(|j| {
                self.contains(&format!("encoder.down_blocks.0.resnets.{j}.conv1.weight"))
            })
            .count();
        cfg.in_channels = dim("encoder.conv_in.weight", 1)?;
        cfg.out_channels = dim("decoder.conv_out.weight", 0)?;
        cfg.latent_channels = dim("decoder.conv_in.weight", 1)?;
        cfg.use_quant_conv = self.contains("quant_conv.weight");
        cfg.use_post_quant_conv = self.contains("post_quant_conv.weight");
        cfg.mid_block_add_attention = self.contains("decoder.mid_block.attentions.0.to_q.weight");
        Ok(cfg)
    }

    /// The key in the file of a diffusers key (for messages).
    fn file_key(&self, key: &str) -> String {
        let k = self.map.get(key).map_or(key, |o| o.key.as_str());
        format!("{}{k}", self.prefix)
    }
}

impl WeightSource for BflVae {
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
        match (o.squeeze, t.dims()) {
            (true, &[rows, cols, 1, 1]) => Ok(t.reshape((rows, cols))?),
            _ => Ok(t),
        }
    }
    fn name(&self) -> String {
        self.name.clone()
    }
    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        let o = self.map.get(key)?;
        let s = self.inner.shape(&o.key)?;
        match (o.squeeze, s.as_slice()) {
            (true, &[rows, cols, 1, 1]) => Some(vec![rows, cols]),
            _ => Some(s),
        }
    }
    fn keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self.map.keys().cloned().collect();
        k.sort();
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bfl_keys_map_as_diffusers_converts_them() {
        let cases = [
            ("encoder.conv_in.weight", "encoder.conv_in.weight", false),
            ("encoder.norm_out.bias", "encoder.conv_norm_out.bias", false),
            (
                "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                false,
            ),
            (
                "encoder.down.2.downsample.conv.bias",
                "encoder.down_blocks.2.downsamplers.0.conv.bias",
                false,
            ),
            (
                "decoder.up.3.block.2.conv1.weight",
                "decoder.up_blocks.0.resnets.2.conv1.weight",
                false,
            ),
            (
                "decoder.up.1.upsample.conv.weight",
                "decoder.up_blocks.2.upsamplers.0.conv.weight",
                false,
            ),
            (
                "decoder.mid.block_2.norm1.weight",
                "decoder.mid_block.resnets.1.norm1.weight",
                false,
            ),
            (
                "decoder.mid.attn_1.proj_out.weight",
                "decoder.mid_block.attentions.0.to_out.0.weight",
                true,
            ),
            (
                "encoder.mid.attn_1.q.bias",
                "encoder.mid_block.attentions.0.to_q.bias",
                false,
            ),
            (
                "encoder.mid.attn_1.norm.weight",
                "encoder.mid_block.attentions.0.group_norm.weight",
                false,
            ),
            ("quant_conv.weight", "quant_conv.weight", false),
        ];
        for (bfl, want, squeeze) in cases {
            assert_eq!(
                bfl_key_to_diffusers(bfl, 4),
                Some((want.to_string(), squeeze)),
                "{bfl}"
            );
            // The writer's mapping is its inverse.
            assert_eq!(
                diffusers_key_to_bfl(want, 4),
                Some((bfl.to_string(), squeeze)),
                "{want}"
            );
        }
        for bad in [
            "encoder.down_blocks.4.resnets.0.conv1.weight",
            "encoder.up_blocks.0.resnets.0.conv1.weight",
            "decoder.mid_block.resnets.2.conv1.weight",
            "decoder.mid_block.attentions.0.to_out.1.weight",
            "vae.encoder.conv_in.weight",
            "encoder.down_blocks.0.upsamplers.0.conv.weight",
            "encoder.conv_in.scale",
        ] {
            assert_eq!(diffusers_key_to_bfl(bad, 4), None, "{bad}");
        }
        for bad in [
            "encoder.down.4.block.0.conv1.weight",
            "encoder.up.0.block.0.conv1.weight",
            "decoder.mid.block_3.conv1.weight",
            "decoder.mid.attn_1.qkv.weight",
            "vae.encoder.conv_in.weight",
            "encoder.down.0.upsample.conv.weight",
            "encoder.conv_in.scale",
            "encoder.down.01.block.0.conv1.weight",
            "decoder.up.0.block.+1.conv1.weight",
        ] {
            assert_eq!(bfl_key_to_diffusers(bad, 4), None, "{bad}");
        }
    }
}
