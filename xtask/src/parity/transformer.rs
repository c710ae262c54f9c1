//! `transformer` cases.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use lumina2_transformer::{Config, Lumina2Transformer, Weights};

use super::case::{input, Case};
use super::Prepared;

struct TransformerCase {
    model: Lumina2Transformer,
    inputs: BTreeMap<String, Tensor>,
}

pub fn prepare(case: &Case) -> Result<Box<dyn Prepared>> {
    if case.args.get("lora").is_some_and(|v| !v.is_null()) {
        anyhow::bail!("`lora` arguments are not implemented yet");
    }
    let model_path = case.model()?;
    let dev = Device::Cpu;
    let (files, config_dir) = if model_path.is_dir() {
        let folder = lumina2_loader::ComponentFolder::open(model_path)
            .with_context(|| format!("opening {}", model_path.display()))?;
        let config_dir = case.model_config.as_deref().unwrap_or(model_path);
        (folder.safetensors_files().to_vec(), config_dir)
    } else {
        // A single file (original, ComfyUI or diffusers keys); config from `model_config`.
        let config_dir = case
            .model_config
            .as_deref()
            .context("a single-file model needs `model_config`")?;
        let cfg = Config::from_file(config_dir)?;
        let source = lumina2_loader::open_transformer_file(model_path, &cfg)?;
        let model = Lumina2Transformer::new(&cfg, &Weights::new(source, case.dtype, &dev))?;
        return Ok(Box::new(TransformerCase {
            model,
            inputs: case.inputs()?,
        }));
    };
    let cfg = Config::from_file(config_dir)?;
    let weights = Weights::from_safetensors(&files, case.dtype, &dev)?;
    let model = Lumina2Transformer::new(&cfg, &weights)?;
    Ok(Box::new(TransformerCase {
        model,
        inputs: case.inputs()?,
    }))
}

impl Prepared for TransformerCase {
    fn run(&mut self) -> Result<BTreeMap<String, Tensor>> {
        let i = &self.inputs;
        let out = self.model.forward(
            input(i, "hidden_states")?,
            input(i, "timestep")?,
            input(i, "encoder_hidden_states")?,
            input(i, "encoder_attention_mask")?,
        )?;
        Ok(BTreeMap::from([("sample".to_string(), out)]))
    }
}
