//! `transformer` cases.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use lumina2_transformer::weights::SafetensorsSource;
use lumina2_transformer::{Config, Lumina2Transformer, WeightSource, Weights};

use super::Prepared;
use super::{input, Case};

struct TransformerCase {
    model: Lumina2Transformer,
    inputs: BTreeMap<String, Tensor>,
}

pub fn prepare(case: &Case, int8: bool) -> Result<Box<dyn Prepared>> {
    let model_path = case.model()?;
    let dev = Device::Cpu;
    let (cfg, source): (Config, Arc<dyn WeightSource>) = if model_path.is_dir() {
        let folder = lumina2_loader::ComponentFolder::open(model_path)
            .with_context(|| format!("opening {}", model_path.display()))?;
        let config_dir = case.model_config.as_deref().unwrap_or(model_path);
        let source = SafetensorsSource::open(folder.safetensors_files())?;
        (Config::from_file(config_dir)?, Arc::new(source))
    } else {
        // A single file (original, ComfyUI or diffusers keys; safetensors, .pth
        // or GGUF); config from `model_config`.
        let config_dir = case
            .model_config
            .as_deref()
            .context("a single-file model needs `model_config`")?;
        let cfg = Config::from_file(config_dir)?;
        let source = lumina2_loader::open_transformer_file(model_path, &cfg)?;
        (cfg, source)
    };
    let loras = loras(case)?;
    let source: Arc<dyn WeightSource> = if loras.is_empty() {
        source
    } else {
        Arc::new(lumina2_loader::LoraSource::open(source, &cfg, &loras)?)
    };
    let weights = Weights::new(source, case.dtype, &dev).with_int8_linears(int8);
    let model = Lumina2Transformer::new(&cfg, &weights)?;
    Ok(Box::new(TransformerCase {
        model,
        inputs: case.inputs()?,
    }))
}

/// `args.lora`: a list of `{"path": file relative to the case, "scale": float}`.
pub(super) fn loras(case: &Case) -> Result<Vec<(PathBuf, f64)>> {
    let items = match case.args.get("lora") {
        None | Some(serde_json::Value::Null) => return Ok(Vec::new()),
        Some(serde_json::Value::Array(items)) => items,
        Some(other) => bail!("`lora` must be a list, not {other}"),
    };
    items
        .iter()
        .map(|item| {
            let path = item
                .get("path")
                .and_then(|p| p.as_str())
                .with_context(|| format!("`lora` entry {item} has no string `path`"))?;
            let scale = item
                .get("scale")
                .and_then(|s| s.as_f64())
                .with_context(|| format!("`lora` entry {item} has no number `scale`"))?;
            let full = case.path("args.lora.path", path)?;
            if !full.is_file() {
                bail!("LoRA file `{path}` is not a file in the case");
            }
            Ok((full, scale))
        })
        .collect()
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
