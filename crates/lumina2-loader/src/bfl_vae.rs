//! The Flux VAE in Black Forest Labs' original key names, as ComfyUI ships
//! it (`split_files/vae/ae.safetensors`, and under `vae.` in the all-in-one
//! checkpoint), seen through diffusers' `AutoencoderKL` names.
//!
//! The mapping is diffusers 0.42.1's `convert_ldm_vae_checkpoint`
//! (`loaders/single_file_utils.py`), read backwards: `down.N.block.M` is
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

/// The diffusers name of a BFL VAE key, for a VAE of `levels` resolution
/// levels, and whether its `[C, C, 1, 1]` weight is read as `[C, C]`;
/// `None` for a key the VAE does not have.
pub fn bfl_key_to_diffusers(key: &str, levels: usize) -> Option<(String, bool)> {
    if let Some(t) = key
        .strip_prefix("quant_conv.")
        .or_else(|| key.strip_prefix("post_quant_conv."))
    {
        return is_param(t).then(|| (key.to_string(), false));
    }
    let (side, rest) = key.split_once('.')?;
    if side != "encoder" && side != "decoder" {
        return None;
    }
    let resnet = |t: &str| -> Option<String> {
        let (layer, param) = t.split_once('.')?;
        let layer = match layer {
            "norm1" | "conv1" | "norm2" | "conv2" => layer,
            "nin_shortcut" => "conv_shortcut",
            _ => return None,
        };
        is_param(param).then(|| format!("{layer}.{param}"))
    };
    let mapped = if let Some(t) = rest.strip_prefix("conv_in.") {
        is_param(t).then(|| (format!("conv_in.{t}"), false))?
    } else if let Some(t) = rest.strip_prefix("conv_out.") {
        is_param(t).then(|| (format!("conv_out.{t}"), false))?
    } else if let Some(t) = rest.strip_prefix("norm_out.") {
        is_param(t).then(|| (format!("conv_norm_out.{t}"), false))?
    } else if let Some(t) = rest.strip_prefix("mid.") {
        if let Some(a) = t.strip_prefix("attn_1.") {
            let (layer, param) = a.split_once('.')?;
            let to = match layer {
                "norm" => "group_norm",
                "q" => "to_q",
                "k" => "to_k",
                "v" => "to_v",
                "proj_out" => "to_out.0",
                _ => return None,
            };
            if !is_param(param) {
                return None;
            }
            let squeeze = layer != "norm" && param == "weight";
            (format!("mid_block.attentions.0.{to}.{param}"), squeeze)
        } else {
            let (block, t) = t.split_once('.')?;
            let k: usize = block.strip_prefix("block_")?.parse().ok()?;
            if !(1..=2).contains(&k) {
                return None;
            }
            (format!("mid_block.resnets.{}.{}", k - 1, resnet(t)?), false)
        }
    } else {
        let (dir, t) = rest.split_once('.')?;
        let (level, t) = t.split_once('.')?;
        let level: usize = level.parse().ok()?;
        if level >= levels {
            return None;
        }
        let (blocks, to_level) = match (side, dir) {
            ("encoder", "down") => ("down_blocks", level),
            ("decoder", "up") => ("up_blocks", levels - 1 - level),
            _ => return None,
        };
        if let Some(t) = t.strip_prefix("block.") {
            let (j, t) = t.split_once('.')?;
            let j: usize = j.parse().ok()?;
            (
                format!("{blocks}.{to_level}.resnets.{j}.{}", resnet(t)?),
                false,
            )
        } else {
            let sampler = if side == "encoder" { "down" } else { "up" };
            let param = t.strip_prefix(&format!("{sampler}sample.conv."))?;
            if !is_param(param) {
                return None;
            }
            (
                format!("{blocks}.{to_level}.{sampler}samplers.0.conv.{param}"),
                false,
            )
        }
    };
    Some((format!("{side}.{}", mapped.0), mapped.1))
}

/// The BFL name of a diffusers `AutoencoderKL` key, for a VAE of `levels`
/// resolution levels, and whether its `[C, C]` linear weight is stored as a
/// `[C, C, 1, 1]` convolution: exactly the inverse of
/// [`bfl_key_to_diffusers`] (what `lumina2 convert` writes ComfyUI's VAE
/// with); `None` for a key the Flux VAE does not have. The quant convs keep
/// their names: the BFL layout reads them as they are.
pub fn diffusers_key_to_bfl(key: &str, levels: usize) -> Option<(String, bool)> {
    if let Some(t) = key
        .strip_prefix("quant_conv.")
        .or_else(|| key.strip_prefix("post_quant_conv."))
    {
        return is_param(t).then(|| (key.to_string(), false));
    }
    let (side, rest) = key.split_once('.')?;
    if side != "encoder" && side != "decoder" {
        return None;
    }
    let resnet = |t: &str| -> Option<String> {
        let (layer, param) = t.split_once('.')?;
        let layer = match layer {
            "norm1" | "conv1" | "norm2" | "conv2" => layer,
            "conv_shortcut" => "nin_shortcut",
            _ => return None,
        };
        is_param(param).then(|| format!("{layer}.{param}"))
    };
    let mapped = if let Some(t) = rest.strip_prefix("conv_in.") {
        is_param(t).then(|| (format!("conv_in.{t}"), false))?
    } else if let Some(t) = rest.strip_prefix("conv_out.") {
        is_param(t).then(|| (format!("conv_out.{t}"), false))?
    } else if let Some(t) = rest.strip_prefix("conv_norm_out.") {
        is_param(t).then(|| (format!("norm_out.{t}"), false))?
    } else if let Some(a) = rest.strip_prefix("mid_block.attentions.0.") {
        let (layer, param) = match a.strip_prefix("to_out.0.") {
            Some(param) => ("proj_out", param),
            None => {
                let (layer, param) = a.split_once('.')?;
                let to = match layer {
                    "group_norm" => "norm",
                    "to_q" => "q",
                    "to_k" => "k",
                    "to_v" => "v",
                    _ => return None,
                };
                (to, param)
            }
        };
        if !is_param(param) {
            return None;
        }
        let unsqueeze = layer != "norm" && param == "weight";
        (format!("mid.attn_1.{layer}.{param}"), unsqueeze)
    } else if let Some(t) = rest.strip_prefix("mid_block.resnets.") {
        let (k, t) = t.split_once('.')?;
        let k: usize = k.parse().ok()?;
        if k > 1 {
            return None;
        }
        (format!("mid.block_{}.{}", k + 1, resnet(t)?), false)
    } else {
        let (blocks, t) = rest.split_once('.')?;
        let (level, t) = t.split_once('.')?;
        let level: usize = level.parse().ok()?;
        if level >= levels {
            return None;
        }
        let (dir, to_level, sampler) = match (side, blocks) {
            ("encoder", "down_blocks") => ("down", level, "down"),
            ("decoder", "up_blocks") => ("up", levels - 1 - level, "up"),
            _ => return None,
        };
        if let Some(t) = t.strip_prefix("resnets.") {
            let (j, t) = t.split_once('.')?;
            let j: usize = j.parse().ok()?;
            (format!("{dir}.{to_level}.block.{j}.{}", resnet(t)?), false)
        } else {
            let param = t.strip_prefix(&format!("{sampler}samplers.0.conv."))?;
            if !is_param(param) {
                return None;
            }
            (
                format!("{dir}.{to_level}.{sampler}sample.conv.{param}"),
                false,
            )
        }
    };
    Some((format!("{side}.{}", mapped.0), mapped.1))
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
        ] {
            assert_eq!(bfl_key_to_diffusers(bad, 4), None, "{bad}");
        }
    }
}
