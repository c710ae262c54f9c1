//! `zimage_transformer` cases.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use lumina2_transformer::weights::SafetensorsSource;
use lumina2_transformer::zimage::{ZImageConfig, ZImageTransformer, DEFAULT_PATCH};
use lumina2_transformer::{WeightSource, Weights};

use super::Prepared;
use super::{input, Case};

struct ZImageCase {
    model: ZImageTransformer,
    inputs: BTreeMap<String, Tensor>,
    patch: (usize, usize),
}

pub fn prepare(case: &Case) -> Result<Box<dyn Prepared>> {
    let model_path = case.model()?;
    let loras = super::transformer::loras(case)?;
    let model = if model_path.is_dir() {
        let folder = lumina2_loader::ComponentFolder::open(model_path)
            .with_context(|| format!("opening {}", model_path.display()))?;
        let cfg = ZImageConfig::from_file(case.model_config.as_deref().unwrap_or(model_path))?;
        let mut source: Arc<dyn WeightSource> =
            Arc::new(SafetensorsSource::open(folder.safetensors_files())?);
        if !loras.is_empty() {
            source = Arc::new(lumina2_loader::LoraSource::open(source, &cfg, &loras)?);
        }
        ZImageTransformer::new(&cfg, &Weights::new(source, case.dtype, &Device::Cpu))?
    } else {
        // A single file (ComfyUI / original keys, GGUF, diffusers keys); the
        // config from `model_config`, else inferred from the tensors.
        let cfg = match case.model_config.as_deref() {
            Some(dir) => Some(ZImageConfig::from_file(dir)?),
            None => None,
        };
        lumina2_loader::load_zimage_transformer_file(
            model_path,
            cfg.as_ref(),
            &loras,
            case.dtype,
            &Device::Cpu,
        )?
        .0
    };
    let patch = match case.args.get("patch_size") {
        None | Some(serde_json::Value::Null) => DEFAULT_PATCH,
        Some(v) => match v.as_u64() {
            Some(p) => (p as usize, 1),
            None => bail!("`patch_size` must be a positive integer, not {v}"),
        },
    };
    Ok(Box::new(ZImageCase {
        model,
        inputs: case.inputs()?,
        patch,
    }))
}

/// The per-item captions: the first `caption_lens[i]` rows of
/// `encoder_hidden_states[i]`.
pub fn captions(inputs: &BTreeMap<String, Tensor>) -> Result<Vec<Tensor>> {
    let caps = input(inputs, "encoder_hidden_states")?;
    let lens = input(inputs, "caption_lens")?.to_vec1::<i64>()?;
    lens.iter()
        .enumerate()
        .map(|(i, &n)| Ok(caps.get(i)?.narrow(0, 0, usize::try_from(n)?)?))
        .collect()
}

impl Prepared for ZImageCase {
    fn run(&mut self) -> Result<BTreeMap<String, Tensor>> {
        let i = &self.inputs;
        let out = self.model.forward_with_patch(
            input(i, "hidden_states")?,
            input(i, "timestep")?,
            &captions(i)?,
            self.patch,
        )?;
        Ok(BTreeMap::from([("sample".to_string(), out)]))
    }
}
