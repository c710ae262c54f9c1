//! `vae_decode` and `vae_encode` cases.
//!
//! `args`: optional `"tiling": true` turns on diffusers' default tiling
//! (`vae.enable_tiling()`) on our side, as the reference did; then inputs
//! larger than a tile (`sample_size`, or `sample_size / 2^(levels-1)` latents)
//! are decoded or encoded tile by tile.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use lumina2_vae::{AutoencoderKL, AutoencoderKLConfig, Weights};

use super::Prepared;
use super::{input, Case};

struct VaeCase {
    model: AutoencoderKL,
    encode: bool,
    inputs: BTreeMap<String, Tensor>,
}

pub fn prepare(case: &Case) -> Result<Box<dyn Prepared>> {
    let tiling = match case.args.get("tiling") {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Bool(b)) => *b,
        Some(other) => bail!("`tiling` must be a boolean, got {other}"),
    };
    let model_path = case.model()?;
    let dev = Device::Cpu;
    let (cfg, weights) = if model_path.is_file() {
        // A single file (BFL/ComfyUI keys, or a checkpoint's `vae.*`): the
        // Flux config inferred from it unless the case gives one.
        let file = lumina2_loader::SingleFile::open(model_path)?;
        let cfg = match case.model_config.as_deref() {
            Some(c) => AutoencoderKLConfig::from_file(c)?,
            None => file.flux_vae_config()?,
        };
        (cfg, Weights::new(file.vae()?, case.dtype, &dev))
    } else {
        let folder = lumina2_loader::ComponentFolder::open(model_path)
            .with_context(|| format!("opening {}", model_path.display()))?;
        let config_dir = case.model_config.as_deref().unwrap_or(model_path);
        let cfg = AutoencoderKLConfig::from_file(config_dir)?;
        (
            cfg,
            Weights::from_safetensors(folder.safetensors_files(), case.dtype, &dev)?,
        )
    };
    let mut model = AutoencoderKL::new(&cfg, &weights)?;
    if tiling {
        model.enable_tiling();
    }
    Ok(Box::new(VaeCase {
        model,
        encode: case.component == "vae_encode",
        inputs: case.inputs()?,
    }))
}

impl Prepared for VaeCase {
    fn run(&mut self) -> Result<BTreeMap<String, Tensor>> {
        if self.encode {
            let d = self.model.encode(input(&self.inputs, "sample")?)?;
            Ok(BTreeMap::from([
                ("mean".to_string(), d.mean),
                ("logvar".to_string(), d.logvar),
            ]))
        } else {
            let out = self.model.decode(input(&self.inputs, "latents")?)?;
            Ok(BTreeMap::from([("sample".to_string(), out)]))
        }
    }
}
